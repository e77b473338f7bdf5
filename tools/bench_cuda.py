"""Big models on one GPU: `attribute` of the big-model presets with --device cuda.

    python -m tools.bench_cuda --dir /big llama-3.3-70b [llama-3.1-8b ...]
        [--dtypes float32,float64] [--tokens JSON] [--layers N] [--keep]

Every measurement of the full Jacobian on one GPU, in one command (under 10 minutes on one
H100; `--suite --help`; a dry run on a CPU with `--device cpu --tiny`):

    python -m tools.bench_cuda --suite --dir /big

The GPU counterpart of tools/bench_big.py, for a machine that may have no llama.cpp (a GPU
host often has only a CPU build of it, or none): the token ids come from llama.cpp when it
is installed, else from --tokens (llama.cpp's ids for bench_big's prompt, which any machine
with llama.cpp prints with `--print-tokens`). Each preset's file is written into --dir
unless it is there, evicted from the page cache, and each case runs in a fresh process
(peak RSS = VmHWM; peak GPU memory = torch's max_memory_allocated); with --warm the file
is read into the page cache first instead (for a machine whose RAM holds it). Prints one JSON line
per case (time split per sweep included) and a table; the file is removed unless --keep.
Never in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tools.bench_big import PROMPT, evict, timed  # noqa: E402
from tools.big_model import PRESETS, preset_path, write_big_gguf  # noqa: E402


def child(path: str, tokens: str, dtype: str, device: str) -> None:
    """One `attribute` in this process; its figures as one JSON line."""
    import torch

    from ggufjac.api import open_model

    t0 = time.perf_counter()
    with open_model(path, dtype=dtype, device=device) as m:
        rep = m.attribute(json.loads(tokens))
    wall = time.perf_counter() - t0
    t = rep["targets"][0]
    gpu_peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    print(json.dumps({"attribute_s": round(wall, 2), "logit": t["logit"],
                      "sum": t["sum_of_contributions"], "rel_error": t["rel_error"],
                      "gpu_peak_bytes": gpu_peak, "sweeps": rep["sweeps"]}))


def prompt_tokens(path: Path, given: str | None) -> list[int]:
    if given:
        return json.loads(given)
    try:
        from ggufjac.llamacpp import tokenize
        return tokenize(path, PROMPT)
    except Exception as e:  # noqa: BLE001 - any failure to start llama.cpp
        raise SystemExit(f"no llama.cpp here to tokenize with ({e}); pass --tokens") from e


def main() -> None:
    if sys.argv[1:2] == ["--child"]:  # one measured case, in a fresh process
        child(*sys.argv[2:6])
        return
    if sys.argv[1:2] == ["--suite-child"]:  # one case of the suite, in a fresh process
        suite_child(json.loads(sys.argv[2]))
        return
    if sys.argv[1:2] == ["--suite"]:
        suite(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("presets", nargs="+", choices=sorted(PRESETS))
    ap.add_argument("--dir", type=Path, required=True, help="where the files are written")
    ap.add_argument("--dtypes", default="float32,float64")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tokens", help="token ids as a JSON list (default: llama.cpp's)")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than the preset's")
    ap.add_argument("--keep", action="store_true", help="keep the files afterwards")
    ap.add_argument("--warm", action="store_true",
                    help="read the file once and leave it in the page cache (a machine whose "
                    "RAM holds it): the GPU's time without the disk's")
    ap.add_argument("--print-tokens", action="store_true",
                    help="print llama.cpp's ids of the prompt for the first preset, and stop")
    args = ap.parse_args()
    print(json.dumps({"machine": platform.processor() or platform.machine(),
                      "cores": os.cpu_count(), "device": _device_name(args.device)}), flush=True)
    table = []
    for name in args.presets:
        model = PRESETS[name]
        path = preset_path(args.dir, name, args.layers)
        if args.layers:
            model = replace(model, shape=replace(model.shape, n_layer=args.layers))
        if not path.exists():
            t0 = time.perf_counter()
            write_big_gguf(path, model)
            print(json.dumps({"preset": path.stem, "written_s":
                              round(time.perf_counter() - t0, 1)}), flush=True)
        tokens = prompt_tokens(path, args.tokens)
        if args.print_tokens:
            print(json.dumps(tokens))
            return
        size = path.stat().st_size
        if args.warm:
            with open(path, "rb", buffering=0) as f:
                while f.read(64 << 20):
                    pass
        for dtype in args.dtypes.split(","):
            res = timed(["tools.bench_cuda", "--child", str(path), json.dumps(tokens), dtype,
                         args.device], path, cold=not args.warm)
            row = {"preset": path.stem, "file_bytes": size, "dtype": dtype,
                   "page_cache": "warm" if args.warm else "evicted",
                   "n_tokens": len(tokens), "wall_s": res["wall_s"],
                   "peak_bytes": res["peak_bytes"], "rc": res["rc"]}
            if res["rc"]:
                row["stderr_tail"] = res["stderr_tail"]
            else:
                row.update(json.loads(res["stdout"].strip().splitlines()[-1]))
            print(json.dumps(row), flush=True)
            table.append(row)
        if not args.keep:
            path.unlink()
    print(f"\n{'model':22} {'file':>8} {'dtype':8} {'wall s':>8} {'RSS':>9} {'GPU':>9} "
          f"{'rel error':>9}")
    for row in table:
        rss = f"{row['peak_bytes'] / 2**30:.2f} GiB" if row.get("peak_bytes") else "-"
        gpu = f"{row['gpu_peak_bytes'] / 2**30:.2f} GiB" if row.get("gpu_peak_bytes") else "-"
        err = f"{row['rel_error']:.1e}" if "rel_error" in row else f"rc {row['rc']}"
        print(f"{row['preset']:22} {row['file_bytes'] / 1e9:6.1f}GB {row['dtype']:8} "
              f"{row['wall_s']:8.1f} {rss:>9} {gpu:>9} {err:>9}")


def _device_name(device: str) -> str:
    import torch
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return device


# -- the suite: every one-GPU figure of the full Jacobian in one command ---------------------

SUITE_DOC = """The full Jacobian on one GPU, every figure in one command, each case a fresh process
with the file evicted from the page cache first (peak GPU memory: torch's
max_memory_allocated; disk: the file's sequential read rate measured in the same run):

  8b        Llama 3.1 8B shape (32 layers): full J float32.
  70b-J     Llama 3.3 70B shape with --layers-70b layers (default 20 of 80, so that the
            whole suite fits 10 minutes on an H100): full J float32, then TF32 and bf16
            (--matmul-precision) with their reconstruction errors, the top singular
            triplets of J against the matrix-free `svd` in the same process; the 80-layer
            time and memory extrapolated per layer (sweeps and held bytes scale with the
            layers; J, the record's residuals and the batches do not).
  70b-attr  the 80-layer 70B file: attribution cold (the weights read once into GPU
            memory, then the sweeps), then --prompts further prompts with the weights held.
  70b-24GB  the same file under --max-gpu-memory 24GB: what fits is held, the rest
            streamed by staged reads at each use; an attribution, cold.

With --tiny the shapes are a few MB (a dry run of the script on any machine; --device cpu
holds the weights in memory the same way, with the streamed budget scaled to hold half the
layers). The files are written into --dir (each deleted after its cases unless --keep)."""

TINY_SHAPE = dict(d_model=256, d_ff=768, n_head=4, n_kv_head=2, head_dim=64,
                  context_length=4096)


def _suite_model(name: str, layers: int | None, tiny: bool):
    from tools.synthetic import Shape

    model = PRESETS[name]
    shape = model.shape if not tiny else Shape(n_layer=model.shape.n_layer, **TINY_SHAPE)
    if tiny:
        shape = replace(shape, n_layer=min(shape.n_layer, 4 if layers is None else layers))
    elif layers is not None:
        shape = replace(shape, n_layer=layers)
    return replace(model, shape=shape, vocab_size=model.vocab_size if not tiny else 32000)


def _prompt(n_tokens: int, shift: int = 0) -> list[int]:
    """`n_tokens` ids of the synthetic vocabulary (BOS, then byte tokens): no tokenizer is
    needed on the GPU machine; the figures do not depend on which tokens they are."""
    text = ("The bridge out of Marin carried the morning fog south to the city "
            "and the harbour")[shift:]
    return [1] + [5 + b for b in text.encode()[:n_tokens - 1]]


def disk_read_rate(path: Path, limit: int = 8 << 30) -> float:
    """Bytes per second of a sequential read of the file's first `limit` bytes, cold (the
    file is evicted before and after)."""
    evict(path)
    n, t0 = 0, time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while n < limit and (block := f.read(64 << 20)):
            n += len(block)
    rate = n / (time.perf_counter() - t0)
    evict(path)
    return rate


def suite_child(case: dict) -> None:
    """One case of the suite in this process; its figures as one JSON line."""
    import torch

    from ggufjac.api import open_model
    from ggufjac.device_weights import matmul_precision

    device = case["device"]
    cuda = device.startswith("cuda")
    budget = case.get("budget")
    t_open = time.perf_counter()
    m = open_model(case["path"], dtype="float32", device=device, hold_weights=True,
                   max_gpu_memory=budget if budget is not None else
                   (None if cuda else 1 << 40))
    if case.get("full_layers"):  # a stand-in with fewer layers: the budget less the
        # bytes of the layers it lacks, so that the sweeps get what the full model leaves them
        layers = [t for t in m.gguf.tensors.values() if t.name.startswith("blk.")]
        per_layer = sum(t.n_bytes for t in layers) / m.cfg.n_layer
        m.max_gpu_memory = int(budget - (case["full_layers"] - m.cfg.n_layer) * per_layer)
    if budget == "half":  # the dry run's streamed budget: half the layers held
        from ggufjac.device_weights import working_reserve
        layers = sum(t.n_bytes for t in m.gguf.tensors.values() if t.name.startswith("blk."))
        m.max_gpu_memory = int((layers / 2 + working_reserve(0, m.weights.layer_bytes())) / 0.75)
    out: dict = {"case": case["name"], "budget": m.max_gpu_memory}

    def hold() -> None:
        t0 = time.perf_counter()
        m.held_weights()
        load = m.weights.resident_load
        plan = m.weights.residency
        out.update(hold_s=round(time.perf_counter() - t0, 2),
                   held_bytes=plan.resident_bytes,
                   held_layer_bytes=sum(m.gguf.tensor(n).n_bytes for n in plan.resident
                                        if n.startswith("blk.")),
                   held_layers=len(m.weights.residency.resident_layers),
                   hold_read_rate=round(load.rate) if load else None,
                   plan=m.weights.residency.summary())

    def peak() -> int | None:
        return torch.cuda.max_memory_allocated() if cuda else None

    if case["kind"] == "jacobian":
        tokens = _prompt(case["tokens"])
        hold()
        results = {}
        for precision in case["precisions"]:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            engine = m.engine()
            chunk = engine.plan(m.cfg.d_model, len(tokens)).chunk
            t0 = time.perf_counter()
            with matmul_precision(precision, device):
                r, chunk, retries = _jacobian_fitting(engine, tokens, chunk)
                if cuda:
                    torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            if precision == "float32":  # kept for the others' distance and the svd's check
                results[precision] = r
            out[precision] = {"jacobian_s": round(seconds, 2), "gpu_peak_bytes": peak(),
                              "directions_per_batch": chunk, "oom_retries": retries,
                              "reconstruction": r.reconstruction_rel_error(),
                              "sweeps": [s.as_dict() for s in engine.sweeps]}
            if precision != "float32" and "float32" in results:
                j32 = results["float32"].jacobian
                out[precision]["distance_from_float32"] = float(
                    torch.linalg.vector_norm(r.jacobian - j32) / torch.linalg.vector_norm(j32))
            del engine, r
        if case.get("svd_k") and "float32" in results:
            out["svd"] = _svd_against_j(m, tokens, results["float32"].jacobian, case["svd_k"])
    else:  # attribution: cold (the hold included), then further prompts with weights held
        times, errors = [], []
        for i in range(case["prompts"]):
            tokens = _prompt(case["tokens"], shift=i)
            t0 = time.perf_counter()
            if i == 0:
                hold()
            rep = m.attribute(tokens)
            if cuda:
                torch.cuda.synchronize()
            times.append(round(time.perf_counter() - t0, 3))
            errors.append(rep["targets"][0]["rel_error"])
        staged = m.weights.staged.stats if m.weights.staged is not None else None
        out.update(attribute_s=times, rel_errors=errors, gpu_peak_bytes=peak(),
                   staged_bytes=staged.bytes_read if staged else 0,
                   staged_read_s=round(staged.read_seconds, 2) if staged else 0)
    out["process_s"] = round(time.perf_counter() - t_open, 2)
    print(json.dumps(out), flush=True)


def _jacobian_fitting(engine, tokens: list[int], chunk: int):
    """The full J with `chunk` directions per batched backward, halved after each GPU
    out-of-memory error (the plan's per-direction estimate is calibrated on a CPU): the
    result, the chunk that fitted and the retries. Retries are in the figures printed."""
    import torch

    from ggufjac.jacobian import JacobianResult

    retries = 0
    while True:
        try:
            inputs = engine.embed(tokens)
            record = engine.forward(inputs)
            eye = torch.eye(engine.cfg.d_model, dtype=inputs.dtype, device=inputs.device)
            jac = engine.pull_back_output(record, eye, chunk)
            return (JacobianResult(jac, inputs, record.output[-1], None, record.constant),
                    chunk, retries)
        except torch.cuda.OutOfMemoryError:
            if chunk == 1:
                raise
            record = jac = None
            engine.release()
            torch.cuda.empty_cache()
            chunk, retries = max(1, chunk // 2), retries + 1


def _svd_against_j(m, tokens: list[int], jacobian, k: int) -> dict:
    """The matrix-free top-k triplets (`svd`) against J's own: σ from the eigenvalues of
    J Jᵀ (accumulated in float64), and the cosines between the two left subspaces."""
    import torch

    t0 = time.perf_counter()
    result = m.svd(tokens, k)
    seconds = time.perf_counter() - t0
    d = jacobian.shape[0]
    flat = jacobian.reshape(d, -1)
    gram = torch.zeros((d, d), dtype=torch.float64, device=flat.device)
    for s in range(0, flat.shape[1], 8192):
        block = flat[:, s:s + 8192].double()
        gram += block @ block.T
    values, vectors = torch.linalg.eigh(gram)
    sigma = values.flip(0)[:k].clamp_min(0).sqrt()
    left = vectors.flip(1)[:, :k]
    ours = result.singular_values.double().to(sigma.device)
    cosines = torch.linalg.svdvals(left.T @ result.left.double().to(left.device))
    return {"svd_s": round(seconds, 2), "k": k, "converged": bool(result.converged),
            "iterations": result.iterations, "sigma_j": sigma.tolist(),
            "sigma_rel_diff": float(((ours - sigma).abs() / sigma).max()),
            "min_subspace_cosine": float(cosines.min())}


def suite(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m tools.bench_cuda --suite", description=SUITE_DOC,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, required=True, help="where the files are written")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes: a dry run of the script")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--layers-70b", type=int, default=20,
                    help="layers of the 70B shape for the full J (80: the real count)")
    ap.add_argument("--prompts", type=int, default=4, help="attributions: 1 cold + further")
    ap.add_argument("--svd-k", type=int, default=4)
    ap.add_argument("--budget", default="24GB", help="the streamed case's --max-gpu-memory")
    ap.add_argument("--jacobian-budget", default="60GB",
                    help="the 70B full J's --max-gpu-memory at 80 layers (the stand-in with "
                         "fewer layers gets it less the bytes of the layers it lacks)")
    ap.add_argument("--precisions", default="float32,tf32,bf16")
    ap.add_argument("--cases", default="8b,70b-J,70b-attr,70b-24GB")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args(argv)
    from ggufjac.units import parse_size

    args.dir.mkdir(parents=True, exist_ok=True)
    cases = args.cases.split(",")
    print(json.dumps({"machine": platform.processor() or platform.machine(),
                      "cores": os.cpu_count(), "device": _device_name(args.device),
                      "tiny": args.tiny}), flush=True)
    rows: list[dict] = []
    precisions = args.precisions.split(",")
    t_suite = time.perf_counter()

    def run(name: str, path: Path, case: dict) -> dict:
        case = {"name": name, "path": str(path), "device": args.device,
                "tokens": args.tokens, **case}
        res = timed(["tools.bench_cuda", "--suite-child", json.dumps(case)], path, cold=True)
        row = {"case": name, "wall_s": res["wall_s"], "rc": res["rc"]}
        if res["rc"]:
            row["stderr_tail"] = res["stderr_tail"]
        else:
            row.update(json.loads(res["stdout"].strip().splitlines()[-1]))
        print(json.dumps(row), flush=True)
        rows.append(row)
        return row

    def written(name: str, layers: int | None) -> tuple[Path, dict]:
        model = _suite_model(name, layers, args.tiny)
        path = args.dir / f"{name}-{model.shape.n_layer}-layers{'-tiny' if args.tiny else ''}.gguf"
        t0 = time.perf_counter()
        if not path.exists():
            write_big_gguf(path, model)
        size = path.stat().st_size
        info = {"file": path.name, "file_bytes": size, "layers": model.shape.n_layer,
                "written_s": round(time.perf_counter() - t0, 1),
                "disk_read_rate": round(disk_read_rate(path))}
        print(json.dumps(info), flush=True)
        return path, info

    def done(path: Path) -> None:
        if not args.keep:
            path.unlink()

    if "8b" in cases:
        path, info = written("llama-3.1-8b", None)
        run("8b full J", path, {"kind": "jacobian", "precisions": ["float32"]})["file"] = info
        done(path)
    if "70b-J" in cases:
        path, info = written("llama-3.3-70b", args.layers_70b)
        budget = None if args.tiny else parse_size(args.jacobian_budget)
        row = run(f"70b/{info['layers']} full J", path,
                  {"kind": "jacobian", "precisions": precisions, "svd_k": args.svd_k,
                   "budget": budget, "full_layers": None if args.tiny else 80})
        row["file"] = info
        row["extrapolated_80"] = _extrapolate(row, info["layers"], 80)
        print(json.dumps({"extrapolated_80_layers": row["extrapolated_80"]}), flush=True)
        done(path)
    if "70b-attr" in cases or "70b-24GB" in cases:
        path, info = written("llama-3.3-70b", None if not args.tiny else 8)
        if "70b-attr" in cases:
            run("70b attribution", path, {"kind": "attribute", "prompts": args.prompts})["file"] = info
        if "70b-24GB" in cases:
            budget = "half" if args.tiny else parse_size(args.budget)
            run(f"70b attribution {args.budget if not args.tiny else 'half held'}", path,
                {"kind": "attribute", "prompts": 2, "budget": budget})["file"] = info
        done(path)
    _suite_table(rows, precisions, time.perf_counter() - t_suite)


def _extrapolate(row: dict, layers: int, target: int) -> dict | None:
    """The float32 full J at `target` layers from a run at `layers`: each sweep's time and
    the held bytes scale with the layers; the rest of the GPU peak (J, batches) does not."""
    if "float32" not in row:
        return None
    f32, scale = row["float32"], target / layers
    sweeps = sum(s["wall_s"] for s in f32["sweeps"])
    rest = f32["jacobian_s"] - sweeps
    held = row.get("held_layer_bytes", 0)
    peak = f32["gpu_peak_bytes"]
    return {"jacobian_s": round(rest + sweeps * scale, 1),
            "gpu_peak_bytes": None if peak is None else int(peak + held * (scale - 1))}


def _suite_table(rows: list[dict], precisions: list[str], seconds: float) -> None:
    gib = 2**30

    def size(n: int | None) -> str:
        return "-" if n is None else f"{n / gib:.2f} GiB"

    print(f"\nsuite: {seconds:.0f} s in all")
    print(f"{'case':30} {'disk GB/s':>9} {'hold s':>7} {'held':>10} {'time s':>14} "
          f"{'GPU peak':>10} {'error':>9}")
    for row in rows:
        disk = f"{row['file']['disk_read_rate'] / 1e9:.2f}" if "file" in row else "-"
        hold = f"{row.get('hold_s', 0):.1f}"
        if row.get("rc"):
            print(f"{row['case']:30} failed (rc {row['rc']}): {row.get('stderr_tail', '')[-200:]}")
            continue
        if "attribute_s" in row:
            t = row["attribute_s"]
            times = f"{t[0]:.2f}" + (f" / {sum(t[1:]) / len(t[1:]):.2f}" if len(t) > 1 else "")
            print(f"{row['case']:30} {disk:>9} {hold:>7} {size(row['held_bytes']):>10} "
                  f"{times:>14} {size(row['gpu_peak_bytes']):>10} "
                  f"{max(row['rel_errors']):9.1e}")
            continue
        for p in precisions:
            if p not in row:
                continue
            r = row[p]
            print(f"{row['case'] + ' ' + p:30} {disk:>9} {hold:>7} {size(row['held_bytes']):>10} "
                  f"{r['jacobian_s']:14.1f} {size(r['gpu_peak_bytes']):>10} "
                  f"{r['reconstruction']:9.1e}")
        if "svd" in row:
            s = row["svd"]
            print(f"{'  svd top-' + str(s['k']):30} {'':>9} {'':>7} {'':>10} {s['svd_s']:14.1f} "
                  f"{'':>10} σ {s['sigma_rel_diff']:.1e}, cos {s['min_subspace_cosine']:.6f}")
        if row.get("extrapolated_80"):
            e = row["extrapolated_80"]
            held_80 = next((r for r in rows if r.get("case") == "70b attribution"
                            and "hold_s" in r), None)
            hold_80 = f"{held_80['hold_s']:.1f}" if held_80 else "-"
            print(f"{'  extrapolated to 80 layers':30} {'':>9} {hold_80:>7} {'':>10} "
                  f"{e['jacobian_s']:14.1f} {size(e['gpu_peak_bytes']):>10}")
    print("attribution time: cold (the weights' read included) / mean of the further prompts "
          "(weights held); full J time: after the weights' read (hold s); extrapolated: the "
          "sweeps scaled to 80 layers, the read is the 80-layer file's (70b attribution)")


if __name__ == "__main__":
    main()
