"""A minimal transformer shared by every family; family differences are data (`Family`).

The math runs in the dtype of the weights it is given (no hidden casts), and every
input-dependent coefficient goes through `linearize`, so the same code is the plain model
(`PLAIN`) and the detached, exactly linear one (`DETACHED`). Layers are functions of
(layer weights, input): a caller may hold all weights, or load one layer at a time. Nothing
here reads a file: runner.py and engine.py feed the block the weights.py reads.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from .blocked import BAND_BLOCK, Band, Weight, banded_mix, column_slice, linear, row_slice
from .families import ModelConfig
from .layout import LAYER_TENSORS, bias_key
from .linearize import (Coefficients, Linearization, add_bias, attention_probs,
                        frozen_block_sums, frozen_rounding, gated_product, glu_linear_branch,
                        rms_norm)
from .routing import route


def rope_tables(cfg: ModelConfig, layer: int, n_pos: int, dtype: torch.dtype,
                device: torch.device, factors: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles [n_pos, rope_dims / 2] for `layer`.

    `factors` (Llama 3.1 rope_freqs, Phi 3 LongRoPE) divide each frequency; both tables are
    multiplied by the file's rope attention factor, as llama.cpp does. With YaRN
    (cfg.rope_yarn) the angles and that factor are ggml's rope_yarn's. Angles are
    computed in float64 and rounded once to `dtype`: they only shape the frozen attention
    weights, never the linear path.
    """
    base, scale = cfg.rope_for_layer(layer)
    half = cfg.rope_dims // 2
    inv_freq = base ** (-torch.arange(half, dtype=torch.float64, device=device) * 2 / cfg.rope_dims)
    if factors is not None:
        inv_freq = inv_freq / factors.to(torch.float64)
    pos = torch.arange(n_pos, dtype=torch.float64, device=device)
    theta = (pos * scale)[:, None] * inv_freq[None, :]
    m = cfg.rope_attn_factor
    if (yarn := cfg.rope_yarn) is not None and yarn.ext_factor != 0:
        # ggml_rope_yarn_corr_dims and rope_yarn: below dimension pair `low` the angle is the
        # unscaled one, above `high` the scaled one, a linear ramp between
        def corr_dim(beta: float) -> float:
            return cfg.rope_dims * math.log(yarn.orig_ctx / (beta * 2 * math.pi)) \
                / (2 * math.log(base))
        low = max(0.0, math.floor(corr_dim(yarn.beta_fast)))
        high = min(cfg.rope_dims - 1.0, math.ceil(corr_dim(yarn.beta_slow)))
        i = torch.arange(half, dtype=torch.float64, device=device)
        ramp = 1 - ((i - low) / max(0.001, high - low)).clamp(0, 1)
        mix = ramp * yarn.ext_factor
        theta = theta * (1 - mix) + (pos[:, None] * inv_freq[None, :]) * mix
        m = m * yarn.attn_factor * (1.0 + 0.1 * math.log(1.0 / scale))
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


def attention_band(cfg: ModelConfig, layer: int, n_pos: int, start: int = 0) -> Band:
    """Which keys layer `layer`'s queries see (causal, and within the sliding window);
    `start` positions come before the queries (a KV cache)."""
    window = cfg.sliding_window if cfg.swa_layers[layer] and cfg.sliding_window else None
    return Band(n_pos, start, window, BAND_BLOCK)


def attention_mask(cfg: ModelConfig, layer: int, n_pos: int, device: torch.device,
                   start: int = 0) -> torch.Tensor:
    """[N, start + N] boolean: query start + i may attend to key j."""
    return attention_band(cfg, layer, n_pos, start).mask(device)


LAYER_TENSOR_NAMES = frozenset(t.name for t in LAYER_TENSORS) \
    | frozenset(bias_key(t.name) for t in LAYER_TENSORS if t.biased)


class LayerWeights(Mapping[str, Weight]):
    """One layer's tensors by their short names in the layout table (fused storage already
    split), their biases (`layout.bias_key`) where the family has them, plus 'rope_factors'
    where the file has them. Matrices are tensors or read in row
    blocks (blocked.py); norm weights are tensors. A name the table does not know is
    refused when the container is made; a tensor not loaded is named when asked for.

    `block_minima(name)`, where given, reads a Q4_1/Q5_1 matrix's block minima [rows,
    blocks] (the part of each weight that multiplies the activation's stored block sum, see
    linearize.frozen_block_sums); read only when an anchored product asks, then kept."""

    def __init__(self, layer: int, tensors: dict[str, Weight],
                 block_minima: Callable[[str], torch.Tensor] | None = None) -> None:
        unknown = set(tensors) - LAYER_TENSOR_NAMES - {"rope_factors"}
        if unknown:
            raise ValueError(f"layer {layer}: no tensors {sorted(unknown)} in the layout table")
        self.layer, self._tensors = layer, tensors
        self._read_minima, self._minima = block_minima, {}

    def block_minima(self, name: str) -> torch.Tensor:
        """Matrix `name`'s block minima [rows, blocks]."""
        if name not in self._minima:
            if self._read_minima is None:
                raise KeyError(f"layer {self.layer}: no block minima of {name!r} were given")
            self._minima[name] = self._read_minima(name)
        return self._minima[name]

    def __getitem__(self, name: str) -> Weight:
        try:
            return self._tensors[name]
        except KeyError:
            raise KeyError(f"layer {self.layer}: tensor {name!r} is not loaded (loaded: "
                           f"{', '.join(sorted(self._tensors))})") from None

    def get(self, name: str, default: Weight | None = None) -> Weight | None:  # type: ignore[override]
        """The tensor, or `default` when it is not loaded (a bias the layer lacks)."""
        return self._tensors.get(name, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


@dataclass
class KVCache:
    """One layer's keys (after RoPE, before the grouped-query repeat) and values of the
    positions seen so far, for generation a few positions at a time: new rows continue at
    position `length`. Only the plain model uses it; detached runs see the whole prompt."""

    keys: torch.Tensor | None = None  # [positions, kv heads, head_dim]
    values: torch.Tensor | None = None  # [positions, kv heads, head_dim_v]

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[0]

    @staticmethod
    def _joined(old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
        return new if old is None else torch.cat((old, new), dim=0)

    def add_keys(self, k: torch.Tensor) -> torch.Tensor:
        self.keys = self._joined(self.keys, k)
        return self.keys

    def add_values(self, v: torch.Tensor) -> torch.Tensor:
        self.values = self._joined(self.values, v)
        return self.values


@dataclass
class BlockOutput:
    """A layer's output and its two additive parts: out = x + attn + mlp."""

    out: torch.Tensor
    attn: torch.Tensor
    mlp: torch.Tensor


def attention_scores(cfg: ModelConfig, layer: int, w: LayerWeights, h: torch.Tensor,
                     lin: Linearization, cache: KVCache | None = None) -> torch.Tensor:
    """Scaled q·k scores [heads, N, N] (N + the cache's positions as keys), -inf where
    masked. They only shape the frozen attention weights, so a replaying reverse sweep never
    computes them (nor needs q, k)."""
    n = h.shape[0]
    start = 0 if cache is None else cache.length
    eps, fam = cfg.norm_eps, cfg.family
    q = add_bias(linear(h, w["attn_q"]), w.get(bias_key("attn_q")), lin)
    k = add_bias(linear(h, w["attn_k"]), w.get(bias_key("attn_k")), lin)
    if fam.qk_norm == "full":
        q = rms_norm(q, w["attn_q_norm"], eps, lin, "attn_q_norm")
        k = rms_norm(k, w["attn_k_norm"], eps, lin, "attn_k_norm")
    q = q.view(n, cfg.n_head, cfg.head_dim)
    k = k.view(n, cfg.n_kv_head, cfg.head_dim)
    if fam.qk_norm == "head":
        q = rms_norm(q, w["attn_q_norm"], eps, lin, "attn_q_norm")
        k = rms_norm(k, w["attn_k_norm"], eps, lin, "attn_k_norm")
    if layer not in cfg.no_rope_layers:
        cos, sin = rope_tables(cfg, layer, start + n, h.dtype, h.device, w.get("rope_factors"))
        cos, sin = cos[start:], sin[start:]
        q, k = apply_rope(q, cos, sin, fam.rope_neox), apply_rope(k, cos, sin, fam.rope_neox)
    q = q * cfg.attn_scale
    if cache is not None:
        k = cache.add_keys(k)
    k = k.repeat_interleave(cfg.n_head // cfg.n_kv_head, dim=1)  # grouped-query attention
    scores = torch.einsum("qhd,khd->hqk", q, k)
    if (cap := cfg.attn_logit_softcap) is not None:  # llama.cpp caps before the mask
        scores = torch.tanh(scores / cap) * cap
    return scores.masked_fill(~attention_mask(cfg, layer, n, h.device, start), float("-inf"))


def matmul(x: torch.Tensor, w: LayerWeights, name: str,
           lin: Linearization) -> torch.Tensor:
    """x @ W_name.T (W held whole or read in row blocks), plus its bias if the layer has one
    (`add_bias`: not in the frozen linear map); an anchored run first applies the runtime's
    rounding of x for that weight's matmul (its activation quantization), frozen, and for
    Q4_1/Q5_1 weights adds their minima times the stored block sums' rounding."""
    x = frozen_rounding(x, lin, "in:" + name)
    y = linear(x, w[name], lin.values)
    if (sums := frozen_block_sums(x, lin, "sum:" + name)) is not None:
        y = y + linear(sums, w.block_minima(name), lin.values)
    return add_bias(y, w.get(bias_key(name)), lin)


def attention(cfg: ModelConfig, layer: int, w: LayerWeights, h: torch.Tensor,
              lin: Linearization, cache: KVCache | None = None) -> torch.Tensor:
    """Attention on h [..., N, d]. Leading dimensions are a batch of inputs sharing one set
    of replayed coefficients (probes of the frozen linear map); a recording run is [N, d]."""
    return attention_projection(w, attention_heads(cfg, layer, w, h, lin, cache), lin)


def attention_heads(cfg: ModelConfig, layer: int, w: LayerWeights, h: torch.Tensor,
                    lin: Linearization, cache: KVCache | None = None) -> torch.Tensor:
    """The heads' outputs P_h V_h concatenated [..., N, n_head · head_dim_v], before the
    output projection (head h: columns h·head_dim_v to (h + 1)·head_dim_v)."""
    batch, n = h.shape[:-2], h.shape[-2]
    sinks = w.get("attn_sinks") if cfg.family.attn_sinks else None
    p = attention_probs(lambda: attention_scores(cfg, layer, w, h, lin, cache), lin, sinks)
    v = frozen_rounding(matmul(h, w, "attn_v", lin), lin, "v_cache")
    v = v.view(*batch, n, cfg.n_kv_head, cfg.head_dim_v)
    if cache is not None:
        v = cache.add_values(v)
    band = attention_band(cfg, layer, n, 0 if cache is None else cache.length - n)
    o = banded_mix(p, v, band, lin.values, group=cfg.n_head // cfg.n_kv_head)
    return o.reshape(*batch, n, cfg.n_head * cfg.head_dim_v)


def attention_projection(w: LayerWeights, o: torch.Tensor, lin: Linearization) -> torch.Tensor:
    """The output projection of the heads' outputs o (`attention_heads`): linear in o, plus
    the projection's bias where the layer has one."""
    return matmul(frozen_rounding(o, lin, "attn_sum"), w, "attn_output", lin)


@runtime_checkable
class ExpertWeights(Protocol):
    """A 3-D expert tensor [n_expert, rows, cols], one expert's matrix at a time."""

    n_expert: int

    def expert(self, e: int) -> Weight:
        """Expert e's matrix [rows, cols]."""
        ...


def expert_matrix(stack: ExpertWeights | torch.Tensor, e: int) -> Weight:
    """Expert e's matrix of an expert tensor (held whole, or read per expert)."""
    return stack[e] if isinstance(stack, torch.Tensor) else stack.expert(e)


def expert_linear(x: torch.Tensor, experts: torch.Tensor, w: LayerWeights, name: str,
                  lin: Linearization) -> torch.Tensor:
    """Each selected expert's matmul: x [..., N, k, cols] (slot (t, j) the input of the
    expert experts[t, j]) -> [..., N, k, rows], each expert's matrix read once for all the
    slots that selected it; plus its bias, if the layer has one. Anchored, the runtime's
    rounding of the input is applied first (frozen)."""
    x = frozen_rounding(x, lin, "in:" + name)
    n, k = experts.shape
    flat = x.reshape(*x.shape[:-3], n * k, x.shape[-1])
    slots = experts.reshape(-1)
    order = torch.argsort(slots, stable=True)  # slots grouped by expert
    chosen, counts = torch.unique_consecutive(slots[order], return_counts=True)
    stack, parts, first = w[name], [], 0
    for e, count in zip(chosen.tolist(), counts.tolist()):
        rows = order[first:first + count]
        parts.append(linear(flat.index_select(-2, rows), expert_matrix(stack, e), lin.values))
        first += count
    y = torch.cat(parts, dim=-2).index_select(-2, torch.argsort(order))
    y = y.reshape(*x.shape[:-1], y.shape[-1])
    bias = w.get(bias_key(name))
    return y if bias is None else add_bias(y, bias[experts], lin)


def moe_routing(cfg: ModelConfig, w: LayerWeights, h: torch.Tensor,
                lin: Linearization) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen routing of positions h [N, d]: (experts [N, k], weights [N, k]), computed
    as llama.cpp computes them (routing.route) or given (an anchor) or replayed."""
    routed: dict[str, torch.Tensor] = {}

    def compute(part: str) -> torch.Tensor:
        if not routed:
            logits = add_bias(linear(h, w["ffn_gate_inp"]), w.get(bias_key("ffn_gate_inp")),
                              lin)
            routed["experts"], routed["weights"] = route(
                logits, cfg.n_expert_used, cfg.family.moe_gating, cfg.family.moe_normalize)
        return routed[part]

    experts = lin.coefficient("moe_experts", lambda: compute("experts"))
    return experts, lin.coefficient("moe_weights", lambda: compute("weights"))


def moe_mlp(cfg: ModelConfig, w: LayerWeights, h: torch.Tensor,
            lin: Linearization) -> torch.Tensor:
    """A mixture of experts on h [..., N, d]: Σ_j w_j · down_j(act(gate_j h) ⊙ up_j h) over
    each position's selected experts j, the routing (experts and weights) frozen and every
    expert's GLU frozen by the gate path (its coefficients [N, k, d_ff_expert]); unselected
    experts are never computed (they contribute exactly 0). Summed over the k slots in
    llama.cpp's order, one add at a time, as its graph adds them."""
    down = moe_slots(cfg, w, h, lin)[1]
    out = down[..., 0, :]
    for j in range(1, down.shape[-2]):
        out = out + down[..., j, :]
    return out


def moe_slots(cfg: ModelConfig, w: LayerWeights, h: torch.Tensor,
              lin: Linearization) -> tuple[torch.Tensor, torch.Tensor]:
    """The terms `moe_mlp` sums: (experts [N, k], their weighted outputs w_j ·
    down_j(act(gate_j h) ⊙ up_j h) [..., N, k, d]), slot j of position t being expert
    experts[t, j]'s."""
    experts, weights = moe_routing(cfg, w, h, lin)
    k = experts.shape[1]
    hk = h.unsqueeze(-2).expand(*h.shape[:-1], k, h.shape[-1])
    act = gated_product(lambda: expert_linear(hk, experts, w, "ffn_gate_exps", lin),
                        lambda: expert_linear(hk, experts, w, "ffn_up_exps", lin),
                        cfg.family.activation, lin)
    return experts, expert_linear(act, experts, w, "ffn_down_exps", lin) * weights[..., None]


def mlp(cfg: ModelConfig, w: LayerWeights, h: torch.Tensor,
        lin: Linearization) -> torch.Tensor:
    if cfg.family.moe_gating is not None:
        return moe_mlp(cfg, w, h, lin)
    act = gated_product(lambda: matmul(h, w, "ffn_gate", lin), lambda: matmul(h, w, "ffn_up", lin),
                        cfg.family.activation, lin)
    return matmul(act, w, "ffn_down", lin)


def attention_branch(cfg: ModelConfig, layer: int, w: LayerWeights, x: torch.Tensor,
                     lin: Linearization, cache: KVCache | None = None) -> torch.Tensor:
    """What a layer's attention adds to the residual stream x [N, d] (its norms included)."""
    return attention_branch_output(
        cfg, w, attention_branch_heads(cfg, layer, w, x, lin, cache), lin)


def attention_branch_heads(cfg: ModelConfig, layer: int, w: LayerWeights, x: torch.Tensor,
                           lin: Linearization, cache: KVCache | None = None) -> torch.Tensor:
    """The first part of `attention_branch`: the heads' outputs (`attention_heads`) of the
    normed stream x [N, d]."""
    h = x if cfg.family.norm_layout == "post" else \
        rms_norm(x, w["attn_norm"], cfg.norm_eps, lin, "attn_norm")
    return attention_heads(cfg, layer, w, h, lin, cache)


def attention_branch_output(cfg: ModelConfig, w: LayerWeights, o: torch.Tensor,
                            lin: Linearization) -> torch.Tensor:
    """The rest of `attention_branch`: the heads' outputs o projected, post-normed and
    scaled into the residual stream (linear in o with the coefficients frozen, plus the
    projection's bias carried through the frozen post-norm)."""
    a = attention_projection(w, o, lin)
    a = a if cfg.family.norm_layout == "pre" else rms_norm(
        a, w["post_attention_norm"], cfg.norm_eps, lin, "post_attention_norm")
    return a if cfg.residual_scale == 1.0 else a * cfg.residual_scale


def mlp_branch(cfg: ModelConfig, w: LayerWeights, mid: torch.Tensor,
               lin: Linearization) -> torch.Tensor:
    """What a layer's MLP adds to the residual stream mid [N, d] (its norms included)."""
    return mlp_branch_output(cfg, w, mlp(cfg, w, mlp_branch_input(cfg, w, mid, lin), lin), lin)


def mlp_branch_input(cfg: ModelConfig, w: LayerWeights, mid: torch.Tensor,
                     lin: Linearization) -> torch.Tensor:
    """The first part of `mlp_branch`: the MLP's input, the stream mid normed."""
    return mid if cfg.family.norm_layout == "post" else \
        rms_norm(mid, w["ffn_norm"], cfg.norm_eps, lin, "ffn_norm")


def mlp_branch_output(cfg: ModelConfig, w: LayerWeights, m: torch.Tensor,
                      lin: Linearization) -> torch.Tensor:
    """The rest of `mlp_branch`: the MLP's output m post-normed and scaled into the residual
    stream (linear in m with the coefficients frozen: a sum of parts of m maps to the sum
    of their images)."""
    m = m if cfg.family.norm_layout == "pre" else rms_norm(
        m, w["post_ffw_norm"], cfg.norm_eps, lin, "post_ffw_norm")
    return m if cfg.residual_scale == 1.0 else m * cfg.residual_scale


def block(cfg: ModelConfig, layer: int, w: LayerWeights, x: torch.Tensor,
          lin: Linearization, cache: KVCache | None = None) -> BlockOutput:
    """One transformer layer on the residual stream x [N, d] (or a batch [..., N, d] of
    inputs to the replayed, linear layer); with a `cache`, x holds the positions after the
    cached ones, whose keys and values it gains."""
    a = attention_branch(cfg, layer, w, x, lin, cache)
    mid = x + a
    m = mlp_branch(cfg, w, mid, lin)
    return BlockOutput(out=mid + m, attn=a, mlp=m)


def _branch_diagonals(cfg: ModelConfig, w: LayerWeights, store: Coefficients, name: str,
                      c: torch.Tensor, w_down: torch.Tensor,
                      select: Callable[[torch.Tensor], torch.Tensor]
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The detached MLP branch's frozen diagonals at the positions `select` takes from a
    recorded coefficient: (pre: the input norm's scale and rounding ratio, post: the output
    norm's scale and the residual scale, mid: the GLU coefficient and ffn_down's input
    rounding ratio)."""
    layout = cfg.family.norm_layout
    one = torch.ones(w_down.shape[0], dtype=w_down.dtype, device=w_down.device)
    pre = select(one) if layout == "post" else select(store["ffn_norm"]) * w["ffn_norm"]
    post = select(one) if layout == "pre" else select(store["post_ffw_norm"]) * w["post_ffw_norm"]
    post = post * cfg.residual_scale
    if (r := store.get("in:" + name)) is not None:
        pre = pre * select(r)
    mid = select(c)
    if (r := store.get("in:ffn_down")) is not None:
        mid = mid * select(r)
    return pre, post, mid


def mlp_branch_matrix(cfg: ModelConfig, w: LayerWeights,
                      store: Coefficients, gate_path: str, position: int,
                      ffn_chunk: int = 2048) -> torch.Tensor:
    """The detached `mlp_branch` at one position, from its recorded coefficients, as the
    [d, d] matrix K with m = K · mid (the position's own row; the MLP mixes no positions):
    its linear part, any bias on the linear branch or ffn_down being the constant term.

    Every step of the branch is a frozen diagonal (norm scale, rounding ratio, GLU
    coefficient c) or a weight, so K = diag(post) · W_down · diag(c ⊙ r_down) · W_in ·
    diag(pre ⊙ r_in); with frozen block sums (Q4_1/Q5_1, `matmul`) each W is W + M ⊙ (ρ − 1),
    its minima times the block-sum ratios, spread over each block's columns. Pulling back m
    cotangents through the branch by autograd costs 2·m·d·d_ff multiply-adds per position
    (both projections); forming K costs d·d·d_ff and applying it m·d², so for a full
    Jacobian (m = d) K is the cheaper order (engine.py).
    """
    def row(t: torch.Tensor) -> torch.Tensor:  # as it broadcasts against [N, ·] operands
        return t if t.dim() < 2 else t[position] if t.shape[0] > 1 else t[0]

    if cfg.family.moe_gating is not None:
        return moe_branch_matrix(cfg, w, store, gate_path, position)
    name, c = glu_linear_branch(store, gate_path)
    w_in, w_down = w[name], w["ffn_down"]
    d = w_down.shape[0]
    pre, post, mid_scale = _branch_diagonals(cfg, w, store, name, c, w_down, row)

    def with_block_sums(part: torch.Tensor, weight: str, rows: slice, c0: int, c1: int
                        ) -> torch.Tensor:
        """`part` (columns [c0, c1) of some of the weight's rows) plus M ⊙ (ρ − 1) there."""
        if (rho := store.get("sum:" + weight)) is None:
            return part
        rho = row(rho)
        size = w[weight].shape[1] // rho.shape[-1]
        b0, b1 = c0 // size, -(-c1 // size)
        m = w.block_minima(weight)[rows, b0:b1] * (rho[b0:b1] - 1)
        return part + m.repeat_interleave(size, dim=-1)[:, c0 - b0 * size:c1 - b0 * size]

    k = torch.zeros((d, d), dtype=w_down.dtype, device=w_down.device)
    for f in range(0, w_in.shape[0], ffn_chunk):  # [d, chunk] temporaries at a time
        f_end = min(f + ffn_chunk, w_in.shape[0])
        down = with_block_sums(column_slice(w_down, f, f_end), "ffn_down", slice(None), f, f_end)
        up = with_block_sums(row_slice(w_in, f, f_end), name, slice(f, f_end), 0, d)
        k.addmm_(down * mid_scale[f:f_end], up)
    return k.mul_(post[:, None]).mul_(pre[None, :])


def mlp_branch_matrices(cfg: ModelConfig, w: LayerWeights, store: Coefficients,
                        gate_path: str, positions: Sequence[int],
                        ffn_chunk: int = 2048,
                        work: Callable[[str, int], torch.Tensor] | None = None) -> torch.Tensor:
    """`mlp_branch_matrix` at several positions at once: [d, P, d], K_p = result[:, i, :]
    for p = positions[i]. Per chunk of d_ff, one product W_down[:, chunk] · [diag(c_p ⊙
    r_down,p) W_in[chunk]]_p with the positions' scaled rows side by side as columns
    ([d_ff chunk, P · d]), rather than P products of [d, chunk] · [chunk, d]: the same
    multiply-adds, with the coefficients scaling contiguous rows of W_in rather than a
    strided column slice of W_down, and one call for all positions. A mixture of experts,
    or frozen block sums (whose weights differ per position), goes position by position
    (`mlp_branch_matrix`).

    `work(name, n)`, if given, lends a 1-D buffer of n elements kept between calls (the
    result is made in one of them, valid until the next call): the scaled rows and the
    result are tens of MB, and a fresh allocation of that size is new pages, each faulted
    in as it is first written — measured at 5–10x the time of the scaling itself."""
    if cfg.family.moe_gating is not None or any(site.startswith("sum:") for site in store):
        return torch.stack([mlp_branch_matrix(cfg, w, store, gate_path, p, ffn_chunk)
                            for p in positions], dim=1)
    name, c = glu_linear_branch(store, gate_path)
    w_in, w_down = w[name], w["ffn_down"]
    d, n_pos = w_down.shape[0], len(positions)
    index = torch.tensor(list(positions), device=c.device)

    def rows(t: torch.Tensor) -> torch.Tensor:  # [P, ·] against the positions' rows
        if t.dim() < 2:
            return t.expand(n_pos, *t.shape)
        return t.index_select(0, index) if t.shape[0] > 1 else t[:1].expand(n_pos, -1)

    def buffer(key: str, shape: tuple[int, ...]) -> torch.Tensor:
        if work is None:
            return torch.empty(shape, dtype=w_down.dtype, device=w_down.device)
        return work(key, math.prod(shape)).view(shape)

    pre, post, mid_scale = _branch_diagonals(cfg, w, store, name, c, w_down, rows)
    k = buffer("mlp matrices", (d, n_pos * d))
    for f in range(0, w_in.shape[0], ffn_chunk):
        f_end = min(f + ffn_chunk, w_in.shape[0])
        up = row_slice(w_in, f, f_end)  # [chunk, d]
        scaled = torch.mul(mid_scale[:, f:f_end].T[:, :, None], up[:, None, :],
                           out=buffer("mlp matrices: scaled rows", (f_end - f, n_pos, d)))
        if f == 0:  # the first chunk's product is written, the others added
            torch.mm(column_slice(w_down, f, f_end), scaled.view(f_end - f, n_pos * d), out=k)
        else:
            k.addmm_(column_slice(w_down, f, f_end), scaled.view(f_end - f, n_pos * d))
        del scaled
    k = k.view(d, n_pos, d)
    return k.mul_(post.T[:, :, None]).mul_(pre[None, :, :])


def moe_branch_matrix(cfg: ModelConfig, w: LayerWeights, store: Coefficients,
                      gate_path: str, position: int) -> torch.Tensor:
    """`mlp_branch_matrix` of a mixture of experts: K = diag(post) · Σ_j w_j · W_down_j ·
    diag(c_j ⊙ r_down_j) · W_in_j · diag(pre ⊙ r_in) over the position's selected experts
    j (frozen weights w_j, GLU coefficients c_j, anchored rounding ratios r), summed in
    llama.cpp's slot order; the unselected experts are not read."""
    layout = cfg.family.norm_layout
    name, c = glu_linear_branch(store, gate_path)
    name += "_exps"
    experts, weights = store["moe_experts"], store["moe_weights"]
    p = position if experts.shape[0] > 1 else 0
    d = cfg.d_model
    dtype, device = weights.dtype, weights.device
    one = torch.ones(d, dtype=dtype, device=device)
    pre = one if layout == "post" else store["ffn_norm"][p].reshape(-1) * w["ffn_norm"]
    post = one if layout == "pre" else store["post_ffw_norm"][p].reshape(-1) * w["post_ffw_norm"]
    post = post * cfg.residual_scale
    if (r := store.get("in:" + name)) is not None:
        pre = pre * r[p].reshape(-1)
    r_down = store.get("in:ffn_down_exps")
    k = torch.zeros((d, d), dtype=dtype, device=device)
    for j, e in enumerate(experts[p].tolist()):
        w_in = expert_matrix(w[name], e)
        w_down = expert_matrix(w["ffn_down_exps"], e)
        mid = c[p, j] * weights[p, j]
        if r_down is not None:
            mid = mid * r_down[p, j]
        k.addmm_(row_slice(w_down, 0, w_down.shape[0]) * mid,
                 row_slice(w_in, 0, w_in.shape[0]))
    return k.mul_(post[:, None]).mul_(pre[None, :])


def final_norm(cfg: ModelConfig, weight: torch.Tensor, x: torch.Tensor,
               lin: Linearization) -> torch.Tensor:
    """The output norm applied to the residual stream: y, the input of the unembedding."""
    return rms_norm(x, weight, cfg.norm_eps, lin, "output_norm")
