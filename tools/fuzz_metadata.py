"""Hostile metadata *values* for ggufjac's commands: every key the config reads, written with
numbers out of range, NaN/inf, wrong value types, arrays, or left out.

    python -m tools.fuzz_metadata [--out DIR]

Each case is a small synthetic model (tools/synthetic.py) with one key changed. A case must
either run or fail with one `GgufjacError` naming the file and the key (the CLI: one line,
exit 1 or 2) — never a traceback, never a hang. The test suite runs every case through
`info`, `check` and `jacobian` (tests/test_metadata_values.py).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterator
from pathlib import Path

from gguf.constants import GGUFValueType as V

from tools.synthetic import Shape, write_synthetic_gguf

KEYS = ("context_length", "embedding_length", "block_count", "feed_forward_length",
        "attention.head_count", "attention.head_count_kv", "attention.key_length",
        "attention.value_length", "attention.layer_norm_rms_epsilon", "rope.freq_base",
        "rope.dimension_count", "rope.scaling.type", "rope.scaling.factor",
        "rope.scaling.attn_factor", "attention.sliding_window", "final_logit_softcapping")
VALUES: tuple[tuple[str, tuple[object, V] | None], ...] = (
    ("absent", None), ("u32 0", (0, V.UINT32)), ("u32 1", (1, V.UINT32)),
    ("u32 3", (3, V.UINT32)), ("u32 max", (2**32 - 1, V.UINT32)), ("i32 -1", (-1, V.INT32)),
    ("i64 -5", (-5, V.INT64)), ("u64 2^40", (2**40, V.UINT64)), ("f32 0", (0.0, V.FLOAT32)),
    ("f32 -1", (-1.0, V.FLOAT32)), ("f32 nan", (math.nan, V.FLOAT32)),
    ("f32 inf", (math.inf, V.FLOAT32)), ("f32 -inf", (-math.inf, V.FLOAT32)),
    ("f32 1e-30", (1e-30, V.FLOAT32)), ("f32 1e30", (1e30, V.FLOAT32)),
    ("f64 7.5", (7.5, V.FLOAT64)), ("string", ("abc", V.STRING)),
    ("string linear", ("linear", V.STRING)), ("bool", (True, V.BOOL)),
    ("array", ([1, 2], V.ARRAY)))
# A model small enough that a case that validates runs in well under a second.
TINY = Shape(n_layer=1, d_model=64, d_ff=128, n_head=2, n_kv_head=1, head_dim=32,
             context_length=64)


def cases() -> Iterator[tuple[str, str, tuple[object, V] | None]]:
    """(case name, key, override) for every key and hostile value."""
    for key in KEYS:
        for label, override in VALUES:
            yield f"{key}={label}", key, override


def write_case(directory: Path, index: int, key: str, override: tuple[object, V] | None,
               arch: str = "llama") -> Path:
    return write_synthetic_gguf(directory / f"case{index:03d}.gguf", arch, TINY, "F32",
                                metadata={key: override})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("fuzz-metadata"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for i, (name, key, override) in enumerate(cases()):
        print(write_case(args.out, i, key, override), name)


if __name__ == "__main__":
    main()
