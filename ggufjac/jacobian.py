"""The detached Jacobian of the output embedding with respect to every input embedding.

Three paths: `streamed_jacobian` (the default: one layer in memory at a time, see
engine.py); `jacobian_to_file`, the same sweeps a few output directions at a time with J
written to a safetensors file as it is made, for a J larger than the memory budget; and the
in-memory reference `detached_jacobian`: one forward pass through the whole model with
gradients, then batched reverse mode (`autograd.grad(..., is_grads_batched=True)`, i.e. vmap
over the backward pass) with the identity as cotangents, `chunk` output directions at a time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .errors import GgufjacError
from .gguf_file import pread_fully
from .layout import has_constant
from .linearize import DETACHED, Linearization
from .engine import ForwardRecord, StreamingEngine
from .runner import Transformer

# Bytes of J read at a time from a Jacobian file (a block of positions, every row).
FILE_BLOCK_BYTES = 64 << 20
_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
                       torch.bfloat16: "BF16"}


@dataclass
class JacobianFile:
    """A Jacobian [d, N, d] stored in a safetensors file (`jacobian_to_file`), read a block
    of positions at a time, so that it is never whole in memory."""

    path: Path
    shape: tuple[int, int, int]
    dtype: torch.dtype
    offset: int  # of J's first byte in the file

    def positions(self, start: int, stop: int) -> torch.Tensor:
        """J[:, start:stop, :] as a fresh tensor (one read per output row)."""
        d, n, k = self.shape
        out = torch.empty((d, stop - start, k), dtype=self.dtype)
        item = out.element_size()
        row, size = n * k * item, (stop - start) * k * item
        with open(self.path, "rb") as f:
            for o in range(d):
                view = memoryview(out[o].reshape(-1).view(torch.uint8).numpy())
                pread_fully(f.fileno(), view, self.offset + o * row + start * k * item)
                del view
        return out


def position_blocks(jacobian: torch.Tensor | JacobianFile,
                    block_bytes: int = FILE_BLOCK_BYTES) -> Iterator[tuple[int, torch.Tensor]]:
    """(first position, J[:, block, :]) over blocks of positions, for a J in memory (views)
    or in a file (reads of about `block_bytes`)."""
    d, n, k = jacobian.shape
    if isinstance(jacobian, torch.Tensor):
        yield 0, jacobian
        return
    per_position = d * k * torch.empty((), dtype=jacobian.dtype).element_size()
    step = max(1, block_bytes // per_position)
    for start in range(0, n, step):
        yield start, jacobian.positions(start, min(start + step, n))


@dataclass
class JacobianResult:
    """J [d_out, N, d_in] with y = Σ_i J[:, i, :] @ x_i + c for the detached model (c: the
    biases' constant term, None for a family without biases, whose map is linear)."""

    jacobian: torch.Tensor | JacobianFile  # in memory, or in a file (`jacobian_to_file`)
    inputs: torch.Tensor  # x [N, d], the rows fed into layer 0
    output: torch.Tensor  # y [d], last position after the final norm
    # If set [m, d]: `jacobian` is [m, N, d], the Jacobian of directions @ y (projected).
    directions: torch.Tensor | None = None
    constant: torch.Tensor | None = None  # c [d] (on y itself, also when projected)
    # a mixture of experts' frozen routing per layer (ForwardRecord.routing); None: dense
    routing: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def reconstruction_rel_error(self) -> float:
        project = (lambda v: v) if self.directions is None else (lambda v: self.directions @ v)
        return reconstruction_rel_error(
            self.jacobian, self.inputs, project(self.output),
            None if self.constant is None else project(self.constant))


def reconstruction_rel_error(jacobian: torch.Tensor | JacobianFile, inputs: torch.Tensor,
                             output: torch.Tensor, constant: torch.Tensor | None = None
                             ) -> float:
    """‖Σ_i J_i x_i + c − y‖ / ‖y‖ (c: the constant term, if the map has one): zero up to
    rounding when the map is exactly affine (linear without c)."""
    recon = torch.zeros_like(output) if constant is None else constant.to(output).clone()
    for start, block in position_blocks(jacobian):
        recon += torch.einsum("onk,nk->o", block.to(output.device),
                              inputs[start:start + block.shape[1]])
    return float(torch.linalg.vector_norm(recon - output) / torch.linalg.vector_norm(output))


def directions_per_sweep(engine: StreamingEngine, n_tokens: int, anchored: bool = False) -> int:
    """Most output directions whose rows of J fit in the memory budget at once (all d: J
    fits, and `streamed_jacobian` makes it in one sweep); below one, the budget is refused."""
    d, c = engine.cfg.d_model, engine.cfg.d_model
    while True:
        try:
            engine.plan(c, n_tokens, anchored=anchored)
            return c
        except GgufjacError:
            if c == 1:
                raise
            c = max(1, c // 2)


class JacobianWriter:
    """A safetensors file of the detached Jacobian made a block of output rows at a time,
    the blocks in any order (`write_rows` puts each at its place): `jacobian` [d, N, d],
    then `inputs`, `output` and, for a family with biases, `constant` (`finish`). The file
    has its full size from the start; only J's rows are ever in memory, a block at a time."""

    def __init__(self, path: Path, d: int, n_tokens: int, dtype: torch.dtype,
                 with_constant: bool, metadata: dict[str, str] | None = None) -> None:
        item = torch.empty((), dtype=dtype).element_size()
        sizes = {"jacobian": d * n_tokens * d * item, "inputs": n_tokens * d * item,
                 "output": d * item}
        shapes = {"jacobian": [d, n_tokens, d], "inputs": [n_tokens, d], "output": [d]}
        if with_constant:
            sizes["constant"], shapes["constant"] = d * item, [d]
        header: dict = {"__metadata__": metadata or {}}
        start = 0
        for name in sizes:
            header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": shapes[name],
                            "data_offsets": [start, start + sizes[name]]}
            start += sizes[name]
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
        self.path, self.shape, self.dtype = Path(path), (d, n_tokens, d), dtype
        self.offset = 8 + len(text)  # of J's first byte
        self.row_bytes = n_tokens * d * item
        self.with_constant = with_constant
        self.file = open(path, "wb")
        self.file.write(len(text).to_bytes(8, "little") + text)
        self.file.truncate(self.offset + start)

    def write_rows(self, first: int, rows: torch.Tensor) -> None:
        """Rows first.. of J ([m, N, d], this file's dtype) at their place in the file."""
        if tuple(rows.shape[1:]) != self.shape[1:] or rows.dtype != self.dtype \
                or not 0 <= first <= first + rows.shape[0] <= self.shape[0]:
            raise GgufjacError(f"rows {first}..{first + rows.shape[0]} of J "
                               f"{list(rows.shape)} {rows.dtype} do not fit {self.path} "
                               f"({list(self.shape)} {self.dtype})")
        self._write(self.offset + first * self.row_bytes, rows)

    def _write(self, at: int, t: torch.Tensor) -> None:
        view = memoryview(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
        done = 0
        while done < len(view):
            done += os.pwrite(self.file.fileno(), view[done:], at + done)
        del view

    def finish(self, inputs: torch.Tensor, output: torch.Tensor,
               constant: torch.Tensor | None) -> JacobianFile:
        """Write the inputs, the output and the constant after J; flushed to disk."""
        if (constant is not None) != self.with_constant:
            raise GgufjacError(f"{self.path}: the constant term is "
                               f"{'missing' if constant is None else 'unexpected'}")
        at = self.offset + self.shape[0] * self.row_bytes
        for t in (inputs, output) if constant is None else (inputs, output, constant):
            self._write(at, t.to(self.dtype))
            at += t.numel() * t.element_size()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.close()
        return JacobianFile(self.path, self.shape, self.dtype, self.offset)

    def close(self) -> None:
        self.file.close()


def jacobian_rows(engine: StreamingEngine, record: ForwardRecord, first: int, stop: int,
                  chunk: int | None = None) -> torch.Tensor:
    """Rows first..stop of J [stop - first, N, d]: one reverse sweep with those unit
    directions, `chunk` of them per batched backward (None: as the memory plan says).
    Float results depend on which directions share a sweep and a batched backward, and on
    torch's thread count: the same rows, chunk and threads give the same bits."""
    eye = torch.eye(engine.cfg.d_model, dtype=record.inputs.dtype, device=record.inputs.device)
    return engine.pull_back_output(record, eye[first:stop], chunk)


def jacobian_to_file(engine: StreamingEngine, inputs: torch.Tensor, path: Path,
                     directions: int, metadata: dict[str, str] | None = None,
                     chunk: int | None = None) -> JacobianResult:
    """The detached Jacobian written to the safetensors file `path` as it is made: one
    forward pass, then reverse sweeps of `directions` output directions each (every sweep
    reads the layers again), each sweep's rows of J appended to the file (`chunk`
    directions per batched backward; None: as the memory plan says). The file holds
    `jacobian` [d, N, d], `inputs` and `output` (and `constant` [d] for a family with
    biases), as `jacobian`'s in-memory result does."""
    d, n = engine.cfg.d_model, inputs.shape[0]
    writer = JacobianWriter(path, d, n, inputs.dtype, has_constant(engine.cfg.family),
                            metadata)
    try:
        record = engine.forward(inputs)
        y = record.output[-1]
        for s in range(0, d, directions):
            rows = jacobian_rows(engine, record, s, min(s + directions, d), chunk).cpu()
            writer.write_rows(s, rows)
            del rows
        jac = writer.finish(inputs, y, record.constant)
    finally:
        writer.close()
    return JacobianResult(jac, inputs.detach(), y, constant=record.constant)


def streamed_jacobian(engine: StreamingEngine, inputs: torch.Tensor,
                      directions: torch.Tensor | None = None) -> JacobianResult:
    """The detached Jacobian by the streaming engine: one forward sweep, one reverse sweep.

    `directions` [m, d] (default: all d unit vectors) are the output directions: the result is
    directions @ J, e.g. one unembedding row for the Jacobian of a single logit. The memory
    budget is checked before any layer is read.
    """
    d, n = engine.cfg.d_model, inputs.shape[0]
    dirs = torch.eye(d, dtype=inputs.dtype, device=inputs.device) if directions is None \
        else directions.to(inputs.device, inputs.dtype)
    plan = engine.plan(dirs.shape[0], n)
    record = engine.forward(inputs)
    jac = engine.pull_back_output(record, dirs, plan.chunk)
    return JacobianResult(jac, inputs.detach(), record.output[-1], directions, record.constant,
                          record.routing())


def detached_jacobian(model: Transformer, inputs: torch.Tensor,
                      lin: Linearization = DETACHED, chunk: int | None = None,
                      progress: bool = False) -> JacobianResult:
    """Jacobian of the last position's final-norm output w.r.t. all input embeddings.

    With `lin=PLAIN` this is the ordinary Jacobian (which does not reconstruct the output).
    Detached, for a family with biases, the constant c comes from `Transformer.constant`.
    """
    x = inputs.detach().clone().requires_grad_(True)
    y = model.forward(x, lin)[-1]
    d_out = y.shape[0]
    chunk = chunk or d_out
    eye = torch.eye(d_out, dtype=y.dtype, device=y.device)
    starts = range(0, d_out, chunk)
    rows = []
    for s in tqdm(starts, desc="jacobian", unit="chunk", disable=not progress or len(starts) < 2):
        (g,) = torch.autograd.grad(y, x, grad_outputs=eye[s:s + chunk], retain_graph=True,
                                   is_grads_batched=True)
        rows.append(g)
    constant = model.constant(inputs, lin) if lin.detach else None
    return JacobianResult(torch.cat(rows, dim=0), inputs.detach(), y.detach(), constant=constant)
