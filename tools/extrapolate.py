"""What a full Jacobian of a big model would cost: arithmetic from measured rates.

    python -m tools.extrapolate --gflops 330   # the effective rate tools/bench_memory.py printed

Time = costs.sweep_flop (the reverse sweep's floating-point work, as the engine does it) /
the given rate; the rate bench_memory prints is measured over the whole run (loading and
the forward pass included), so those are included here in proportion. Memory = process
(the torch import) + one layer's weights in float32 + J + the MLP matrix's temporaries +
one batch of directions' backward working memory (the engine's own plan, engine.py). The
first rows apply the same formulas to the shapes bench_memory runs, to compare with what
it measures.
"""

from __future__ import annotations

import argparse
import math
from types import SimpleNamespace

from ggufjac.engine import MAX_BATCH_ROWS, MLP_MATRIX_FFN_CHUNK, max_chunk
from ggufjac.costs import mlp_as_matrix, sweep_flop
from ggufjac.families import FAMILIES
from ggufjac.layout import Dims, stored_shapes_of

# Published shapes (Q4_K_M GGUF files of these models).
MODELS = {
    "Llama 3.1 8B": dict(n_layer=32, d_model=4096, d_ff=14336, n_head=32, n_kv_head=8),
    "Qwen 3 32B": dict(n_layer=64, d_model=5120, d_ff=25600, n_head=64, n_kv_head=8),
    "Llama 3.3 70B": dict(n_layer=80, d_model=8192, d_ff=28672, n_head=64, n_kv_head=8),
}
HEAD_DIM = 128


def shape(n_layer: int, **kw: int) -> SimpleNamespace:
    """A published shape: its layer count and the layout's Dims (head size 128)."""
    return SimpleNamespace(n_layer=n_layer, dims=Dims(head_dim=HEAD_DIM, head_dim_v=HEAD_DIM, **kw),
                           **kw, head_dim=HEAD_DIM, head_dim_v=HEAD_DIM)


def layer_weights(c: SimpleNamespace) -> int:
    """All of one layer's weights (the forward pass holds them all), from the layout table."""
    return sum(math.prod(s) for s in stored_shapes_of(FAMILIES["llama"], c.dims).values())


def memory_bytes(c: SimpleNamespace, n_tokens: int, n_directions: int, process: float) -> float:
    d, item = c.d_model, 4
    chunk = min(n_directions, max_chunk(n_tokens))
    per_direction = 2 * n_tokens * (2 * c.d_ff + 4 * d + 2 * c.n_head * c.head_dim) * item
    matrix = (d * d + d * min(c.d_ff, MLP_MATRIX_FFN_CHUNK) + max(chunk, 2**20 // d) * d) * item \
        if mlp_as_matrix(c.dims, n_directions) else 0
    return (process + layer_weights(c) * item + n_directions * n_tokens * d * item + matrix
            + chunk * per_direction)


def hours(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gflops", type=float, required=True,
                    help="effective float32 rate, GFLOP/s (tools/bench_memory.py prints it)")
    ap.add_argument("--process-gb", type=float, default=0.55,
                    help="resident size of a process that imported torch (default 0.55)")
    args = ap.parse_args()
    process = args.process_gb * 1e9
    print(f"rate {args.gflops:.0f} GFLOP/s (float32), process {args.process_gb} GB, "
          f"at most {MAX_BATCH_ROWS} rows (directions x tokens) per batched backward")
    print("check against tools/bench_memory.py's shapes:")
    b8 = shape(n_layer=6, d_model=4096, d_ff=14336, n_head=32, n_kv_head=8)
    b70 = shape(n_layer=1, d_model=8192, d_ff=28672, n_head=64, n_kv_head=8)
    print(f"  8B-shaped, 6 layers, N=4, full J: {memory_bytes(b8, 4, 4096, process) / 1e9:.2f} GB, "
          f"{sweep_flop(b8.dims, b8.n_layer, 4, 4096) / args.gflops / 1e9:.0f} s")
    print(f"  70B-shaped layer, N=4, 8 directions: {memory_bytes(b70, 4, 8, process) / 1e9:.2f} GB")
    print()
    print("| model (Q4_K_M) | layers | d | TFLOP, N=8 | CPU time, N=8 | CPU time, N=32 "
          "| memory N=8 | memory N=32 |")
    print("|---|---|---|---|---|---|---|---|")
    for name, kw in MODELS.items():
        c = shape(**kw)
        d = c.d_model
        f8, f32 = (sweep_flop(c.dims, c.n_layer, n, d) for n in (8, 32))
        print(f"| {name} | {c.n_layer} | {d} | {f8 / 1e12:.0f} | "
              f"{hours(f8 / args.gflops / 1e9)} | {hours(f32 / args.gflops / 1e9)} | "
              f"{memory_bytes(c, 8, d, process) / 1e9:.1f} GB | "
              f"{memory_bytes(c, 32, d, process) / 1e9:.1f} GB |")


if __name__ == "__main__":
    main()
