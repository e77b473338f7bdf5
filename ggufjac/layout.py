"""Per-architecture tensor tables, as data: which tensors a layer has, their shapes, how fused
tensors are stored, and the check that a file's tensor index matches. No tensor data is read
here (and no torch), so a file can be validated before anything is dequantized.
"""

from __future__ import annotations

import functools
import os

import numpy as np
from gguf import quants as gguf_quants
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from .errors import GGUFError, UnsupportedModelError
from .families import ModelConfig
from .gguf_file import GGUFFile


def layer_tensor_names(cfg: ModelConfig) -> list[str]:
    """The per-layer tensors the block uses (without the 'blk.N.' prefix and '.weight')."""
    fam = cfg.family
    names = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
    if fam.norm_layout in ("pre", "sandwich"):
        names += ["attn_norm", "ffn_norm"]
    if fam.norm_layout in ("sandwich", "post"):
        names += ["post_attention_norm", "post_ffw_norm"]
    if fam.qk_norm != "none":
        names += ["attn_q_norm", "attn_k_norm"]
    return names


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Row-major (torch) shape of each per-layer tensor."""
    d, q, kv, v = cfg.d_model, cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, \
        cfg.n_kv_head * cfg.head_dim_v
    qk_norm = (cfg.head_dim,) if cfg.family.qk_norm == "head" else None
    shapes = {
        "attn_q": (q, d), "attn_k": (kv, d), "attn_v": (v, d),
        "attn_output": (d, cfg.n_head * cfg.head_dim_v),
        "ffn_gate": (cfg.d_ff, d), "ffn_up": (cfg.d_ff, d), "ffn_down": (d, cfg.d_ff),
        "attn_norm": (d,), "ffn_norm": (d,), "post_attention_norm": (d,), "post_ffw_norm": (d,),
        "attn_q_norm": qk_norm or (q,), "attn_k_norm": qk_norm or (kv,),
    }
    return {n: shapes[n] for n in layer_tensor_names(cfg)}


def stored_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shapes as stored in the file: fused families keep q|k|v and gate|up in one tensor."""
    shapes = expected_shapes(cfg)
    if cfg.family.fused_qkv:
        q, k, v = (shapes.pop(n) for n in ("attn_q", "attn_k", "attn_v"))
        shapes["attn_qkv"] = (q[0] + k[0] + v[0], cfg.d_model)
    if cfg.family.fused_gate_up:
        gate = shapes.pop("ffn_gate")
        shapes["ffn_up"] = (2 * gate[0], cfg.d_model)
    return shapes


# Biases on these projections would add a constant to the linear path (q/k biases would be
# harmless, but no supported family has them): refused until handled as an extra input.
_BIAS_SUFFIXES = (".bias",)


@functools.cache
def dequantizable(qtype: GGMLQuantizationType) -> bool:
    """Whether a tensor type can be read as numbers: by gguf-py's reference dequantizers,
    which cover every type ggufjac's torch ones do (tested equal) and some more; integer
    tensors and the activation-only types (Q8_1, Q8_K) cannot."""
    _, type_size = GGML_QUANT_SIZES[qtype]
    try:
        gguf_quants.dequantize(np.zeros(type_size, dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def check_tensor_index(g: GGUFFile, cfg: ModelConfig) -> str | None:
    """Every tensor the model needs exists with the shape the config implies and a type that
    can be dequantized, and nothing the detach rules cannot handle is there. Returns the
    rope-factor tensor's name, if any."""
    want = {f"blk.{i}.{n}.weight": s for i in range(cfg.n_layer)
            for n, s in stored_shapes(cfg).items()}
    want["token_embd.weight"] = (cfg.vocab_size, cfg.d_model)
    want["output_norm.weight"] = (cfg.d_model,)
    if not cfg.tied_embeddings:
        want["output.weight"] = (cfg.vocab_size, cfg.d_model)
    for name, shape in want.items():
        info = g.tensor(name)
        if info.torch_shape != shape:
            raise GGUFError(g.path, f"tensor {name!r}",
                            f"expected shape {list(shape)}, found {list(info.torch_shape)}")
        if not dequantizable(info.type):
            raise UnsupportedModelError(
                f"{g.path}: tensor {name!r} has type {info.type.name}, which neither ggufjac "
                "nor gguf-py can dequantize")
    biases = [n for n in g.tensors if n.endswith(_BIAS_SUFFIXES)]
    if biases:
        raise UnsupportedModelError(
            f"{g.path}: bias tensors ({', '.join(biases[:3])}{', ...' if len(biases) > 3 else ''})"
            " are not supported: a bias on the linear path breaks y = sum_i J_i x_i")
    rope_factors_name = next((n for n in cfg.family.rope_factors if n in g.tensors), None)
    if rope_factors_name:
        want_rf = (cfg.rope_dims // 2,)
        got = g.tensors[rope_factors_name].torch_shape
        if got != want_rf:
            raise GGUFError(g.path, f"tensor {rope_factors_name!r}",
                            f"expected shape {list(want_rf)}, found {list(got)}")
    return rope_factors_name


def validate_file(path: str | os.PathLike[str]) -> tuple[GGUFFile, ModelConfig]:
    """Open a GGUF file and check everything ggufjac relies on before any tensor is read:
    the header and tensor index (GGUFFile), the architecture and its metadata (config), and
    every tensor's presence and shape. Raises GGUFError / UnsupportedModelError."""
    from .families import config_from_gguf

    g = GGUFFile(path)
    try:
        cfg = config_from_gguf(g)
        check_tensor_index(g, cfg)
    except BaseException:
        g.close()
        raise
    return g, cfg
