"""Weights from a GGUF file, dequantized on demand into torch, one layer (or row chunk) at a time.

The file stays memory-mapped; nothing is dequantized until asked for. The token embedding
table (the largest tensor) is never materialized whole: input rows are gathered, and the
unembedding is walked in row chunks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch
from gguf.constants import GGML_QUANT_SIZES

from .errors import GGUFError, UnsupportedModelError
from .families import ModelConfig
from .gguf_file import GGUFFile, TensorInfo
from .quants import dequantize, raw_to_torch


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


class GGUFWeights:
    """Dequantizes the tensors of one GGUF model into `dtype` on `device`, on demand."""

    def __init__(self, gguf: GGUFFile, cfg: ModelConfig, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        self.gguf, self.cfg, self.dtype, self.device = gguf, cfg, dtype, torch.device(device)
        self._check_index()
        self.unembedding_name = "token_embd.weight" if cfg.tied_embeddings else "output.weight"

    def _check_index(self) -> None:
        """Every tensor the model needs exists with the shape the config implies."""
        cfg, g = self.cfg, self.gguf
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
        biases = [n for n in g.tensors if n.endswith(_BIAS_SUFFIXES)]
        if biases:
            raise UnsupportedModelError(
                f"{g.path}: bias tensors ({', '.join(biases[:3])}{', ...' if len(biases) > 3 else ''})"
                " are not supported: a bias on the linear path breaks y = sum_i J_i x_i")
        self.rope_factors_name = next((n for n in cfg.family.rope_factors if n in g.tensors), None)
        if self.rope_factors_name:
            want_rf = (cfg.rope_dims // 2,)
            got = g.tensors[self.rope_factors_name].torch_shape
            if got != want_rf:
                raise GGUFError(g.path, f"tensor {self.rope_factors_name!r}",
                                f"expected shape {list(want_rf)}, found {list(got)}")

    def tensor(self, name: str) -> torch.Tensor:
        info = self.gguf.tensor(name)
        raw = raw_to_torch(self.gguf.tensor_data(name), self.device)
        t = dequantize(raw, info.type, info.torch_shape).to(self.dtype)
        self.gguf.release(info.offset, info.n_bytes)
        return t

    def _stored_name(self, name: str) -> str:
        fam = self.cfg.family
        if fam.fused_qkv and name in ("attn_q", "attn_k", "attn_v"):
            return "attn_qkv"
        if fam.fused_gate_up and name == "ffn_gate":
            return "ffn_up"
        return name

    def layer_names(self, names: Iterable[str] | None = None) -> list[str]:
        """The stored tensors (short names) that loading `names` of a layer reads."""
        wanted = layer_tensor_names(self.cfg) if names is None else names
        return sorted({self._stored_name(n) for n in wanted})

    def layer(self, i: int, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """Tensors of layer `i` (all, or those in `names`), keyed by short name ('attn_q',
        'ffn_down', ...). Fused tensors are split; a rope-factor tensor, if the file has one,
        is 'rope_factors'.
        """
        cfg = self.cfg
        w = {n: self.tensor(f"blk.{i}.{n}.weight") for n in self.layer_names(names)}
        if "attn_qkv" in w:
            q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
            w["attn_q"], w["attn_k"], w["attn_v"] = w.pop("attn_qkv").split(
                [q, kv, cfg.n_kv_head * cfg.head_dim_v])
        if cfg.family.fused_gate_up and "ffn_up" in w:
            w["ffn_gate"], w["ffn_up"] = w["ffn_up"].split(cfg.d_ff)
        if self.rope_factors_name and names is None:
            w["rope_factors"] = self.tensor(self.rope_factors_name)
        return w

    def layer_bytes(self, names: Iterable[str] | None = None) -> int:
        """Bytes of one layer's dequantized tensors (`names`, or all) in this dtype."""
        item = torch.empty((), dtype=self.dtype).element_size()
        shapes = stored_shapes(self.cfg)
        return sum(math.prod(shapes[n]) for n in self.layer_names(names)) * item

    def output_norm(self) -> torch.Tensor:
        return self.tensor("output_norm.weight")

    def _rows(self, info: TensorInfo, start: int, stop: int) -> torch.Tensor:
        block, type_size = GGML_QUANT_SIZES[info.type]
        row_bytes = info.shape[0] // block * type_size
        raw = self.gguf.tensor_data(info.name)[start * row_bytes:stop * row_bytes]
        t = dequantize(raw_to_torch(raw, self.device), info.type, (stop - start, info.shape[0]))
        t = t.to(self.dtype)
        self.gguf.release(info.offset + start * row_bytes, (stop - start) * row_bytes)
        return t

    def embedding_rows(self, token_ids: list[int]) -> torch.Tensor:
        """Rows of the token embedding table for `token_ids` (not yet scaled), [N, d]."""
        info = self.gguf.tensor("token_embd.weight")
        return torch.cat([self._rows(info, t, t + 1) for t in token_ids], dim=0)

    def unembedding_rows(self, token_ids: list[int]) -> torch.Tensor:
        """Rows u_t of the unembedding matrix: logit_t = u_t · y (before any soft-cap), [m, d]."""
        info = self.gguf.tensor(self.unembedding_name)
        return torch.cat([self._rows(info, t, t + 1) for t in token_ids], dim=0)

    def unembedding_chunks(self, rows_per_chunk: int = 4096) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, rows) chunks of the unembedding matrix [vocab, d], in order."""
        info = self.gguf.tensor(self.unembedding_name)
        vocab = info.shape[1]
        for start in range(0, vocab, rows_per_chunk):
            yield start, self._rows(info, start, min(vocab, start + rows_per_chunk))
