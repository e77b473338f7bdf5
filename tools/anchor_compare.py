"""How much anchoring to llama.cpp changes the explanation (docs/anchoring.md).

    python -m tools.anchor_compare [MODEL] [--dtype float64] [--prompt TEXT ...]

For each prompt: the plain detached Jacobian (our own forward pass) and the Jacobians anchored
to llama.cpp with flash attention on and off. Prints, per prompt, how closely each anchored
model reproduces llama.cpp (logits nmse, reconstruction) and how far the maps are apart:
relative Frobenius difference ‖J_a − J_b‖/‖J_b‖ and |cos| of the top left and right singular
vectors; and how much of the change comes from llama.cpp's probabilities and gates alone
(without its roundings frozen as ratios). After the table, per prompt: the time to run
llama.cpp and derive the coefficients, and the share of each matmul's input entries that
llama.cpp rounds to zero (flash attention off). `--long`: the anchored forward pass alone on
a prompt longer than Gemma 3's 512-token sliding window. `--weight-types`: instead, per weight
type (synthetic llama models, and the real SmolLM2-135M Q4_1 and Gemma 3 270M Q4_K_M), the
anchored forward pass's logits nmse and final-norm output relative error against llama.cpp,
with repacking on and off and flash attention off and on (docs/anchoring.md's table).

    python -m tools.anchor_compare --weight-types [--types Q4_1,Q5_1,...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ggufjac.analysis import spectrum  # noqa: E402
from ggufjac.llamacpp import RunSettings  # noqa: E402
from ggufjac.api import open_model  # noqa: E402
from ggufjac.linearize import Linearization  # noqa: E402

LONG_PROMPT = " ".join(["The bridge out of Marin is the longest bridge in the county, and the "
                        "traffic on it is heavy every morning."] * 30)
PROMPTS = ["The bridge out of Marin is the", "The capital of France is",
           "The quick brown fox jumps over the lazy"]


def compare(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Relative Frobenius difference of a from b, and |cos| of their top singular vectors."""
    d = a.shape[0]
    sa, sb = spectrum(a.reshape(d, -1)), spectrum(b.reshape(d, -1))
    return {"rel_frobenius": float(torch.linalg.norm(a - b) / torch.linalg.norm(b)),
            "cos_left": float(abs(sa.left[:, 0] @ sb.left[:, 0])),
            "cos_right": float(abs(sa.right[0] @ sb.right[0]))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="gemma3-270m")
    ap.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    ap.add_argument("--prompt", action="append", default=None)
    ap.add_argument("--long", action="store_true", help="only the long-prompt check")
    ap.add_argument("--weight-types", action="store_true",
                    help="only the anchored fidelity per weight type (synthetic and real files)")
    ap.add_argument("--types", default=",".join(WEIGHT_TYPES),
                    help="the synthetic models' llama.cpp file types, for --weight-types")
    args = ap.parse_args()
    if args.weight_types:
        weight_type_table(args.types.split(","))
        return
    m = open_model(args.model, dtype=args.dtype)
    lin = Linearization()
    if args.long:
        long_prompt(m)
        return
    print(f"{m.path.name}, {args.dtype}, gate path up")
    print("| prompt | llama.cpp top-1 (fa on / off) | ours (plain) | anchored logits nmse "
          "(on / off) | reconstruction (on / off) | anchored vs plain: rel. Frobenius, "
          "cos top left, cos top right (fa on) | probabilities and gates only vs plain: rel. "
          "Frobenius | fa on vs off (anchored): rel. Frobenius |")
    print("|---|---|---|---|---|---|---|---|")
    details: list[str] = []
    for prompt in args.prompt or PROMPTS:
        tokens = m.tokenize(prompt)
        plain = m.jacobian(tokens, lin)
        plain_top = m.jacobian_report(tokens, plain, lin, n_vectors=1)["predicted_token"]
        runs, seconds = {}, {}
        for fa in (True, False):
            t0 = time.perf_counter()
            anchor = m.anchor(tokens, lin, RunSettings(flash_attn="on" if fa else "off"),
                              reference=False)
            seconds[fa] = time.perf_counter() - t0
            result = m.jacobian(tokens, lin, anchor=anchor)
            runs[fa] = (result, m.jacobian_report(tokens, result, lin, n_vectors=1,
                                                  anchor=anchor)["anchor"])
            if fa:
                coefficients_only = m.jacobian(tokens, lin, anchor=anchor.without_roundings())
            else:
                zeros = {site.removeprefix("in:"): float(sum((c[site] == 0).sum() for c in
                                                             anchor.layers)
                                                         / sum(c[site].numel() for c in anchor.layers))
                         for site in ("in:attn_v", "in:attn_output", "in:ffn_up", "in:ffn_down")}
                details.append(f"{prompt!r}: llama.cpp run + coefficients {seconds[True]:.2f} s /"
                               f" {seconds[False]:.2f} s (fa on / off); inputs rounded to zero: "
                               + ", ".join(f"{k} {v:.1%}" for k, v in zeros.items()))
        (on, s_on), (off, s_off) = runs[True], runs[False]
        vs_plain = compare(on.jacobian, plain.jacobian)
        fa_diff = compare(on.jacobian, off.jacobian)
        print(f"| {prompt!r} | {s_on['llama_cpp_top1']!r} / {s_off['llama_cpp_top1']!r} | "
              f"{plain_top!r} | {s_on['anchor_logits_nmse']:.1e} / "
              f"{s_off['anchor_logits_nmse']:.1e} | {on.reconstruction_rel_error():.1e} / "
              f"{off.reconstruction_rel_error():.1e} | {vs_plain['rel_frobenius']:.3f}, "
              f"{vs_plain['cos_left']:.4f}, {vs_plain['cos_right']:.4f} | "
              f"{compare(coefficients_only.jacobian, plain.jacobian)['rel_frobenius']:.3f} | "
              f"{fa_diff['rel_frobenius']:.3f} |", flush=True)
    print()
    print("\n".join(details))


WEIGHT_TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_M",
                "Q4_K_M", "Q5_K_M", "Q6_K", "IQ4_NL", "IQ4_XS"]
REAL_FILES = [("smollm2-135m", "The capital of France is"),
              ("gemma3-270m", "The bridge out of Marin is the")]


def _types(m) -> str:  # noqa: ANN001 (a LoadedModel)
    """The GGUF types of the layers' matrices and of the unembedding."""
    layers = sorted({t.type.name for name, t in m.gguf.tensors.items()
                     if name.startswith("blk.") and len(t.shape) == 2})
    return f"{'/'.join(layers)}; unembedding {m.gguf.tensor(m.weights.unembedding_name).type.name}"


def _anchored_cells(m, prompt: str) -> tuple[list[str], str]:  # noqa: ANN001
    """'logits nmse / output rel. error' with repacking on and off, flash attention off and
    on; and what llama.cpp repacked (CPU_REPACK MiB) with repacking on."""
    tokens, cells, repacked = m.tokenize(prompt), [], "none"
    for repack in (True, False):
        for fa in ("off", "on"):
            anchor = m.anchor(tokens, settings=RunSettings(flash_attn=fa, repack=repack),
                              reference=False)
            engine = m.engine(anchor=anchor)
            s = m.anchor_summary(anchor, engine.forward(engine.embed(tokens)).output[-1])
            engine.release()
            mark = "" if not s["approximations"] else " (approx.)"
            cells.append(f"{s['anchor_logits_nmse']:.1e} / {s['anchor_output_rel_error']:.1e}"
                         f"{mark}")
            buffers = anchor.resolved.get("weight_buffers_mib", {})
            if repack and "CPU_REPACK" in buffers:
                repacked = f"{buffers['CPU_REPACK']:.2f} MiB"
    return cells, repacked


def weight_type_table(types: list[str]) -> None:
    """docs/anchoring.md's table: anchored fidelity per weight type, float64."""
    from tools.synthetic import Shape, write_fixture, write_synthetic_gguf

    print("| file (prompt) | matrices; unembedding | CPU_REPACK (repacking on) | repack on, "
          "fa off | repack on, fa on | repack off, fa off | repack off, fa on |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        rows = [(f"synthetic llama {q}", write_fixture(tmp, "llama", q),
                 "the bridge out of Marin") for q in types]
        # the one approximate product: a Q5_1 unembedding (gguf-py's quantizer; llama.cpp's
        # gives the unembedding Q6_K or Q8_0 unless told otherwise)
        q5_1_output = write_synthetic_gguf(
            Path(tmp) / "llama-q5_1-output.gguf", "llama", Shape(), rope_freqs=True,
            tensor_types={"attn_output": "Q4_1", "output.weight": "Q5_1", "blk.": "Q4_1"})
        rows.append(("synthetic llama, Q5_1 unembedding", q5_1_output, "the bridge out of Marin"))
        rows += [(f"{name} ({prompt!r})", name, prompt) for name, prompt in REAL_FILES]
        for label, path, prompt in rows:
            m = open_model(path, dtype="float64")
            cells, repacked = _anchored_cells(m, prompt)
            print(f"| {label} | {_types(m)} | {repacked} | {' | '.join(cells)} |", flush=True)


def long_prompt(m) -> None:  # noqa: ANN001 (a LoadedModel)
    """Anchored forward pass (no Jacobian) on LONG_PROMPT, flash attention on and off."""
    tokens = m.tokenize(LONG_PROMPT)
    print(f"{len(tokens)} tokens (sliding window {m.cfg.sliding_window})")
    for fa in (False, True):
        t0 = time.perf_counter()
        settings = RunSettings(flash_attn="on" if fa else "off")
        engine = m.engine(anchor=m.anchor(tokens, settings=settings, reference=False))
        summary = m.anchor_summary(engine.anchor, engine.forward(engine.embed(tokens)).output[-1])
        print(f"flash attention {'on' if fa else 'off'}: anchored logits nmse "
              f"{summary['anchor_logits_nmse']:.1e}, top-1 agree {summary['top1_agree']}, "
              f"{time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
