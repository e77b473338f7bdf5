"""Matrices applied a block of rows at a time, so that a layer's weights never exist whole.

A weight is either a tensor (held whole) or a `RowBlockMatrix`: something that hands out its
rows in blocks, each valid until the next is asked for (weights.py dequantizes them from the
file into one reused buffer). `linear` is the model's one matrix product and takes either;
on a `RowBlockMatrix` it is an autograd function whose forward fills the output's columns
block by block and whose backward accumulates the input's cotangent block by block, reading
every block again (nothing of the matrix is kept between the two). A matrix whose rows the
compiled kernels can take (`quantized_type`) hands out their bytes instead, and the products
dequantize them in registers (quantized_products.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from .quantized_products import batched, product_op, transposed_product, transposed_product_op


@runtime_checkable
class RowBlockMatrix(Protocol):
    """A [rows, cols] matrix read in blocks of rows."""

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device

    def row_blocks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, rows [k, cols]) in order; each block is valid until the next."""
        ...

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) as a fresh tensor."""
        ...

    def columns(self, start: int, stop: int) -> torch.Tensor:
        """Columns [start, stop) of every row as a fresh tensor [rows, stop - start]."""
        ...

    # The quantized type of the rows `raw_blocks` hands out, when the products may use them
    # (quantized_products.supports); None: products go through `row_blocks`.
    quantized_type: int | None

    def raw_blocks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, the rows' bytes [k, bytes per row]) in order, as `row_blocks`."""
        ...


Weight = torch.Tensor | RowBlockMatrix


class _RowBlockLinear(torch.autograd.Function):
    """x @ W.T for a RowBlockMatrix W; `values=False` skips the product in the forward (the
    output's shape is all a vector-Jacobian product of a linear map needs)."""

    @staticmethod
    def forward(x: torch.Tensor, matrix: RowBlockMatrix, values: bool) -> torch.Tensor:
        shape = (*x.shape[:-1], matrix.shape[0])
        out = x.new_empty(shape) if values else x.new_zeros(shape)
        if values and matrix.quantized_type is not None:
            rows, cols = x.reshape(-1, x.shape[-1]), matrix.shape[1]
            for start, raw in matrix.raw_blocks():
                part = product_op(rows, raw, matrix.quantized_type, cols)
                out[..., start:start + raw.shape[0]] = part.view(*shape[:-1], raw.shape[0])
        elif values:
            for start, w in matrix.row_blocks():
                out[..., start:start + w.shape[0]] = x @ w.T
        return out

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
        ctx.matrix = inputs[1]

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[no-untyped-def]
        # Out of place under a batched backward (vmap): `g` carries a batch dimension that an
        # in-place sum into an unbatched tensor cannot hold (and the kernels' operators take
        # no in-place form there); a plain backward adds the kernels' blocks in place.
        grad, matrix = None, ctx.matrix
        if matrix.quantized_type is not None:
            rows, cols = g.reshape(-1, g.shape[-1]), matrix.shape[1]
            in_place = not batched(g)  # then each block's product is added into the first
            for start, raw in matrix.raw_blocks():
                part = rows.narrow(-1, start, raw.shape[0])
                if in_place and grad is not None:
                    transposed_product(part, raw, matrix.quantized_type, cols, add_to=grad)
                    continue
                term = transposed_product_op(part, raw, matrix.quantized_type, cols)
                grad = term if grad is None else grad + term
            return grad.view(*g.shape[:-1], cols), None, None  # type: ignore[union-attr]
        for start, w in matrix.row_blocks():
            term = g.narrow(-1, start, w.shape[0]) @ w
            grad = term if grad is None else grad + term
        return grad, None, None


class _Whole:
    """A matrix held whole, as a RowBlockMatrix of one block."""

    quantized_type = None

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight, self.shape = weight, tuple(weight.shape)
        self.dtype, self.device = weight.dtype, weight.device

    def row_blocks(self) -> Iterator[tuple[int, torch.Tensor]]:
        yield 0, self.weight


def linear(x: torch.Tensor, weight: Weight, values: bool = True) -> torch.Tensor:
    """x @ weight.T, for a weight held whole or read in row blocks. `values=False`: only
    the product's vector-Jacobian product is wanted (a replayed, linear layer), so the
    forward product is skipped and its output is zeros of the right shape; the backward
    multiplies by the weight as usual."""
    if isinstance(weight, torch.Tensor):
        return x @ weight.T if values else _RowBlockLinear.apply(x, _Whole(weight), False)
    return _RowBlockLinear.apply(x, weight, values)


def row_slice(weight: Weight, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of a weight (a view of a whole tensor)."""
    return weight[start:stop] if isinstance(weight, torch.Tensor) else weight.rows(start, stop)


def column_slice(weight: Weight, start: int, stop: int) -> torch.Tensor:
    """Columns [start, stop) of a weight (a view of a whole tensor)."""
    return weight[:, start:stop] if isinstance(weight, torch.Tensor) else \
        weight.columns(start, stop)


# Queries (or keys) per block of an attention product: small enough that a block's key range
# follows the causal and sliding-window mask closely, large enough for efficient products.
BAND_BLOCK = 256


@dataclass(frozen=True)
class Band:
    """Which keys an attention's queries see: query i (position start + i) sees the keys
    j ≤ start + i, and, with a sliding window, only those with start + i − j < window."""

    n_queries: int
    start: int = 0  # positions before the queries (a KV cache)
    window: int | None = None
    block: int = BAND_BLOCK  # queries, or keys, per product

    @property
    def n_keys(self) -> int:
        return self.start + self.n_queries

    def mask(self, device: torch.device) -> torch.Tensor:
        """[n_queries, n_keys] boolean: True where query i sees key j."""
        i = torch.arange(self.start, self.n_keys, device=device)[:, None]
        j = torch.arange(self.n_keys, device=device)[None, :]
        allowed = j <= i
        if self.window:
            allowed &= (i - j) < self.window
        return allowed

    def query_blocks(self) -> Iterator[tuple[int, int, int, int]]:
        """(q0, q1, k0, k1): queries [q0, q1) see no key outside [k0, k1)."""
        for q0 in range(0, self.n_queries, self.block):
            q1 = min(q0 + self.block, self.n_queries)
            k0 = max(0, self.start + q0 - self.window + 1) if self.window else 0
            yield q0, q1, k0, self.start + q1

    def key_blocks(self) -> Iterator[tuple[int, int, int, int]]:
        """(k0, k1, q0, q1): keys [k0, k1) are seen by no query outside [q0, q1) (empty
        when no query sees them)."""
        for k0 in range(0, self.n_keys, self.block):
            k1 = min(k0 + self.block, self.n_keys)
            q0 = max(0, k0 - self.start)
            q1 = self.n_queries if not self.window else \
                max(q0, min(self.n_queries, k1 - 1 + self.window - self.start))
            yield k0, k1, q0, q1


def _mix_block(p: torch.Tensor, v: torch.Tensor, q0: int, q1: int, k0: int, k1: int
               ) -> torch.Tensor:
    return torch.einsum("hqk,...khd->...qhd", p[:, q0:q1, k0:k1], v[..., k0:k1, :, :])


class _BandedMix(torch.autograd.Function):
    """The attention product for frozen weights p (no gradient): the forward a block of
    queries at a time, the backward (v's cotangent) a block of keys at a time, each over
    the band only; `values=False` skips the forward product (a replay for its VJPs). v
    holds the key-value heads, each shared by `group` consecutive query heads."""

    @staticmethod
    def forward(p: torch.Tensor, v: torch.Tensor, band: Band, values: bool, group: int
                ) -> torch.Tensor:
        shape = (*v.shape[:-3], band.n_queries, v.shape[-2] * group, v.shape[-1])
        if not values:
            return v.new_zeros(shape)
        v = v.repeat_interleave(group, dim=-2)
        out = v.new_empty(shape)
        for q0, q1, k0, k1 in band.query_blocks():
            out[..., q0:q1, :, :] = _mix_block(p, v, q0, q1, k0, k1)
        return out

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
        ctx.p, ctx.band, ctx.group = inputs[0], inputs[2], inputs[4]

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[no-untyped-def]
        # v's cotangent summed over each key-value head's group of query heads inside one
        # product ([keys, group · queries] by [group · queries, d] per key-value head)
        # rather than a product per query head and a sum over copies of repeated values.
        # matmul, not einsum: under a batched backward (vmap) `g` carries a batch dimension,
        # and matmul's batching neither fails nor copies p once per batch entry as bmm's does
        p, band, group = ctx.p, ctx.band, ctx.group
        batch, n_q, n_head, d = g.shape[:-3], g.shape[-3], g.shape[-2], g.shape[-1]
        n_kv = n_head // group
        # [..., kv heads, group, queries, d] and [kv heads, keys, group, queries]
        g_heads = g.reshape(*batch, n_q, n_kv, group, d).movedim(-4, -2)
        p_heads = p.reshape(n_kv, group, *p.shape[-2:]).permute(0, 3, 1, 2)
        parts = []
        for k0, k1, q0, q1 in band.key_blocks():
            if q0 == q1:
                parts.append(g.new_zeros((*batch, k1 - k0, n_kv, d)))
                continue
            rows = group * (q1 - q0)
            part = torch.matmul(p_heads[:, k0:k1, :, q0:q1].reshape(n_kv, k1 - k0, rows),
                                g_heads.narrow(-2, q0, q1 - q0).reshape(*batch, n_kv, rows, d))
            parts.append(part.transpose(-3, -2))
        return None, parts[0] if len(parts) == 1 else torch.cat(parts, dim=-3), None, None, None


def banded_mix(p: torch.Tensor, v: torch.Tensor, band: Band, values: bool = True,
               group: int = 1) -> torch.Tensor:
    """o[..., q, h, :] = Σ_k p[h, q, k] · v[..., k, h // group, :], attention weights p
    [heads, queries, keys] applied to values v [..., keys, kv heads, d] (each shared by
    `group` consecutive heads: grouped-query attention), over `band` only (p is zero outside
    it, so the masked products are skipped). The same blocks in every mode, so values agree
    bit for bit whether or not p carries a gradient (the plain model's does)."""
    if p.requires_grad:
        v = v.repeat_interleave(group, dim=-2)
        return torch.cat([_mix_block(p, v, *b) for b in band.query_blocks()], dim=-3)
    return _BandedMix.apply(p, v, band, values, group)
