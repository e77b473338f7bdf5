"""The streaming engine's cost model, torch-free: how the reverse sweep crosses the MLP and
how much floating-point work a sweep is (`ggufjac info`'s estimate, the benchmarks'
effective rates, tools/extrapolate.py)."""

from __future__ import annotations

from .layout import Dims


def mlp_as_matrix(cfg: Dims, n_directions: int) -> bool:
    """Per position, n directions cost 2·n·d·d_ff multiply-adds by autograd through the MLP's
    two projections, d·d·d_ff + n·d·d through its matrix (model.mlp_branch_matrix)."""
    d, f = cfg.d_model, cfg.d_ff
    return n_directions * (2 * f - d) > d * f


def sweep_flop(cfg: Dims, n_layer: int, n_tokens: int, n_directions: int) -> float:
    """Floating-point operations (2 per multiply-add) of one reverse sweep pulling
    `n_directions` back to the inputs, as the engine does it: the attention's v and o
    projections by batched VJPs, the MLP by VJPs or by its per-position matrices, whichever
    costs less (these skip the positions without cotangents: at the top layer, all but the
    last)."""
    d, f, n, m, layers = cfg.d_model, cfg.d_ff, n_tokens, n_directions, n_layer
    attention = 2 * m * n * (d * cfg.n_kv_head * cfg.head_dim_v + cfg.n_head * cfg.head_dim_v * d)
    if mlp_as_matrix(cfg, m):
        mlp = 2 * (d * d * f + m * d * d) * ((layers - 1) * n + 1)
    else:
        mlp = 2 * m * n * 2 * d * f * layers
    return float(layers * attention + mlp)
