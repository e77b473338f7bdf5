"""Matrices applied a block of rows at a time, so that a layer's weights never exist whole.

A weight is either a tensor (held whole) or a `RowBlockMatrix`: something that hands out its
rows in blocks, each valid until the next is asked for (weights.py dequantizes them from the
file into one reused buffer). `linear` is the model's one matrix product and takes either;
on a `RowBlockMatrix` it is an autograd function whose forward fills the output's columns
block by block and whose backward accumulates the input's cotangent block by block, reading
every block again (nothing of the matrix is kept between the two).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch


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


Weight = torch.Tensor | RowBlockMatrix


class _RowBlockLinear(torch.autograd.Function):
    """x @ W.T for a RowBlockMatrix W; `values=False` skips the product in the forward (the
    output's shape is all a vector-Jacobian product of a linear map needs)."""

    @staticmethod
    def forward(x: torch.Tensor, matrix: RowBlockMatrix, values: bool) -> torch.Tensor:
        shape = (*x.shape[:-1], matrix.shape[0])
        out = x.new_empty(shape) if values else x.new_zeros(shape)
        if values:
            for start, w in matrix.row_blocks():
                out[..., start:start + w.shape[0]] = x @ w.T
        return out

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
        ctx.matrix = inputs[1]

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[no-untyped-def]
        # Out of place: under a batched backward (vmap) `g` carries a batch dimension that an
        # in-place sum into an unbatched tensor cannot hold.
        grad = None
        for start, w in ctx.matrix.row_blocks():
            term = g.narrow(-1, start, w.shape[0]) @ w
            grad = term if grad is None else grad + term
        return grad, None, None


class _Whole:
    """A matrix held whole, as a RowBlockMatrix of one block."""

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
