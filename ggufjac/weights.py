"""Weights from a GGUF file, dequantized on demand into torch, one layer (or row chunk) at a time.

The file stays memory-mapped; nothing is dequantized until asked for. The token embedding
table (the largest tensor) is never materialized whole: input rows are gathered, and the
unembedding is walked in row chunks.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Iterable, Iterator

import torch
from gguf.constants import GGML_QUANT_SIZES

from .device_weights import (DEFAULT_CHUNK_BYTES, ReadStats, ResidencyPlan, StagedReader,
                             load_resident, plan_residency, working_reserve)
from .errors import GgufjacError
from .families import ModelConfig
from .gguf_file import GGUFFile, TensorInfo
from .blocked import Weight
from .model import LayerWeights
from .layout import (bias_key, check_tensor_index, dequantizable, dims_of, layer_tensor_name,
                     layer_tensor_names, split_stored, stored_bias_shapes_of, stored_members,
                     stored_name, stored_shapes)
from .quantized_products import supports
from .quants import BLOCK_MINIMUM_AT, block_minima, dequantize, raw_to_torch


# Vocabulary-sized tables are walked in chunks of this many rows: larger chunks raise the
# peak by their dequantization temporaries (8-60 MB with 4096 rows on Gemma 3 270M) and are
# no faster.
ROWS_PER_CHUNK = 1024
# Values per chunk of the NaN/Inf scan (one chunk's float32 and bytes are in memory).
SCAN_CHUNK_VALUES = 1 << 22


def _row_bytes(info: TensorInfo) -> int:
    block, type_size = GGML_QUANT_SIZES[info.type]
    return info.shape[0] // block * type_size


class BufferPool:
    """Reusable tensors, one per key: dequantizing layer after layer into the same buffers
    spares a fresh allocation (and its page faults) per tensor and keeps memory flat."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, key: str, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The first `n` elements of the 1-D buffer for `key` (made, or remade larger, when
        the one held is too small or of another dtype or device)."""
        t = self._buffers.get(key)
        if t is None or t.dtype != dtype or t.device != device or t.numel() < n:
            t = self._buffers[key] = torch.empty(n, dtype=dtype, device=device)
        return t[:n]

    def keep_only(self, keys: Iterable[str]) -> None:
        """Drop every buffer but those of `keys` (e.g. after a forward pass, what only the
        forward needed: q, k, the gate)."""
        wanted = set(keys)
        self._buffers = {k: t for k, t in self._buffers.items() if k in wanted}


class StreamedMatrix:
    """Rows [first, first + n_rows) of a matrix stored in the file (a whole tensor, or one
    member of a fused one), dequantized on use `block_rows` rows at a time into one buffer
    of `pool` (blocked.RowBlockMatrix). A block's bytes are read into a reused buffer too
    (not through the file's mapping, whose pages would count against the process until
    released), so neither the weights nor their bytes in memory exceed a block; the file is
    read again at every use."""

    def __init__(self, weights: GGUFWeights, info: TensorInfo, first: int, n_rows: int,
                 block_rows: int, pool: BufferPool | None, exact_reads: bool = False) -> None:
        # exact_reads: read these rows' bytes and none around them (GGUFFile.mapped's
        # `exact`), where the neighbours are not needed next (other experts)
        self.weights, self.info, self.first = weights, info, first
        self.exact_reads = exact_reads
        self.shape = (n_rows, info.shape[0])
        self.dtype, self.device = weights.dtype, weights.device
        self.block_rows, self.pool = max(1, min(block_rows, n_rows)), pool
        self.quantized_type = info.type if supports(info.type, self.shape[1], self.dtype,
                                                         self.device) \
            else None

    def _blocks(self) -> Iterator[tuple[int, int]]:
        for start in range(0, self.shape[0], self.block_rows):
            yield start, min(self.shape[0], start + self.block_rows)

    def row_blocks(self) -> Iterator[tuple[int, torch.Tensor]]:
        for start, stop in self._blocks():
            yield start, self.weights._rows(self.info, self.first + start, self.first + stop,
                                            pool=self.pool, key="block", copy=True)

    def raw_blocks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """The blocks' bytes through the file's mapping, each block's pages mapped in just
        before use and released after (a copy into a buffer where the system cannot map
        them in ahead): the products read the page cache itself, with no copy of every byte
        into a buffer first (seconds per pass at 70B, docs/benchmarks.md)."""
        gguf, row_bytes = self.weights.gguf, _row_bytes(self.info)
        held = self.weights.resident.get(self.info.name)
        for start, stop in self._blocks():
            if held is not None:  # in memory already (GGUFWeights.hold_on_device)
                first = (self.first + start) * row_bytes
                yield start, held[first:first + (stop - start) * row_bytes].view(stop - start,
                                                                                 row_bytes)
                continue
            offset = self.info.offset + (self.first + start) * row_bytes
            n_bytes = (stop - start) * row_bytes
            mapped = gguf.mapped(offset, n_bytes, exact=self.exact_reads)
            if mapped is None:
                yield start, self.weights._raw_rows(self.info, self.first + start,
                                                    self.first + stop, self.pool, "block")
                continue
            yield start, raw_to_torch(mapped).view(stop - start, row_bytes)
            gguf.release(offset, n_bytes)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self.weights._rows(self.info, self.first + start, self.first + stop, copy=True)

    def columns(self, start: int, stop: int) -> torch.Tensor:
        """Columns [start, stop): `start` on a quantization block boundary (and `stop` too,
        or the row's end), gathered from every row's bytes."""
        block, type_size = GGML_QUANT_SIZES[self.info.type]
        cols = self.shape[1]
        if start % block or (stop % block and stop != cols) or not 0 <= start < stop <= cols:
            raise ValueError(f"columns [{start}, {stop}) of {self.info.name!r} do not fall on "
                             f"its {block}-value quantization blocks")
        row_bytes = cols // block * type_size
        raw = self.weights.gguf.tensor_data(self.info.name).reshape(-1, row_bytes)
        first_byte, last_byte = start // block * type_size, -(-stop // block) * type_size
        part = raw[self.first:self.first + self.shape[0], first_byte:last_byte]
        t = self.weights._dequantize(raw_to_torch(part.copy(), self.device), self.info,
                                     (self.shape[0], stop - start), self.dtype, None, "columns")
        self.weights.gguf.release(self.info.offset + self.first * row_bytes,
                                  self.shape[0] * row_bytes)
        return t


class ExpertStack:
    """A 3-D expert tensor [n_expert, rows, cols] of the file (model.ExpertWeights): expert e
    is rows [e·rows, (e + 1)·rows) of the tensor seen as a matrix, handed out as a
    `StreamedMatrix` (read at each use, `block_rows` rows at a time, with the compiled
    quantized products where the type has them), so only the experts some token selected
    are ever read and memory does not grow with the number of experts. Each expert asked
    for is counted in the weights' `experts_read`."""

    def __init__(self, weights: GGUFWeights, info: TensorInfo, block_rows: int | None,
                 pool: BufferPool | None) -> None:
        self.weights, self.info, self.pool = weights, info, pool
        self.n_expert, rows, cols = info.torch_shape
        self.shape = (rows, cols)  # one expert's
        self.block_rows = rows if block_rows is None else block_rows

    def expert(self, e: int) -> StreamedMatrix:
        if not 0 <= e < self.n_expert:
            raise GgufjacError(f"{self.weights.gguf.path}: tensor {self.info.name!r} has no "
                               f"expert {e} (it has {self.n_expert})")
        self.weights.experts_read.add((self.info.name, e))
        return StreamedMatrix(self.weights, self.info, e * self.shape[0], self.shape[0],
                              self.block_rows, self.pool, exact_reads=True)


class GGUFWeights:
    """Dequantizes the tensors of one GGUF model into `dtype` on `device`, on demand."""

    def __init__(self, gguf: GGUFFile, cfg: ModelConfig, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        self.gguf, self.cfg, self.dtype, self.device = gguf, cfg, dtype, torch.device(device)
        self.rope_factors_name = check_tensor_index(gguf, cfg)
        self.unembedding_name = "token_embd.weight" if cfg.tied_embeddings else "output.weight"
        # Time spent dequantizing (and, for tensors read through the mapping, reading)
        self.dequantize_seconds = 0.0
        # (expert tensor, expert) pairs some product asked for (ExpertStack)
        self.experts_read: set[tuple[str, int]] = set()
        # Device-held weights (`hold_on_device`): the quantized bytes of the resident
        # tensors in the device's memory, and the staged reader the others are read by.
        self.resident: dict[str, torch.Tensor] = {}
        self.staged: StagedReader | None = None
        self.residency: ResidencyPlan | None = None
        self.resident_load: ReadStats | None = None  # the one read that filled `resident`

    def hold_on_device(self, budget: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                       reserve: int | None = None) -> ResidencyPlan:
        """Read the quantized tensors that fit `budget` (less `reserve`, by default
        device_weights.working_reserve) into this device's memory, in one sequential pass of
        staged chunks; every later use of them dequantizes from there, and the other tensors
        are read by the same staged reads at each use instead of through the mapping."""
        if reserve is None:
            reserve = working_reserve(budget, self.layer_bytes())
        plan = plan_residency(self.gguf.tensors, budget, reserve)
        reader = StagedReader(self.gguf, self.device, chunk_bytes)
        before = reader.stats.wall_seconds
        self.resident = load_resident(self.gguf, plan, self.device, reader=reader)
        self.resident_load = ReadStats(reader.stats.bytes_read, reader.stats.read_seconds,
                                       reader.stats.wall_seconds - before)
        reader.stats = ReadStats()  # from here: the streamed tensors' reads
        self.staged, self.residency = reader, plan
        return plan

    def release_device_weights(self) -> None:
        """Drop the device-held bytes and the staging buffers (back to reads through the
        mapping)."""
        if self.staged is not None:
            self.staged.close()
        self.resident, self.staged, self.residency = {}, None, None

    def _tensor_bytes(self, info: TensorInfo, pool: BufferPool | None, key: str
                      ) -> torch.Tensor | None:
        """The bytes of `info` on the device when this object holds weights there (resident,
        or read now by the staged reader, into the pool's buffer for `key`); None: read
        them through the mapping."""
        raw = self.resident.get(info.name)
        if raw is not None or self.staged is None:
            return raw
        dest = None if pool is None else pool.get(key + " bytes", info.n_bytes, torch.uint8,
                                                  self.device)
        return self.staged.read_tensor(info, dest)

    def expert_bytes_read(self) -> int:
        """Bytes of the file's expert tensors that the experts asked for so far occupy (each
        counted once, however often it was read): the share of the experts a prompt touched."""
        return sum(self.gguf.tensor(name).n_bytes // self.gguf.tensor(name).torch_shape[0]
                   for name, _ in self.experts_read)

    def tensor(self, name: str, pool: BufferPool | None = None,
               key: str | None = None) -> torch.Tensor:
        """Tensor `name` dequantized into this dtype; with a `pool`, written into the pool's
        buffer for `key` (reused layer after layer) instead of fresh memory."""
        t0 = time.perf_counter()
        info = self.gguf.tensor(name)
        held = self._tensor_bytes(info, pool, key or name)
        raw = held if held is not None else raw_to_torch(self.gguf.tensor_data(name), self.device)
        t = self._dequantize(raw, info, info.torch_shape, self.dtype, pool, key or name)
        if held is None:
            self.gguf.release(info.offset, info.n_bytes)
        self.dequantize_seconds += time.perf_counter() - t0
        return t

    def _dequantize(self, raw: torch.Tensor, info: TensorInfo, shape: tuple[int, ...],
                    dtype: torch.dtype, pool: BufferPool | None, key: str) -> torch.Tensor:
        """Raw bytes of `info`'s type -> `dtype` [shape]: fresh, or into the pool's buffer for
        `key` (float32 directly; another dtype through the pool's shared float32 scratch)."""
        if pool is None:
            return dequantize(raw, info.type, shape).to(dtype)
        n = math.prod(shape)
        if dtype == torch.float32:
            out = pool.get(key, n, torch.float32, self.device)
            return dequantize(raw, info.type, shape, out)
        scratch = pool.get("float32 scratch", n, torch.float32, self.device)
        out = pool.get(key, n, dtype, self.device).view(shape)
        return out.copy_(dequantize(raw, info.type, shape, scratch))

    def layer_names(self, names: Iterable[str] | None = None) -> list[str]:
        """The stored tensors (short names) that loading `names` of a layer reads."""
        wanted = layer_tensor_names(self.cfg) if names is None else names
        return sorted({stored_name(self.cfg.family, n) for n in wanted})

    def layer(self, i: int, names: Iterable[str] | None = None,
              pool: BufferPool | None = None, block_elements: int | None = None) -> LayerWeights:
        """Tensors of layer `i` (all, or those in `names`), keyed by short name ('attn_q',
        'ffn_down', ...). Fused tensors are split; a rope-factor tensor, if the file has one,
        is 'rope_factors'. The biases of the loaded matrices, where the family has them and
        the file stores them, come as `layout.bias_key(name)` (small: always whole, fresh
        memory). With a `pool` the tensors are views of its buffers: valid until the next
        layer is loaded into the same pool.

        `block_elements`: the matrices are not dequantized now but read in row blocks of
        about this many values each time they are used (`StreamedMatrix`, sharing the pool's
        block buffer, or fresh memory without a pool); norm weights are loaded as tensors.
        """
        w: dict[str, Weight] = {}
        biased = stored_bias_shapes_of(self.cfg.family, dims_of(self.cfg))
        for stored in self.layer_names(names):
            bias = layer_tensor_name(i, stored, "bias")
            if stored in biased and bias in self.gguf.tensors:
                w.update({bias_key(name): b for name, b in
                          split_stored(self.cfg, stored, self.tensor(bias)).items()})
            full = layer_tensor_name(i, stored)
            info = self.gguf.tensor(full)
            if len(info.shape) == 3:  # experts: read only those asked for, when used
                rows = None if block_elements is None else max(1, block_elements // info.shape[0])
                w[stored] = ExpertStack(self, info, rows, pool)
                continue
            if block_elements is not None and len(info.shape) == 2:
                rows = max(1, block_elements // info.shape[0])
                first = 0
                for name, n_rows in stored_members(self.cfg.family, dims_of(self.cfg))[stored]:
                    w[name] = StreamedMatrix(self, info, first, n_rows, rows, pool)
                    first += n_rows
                continue
            w.update(split_stored(self.cfg, stored, self.tensor(full, pool, stored)))
        if self.rope_factors_name and names is None:
            w["rope_factors"] = self.tensor(self.rope_factors_name)
        return LayerWeights(i, w, functools.partial(self.block_minima, i))

    def block_minima(self, layer: int, name: str) -> torch.Tensor:
        """The block minima [rows, blocks] of layer `layer`'s Q4_1/Q5_1 matrix `name` (a
        member of a fused tensor: its rows), in this dtype (model.LayerWeights)."""
        stored = stored_name(self.cfg.family, name)
        info = self.gguf.tensor(layer_tensor_name(layer, stored))
        if info.type not in BLOCK_MINIMUM_AT:
            raise GgufjacError(f"{self.gguf.path}: tensor {info.name!r} is {info.type.name}, "
                               "whose blocks have no minimum")
        first = 0
        for member, n_rows in stored_members(self.cfg.family, dims_of(self.cfg))[stored]:
            if member == name:
                break
            first += n_rows
        raw = self._raw_rows(info, first, first + n_rows, None, "minima")
        return block_minima(raw, info.type, (n_rows, info.shape[0])).to(self.device, self.dtype)

    def layer_bytes(self, names: Iterable[str] | None = None) -> int:
        """Bytes of one layer's dequantized tensors (`names`, or all) in this dtype."""
        item = torch.empty((), dtype=self.dtype).element_size()
        shapes = stored_shapes(self.cfg)
        # an expert tensor is never held whole: one expert's matrix at a time (ExpertStack)
        return sum(math.prod(shapes[n][-2:] if len(shapes[n]) == 3 else shapes[n])
                   for n in self.layer_names(names)) * item

    def widest_row(self) -> int:
        """The most values in one row of a layer matrix (the smallest possible row block)."""
        return max((s[-1] for s in stored_shapes(self.cfg).values() if len(s) == 2), default=0)

    def output_norm(self) -> torch.Tensor:
        return self.tensor("output_norm.weight")

    def _rows(self, info: TensorInfo, start: int, stop: int, dtype: torch.dtype | None = None,
              pool: BufferPool | None = None, key: str = "rows", copy: bool = False
              ) -> torch.Tensor:
        """Rows [start, stop) dequantized; with a `pool`, into its buffer for `key` (valid
        until the next call with that pool and key). `copy`: the bytes are read into a
        buffer (GGUFFile.read_into) instead of through the mapping."""
        n_rows = math.prod(info.shape[1:])
        if not 0 <= start < stop <= n_rows:
            raise GgufjacError(f"{self.gguf.path}: rows [{start}, {stop}) of tensor "
                               f"{info.name!r} do not exist (it has {n_rows})")
        row_bytes = _row_bytes(info)
        resident = self.resident.get(info.name)
        if resident is not None:  # held on the device: a view of its bytes, nothing read
            t0 = time.perf_counter()
            raw = resident[start * row_bytes:stop * row_bytes].view(stop - start, row_bytes)
            copy = True  # (nothing mapped to release)
        elif copy and self.staged is not None:  # staged into the pool's device buffer
            dest = None if pool is None else pool.get(key + " bytes", (stop - start) * row_bytes,
                                                      torch.uint8, self.device)
            raw = self.staged.read_tensor(info, dest, start * row_bytes,
                                          (stop - start) * row_bytes).view(stop - start, row_bytes)
            t0 = time.perf_counter()
        elif copy:  # read time is the file's (GGUFFile.read_seconds), not dequantization's
            raw = self._raw_rows(info, start, stop, pool, key)
            t0 = time.perf_counter()
            raw = raw.to(self.device, non_blocking=True)
        else:
            t0 = time.perf_counter()
            raw = raw_to_torch(self.gguf.tensor_data(info.name)[start * row_bytes:
                                                                stop * row_bytes], self.device)
        t = self._dequantize(raw, info, (stop - start, info.shape[0]), dtype or self.dtype,
                             pool, key)
        if not copy:
            # The whole file, not only these rows: reading a chunk maps pages of the chunks
            # before it again (fault-around), and released per range those stay mapped, so the
            # resident set would grow over a vocabulary walk (tests/test_gguf_file.py).
            self.gguf.release()
        self.dequantize_seconds += time.perf_counter() - t0
        return t

    def _raw_rows(self, info: TensorInfo, start: int, stop: int, pool: BufferPool | None,
                  key: str) -> torch.Tensor:
        """The bytes of rows [start, stop), read from the file into a buffer ([rows, bytes per
        row], uint8 on CPU); with a `pool`, its buffer for `key` (valid until the next call)."""
        row_bytes = _row_bytes(info)
        n_bytes = (stop - start) * row_bytes
        buf = (pool.get(key + " bytes", n_bytes, torch.uint8, torch.device("cpu"))
               if pool is not None else torch.empty(n_bytes, dtype=torch.uint8))
        self.gguf.read_into(info.offset + start * row_bytes, buf.numpy())
        return buf.view(stop - start, row_bytes)

    def embedding_rows(self, token_ids: list[int]) -> torch.Tensor:
        """Rows of the token embedding table for `token_ids` (not yet scaled), [N, d]."""
        return self._gather_rows("token_embd.weight", token_ids)

    def _gather_rows(self, name: str, token_ids: list[int]) -> torch.Tensor:
        info = self.gguf.tensor(name)
        return torch.cat([self._rows(info, t, t + 1) for t in token_ids], dim=0)

    @torch.no_grad()
    def nonfinite_counts(self, values_per_chunk: int = SCAN_CHUNK_VALUES) -> dict[str, int]:
        """{tensor name: number of NaN/Inf values} over every tensor of the file that
        dequantizes to any, read in chunks of rows of about `values_per_chunk` values into
        reused buffers (memory stays one chunk)."""
        found, pool = {}, BufferPool()
        for name, info in self.gguf.tensors.items():
            if not dequantizable(info.type):
                continue
            rows = math.prod(info.shape[1:])
            step = max(1, values_per_chunk // max(info.shape[0], 1))
            bad = 0
            for start in range(0, rows, step):
                chunk = self._rows(info, start, min(rows, start + step), torch.float32, pool,
                                   copy=True)
                bad += int((~torch.isfinite(chunk)).sum())
            if bad:
                found[name] = bad
        return found

    def unembedding_rows(self, token_ids: list[int]) -> torch.Tensor:
        """Rows u_t of the unembedding matrix: logit_t = u_t · y (before any soft-cap), [m, d].
        A family's logit scale (Granite's divisor) is part of u_t, so u_t · y is the logit."""
        return self._logit_scaled(self._gather_rows(self.unembedding_name, token_ids))

    def unembedding_chunks(self, rows_per_chunk: int = ROWS_PER_CHUNK) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, rows) chunks of the unembedding matrix [vocab, d], in order (the
        logit scale included, as in `unembedding_rows`)."""
        for start, rows in self._row_chunks(self.unembedding_name, rows_per_chunk):
            yield start, self._logit_scaled(rows)

    def _logit_scaled(self, rows: torch.Tensor) -> torch.Tensor:
        # a new tensor: the rows may be a reused buffer or a view of the file's own memory
        return rows if self.cfg.logit_scale == 1.0 else rows / self.cfg.logit_scale

    def embedding_chunks(self, rows_per_chunk: int = ROWS_PER_CHUNK) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, rows) chunks of the token embedding table [vocab, d] (not scaled)."""
        return self._row_chunks("token_embd.weight", rows_per_chunk)

    def _row_chunks(self, name: str, rows_per_chunk: int) -> Iterator[tuple[int, torch.Tensor]]:
        """Each chunk is dequantized into the same buffers (a fresh tensor per chunk measured
        +14 MB resident over 20 chunks: glibc keeps the freed ones): a chunk is valid until
        the next one is asked for."""
        info = self.gguf.tensor(name)
        vocab, pool = info.shape[1], BufferPool()
        for start in range(0, vocab, rows_per_chunk):
            yield start, self._rows(info, start, min(vocab, start + rows_per_chunk), pool=pool)
