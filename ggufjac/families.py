"""Model families as data: what differs between architectures, and the config read from GGUF.

A `Family` row says how a family's block is wired (norm placement, QK-norm, activation, rope
layout, embedding scale) and which defaults llama.cpp fills in when the file is silent.
`ModelConfig` holds the sizes of one file. Nothing here touches tensor data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import GGUFError, UnsupportedModelError
from .gguf_file import GGUFFile


@dataclass(frozen=True)
class Family:
    """How one GGUF architecture's transformer block differs from the others."""

    norm_layout: str  # "pre": x + f(norm(x)); "sandwich": x + norm(f(norm(x))); "post": x + norm(f(x))
    qk_norm: str  # "none" | "head" (RMSNorm over each head) | "full" (over all of q or k)
    activation: str  # gate activation of the gated MLP: "silu" | "gelu_tanh"
    rope_neox: bool  # rotate pairs (i, i + n/2) (NEOX) rather than (2i, 2i + 1)
    embed_scale_sqrt_d: bool = False  # inputs scaled by sqrt(d_model) (Gemma)
    swa_pattern: int = 0  # every swa_pattern-th layer is global, the others sliding-window
    rope_base_local: float | None = None  # rope base of sliding-window layers
    attn_scale_head_dim: bool = True  # queries scaled by 1/sqrt(head_dim)
    fused_qkv: bool = False  # one attn_qkv tensor holds q, k, v (rows in that order)
    fused_gate_up: bool = False  # ffn_up holds gate rows, then up rows (Phi 3)
    rope_factors: tuple[str, ...] = ()  # tensors of per-frequency divisors, first found wins


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
                   rope_factors=("rope_factors_short.weight",)),
    "olmo2": Family(norm_layout="post", qk_norm="full", activation="silu", rope_neox=True),
    "gemma3": Family(norm_layout="sandwich", qk_norm="head", activation="gelu_tanh",
                     rope_neox=True, embed_scale_sqrt_d=True, swa_pattern=6,
                     rope_base_local=10000.0),
}


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

    def rope_for_layer(self, layer: int) -> tuple[float, float]:
        """(base, position scale) of the rotary embedding used in `layer`."""
        if self.swa_layers[layer] and self.family.rope_base_local is not None:
            return self.family.rope_base_local, 1.0
        return self.rope_base, self.rope_scale

    def weights_per_layer(self) -> dict[str, int]:
        """Parameter counts of one layer: all projections, and the Jacobian's linear path."""
        q = self.d_model * self.n_head * self.head_dim
        k = self.d_model * self.n_kv_head * self.head_dim
        v = self.d_model * self.n_kv_head * self.head_dim_v
        o = self.n_head * self.head_dim_v * self.d_model
        mlp = self.d_model * self.d_ff
        return {"all": q + k + v + o + 3 * mlp, "linear_path": v + o + 2 * mlp}


def mlp_as_matrix(cfg: ModelConfig, n_directions: int) -> bool:
    """Per position, n directions cost 2·n·d·d_ff multiply-adds by autograd through the MLP's
    two projections, d·d·d_ff + n·d·d through its matrix (model.mlp_branch_matrix)."""
    d, f = cfg.d_model, cfg.d_ff
    return n_directions * (2 * f - d) > d * f


def sweep_flop(cfg: ModelConfig, n_tokens: int, n_directions: int) -> float:
    """Floating-point operations (2 per multiply-add) of one reverse sweep pulling
    `n_directions` back to the inputs, as the engine does it: the attention's v and o
    projections by batched VJPs, the MLP by VJPs or by its per-position matrices, whichever
    costs less (these skip the positions without cotangents: at the top layer, all but the
    last)."""
    d, f, n, m, layers = cfg.d_model, cfg.d_ff, n_tokens, n_directions, cfg.n_layer
    attention = 2 * m * n * (d * cfg.n_kv_head * cfg.head_dim_v + cfg.n_head * cfg.head_dim_v * d)
    if mlp_as_matrix(cfg, m):
        mlp = 2 * (d * d * f + m * d * d) * ((layers - 1) * n + 1)
    else:
        mlp = 2 * m * n * 2 * d * f * layers
    return float(layers * attention + mlp)


def _get_int(g: GGUFFile, key: str, default: int | None = None) -> int:
    if key not in g.metadata and default is not None:
        return default
    v = g.require(key)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise GGUFError(g.path, key, f"expected a positive integer, found {v!r}")
    return v


def _get_float(g: GGUFFile, key: str, default: float | None = None) -> float:
    if key not in g.metadata and default is not None:
        return default
    v = g.require(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise GGUFError(g.path, key, f"expected a finite number, found {v!r}")
    return float(v)


def _attn_scale(arch: str, fam: Family, n_layer: int, d: int, n_head: int, head_dim: int) -> float:
    if arch == "gemma3" and n_layer == 62:
        # llama.cpp: Gemma 3 27B (62 layers) scales queries by 1/sqrt(d_model / n_head).
        return 1.0 / math.sqrt(d / n_head)
    return 1.0 / math.sqrt(head_dim) if fam.attn_scale_head_dim else 1.0


def supported_architectures() -> list[str]:
    return sorted(FAMILIES)


def config_from_gguf(g: GGUFFile) -> ModelConfig:
    """Read the model's config from GGUF metadata, with llama.cpp's defaults where it is silent."""
    arch = g.architecture
    if arch not in FAMILIES:
        raise UnsupportedModelError(
            f"{g.path}: architecture {arch!r} is not supported; supported: "
            f"{', '.join(supported_architectures())}")
    fam = FAMILIES[arch]
    a = arch + "."
    d = _get_int(g, a + "embedding_length")
    n_head = _get_int(g, a + "attention.head_count")
    n_kv = _get_int(g, a + "attention.head_count_kv", n_head)
    head_dim = _get_int(g, a + "attention.key_length", d // n_head)
    head_dim_v = _get_int(g, a + "attention.value_length", head_dim)
    n_layer = _get_int(g, a + "block_count")
    if n_head % n_kv:
        raise GGUFError(g.path, a + "attention.head_count_kv",
                        f"{n_kv} does not divide the head count {n_head}")
    if "token_embd.weight" in g.tensors:
        vocab = g.tensors["token_embd.weight"].shape[1]
    else:
        vocab = len(g.require("tokenizer.ggml.tokens"))
    scaling = g.get(a + "rope.scaling.type", "none")
    rope_scale = 1.0
    if scaling == "linear":
        rope_scale = 1.0 / _get_float(g, a + "rope.scaling.factor", 1.0)
    elif scaling not in ("none", None):
        raise UnsupportedModelError(f"{g.path}: rope scaling {scaling!r} is not supported")
    window = g.get(a + "attention.sliding_window")
    if fam.swa_pattern and window:
        # llama.cpp: layer il is sliding-window unless (il + 1) is a multiple of the pattern.
        swa = tuple((i + 1) % fam.swa_pattern != 0 for i in range(n_layer))
    else:
        swa = (False,) * n_layer
    softcap = g.get(a + "final_logit_softcapping")
    return ModelConfig(
        arch=arch, family=fam, n_layer=n_layer, d_model=d,
        d_ff=_get_int(g, a + "feed_forward_length"),
        n_head=n_head, n_kv_head=n_kv, head_dim=head_dim, head_dim_v=head_dim_v,
        vocab_size=vocab,
        context_length=_get_int(g, a + "context_length"),
        norm_eps=_get_float(g, a + "attention.layer_norm_rms_epsilon"),
        rope_base=_get_float(g, a + "rope.freq_base", 10000.0),
        rope_scale=rope_scale,
        rope_dims=_get_int(g, a + "rope.dimension_count", head_dim),
        rope_attn_factor=_get_float(g, a + "rope.scaling.attn_factor", 1.0),
        sliding_window=int(window) if window else None,
        swa_layers=swa,
        attn_scale=_attn_scale(arch, fam, n_layer, d, n_head, head_dim),
        embed_scale=math.sqrt(d) if fam.embed_scale_sqrt_d else 1.0,
        final_logit_softcap=float(softcap) if softcap else None,
        tied_embeddings="output.weight" not in g.tensors,
    )
