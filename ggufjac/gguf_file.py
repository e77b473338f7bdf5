"""Reading a GGUF file: header, metadata and tensor index, validated, from a memory map.

Why not `gguf.GGUFReader`: it parses every metadata array into numpy objects up front, which
costs ~13 s on a 262k-token vocabulary. Here large arrays stay as (offset, count) until asked
for, and every length, count and offset is checked against the file before it is used, so a
truncated or hostile file raises `GGUFError` naming the field instead of crashing or
allocating without bound. Tensor data is never copied: `tensor_data` returns a read-only
numpy view of the mapped bytes.

A mapped byte past the end of its file cannot be read: the process gets SIGBUS and dies, and
no Python code can catch it. So every read through the mapping first checks that the file
still has the size it had when opened (`GGUFFile.check_intact`), and one shrunk since (by
another process truncating it in place) is refused with one error naming it. What this
cannot catch, a truncation during the read itself, is in docs/safety.md.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, Keys

from .errors import GGUFError

# madvise(MADV_POPULATE_READ) (Linux 5.14+; Python's mmap module names it from 3.13 only)
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ",
                              22 if hasattr(mmap, "MADV_DONTNEED") and os.uname().sysname == "Linux"
                              else None)

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
EAGER_ARRAY_LIMIT = 4096  # arrays longer than this stay lazy (vocabularies, merges)

# GGUF value types: (struct format, byte size) for the fixed-size ones.
_SCALARS: dict[int, tuple[str, int]] = {
    0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
    6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8),
}
_NUMPY_OF_SCALAR = {
    0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
    6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64,
}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor index. `shape` is in GGUF order: ne0 (contiguous) first."""

    name: str
    shape: tuple[int, ...]
    type: GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    n_bytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def torch_shape(self) -> tuple[int, ...]:
        """Row-major shape: a [in, out] GGUF matrix is an [out, in] torch tensor."""
        return tuple(reversed(self.shape))


@dataclass(frozen=True)
class LazyArray:
    """A metadata array left in the file: decoded on demand by `GGUFFile.array`."""

    item_type: int
    count: int
    offset: int  # absolute offset of the first item

    def __len__(self) -> int:
        return self.count


class StringArray:
    """A metadata string array read item by item from the file (the 262k-entry vocabulary
    of Gemma 3 would be ~30 MB of Python strings; this keeps 8 bytes per item)."""

    def __init__(self, file: GGUFFile, arr: LazyArray, key: str) -> None:
        self._file, self._key = file, key
        file.check_intact(key)
        cur = _Cursor(memoryview(file._mmap), str(file.path))
        cur.pos = arr.offset
        starts = np.empty(arr.count, dtype=np.int64)
        for j in range(arr.count):
            starts[j] = cur.pos
            cur.skip_string(f"{key}[{j}]")
        self._starts = starts

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, j: int) -> str:
        self._file.check_intact(self._key)
        cur = _Cursor(memoryview(self._file._mmap), str(self._file.path))
        cur.pos = int(self._starts[j])
        return cur.string(f"{self._key}[{j}]")


class _Cursor:
    """Bounds-checked little-endian reader over the mapped header."""

    def __init__(self, buf: memoryview, path: str) -> None:
        self.buf, self.pos, self.path, self.size = buf, 0, path, len(buf)

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise GGUFError(self.path, what, f"needs {n} bytes at offset {self.pos}, "
                            f"but the file ends at {self.size} (truncated or corrupt)")

    def scalar(self, vtype: int, what: str) -> Any:
        fmt, size = _SCALARS[vtype]
        self.need(size, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return v

    def u32(self, what: str) -> int:
        return self.scalar(4, what)

    def u64(self, what: str) -> int:
        return self.scalar(10, what)

    def string(self, what: str) -> str:
        n = self.u64(f"{what} (string length)")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFError(self.path, what, "string is not valid UTF-8") from None

    def skip_string(self, what: str) -> None:
        n = self.u64(f"{what} (string length)")
        self.need(n, what)
        self.pos += n


def pread_fully(fd: int, view: memoryview, offset: int) -> int:
    """Read into all of `view` from `fd` at `offset` (system calls may return less than
    asked); the bytes read, fewer only where the file ends."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            break
        done += got
    return done


class GGUFFile:
    """A parsed, validated GGUF file. Metadata in `metadata`, tensor index in `tensors`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        p = str(self.path)
        try:
            fd = open(self.path, "rb")
        except OSError as e:
            raise GGUFError(p, "file", f"cannot open: {e.strerror}") from None
        with fd:
            size = os.fstat(fd.fileno()).st_size
            if size < 24:
                raise GGUFError(p, "header", f"file has {size} bytes, too short for a GGUF header")
            self._mmap = mmap.mmap(fd.fileno(), 0, access=mmap.ACCESS_READ)
        self.file_size = size
        self.read_seconds, self.bytes_read = 0.0, 0  # by read_into
        self._fd: int | None = None  # for read_into and read_ahead, opened on first use
        self.metadata: dict[str, Any] = {}
        self.value_types: dict[str, int] = {}  # key -> GGUF value type (gguf's GGUFValueType)
        self.tensors: dict[str, TensorInfo] = {}
        try:
            self._parse()
        except BaseException:
            self.close()
            raise

    # -- parsing -------------------------------------------------------------------------

    def _parse(self) -> None:
        p = str(self.path)
        cur = _Cursor(memoryview(self._mmap), p)
        magic = bytes(cur.buf[0:4])
        if magic != GGUF_MAGIC:
            raise GGUFError(p, "magic", f"expected b'GGUF', found {magic!r} (not a GGUF file)")
        cur.pos = 4
        self.version = cur.u32("version")
        if self.version not in SUPPORTED_VERSIONS:
            hint = " (big-endian file?)" if self.version > 0xFFFF else ""
            raise GGUFError(p, "version", f"expected one of {SUPPORTED_VERSIONS}, found "
                            f"{self.version}{hint}")
        n_tensors = cur.u64("tensor_count")
        n_kv = cur.u64("kv_count")
        # Every KV takes >= 13 bytes, every tensor entry >= 24: bound the counts by the file.
        if n_kv * 13 > self.file_size:
            raise GGUFError(p, "kv_count", f"{n_kv} entries cannot fit in {self.file_size} bytes")
        if n_tensors * 24 > self.file_size:
            raise GGUFError(p, "tensor_count",
                            f"{n_tensors} tensors cannot fit in {self.file_size} bytes")
        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}")
            if key in self.metadata:
                raise GGUFError(p, key, "metadata key appears twice")
            vtype = cur.u32(f"{key} (value type)")
            self.metadata[key] = self._read_value(cur, vtype, key)
            self.value_types[key] = vtype

        align = self.metadata.get(Keys.General.ALIGNMENT, DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or isinstance(align, bool) or align <= 0 \
                or align & (align - 1):
            raise GGUFError(p, Keys.General.ALIGNMENT, f"expected a power of two, found {align!r}")
        self.alignment = align

        infos = []
        for i in range(n_tensors):
            name = cur.string(f"tensor #{i} name")
            n_dims = cur.u32(f"tensor {name!r} n_dims")
            if not 1 <= n_dims <= MAX_DIMS:
                raise GGUFError(p, f"tensor {name!r}", f"n_dims {n_dims} not in 1..{MAX_DIMS}")
            shape = tuple(cur.u64(f"tensor {name!r} dim {d}") for d in range(n_dims))
            ttype = cur.u32(f"tensor {name!r} type")
            offset = cur.u64(f"tensor {name!r} offset")
            infos.append((name, shape, ttype, offset))
        data_start = -(-cur.pos // align) * align
        self.data_start = data_start

        for name, shape, ttype, offset in infos:
            self._add_tensor(name, shape, ttype, offset)

    def _read_value(self, cur: _Cursor, vtype: int, key: str) -> Any:
        if vtype in _SCALARS:
            return cur.scalar(vtype, key)
        if vtype == _STRING:
            return cur.string(key)
        if vtype != _ARRAY:
            raise GGUFError(cur.path, key, f"unknown value type {vtype}")
        item_type = cur.u32(f"{key} (array item type)")
        count = cur.u64(f"{key} (array length)")
        start = cur.pos
        if item_type in _SCALARS:
            size = _SCALARS[item_type][1]
            cur.need(count * size, f"{key} ({count} items)")
            cur.pos += count * size
            arr = LazyArray(item_type, count, start)
        elif item_type == _STRING:
            cur.need(count * 8, f"{key} ({count} strings)")
            for j in range(count):
                cur.skip_string(f"{key}[{j}]")
            arr = LazyArray(item_type, count, start)
        else:
            raise GGUFError(cur.path, key, f"array item type {item_type} is not supported")
        return self._decode_array(arr, key) if count <= EAGER_ARRAY_LIMIT else arr

    def _add_tensor(self, name: str, shape: tuple[int, ...], ttype: int, offset: int) -> None:
        p = str(self.path)
        what = f"tensor {name!r}"
        if name in self.tensors:
            raise GGUFError(p, what, "tensor name appears twice")
        try:
            qtype = GGMLQuantizationType(ttype)
        except ValueError:
            raise GGUFError(p, what, f"unknown tensor type {ttype}") from None
        if qtype not in GGML_QUANT_SIZES:
            raise GGUFError(p, what, f"tensor type {qtype.name} has no known block size")
        block, type_size = GGML_QUANT_SIZES[qtype]
        n = 1
        for s in shape:
            if s <= 0:
                raise GGUFError(p, what, f"dimension {s} in shape {list(shape)} is not positive")
            n *= s
            if n >= 1 << 62:
                raise GGUFError(p, what, f"shape {list(shape)} overflows")
        if shape[0] % block:
            raise GGUFError(p, what, f"first dimension {shape[0]} is not a multiple of the "
                            f"{qtype.name} block size {block}")
        n_bytes = n // block * type_size
        if offset % self.alignment:
            raise GGUFError(p, what, f"offset {offset} is not aligned to {self.alignment}")
        start = self.data_start + offset
        if start + n_bytes > self.file_size:
            raise GGUFError(p, what, f"data [{start}, {start + n_bytes}) lies beyond the end of "
                            f"the file ({self.file_size} bytes) for {qtype.name} {list(shape)}")
        self.tensors[name] = TensorInfo(name, shape, qtype, start, n_bytes)

    def _decode_array(self, arr: LazyArray, key: str) -> list[Any]:
        self.check_intact(key)
        if arr.item_type == _STRING:
            cur = _Cursor(memoryview(self._mmap), str(self.path))
            cur.pos = arr.offset
            return [cur.string(f"{key}[{j}]") for j in range(arr.count)]
        dtype = np.dtype(_NUMPY_OF_SCALAR[arr.item_type]).newbyteorder("<")
        return np.frombuffer(self._mmap, dtype=dtype, count=arr.count, offset=arr.offset).tolist()

    # -- access --------------------------------------------------------------------------

    def array(self, key: str) -> list[Any]:
        """The full metadata array `key` (decoding it now if it was left lazy)."""
        v = self.require(key)
        if isinstance(v, LazyArray):
            return self._decode_array(v, key)
        if not isinstance(v, list):
            raise GGUFError(self.path, key, f"expected an array, found {type(v).__name__}")
        return v

    def string_array(self, key: str) -> StringArray | list[str]:
        """A string array, read item by item when it was left lazy."""
        v = self.require(key)
        if isinstance(v, LazyArray) and v.item_type == _STRING:
            return StringArray(self, v, key)
        return self.array(key)

    def numeric_array(self, key: str) -> np.ndarray:
        """A numeric metadata array as a numpy array (no per-item Python objects)."""
        v = self.require(key)
        if isinstance(v, LazyArray) and v.item_type in _NUMPY_OF_SCALAR:
            self.check_intact(key)
            dtype = np.dtype(_NUMPY_OF_SCALAR[v.item_type]).newbyteorder("<")
            return np.frombuffer(self._mmap, dtype=dtype, count=v.count, offset=v.offset)
        return np.asarray(self.array(key))

    def require(self, key: str, kind: type | tuple[type, ...] | None = None) -> Any:
        """Metadata value `key`; a GGUFError naming the key if it is missing or of the wrong kind."""
        if key not in self.metadata:
            raise GGUFError(self.path, key, "required metadata key is missing")
        v = self.metadata[key]
        if kind is not None and not (isinstance(v, kind) and not isinstance(v, bool)
                                     or (kind is bool and isinstance(v, bool))):
            names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            raise GGUFError(self.path, key, f"expected {names}, found {v!r}")
        return v

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def tensor(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise GGUFError(self.path, f"tensor {name!r}", "required tensor is missing")
        return self.tensors[name]

    def tensor_data(self, name: str) -> np.ndarray:
        """The raw bytes of tensor `name` as a read-only uint8 view of the mapped file."""
        info = self.tensor(name)
        self.check_intact(f"tensor {name!r}")
        return np.frombuffer(self._mmap, dtype=np.uint8, count=info.n_bytes, offset=info.offset)

    def check_intact(self, what: str) -> None:
        """Raise GGUFError if the file is shorter now than when it was opened: its mapped
        bytes past the new end would kill the process when read (SIGBUS), not raise. The
        size is the mapped file's own (fstat of the mapping's descriptor): a file renamed
        over this path is another file, and leaves the mapping intact."""
        if self._mmap is None:
            return
        size = self._mmap.size()
        if size < self.file_size:
            raise GGUFError(self.path, what, f"the file has {size} bytes now but had "
                            f"{self.file_size} when opened: it was truncated while in use")

    def release(self, start: int = 0, n_bytes: int | None = None) -> None:
        """Drop the mapped pages of [start, start + n_bytes) (default: the whole file) from
        this process's memory.

        The pages stay in the page cache (nothing is lost: a later read faults them back in),
        but they stop counting against the process, so streaming through a file larger than
        RAM keeps the resident set at one layer's worth. The kernel may map pages around the
        ones read (fault-around, large page-cache folios) that a tensor's own range does not
        cover: measured on Gemma 3 270M, 14 MB of them after one Jacobian, in 373 runs; the
        whole-file form drops those too.
        """
        if self._mmap is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        if n_bytes is None:
            n_bytes = len(self._mmap) - start
        page = mmap.PAGESIZE
        first = start // page * page
        self._mmap.madvise(mmap.MADV_DONTNEED, first, start + n_bytes - first)

    def read_into(self, start: int, out: np.ndarray) -> np.ndarray:
        """Bytes [start, start + out.nbytes) of the file copied into `out` (a writable uint8
        array) by system calls, not through the mapping: nothing of the file is mapped into
        the process by it, so a streamed row block needs no page faults and no release. The
        time it takes (waits for the disk included) adds to `read_seconds`."""
        t0 = time.perf_counter()
        view = memoryview(out).cast("B")
        done = pread_fully(self._reader(), view, start)
        if done < len(view):
            raise GGUFError(self.path, "file", f"cannot read bytes at offset {start + done}: "
                            "the file ends early (truncated?)")
        self.read_seconds += time.perf_counter() - t0
        self.bytes_read += done
        return out

    def mapped(self, start: int, n_bytes: int, exact: bool = False) -> np.ndarray | None:
        """Bytes [start, start + n_bytes) as a read-only view of the mapping, its pages mapped
        in now (madvise POPULATE_READ: waits for the disk included, in `read_seconds`), so
        that reading them costs no copy and no page faults; `release` them after use. None
        where the system cannot (then `read_into`). `exact`: read these bytes and no others
        (an expert among experts that no token selected): a page missing from the cache
        when it is mapped in makes the kernel read the device's whole read-ahead window
        around it (megabytes: the unselected neighbours), so the range is first asked for
        as it is (posix_fadvise WILLNEED reads just it) and then found in the cache."""
        if self._mmap is None or _MADV_POPULATE_READ is None or n_bytes <= 0:
            return None
        self.check_intact(f"bytes [{start}, {start + n_bytes})")
        t0 = time.perf_counter()
        first = start // mmap.PAGESIZE * mmap.PAGESIZE
        if exact and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._reader(), first, start + n_bytes - first,
                             os.POSIX_FADV_WILLNEED)
        try:
            self._mmap.madvise(_MADV_POPULATE_READ, first, start + n_bytes - first)
        except OSError:  # a kernel older than Linux 5.14
            return None
        self.read_seconds += time.perf_counter() - t0
        self.bytes_read += n_bytes
        return np.frombuffer(self._mmap, dtype=np.uint8, count=n_bytes, offset=start)

    def read_ahead(self, start: int, n_bytes: int, piece: int = 8 << 20) -> None:
        """Read [start, start + n_bytes) so that it is in the page cache when `read_into`
        asks for it (for a thread to call: the reads release the interpreter). Only one
        `piece` of memory is used however long the range, and nothing is mapped. Reading,
        not posix_fadvise(WILLNEED): the kernel's asynchronous read-ahead hid the disk less
        (docs/benchmarks.md)."""
        buf = memoryview(bytearray(min(piece, max(n_bytes, 1))))
        done = 0
        while done < n_bytes:
            got = pread_fully(self._reader(), buf[:min(len(buf), n_bytes - done)], start + done)
            if got == 0:
                break
            done += got

    def _reader(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    @property
    def architecture(self) -> str:
        return self.require(Keys.General.ARCHITECTURE, str)

    def close(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)  # type: ignore[arg-type]
            self._fd = None
        mm = getattr(self, "_mmap", None)
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # numpy views still alive: the map closes when they are collected
            self._mmap = None

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
