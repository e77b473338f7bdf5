"""Products with quantized weights that never dequantize them whole: x @ W.T and g @ W with
W's rows given as their raw bytes (Q4_K, Q6_K, Q8_0), float32 on CPU.

The kernels (_quantized_products.c, an optional compiled extension) dequantize 256 values of
a few rows at a time into registers and L1 cache and multiply them at once, where the torch
path writes a row block's float32 values to memory and a BLAS product reads them back: with a
few tokens that traffic, not the arithmetic, bounds a streamed sweep (tools/bench_blocks.py
measures both). Each weight is the same float32 value the torch path dequantizes (checked
once per type on random blocks before it is used, `agrees`); only the order of the sums
differs from a BLAS product.

Used by blocked.linear for matrices streamed from the file (weights.StreamedMatrix) when
`supports` says so; GGUFJAC_FUSED_PRODUCTS=0 turns them off (the dequantize-then-multiply
path then runs, as it does for other types, dtypes and devices).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from .threads import Workers

QK = 256  # values per kernel step: columns split between threads fall on these
TYPES = (Q.Q4_K, Q.Q6_K, Q.Q8_0)
_F16_SCALES = {Q.Q4_K: (0, 2), Q.Q6_K: (208,), Q.Q8_0: (0,)}  # byte offsets in a block
# Below this many weights a product runs on the calling thread alone (a hand-off costs more).
PARALLEL_MIN_VALUES = 1 << 16

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


class _Kernels:
    def __init__(self, library: ctypes.CDLL) -> None:
        self.forward_fn = library.quantized_forward
        self.forward_fn.restype = ctypes.c_int
        self.forward_fn.argtypes = [ctypes.c_int, _PTR, _I64, _I64, _I64, _I64, _PTR, _I64,
                                    _I64, _PTR, _I64]
        self.transposed_fn = library.quantized_transposed
        self.transposed_fn.restype = ctypes.c_int
        self.transposed_fn.argtypes = [ctypes.c_int, _PTR, _I64, _I64, _I64, _I64, _PTR, _I64,
                                       _I64, _PTR, _I64, ctypes.c_int]
        self.error_fn = library.quantized_error
        self.error_fn.restype, self.error_fn.argtypes = ctypes.c_char_p, [ctypes.c_int]
        self.variant_fn, self.use_variant_fn = library.quantized_variant, \
            library.quantized_use_variant
        self.variant_fn.restype = self.use_variant_fn.restype = ctypes.c_int
        self.use_variant_fn.argtypes = [ctypes.c_int]
        self.workers = Workers("ggufjac-products")
        self.checked: dict[Q, bool] = {}


@functools.cache
def _kernels() -> _Kernels | None:
    if os.environ.get("GGUFJAC_FUSED_PRODUCTS", "1") == "0":
        return None
    spec = importlib.util.find_spec("ggufjac._quantized_products")
    if spec is None or spec.origin is None:
        return None
    try:
        return _Kernels(ctypes.CDLL(spec.origin))
    except (OSError, AttributeError):
        return None


def available() -> bool:
    """Whether the compiled kernels are here (and not turned off)."""
    return _kernels() is not None


# The instruction sets the kernels are compiled for, by the extension's numbering.
VARIANTS = ("baseline", "avx2", "avx512")


def variant() -> str:
    """The kernels' instruction set in use (the machine's best unless `use_variant`)."""
    k = _kernels()
    assert k is not None
    return VARIANTS[k.variant_fn()]


def use_variant(name: str) -> str:
    """Use the kernels compiled for `name` from now on, or the machine's best if it lacks
    that instruction set; returns the one in use (for tests and benchmarks)."""
    k = _kernels()
    assert k is not None
    k.checked.clear()
    return VARIANTS[k.use_variant_fn(VARIANTS.index(name))]


def supports(qtype: Q, cols: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether products with a matrix of `qtype` and `cols` columns, in `dtype` on `device`,
    go through the kernels (which step through a row QK values at a time)."""
    k = _kernels()
    if k is None or dtype != torch.float32 or device.type != "cpu" or qtype not in TYPES \
            or cols % QK:
        return False
    if qtype not in k.checked:
        k.checked[qtype] = agrees(qtype)
    return k.checked[qtype]


def agrees(qtype: Q, n_rows: int = 4) -> bool:
    """Whether both kernels' weights equal the torch path's on random blocks: multiplied by
    the identity (x @ W.T with x = I, and I @ W), each product is one weight times 1 plus
    zeros, exact."""
    from .quants import dequantize_torch

    block, type_size = GGML_QUANT_SIZES[qtype]
    cols = QK
    rng = np.random.default_rng(int(qtype))
    raw = rng.integers(0, 256, size=(n_rows * cols // block, type_size), dtype=np.uint8)
    for offset in _F16_SCALES[qtype]:  # finite scales (an infinite weight times 0 is NaN)
        raw[:, offset + 1] &= 0x3B  # the high byte: exponent at most 14
    raw = raw.reshape(n_rows, -1)
    raw_t = torch.from_numpy(raw)
    reference = dequantize_torch(raw_t, qtype, (n_rows, cols))
    forward = product(torch.eye(cols), raw_t, qtype, cols).T
    transposed = transposed_product(torch.eye(n_rows), raw_t, qtype, cols)
    # (a weight -0.0 comes out as +0.0: 0 + -0.0)
    return bool((forward == reference).all() and (transposed == reference).all())


def _parts(n_values: int, units: int) -> int:
    """How many threads share a product of `n_values` weights split in `units` pieces."""
    return max(1, min(torch.get_num_threads(), units, n_values // PARALLEL_MIN_VALUES))


def _check(a: torch.Tensor, width: int, raw: torch.Tensor, qtype: Q, cols: int) -> None:
    """The C code reads where it is told: refuse shapes and types it would read past."""
    block, type_size = GGML_QUANT_SIZES[qtype]
    if qtype not in TYPES or cols % QK or raw.dtype != torch.uint8 or raw.dim() != 2 \
            or raw.shape[1] != cols // block * type_size or not raw.is_contiguous() \
            or raw.device.type != "cpu" or a.dtype != torch.float32 or a.dim() != 2 \
            or a.shape[1] != width or a.device.type != "cpu":
        raise ValueError(f"no quantized product of {a.dtype} {list(a.shape)} ({a.device}) with "
                         f"{qtype.name} bytes {raw.dtype} {list(raw.shape)} for {cols} columns")


def _raise_for(codes: list[int], kernel: str, qtype: Q, rows: int, cols: int,
               n_tok: int) -> None:
    """One error for the first part the C code refused (it wrote nothing for that part)."""
    code = next((c for c in codes if c), 0)
    if not code:
        return
    k = _kernels()
    assert k is not None
    problem = k.error_fn(code).decode()
    if code == -1:
        raise MemoryError(f"quantized {kernel} product: {problem}")
    raise ValueError(f"quantized {kernel} product of {qtype.name} [{rows}, {cols}] with "
                     f"{n_tok} tokens refused by the kernel: {problem}")


def product(x: torch.Tensor, raw: torch.Tensor, qtype: Q, cols: int) -> torch.Tensor:
    """x [T, cols] @ W.T -> [T, rows], W [rows, cols] given by its bytes `raw` [rows, row bytes]
    (uint8, contiguous). x float32 on CPU."""
    k = _kernels()
    assert k is not None
    _check(x, cols, raw, qtype, cols)
    x = x.contiguous()
    rows, n_tok = raw.shape[0], x.shape[0]
    out = torch.empty((n_tok, rows), dtype=torch.float32)
    step = -(-rows // _parts(rows * cols, rows))
    codes = k.workers.run(k.forward_fn, [
        (int(qtype), raw.data_ptr(), cols, rows, r, min(rows, r + step), x.data_ptr(), n_tok,
         cols, out.data_ptr(), rows) for r in range(0, rows, step)])
    _raise_for(codes, "forward", qtype, rows, cols, n_tok)
    return out


def transposed_product(g: torch.Tensor, raw: torch.Tensor, qtype: Q, cols: int,
                       add_to: torch.Tensor | None = None) -> torch.Tensor:
    """g [T, rows] @ W -> [T, cols], W as in `product`; `add_to`: added into that tensor
    (contiguous float32 [T, cols]) instead of a fresh one."""
    k = _kernels()
    assert k is not None
    _check(g, raw.shape[0], raw, qtype, cols)
    g = g.contiguous()
    rows, n_tok = raw.shape[0], g.shape[0]
    out = torch.empty((n_tok, cols), dtype=torch.float32) if add_to is None else add_to
    if not (out.is_contiguous() and out.shape == (n_tok, cols) and out.dtype == torch.float32):
        raise ValueError(f"cannot add a [{n_tok}, {cols}] float32 product into {out.dtype} "
                         f"{list(out.shape)} (contiguous: {out.is_contiguous()})")
    blocks = cols // QK
    step = -(-blocks // _parts(rows * cols, blocks)) * QK
    codes = k.workers.run(k.transposed_fn, [
        (int(qtype), raw.data_ptr(), cols, rows, c, min(cols, c + step), g.data_ptr(), n_tok,
         rows, out.data_ptr(), cols, int(add_to is not None)) for c in range(0, cols, step)])
    _raise_for(codes, "transposed", qtype, rows, cols, n_tok)
    return out


# The products as torch operators: under the engine's batched backward (legacy vmap) a
# cotangent is a batched tensor, which torch hands to an operator one batch entry at a time;
# a plain call would see the batched wrapper, whose memory is not its logical rows. (Defined
# with torch.library.Library: custom_op's first call imports the compiler stack, +150 MB.)
# Functional only: the batched fallback takes no in-place operators.
_LIBRARY = torch.library.Library("ggufjac", "DEF")
_LIBRARY.define("quantized_product(Tensor x, Tensor raw, int qtype, int cols) -> Tensor")
_LIBRARY.define("quantized_transposed_product(Tensor g, Tensor raw, int qtype, int cols) -> Tensor")
_LIBRARY.impl("quantized_product", lambda x, raw, qtype, cols: product(x, raw, Q(qtype), cols),
              "CPU")
_LIBRARY.impl("quantized_transposed_product",
              lambda g, raw, qtype, cols: transposed_product(g, raw, Q(qtype), cols), "CPU")
product_op = torch.ops.ggufjac.quantized_product
transposed_product_op = torch.ops.ggufjac.quantized_transposed_product


def batched(t: torch.Tensor) -> bool:
    """Whether `t` is a batched tensor of the legacy vmap (then only the operators take it;
    when torch cannot tell, assumed so)."""
    check = getattr(torch._C._functorch, "is_legacy_batchedtensor", None)
    return True if check is None else bool(check(t))
