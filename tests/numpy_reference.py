"""Pieces of the float64 numpy forward passes the tests write as independent references:
weights as gguf-py dequantizes them, NEOX rope, RMSNorm's scale."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from gguf import GGUFReader
from gguf import quants as gguf_quants


def gguf_py_tensors(path) -> dict[str, np.ndarray]:
    """Every tensor dequantized by gguf-py, float64, row-major [out, in]."""
    out = {}
    for t in GGUFReader(str(path)).tensors:
        a = gguf_quants.dequantize(t.data, t.tensor_type).astype(np.float64)
        out[t.name] = a.reshape(tuple(reversed(t.shape.tolist())))
    return out


def neox_rope(n_pos: int, head_dim: int, base: float) -> Callable[[np.ndarray], np.ndarray]:
    """NEOX rope (pairs (i, i + head_dim/2)) for positions 0..n_pos-1, over [N, heads, hd]."""
    half = head_dim // 2
    theta = np.arange(n_pos)[:, None] * base ** (-np.arange(half) * 2 / head_dim)[None, :]
    cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]

    def rope(v: np.ndarray) -> np.ndarray:
        a, b = v[..., :half], v[..., half:]
        return np.concatenate((a * cos - b * sin, b * cos + a * sin), axis=-1)

    return rope


def inv_rms(v: np.ndarray, eps: float) -> np.ndarray:
    """1 / rms over the last axis, epsilon inside the root (RMSNorm's scale)."""
    return 1.0 / np.sqrt((v ** 2).mean(-1, keepdims=True) + eps)
