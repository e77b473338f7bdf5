"""The streaming engine: a detached model run one layer at a time, weights read on demand.

Forward: each layer's weights are dequantized from the memory-mapped file, the layer runs
(`model.block`, the one shared layer function) recording its frozen coefficients (norm
scales, attention probabilities, the activated gate: a few kB per layer for short prompts)
and the residual stream entering it; then its weights are dropped.

Reverse: with the coefficients frozen the network is linear, so cotangents (output directions)
are pulled back layer by layer, last to first, by batched vector-Jacobian products of the
same `block` replaying the recorded coefficients. Only the weights on the linear path are
read for that (v, o, up or gate, down, and the norm weights): q, k and the frozen MLP branch
never enter it. Directions are processed in chunks sized to a memory budget.

At any moment at most one layer's dequantized weights are in memory (two with prefetching,
which overlaps reading the next layer with the current layer's compute: on by default on
CUDA, off on CPU, where the worker's dequantization competes with the compute for the cores
and measured 0.80-0.98x as fast on 2 cores, tools/bench_prefetch.py), or, when the matrices
stream (`plan` decides), one row block of them (blocked.py), the next layers' bytes read
ahead by a thread and the record's coefficients spilled to a file.
"""

from __future__ import annotations

import ctypes
import os
import resource
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .errors import GgufjacError
from .gguf_file import pread_fully
from .units import format_size
from .costs import mlp_as_matrix
from .layout import dims_of, has_constant, layer_tensor_name, linear_path
from .linearize import (DETACHED, POSITION_WISE, Anchor, Coefficients, Linearization, Site,
                        at_last_position, is_rounding_site)
from .model import (LayerWeights, attention_branch, block, final_norm, mlp_branch,
                    mlp_branch_matrices, mlp_branch_matrix)
from .runner import input_embeddings
from .weights import BufferPool, GGUFWeights


# Calibrated with tools/bench_memory.py: the batched backward of one layer holds about this
# many activation-sized temporaries per output direction (in units of N·(2·d_ff + 4·d + 2·H·hd)).
_BACKWARD_TEMPORARIES = 2.0
# Upper bound on directions per batched backward, even when more would fit: very large
# batches lose cache locality (one layer's backward of 640 directions at once took 2.9x as
# long as 4 batches of 160 on Gemma 3 270M); 512 rows (directions x tokens) was the fastest
# batch for the attention's VJPs (docs/benchmarks.md).
MAX_CHUNK = 64
MAX_BATCH_ROWS = 512
# On a GPU the cache argument does not hold: a batch as large as memory allows keeps the
# device busy (the budget, `plan`, decides the batch below this many rows).
GPU_MAX_BATCH_ROWS = 1 << 16
# MLP columns multiplied at a time while forming an MLP matrix (a [d, chunk] temporary; a
# multiple of 256 so that streamed columns start on quantization blocks).
MLP_MATRIX_FFN_CHUNK = 1024
# Values of the MLP matrices formed at once and of their scaled-W_in temporary: the
# positions' matrices are made side by side by one product as long as they fit (8 positions
# of Gemma 3 270M; one at a time from d_model 2048 up, whose products are large anyway).
MLP_MATRIX_ELEMENTS = 1 << 24
# Values per row block when a layer's matrices are streamed. Dequantizing a block and
# multiplying it at once is faster on CPU than dequantizing the whole matrix first
# (tools/bench_blocks.py), so a single pass over a layer always streams there. 2^24 values
# (64 MB in float32) rather than a cache-sized block: a few tokens times a block of a few
# hundred rows is a thin product, and the sweeps ran fastest with blocks of 2^23 to 2^24
# (docs/benchmarks.md, "Row block size").
STREAM_BLOCK_ELEMENTS = 1 << 24
# Layers read ahead of the one computing, when streaming: two keep the disk busy through a
# layer whose compute is shorter than its read (the page cache holds them: ~1 GB at 70B).
READ_AHEAD_LAYERS = 2
# Dequantization's own temporaries (it works on quants.CHUNK_ELEMENTS values at a time).
_DEQUANTIZE_TEMPORARIES = 16 << 20


def max_chunk(n_tokens: int, device: torch.device | None = None) -> int:
    """Most output directions per batched backward for a prompt of `n_tokens` (on a GPU:
    as many as GPU_MAX_BATCH_ROWS rows, the memory budget permitting, to fill the device)."""
    if device is not None and device.type == "cuda":
        return max(1, GPU_MAX_BATCH_ROWS // max(n_tokens, 1))
    return max(1, min(MAX_CHUNK, MAX_BATCH_ROWS // max(n_tokens, 1)))


def resident_bytes() -> int:
    """This process's current resident set (Linux /proc; else the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _malloc_trim() -> Callable[[], None]:
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    return lambda: trim(0)


_trim = _malloc_trim()


def release_freed_memory() -> None:
    """Give freed heap pages back to the system (glibc's malloc_trim; a no-op elsewhere).

    glibc keeps freed heap chunks resident. Layers are dequantized into reused buffers and
    in pieces (quants.CHUNK_ELEMENTS), so a sweep's temporaries are reused layer after layer;
    the engine trims once after each sweep and after releasing buffers. Trimming after every
    layer as well cost 0.15 s of 1.8 s on Gemma 3 270M (the trimmed pages fault back in at
    the next layer) for ~3 MB less peak.
    """
    _trim()


def available_bytes(device: torch.device) -> int:
    """Memory free for our tensors: free GPU memory, or the system's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


try:  # what autograd.grad(..., is_grads_batched=True) runs, without its argument checks
    from torch._vmap_internals import _vmap
    from torch.autograd.graph import _engine_run_backward
except ImportError:  # another torch: the public call
    _vmap = None


def _vjp_rows(out: torch.Tensor, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Cotangent rows [m, *out.shape] on `out` pulled back to `x`: one batched backward.

    torch.autograd.grad's own checks of the cotangents' shapes import sympy on first use
    (measured: +38 MB resident, 0.27 s); the shapes here are ours, so the engine calls the
    same batched backward (legacy vmap over the autograd engine) directly when it can.
    """
    if _vmap is None:
        (g,) = torch.autograd.grad(out, x, rows, retain_graph=True, is_grads_batched=True)
        return g
    if rows.shape[0] == 1:  # one row: a plain backward (the products then add in place)
        (g,) = _engine_run_backward((out,), (rows[0],), True, False, (x,), False,
                                    accumulate_grad=False)
        return g.unsqueeze(0)

    def vjp(g_out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return _engine_run_backward((out,), (g_out,), True, False, (x,), False,
                                    accumulate_grad=False)
    (g,) = _vmap(vjp, 0, 0, allow_none_pass_through=True)(rows)
    return g


def _pull_back_batched(function: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                       cotangents: torch.Tensor, chunk: int, result: torch.Tensor,
                       add: bool = False) -> torch.Tensor:
    """Rows of `cotangents` [m, *out.shape] on `function(x)` pulled back to x, `chunk` rows
    at a time, written into (`add`: added to) `result` [m, *x.shape] (it may be
    `cotangents` itself). `function` must be linear in x and take a leading batch
    dimension, as a replayed layer does.

    The rows are carried as a batch through one plain backward of `function` applied to x
    repeated `chunk` times (a stride-0 view: nothing is copied), not by vmap over the
    backward: the legacy vmap that a batched `autograd.grad` runs falls back to one small
    product per row for the matrix products of a custom autograd function (blocked.linear
    in a replay), where a plain backward multiplies [chunk·N, ·] rows by each weight at
    once (docs/benchmarks.md, "The Jacobian step against the matmul rate")."""
    base = x.detach()
    for s in range(0, cotangents.shape[0], chunk):
        rows = cotangents[s:s + chunk]
        xb = base.expand(rows.shape[0], *base.shape).requires_grad_(True)
        with torch.enable_grad():
            out = function(xb)
        if _vmap is None:
            (g,) = torch.autograd.grad(out, xb, rows)
        else:
            (g,) = _engine_run_backward((out,), (rows,), False, False, (xb,), False,
                                        accumulate_grad=False)
        if add:
            result[s:s + chunk] += g
        else:
            result[s:s + chunk] = g
        del out, g
    return result


def _batched_vjp(out: torch.Tensor, x: torch.Tensor, cotangents: torch.Tensor, chunk: int,
                 result: torch.Tensor) -> torch.Tensor:
    """Rows of `cotangents` on `out` pulled back to `x`, `chunk` rows per batched backward,
    written into `result` row by row (it may be `cotangents` itself)."""
    for s in range(0, cotangents.shape[0], chunk):
        result[s:s + chunk] = _vjp_rows(out, x, cotangents[s:s + chunk])
    return result


class SpilledTensors(Sequence[dict[str, torch.Tensor]]):
    """Groups of named tensors kept in an (already unlinked) temporary file, not in memory:
    each group is read back, as a fresh dict, when asked for.

    The forward record of a streamed run spills its layers' frozen coefficients here: the
    MLP's [N, d_ff] coefficients of every layer are the one part of a record that grows
    with the model (147 MB for a 70B model and 16 tokens in float32); spilled, one layer's
    are resident at a time, and writing and reading them back costs a few MB per layer
    against the hundreds of MB of weights that layer reads. svd.py spills its Lanczos
    blocks' reverse-sweep rows here too."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._file = tempfile.TemporaryFile(prefix="ggufjac-record-")
        self._index: list[dict[str, tuple[int, tuple[int, ...], torch.dtype]]] = []
        self._end = 0
        self.largest = 0  # bytes of the largest group (one is loaded at a time)

    def append(self, store: dict[str, torch.Tensor]) -> None:
        entry, size = {}, 0
        for site, t in store.items():
            data = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
            self._file.write(memoryview(data))
            entry[site] = (self._end, tuple(t.shape), t.dtype)
            self._end += data.nbytes
            size += data.nbytes
        self._index.append(entry)
        self.largest = max(self.largest, size)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:  # type: ignore[override]
        self._file.flush()
        out: dict[str, torch.Tensor] = {}
        for site, (offset, shape, dtype) in self._index[index].items():
            t = torch.empty(shape, dtype=dtype)
            pread_fully(self._file.fileno(), memoryview(t.reshape(-1).view(torch.uint8).numpy()),
                        offset)
            out[site] = t.to(self.device)
        return out

    def __len__(self) -> int:
        return len(self._index)


def _from_position(store: Coefficients, position: int) -> Coefficients:
    """The recorded coefficients cut to the rows `position`.. (position-wise ones) and to
    those queries and keys (the attention probabilities), for inputs that are zero before
    `position`: attention is causal, so those rows never see the ones cut off."""
    if position == 0:
        return store
    return {site: c[:, position:, position:] if site == "attn_probs"
            else c[position:] if Site(site) in POSITION_WISE and c.dim() >= 2 and c.shape[0] > 1
            else c for site, c in store.items()}


@dataclass
class ForwardRecord:
    """What the reverse sweep needs from the forward pass, per layer (small)."""

    residuals: list[torch.Tensor]  # residuals[l]: the stream entering layer l; [L]: the last output
    # frozen coefficients of each layer: in memory, or spilled to a temporary file
    coefficients: list[Coefficients] | SpilledTensors
    output_coefficients: Coefficients  # of the final norm
    output: torch.Tensor  # final-norm output at every position [N, d]
    # A family with biases (an affine network, y = J x + c): the constant stream, i.e. the
    # residual stream entering each layer when the input embeddings are zero, the recorded
    # coefficients replayed with the biases on ([L]: the last output); None without biases.
    constants: list[torch.Tensor] | None = None
    output_constant: torch.Tensor | None = None  # c at every position: its final norm [N, d]

    @property
    def inputs(self) -> torch.Tensor:
        return self.residuals[0]

    @property
    def constant(self) -> torch.Tensor | None:
        """c [d] with y = Σ_i J_i x_i + c at the last position (None: the map is linear)."""
        return None if self.output_constant is None else self.output_constant[-1]

    def routing(self) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """A mixture of experts' frozen routing per layer: (the experts each position
        selected [N, k], in llama.cpp's order, their weights [N, k]); None for a dense MLP."""
        if not len(self.coefficients) or "moe_experts" not in self.coefficients[0]:
            return None
        return [(c["moe_experts"], c["moe_weights"])
                for c in (self.coefficients[i] for i in range(len(self.coefficients)))]

    def nbytes(self) -> int:
        """Bytes the record holds in memory (a spilled record: one layer's coefficients)."""
        tensors = [*self.residuals, self.output, *self.output_coefficients.values(),
                   *(self.constants or ())]
        if isinstance(self.coefficients, SpilledTensors):
            held = self.coefficients.largest
        else:
            held = sum(t.numel() * t.element_size() for c in self.coefficients for t in c.values())
        return held + sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class MemoryPlan:
    budget: int
    fixed: int  # process baseline + weights (whole layer, or a row block) + record + result
    per_direction: int  # working memory of one direction in the batched backward
    chunk: int
    block_elements: int | None  # values per streamed row block; None: whole layers held


class StreamingEngine:
    """Forward and reverse sweeps of the detached model over one GGUF file's layers."""

    def __init__(self, weights: GGUFWeights, lin: Linearization = DETACHED,
                 progress: bool = False, max_memory: int | None = None,
                 prefetch: bool | None = None, anchor: Anchor | None = None,
                 streaming: bool | None = None, block_elements: int = STREAM_BLOCK_ELEMENTS
                 ) -> None:
        """`streaming`: whether layer matrices are read in row blocks of about
        `block_elements` values (True), held whole (False), or as `plan` decides (None)."""
        if not lin.detach:
            raise GgufjacError("the streaming engine computes detached Jacobians only")
        if anchor is not None and anchor.gate_path != lin.gate_path:
            raise GgufjacError(f"the anchor's MLP coefficients are for gate path "
                               f"{anchor.gate_path!r}, not {lin.gate_path!r}: anchor again with "
                               "the same Linearization")
        self.weights, self.cfg, self.lin = weights, weights.cfg, lin
        self.anchor = anchor  # coefficients given by llama.cpp's run (anchor.py), if any
        self.dtype, self.device = weights.dtype, weights.device
        self.progress, self.max_memory = progress, max_memory
        self.streaming, self.block_elements = streaming, block_elements
        self.prefetch = self.device.type == "cuda" if prefetch is None else prefetch
        # Layer weights are dequantized into reused buffers (two sets when prefetching: one
        # being read while the next layer is written into the other).
        self._buffers = [BufferPool() for _ in range(2 if self.prefetch else 1)]
        # the reverse sweep's own temporaries of tens of MB (the MLP matrices), reused layer
        # after layer rather than allocated (and page-faulted in) anew
        self._work = BufferPool()
        self.output_norm = weights.output_norm()
        # per-layer tensors the reverse sweep reads: the linear path and the norm weights
        self.linear_path = linear_path(self.cfg.family, lin.gate_path)
        self.sweeps: list[SweepTiming] = []  # one per forward pass and reverse sweep, in order

    def release(self, keep: Sequence[str] = ()) -> None:
        """Free the layer buffers (all but those of the stored tensors `keep`) and give the
        memory back to the system: after a forward pass, what only it read; after a sweep,
        everything, before what follows (an SVD, decoding)."""
        for pool in self._buffers:
            pool.keep_only([*keep, "float32 scratch"] if keep else ())
        self._work.keep_only(())
        release_freed_memory()

    # -- weights, one layer at a time ---------------------------------------------------

    def _load(self, layer: int, names: Sequence[str] | None, pool: BufferPool,
              after: torch.cuda.Event | None = None
              ) -> tuple[LayerWeights, torch.cuda.Event | None]:
        """Layer `layer`'s tensors, dequantized into `pool`'s buffers.

        A CUDA prefetch passes `after`, an event recorded on the compute stream when the read
        was asked for: the compute queued until then may still read `pool` (the layer before
        last used this buffer set), so the side stream waits for it and for nothing later.
        The tensors then come with an event marking the end of their dequantization, for the
        compute stream to wait on when it takes them (`layers`).
        """
        if after is None:
            return self.weights.layer(layer, names, pool), None
        stream = self._side_stream()
        stream.wait_event(after)
        with torch.cuda.stream(stream):
            w = self.weights.layer(layer, names, pool)
            done = torch.cuda.Event()
            done.record(stream)
        return w, done

    def _side_stream(self) -> torch.cuda.Stream:
        if not hasattr(self, "_stream"):
            self._stream = torch.cuda.Stream(self.device)
        return self._stream

    def layers(self, order: Sequence[int], names: Sequence[str] | None, desc: str,
               block_elements: int | None = None) -> Iterator[tuple[int, LayerWeights]]:
        """(layer, weights) in `order`, each loaded just before use (the next one meanwhile,
        if prefetching). `block_elements`: the matrices are read in row blocks of about this
        many values at each use (weights.StreamedMatrix) instead of being dequantized whole;
        the next layer's bytes are then read ahead into the page cache by a thread while the
        current one computes. The progress bar counts the bytes of the file read and
        estimates the time left."""
        order = list(order)
        sizes = [self._layer_file_bytes(layer, names) for layer in order]
        bar = tqdm(total=sum(sizes), desc=desc, unit="B", unit_scale=True,
                   disable=not self.progress, leave=False)
        streaming = block_elements is not None
        pool = ThreadPoolExecutor(1, thread_name_prefix="ggufjac-prefetch") \
            if self.prefetch or streaming else None
        buffers, cuda = self._buffers, self.device.type == "cuda"
        try:
            pending: Future | None = None
            for k, layer in enumerate(order):
                if streaming:
                    w, done = self.weights.layer(layer, names, buffers[0], block_elements), None
                    # the next READ_AHEAD_LAYERS layers, each submitted once, in order
                    ahead = order[1:1 + READ_AHEAD_LAYERS] if k == 0 else \
                        order[k + READ_AHEAD_LAYERS:k + READ_AHEAD_LAYERS + 1]
                    for j in ahead:
                        pool.submit(self._read_ahead, j, names)  # type: ignore[union-attr]
                elif pending is not None:
                    w, done = pending.result()
                else:
                    w, done = self._load(layer, names, buffers[k % len(buffers)])
                if done is not None:  # read on the side stream: wait for it, on the GPU only
                    compute = torch.cuda.current_stream(self.device)
                    compute.wait_event(done)
                    for t in w.values():  # the buffers are used on this stream too
                        if isinstance(t, torch.Tensor):  # (experts are read when used)
                            t.record_stream(compute)
                pending = None
                if not streaming and self.prefetch and k + 1 < len(order):
                    after = None
                    if cuda:
                        after = torch.cuda.Event()
                        after.record(torch.cuda.current_stream(self.device))
                    pending = pool.submit(self._load, order[k + 1], names,  # type: ignore[union-attr]
                                          buffers[(k + 1) % len(buffers)], after)
                yield layer, w
                del w
                self.weights.gguf.release()  # pages mapped around the layer's tensors
                bar.update(sizes[k])
            release_freed_memory()
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            bar.close()

    def _layer_tensors(self, layer: int, names: Sequence[str] | None) -> list:
        return [self.weights.gguf.tensor(layer_tensor_name(layer, n))
                for n in self.weights.layer_names(names)]

    def _layer_file_bytes(self, layer: int, names: Sequence[str] | None) -> int:
        return sum(t.n_bytes for t in self._layer_tensors(layer, names))

    def _read_ahead(self, layer: int, names: Sequence[str] | None) -> None:
        """Read layer `layer`'s bytes into the page cache (on a thread: the reads release
        the interpreter and wait on the disk, not on the cores)."""
        for info in self._layer_tensors(layer, names):
            if len(info.shape) < 3:  # experts: only the selected ones are read, when used
                self.weights.gguf.read_ahead(info.offset, info.n_bytes)

    # -- forward -------------------------------------------------------------------------

    def embed(self, token_ids: list[int]) -> torch.Tensor:
        return input_embeddings(self.weights, token_ids)

    @torch.no_grad()
    def forward(self, inputs: torch.Tensor) -> ForwardRecord:
        """Run all layers on the input embeddings [N, d], recording what the sweep needs."""
        blocks = self.plan(1, inputs.shape[0], forward=True).block_elements
        residuals = [inputs.detach()]
        self.weights.experts_read.clear()  # the experts this prompt's sweeps read, from here
        # A streamed run keeps memory flat in the model's size: its record is spilled too.
        coefficients: list[Coefficients] | SpilledTensors = \
            SpilledTensors(self.device) if blocks is not None else []
        x = residuals[0]
        # c is computed beside the forward pass, from the layer weights already loaded: the
        # zero input through each layer with its just-recorded coefficients replayed and the
        # biases on (the affine maps composed, at 0), never as y − J x.
        constants = [torch.zeros_like(residuals[0])] if has_constant(self.cfg.family) else None
        timer = _SweepTimer(self, "forward", blocks)
        for layer, w in self.layers(range(self.cfg.n_layer), None, "forward", blocks):
            store: Coefficients = {}
            given = self.anchor.layers[layer] if self.anchor is not None else None
            x = block(self.cfg, layer, w, x, self.lin.recording(store, given)).out
            if not bool(torch.isfinite(x).all()):  # an overflow in this dtype, or the file's
                a = self.cfg.arch  # weights or metadata values make it so
                raise GgufjacError(
                    f"{self.weights.gguf.path}: layer {layer}'s output is not finite in "
                    f"{str(self.dtype).removeprefix('torch.')}: check the weights (`ggufjac "
                    f"info` scans them) and the values of {a}.attention.layer_norm_rms_epsilon"
                    f", {a}.rope.freq_base, {a}.rope.scaling.attn_factor; a wider dtype may "
                    "help")
            residuals.append(x)
            if constants is not None:
                constants.append(block(self.cfg, layer, w, constants[-1],
                                       self.lin.replaying(store, constants=True)).out)
            coefficients.append(store)
        timer.done()
        self.release(keep=self.weights.layer_names(self.linear_path))  # all the sweep reads
        out_store: Coefficients = {}
        y = final_norm(self.cfg, self.output_norm, x, self.lin.recording(out_store))
        c = None if constants is None else final_norm(
            self.cfg, self.output_norm, constants[-1],
            self.lin.replaying(out_store, constants=True))
        return ForwardRecord(residuals, coefficients, out_store, y, constants, c)

    def frozen_final_norm(self, residual: torch.Tensor, stream: torch.Tensor) -> torch.Tensor:
        """The final norm of `stream` [N, d] with its scale frozen at `residual`'s values
        (a logit lens's constant: that of the residual after a layer)."""
        store: Coefficients = {}
        final_norm(self.cfg, self.output_norm, residual, self.lin.recording(store))
        return final_norm(self.cfg, self.output_norm, stream,
                          self.lin.replaying(store, constants=True))

    # -- reverse -------------------------------------------------------------------------

    def output_cotangents(self, residual: torch.Tensor, directions: torch.Tensor,
                          position: int = -1, chunk: int | None = None) -> torch.Tensor:
        """Directions [m, d] on the final-norm output at `position` of a residual stream
        [N, d] -> cotangents [m, N, d] on that stream (the norm's scale frozen at its value).
        Filled `chunk` directions at a time, so no second [m, N, d] temporary exists."""
        store: Coefficients = {}
        with torch.no_grad():
            final_norm(self.cfg, self.output_norm, residual, self.lin.recording(store))
        x = residual.detach().requires_grad_(True)
        with torch.enable_grad():
            y = final_norm(self.cfg, self.output_norm, x, self.lin.replaying(store, False))[position]
            result = residual.new_empty((directions.shape[0], *residual.shape))
            return _batched_vjp(y, x, directions, chunk or max_chunk(residual.shape[0]), result)

    def layer_vjp(self, layer: int, w: LayerWeights, record: ForwardRecord,
                  cotangents: torch.Tensor, part: str = "out", chunk: int | None = None
                  ) -> torch.Tensor:
        """Cotangents [m, N, d] on layer `layer`'s output `part` ('out', 'attn', 'mlp') ->
        cotangents on its input, `chunk` directions at a time (in place, row by row)."""
        if part == "out" and self.mlp_as_matrix(cotangents.shape[0]):
            return self._split_layer_vjp(layer, w, record, cotangents,
                                         chunk or cotangents.shape[0])
        if part == "out" and cotangents.shape[1] > 1 and not torch.any(cotangents[:, :-1]):
            return self._last_row_layer_vjp(layer, w, record, cotangents,
                                            chunk or cotangents.shape[0])
        lin = self.lin.replaying(record.coefficients[layer], values=False)
        result = cotangents if part == "out" else torch.empty_like(cotangents)
        return _pull_back_batched(lambda x: getattr(block(self.cfg, layer, w, x, lin), part),
                                  record.residuals[layer], cotangents,
                                  chunk or cotangents.shape[0], result)

    def mlp_as_matrix(self, n_directions: int) -> bool:
        """Whether `n_directions` cotangents cross a layer's MLP more cheaply through its
        per-position matrices than by autograd through both projections (`sweep_flop`)."""
        return mlp_as_matrix(dims_of(self.cfg), n_directions)

    def _matrix_rows(self) -> int:
        """Cotangent rows multiplied by one MLP matrix at a time (a [rows, d] temporary)."""
        return max(1, 2**20 // self.cfg.d_model)

    def _matrix_positions(self) -> int:
        """Positions whose MLP matrices are formed at once (`mlp_branch_matrices`: one
        product [d, d_ff chunk] @ [d_ff chunk, positions · d] per chunk of d_ff, and the
        [d, positions, d] result), within MLP_MATRIX_ELEMENTS values."""
        d = self.cfg.d_model
        return max(1, MLP_MATRIX_ELEMENTS // (d * (d + min(self.cfg.d_ff, MLP_MATRIX_FFN_CHUNK))))

    def _work_buffer(self, name: str, n: int) -> torch.Tensor:
        """A 1-D buffer of n elements of the engine's dtype, kept between layers."""
        return self._work.get(name, n, self.dtype, self.device)

    def _split_layer_vjp(self, layer: int, w: LayerWeights, record: ForwardRecord,
                         g: torch.Tensor, chunk: int) -> torch.Tensor:
        """layer_vjp of the whole layer, in place: out = mid + mlp(mid) is pulled back to mid
        through the MLP's matrix at each position, then mid = x + attn(x) to x by batched
        VJPs (the attention mixes positions, and its projections are no cheaper as matrices).
        The matrices of several positions are formed by one product (`mlp_branch_matrices`):
        the per-position GLU coefficients then scale contiguous rows of W_in, where one
        matrix at a time scaled a strided column slice of W_down (11 % of the sweep on Gemma
        3 270M, docs/benchmarks.md), and one Python step serves every position."""
        store = record.coefficients[layer]
        rows = max(chunk, self._matrix_rows())
        # the top layer: only the last position has cotangents
        wanted = [p for p in range(g.shape[1]) if torch.any(g[:, p])]
        group = self._matrix_positions()
        for first in range(0, len(wanted), group):
            positions = wanted[first:first + group]
            k = mlp_branch_matrices(self.cfg, w, store, self.lin.gate_path, positions,
                                    MLP_MATRIX_FFN_CHUNK, work=self._work_buffer)
            for i, p in enumerate(positions):
                for s in range(0, g.shape[0], rows):
                    g[s:s + rows, p] += g[s:s + rows, p] @ k[:, i]
            del k
        return self._attention_vjp(layer, w, record, g, chunk)

    def _last_row_layer_vjp(self, layer: int, w: LayerWeights, record: ForwardRecord,
                            g: torch.Tensor, chunk: int) -> torch.Tensor:
        """layer_vjp of a layer whose output cotangents sit on the last position alone (the
        top layer under the output's directions), in place: the MLP mixes no positions, so
        its VJP runs on the last row only; then the attention's, on every row."""
        lin = self.lin.replaying(at_last_position(record.coefficients[layer]), values=False)
        # the last row's cotangents [m, 1, d] (a view: added to in place)
        _pull_back_batched(lambda x: mlp_branch(self.cfg, w, x, lin),
                           record.residuals[layer][-1:], g[:, -1:], chunk, g[:, -1:], add=True)
        return self._attention_vjp(layer, w, record, g, chunk)

    def _attention_vjp(self, layer: int, w: LayerWeights, record: ForwardRecord,
                       g: torch.Tensor, chunk: int) -> torch.Tensor:
        """Cotangents g on mid = x + attn(x) pulled back to x, in place, by batched VJPs
        (the attention mixes positions, and its projections are no cheaper as matrices)."""
        lin = self.lin.replaying(record.coefficients[layer], values=False)
        return _pull_back_batched(lambda x: attention_branch(self.cfg, layer, w, x, lin),
                                  record.residuals[layer], g, chunk, g, add=True)

    def pull_back(self, record: ForwardRecord, cotangents: dict[int, torch.Tensor],
                  to_residual: int = 0, chunk: int | None = None,
                  visit: Callable[[int, LayerWeights, torch.Tensor], None] | None = None
                  ) -> torch.Tensor:
        """Pull cotangents on residual streams back to residual `to_residual` (0: the inputs).

        `cotangents[k]` [m_k, N, d] sits on residuals[k] (k = n_layer: the last layer's
        output). Rows injected at several k are stacked as the sweep passes them (highest k
        first), so one sweep serves many targets; the result has all their rows, [Σ m_k, N, d].
        `visit(layer, weights, g)`, if given, is called with each layer's loaded weights
        and the cotangents g on its output before they are pulled through it (g is
        overwritten afterwards: a visitor copies what it keeps).
        """
        top = max(cotangents)
        g = cotangents[top]
        plan = self.plan(sum(c.shape[0] for c in cotangents.values()), record.inputs.shape[0],
                         record.nbytes(), chunk=chunk)
        order = range(top - 1, to_residual - 1, -1)
        timer = _SweepTimer(self, "reverse", plan.block_elements)
        for layer, w in self.layers(order, self.linear_path, "reverse", plan.block_elements):
            if visit is not None:
                visit(layer, w, g)
            g = self.layer_vjp(layer, w, record, g, chunk=plan.chunk)
            if layer in cotangents and layer != top:
                g = torch.cat((g, cotangents[layer]), dim=0)
        timer.done()
        return g

    def pull_back_output(self, record: ForwardRecord, directions: torch.Tensor,
                         chunk: int | None = None) -> torch.Tensor:
        """Directions [m, d] on the output y (last position) -> directions @ J, [m, N, d]."""
        cot = self.output_cotangents(record.residuals[-1], directions)
        return self.pull_back(record, {self.cfg.n_layer: cot}, chunk=chunk)

    # -- forward through the frozen linear map -------------------------------------------

    @torch.no_grad()
    def push_forward(self, record: ForwardRecord, probes: torch.Tensor,
                     chunk: int | None = None) -> torch.Tensor:
        """Probes [m, N, d] on the input embeddings -> J @ probes, [m, d]: the detached
        network with the record's coefficients replayed is exactly linear (its biases, the
        constant c, left out: `Linearization.replaying`), so running it forward on the probes
        (the linear path's weights only, `chunk` probes at a time) applies J to them. The
        transpose of `pull_back_output`."""
        m, n = probes.shape[0], probes.shape[1]
        plan = self.plan(m, n, record.nbytes(), chunk=chunk, forward=True)
        x = probes.to(self.device, self.dtype, copy=True)
        step = max(1, plan.chunk)
        timer = _SweepTimer(self, "forward J·v", plan.block_elements)
        top = self.cfg.n_layer - 1
        for layer, w in self.layers(range(self.cfg.n_layer), self.linear_path, "J·v",
                                    plan.block_elements):
            store = record.coefficients[layer]
            lin = self.lin.replaying(store)
            if layer == top:  # J's output is the last position's: the top layer's MLP
                last = self.lin.replaying(at_last_position(store))  # runs on that row alone
            for s in range(0, m, step):
                if layer < top:
                    x[s:s + step] = block(self.cfg, layer, w, x[s:s + step], lin).out
                    continue
                # the MLP mixes no positions; the other rows keep stale values, never read
                mid = x[s:s + step, -1:] + attention_branch(self.cfg, layer, w, x[s:s + step],
                                                            lin)[:, -1:]
                x[s:s + step, -1:] = mid + mlp_branch(self.cfg, w, mid, last)
        timer.done()
        lin = self.lin.replaying(record.output_coefficients)
        return final_norm(self.cfg, self.output_norm, x, lin)[:, -1]

    @torch.no_grad()
    def push_forward_residuals(self, record: ForwardRecord, probes: torch.Tensor, top: int,
                               visit: Callable[[int, torch.Tensor], None],
                               held_bytes: int = 0, chunk: int | None = None,
                               plan: MemoryPlan | None = None,
                               zero_before: Sequence[tuple[int, int, int]] | None = None
                               ) -> None:
        """Probes [m, N, d] on the input embeddings pushed through layers 0..`top` of the
        frozen linear map (biases left out), in place: `visit(layer, x)` is called after each
        layer with x [m, N, d], the probes' images on that layer's output residual (at
        `top`, only the last position is computed; its other rows are stale). One pass gives
        every intermediate map at once (layers.py's forward lens). `held_bytes`: memory the
        caller holds besides the record and the probes (the maps being filled); `plan`: the
        plan made for these probes before they were allocated, if the caller made one.
        `zero_before`: blocks (first probe, end probe, position) whose probes are zero at
        the positions before `position`, in increasing position order: attention is causal,
        so those rows stay zero through every layer and are skipped (rows `position`.. run
        with the coefficients cut to them), unless an anchor's roundings are replayed.

        As in the reverse sweep, the MLP is crossed by its per-position matrices where that
        costs less (`mlp_as_matrix`): m·d² per position once K is formed, against 2·m·d·d_ff."""
        m, n = probes.shape[0], probes.shape[1]
        matrix = self.mlp_as_matrix(m)
        plan = plan or self.plan(m, n, record.nbytes() + held_bytes, chunk=chunk,
                                 forward=not matrix)
        x, step = probes, max(1, plan.chunk)
        rows = max(step, self._matrix_rows())
        blocks = list(zero_before or [(0, m, 0)])
        timer = _SweepTimer(self, "forward maps", plan.block_elements)
        for layer, w in self.layers(range(top + 1), self.linear_path, "forward maps",
                                    plan.block_elements):
            store = record.coefficients[layer]
            cut = not any(is_rounding_site(site) for site in store)
            last = self.lin.replaying(at_last_position(store))
            for first, end, position in blocks:
                position = position if cut else 0
                lin = self.lin.replaying(_from_position(store, position))
                for s in range(first, end, step):
                    xs = x[s:min(s + step, end), position:]
                    if layer == top:  # the MLP mixes no positions: the last row alone
                        xs[:, -1:] += attention_branch(self.cfg, layer, w, xs, lin)[:, -1:]
                        if not matrix:
                            xs[:, -1:] += mlp_branch(self.cfg, w, xs[:, -1:], last)
                    elif matrix:
                        xs += attention_branch(self.cfg, layer, w, xs, lin)
                    else:
                        xs.copy_(block(self.cfg, layer, w, xs, lin).out)
            if matrix:  # mid -> mid + K_p mid at each position p, for the probes there
                for p in [n - 1] if layer == top else range(n):
                    reach = max((e for _, e, q in blocks if q <= p or not cut), default=0)
                    if reach == 0:
                        continue
                    k = mlp_branch_matrix(self.cfg, w, store, self.lin.gate_path, p,
                                          MLP_MATRIX_FFN_CHUNK).T
                    for s in range(0, reach, rows):
                        x[s:min(s + rows, reach), p] += x[s:min(s + rows, reach), p] @ k
                    del k
            visit(layer, x)
        timer.done()

    # -- memory --------------------------------------------------------------------------

    def record_bytes(self, n_tokens: int, anchored: bool = False, spilled: bool = False) -> int:
        """Size in memory of the forward record for `n_tokens` (residuals and frozen
        coefficients: the gate path freezes two [N, d_ff] coefficients, the up path one;
        `spilled`: one layer's coefficients, the rest in a file); `anchored`: plus the
        llama.cpp coefficients and rounding ratios an anchor made for this run will hold."""
        cfg, item = self.cfg, torch.empty((), dtype=self.dtype).element_size()
        n, d = n_tokens, cfg.d_model
        # a mixture of experts freezes each selected expert's GLU: k · d_ff_expert per position
        width = cfg.n_expert_used * cfg.d_ff_expert if cfg.n_expert else cfg.d_ff
        ffn = width * (2 if self.lin.gate_path == "gate" else 1)
        per_layer = n * (ffn + cfg.n_head * n + 8)
        held = (1 if spilled else cfg.n_layer) * per_layer + (cfg.n_layer + 2) * n * d
        if has_constant(cfg.family):  # the constant stream
            held += (cfg.n_layer + 2) * n * d
        if anchored:  # in:attn_v, in:ffn_up/gate, v_cache, attn_sum, in:attn_output, in:ffn_down
            held += cfg.n_layer * n * (3 * d + cfg.n_kv_head * cfg.head_dim_v
                                       + 2 * cfg.n_head * cfg.head_dim_v + width)
        return held * item

    def plan(self, n_directions: int, n_tokens: int, record_bytes: int | None = None,
             anchored: bool = False, chunk: int | None = None, forward: bool = False
             ) -> MemoryPlan:
        """How many directions fit in the budget at once, and whether a layer's matrices are
        held whole or streamed in row blocks; refuse a budget that cannot hold one direction
        and one row block. `anchored`: an anchor is still to be made for this run (one
        already made is part of the process's resident memory). `chunk`: directions per
        batched backward, if the caller fixes it. `forward`: the plan of a forward pass.

        Whole layers are held where each matrix is used several times per layer (several
        chunks of directions, or the MLP as per-position matrices) or on a GPU, if they fit;
        otherwise, and for any single pass on CPU, the matrices stream in row blocks."""
        cfg, item = self.cfg, torch.empty((), dtype=self.dtype).element_size()
        on_cpu = self.device.type == "cpu"
        baseline = resident_bytes() if on_cpu else torch.cuda.memory_allocated(self.device)
        budget = self.max_memory
        if budget is None:  # automatic: what is available now, with a margin
            budget = baseline + int(0.7 * available_bytes(self.device))
        result = n_directions * n_tokens * cfg.d_model * item
        # the record: as made (given), or estimated (a streamed forward spills it)
        record_whole = record_bytes if record_bytes is not None else \
            self.record_bytes(n_tokens, anchored)
        record_streamed = record_bytes if record_bytes is not None else \
            self.record_bytes(n_tokens, anchored, spilled=True)
        fixed = baseline + record_whole + result
        matrix = not forward and self.mlp_as_matrix(n_directions)
        if matrix:  # the MLP matrices formed at once and their temporaries
            d, f = cfg.d_model, min(cfg.d_ff, MLP_MATRIX_FFN_CHUNK)
            positions = min(n_tokens, self._matrix_positions())
            fixed += (positions * d * (d + f) + 2 * d * f
                      + min(n_directions, self._matrix_rows()) * d) * item
        width = 2 * cfg.d_ff + 4 * cfg.d_model + 2 * cfg.n_head * max(cfg.head_dim, cfg.head_dim_v)
        per_direction = int(_BACKWARD_TEMPORARIES * n_tokens * width * item)
        limit = min(n_directions, max_chunk(n_tokens, self.device)) if chunk is None else chunk

        whole = max(self.weights.layer_bytes(), 0) * (2 if self.prefetch else 1)
        whole_chunk = min(limit, (budget - fixed - whole) // per_direction)
        several_uses = matrix or (whole_chunk > 0 and whole_chunk < n_directions)
        if self.streaming is False or (self.streaming is None and whole_chunk > 0
                                       and (several_uses or not on_cpu)):
            if whole_chunk < 1:
                raise GgufjacError(
                    f"--max-memory {format_size(budget)} cannot be met with whole layers: this "
                    f"run needs at least {format_size(fixed + whole + per_direction)} (process "
                    f"{format_size(baseline)}, one layer's weights {format_size(whole)}, "
                    f"result {format_size(result)}, one direction {format_size(per_direction)})")
            return MemoryPlan(budget, fixed + whole, per_direction, int(whole_chunk), None)

        fixed += record_streamed - record_whole
        widest = max(self.weights.widest_row(), 1)
        per_value = item + (4 if item != 4 else 0) + 1  # block, float32 scratch, raw copy
        room = budget - fixed - per_direction - _DEQUANTIZE_TEMPORARIES
        block = min(self.block_elements, room // per_value) // widest * widest
        if block < widest:
            need = fixed + per_direction + _DEQUANTIZE_TEMPORARIES + widest * per_value
            raise GgufjacError(
                f"--max-memory {format_size(budget)} cannot be met: this run needs at least "
                f"{format_size(need)} (process {format_size(baseline)}, result "
                f"{format_size(result)}, one direction {format_size(per_direction)}, one row "
                f"of weights {format_size(widest * per_value)})")
        streamed = block * per_value + _DEQUANTIZE_TEMPORARIES
        n = min(limit, (budget - fixed - streamed) // per_direction)
        return MemoryPlan(budget, fixed + streamed, per_direction, int(n), int(block))


@dataclass
class SweepTiming:
    """Where one sweep's time went on the compute thread: `read_s` reading the layers' bytes
    (`bytes_read`; waits for the disk included: what read-ahead did not hide),
    `dequantize_s`, and the rest, `compute_s` (which includes the dequantization done inside
    the compiled products, quantized_products.py)."""

    name: str
    streamed: bool
    wall_s: float
    read_s: float
    bytes_read: int
    dequantize_s: float

    @property
    def compute_s(self) -> float:
        return max(self.wall_s - self.read_s - self.dequantize_s, 0.0)

    def as_dict(self) -> dict:
        return {"sweep": self.name, "streamed": self.streamed, "wall_s": round(self.wall_s, 3),
                "read_s": round(self.read_s, 3), "bytes_read": self.bytes_read,
                "dequantize_s": round(self.dequantize_s, 3),
                "compute_s": round(self.compute_s, 3)}


class _SweepTimer:
    def __init__(self, engine: StreamingEngine, name: str, block_elements: int | None) -> None:
        self.engine, self.name, self.streamed = engine, name, block_elements is not None
        g, w = engine.weights.gguf, engine.weights
        self.start = (time.perf_counter(), g.read_seconds, g.bytes_read, w.dequantize_seconds)

    def done(self) -> None:
        g, w = self.engine.weights.gguf, self.engine.weights
        t, r, b, d = self.start
        self.engine.sweeps.append(SweepTiming(
            self.name, self.streamed, time.perf_counter() - t, g.read_seconds - r,
            g.bytes_read - b, w.dequantize_seconds - d))
