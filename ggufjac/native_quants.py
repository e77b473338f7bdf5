"""llama.cpp's own row dequantizers (ggml's type traits, `to_float`), called on CPU tensors.

llama-cpp-python, a dependency, ships ggml's base library; its `ggml_get_type_traits(type)`
hands out each type's `to_float(blocks, floats, n)`: compiled C that writes float32 in one
pass over the bytes, where the torch path (quants.py) makes several passes over temporaries.
Calls through ctypes release the interpreter, so a large tensor is split across threads.

Used only where it is known to give the same float32 values as the torch path (and gguf-py)
element for element: `NativeDequantizer.agrees` checks each type once, on random blocks
through both paths, before the type is used natively (a build whose compiler fused a
multiply and an add into one rounding would differ, and is then not used for that type).
Anything else, no library, or a struct layout that does not match the file format's block
sizes, leaves the torch path in charge. The torch path is handed in by the caller
(quants.py), which this module sits below: it imports nothing of quants.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from .threads import Workers

# Below this many values a tensor is dequantized on the calling thread (a thread hand-off
# costs more than it saves).
PARALLEL_MIN_VALUES = 1 << 16

# The quantized types asked of the library: those the torch path has too (to check against),
# all older than any llama.cpp release that llama-cpp-python's tested range ships (asking it
# for a type it does not know would abort the process).
NATIVE_TYPES = (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K,
                Q.IQ4_NL, Q.IQ4_XS, Q.MXFP4)

# Types younger than the oldest llama.cpp in llama-cpp-python's tested range, asked for only
# when the library names them (`ggml_type_name` answers "NONE" past its last type instead of
# aborting as `ggml_get_type_traits` would), with the name it gives them.
RECENT_TYPES = {Q.MXFP4: b"mxfp4"}

# A reference dequantizer (quants.dequantize_torch): bytes [n_blocks, type_size], type,
# shape -> float32 values.
Reference = Callable[[torch.Tensor, Q, tuple[int, ...]], torch.Tensor]

_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


class _TypeTraits(ctypes.Structure):
    """ggml.h's `struct ggml_type_traits` (stable since ggml split its CPU backend)."""

    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                ("from_float_ref", ctypes.c_void_p)]


def _library_path() -> Path | None:
    """libggml-base inside the installed llama_cpp package (found without importing it)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return None
    here = Path(spec.origin).parent
    for pattern in ("lib/libggml-base.*", "libggml-base.*", "lib/ggml-base.dll", "ggml-base.dll"):
        found = sorted(here.glob(pattern))
        if found:
            return found[0]
    return None


class NativeDequantizer:
    """ggml's `to_float` per type, for the types that pass `agrees`."""

    def __init__(self, library: ctypes.CDLL) -> None:
        get = library.ggml_get_type_traits
        get.restype, get.argtypes = ctypes.POINTER(_TypeTraits), [ctypes.c_int]
        type_name = library.ggml_type_name
        type_name.restype, type_name.argtypes = ctypes.c_char_p, [ctypes.c_int]
        self._functions: dict[Q, ctypes._CFuncPtr] = {}
        for qtype in NATIVE_TYPES:
            if qtype in RECENT_TYPES and type_name(int(qtype)) != RECENT_TYPES[qtype]:
                continue  # a library older than the type: torch's path takes it
            block, type_size = GGML_QUANT_SIZES[qtype]
            traits = get(int(qtype)).contents
            if (traits.blck_size, traits.type_size) != (block, type_size) or \
                    not traits.is_quantized or not traits.to_float:
                continue  # plain floats, or a layout we do not know: left to torch
            self._functions[qtype] = _TO_FLOAT(traits.to_float)
        self._checked: dict[Q, bool] = {}
        self._workers = Workers("ggufjac-dequantize")

    def supports(self, qtype: Q, reference: Reference) -> bool:
        """Whether `qtype` is dequantized here: ggml has it, and its values equal
        `reference`'s (checked once per type, with the first reference given)."""
        if qtype not in self._functions:
            return False
        if qtype not in self._checked:
            self._checked[qtype] = self.agrees(qtype, reference)
        return self._checked[qtype]

    def agrees(self, qtype: Q, reference: Reference, n_blocks: int = 256) -> bool:
        """Whether ggml's values equal `reference`'s, bit for bit (NaN where NaN), on
        random bytes read as blocks of `qtype`."""
        block, type_size = GGML_QUANT_SIZES[qtype]
        rng = np.random.default_rng(int(qtype))
        blocks = torch.from_numpy(rng.integers(0, 256, size=(n_blocks, type_size),
                                               dtype=np.uint8))
        ours = reference(blocks, qtype, (n_blocks * block,))
        theirs = torch.empty(n_blocks * block, dtype=torch.float32)
        self.dequantize(blocks, qtype, theirs, 1)
        same = (ours.view(torch.int32) == theirs.view(torch.int32)) | (ours.isnan() & theirs.isnan())
        return bool(same.all())

    def dequantize(self, blocks: torch.Tensor, qtype: Q, out: torch.Tensor,
                   threads: int) -> None:
        """Contiguous CPU bytes `blocks` [n_blocks, type_size] -> float32 into contiguous
        `out` (as many values), on `threads` threads."""
        fn = self._functions[qtype]
        block, type_size = GGML_QUANT_SIZES[qtype]
        n_blocks = blocks.numel() // type_size
        src, dst = blocks.data_ptr(), out.data_ptr()
        if threads <= 1 or n_blocks * block < PARALLEL_MIN_VALUES:
            fn(src, dst, n_blocks * block)
            return
        step = -(-n_blocks // threads)
        self._workers.run(fn, [(src + s * type_size, dst + s * block * 4,
                                min(step, n_blocks - s) * block)
                               for s in range(0, n_blocks, step)])


@functools.cache
def native() -> NativeDequantizer | None:
    """The native dequantizer, or None (no library, or GGUFJAC_DEQUANTIZE=torch)."""
    if os.environ.get("GGUFJAC_DEQUANTIZE", "").lower() == "torch":
        return None
    path = _library_path()
    if path is None:
        return None
    try:
        return NativeDequantizer(ctypes.CDLL(str(path)))
    except (OSError, AttributeError) as e:
        print(f"ggufjac: note: llama.cpp's dequantizers not used ({path}: {e}); torch's are",
              file=sys.stderr)
        return None
