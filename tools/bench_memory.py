"""Peak memory of the streaming engine is flat in model depth; a 70B-shaped layer runs in a budget.

    python -m tools.bench_memory            # ~2 min on 2 cores
    python -m tools.bench_memory --quick    # smaller shapes, for a smoke run
    python -m tools.bench_memory --device cuda   # on a GPU: GPU peak (max allocated) too

1. Synthetic models with Llama-3.1-8B-shaped layers (hidden 4096, FFN 14336, 32/8 heads,
   Q4_K weights, small vocabulary), 2 and 6 layers: the full detached Jacobian of a 4-token
   prompt, float32, on CPU, each in its own process. Prints both peak RSS figures, their
   ratio (goal <= 1.2), seconds per layer, and the effective rate: the sweep's floating-point
   work (costs.sweep_flop) over the whole time (loading and the forward pass included).
2. One 70B-shaped layer (hidden 8192, FFN 28672, 64/8 heads, Q4_K) under --max-memory:
   the Jacobian restricted to 8 output directions (one reverse sweep), its peak RSS.

Peak RSS is the child's VmHWM (tools/peak_rss.py); each run is a fresh process. On CUDA the
GPU peak is torch.cuda.max_memory_allocated (prefetching on: two layers' buffers).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from tools.peak_rss import measure_module
from tools.synthetic import Shape, write_random_q4_k_gguf

TOKENS = [1, 300, 301, 302]  # BOS and three words of the synthetic vocabulary
SHAPE_8B = dict(d_model=4096, d_ff=14336, n_head=32, n_kv_head=8, head_dim=128)
SHAPE_70B = dict(d_model=8192, d_ff=28672, n_head=64, n_kv_head=8, head_dim=128)
QUICK_8B = dict(d_model=1024, d_ff=3584, n_head=8, n_kv_head=2, head_dim=128)
QUICK_70B = dict(d_model=2048, d_ff=7168, n_head=16, n_kv_head=2, head_dim=128)


def child(model: str, directions: int, max_memory: str | None, device: str) -> None:
    """Runs inside the measured process: one Jacobian, timings as JSON on stdout."""
    import torch

    from ggufjac.api import open_model
    from ggufjac.units import parse_size
    from ggufjac.costs import sweep_flop
    from ggufjac.layout import dims_of

    m = open_model(model, dtype="float32", device=device)
    budget = parse_size(max_memory) if max_memory else None
    dirs = None
    if directions:
        dirs = torch.randn(directions, m.cfg.d_model, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    r = m.jacobian(TOKENS, max_memory=budget, directions=dirs)
    seconds = time.perf_counter() - t0
    flop = sweep_flop(dims_of(m.cfg), m.cfg.n_layer, len(TOKENS), directions or m.cfg.d_model)
    print(json.dumps({"seconds": seconds, "n_layer": m.cfg.n_layer, "flop": flop,
                      "shape": list(r.jacobian.shape),
                      "reconstruction": r.reconstruction_rel_error(),
                      "gpu_peak": torch.cuda.max_memory_allocated() if device.startswith("cuda") else 0}))


def measure(model: Path, device: str, directions: int = 0, max_memory: str | None = None
            ) -> dict:
    args = ["--child", str(model), "--directions", str(directions), "--device", device]
    if max_memory:
        args += ["--max-memory", max_memory]
    return measure_module("tools.bench_memory", *args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--directions", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--max-memory", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--budget-70b", default="6GiB",
                    help="--max-memory for the 70B-shaped layer (default 6GiB)")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.directions, args.max_memory, args.device)
        return
    s8, s70 = (QUICK_8B, QUICK_70B) if args.quick else (SHAPE_8B, SHAPE_70B)
    with tempfile.TemporaryDirectory(prefix="ggufjac-bench-") as tmp:
        rows = {}
        for n_layer in (2, 6):
            path = write_random_q4_k_gguf(Path(tmp) / f"l{n_layer}.gguf", "llama",
                                          Shape(n_layer=n_layer, **s8))
            rows[n_layer] = measure(path, args.device)
            path.unlink()
        print(f"8B-shaped layers {s8}, Q4_K, {len(TOKENS)} tokens, float32, full Jacobian, "
              f"on {args.device}:")
        for n_layer, r in rows.items():
            print(f"  {n_layer} layers: peak RSS {r['peak'] / 2**30:.2f} GiB, {r['seconds']:.1f} s "
                  f"({r['seconds'] / n_layer:.1f} s/layer; {r['flop'] / 1e12:.2f} TFLOP in the "
                  f"sweep, {r['flop'] / r['seconds'] / 1e9:.0f} GFLOP/s effective), "
                  f"J {r['shape']}, reconstruction {r['reconstruction']:.1e}{_gpu(r)}")
        print(f"  peak(6 layers) / peak(2 layers) = {rows[6]['peak'] / rows[2]['peak']:.3f} "
              "(goal <= 1.2)")
        path = write_random_q4_k_gguf(Path(tmp) / "l70.gguf", "llama", Shape(n_layer=1, **s70))
        r = measure(path, args.device, directions=8, max_memory=args.budget_70b)
        print(f"70B-shaped layer {s70}, Q4_K, 8 output directions, --max-memory "
              f"{args.budget_70b}: peak RSS {r['peak'] / 2**30:.2f} GiB, {r['seconds']:.1f} s, "
              f"J {r['shape']}, reconstruction {r['reconstruction']:.1e}{_gpu(r)}")


def _gpu(r: dict) -> str:
    return f", GPU peak {r['gpu_peak'] / 2**30:.2f} GiB" if r["gpu_peak"] else ""


if __name__ == "__main__":
    main()
