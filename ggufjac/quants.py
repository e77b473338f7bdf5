"""Dequantization of llama.cpp tensor types in torch (CPU or CUDA), block-vectorized.

Each `dequantize_<type>` takes the raw blocks as a uint8 tensor [n_blocks, type_size] and
returns float32 [n_blocks, block_size], computed with the same float32 operations in the same
order as gguf-py's reference (`gguf.quants`), so the two agree element for element (tested).
Float32 is exact here: every supported type's values are f16 scale × small integer (+ f16
offset), which float32 represents without rounding differences between implementations that
follow the same order. Types without a torch path fall back to gguf-py with a one-line notice.

Speed: the integer codes are assembled in uint8/int8 (a quarter of the output's bytes), then
converted to float32 once and scaled in place. Fresh full-size temporaries, not arithmetic,
dominate the cost on CPU (page faults), so each function allocates one float32 output.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as Q

QK_K = 256
_IQ4NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """Bytes [start, start+2) of every block read as one float16, as float32 [n, 1]."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).to(torch.float32)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, k] bytes -> [n, 2k] 4-bit values: the k low nibbles, then the k high nibbles."""
    return torch.cat((qs & 0x0F, qs >> 4), dim=-1)


def _bits_le(b: torch.Tensor, n_bits: int) -> torch.Tensor:
    """[n, k] integers -> [n, n_bits, k]: bit i of every value, for i in 0..n_bits-1."""
    shifts = torch.arange(n_bits, device=b.device, dtype=b.dtype).view(1, n_bits, 1)
    return (b.unsqueeze(1) >> shifts) & 1


def dequantize_f32(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.float32)


def dequantize_f16(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.float16).to(torch.float32)


def dequantize_bf16(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.bfloat16).to(torch.float32)


def _scaled(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None = None,
            subtract: bool = False) -> torch.Tensor:
    """float32(q) * scale (+/- offset), with one float32 allocation (in-place scaling)."""
    out = q.to(torch.float32)
    out.mul_(scale)
    if offset is not None:
        out.sub_(offset) if subtract else out.add_(offset)
    return out


def dequantize_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    return _scaled(blocks[:, 2:].contiguous().view(torch.int8), _f16(blocks, 0))


def dequantize_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    return _scaled(_nibbles(blocks[:, 2:]).view(torch.int8) - 8, _f16(blocks, 0))


def dequantize_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    return _scaled(_nibbles(blocks[:, 4:]), _f16(blocks, 0), _f16(blocks, 2))


def _q5_values(qh_bytes: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    qh = qh_bytes.contiguous().view(torch.int32)  # [n, 1]; bit j is the 5th bit of element j
    high = _bits_le(qh, 32).reshape(-1, 32).to(torch.uint8)
    return _nibbles(qs) | (high << 4)


def dequantize_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    q = _q5_values(blocks[:, 2:6], blocks[:, 6:]).view(torch.int8) - 16
    return _scaled(q, _f16(blocks, 0))


def dequantize_q5_1(blocks: torch.Tensor) -> torch.Tensor:
    return _scaled(_q5_values(blocks[:, 4:8], blocks[:, 8:]), _f16(blocks, 0), _f16(blocks, 2))


def dequantize_q2_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    scales, qs = blocks[:, :16], blocks[:, 16:80]
    d, dmin = _f16(blocks, 80), _f16(blocks, 82)
    dl = (d * (scales & 0x0F).to(torch.float32)).view(n, 16, 1)
    ml = (dmin * (scales >> 4).to(torch.float32)).view(n, 16, 1)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=blocks.device).view(1, 1, 4, 1)
    q = (qs.reshape(n, 2, 1, 32) >> shifts) & 3
    return _scaled(q.reshape(n, 16, 16), dl, ml, subtract=True).reshape(n, QK_K)


def dequantize_q3_k(blocks: torch.Tensor) -> torch.Tensor:
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
    return _scaled(q, dl).reshape(n, QK_K)


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


def dequantize_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    sc, m = _k_scale_min(blocks[:, 4:16])
    q = _k_low_nibbles(blocks[:, 16:])
    return _scaled(q, (d * sc).view(n, 8, 1), (dmin * m).view(n, 8, 1), subtract=True) \
        .reshape(n, QK_K)


def dequantize_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    sc, m = _k_scale_min(blocks[:, 4:16])
    high = _bits_le(blocks[:, 16:48], 8)  # [n, 8, 32]: bit i of qh[l] belongs to sub-block i
    q = _k_low_nibbles(blocks[:, 48:]) | (high << 4)
    return _scaled(q, (d * sc).view(n, 8, 1), (dmin * m).view(n, 8, 1), subtract=True) \
        .reshape(n, QK_K)


def dequantize_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    ql, qh = blocks[:, :128], blocks[:, 128:192]
    scales = blocks[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
    d = _f16(blocks, 208)
    dl = (d * scales).view(n, 16, 1)
    g = ql.reshape(n, 2, 1, 64)
    low = torch.cat((g & 0x0F, g >> 4), dim=2).reshape(n, 8, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=blocks.device).view(1, 1, 4, 1)
    high = ((qh.reshape(n, 2, 1, 32) >> shifts) & 3).reshape(n, 8, 32)
    q = ((low | (high << 4)).view(torch.int8) - 32).reshape(n, 16, 16)
    return _scaled(q, dl).reshape(n, QK_K)


def _iq4_lookup(q: torch.Tensor) -> torch.Tensor:
    table = torch.tensor(_IQ4NL_VALUES, dtype=torch.float32, device=q.device)
    return table[q.long()]


def dequantize_iq4_nl(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks, 0)
    return d * _iq4_lookup(_nibbles(blocks[:, 2:]))


def dequantize_iq4_xs(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d = _f16(blocks, 0)
    scales_h = blocks[:, 2:4].contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    low = blocks[:, 4:8]
    low = torch.stack((low & 0x0F, low >> 4), dim=-1).reshape(n, 8)  # sub-block i's low bits
    shifts = torch.arange(0, 16, 2, dtype=torch.int32, device=blocks.device).view(1, 8)
    high = ((scales_h >> shifts) & 3).to(torch.uint8)
    scales = ((low | (high << 4)).to(torch.int8) - 32).to(torch.float32)
    q = blocks[:, 8:].reshape(n, 8, 16)
    q = torch.cat((q & 0x0F, q >> 4), dim=-1)  # [n, 8, 32]
    return ((d * scales).view(n, 8, 1) * _iq4_lookup(q)).reshape(n, QK_K)


DEQUANTIZERS: dict[Q, Callable[[torch.Tensor], torch.Tensor]] = {
    Q.F32: dequantize_f32, Q.F16: dequantize_f16, Q.BF16: dequantize_bf16,
    Q.Q8_0: dequantize_q8_0, Q.Q4_0: dequantize_q4_0, Q.Q4_1: dequantize_q4_1,
    Q.Q5_0: dequantize_q5_0, Q.Q5_1: dequantize_q5_1,
    Q.Q2_K: dequantize_q2_k, Q.Q3_K: dequantize_q3_k, Q.Q4_K: dequantize_q4_k,
    Q.Q5_K: dequantize_q5_k, Q.Q6_K: dequantize_q6_k,
    Q.IQ4_NL: dequantize_iq4_nl, Q.IQ4_XS: dequantize_iq4_xs,
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


def dequantize(raw: torch.Tensor, qtype: Q, shape: tuple[int, ...]) -> torch.Tensor:
    """Raw bytes of a tensor (uint8, any device) -> float32 tensor of row-major `shape`."""
    block, type_size = GGML_QUANT_SIZES[qtype]
    blocks = raw.reshape(-1, type_size)
    fn = DEQUANTIZERS.get(qtype)
    if fn is not None:
        return fn(blocks).reshape(shape)
    from gguf import quants as gguf_quants  # slower, correct fallback for rarer types

    if qtype not in _fallback_noticed:
        _fallback_noticed.add(qtype)
        print(f"ggufjac: note: {qtype.name} is dequantized by gguf-py (slower)", file=sys.stderr)
    out = gguf_quants.dequantize(raw.cpu().numpy(), qtype)
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).to(raw.device).reshape(shape)
