"""Prefetching the next layer on a worker thread, on vs off, on this machine's device.

    python -m tools.bench_prefetch [--device cpu|cuda] [--layers 6] [--repeat 2]   # ~6 min on 2 cores

A synthetic model with Llama-3.1-8B-shaped layers (random Q4_K, 4-token prompt, float32):
an attribution-sized sweep (8 output directions: reading and dequantizing dominate) and a
full Jacobian (compute dominates), each with prefetching off and on, alternating in one
process. "cold" runs first drop the file from the page cache (posix_fadvise DONTNEED), so
the reads come from disk. Prints the best time of each and the ratio off / on (> 1: prefetch
helps). The engine prefetches by default on CUDA only; this is the measurement behind that.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from tools.bench_memory import SHAPE_8B, TOKENS
from tools.synthetic import Shape, write_random_q4_k_gguf


def drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()

    import torch

    from ggufjac.api import open_model
    from ggufjac.jacobian import streamed_jacobian

    def synchronize() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    with tempfile.TemporaryDirectory(prefix="ggufjac-bench-") as tmp:
        path = write_random_q4_k_gguf(Path(tmp) / "m.gguf", "llama",
                                      Shape(n_layer=args.layers, **SHAPE_8B))
        print(f"{args.layers} layers of {SHAPE_8B}, Q4_K, {len(TOKENS)} tokens, float32, "
              f"on {args.device}; best of {args.repeat}")
        print(f"{'sweep':<28}{'prefetch off s':>15}{'prefetch on s':>15}{'off / on':>10}")
        for label, n_dirs, cold in (("8 directions, cached file", 8, False),
                                    ("8 directions, cold file", 8, True),
                                    ("full Jacobian, cached file", 0, False)):
            best = {False: float("inf"), True: float("inf")}
            for _ in range(args.repeat):
                for prefetch in (False, True):
                    m = open_model(path, dtype="float32", device=args.device)
                    dirs = None
                    if n_dirs:
                        dirs = torch.randn(n_dirs, m.cfg.d_model,
                                           generator=torch.Generator().manual_seed(0))
                    if cold:
                        drop_from_page_cache(path)
                    engine = m.engine(prefetch=prefetch)
                    synchronize()
                    t0 = time.perf_counter()
                    streamed_jacobian(engine, engine.embed(TOKENS), dirs)
                    synchronize()
                    best[prefetch] = min(best[prefetch], time.perf_counter() - t0)
                    engine.release()
                    m.gguf.close()
            print(f"{label:<28}{best[False]:>15.2f}{best[True]:>15.2f}"
                  f"{best[False] / best[True]:>9.2f}x")


if __name__ == "__main__":
    main()
