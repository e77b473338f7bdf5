"""A minimal transformer shared by every family; family differences are data (`Family`).

The math runs in the dtype of the weights it is given (no hidden casts), and every
input-dependent coefficient goes through `linearize`, so the same code is the plain model
(`PLAIN`) and the detached, exactly linear one (`DETACHED`). Layers are functions of
(layer weights, input): a caller may hold all weights, or load one layer at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .families import ModelConfig
from .linearize import (Linearization, attention_probs, frozen_rounding, gated_product,
                        glu_linear_branch, rms_norm)
from .weights import ROWS_PER_CHUNK, GGUFWeights


def rope_tables(cfg: ModelConfig, layer: int, n_pos: int, dtype: torch.dtype,
                device: torch.device, factors: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles [n_pos, rope_dims / 2] for `layer`.

    `factors` (Llama 3.1 rope_freqs, Phi 3 LongRoPE) divide each frequency; both tables are
    multiplied by the file's rope attention factor, as llama.cpp does. Angles are
    computed in float64 and rounded once to `dtype`: they only shape the frozen attention
    weights, never the linear path.
    """
    base, scale = cfg.rope_for_layer(layer)
    half = cfg.rope_dims // 2
    inv_freq = base ** (-torch.arange(half, dtype=torch.float64, device=device) * 2 / cfg.rope_dims)
    if factors is not None:
        inv_freq = inv_freq / factors.to(torch.float64)
    pos = torch.arange(n_pos, dtype=torch.float64, device=device) * scale
    theta = pos[:, None] * inv_freq[None, :]
    m = cfg.rope_attn_factor
    return (theta.cos() * m).to(dtype), (theta.sin() * m).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, neox: bool) -> torch.Tensor:
    """Rotate the first rope_dims channels of x [N, heads, head_dim] by position."""
    r = 2 * cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    c, s = cos[:, None, :], sin[:, None, :]
    if neox:  # pairs (i, i + r/2)
        a, b = rot[..., : r // 2], rot[..., r // 2:]
        rot = torch.cat((a * c - b * s, b * c + a * s), dim=-1)
    else:  # pairs (2i, 2i + 1)
        a, b = rot[..., 0::2], rot[..., 1::2]
        rot = torch.stack((a * c - b * s, b * c + a * s), dim=-1).flatten(-2)
    return torch.cat((rot, rest), dim=-1)


def attention_mask(cfg: ModelConfig, layer: int, n_pos: int, device: torch.device) -> torch.Tensor:
    """[N, N] boolean: query i may attend to key j (causal, and within the sliding window)."""
    i = torch.arange(n_pos, device=device)[:, None]
    j = torch.arange(n_pos, device=device)[None, :]
    allowed = j <= i
    if cfg.swa_layers[layer] and cfg.sliding_window:
        allowed &= (i - j) < cfg.sliding_window
    return allowed


@dataclass
class BlockOutput:
    """A layer's output and its two additive parts: out = x + attn + mlp."""

    out: torch.Tensor
    attn: torch.Tensor
    mlp: torch.Tensor


def attention_scores(cfg: ModelConfig, layer: int, w: dict[str, torch.Tensor], h: torch.Tensor,
                     lin: Linearization) -> torch.Tensor:
    """Scaled q·k scores [heads, N, N], -inf where masked. They only shape the frozen
    attention weights, so a replaying reverse sweep never computes them (nor needs q, k)."""
    n = h.shape[0]
    eps, fam = cfg.norm_eps, cfg.family
    q, k = h @ w["attn_q"].T, h @ w["attn_k"].T
    if fam.qk_norm == "full":
        q = rms_norm(q, w["attn_q_norm"], eps, lin, "attn_q_norm")
        k = rms_norm(k, w["attn_k_norm"], eps, lin, "attn_k_norm")
    q = q.view(n, cfg.n_head, cfg.head_dim)
    k = k.view(n, cfg.n_kv_head, cfg.head_dim)
    if fam.qk_norm == "head":
        q = rms_norm(q, w["attn_q_norm"], eps, lin, "attn_q_norm")
        k = rms_norm(k, w["attn_k_norm"], eps, lin, "attn_k_norm")
    cos, sin = rope_tables(cfg, layer, n, h.dtype, h.device, w.get("rope_factors"))
    q = apply_rope(q, cos, sin, fam.rope_neox) * cfg.attn_scale
    k = apply_rope(k, cos, sin, fam.rope_neox)
    k = k.repeat_interleave(cfg.n_head // cfg.n_kv_head, dim=1)  # grouped-query attention
    scores = torch.einsum("qhd,khd->hqk", q, k)
    return scores.masked_fill(~attention_mask(cfg, layer, n, h.device), float("-inf"))


def matmul(x: torch.Tensor, w: dict[str, torch.Tensor], name: str,
           lin: Linearization) -> torch.Tensor:
    """x @ W_name.T; an anchored run first applies the runtime's rounding of x for that
    weight's matmul (its activation quantization), frozen."""
    return frozen_rounding(x, lin, "in:" + name) @ w[name].T


def attention(cfg: ModelConfig, layer: int, w: dict[str, torch.Tensor], h: torch.Tensor,
              lin: Linearization) -> torch.Tensor:
    n = h.shape[0]
    p = attention_probs(lambda: attention_scores(cfg, layer, w, h, lin), lin)
    v = frozen_rounding(matmul(h, w, "attn_v", lin), lin, "v_cache")
    v = v.view(n, cfg.n_kv_head, cfg.head_dim_v).repeat_interleave(
        cfg.n_head // cfg.n_kv_head, dim=1)
    o = torch.einsum("hqk,khd->qhd", p, v).reshape(n, cfg.n_head * cfg.head_dim_v)
    return matmul(frozen_rounding(o, lin, "attn_sum"), w, "attn_output", lin)


def mlp(cfg: ModelConfig, w: dict[str, torch.Tensor], h: torch.Tensor,
        lin: Linearization) -> torch.Tensor:
    act = gated_product(lambda: matmul(h, w, "ffn_gate", lin), lambda: matmul(h, w, "ffn_up", lin),
                        cfg.family.activation, lin)
    return matmul(act, w, "ffn_down", lin)


def attention_branch(cfg: ModelConfig, layer: int, w: dict[str, torch.Tensor], x: torch.Tensor,
                     lin: Linearization) -> torch.Tensor:
    """What a layer's attention adds to the residual stream x [N, d] (its norms included)."""
    eps, layout = cfg.norm_eps, cfg.family.norm_layout
    h = x if layout == "post" else rms_norm(x, w["attn_norm"], eps, lin, "attn_norm")
    a = attention(cfg, layer, w, h, lin)
    return a if layout == "pre" else rms_norm(a, w["post_attention_norm"], eps, lin,
                                              "post_attention_norm")


def mlp_branch(cfg: ModelConfig, w: dict[str, torch.Tensor], mid: torch.Tensor,
               lin: Linearization) -> torch.Tensor:
    """What a layer's MLP adds to the residual stream mid [N, d] (its norms included)."""
    eps, layout = cfg.norm_eps, cfg.family.norm_layout
    h = mid if layout == "post" else rms_norm(mid, w["ffn_norm"], eps, lin, "ffn_norm")
    m = mlp(cfg, w, h, lin)
    return m if layout == "pre" else rms_norm(m, w["post_ffw_norm"], eps, lin, "post_ffw_norm")


def block(cfg: ModelConfig, layer: int, w: dict[str, torch.Tensor], x: torch.Tensor,
          lin: Linearization) -> BlockOutput:
    """One transformer layer on the residual stream x [N, d]."""
    a = attention_branch(cfg, layer, w, x, lin)
    mid = x + a
    m = mlp_branch(cfg, w, mid, lin)
    return BlockOutput(out=mid + m, attn=a, mlp=m)


def mlp_branch_matrix(cfg: ModelConfig, w: dict[str, torch.Tensor],
                      store: dict[str, torch.Tensor], gate_path: str, position: int,
                      ffn_chunk: int = 2048) -> torch.Tensor:
    """The detached `mlp_branch` at one position, from its recorded coefficients, as the
    [d, d] matrix K with m = K · mid (the position's own row; the MLP mixes no positions).

    Every step of the branch is a frozen diagonal (norm scale, rounding ratio, GLU
    coefficient c) or a weight, so K = diag(post) · W_down · diag(c ⊙ r_down) · W_in ·
    diag(pre ⊙ r_in). Pulling back m cotangents through the branch by autograd costs
    2·m·d·d_ff multiply-adds per position (both projections); forming K costs d·d·d_ff and
    applying it m·d², so for a full Jacobian (m = d) K is the cheaper order (engine.py).
    """
    def row(t: torch.Tensor) -> torch.Tensor:  # as it broadcasts against [N, ·] operands
        return t if t.dim() < 2 else t[position] if t.shape[0] > 1 else t[0]

    layout = cfg.family.norm_layout
    name, c = glu_linear_branch(store, gate_path)
    d = w["ffn_down"].shape[0]
    one = w["ffn_down"].new_ones(d)
    pre = one if layout == "post" else row(store["ffn_norm"]) * w["ffn_norm"]
    post = one if layout == "pre" else row(store["post_ffw_norm"]) * w["post_ffw_norm"]
    if (r := store.get("in:" + name)) is not None:
        pre = pre * row(r)
    mid_scale = row(c)
    if (r := store.get("in:ffn_down")) is not None:
        mid_scale = mid_scale * row(r)
    w_in, w_down = w[name], w["ffn_down"]
    k = w_down.new_zeros((d, d))
    for f in range(0, w_in.shape[0], ffn_chunk):  # a [d, chunk] temporary at a time
        k.addmm_(w_down[:, f:f + ffn_chunk] * mid_scale[f:f + ffn_chunk], w_in[f:f + ffn_chunk])
    return k.mul_(post[:, None]).mul_(pre[None, :])


def final_norm(cfg: ModelConfig, weight: torch.Tensor, x: torch.Tensor,
               lin: Linearization) -> torch.Tensor:
    """The output norm applied to the residual stream: y, the input of the unembedding."""
    return rms_norm(x, weight, cfg.norm_eps, lin, "output_norm")


def input_embeddings(weights: GGUFWeights, token_ids: list[int]) -> torch.Tensor:
    """The input embeddings x_1..x_N fed into layer 0 (the family's scale included)."""
    x = weights.embedding_rows(token_ids)
    scale = weights.cfg.embed_scale
    return x * scale if scale != 1.0 else x


class Transformer:
    """The model of one GGUF file. Holds all layer weights (`keep_weights`) or reloads them."""

    def __init__(self, weights: GGUFWeights, keep_weights: bool = True) -> None:
        self.weights, self.cfg = weights, weights.cfg
        self.dtype, self.device = weights.dtype, weights.device
        self._layers = [weights.layer(i) for i in range(self.cfg.n_layer)] if keep_weights else None
        self.output_norm = weights.output_norm()

    def layer_weights(self, i: int) -> dict[str, torch.Tensor]:
        return self._layers[i] if self._layers is not None else self.weights.layer(i)

    def embed(self, token_ids: list[int]) -> torch.Tensor:
        return input_embeddings(self.weights, token_ids)

    def forward(self, x: torch.Tensor, lin: Linearization,
                hidden: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Input embeddings [N, d] -> final-norm hidden states [N, d] (all positions).

        If `hidden` is a list, every layer's output residual stream is appended to it.
        """
        for i in range(self.cfg.n_layer):
            x = block(self.cfg, i, self.layer_weights(i), x, lin).out
            if hidden is not None:
                hidden.append(x)
        return final_norm(self.cfg, self.output_norm, x, lin)

    def logits(self, y: torch.Tensor) -> torch.Tensor:
        return unembed(self.weights, y)


@torch.no_grad()
def unembed(weights: GGUFWeights, y: torch.Tensor, rows_per_chunk: int = ROWS_PER_CHUNK
            ) -> torch.Tensor:
    """Unembedding of hidden states y [..., d] -> logits [..., vocab], in row chunks (the
    table is never held whole), then the family's final soft-cap if it has one."""
    z = torch.cat([y @ w.T for _, w in weights.unembedding_chunks(rows_per_chunk)], dim=-1)
    cap = weights.cfg.final_logit_softcap
    return z if cap is None else torch.tanh(z / cap) * cap
