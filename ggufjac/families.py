"""Model families as data: what differs between architectures, and the config read from GGUF.

A `Family` row says how a family's block is wired (norm placement, QK-norm, activation, rope
layout, embedding scale) and which defaults llama.cpp fills in when the file is silent.
`ModelConfig` holds the sizes of one file. Nothing here touches tensor data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, get_args

from gguf.constants import GGUFValueType, Keys

from .errors import GGUFError, UnsupportedModelError
from .gguf_file import GGUFFile


NormLayout = Literal["pre", "sandwich", "post"]
QKNorm = Literal["none", "head", "full"]
Activation = Literal["silu", "gelu_tanh", "swiglu_oai"]
# How a mixture of experts' router turns its logits into the selected experts' weights
# (llama.cpp's build_moe_ffn): "softmax_topk": softmax over all experts, the top k of those
# probabilities; "topk_softmax": the top k logits, softmax over those k.
MoEGating = Literal["softmax_topk", "topk_softmax"]
# Where llama.cpp's graph applies the attention scale, which decides what it rounds to F16
# under flash attention: "scores" (passed to the attention op: f16(q)·f16(k)·s), "query"
# (multiplied into q first: f16(q·s)·f16(k)), "qcur" (already in its last 'Qcur' tensor).
QueryScaleSite = Literal["scores", "query", "qcur"]


@dataclass(frozen=True)
class Family:
    """How one GGUF architecture's transformer block differs from the others."""

    norm_layout: NormLayout  # "pre": x + f(norm(x)); "sandwich": x + norm(f(norm(x))); "post": x + norm(f(x))
    qk_norm: QKNorm  # "none" | "head" (RMSNorm over each head) | "full" (over all of q or k)
    activation: Activation  # gate activation of the gated MLP
    rope_neox: bool  # rotate pairs (i, i + n/2) (NEOX) rather than (2i, 2i + 1)
    embed_scale_sqrt_d: bool = False  # inputs scaled by sqrt(d_model) (Gemma)
    swa_pattern: int = 0  # every swa_pattern-th layer is global, the others sliding-window
    rope_base_local: float | None = None  # rope base of sliding-window layers
    attn_scale_head_dim: bool = True  # queries scaled by 1/sqrt(head_dim)
    fused_qkv: bool = False  # one attn_qkv tensor holds q, k, v (rows in that order)
    fused_gate_up: bool = False  # ffn_up holds gate rows, then up rows (Phi 3)
    rope_factors: tuple[str, ...] = ()  # tensors of per-frequency divisors, first found wins
    # llama.cpp reads {arch}.final_logit_softcapping only for some families; elsewhere the
    # key is ignored, and so it must be here (applying it would explain another model).
    final_logit_softcap: bool = False
    # Layer matmuls the family may give a bias (layout.py's short names; llama.cpp reads
    # them as optional tensors): with biases the detached network is affine, y = J x + c.
    biases: tuple[str, ...] = ()
    # Gemma 2: the attention scores are soft-capped, cap * tanh(s / cap), before the mask and
    # the softmax; this is llama.cpp's cap where {arch}.attn_logit_softcapping is silent
    # (None: the family has no such cap).
    attn_logit_softcap: float | None = None
    # llama.cpp's final logit cap where the file is silent; a family with one always applies
    # its cap (the key must then be > 0). None: an absent or 0 key means no cap (Gemma 3).
    final_logit_softcap_default: float | None = None
    sliding_window_default: int = 0  # the window where the file gives none (0: none)
    # Layer counts of the sizes whose queries llama.cpp scales by 1/sqrt(d_model // n_head)
    # rather than 1/sqrt(head_dim) (the Gemma 27B models).
    attn_scale_d_model_layers: tuple[int, ...] = ()
    # Granite's multipliers: {arch}.embedding_scale (inputs), .residual_scale (each branch's
    # output), .attention.scale (the scores) and .logit_scale (logits divided by it), which
    # llama.cpp reads for these families only.
    multipliers: bool = False
    # Every no_rope_layer_step-th layer rotates neither q nor k (SmolLM3: 4, fixed in
    # llama.cpp's code, no metadata key); 0: every layer has rope.
    no_rope_layer_step: int = 0
    # Granite: {arch}.rope.scaling.finetuned (default true) switches rope on or off everywhere.
    rope_switch_key: bool = False
    # The unembedding is always token_embd (Gemma 2): llama.cpp refuses a file that also has
    # an output.weight (one tensor more than it loads).
    tied_only: bool = False
    query_scale_site: QueryScaleSite = "scores"  # see QueryScaleSite
    # The name llama.cpp's graph gives the MLP's input where it is not the norm_layout's usual
    # one (gpt-oss: "attn_post_norm"); anchoring reads that tensor.
    ffn_input_graph_name: str | None = None
    # A per-head learned logit (attn_sinks [n_head]) joins each query's softmax without a
    # value (gpt-oss): the probabilities over the real keys then sum to less than 1.
    attn_sinks: bool = False
    # Layer tensors the family stores under another name (layout short name, stored name):
    # gpt-oss keeps its pre-MLP norm in 'post_attention_norm' (llama.cpp's attn_post_norm).
    stored_names: tuple[tuple[str, str], ...] = ()
    # llama.cpp requires {arch}.attention.sliding_window (gpt-oss): no default window.
    sliding_window_required: bool = False
    # Biases (of Family.biases) llama.cpp requires rather than reads when present: a file
    # without one is refused, as llama.cpp refuses it (gpt-oss's output projection, router
    # and experts).
    biases_required: tuple[str, ...] = ()
    # A mixture of experts: the MLP is Σ over the experts the router (ffn_gate_inp) selects
    # of w_e · expert_e(x), the experts stored as 3-D tensors ffn_{gate,up,down}_exps
    # [n_expert, rows, cols]; None: one dense MLP.
    moe_gating: MoEGating | None = None
    # The selected experts' weights divided by their sum (llama.cpp's norm_w).
    moe_normalize: bool = False

    def __post_init__(self) -> None:
        if self.moe_gating is not None and self.moe_gating not in get_args(MoEGating):
            raise ValueError(f"Family.moe_gating must be one of {get_args(MoEGating)} or "
                             f"None, not {self.moe_gating!r}")
        for name, kind in (("norm_layout", NormLayout), ("qk_norm", QKNorm),
                           ("activation", Activation), ("query_scale_site", QueryScaleSite)):
            if getattr(self, name) not in get_args(kind):
                raise ValueError(f"Family.{name} must be one of {get_args(kind)}, "
                                 f"not {getattr(self, name)!r}")


# llama.cpp's own defaults (src/llama-model.cpp) where the GGUF metadata is silent:
# Gemma 3 marks every 6th layer global (set_swa_pattern(6)) and gives local layers base 10000.
# Llama 3.1-style rope scaling is stored as the `rope_freqs` tensor; Phi 3 LongRoPE as
# rope_factors_short/long, of which llama.cpp uses the short one unless the context exceeds
# the original training context (ggufjac runs short prompts, so: short).
FAMILIES: dict[str, Family] = {
    "llama": Family(norm_layout="pre", qk_norm="none", activation="silu", rope_neox=False,
                    rope_factors=("rope_freqs.weight",)),
    "qwen3": Family(norm_layout="pre", qk_norm="head", activation="silu", rope_neox=True),
    "phi3": Family(norm_layout="pre", qk_norm="none", activation="silu", rope_neox=True,
                   fused_qkv=True, fused_gate_up=True,
                   rope_factors=("rope_factors_short.weight",), query_scale_site="qcur"),
    "olmo2": Family(norm_layout="post", qk_norm="full", activation="silu", rope_neox=True),
    "gemma3": Family(norm_layout="sandwich", qk_norm="head", activation="gelu_tanh",
                     rope_neox=True, embed_scale_sqrt_d=True, swa_pattern=6,
                     rope_base_local=10000.0, final_logit_softcap=True,
                     attn_scale_d_model_layers=(62,), query_scale_site="query"),
    # Gemma 2 (src/models/gemma2.cpp): Gemma 3's block without QK-norm, every 2nd layer
    # global with a 4096 window by default, attention scores capped at 50 and logits at 30
    # by default; local layers use the global rope unless rope.freq_base_swa says otherwise.
    "gemma2": Family(norm_layout="sandwich", qk_norm="none", activation="gelu_tanh",
                     rope_neox=True, embed_scale_sqrt_d=True, swa_pattern=2,
                     sliding_window_default=4096, attn_logit_softcap=50.0,
                     final_logit_softcap=True, final_logit_softcap_default=30.0,
                     attn_scale_d_model_layers=(46,), tied_only=True,
                     query_scale_site="query"),
    # Granite 3 (src/models/granite.cpp): Llama's block with the multipliers.
    "granite": Family(norm_layout="pre", qk_norm="none", activation="silu", rope_neox=False,
                      rope_factors=("rope_freqs.weight",), multipliers=True,
                      rope_switch_key=True),
    # SmolLM3 (src/models/smollm3.cpp): Llama's block, every 4th layer without rope.
    "smollm3": Family(norm_layout="pre", qk_norm="none", activation="silu", rope_neox=False,
                      no_rope_layer_step=4),
    # Qwen 2 / 2.5 (Qwen2.5-Coder, DeepSeek-R1-Distill-Qwen, QwQ): Llama's block with NEOX
    # rope and biases on q, k and v (llama.cpp's src/models/qwen2.cpp).
    "qwen2": Family(norm_layout="pre", qk_norm="none", activation="silu", rope_neox=True,
                    biases=("attn_q", "attn_k", "attn_v")),
    # Qwen3 MoE (Qwen3-30B-A3B, Qwen3-Coder-30B-A3B; src/models/qwen3moe.cpp): Qwen 3's
    # block with a mixture of experts for the MLP, softmax over all experts, top k,
    # the k weights renormalised to sum 1.
    "qwen3moe": Family(norm_layout="pre", qk_norm="head", activation="silu", rope_neox=True,
                       moe_gating="softmax_topk", moe_normalize=True),
    # gpt-oss (gpt-oss-20b/120b; src/models/openai-moe.cpp): a pre-norm block (its MLP norm
    # stored as post_attention_norm) with sliding-window and full attention alternating
    # (swa pattern 2), attention sinks, biases on q, k, v, the output projection, the
    # router and the experts; the router's top k logits softmaxed, not renormalised; the
    # experts' GLU ggml's swiglu_oai; YaRN rope from the file's rope.scaling keys.
    "gpt-oss": Family(norm_layout="pre", qk_norm="none", activation="swiglu_oai",
                      rope_neox=True, swa_pattern=2, attn_sinks=True,
                      biases=("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate_inp",
                              "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"),
                      moe_gating="topk_softmax", moe_normalize=False,
                      stored_names=(("ffn_norm", "post_attention_norm"),),
                      ffn_input_graph_name="attn_post_norm",
                      sliding_window_required=True,
                      biases_required=("attn_output", "ffn_gate_inp", "ffn_gate_exps",
                                       "ffn_up_exps", "ffn_down_exps")),
}


@dataclass(frozen=True)
class YarnRope:
    """YaRN as llama.cpp runs it (llama-context.cpp, ggml's rope_yarn): each frequency's
    angle mixes the scaled and the unscaled one by a ramp over the rotary dimensions between
    the correction dimensions of beta_fast and beta_slow, and cos and sin are multiplied by
    attn_factor · (1 + 0.1 ln(1 / position scale))."""

    orig_ctx: int  # rope.scaling.original_context_length (else the training context)
    ext_factor: float = 1.0  # llama.cpp's default for the yarn type (no GGUF key read)
    beta_fast: float = 32.0  # llama.cpp's hparams defaults (only Grok reads keys for these)
    beta_slow: float = 1.0
    # llama.cpp's yarn_attn_factor before the file's rope.scaling.attn_factor: its mscale
    # for the global factor, divided by the 1 + 0.1 ln(factor) that rope_yarn multiplies in
    attn_factor: float = 1.0


@dataclass(frozen=True)
class ModelConfig:
    """The sizes and settings of one model file (read from its GGUF metadata)."""

    arch: str
    family: Family
    n_layer: int
    d_model: int
    d_ff: int
    n_head: int
    n_kv_head: int
    head_dim: int
    head_dim_v: int
    vocab_size: int
    context_length: int
    norm_eps: float
    rope_base: float
    rope_scale: float  # linear position scale of global layers (1 / rope.scaling.factor)
    rope_dims: int
    # llama.cpp multiplies cos and sin of the rotated channels by this (the file's
    # rope.scaling.attn_factor; Phi-4-mini's LongRoPE has 1.19), so q·k scales by its square.
    rope_attn_factor: float
    sliding_window: int | None
    swa_layers: tuple[bool, ...] = field(repr=False)
    attn_scale: float
    embed_scale: float
    final_logit_softcap: float | None
    tied_embeddings: bool
    # (base, position scale) of the sliding-window layers' rope; None: the global one.
    rope_swa: tuple[float, float] | None = None
    no_rope_layers: frozenset[int] = frozenset()  # layers that rotate neither q nor k
    attn_logit_softcap: float | None = None  # scores capped to cap * tanh(s / cap)
    residual_scale: float = 1.0  # multiplies each attention and MLP branch's output
    logit_scale: float = 1.0  # the logits are the unembedding's output divided by it
    # YaRN rope (rope.scaling.type "yarn"): llama.cpp's ext_factor, beta_fast, beta_slow and
    # original context, and the attention factor it derives; None: no YaRN.
    rope_yarn: YarnRope | None = None
    # A mixture of experts (Family.moe_gating): how many experts, how many each token uses,
    # and each expert's FFN width; all 0 for a dense MLP.
    n_expert: int = 0
    n_expert_used: int = 0
    d_ff_expert: int = 0

    def rope_for_layer(self, layer: int) -> tuple[float, float]:
        """(base, position scale) of the rotary embedding used in `layer`."""
        if self.swa_layers[layer] and self.rope_swa is not None:
            return self.rope_swa
        return self.rope_base, self.rope_scale



class _Metadata:
    """Typed, range-checked reads of one file's metadata: every bad value is one GGUFError
    naming the file, the key, the value found and what was expected."""

    def __init__(self, g: GGUFFile, arch: str) -> None:
        self.g, self.arch = g, arch

    def key(self, template: str) -> str:
        return template.format(arch=self.arch)

    def _bad(self, key: str, value: object, expected: str) -> GGUFError:
        return GGUFError(self.g.path, key, f"expected {expected}, found {value!r}")

    def int(self, template: str, default: int | None = None, minimum: int = 1) -> int:
        key = self.key(template)
        if key not in self.g.metadata and default is not None:
            return default
        v = self.g.require(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise self._bad(key, v, "a positive integer" if minimum == 1
                            else f"an integer >= {minimum}")
        return v

    def float(self, template: str, default: float | None = None, positive: bool = True,
              above: float | None = None) -> float:
        """A float32 value (llama.cpp refuses any other type for a float key), finite, > 0 (or
        >= 0 when not `positive`), and > `above` when given."""
        key = self.key(template)
        if key not in self.g.metadata and default is not None:
            return default
        v = self.g.require(key)
        if self.g.value_types.get(key) != GGUFValueType.FLOAT32:
            raise self._bad(key, v, "a float32 value (llama.cpp reads no other type here)")
        if not isinstance(v, float) or not math.isfinite(v) \
                or (v <= 0 if positive else v < 0):
            raise self._bad(key, v, "a finite floating-point number > 0" if positive
                            else "a finite floating-point number >= 0")
        if above is not None and v <= above:
            raise self._bad(key, v, f"a number > {above:g}")
        return float(v)

    def optional_float(self, template: str) -> float | None:
        """A non-negative number where 0 or absence means "none"."""
        key = self.key(template)
        return self.float(template, positive=False) or None if key in self.g.metadata else None

    def bool(self, template: str, default: bool) -> bool:
        key = self.key(template)
        if key not in self.g.metadata:
            return default
        v = self.g.metadata[key]
        if self.g.value_types.get(key) != GGUFValueType.BOOL or not isinstance(v, bool):
            raise self._bad(key, v, "a boolean (llama.cpp reads no other type here)")
        return v

    def string(self, template: str, default: str) -> str:
        key = self.key(template)
        v = self.g.get(key, default)
        if not isinstance(v, str):
            raise self._bad(key, v, "a string")
        return v


# A linear rope factor below this would multiply positions so much that their angles leave
# the range where float32 sin/cos (llama.cpp's) and ours agree; real files use factors >= 1.
MIN_ROPE_SCALING_FACTOR = 1.0 / 64
# The factor's older key, which llama.cpp still reads and gguf's constants no longer list.
ROPE_SCALE_LINEAR = "{arch}.rope.scale_linear"


def _attn_scale(fam: Family, n_layer: int, d: int, n_head: int, head_dim: int) -> float:
    if n_layer in fam.attn_scale_d_model_layers:
        # llama.cpp: Gemma's 27B sizes scale queries by 1/sqrt(d_model / n_head) (an
        # integer division in its code).
        return 1.0 / math.sqrt(d // n_head)
    return 1.0 / math.sqrt(head_dim) if fam.attn_scale_head_dim else 1.0


def _swa_layers(pattern: int, n_layer: int) -> tuple[bool, ...]:
    """llama.cpp's set_swa_pattern: layer il is sliding-window unless it is the last of
    each `pattern` layers; a pattern of 0 makes every layer sliding-window."""
    return tuple(pattern == 0 or i % pattern < pattern - 1 for i in range(n_layer))


def supported_architectures() -> list[str]:
    return sorted(FAMILIES)


def config_from_gguf(g: GGUFFile) -> ModelConfig:
    """Read the model's config from GGUF metadata, with llama.cpp's defaults where it is
    silent. Every value is checked for type and range before it is used."""
    arch = g.architecture
    if arch not in FAMILIES:
        raise UnsupportedModelError(
            f"{g.path}: architecture {arch!r} is not supported; supported: "
            f"{', '.join(supported_architectures())}")
    fam = FAMILIES[arch]
    md = _Metadata(g, arch)
    d = md.int(Keys.LLM.EMBEDDING_LENGTH)
    n_head = md.int(Keys.Attention.HEAD_COUNT)
    n_kv = md.int(Keys.Attention.HEAD_COUNT_KV, n_head)
    if Keys.Attention.KEY_LENGTH.format(arch=arch) not in g.metadata and n_head > d:
        raise GGUFError(g.path, md.key(Keys.Attention.HEAD_COUNT),
                        f"{n_head} heads do not fit in embedding_length {d} and the file gives "
                        f"no {md.key(Keys.Attention.KEY_LENGTH)}")
    head_dim = md.int(Keys.Attention.KEY_LENGTH, d // n_head)
    head_dim_v = md.int(Keys.Attention.VALUE_LENGTH, head_dim)
    n_layer = md.int(Keys.LLM.BLOCK_COUNT)
    if n_head % n_kv:
        raise GGUFError(g.path, md.key(Keys.Attention.HEAD_COUNT_KV),
                        f"{n_kv} does not divide the head count {n_head}")
    if n_layer > len(g.tensors):  # every layer has several tensors
        raise GGUFError(g.path, md.key(Keys.LLM.BLOCK_COUNT),
                        f"{n_layer} layers, but the file has only {len(g.tensors)} tensors")
    if "token_embd.weight" in g.tensors:
        shape = g.tensors["token_embd.weight"].shape
        if len(shape) != 2:
            raise GGUFError(g.path, "tensor 'token_embd.weight'",
                            f"expected a matrix [vocab, {d}], found shape {list(reversed(shape))}")
        vocab = shape[1]
    else:
        tokens = g.require(Keys.Tokenizer.LIST)
        if isinstance(tokens, (str, bytes)) or not hasattr(tokens, "__len__") or not len(tokens):
            raise GGUFError(g.path, Keys.Tokenizer.LIST, "expected a non-empty array of strings")
        vocab = len(tokens)
    # llama.cpp: the scaling type defaults to linear; the factor (or its older key) applies
    # unless the type is none, 0 meaning no scaling.
    scaling = md.string(Keys.Rope.SCALING_TYPE, "linear")
    rope_scale, yarn = 1.0, None
    if scaling in ("linear", "yarn"):
        factor_key = next((k for k in (Keys.Rope.SCALING_FACTOR, ROPE_SCALE_LINEAR)
                           if md.key(k) in g.metadata), Keys.Rope.SCALING_FACTOR)
        factor = md.float(factor_key, 0.0, positive=False)
        if 0 < factor < MIN_ROPE_SCALING_FACTOR:
            raise GGUFError(g.path, md.key(factor_key),
                            f"expected 0 (no scaling) or a factor >= {MIN_ROPE_SCALING_FACTOR:g} "
                            f"(positions are divided by it), found {factor!r}")
        rope_scale = 1.0 / factor if factor else 1.0
        if scaling == "yarn":
            yarn = _yarn(md, 1.0 / rope_scale)
    elif scaling != "none":
        raise UnsupportedModelError(f"{g.path}: rope scaling {scaling!r} is not supported")
    rope_base = md.float(Keys.Rope.FREQ_BASE, 10000.0, above=1.0)
    # A family with a default window (Gemma 2) always slides, so its window must be > 0.
    window = md.int(Keys.Attention.SLIDING_WINDOW, None if fam.sliding_window_required
                    else fam.sliding_window_default,
                    minimum=1 if fam.sliding_window_default or fam.sliding_window_required
                    else 0)
    swa, rope_swa = (False,) * n_layer, None
    if fam.swa_pattern and window:
        swa = _swa_layers(md.int(Keys.Attention.SLIDING_WINDOW_PATTERN, fam.swa_pattern,
                                 minimum=0), n_layer)
        # local layers: the file's rope.freq_base_swa, else the family's local base (with
        # no position scaling), else the global rope
        local = fam.rope_base_local
        rope_swa = (md.float(Keys.Rope.FREQ_BASE_SWA, rope_base if local is None else local,
                             above=1.0), rope_scale if local is None else 1.0)
    step = fam.no_rope_layer_step
    rope_on = md.bool(Keys.Rope.SCALING_FINETUNED, True) if fam.rope_switch_key else True
    no_rope = frozenset(i for i in range(n_layer)
                        if not rope_on or (step and (i + 1) % step == 0))
    if fam.tied_only and "output.weight" in g.tensors:
        raise GGUFError(g.path, "tensor 'output.weight'",
                        f"{arch} ties the unembedding to token_embd.weight: llama.cpp loads no "
                        "output.weight and refuses a file that has one")
    rope_dims = md.int(Keys.Rope.DIMENSION_COUNT, head_dim)
    if rope_dims > head_dim or rope_dims % 2:
        raise GGUFError(g.path, md.key(Keys.Rope.DIMENSION_COUNT),
                        f"expected an even number <= the head size {head_dim} "
                        f"({md.key(Keys.Attention.KEY_LENGTH)}), found {rope_dims}")
    return ModelConfig(
        arch=arch, family=fam, n_layer=n_layer, d_model=d,
        d_ff=md.int(Keys.LLM.FEED_FORWARD_LENGTH),
        n_head=n_head, n_kv_head=n_kv, head_dim=head_dim, head_dim_v=head_dim_v,
        vocab_size=vocab,
        context_length=md.int(Keys.LLM.CONTEXT_LENGTH),
        norm_eps=md.float(Keys.Attention.LAYERNORM_RMS_EPS),
        rope_base=rope_base,
        rope_scale=rope_scale,
        rope_dims=rope_dims,
        rope_attn_factor=md.float(Keys.Rope.SCALING_ATTN_FACTOR, 1.0),
        sliding_window=window or None,
        swa_layers=swa,
        attn_scale=(md.float(Keys.Attention.SCALE, 0.0, positive=False) if fam.multipliers
                    else 0.0) or _attn_scale(fam, n_layer, d, n_head, head_dim),
        embed_scale=(md.float(Keys.LLM.EMBEDDING_SCALE, 0.0, positive=False) or 1.0
                     if fam.multipliers else math.sqrt(d) if fam.embed_scale_sqrt_d else 1.0),
        final_logit_softcap=_final_logit_softcap(md, fam),
        tied_embeddings="output.weight" not in g.tensors,
        rope_swa=rope_swa,
        no_rope_layers=no_rope,
        attn_logit_softcap=None if fam.attn_logit_softcap is None else md.float(
            Keys.LLM.ATTN_LOGIT_SOFTCAPPING, fam.attn_logit_softcap),
        # 0 (llama.cpp's default) means no multiplier; the logit scale is required
        residual_scale=(md.float(Keys.LLM.RESIDUAL_SCALE, 0.0, positive=False) or 1.0
                        if fam.multipliers else 1.0),
        logit_scale=md.float(Keys.LLM.LOGIT_SCALE) if fam.multipliers else 1.0,
        rope_yarn=yarn,
        **_experts(md, fam),
    )


# llama.cpp's LLAMA_MAX_EXPERTS: it asserts expert_count <= this.
MAX_EXPERTS = 1024


def _experts(md: _Metadata, fam: Family) -> dict[str, int]:
    """The mixture of experts' sizes as llama.cpp reads them: expert_count and
    expert_used_count > 0 (it refuses 0), at most LLAMA_MAX_EXPERTS, used <= count; the
    expert FFN width defaults to feed_forward_length / expert_used_count."""
    if fam.moe_gating is None:
        return {}
    n_expert = md.int(Keys.LLM.EXPERT_COUNT)
    if n_expert > MAX_EXPERTS:
        raise md._bad(md.key(Keys.LLM.EXPERT_COUNT), n_expert,
                      f"at most {MAX_EXPERTS} experts (llama.cpp's limit)")
    used = md.int(Keys.LLM.EXPERT_USED_COUNT)
    if used > n_expert:
        raise md._bad(md.key(Keys.LLM.EXPERT_USED_COUNT), used,
                      f"at most {md.key(Keys.LLM.EXPERT_COUNT)} = {n_expert} experts per token")
    key = md.key(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH)
    d_ff_expert = md.int(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH) if key in md.g.metadata \
        else md.int(Keys.LLM.FEED_FORWARD_LENGTH) // used
    if d_ff_expert < 1:
        raise md._bad(key, 0, "a positive expert FFN width (the file gives none, and "
                      "feed_forward_length / expert_used_count is 0)")
    return {"n_expert": n_expert, "n_expert_used": used, "d_ff_expert": d_ff_expert}


def _yarn(md: _Metadata, factor: float) -> YarnRope:
    """YaRN's settings as llama.cpp derives them for a global rope factor `factor` (its
    llama_context constructor, with no yarn_log_multiplier: that is DeepSeek's)."""
    mscale = 0.1 * math.log(factor) + 1.0 if factor > 1.0 else 1.0
    return YarnRope(
        orig_ctx=md.int(Keys.Rope.SCALING_ORIG_CTX_LEN, md.int(Keys.LLM.CONTEXT_LENGTH)),
        attn_factor=mscale / (1.0 + 0.1 * math.log(factor)))


def _final_logit_softcap(md: _Metadata, fam: Family) -> float | None:
    """The final cap as llama.cpp reads it: only for families that read the key; with a
    default the cap always applies (> 0), without one 0 or absence means none."""
    if not fam.final_logit_softcap:
        return None
    if fam.final_logit_softcap_default is not None:
        return md.float(Keys.LLM.FINAL_LOGIT_SOFTCAPPING, fam.final_logit_softcap_default)
    return md.optional_float(Keys.LLM.FINAL_LOGIT_SOFTCAPPING)
