"""Side by side with the paper's own code: the detached Jacobian of Gemma 3 270M, alternating
runs, each in a fresh process.

    python -m tools.bench_paper --paper-repo PATH [--dtype float32 float64] [--runs 3]

PATH is a checkout of the paper's repository (github.com/jamesgolden1/equivalent-linear-LLMs),
which the user provides; nothing of it is copied here. Its code runs as the paper runs it:
its locally linear Gemma 3 modeling file (models/gemma_3/modeling_gemma_locally_linear.py,
written as a drop-in for transformers' modeling_gemma3.py, so it is loaded as a module of
the installed transformers package — transformers<=4.52.4, as its requirements.txt says,
`pip install 'ggufjac[paper]'`) and its `model_forward` (models/gemma_3/gemma_3_forward.py),
differentiated by `torch.autograd.functional.jacobian(vectorize=True,
strategy="reverse-mode")` as src/JacobianAnalyzer.compute_jacobian does. Its weights are
ggufjac's dequantization of the same Q4_K_M file (norm weights minus 1: the GGUF stores
Gemma's 1 + w), every tensor held in memory as a Hugging Face model holds it. By default
(`--paper-load checkpoint`) they are written once, before the runs and untimed, as a Hugging
Face checkpoint (config.json, model.safetensors) that the paper's process reads with its
model class's `from_pretrained`, as src/JacobianAnalyzer.load_model does, and its input is
its own scaled embedding of the same tokens (its process runs no tokenizer: the token ids
are given). `--paper-load gguf` has its process read the same GGUF file instead, through
transformers' own GGUF loader (`from_pretrained(..., gguf_file=...)`, which dequantizes with
gguf-py; it needs accelerate, which the paper's requirements list): the one way its code takes
the file a ggufjac user has. `--paper-load direct` builds its model around ggufjac's tensors
in the same process, reading nothing: the lower bound of its process.

`--fallback` runs instead the reference of tools/bench_jacobian.py (autograd on ggufjac's
own detached model, every weight in memory), for a machine without transformers or the
paper's checkout.

Per run it prints the Jacobian step (the paper's: weights already in memory; ours:
`LoadedModel.jacobian`, which reads and dequantizes the layers as it goes), the whole
process (from its start: imports, reading the weights, the Jacobian) and the process's
peak resident memory (tools/peak_rss.py); then the medians, their ratios against the goals
(step ≥ 1.3x, whole ≥ 4x), and how far the two Jacobians are apart.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

PROMPT = "The bridge out of Marin is the"
MODELING = "models/gemma_3/modeling_gemma_locally_linear.py"
FORWARD = "models/gemma_3/gemma_3_forward.py"
# ggufjac's layer tensor names -> the Hugging Face Gemma 3 decoder layer's parameters
HF_LAYER = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
            "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
            "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
            "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
            "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
            "ffn_norm": "pre_feedforward_layernorm",
            "post_ffw_norm": "post_feedforward_layernorm"}
STARTED = time.perf_counter()  # as near the process start as a module gets


def _load(name: str, path: Path):
    """Import the file at `path` as module `name` (a submodule of an installed package when
    `name` is dotted: its relative imports then resolve there)."""
    if not path.is_file():
        raise SystemExit(f"--paper-repo: no {path} (a checkout of the paper's repository?)")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _transformers_gemma3():
    try:
        import transformers.models.gemma3  # noqa: F401  (the package its file belongs to)
        from transformers.models.gemma3.configuration_gemma3 import Gemma3TextConfig
    except ImportError as e:
        raise SystemExit(f"the paper's code needs transformers<=4.52.4 ({e}); "
                         "pip install 'ggufjac[paper]', or run with --fallback") from None
    return Gemma3TextConfig


def _paper_modules(repo: Path):
    _transformers_gemma3()
    modeling = _load("transformers.models.gemma3.modeling_gemma_locally_linear", repo / MODELING)
    forward = _load("paper_gemma_3_forward", repo / FORWARD)
    return modeling, forward


def paper_config(m, dtype):
    """The Hugging Face Gemma 3 text config of ggufjac's model `m`."""
    c = m.cfg
    global_base = next(c.rope_for_layer(i)[0] for i, swa in enumerate(c.swa_layers) if not swa)
    pattern = c.swa_layers.index(False) + 1  # every pattern-th layer is global
    config = _transformers_gemma3()(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff,
        num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
        num_key_value_heads=c.n_kv_head, head_dim=c.head_dim, rms_norm_eps=c.norm_eps,
        rope_theta=global_base, rope_local_base_freq=c.rope_swa[0],
        query_pre_attn_scalar=round(c.attn_scale ** -2), sliding_window=c.sliding_window,
        sliding_window_pattern=pattern, max_position_embeddings=c.context_length,
        torch_dtype=dtype)
    # transformers' default for a loaded model, as the paper's runs have it: its eval mode
    # detaches q and k before the attention (its eager function refers to an undefined
    # `self` in eval mode and cannot run)
    config._attn_implementation = "sdpa"
    return config


def paper_state(m, dtype) -> dict:
    """ggufjac's dequantized weights under the Hugging Face names (norm weights minus 1: the
    GGUF stores Gemma's 1 + w); the unembedding is the tied embedding table."""
    state = {"model.embed_tokens.weight": m.weights.tensor("token_embd.weight"),
             "model.norm.weight": m.weights.output_norm() - 1}
    for i in range(m.cfg.n_layer):
        for name, t in m.weights.layer(i).items():
            if name in HF_LAYER:
                key = f"model.layers.{i}.{HF_LAYER[name]}.weight"
                state[key] = t - 1 if name.endswith("norm") else t
    return {k: v.to(dtype).contiguous() for k, v in state.items()}


def paper_model(repo: Path, m, dtype):
    """The paper's Gemma 3 model (eval mode: its detached forward) built around ggufjac's
    dequantized tensors in memory (no checkpoint read: the lower bound of its process), and
    its model_forward bound to it."""
    from transformers.modeling_utils import no_init_weights

    modeling, forward = _paper_modules(repo)
    with no_init_weights():
        model = modeling.Gemma3ForCausalLM(paper_config(m, dtype))
    state = paper_state(m, dtype)
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=False, assign=True)
    model.to(dtype).eval()
    holder = SimpleNamespace(model=model)
    return lambda embeds: forward.model_forward(holder, embeds)


def write_checkpoint(m, dtype, directory: Path, tokens: list[int]) -> None:
    """A Hugging Face checkpoint of ggufjac's dequantized weights (config.json,
    model.safetensors), as the paper's runs read one with `from_pretrained`, and the
    prompt's tokens beside it."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    paper_config(m, dtype).save_pretrained(directory)
    save_file(paper_state(m, dtype), str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    (directory / "tokens.json").write_text(json.dumps(tokens))


def paper_from_files(repo: Path, directory: Path, dtype, gguf: Path | None = None):
    """The paper's way: its model class `from_pretrained` on the checkpoint in `directory`,
    or with `gguf` on that GGUF file by transformers' GGUF loader, in `dtype`, eval mode; the
    input rows from its own scaled embedding of the prompt's tokens (tokens.json in
    `directory`)."""
    import torch

    modeling, forward = _paper_modules(repo)
    source = ({"pretrained_model_name_or_path": str(gguf.parent), "gguf_file": gguf.name}
              if gguf else {"pretrained_model_name_or_path": directory})
    model = modeling.Gemma3ForCausalLM.from_pretrained(**source, torch_dtype=dtype,
                                                       attn_implementation="sdpa").eval()
    tokens = json.loads((directory / "tokens.json").read_text())
    with torch.no_grad():
        x = model.model.embed_tokens(torch.tensor([tokens])).to(dtype)
    holder = SimpleNamespace(model=model)
    return (lambda embeds: forward.model_forward(holder, embeds)), x


def child(side: str, args: argparse.Namespace) -> None:
    import torch

    dtype = getattr(torch, args.dtype)
    if side == "paper" and args.paper_load in ("checkpoint", "gguf"):
        gguf = Path(args.gguf) if args.paper_load == "gguf" else None
        f, x = paper_from_files(Path(args.paper_repo), Path(args.checkpoint), dtype, gguf)
        t0 = time.perf_counter()
        jac = torch.autograd.functional.jacobian(f, x, vectorize=True,
                                                 strategy="reverse-mode")[:, 0]
        _finish(jac, t0, args)
        return

    from ggufjac.api import open_model

    m = open_model(args.model, dtype=args.dtype)
    tokens = m.tokenize(args.prompt)
    if side == "checkpoint":
        if args.paper_load == "gguf":  # only the tokens: its process reads the file itself
            Path(args.checkpoint).mkdir(parents=True, exist_ok=True)
            (Path(args.checkpoint) / "tokens.json").write_text(json.dumps(tokens))
        else:
            write_checkpoint(m, dtype, Path(args.checkpoint), tokens)
        print(json.dumps({}))
        return
    if side == "ours":
        t0 = time.perf_counter()
        jac = m.jacobian(tokens).jacobian
    elif side == "paper":
        f = paper_model(Path(args.paper_repo), m, dtype)
        x = m.engine().embed(tokens)[None]  # [1, N, d], the same input rows
        t0 = time.perf_counter()
        jac = torch.autograd.functional.jacobian(f, x, vectorize=True,
                                                 strategy="reverse-mode")[:, 0]
    else:  # tools/bench_jacobian.py's reference: autograd on ggufjac's own detached model
        from ggufjac.linearize import DETACHED
        from ggufjac.runner import Transformer

        model_all = Transformer(m.weights, keep_weights=True)
        table = m.weights.tensor("token_embd.weight")  # resident, as in an HF model
        x = table[tokens] * m.cfg.embed_scale
        t0 = time.perf_counter()
        jac = torch.autograd.functional.jacobian(
            lambda t: model_all.forward(t, DETACHED)[-1], x, vectorize=True)
    _finish(jac, t0, args)


def _finish(jac, t0: float, args: argparse.Namespace) -> None:
    import torch

    step = time.perf_counter() - t0
    if args.save:
        torch.save(jac.contiguous(), args.save)
    print(json.dumps({"step": step, "in_process": time.perf_counter() - STARTED,
                      "shape": list(jac.shape)}))


def run(side: str, args: argparse.Namespace, save: str) -> dict:
    """One side in a fresh process: its figures, the whole process's wall time and peak."""
    cmd = [sys.executable, "-m", "tools.peak_rss", "", "tools.bench_paper", "--child", side,
           "--model", args.model, "--dtype", args.dtype, "--prompt", args.prompt,
           "--save", save]
    if args.paper_repo:
        cmd += ["--paper-repo", args.paper_repo, "--paper-load", args.paper_load]
    if args.checkpoint:
        cmd += ["--checkpoint", args.checkpoint]
    if args.gguf:
        cmd += ["--gguf", args.gguf]
    with tempfile.NamedTemporaryFile(suffix=".txt") as report:
        cmd[3] = report.name
        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True)
        whole = time.perf_counter() - t0
        if out.returncode:
            last = out.stderr.strip().splitlines()
            raise SystemExit(f"{side}: {last[-1] if last else f'exit status {out.returncode}'}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        result["peak"] = int(Path(report.name).read_text())
    result["whole"] = whole
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--paper-repo", help="a checkout of the paper's repository")
    ap.add_argument("--fallback", action="store_true",
                    help="tools/bench_jacobian.py's reference instead of the paper's code")
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--dtype", nargs="+", default=["float32", "float64"],
                    choices=["float32", "float64"])
    ap.add_argument("--runs", type=int, default=3, help="runs of each side, alternating")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--paper-load", choices=["checkpoint", "gguf", "direct"],
                    default="checkpoint",
                    help="checkpoint: the paper's process reads a Hugging Face checkpoint of "
                         "the dequantized weights with from_pretrained, as its runs do "
                         "(written before the runs, not timed); gguf: it reads the same GGUF "
                         "file by transformers' GGUF loader; direct: built around the "
                         "tensors in memory, without reading (a lower bound of its process)")
    ap.add_argument("--checkpoint", help=argparse.SUPPRESS)
    ap.add_argument("--gguf", help=argparse.SUPPRESS)
    ap.add_argument("--child", choices=["ours", "paper", "reference", "checkpoint"],
                    help=argparse.SUPPRESS)
    ap.add_argument("--save", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.dtype = args.dtype[0]
        child(args.child, args)
        return
    if not args.fallback and not args.paper_repo:
        ap.error("--paper-repo PATH (a checkout of the paper's repository), or --fallback")
    import torch

    args.gguf = None
    if args.paper_load == "gguf" and not args.fallback:
        from ggufjac.resolve import resolve_model
        args.gguf = str(resolve_model(args.model))
    theirs = "reference" if args.fallback else "paper"
    label = "reference (autograd on ggufjac's model)" if args.fallback else "paper's code"
    print(f"{args.model}, {args.prompt!r}; {label} vs ggufjac; alternating fresh processes; "
          f"peak = whole process (VmHWM)")
    dtypes = args.dtype
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in dtypes:
            args.dtype = dtype
            args.checkpoint = None
            if theirs == "paper" and args.paper_load in ("checkpoint", "gguf"):
                args.checkpoint = f"{tmp}/checkpoint-{dtype}"
                run("checkpoint", args, f"{tmp}/unused.pt")
            rows: dict[str, list[dict]] = {theirs: [], "ours": []}
            for i in range(args.runs):
                for side in (theirs, "ours"):
                    r = run(side, args, f"{tmp}/{side}.pt")
                    rows[side].append(r)
                    print(f"{dtype:<8} run {i + 1} {side:<10} step {r['step']:7.2f} s  whole "
                          f"{r['whole']:7.2f} s  peak {r['peak'] / 2**30:5.2f} GiB", flush=True)
            a, b = torch.load(f"{tmp}/{theirs}.pt"), torch.load(f"{tmp}/ours.pt")
            apart = float(torch.linalg.vector_norm(a.double() - b.double())
                          / torch.linalg.vector_norm(b.double()))

            def median(side: str, key: str) -> float:
                return statistics.median(r[key] for r in rows[side])
            step = median(theirs, "step") / median("ours", "step")
            whole = median(theirs, "whole") / median("ours", "whole")
            peak = max(r["peak"] for r in rows[theirs]) / max(r["peak"] for r in rows["ours"])
            print(f"{dtype:<8} medians: step {median(theirs, 'step'):.2f} vs "
                  f"{median('ours', 'step'):.2f} s = {step:.2f}x (goal 1.3x); whole "
                  f"{median(theirs, 'whole'):.2f} vs {median('ours', 'whole'):.2f} s = "
                  f"{whole:.2f}x (goal 4x); peak {peak:.2f}x less; the two Jacobians "
                  f"{apart:.1e} apart (relative)", flush=True)


if __name__ == "__main__":
    main()
