"""Row blocks vs whole matrices: dequantize-and-multiply x @ W.T for one 70B-shaped matrix.

    python -m tools.bench_blocks [--rows 8192] [--cols 8192] [--tokens 16] [--repeat 3]

W is random Q4_K blocks (tools/big_model.py), held as raw bytes in memory (no disk). Whole:
W dequantized into one float32 buffer, then multiplied (what the engine does with a layer
held whole). Blocks: `blocked.linear` over row blocks of several sizes, each dequantized
into one reused buffer and multiplied while it is in cache (what it does when streaming).
Prints the time of each, best of --repeat, and the ratio whole / blocks (> 1: blocks faster).
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
from ggufjac.blocked import linear  # noqa: E402
from ggufjac.quants import dequantize  # noqa: E402
from tools.big_model import random_q4_k  # noqa: E402


class InMemoryBlocks:
    """A RowBlockMatrix over raw Q4_K rows in memory."""

    def __init__(self, raw: torch.Tensor, cols: int, block_rows: int) -> None:
        self.raw, self.block_rows = raw, block_rows
        self.shape, self.dtype, self.device = (raw.shape[0], cols), torch.float32, raw.device
        self.buffer = torch.empty(block_rows * cols)

    def row_blocks(self) -> Iterator[tuple[int, torch.Tensor]]:
        for s in range(0, self.shape[0], self.block_rows):
            rows = self.raw[s:s + self.block_rows]
            n = rows.shape[0] * self.shape[1]
            yield s, dequantize(rows, Q.Q4_K, (rows.shape[0], self.shape[1]), self.buffer[:n])


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
    ap.add_argument("--cols", type=int, default=8192)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    raw = torch.from_numpy(random_q4_k(np.random.default_rng(0), args.rows, args.cols))
    x = torch.randn(args.tokens, args.cols)
    buffer = torch.empty(args.rows * args.cols)

    def whole() -> torch.Tensor:
        return x @ dequantize(raw, Q.Q4_K, (args.rows, args.cols), buffer).T

    reference = whole()
    t_whole = best(whole, args.repeat)
    print(f"{args.rows} x {args.cols} Q4_K, {args.tokens} tokens, {torch.get_num_threads()} threads")
    print(f"whole matrix       {t_whole * 1e3:8.1f} ms")
    for values in (1 << 19, 1 << 20, 1 << 21, 1 << 22, 1 << 23, 1 << 24, 1 << 25):
        m = InMemoryBlocks(raw, args.cols, max(1, values // args.cols))
        assert torch.allclose(linear(x, m), reference, rtol=1e-4, atol=1e-4)
        t = best(lambda: linear(x, m), args.repeat)
        print(f"blocks of {values / 2**20:4.1f} M   {t * 1e3:8.1f} ms   whole / blocks "
              f"{t_whole / t:.2f}")


if __name__ == "__main__":
    main()
