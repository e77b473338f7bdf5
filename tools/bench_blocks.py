"""Products with one 70B-shaped quantized matrix, three ways, in one run:

    python -m tools.bench_blocks [--rows 8192] [--cols 28672] [--tokens 16] [--repeat 3]
        [--types Q4_K,Q6_K] [--variant avx512|avx2|baseline]

W is random blocks of each type (tools/big_model.py), held as raw bytes in memory (no disk).
  whole:   W dequantized into one float32 buffer, then multiplied (a layer held whole);
  blocks:  `blocked.linear` over row blocks of 2^24 values, each dequantized into one reused
           buffer and multiplied at once (a streamed layer without the compiled kernels);
  kernels: `blocked.linear` over the same row blocks' bytes, through the compiled kernels
           (quantized_products.py: dequantized in registers, never written out).
For x @ W.T (the forward sweep) and g @ W (the reverse sweep's product, a backward of
`linear` alone). Prints each time, best of --repeat, and the ratios blocks / kernels and
whole / kernels (> 1: the kernels faster).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from gguf.constants import GGMLQuantizationType as Q

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ggufjac import quantized_products  # noqa: E402
from ggufjac.blocked import linear  # noqa: E402
from ggufjac.quants import dequantize  # noqa: E402
from tools.big_model import random_q4_k, random_q6_k  # noqa: E402

BLOCK_VALUES = 1 << 24
RANDOM_ROWS = {Q.Q4_K: random_q4_k, Q.Q6_K: random_q6_k}


class InMemoryBlocks:
    """A RowBlockMatrix over raw rows in memory; `kernels`: products take the raw rows."""

    def __init__(self, raw: torch.Tensor, qtype: Q, cols: int, block_rows: int,
                 kernels: bool) -> None:
        self.raw, self.qtype, self.block_rows = raw, qtype, block_rows
        self.shape, self.dtype, self.device = (raw.shape[0], cols), torch.float32, raw.device
        self.quantized_type = qtype if kernels else None
        self.buffer = torch.empty(block_rows * cols)

    def raw_blocks(self) -> Iterator[tuple[int, torch.Tensor]]:
        for s in range(0, self.shape[0], self.block_rows):
            yield s, self.raw[s:s + self.block_rows]

    def row_blocks(self) -> Iterator[tuple[int, torch.Tensor]]:
        for s, rows in self.raw_blocks():
            n = rows.shape[0] * self.shape[1]
            yield s, dequantize(rows, self.qtype, (rows.shape[0], self.shape[1]),
                                self.buffer[:n])


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--cols", type=int, default=28672)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--types", default="Q4_K,Q6_K")
    ap.add_argument("--variant", choices=quantized_products.VARIANTS,
                    help="the kernels compiled for this instruction set (default: the "
                         "machine's best)")
    args = ap.parse_args()
    if not quantized_products.available():
        sys.exit("the compiled kernels are not here (pip install -e . builds them)")
    if args.variant:
        quantized_products.use_variant(args.variant)
    rows, cols = args.rows, args.cols
    print(f"{rows} x {cols}, {args.tokens} tokens, {torch.get_num_threads()} threads, "
          f"kernels for {quantized_products.variant()}")
    x, g = torch.randn(args.tokens, cols), torch.randn(args.tokens, rows)
    for name in args.types.split(","):
        qtype = Q[name]
        raw = torch.from_numpy(np.ascontiguousarray(
            RANDOM_ROWS[qtype](np.random.default_rng(0), rows, cols)).reshape(rows, -1))
        buffer = torch.empty(rows * cols)
        whole_w = lambda: dequantize(raw, qtype, (rows, cols), buffer)  # noqa: E731
        block_rows = max(1, BLOCK_VALUES // cols)
        blocks = InMemoryBlocks(raw, qtype, cols, block_rows, kernels=False)
        kernels = InMemoryBlocks(raw, qtype, cols, block_rows, kernels=True)

        def transposed(m: InMemoryBlocks) -> torch.Tensor:
            xg = torch.zeros(args.tokens, cols, requires_grad=True)
            (grad,) = torch.autograd.grad(linear(xg, m, values=False), xg, g)
            return grad

        for product, runs in (
                ("x @ W.T", {"whole": lambda: x @ whole_w().T, "blocks": lambda: linear(x, blocks),
                             "kernels": lambda: linear(x, kernels)}),
                ("g @ W", {"whole": lambda: g @ whole_w(), "blocks": lambda: transposed(blocks),
                           "kernels": lambda: transposed(kernels)})):
            reference = runs["whole"]()
            times = {}
            for case, fn in runs.items():
                err = float((fn() - reference).abs().max() / reference.abs().max())
                assert err < 1e-5, (case, err)
                times[case] = best(fn, args.repeat)
            print(f"{name} {product:8s} whole {times['whole'] * 1e3:7.1f} ms  blocks "
                  f"{times['blocks'] * 1e3:7.1f} ms  kernels {times['kernels'] * 1e3:7.1f} ms  "
                  f"blocks / kernels {times['blocks'] / times['kernels']:.2f}  "
                  f"whole / kernels {times['whole'] / times['kernels']:.2f}")


if __name__ == "__main__":
    main()
