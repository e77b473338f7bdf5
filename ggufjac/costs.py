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
        mlp = 2 * m * 2 * d * f * ((layers - 1) * n + 1)
    return float(layers * attention + mlp)


def _layer_flop(cfg: Dims, n_tokens: int, n_directions: int, mlp_positions: int) -> float:
    """One layer crossed by `n_directions` directions (either way: a VJP and a forward
    product cost the same): the attention's v and o projections at every position, the MLP
    at `mlp_positions` (1 at the top layer of a map, whose other rows are not wanted), by
    its per-position matrices or through both projections, whichever costs less."""
    d, f, m = cfg.d_model, cfg.d_ff, n_directions
    attention = 2 * m * n_tokens * (d * cfg.n_kv_head * cfg.head_dim_v
                                    + cfg.n_head * cfg.head_dim_v * d)
    if mlp_as_matrix(cfg, m):
        return attention + 2 * (d * d * f + m * d * d) * mlp_positions
    return attention + 2 * m * 2 * d * f * mlp_positions


def lens_reverse_flop(cfg: Dims, n_tokens: int, layers: list[int]) -> float:
    """The cumulative maps of `layers` by one reverse sweep (layers.lens_maps): each map's d
    cotangents enter at its layer's output and are pulled back to the inputs, stacked with
    the maps above as the sweep passes them, so layer j carries d · #{l ≥ j} directions."""
    top, d = max(layers), cfg.d_model
    return float(sum(_layer_flop(cfg, n_tokens, d * sum(1 for l in layers if l >= j),
                                 1 if j == top else n_tokens) for j in range(top + 1)))


def lens_forward_flop(cfg: Dims, n_tokens: int, layers: list[int], passes: int = 1,
                      causal: bool = True) -> float:
    """The same maps by pushing the N·d input directions forward once through layers
    0..max(layers) (layers.lens_maps_forward), in `passes` groups of positions where they do
    not fit in memory at once (each pass forms the MLP matrices of its positions again).
    Attention is causal, so a direction at position i is zero before i and crosses each
    layer on its N − i rows only: Σ_i (N − i) = N(N + 1)/2 rows of d directions per layer,
    against the reverse sweep's d · #{l ≥ j} directions on N rows each; the forward pass is
    the cheaper one roughly when the number of layers exceeds N. `causal=False`: every
    direction on all N rows (an anchored run, whose rounding ratios are not cut to rows)."""
    top, d, n = max(layers), cfg.d_model, n_tokens
    attention_row = 2 * (d * cfg.n_kv_head * cfg.head_dim_v + cfg.n_head * cfg.head_dim_v * d)
    group = -(-n // passes)
    total = 0.0
    for start in range(0, n, group):
        positions = range(start, min(start + group, n))
        m = len(positions) * d
        rows = (sum(n - i for i in positions) if causal else n * len(positions)) * d
        first = start if causal else 0  # the first position whose MLP matrix is applied
        matrix = mlp_as_matrix(cfg, m)
        for j in range(top + 1):
            total += rows * attention_row
            if j == top:  # the last position's MLP alone
                total += 2 * (d * d * cfg.d_ff + m * d * d) if matrix else 2 * m * 2 * d * cfg.d_ff
            elif matrix:  # K at the positions from the group's first on, each applied
                total += 2 * d * d * cfg.d_ff * (n - first) + 2 * rows * d * d
            else:
                total += 2 * rows * 2 * d * cfg.d_ff
    return float(total)
