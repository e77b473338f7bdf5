"""Long prompts: the matrix-free top-K SVD against forming J, each case a fresh process.

    python -m tools.bench_svd gemma --tokens 1024 --top-k 16          # vs full J + dense SVD
    python -m tools.bench_svd per-token --tokens 427 --top-k 1        # every J_i's top triplet
    python -m tools.bench_svd big --dir /data --tokens 512 --top-k 8 --layers 6  # 8B shapes
    python -m tools.bench_svd big --dir /data --preset llama-3.3-70b --tokens 16 --top-k 8

`gemma`: Gemma 3 270M (the real file), a prompt of the first N tokens of this repository's
docs; `ggufjac`'s svd (block Lanczos, never forming J) and, in the same run on the same
tokens, the full Jacobian by the streaming engine followed by its dense SVD: wall time, peak
RSS (VmHWM of each process) and how closely the two agree (σ, subspace angles). `per-token`:
the top-K triplets of every block J_i (svd --per-token). `big`: a synthetic GGUF with a
preset's shapes (tools/big_model.py; Llama 3.1 8B unless --preset), all its layers or
--layers of them, evicted from the page cache first; its J would not fit in RAM, so there is
no baseline, only our time, peak and each iteration's σ change and largest Ritz residual.
`--max-iterations` bounds the iteration (not converging is then reported, not an error).
Results print as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def prompt_tokens(model: str, n: int) -> list[int]:
    """The first n tokens of the repository's docs (BOS first), always the same text."""
    from ggufjac.llamacpp import tokenize

    text = "\n\n".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")))
    tokens = list(tokenize(model, text))
    if len(tokens) < n:
        raise SystemExit(f"the docs are only {len(tokens)} tokens long")
    return tokens[:n]


def worker(case: str, model: str, tokens_file: str, k: int, dtype: str, out: str,
           max_iterations: int, block: int) -> None:
    """One measured case, in this (fresh) process; prints a JSON line."""
    import torch

    from ggufjac.analysis import spectrum
    from ggufjac.api import open_model
    from ggufjac.svd import default_block

    tokens = json.loads(Path(tokens_file).read_text())
    m = open_model(model, dtype=dtype)
    t0 = time.perf_counter()
    if case == "svd":
        trace: list[list[float]] = []  # per iteration: seconds so far, σ change, residual

        def progress(_: int, change: float, residual: float) -> None:
            trace.append([round(time.perf_counter() - t0, 1), change, residual])
            print(json.dumps({"iteration": trace[-1]}), file=sys.stderr, flush=True)  # live
        r = m.svd(tokens, k, max_iterations=max_iterations, block=block or None,
                  on_iteration=progress)
        seconds = time.perf_counter() - t0
        result = {"converged": r.converged, "iterations": r.iterations,
                  "block": block or default_block(k, len(tokens)),
                  "vectors_swept": r.vectors_swept, "max_residual": float(r.residuals.max()),
                  "singular_values": r.singular_values.tolist(),
                  "residuals": r.residuals.tolist(), "stable_rank": r.stable_rank,
                  "per_iteration": trace}
        torch.save({"s": r.singular_values, "u": r.left, "v": r.right.reshape(k, -1)}, out)
    elif case == "dense":
        jac = m.jacobian(tokens)
        t_j = time.perf_counter() - t0
        spec = spectrum(jac.jacobian.reshape(m.cfg.d_model, -1), jac.output)
        seconds = time.perf_counter() - t0
        result = {"jacobian_s": round(t_j, 2), "jacobian_bytes": jac.jacobian.numel()
                  * jac.jacobian.element_size()}
        torch.save({"s": spec.singular_values[:k], "u": spec.left[:, :k],
                    "v": spec.right[:k]}, out)
    elif case == "per-token":
        _, per, _ = m.per_token_svd(tokens, k)
        seconds = time.perf_counter() - t0
        result = {"top_singular_value_first": float(per.singular_values[0, 0]),
                  "top_singular_value_last": float(per.singular_values[-1, 0])}
    else:
        raise SystemExit(f"unknown case {case}")
    print(json.dumps({"case": case, "seconds": round(seconds, 2), **result}))


def measure(case: str, model: str, tokens: list[int], k: int, dtype: str, out: str,
            max_iterations: int = 100, block: int = 0) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json") as tf, \
            tempfile.NamedTemporaryFile(suffix=".txt") as peak:
        tf.write(json.dumps(tokens))
        tf.flush()
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "tools.peak_rss", peak.name, "tools.bench_svd",
                            "--worker", case, model, tf.name, str(k), dtype, out,
                            str(max_iterations), str(block)],
                           stdout=subprocess.PIPE, text=True, cwd=ROOT)  # stderr: shown
        wall = time.perf_counter() - t0
        if r.returncode:
            raise SystemExit(f"{case} failed (its messages are above)")
        result = json.loads(r.stdout.strip().splitlines()[-1])
        result.update(wall_s=round(wall, 2), peak_gib=round(int(Path(peak.name).read_text())
                                                            / 2**30, 3))
    return result


def compare(ours: str, dense: str) -> dict:
    """σ relative difference and the largest principal angles between the two results."""
    import torch

    a, b = torch.load(ours), torch.load(dense)
    s_rel = float(((a["s"] - b["s"]).abs() / b["s"]).max())

    def angle(x: torch.Tensor, y: torch.Tensor) -> float:
        qx, _ = torch.linalg.qr(x.double())
        qy, _ = torch.linalg.qr(y.double())
        c = torch.linalg.svdvals(qx.T @ qy).clamp(max=1)
        return float(torch.arccos(c.min()))
    return {"sigma_max_rel_diff": s_rel, "left_angle_max": angle(a["u"], b["u"]),
            "right_angle_max": angle(a["v"].T, b["v"].T)}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:5], int(sys.argv[5]), *sys.argv[6:8], int(sys.argv[8]),
               int(sys.argv[9]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("case", choices=["gemma", "per-token", "big"])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--top-k", type=int, default=16)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()),
                    help="where `big` writes its synthetic file")
    ap.add_argument("--preset", default="llama-3.1-8b", help="big: tools/big_model.py's preset")
    ap.add_argument("--layers", type=int, default=None,
                    help="big: this many of the preset's layers (default: all)")
    ap.add_argument("--max-iterations", type=int, default=100)
    ap.add_argument("--block", type=int, default=0,
                    help="vectors per Lanczos block (default: the svd's own choice)")
    ap.add_argument("--no-baseline", action="store_true", help="gemma: skip the full J")
    args = ap.parse_args()

    if args.case == "big":
        from tools.bench_big import evict
        from tools.big_model import PRESETS, preset_path, write_big_gguf

        preset = PRESETS[args.preset]
        layers = args.layers or preset.shape.n_layer
        preset = replace(preset, shape=replace(preset.shape, n_layer=layers))
        path = preset_path(args.dir, args.preset, layers)
        if not path.exists():
            write_big_gguf(path, preset)
        evict(path)
        model = str(path)
    else:
        from ggufjac.resolve import resolve_model

        model = str(resolve_model("gemma3-270m"))
    tokens = prompt_tokens(model, args.tokens)
    with tempfile.TemporaryDirectory() as tmp:
        ours, dense = f"{tmp}/ours.pt", f"{tmp}/dense.pt"
        case = "per-token" if args.case == "per-token" else "svd"
        r = measure(case, model, tokens, args.top_k, args.dtype, ours, args.max_iterations,
                    args.block)
        print(json.dumps({"model": Path(model).name, "tokens": len(tokens),
                          "top_k": args.top_k, "dtype": args.dtype, **r}), flush=True)
        if args.case == "gemma" and not args.no_baseline:
            b = measure("dense", model, tokens, args.top_k, args.dtype, dense)
            print(json.dumps({"model": Path(model).name, "tokens": len(tokens), **b}))
            print(json.dumps({"speedup_wall": round(b["wall_s"] / r["wall_s"], 2),
                              "peak_ratio": round(r["peak_gib"] / b["peak_gib"], 3),
                              **compare(ours, dense)}))


if __name__ == "__main__":
    main()
