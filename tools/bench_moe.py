"""Memory and reads of a mixture of experts against its number of experts: `attribute`
(float32, 16 tokens) on random Q4_K qwen3moe files with Qwen3-30B-A3B's layer shape (d 2048,
32/4 heads × 128, expert FFN 768, 8 experts used) and 16 ... 128 experts, each in a fresh
process: peak RSS, wall time, and the bytes of the experts read against the file.

    python -m tools.bench_moe [--layers 2] [--experts 16 128]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from tools.peak_rss import measure_module
from tools.synthetic import Shape, write_random_q4_k_gguf

# Qwen3-30B-A3B's layer (its GGUF metadata); the vocabulary is the synthetic one.
SHAPE_30B_A3B = dict(d_model=2048, d_ff=6144, n_head=32, n_kv_head=4, head_dim=128,
                     n_expert_used=8, d_ff_expert=768)
TOKENS = [1] + [261 + i % 20 for i in range(15)]  # BOS and 15 words: 16 tokens


def child(model: str) -> None:
    """Runs inside the measured process: one attribution, figures as JSON on stdout."""
    from ggufjac.api import open_model

    m = open_model(model, dtype="float32")
    t0 = time.perf_counter()
    report = m.attribute(TOKENS)
    seconds = time.perf_counter() - t0
    r = report["routing"]
    print(json.dumps({"seconds": seconds, "n_expert": m.cfg.n_expert,
                      "expert_bytes_read": r["expert_bytes_read"],
                      "expert_bytes_in_file": r["expert_bytes_in_file"],
                      "file_bytes": r["file_bytes"],
                      "share_of_file_read": r["share_of_file_read"]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, nargs="+", default=[16, 128])
    ap.add_argument("--child")
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return
    print("| experts | file | experts read | share of the file read | peak RSS | wall |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="ggufjac-bench-moe-") as tmp:
        for n_expert in args.experts:
            shape = Shape(n_layer=args.layers, n_expert=n_expert, **SHAPE_30B_A3B)
            path = write_random_q4_k_gguf(Path(tmp) / f"e{n_expert}.gguf", "qwen3moe", shape)
            r = measure_module("tools.bench_moe", "--child", str(path))
            path.unlink()
            print(f"| {n_expert} | {r['file_bytes'] / 2**20:.0f} MiB | "
                  f"{r['expert_bytes_read'] / 2**20:.0f} MiB of "
                  f"{r['expert_bytes_in_file'] / 2**20:.0f} MiB | "
                  f"{100 * r['share_of_file_read']:.0f}% | {r['peak'] / 2**20:.0f} MiB | "
                  f"{r['seconds']:.1f} s |", flush=True)


if __name__ == "__main__":
    main()
