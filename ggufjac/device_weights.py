"""Quantized weights held in a device's memory, and the staged reads that put them there.

On a GPU the sweeps' arithmetic is a fraction of a second even at 70B; what bounds a run is
getting the layers' bytes to the device (docs/benchmarks.md, "On one GPU"). So the file's
quantized bytes are read once, sequentially, into page-locked staging buffers in large
chunks, each chunk's upload overlapped with the read of the next (`StagedReader`), and kept
in device memory (`plan_residency` says which tensors fit the budget): every sweep, and
every chunk of output directions, then dequantizes layer by layer from device memory.
Tensors that do not fit are read at each use by the same staged reads, overlapped with the
compute by the engine's prefetch, never through page faults on the file's mapping.

On a CPU the same code runs with plain buffers, the "upload" a copy into the destination
tensor (so the resident path can be tested, and equals the mapped one, on any machine).

Imports only the file layer: weights.py builds on this module.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from .errors import GGUFError, GgufjacError
from .gguf_file import GGUFFile, TensorInfo, pread_fully
from .layout import layer_of_tensor
from .units import format_size, parse_size

# Bytes per staged read: large enough that each read is one long sequential request to the
# disk (the kernel's read-ahead then keeps it busy) and each upload is a transfer at the
# bus's rate; two such buffers are held (double buffering).
DEFAULT_CHUNK_BYTES = 64 << 20
# Holes between two tensors' bytes (alignment padding) up to this size are read through, so
# that a run of tensors is one sequential read.
MAX_HOLE_BYTES = 1 << 16
# Of the device budget, the share kept for the sweeps' working memory (J, the record, the
# batched directions) on top of the dequantized layers: the rest may hold quantized weights.
# A 70B Q4_K_M file (42.5 GB) is then held whole in 60 GB, with 9 GB for J (4.3 GB at 16
# tokens) and the batches; the engine's plan sizes the batches in what is left.
WORKING_SHARE = 0.15
# Without --max-gpu-memory: this share of the device's free memory is the budget.
FREE_SHARE = 0.9
# --matmul-precision: float32 (exact, the default), tf32 (float32 matmuls with TF32 inputs
# on tensor cores), bf16 (matmuls in bfloat16 under torch.autocast, accumulated in float32).
MATMUL_PRECISIONS = ("float32", "tf32", "bf16")


def parse_gpu_memory(text: str) -> int:
    """'24GB', '80GiB' -> bytes; anything else, or zero, is one error naming the option."""
    try:
        n = parse_size(text)
    except GgufjacError:
        raise GgufjacError(f"--max-gpu-memory {text!r}: expected a size such as 24GB, "
                           "80GiB or 512MiB") from None
    if n <= 0:
        raise GgufjacError(f"--max-gpu-memory {text!r}: the budget must be more than 0 bytes")
    return n


def device_budget(device: torch.device, given: int | None) -> int:
    """The device memory budget: `given`, or FREE_SHARE of what is free now (plus what this
    process already holds there); refused where the device has less than `given`."""
    if device.type != "cuda":
        if given is None:
            raise GgufjacError("a device memory budget is needed for weights held in memory "
                               "on the CPU")
        return given
    free, total = torch.cuda.mem_get_info(device)
    if given is not None and given > total:
        raise GgufjacError(f"--max-gpu-memory {format_size(given)}: the device "
                           f"{torch.cuda.get_device_name(device)} has {format_size(total)}")
    held = torch.cuda.memory_allocated(device)
    return given if given is not None else held + int(FREE_SHARE * free)


# -- staged reads ---------------------------------------------------------------------------


@dataclass
class Span:
    """Bytes [offset, offset + dest.numel()) of the file, for tensor `name`, go into `dest`
    (a 1-D uint8 tensor on the device)."""

    name: str
    offset: int
    dest: torch.Tensor

    @property
    def end(self) -> int:
        return self.offset + self.dest.numel()


@dataclass
class ReadStats:
    """What staged reads did: bytes read from the file, seconds waiting for them in the
    reader thread, and the wall time of the reads with their uploads."""

    bytes_read: int = 0
    read_seconds: float = 0.0
    wall_seconds: float = 0.0

    @property
    def rate(self) -> float:
        """Bytes per second, reads and uploads together."""
        return self.bytes_read / self.wall_seconds if self.wall_seconds > 0 else 0.0


class StagedReader:
    """Sequential reads of a file's byte ranges into two staging buffers of `chunk_bytes`
    (page-locked on CUDA), each chunk uploaded on a copy stream while a thread reads the next
    one into the other buffer. Any chunk size works with any tensor boundaries: a chunk may
    hold the end of one tensor and the start of the next, or a piece of one."""

    def __init__(self, gguf: GGUFFile, device: torch.device | str,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        if chunk_bytes < 1:
            raise GgufjacError(f"staging chunks must hold at least one byte, not {chunk_bytes}")
        self.gguf, self.device = gguf, torch.device(device)
        self.chunk_bytes = chunk_bytes
        self.cuda = self.device.type == "cuda"
        self.stats = ReadStats()
        self._buffers: list[torch.Tensor] | None = None
        self._uploaded: list[torch.cuda.Event | None] = [None, None]
        self._stream: torch.cuda.Stream | None = None
        self._thread: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()  # one read at a time (the engine's prefetch thread,
        # the compute thread reading an expert)

    def _setup(self) -> list[torch.Tensor]:
        if self._buffers is None:
            self._buffers = [torch.empty(self.chunk_bytes, dtype=torch.uint8,
                                         pin_memory=self.cuda) for _ in range(2)]
            if self.cuda:
                self._stream = torch.cuda.Stream(self.device)
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="ggufjac-staged-read")
        return self._buffers

    def close(self) -> None:
        """Free the staging buffers and the reader thread (a later read makes them again)."""
        if self._thread is not None:
            self._thread.shutdown(wait=True)
        self._buffers, self._thread, self._stream = None, None, None
        self._uploaded = [None, None]

    def read(self, spans: Sequence[Span]) -> None:
        """Fill every span's `dest` with its bytes of the file. The spans are read in file
        order, runs of them (separated by holes of at most MAX_HOLE_BYTES) as one sequential
        read; on return the bytes are in place for work queued on the current stream."""
        if not spans:
            return
        with self._lock:
            t0 = time.perf_counter()
            self._read(sorted(spans, key=lambda s: s.offset))
            self.stats.wall_seconds += time.perf_counter() - t0

    def read_tensor(self, info: TensorInfo, dest: torch.Tensor | None = None,
                    first_byte: int = 0, n_bytes: int | None = None) -> torch.Tensor:
        """Bytes [first_byte, first_byte + n_bytes) of tensor `info` (default: all of it) on
        the device, in `dest` (1-D uint8, at least that long) or fresh memory."""
        n = info.n_bytes - first_byte if n_bytes is None else n_bytes
        if dest is None:
            dest = torch.empty(n, dtype=torch.uint8, device=self.device)
        dest = dest[:n]
        self.read([Span(info.name, info.offset + first_byte, dest)])
        return dest

    def _chunks(self, spans: list[Span]) -> Iterator[tuple[int, int, list[Span]]]:
        """(file offset, bytes, spans overlapping it) of each chunk to read, in order."""
        run_start, run_end, members = spans[0].offset, spans[0].end, [spans[0]]
        runs = []
        for s in spans[1:]:
            if s.offset - run_end <= MAX_HOLE_BYTES:
                run_end = max(run_end, s.end)
                members.append(s)
            else:
                runs.append((run_start, run_end, members))
                run_start, run_end, members = s.offset, s.end, [s]
        runs.append((run_start, run_end, members))
        for start, end, members in runs:
            for pos in range(start, end, self.chunk_bytes):
                n = min(self.chunk_bytes, end - pos)
                yield pos, n, [s for s in members if s.offset < pos + n and s.end > pos]

    def _fill(self, k: int, offset: int, n: int, spans: list[Span]) -> float:
        """Read [offset, offset + n) into buffer k % 2 once its previous upload is done (on
        the reader thread); the seconds the read took."""
        buffers = self._buffers
        assert buffers is not None
        event = self._uploaded[k % 2]
        if event is not None:
            event.synchronize()
        t0 = time.perf_counter()
        view = memoryview(buffers[k % 2].numpy()).cast("B")[:n]
        done = pread_fully(self.gguf._reader(), view, offset)
        if done < n:
            missing = offset + done
            owner = next((s.name for s in spans if s.offset <= missing < s.end), spans[0].name)
            raise GGUFError(self.gguf.path, f"tensor {owner!r}",
                            f"the file ends at byte {missing}, inside this tensor's bytes "
                            f"(truncated? it had {self.gguf.file_size} bytes when opened)")
        return time.perf_counter() - t0

    def _read(self, spans: list[Span]) -> None:
        self.gguf.check_intact(f"tensor {spans[0].name!r}")
        buffers = self._setup()
        thread = self._thread
        assert thread is not None
        chunks = list(self._chunks(spans))
        pending = thread.submit(self._fill, 0, *chunks[0])
        compute = torch.cuda.current_stream(self.device) if self.cuda else None
        if self._stream is not None:  # the destinations may be fresh on the compute stream
            self._stream.wait_stream(compute)
        try:
            for k, (offset, n, members) in enumerate(chunks):
                self.stats.read_seconds += pending.result()
                self.stats.bytes_read += n
                if k + 1 < len(chunks):  # the next read, while this chunk uploads
                    pending = thread.submit(self._fill, k + 1, *chunks[k + 1])
                self._upload(buffers[k % 2], offset, n, members, k % 2)
        except BaseException:
            if not pending.done():
                with contextlib.suppress(BaseException):
                    pending.result()
            raise
        if self._stream is not None:  # the compute stream uses the bytes after the uploads
            compute.wait_stream(self._stream)

    def _upload(self, buffer: torch.Tensor, offset: int, n: int, spans: list[Span],
                slot: int) -> None:
        """The chunk's bytes into each overlapping span's destination."""
        stream = self._stream
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for s in spans:
                lo, hi = max(s.offset, offset), min(s.end, offset + n)
                s.dest[lo - s.offset:hi - s.offset].copy_(buffer[lo - offset:hi - offset],
                                                          non_blocking=stream is not None)
                if stream is not None:
                    s.dest.record_stream(stream)
            if stream is not None:
                event = torch.cuda.Event()
                event.record(stream)
                self._uploaded[slot] = event


# -- which tensors stay resident ------------------------------------------------------------


VOCABULARY_TABLES = ("token_embd.weight", "output.weight")


@dataclass
class ResidencyPlan:
    """Which tensors' quantized bytes a device holds: `budget` less `reserve` (the sweeps'
    working memory) is `room`; small global tensors first, then whole layers in order (the
    first `len(resident_layers)`), then the vocabulary tables where room remains."""

    budget: int
    reserve: int
    resident: list[str] = field(default_factory=list)
    streamed: list[str] = field(default_factory=list)
    resident_layers: list[int] = field(default_factory=list)
    resident_bytes: int = 0

    @property
    def room(self) -> int:
        return max(self.budget - self.reserve, 0)

    @property
    def everything(self) -> bool:
        return not self.streamed

    def summary(self) -> str:
        layers = f"{len(self.resident_layers)} layers" if self.resident_layers else "no layer"
        rest = "" if self.everything else f", {len(self.streamed)} tensors streamed"
        return (f"{format_size(self.resident_bytes)} of quantized weights on the device "
                f"({layers}{rest}; budget {format_size(self.budget)}, "
                f"{format_size(self.reserve)} kept for the sweeps)")


def plan_residency(tensors: dict[str, TensorInfo], budget: int, reserve: int) -> ResidencyPlan:
    """The tensors of `tensors` whose bytes fit in `budget` − `reserve`, in this order: the
    global tensors other than the vocabulary tables (norms, rope factors), each layer whole
    (layer 0 first, stopping at the first that does not fit: the resident layers are a
    prefix), then token_embd and output, each if it fits what is left."""
    plan = ResidencyPlan(budget, reserve)
    room = plan.room
    layers: dict[int, list[TensorInfo]] = {}
    small, vocabulary = [], []
    for info in tensors.values():
        layer = layer_of_tensor(info.name)
        if layer is not None:
            layers.setdefault(layer, []).append(info)
        elif info.name in VOCABULARY_TABLES:
            vocabulary.append(info)
        else:
            small.append(info)

    def take(group: list[TensorInfo]) -> bool:
        nonlocal room
        size = sum(t.n_bytes for t in group)
        if size > room:
            plan.streamed.extend(t.name for t in group)
            return False
        room -= size
        plan.resident_bytes += size
        plan.resident.extend(t.name for t in group)
        return True

    for info in small:
        take([info])
    fits = True
    for layer in sorted(layers):
        if fits and take(layers[layer]):
            plan.resident_layers.append(layer)
        else:
            fits = False
            if layers[layer][0].name not in plan.streamed:
                plan.streamed.extend(t.name for t in layers[layer])
    for info in sorted(vocabulary, key=lambda t: t.n_bytes):
        take([info])
    return plan


def working_reserve(budget: int, dequantized_layer_bytes: int, layer_sets: int = 2) -> int:
    """Device memory kept out of the weights' room: `layer_sets` layers dequantized (two
    with prefetching) and WORKING_SHARE of the budget for J, the record and the batches."""
    return layer_sets * dequantized_layer_bytes + int(WORKING_SHARE * budget)


def load_resident(gguf: GGUFFile, plan: ResidencyPlan, device: torch.device | str,
                  chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                  reader: StagedReader | None = None) -> dict[str, torch.Tensor]:
    """{name: its bytes on the device (1-D uint8)} for the plan's resident tensors, read in
    one sequential pass of staged chunks."""
    reader = reader or StagedReader(gguf, device, chunk_bytes)
    out = {name: torch.empty(gguf.tensor(name).n_bytes, dtype=torch.uint8, device=device)
           for name in plan.resident}
    reader.read([Span(name, gguf.tensor(name).offset, t) for name, t in out.items()])
    if reader.cuda:
        torch.cuda.current_stream(reader.device).synchronize()
    return out


# -- matmul precision ------------------------------------------------------------------------


def check_matmul_precision(precision: str, dtype: torch.dtype) -> None:
    if precision not in MATMUL_PRECISIONS:
        raise GgufjacError(f"--matmul-precision {precision!r}: choose from "
                           + ", ".join(MATMUL_PRECISIONS))
    if precision != "float32" and dtype != torch.float32:
        raise GgufjacError(f"--matmul-precision {precision} lowers float32 matmuls: it needs "
                           f"--dtype float32, not {str(dtype).removeprefix('torch.')}")


@contextlib.contextmanager
def matmul_precision(precision: str, device: torch.device | str) -> Iterator[None]:
    """Run the block with float32 matmuls at `precision`: float32 (as given), tf32 (torch's
    'high' float32 matmul precision: TF32 tensor cores on a GPU that has them), or bf16
    (torch.autocast to bfloat16 on `device`: matmul inputs rounded to bfloat16, products
    accumulated in float32). The previous setting is restored afterwards. SETTINGS says the
    precision while the block runs: processes that work for this one (Ray workers) are
    started with it."""
    device = torch.device(device)
    recorded = SETTINGS.matmul_precision
    SETTINGS.matmul_precision = precision
    try:
        if precision == "float32":
            yield
        elif precision == "tf32":
            before = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision("high")
            try:
                yield
            finally:
                torch.set_float32_matmul_precision(before)
        else:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                yield
    finally:
        SETTINGS.matmul_precision = recorded


# -- this process's settings ------------------------------------------------------------------


@dataclass
class DeviceSettings:
    """How models opened on a CUDA device hold their weights (api.open_model's defaults;
    the command line sets them from --max-gpu-memory), and the float32 matmuls' precision
    (`matmul_precision` sets it for its block; the command line's --matmul-precision)."""

    hold_weights: bool = True
    max_gpu_memory: int | None = None
    matmul_precision: str = "float32"


SETTINGS = DeviceSettings()
