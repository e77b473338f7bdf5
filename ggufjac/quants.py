"""Dequantization of llama.cpp tensor types in torch (CPU or CUDA), block-vectorized.

Each `dequantize_<type>` takes the raw blocks as a uint8 tensor [n_blocks, type_size] and
returns float32 [n_blocks, block_size], computed with the same float32 operations in the same
order as gguf-py's reference (`gguf.quants`), so the two agree element for element (tested).
Float32 is exact here: every supported type's values are f16 scale × small integer (+ f16
offset), which float32 represents without rounding differences between implementations that
follow the same order. Types without a torch path fall back to gguf-py with a one-line notice.

Speed: the integer codes are assembled in uint8/int8 (a quarter of the output's bytes), then
converted to float32 once and scaled in place. Fresh full-size temporaries, not arithmetic,
dominate the cost on CPU (page faults), so each function allocates at most one float32
output, and none when given `out`, a buffer to reuse (the streaming engine keeps one per
tensor name across layers).
"""

from __future__ import annotations

import functools
import math
import sys
import warnings
from collections.abc import Callable

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from .native_quants import native

QK_K = 256
_IQ4NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """Bytes [start, start+2) of every block read as one float16, as float32 [n, 1]."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).to(torch.float32)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, k] bytes -> [n, 2k] 4-bit values: the k low nibbles, then the k high nibbles
    (written straight into one result: no temporaries to concatenate)."""
    n, k = qs.shape
    out = torch.empty((n, 2, k), dtype=torch.uint8, device=qs.device)
    torch.bitwise_and(qs, 0x0F, out=out[:, 0])
    torch.bitwise_right_shift(qs, 4, out=out[:, 1])
    return out.view(n, 2 * k)


def _words(b: torch.Tensor) -> torch.Tensor:
    """[n, 4k] bytes copied into a fresh (4-byte aligned) tensor and viewed as int32 [n, k]
    (a copy even when `b` is contiguous: that may be read-only file memory, or misaligned)."""
    return torch.empty(b.shape, dtype=torch.uint8, device=b.device).copy_(b).view(torch.int32)


def _bits_le(b: torch.Tensor, n_bits: int) -> torch.Tensor:
    """[n, k] integers -> [n, n_bits, k]: bit i of every value, for i in 0..n_bits-1."""
    shifts = torch.arange(n_bits, device=b.device, dtype=b.dtype).view(1, n_bits, 1)
    return (b.unsqueeze(1) >> shifts) & 1


def _into(values: torch.Tensor, out: Out) -> torch.Tensor:
    """`values` as float32, written into `out` if given."""
    if out is None:
        return values.to(torch.float32)
    out = out.view(values.shape)
    out.copy_(values)
    return out


def dequantize_f32(blocks: torch.Tensor, out: Out = None) -> torch.Tensor:
    return _into(blocks.contiguous().view(torch.float32), out)


def dequantize_f16(blocks: torch.Tensor, out: Out = None) -> torch.Tensor:
    return _into(blocks.contiguous().view(torch.float16), out)


def dequantize_bf16(blocks: torch.Tensor, out: Out = None) -> torch.Tensor:
    return _into(blocks.contiguous().view(torch.bfloat16), out)


Out = torch.Tensor | None  # an optional float32 [n_blocks, block_size] buffer to write into


def _scaled(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None = None,
            subtract: bool = False, out: Out = None) -> torch.Tensor:
    """float32(q) * scale (+/- offset), scaled in place: into `out` if given (no float32
    allocation at all), else into one fresh tensor. (A single mixed-dtype torch.mul(q, scale)
    measured slower than the conversion plus in-place multiply.)"""
    if out is None:
        out = q.to(torch.float32)
    else:
        out = out.view(q.shape)
        out.copy_(q)
    out.mul_(scale)
    if offset is not None:
        out.sub_(offset) if subtract else out.add_(offset)
    return out


def dequantize_q8_0(blocks: torch.Tensor, out: Out = None) -> torch.Tensor:
    return _scaled(blocks[:, 2:].contiguous().view(torch.int8), _f16(blocks, 0), out=out)


def dequantize_q4_0(blocks: torch.Tensor, out: Out = None) -> torch.Tensor:
    return _scaled(_nibbles(blocks[:, 2:]).view(torch.int8) - 8, _f16(blocks, 0), out=out)


def dequantize_q4_1(blocks: torch.Tensor, out: Out = None) -> torch.Tensor:
    return _scaled(_nibbles(blocks[:, 4:]), _f16(blocks, 0), _f16(blocks, 2), out=out)


# x * _SPREAD for a 4-bit x puts bit i of x at bit 8i (the four shifted copies never overlap),
# so ((x * _SPREAD) & 0x01010101) spreads 4 bits over the 4 bytes of a 32-bit word.
_SPREAD = 0x00204081


def _q5_words(blocks: torch.Tensor, qh_at: int, signed: bool) -> torch.Tensor:
    """Q5_0/Q5_1 quants as int32 words of 4 bytes (one element per byte), [n, 8].

    Byte j is element j: the low nibble of qs (elements 0-15, then 16-31 from the high
    nibbles) and bit j of the little-endian uint32 qh as the 5th bit, assembled 4 elements per
    word operation (measured 1.3x faster than a per-byte table lookup). Signed (Q5_0) gives
    q - 16 as int8 directly: for q = low + 16h that is low where h = 1 and low | 0xF0 where
    h = 0. (Reading qh as an int32 assumes a little-endian machine, as GGUF files do.)
    """
    low = _nibbles(blocks[:, qh_at + 4:]).view(torch.int32)
    qh = _words(blocks[:, qh_at:qh_at + 4])  # [n, 1]
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=blocks.device).view(1, 8)
    h = ((qh >> shifts) & 0xF).mul_(_SPREAD).bitwise_and_(0x01010101)
    high = h.bitwise_xor_(0x01010101).mul_(0xF0) if signed else h.bitwise_left_shift_(4)
    return low.bitwise_or_(high)


def dequantize_q5_0(blocks: torch.Tensor, out: Out = None) -> torch.Tensor:
    q = _q5_words(blocks, 2, signed=True).view(torch.int8).view(blocks.shape[0], 32)
    return _scaled(q, _f16(blocks, 0), out=out)


def dequantize_q5_1(blocks: torch.Tensor, out: Out = None) -> torch.Tensor:
    q = _q5_words(blocks, 4, signed=False).view(torch.uint8).view(blocks.shape[0], 32)
    return _scaled(q, _f16(blocks, 0), _f16(blocks, 2), out=out)


def dequantize_q2_k(blocks: torch.Tensor, out: Out = None) -> torch.Tensor:
    n = blocks.shape[0]
    scales, qs = blocks[:, :16], blocks[:, 16:80]
    d, dmin = _f16(blocks, 80), _f16(blocks, 82)
    dl = (d * (scales & 0x0F).to(torch.float32)).view(n, 16, 1)
    ml = (dmin * (scales >> 4).to(torch.float32)).view(n, 16, 1)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=blocks.device).view(1, 1, 4, 1)
    q = (qs.reshape(n, 2, 1, 32) >> shifts) & 3
    return _scaled(q.reshape(n, 16, 16), dl, ml, subtract=True, out=out).reshape(n, QK_K)


def dequantize_q3_k(blocks: torch.Tensor, out: Out = None) -> torch.Tensor:
    n = blocks.shape[0]
    hmask, qs, sc = blocks[:, :32], blocks[:, 32:96], blocks[:, 96:108]
    d = _f16(blocks, 108)
    low = _nibbles(sc[:, :8])  # scale i's low 4 bits (i = 0..15)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=blocks.device).view(1, 4, 1)
    high = ((sc[:, 8:12].unsqueeze(1) >> shifts) & 3).reshape(n, 16)
    scales = ((low | (high << 4)).to(torch.int8) - 32).to(torch.float32)
    dl = (d * scales).view(n, 16, 1)
    ql = (qs.reshape(n, 2, 1, 32) >> shifts.view(1, 1, 4, 1)) & 3
    qh = _bits_le(hmask, 8).reshape(n, 16, 16) ^ 1  # a set bit means "no -4 offset"
    q = ql.reshape(n, 16, 16).view(torch.int8) - (qh << 2).view(torch.int8)
    return _scaled(q, dl, out=out).reshape(n, QK_K)


def _k_scale_min(sc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eight 6-bit scales and mins packed in 12 bytes (Q4_K, Q5_K)."""
    d, m, md = sc[:, 0:4], sc[:, 4:8], sc[:, 8:12]
    scales = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=-1)
    mins = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=-1)
    return scales.to(torch.float32), mins.to(torch.float32)


def _k_low_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K quants: each 32-byte group holds sub-block 2i (low) and 2i+1 (high)."""
    n = qs.shape[0]
    g = qs.reshape(n, 4, 1, 32)
    return torch.cat((g & 0x0F, g >> 4), dim=2).reshape(n, 8, 32)


def dequantize_q4_k(blocks: torch.Tensor, out: Out = None) -> torch.Tensor:
    n = blocks.shape[0]
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    sc, m = _k_scale_min(blocks[:, 4:16])
    q = _k_low_nibbles(blocks[:, 16:])
    return _scaled(q, (d * sc).view(n, 8, 1), (dmin * m).view(n, 8, 1), subtract=True,
                   out=out).reshape(n, QK_K)


def dequantize_q5_k(blocks: torch.Tensor, out: Out = None) -> torch.Tensor:
    n = blocks.shape[0]
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    sc, m = _k_scale_min(blocks[:, 4:16])
    high = _bits_le(blocks[:, 16:48], 8)  # [n, 8, 32]: bit i of qh[l] belongs to sub-block i
    q = _k_low_nibbles(blocks[:, 48:]) | (high << 4)
    return _scaled(q, (d * sc).view(n, 8, 1), (dmin * m).view(n, 8, 1), subtract=True,
                   out=out).reshape(n, QK_K)


def dequantize_q6_k(blocks: torch.Tensor, out: Out = None) -> torch.Tensor:
    n = blocks.shape[0]
    scales = blocks[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
    dl = (_f16(blocks, 208) * scales).view(n, 16, 1)
    # Assembled in 32-bit words, 4 quants per operation: every field stays inside its byte,
    # so the masks and shifts act on the 4 bytes at once (measured 1.7x faster than bytes).
    ql = _words(blocks[:, :128]).view(n, 2, 2, 8)  # [half, part, word]
    qh = _words(blocks[:, 128:192]).view(n, 2, 8)
    # per half, 4 groups of 32 quants: low nibbles of parts 0 and 1, then their high nibbles;
    # group g takes bits 2g, 2g+1 of qh as its bits 4, 5
    q = torch.empty((n, 2, 4, 8), dtype=torch.int32, device=blocks.device)
    nib = q.view(n, 2, 2, 2, 8)  # [half, nibble, part, word]
    torch.bitwise_and(ql, 0x0F0F0F0F, out=nib[:, :, 0])
    torch.bitwise_right_shift(ql, 4, out=nib[:, :, 1]).bitwise_and_(0x0F0F0F0F)
    for g, high in enumerate((qh << 4, qh << 2, qh, qh >> 2)):
        q[:, :, g].bitwise_or_(high & 0x30303030)
    return _scaled(q.view(torch.int8).sub_(32).view(n, 16, 16), dl, out=out).reshape(n, QK_K)


@functools.cache
def _iq4_pair_table(device: torch.device) -> torch.Tensor:
    """For each byte: the IQ4 values of its low and high nibble, as two int8 in one int16
    (low nibble's value in the low byte: read back as int8 pairs on a little-endian machine)."""
    kv = torch.tensor(_IQ4NL_VALUES, dtype=torch.int16)
    byte = torch.arange(256)
    return ((kv[byte & 15] & 0xFF) | (kv[byte >> 4] << 8)).to(torch.int16).to(device)


def _iq4_values(qs: torch.Tensor) -> torch.Tensor:
    """[n, k] bytes -> [n, 2k] int8 IQ4 values: the k low nibbles' values, then the high
    ones'. One table lookup per byte, not per nibble (measured 2x faster)."""
    n, k = qs.shape
    pairs = _iq4_pair_table(qs.device)[qs.long()].view(torch.int8).view(n, k, 2)
    return pairs.transpose(1, 2).reshape(n, 2 * k)


def dequantize_iq4_nl(blocks: torch.Tensor, out: Out = None) -> torch.Tensor:
    return _scaled(_iq4_values(blocks[:, 2:]), _f16(blocks, 0), out=out)


def dequantize_iq4_xs(blocks: torch.Tensor, out: Out = None) -> torch.Tensor:
    n = blocks.shape[0]
    d = _f16(blocks, 0)
    scales_h = blocks[:, 2:4].contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    low = blocks[:, 4:8]
    low = torch.stack((low & 0x0F, low >> 4), dim=-1).reshape(n, 8)  # sub-block i's low bits
    shifts = torch.arange(0, 16, 2, dtype=torch.int32, device=blocks.device).view(1, 8)
    high = ((scales_h >> shifts) & 3).to(torch.uint8)
    scales = ((low | (high << 4)).to(torch.int8) - 32).to(torch.float32)
    q = _iq4_values(blocks[:, 8:].reshape(n * 8, 16)).view(n, 8, 32)  # sub-block: 16 bytes
    return _scaled(q, (d * scales).view(n, 8, 1), out=out).reshape(n, QK_K)


# MXFP4's e2m1 values, doubled (ggml's kvalues_mxfp4): the block scale is half the E8M0 one.
_MXFP4_VALUES = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)


def _e8m0_half(e: torch.Tensor) -> torch.Tensor:
    """ggml_e8m0_to_fp32_half of bytes e [n, 1]: 2^(e - 128) as float32, built from its bits
    as ggml builds it (e < 2: the subnormals 2^-128, 2^-127)."""
    e = e.to(torch.int32)
    bits = torch.where(e < 2, torch.bitwise_left_shift(torch.full_like(e, 0x00200000), e),
                       (e - 1) << 23)
    return bits.view(torch.float32)


@functools.cache
def _mxfp4_table(device: torch.device) -> torch.Tensor:
    return torch.tensor(_MXFP4_VALUES, dtype=torch.int8, device=device)


def dequantize_mxfp4(blocks: torch.Tensor, out: Out = None) -> torch.Tensor:
    """MXFP4 (gpt-oss's expert weights): a byte E8M0 exponent, then 16 bytes of e2m1 codes,
    low nibbles the block's first 16 values, high nibbles the last 16."""
    q = _mxfp4_table(blocks.device)[_nibbles(blocks[:, 1:]).long()]
    return _scaled(q, _e8m0_half(blocks[:, :1]), out=out)


# Byte offset of the F16 block minimum m in the types whose weights are d·q + m.
BLOCK_MINIMUM_AT = {Q.Q4_1: 2, Q.Q5_1: 2}


def block_minima(raw: torch.Tensor, qtype: Q, shape: tuple[int, int]) -> torch.Tensor:
    """The minimum m of every block of a Q4_1/Q5_1 matrix of `shape` [rows, cols] given by its
    bytes: float32 [rows, cols / block size]."""
    block, type_size = GGML_QUANT_SIZES[qtype]
    return _f16(raw.reshape(-1, type_size), BLOCK_MINIMUM_AT[qtype]).view(
        shape[0], shape[1] // block)


DEQUANTIZERS: dict[Q, Callable[..., torch.Tensor]] = {
    Q.F32: dequantize_f32, Q.F16: dequantize_f16, Q.BF16: dequantize_bf16,
    Q.Q8_0: dequantize_q8_0, Q.Q4_0: dequantize_q4_0, Q.Q4_1: dequantize_q4_1,
    Q.Q5_0: dequantize_q5_0, Q.Q5_1: dequantize_q5_1,
    Q.Q2_K: dequantize_q2_k, Q.Q3_K: dequantize_q3_k, Q.Q4_K: dequantize_q4_k,
    Q.Q5_K: dequantize_q5_k, Q.Q6_K: dequantize_q6_k,
    Q.IQ4_NL: dequantize_iq4_nl, Q.IQ4_XS: dequantize_iq4_xs, Q.MXFP4: dequantize_mxfp4,
}
_fallback_noticed: set[Q] = set()


def raw_to_torch(raw: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """A (read-only, memory-mapped) uint8 numpy array as a torch tensor on `device`.

    No copy on CPU: torch warns that the array is read-only, but nothing here writes to it.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(raw)
    return t.to(device, non_blocking=True) if torch.device(device).type != "cpu" else t


# Into a given buffer, a tensor is dequantized this many values at a time: the arithmetic's
# temporaries then stay a few MB and in cache whatever the tensor's size, and are reused
# from the heap tensor after tensor instead of growing it. Smaller pieces pay per-piece
# overhead, whole tensors miss the cache (docs/benchmarks.md, tools/bench_dequant.py).
CHUNK_ELEMENTS = 1 << 20
# On a GPU the cache argument does not hold and each piece costs a dozen kernel launches
# from Python: 2^20 would be 17,000 launches per 70B layer (seconds per sweep). 2^24 values
# keep the launches to about a thousand per layer and the temporaries to a few hundred MB.
GPU_CHUNK_ELEMENTS = 1 << 24


def dequantize(raw: torch.Tensor, qtype: Q, shape: tuple[int, ...],
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Raw bytes of a tensor (uint8, any device) -> float32 tensor of row-major `shape`.

    With `out` (float32, as many elements, contiguous) the values are written into it and
    it is returned: reusing one buffer per tensor shape avoids the page faults of a fresh
    allocation, which cost more than the arithmetic (tools/bench_dequant.py measures both).
    On CPU, llama.cpp's own dequantizer writes the values where it gives the same ones
    (native_quants.py); otherwise the torch path below.
    """
    engine = native()
    if engine is not None and qtype in DEQUANTIZERS and _fits_native(raw, qtype, shape, out) \
            and engine.supports(qtype, dequantize_torch):
        if out is None:
            out = torch.empty(math.prod(shape), dtype=torch.float32)
        engine.dequantize(raw, qtype, out, torch.get_num_threads())
        return out.view(shape)
    return dequantize_torch(raw, qtype, shape, out)


def _fits_native(raw: torch.Tensor, qtype: Q, shape: tuple[int, ...],
                 out: torch.Tensor | None) -> bool:
    """Whether C may write `shape`'s values from `raw` into `out`: it writes where it is
    told, so only CPU tensors whose sizes and layouts match exactly go there."""
    block, type_size = GGML_QUANT_SIZES[qtype]
    n = math.prod(shape)
    return raw.device.type == "cpu" and raw.dtype == torch.uint8 and raw.is_contiguous() \
        and n % block == 0 and raw.numel() == n // block * type_size \
        and (out is None or (out.device.type == "cpu" and out.dtype == torch.float32
                             and out.is_contiguous() and out.numel() == n))


def dequantize_torch(raw: torch.Tensor, qtype: Q, shape: tuple[int, ...],
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """`dequantize` by the torch functions above (or gguf-py for the types they lack)."""
    block, type_size = GGML_QUANT_SIZES[qtype]
    blocks = raw.reshape(-1, type_size)
    fn = DEQUANTIZERS.get(qtype)
    if fn is not None:
        if out is None:
            out = torch.empty(blocks.shape[0] * block, dtype=torch.float32, device=raw.device)
        target = out.view(-1, block)
        chunk = CHUNK_ELEMENTS if raw.device.type == "cpu" else GPU_CHUNK_ELEMENTS
        step = max(1, chunk // block)
        for s in range(0, blocks.shape[0], step):
            fn(blocks[s:s + step], target[s:s + step])
        return out.view(shape)
    target = None if out is None else out.view(-1, block)
    from gguf import quants as gguf_quants  # slower, correct fallback for rarer types

    if qtype not in _fallback_noticed:
        _fallback_noticed.add(qtype)
        print(f"ggufjac: note: {qtype.name} is dequantized by gguf-py (slower)", file=sys.stderr)
    values = gguf_quants.dequantize(raw.cpu().numpy(), qtype)
    result = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(raw.device)
    return _into(result.view(-1, block), target).reshape(shape)
