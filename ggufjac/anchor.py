"""Anchoring to llama.cpp: the exact linear map of llama.cpp's own prediction.

Our float64 model and llama.cpp's float32 one differ by llama.cpp's roundings (8-bit
activation quantization in quantized matmuls, F16 K/V, F16 probabilities, a GELU lookup
table), and one flipped rounding cascades through the layers. So instead of emulating them,
the detached model freezes its coefficients at llama.cpp's own values, read from its graph
tensors for the prompt (eval callback):

- attention probabilities: flash attention off, `kq_soft_max` rounded to F16 (the P·V matmul
  reads it as F16; a soft-cap on the scores is inside it); on, the probabilities never exist
  as a tensor and are derived from llama.cpp's F16-rounded Q and K (soft-capped as its kernel
  caps them), and the F16 accumulator's rounding of P·V is frozen as a ratio (`attn_sum`);
- the activated gate: llama.cpp's fused GLU output over its up projection (its GELU table
  included); on the gate path, the gate factor and the up branch;
- roundings on the linear path, frozen as ratios r = rounded(x)/x of llama.cpp's values:
  each quantized matmul's input as ggml's CPU backend quantizes it for that weight's type
  (`in:<weight>`), V as stored in the F16 cache (`v_cache`), P·V (`attn_sum`);
- the RMSNorm scales are recomputed from the anchored stream itself: they are smooth in their
  input, which tracks llama.cpp's to float32 rounding, so no rounding decision hides there.

With these the detached model reproduces llama.cpp's per-layer outputs and logits to about
float32 rounding and is exactly linear, so its Jacobian explains llama.cpp's prediction.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from gguf.constants import GGMLQuantizationType as Q

from .activation_formats import ACTIVATION_FORMAT
from .errors import GgufjacError, LlamaCppError
from .families import ModelConfig
from .layout import layer_tensor_name, stored_name
from .linearize import (SWIGLU_OAI_ALPHA, SWIGLU_OAI_LIMIT,  # Anchor: plain data, defined
                        Anchor, gate_factor)  # with the rules
from .llamacpp import LlamaCppRun
from .model import attention_mask

# llama.cpp's names for the graph tensors each coefficient comes from ("-{layer}" appended).
# The input of attention and of the MLP depends on where the family puts its norms.
ATTN_INPUT = {"pre": "attn_norm", "sandwich": "attn_norm", "post": None}  # post: layer input
FFN_INPUT = {"pre": "ffn_norm", "sandwich": "ffn_norm", "post": "ffn_inp"}
GLU_OUTPUT = {"gelu_tanh": "ffn_geglu", "silu": "ffn_swiglu"}
FLASH_OFF_TENSORS = ("kq_soft_max",)
# The last tensors so named: after RoPE (and after the q/k biases, in families with them).
FLASH_ON_TENSORS = ("Qcur", "Kcur")
# 'Vcur' is W_v x plus the v bias where the family has one (llama.cpp names the sum): the
# F16 rounding of the cache multiplies both, and the constant c takes its share.
LAYER_TENSORS = ("Vcur", "kqv_out", "ffn_up")
# A mixture of experts (llama.cpp's build_moe_ffn): the selected experts [k, N] (I32), the
# input of the experts' gate and up matmuls, each selected expert's gate and up projections
# and GLU output [N, k, d_ff_expert].
MOE_TENSORS = ("ffn_moe_topk", "ffn_moe_gate", "ffn_moe_up")
MOE_GLU_OUTPUT = {"silu": "ffn_moe_swiglu", "gelu_tanh": "ffn_moe_geglu",
                  "swiglu_oai": "ffn_moe_swiglu_oai"}


def ffn_input(cfg: ModelConfig) -> str:
    """The graph tensor that is the MLP's input (its norm's output, or the stream)."""
    return cfg.family.ffn_input_graph_name or FFN_INPUT[cfg.family.norm_layout]


def moe_glu_inputs(cfg: ModelConfig) -> tuple[str, str]:
    """The graph tensors holding the selected experts' gate and up projections as the GLU
    reads them: with the experts' biases added where the family has them."""
    if "ffn_gate_exps" in cfg.family.biases:
        return "ffn_moe_gate_biased", "ffn_moe_up_biased"
    return "ffn_moe_gate", "ffn_moe_up"


def moe_weights_tensor(cfg: ModelConfig) -> str:
    """The graph tensor holding the selected experts' final weights (before the experts'
    outputs are multiplied by them): after the renormalisation, or the softmax over the
    selected, or the gathered probabilities themselves."""
    fam = cfg.family
    if fam.moe_normalize:
        return "ffn_moe_weights_norm"
    return "ffn_moe_weights_softmax" if fam.moe_gating == "topk_softmax" else "ffn_moe_weights"


def _blocks(x: np.ndarray, size: int) -> np.ndarray:
    rows, k = x.shape
    if k % size:
        raise ValueError(f"row length {k} is not a multiple of the block size {size}")
    return x.reshape(rows, k // size, size)


def round_q8_0(x: np.ndarray) -> np.ndarray:
    """ggml's x86 Q8_0 activation quantization, dequantized: blocks of 32, d = fp16(amax/127),
    q = round-half-even(x · (127/amax)) (float32 arithmetic as ggml's AVX path does it)."""
    b = _blocks(x, 32)
    amax = np.abs(b).max(axis=-1, keepdims=True)
    d = (amax / np.float32(127)).astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(amax != 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.rint(b * inv)
    return (d * q).reshape(x.shape)


def round_q8_k(x: np.ndarray) -> np.ndarray:
    """ggml's Q8_K activation quantization, dequantized: blocks of 256, the first element of
    largest magnitude `max` sets iscale = -127/max, q = min(127, round-half-even(iscale·x)),
    d = 1/iscale, all in float32."""
    b = _blocks(x, 256)
    idx = np.abs(b).argmax(axis=-1)[..., None]
    mx = np.take_along_axis(b, idx, axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(mx != 0, np.float32(-127) / mx, np.float32(0)).astype(np.float32)
        d = np.where(mx != 0, np.float32(1) / iscale, np.float32(0)).astype(np.float32)
    q = np.minimum(np.rint(b * iscale), 127)
    return (d * q).reshape(x.shape)


def _round_f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


def _round_bf16(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.ascontiguousarray(x)).to(torch.bfloat16).float().numpy()


# Q8_1 quantizes as Q8_0; the per-block sum it also stores in F16 enters only Q4_1/Q5_1 dot
# products (as m·fp16(d·Σq)), frozen as its own ratio (`q8_1_sum_ratio`).
ROUNDINGS = {"q8_0": round_q8_0, "q8_1": round_q8_0, "q8_k": round_q8_k,
             "f16": _round_f16, "bf16": _round_bf16}


def q8_1_sum_ratio(x: np.ndarray) -> np.ndarray:
    """ρ [rows, k/32]: each block's sum as ggml's x86 Q8_1 stores it, fp16(d·Σq) with d =
    amax/127 in float32 (the product in float32), over the sum of the block's rounded values
    fp16(d)·Σq, in float64; 1 where Σq is 0. ggml's Q4_1/Q5_1 dot product multiplies the
    weight block's minimum by the stored sum (linearize.frozen_block_sums)."""
    b = _blocks(x, 32)
    amax = np.abs(b).max(axis=-1)
    d = (amax / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(amax != 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q_sum = np.rint(b * inv[..., None]).sum(axis=-1)  # integers, at most 32·127: exact
    stored = (d * q_sum.astype(np.float32)).astype(np.float16).astype(np.float64)
    rounded = d.astype(np.float16).astype(np.float64) * q_sum
    return np.where(rounded != 0, stored / np.where(rounded != 0, rounded, 1.0), 1.0)


def rounding_ratio(x: np.ndarray, rounded: np.ndarray) -> np.ndarray:
    """r = rounded / x in float64, 1 where x is 0 (rounded is then 0 too)."""
    x64, r64 = x.astype(np.float64), rounded.astype(np.float64)
    safe = np.where(x64 != 0, x64, 1.0)
    return np.where(x64 != 0, r64 / safe, 1.0)


def activation_ratio(x: np.ndarray, qtype: int, weight: str = "weight") -> np.ndarray | None:
    """The frozen ratio for a matmul input x [rows, k] (float32) against a weight of `qtype`
    (None: llama.cpp multiplies float32 activations as they are)."""
    if Q(qtype) == Q.F32:
        return None
    if Q(qtype) not in ACTIVATION_FORMAT:
        raise GgufjacError(f"{weight}: how llama.cpp rounds activations for weight type "
                           f"{Q(qtype).name} is not known to ggufjac, so it cannot be anchored "
                           f"(known: {', '.join(sorted(t.name for t in ACTIVATION_FORMAT))})")
    return rounding_ratio(x, ROUNDINGS[ACTIVATION_FORMAT[Q(qtype)]](x))


# The unembedding's product is applied in many places (logits, decoding, attribution rows)
# through a frozen input ratio alone, so a Q4_1/Q5_1 unembedding's block-sum term is left out
# (llama.cpp's quantizer gives the unembedding Q6_K or Q8_0 unless told otherwise).
UNEMBEDDING_Q8_1 = ("{} unembedding: llama.cpp multiplies its block minima by each Q8_1 block's "
                    "F16 sum, a term the anchored logits leave out (measured on synthetic "
                    "models: logits nmse 4e-8 ... 2e-6; the final-norm output, which the layers' "
                    "exact products give, stays within 3e-7)")


def capture_names(cfg: ModelConfig, flash_attn: bool | None = None) -> list[str]:
    """The llama.cpp graph tensors an anchor reads; `flash_attn` None: those of both modes
    (llama.cpp's "auto" decides at run time; tensors a graph lacks are not captured)."""
    layout = cfg.family.norm_layout
    attention = {True: FLASH_ON_TENSORS, False: FLASH_OFF_TENSORS,
                 None: FLASH_ON_TENSORS + FLASH_OFF_TENSORS}[flash_attn]
    if cfg.family.moe_gating is not None:
        per_layer = ["Vcur", "kqv_out", ffn_input(cfg), *MOE_TENSORS, *moe_glu_inputs(cfg),
                     moe_weights_tensor(cfg),
                     MOE_GLU_OUTPUT[cfg.family.activation], *attention]
    else:
        per_layer = [*LAYER_TENSORS, FFN_INPUT[layout], GLU_OUTPUT[cfg.family.activation],
                     *attention]
    if not cfg.family.fused_gate_up and cfg.family.moe_gating is None:
        per_layer.append("ffn_gate")
    names = [f"{n}-{i}" for i in range(cfg.n_layer) for n in per_layer]
    if ATTN_INPUT[layout]:
        names += [f"{ATTN_INPUT[layout]}-{i}" for i in range(cfg.n_layer)]
    else:  # the layer input itself: the embeddings (no post-norm family scales them), l_out
        names += ["embd"] + [f"l_out-{i}" for i in range(cfg.n_layer - 1)]
    return names + ["result_norm"]


SOURCES_FLASH_OFF = {
    "attn_probs": "llama.cpp kq_soft_max, rounded to F16 as the P·V matmul reads it",
}
SOURCES_FLASH_ON = {
    "attn_probs": "derived: softmax of llama.cpp's F16-rounded Q·K (Qcur, Kcur after RoPE), "
                  "with our masks, in float64",
}
SOURCES_COMMON = {
    "attn_sum": "llama.cpp kqv_out over P·V (F16 V) recomputed in float64: its accumulator's "
                "rounding, frozen as a ratio",
    "v_cache": "llama.cpp Vcur rounded to F16 as the KV cache stores it, as a ratio",
    "in:*": "llama.cpp's captured matmul inputs, quantized as ggml's CPU backend does for "
            "each weight's type (Q8_0, Q8_1, Q8_K, F16, ...), as ratios",
    "sum:*": "Q4_1/Q5_1 weights: each Q8_1 block's sum as stored in F16, over the sum of its "
             "rounded values, as ratios on the weights' block minima",
    "gate": "llama.cpp's fused GLU output over its up projection (up path)",
    "gate_factor, up": "llama.cpp's GLU output over gate·up, and its up projection (gate path)",
    "norm scales": "recomputed from the anchored residual stream (smooth in their input)",
}
SOURCES_MOE = {
    "moe_experts, moe_weights": "llama.cpp's own routing: ffn_moe_topk and the selected "
                                "experts' final weights (ffn_moe_weights_norm, ...)",
    "gate (experts)": "per selected expert, llama.cpp's ffn_moe_swiglu over ffn_moe_up (up "
                      "path), or over ffn_moe_gate·ffn_moe_up and ffn_moe_up (gate path)",
}


def _flash_probabilities(run: LlamaCppRun, cfg: ModelConfig, layer: int,
                         sinks: np.ndarray | None = None) -> np.ndarray:
    """Flash attention's probabilities [heads, N, N], which llama.cpp never stores: the
    softmax, in float64, of its F16-rounded queries and keys (after RoPE), scaled where its
    graph scales them, under our masks (causal, sliding window), with the layer's attention
    sinks [heads] where the family has them."""
    n = len(run.tokens)
    q = run.captured[f"Qcur-{layer}"].reshape(n, cfg.n_head, cfg.head_dim).astype(np.float32)
    if cfg.family.query_scale_site == "query":
        q = q * np.float32(cfg.attn_scale)
    k = _round_f16(run.captured[f"Kcur-{layer}"].reshape(n, cfg.n_kv_head, cfg.head_dim))
    k = np.repeat(k, cfg.n_head // cfg.n_kv_head, axis=1)
    scores = np.einsum("qhd,khd->hqk", _round_f16(q).astype(np.float64), k.astype(np.float64))
    if cfg.family.query_scale_site == "scores":
        scores = scores * cfg.attn_scale
    if (cap := cfg.attn_logit_softcap) is not None:  # as ggml's kernel: after the scale,
        scores = cap * np.tanh(scores / cap)          # before the mask
    mask = attention_mask(cfg, layer, n, torch.device("cpu")).numpy()
    scores = np.where(mask[None], scores, -np.inf)
    if sinks is None:
        p = np.exp(scores - scores.max(axis=-1, keepdims=True))
        return p / p.sum(axis=-1, keepdims=True)
    # ggml's flash kernel: each head's sink logit joins the running max and the sum (one
    # more key without a value), as in its soft_max
    sink = sinks.astype(np.float64).reshape(-1, 1, 1)
    top = np.maximum(scores.max(axis=-1, keepdims=True), sink)
    p = np.exp(scores - top)
    return p / (p.sum(axis=-1, keepdims=True) + np.exp(sink - top))


def _glu_coefficients(glu: np.ndarray, gate: np.ndarray, up: np.ndarray, activation: str,
                      gate_path: str) -> dict[str, np.ndarray]:
    """The MLP's frozen coefficients from llama.cpp's GLU output act(g)·u and its g and u:
    up path, act(g) = glu / u; gate path, s(g) = glu / (g·u) and u itself. Where llama.cpp's
    value is 0/0 (u or g exactly 0) our own activation stands in (it multiplies a zero)."""
    if activation == "swiglu_oai":
        return _swiglu_oai_coefficients(glu, gate, up, gate_path)
    s = gate_factor(torch.from_numpy(gate), activation).numpy()
    if gate_path == "up":
        return {"gate": np.where(up != 0, glu / np.where(up != 0, up, 1.0), gate * s)}
    gu = gate * up
    return {"gate_factor": np.where(gu != 0, glu / np.where(gu != 0, gu, 1.0), s), "up": up}


def _swiglu_oai_coefficients(glu: np.ndarray, gate: np.ndarray, up: np.ndarray,
                              gate_path: str) -> dict[str, np.ndarray]:
    """linearize.swiglu_oai_product's coefficients from llama.cpp's swiglu_oai output and
    its g and u: the clamp's mask and constant from llama.cpp's own g or u; up path,
    x·σ(αx) = glu / (clamp(u) + 1); gate path, σ(αx) = glu / (x · (clamp(u) + 1)) and
    clamp(u) + 1 itself (x = min(g, limit)). Where llama.cpp's value is 0/0 our own factor
    stands in (it multiplies a zero)."""
    limit, alpha = SWIGLU_OAI_LIMIT, SWIGLU_OAI_ALPHA
    x = np.minimum(gate, limit)
    y1 = np.clip(up, -limit, limit) + 1.0
    sig = 1.0 / (1.0 + np.exp(-alpha * x))
    if gate_path == "up":
        inside = (up <= limit) & (up >= -limit)
        return {"gate": np.where(y1 != 0, glu / np.where(y1 != 0, y1, 1.0), x * sig),
                "glu_clamp": inside.astype(np.float64),
                "glu_clamp_offset": np.where(inside, 1.0, y1)}
    inside = gate <= limit
    xy = x * y1
    return {"gate_factor": np.where(xy != 0, glu / np.where(xy != 0, xy, 1.0), sig), "up": y1,
            "glu_clamp": inside.astype(np.float64),
            "glu_clamp_offset": np.where(inside, 0.0, limit)}


def _moe_coefficients(run: LlamaCppRun, cfg: ModelConfig, layer: int, ffn_in: np.ndarray,
                      round_input: Callable[[np.ndarray, str], None], gate_path: str
                      ) -> dict[str, np.ndarray]:
    """A mixture of experts' frozen coefficients from llama.cpp's graph: its routing (the
    selected experts in its order, their weights), each selected expert's GLU coefficients
    [N, k, d_ff_expert], and the roundings of the experts' inputs (`round_input` records them
    as the dense MLP's; one quantized input serves every expert of a position, [N, 1, d])."""
    n, k, f = len(run.tokens), cfg.n_expert_used, cfg.d_ff_expert
    fam = cfg.family
    experts = run.captured[f"ffn_moe_topk-{layer}"].reshape(n, k).astype(np.int64)
    if experts.min() < 0 or experts.max() >= cfg.n_expert:
        raise LlamaCppError(f"llama.cpp's layer {layer} selected an expert outside "
                            f"0 ... {cfg.n_expert - 1}")
    c: dict[str, np.ndarray] = {"moe_experts": experts,
                                "moe_weights": run.rows(f"{moe_weights_tensor(cfg)}-{layer}")
                                .reshape(n, k).astype(np.float64)}
    for name in ("ffn_up_exps", "ffn_gate_exps"):
        round_input(ffn_in, name)

    def per_slot(name: str) -> np.ndarray:
        return run.captured[f"{name}-{layer}"].reshape(n, k, f).astype(np.float64)

    glu = per_slot(MOE_GLU_OUTPUT[fam.activation])
    gate_name, up_name = moe_glu_inputs(cfg)
    c.update(_glu_coefficients(glu, per_slot(gate_name), per_slot(up_name),
                               fam.activation, gate_path))
    round_input(glu.astype(np.float32).reshape(n * k, f), "ffn_down_exps")
    return c


def anchor_from_run(run: LlamaCppRun, cfg: ModelConfig,
                    weight_type: Callable[[int | None, str], int], gate_path: str,
                    dtype: torch.dtype, device: torch.device,
                    attn_sinks: Callable[[int], np.ndarray] | None = None) -> Anchor:
    """Frozen coefficients from llama.cpp's captured tensors (see the module docstring), for
    the attention mode the run used (`run.flash_attn`).

    `weight_type(layer, name)` is the GGUF type of a layer's matmul weight as stored ('attn_v',
    'attn_qkv', 'ffn_down', ...), and `weight_type(None, "output")` the unembedding's.
    `attn_sinks(layer)`, for families with sinks, is that layer's sink logits [heads] (the
    flash kernel adds them to probabilities llama.cpp does not store).
    """
    n = len(run.tokens)
    layout, fam = cfg.family.norm_layout, cfg.family
    flash_attn = run.flash_attn
    missing = [name for name in capture_names(cfg, flash_attn) if name not in run.captured]
    if missing:
        raise LlamaCppError(f"llama.cpp's graph has no tensor {missing[0]!r} (of "
                            f"{len(missing)} missing): this llama.cpp build names its "
                            f"{cfg.arch} tensors differently, so it cannot be anchored")

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(dtype=dtype, device=device)

    def rows(name: str) -> np.ndarray:
        return run.rows(name).astype(np.float32, copy=False)

    def stored(name: str) -> str:
        return stored_name(fam, name)

    layers = []
    for i in range(cfg.n_layer):
        c: dict[str, np.ndarray] = {}

        def round_input(x: np.ndarray, weight: str) -> None:
            """The matmul input's rounding ratio, and for Q8_1 its block sums' ratio."""
            qtype = weight_type(i, stored(weight))
            r = activation_ratio(x, qtype, layer_tensor_name(i, stored(weight)))
            c["in:" + weight] = np.ones_like(x, dtype=np.float64) if r is None else r
            if ACTIVATION_FORMAT.get(Q(qtype)) == "q8_1":
                c["sum:" + weight] = q8_1_sum_ratio(x)

        if ATTN_INPUT[layout]:
            attn_in = rows(f"{ATTN_INPUT[layout]}-{i}")
        else:
            attn_in = rows(f"l_out-{i - 1}") if i else rows("embd")
        round_input(attn_in, "attn_v")
        v = rows(f"Vcur-{i}")
        v16 = _round_f16(v)
        c["v_cache"] = rounding_ratio(v, v16)
        if flash_attn:
            p = _flash_probabilities(run, cfg, i,
                                     None if attn_sinks is None else attn_sinks(i))
        else:  # [1, heads, N, n_kv padded]: the first N cells hold this prompt's keys
            p = run.captured[f"kq_soft_max-{i}"].reshape(cfg.n_head, n, -1)[:, :, :n]
            p = _round_f16(p.astype(np.float32)).astype(np.float64)
            # our attention products skip the masked weights (model.attention_band)
            if np.any(p[:, ~attention_mask(cfg, i, n, torch.device("cpu")).numpy()]):
                raise LlamaCppError(f"llama.cpp's layer {i} attends outside the causal and "
                                    "sliding-window mask ggufjac applies, so it cannot be "
                                    "anchored")
        c["attn_probs"] = p
        v_heads = v16.astype(np.float64).reshape(n, cfg.n_kv_head, cfg.head_dim_v)
        v_heads = np.repeat(v_heads, cfg.n_head // cfg.n_kv_head, axis=1)
        pv = np.einsum("hqk,khd->qhd", p, v_heads).reshape(n, -1)
        kqv_out = rows(f"kqv_out-{i}")
        c["attn_sum"] = rounding_ratio(pv, kqv_out)
        round_input(kqv_out, "attn_output")
        ffn_in = rows(f"{ffn_input(cfg)}-{i}")
        if fam.moe_gating is not None:
            c.update(_moe_coefficients(run, cfg, i, ffn_in, round_input, gate_path))
            if any(site.startswith("sum:ffn_") for site in c):
                raise GgufjacError(f"layer {i}: experts of type Q4_1/Q5_1 cannot be anchored "
                                   "yet (their block-sum term is not applied per expert)")
            for name in ("ffn_up_exps", "ffn_gate_exps"):  # one input for every expert
                c["in:" + name] = c["in:" + name][:, None, :]
            c["in:ffn_down_exps"] = c["in:ffn_down_exps"].reshape(n, cfg.n_expert_used, -1)
            layers.append({site: torch.from_numpy(a).to(device) if site == "moe_experts"
                           else t(a) for site, a in c.items()})
            continue
        round_input(ffn_in, "ffn_up")
        round_input(ffn_in, "ffn_gate")
        glu = rows(f"{GLU_OUTPUT[fam.activation]}-{i}").astype(np.float64)
        if fam.fused_gate_up:
            gate, up = np.split(rows(f"ffn_up-{i}").astype(np.float64), 2, axis=-1)
        else:
            gate = rows(f"ffn_gate-{i}").astype(np.float64)
            up = rows(f"ffn_up-{i}").astype(np.float64)
        c.update(_glu_coefficients(glu, gate, up, fam.activation, gate_path))
        round_input(glu.astype(np.float32), "ffn_down")
        layers.append({site: t(a) for site, a in c.items()})
    y = rows("result_norm")
    output_type = Q(weight_type(None, "output"))
    out_ratio = activation_ratio(y, output_type, "the unembedding")
    sources = dict(SOURCES_FLASH_ON if flash_attn else SOURCES_FLASH_OFF, **SOURCES_COMMON)
    if fam.moe_gating is not None:
        sources.update(SOURCES_MOE)
    approximations = []
    if ACTIVATION_FORMAT.get(output_type) == "q8_1":
        approximations.append(UNEMBEDDING_Q8_1.format(output_type.name))
    if "AMX" in run.resolved.get("weight_buffers_mib", {}):
        approximations.append(
            "weights in llama.cpp's AMX buffer type (a CPU with AMX, repacking on): the "
            "activation rounding of its kernels is not emulated (verified: the CPU and "
            "CPU_REPACK kernels; --no-repack runs those)")
    return Anchor(flash_attn, gate_path, layers, None if out_ratio is None else t(out_ratio),
                  t(y), run.logits, run.settings, run.resolved, sources, approximations)
