"""All detach rules in one place: the input-dependent coefficients that are frozen.

Every operation on the residual stream is written A(x)·x. With `Linearization(detach=True)`
the coefficient A(x) is computed from x as usual but its gradient is stopped, so the network
is exactly linear in its input embeddings while its forward values do not change (each rule
computes the same expression whether or not it detaches, so the forward pass is bit-identical).
With `detach=False` these functions are the plain model, for the true Jacobian.

Rules (Golden, arXiv 2505.24293):
- RMSNorm: the scalar 1/rms(x) (epsilon inside it) is frozen; the weight is a constant.
- gated MLP, gate_path="up": act(gate x) is frozen, the up projection stays linear.
  gate_path="gate": with act(g) = g·s(g), s(g) and the whole up branch are frozen, g stays
  linear. Both reconstruct the output exactly; their Jacobians differ.
- attention: the softmax probabilities are frozen (so q, k, RoPE, QK-norm, a soft-cap on the
  scores, masks never enter the linear path: all of them are computed inside the scores that
  only shape the coefficient); the values P·(W_v x) stay linear.
- mixture of experts: the router's selection and the selected experts' weights are frozen
  (computed as llama.cpp computes them, ties broken as its sort breaks them), so the layer is
  Σ_selected w_e · expert_e(x), each expert's GLU frozen by the gate path as above;
  unselected experts contribute exactly 0.
- biases (families that have them): a bias on a matmul that only shapes coefficients (q, k,
  the frozen GLU branch) is part of those coefficients; one on the linear path (v, the
  output projections, the linear GLU branch) is a constant term, so the detached network is
  affine, y = Σ_i J_i x_i + c (the v bias passes through P·(W_v x + b_v)). A replay with
  `constants=False` is the linear part alone (the frozen linear map J, which probes are pushed
  through); with `constants=True`, on a zero input, it gives c, computed independently of J.

Each coefficient has a site name ("attn_norm", "attn_probs", "gate", ...). A `Linearization`
may carry a `store`: when `replay` is False the computed coefficients are recorded in it, when
True they are taken from it and never computed — the streaming engine's reverse sweep replays a
layer this way without the weights that only shape coefficients (q, k, the gate).

Anchoring (anchor.py) adds `given` coefficients, taken from llama.cpp's own run instead of
computed, and one more kind of frozen coefficient: a runtime's rounding of an activation on the
linear path (8-bit quantization before a quantized matmul, F16 storage of V, an F16
accumulator) frozen as the ratio r = rounded(x) / x, so x ↦ r ⊙ x is linear and reproduces the
rounded value at this input; for Q4_1/Q5_1 weights also the ratio of each activation block's
stored sum to the sum of its rounded values (`frozen_block_sums`), which multiplies the
weights' block minima alone. Without `given` ratios there is no such site: `frozen_rounding`
is the identity and the forward pass is unchanged. An `Anchor` is those given coefficients
for one prompt, as plain data (anchor.py makes one from a llama.cpp run; the engine, which
only reads it, needs nothing of llama.cpp).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
import torch

from .run_settings import DEFAULT_SETTINGS, RunSettings

GATE_PATHS = ("up", "gate")


class Site(StrEnum):
    """Every place a coefficient is frozen or a rounding ratio applied: the keys of a
    recorded store and of an anchor's given coefficients. A name not listed here fails when
    it is first used, so a misspelled site can never skip a rounding silently."""

    ATTN_NORM = "attn_norm"  # RMSNorm scales 1/rms, one per norm
    FFN_NORM = "ffn_norm"
    POST_ATTENTION_NORM = "post_attention_norm"
    POST_FFW_NORM = "post_ffw_norm"
    ATTN_Q_NORM = "attn_q_norm"
    ATTN_K_NORM = "attn_k_norm"
    OUTPUT_NORM = "output_norm"
    ATTN_PROBS = "attn_probs"  # softmax probabilities
    GATE = "gate"  # gate path "up": act(g)
    GATE_FACTOR = "gate_factor"  # gate path "gate": s(g) and the up branch
    UP = "up"
    # the clamped SwiGLU (gpt-oss): where the linear branch is clamped, a 0/1 mask (the
    # clamp's slope) and the value it adds there instead (see `swiglu_oai_product`)
    GLU_CLAMP = "glu_clamp"
    GLU_CLAMP_OFFSET = "glu_clamp_offset"
    # rounding ratios (anchored runs): each linear-path matmul's input, F16 V, P·V's sum
    IN_ATTN_V = "in:attn_v"
    IN_ATTN_OUTPUT = "in:attn_output"
    IN_FFN_GATE = "in:ffn_gate"
    IN_FFN_UP = "in:ffn_up"
    IN_FFN_DOWN = "in:ffn_down"
    # block-sum ratios (anchored runs, Q4_1/Q5_1 weights): each 32-value block's sum as the
    # runtime stores it (Q8_1's F16 sum) over the sum of the block's rounded values
    SUM_ATTN_V = "sum:attn_v"
    SUM_ATTN_OUTPUT = "sum:attn_output"
    SUM_FFN_GATE = "sum:ffn_gate"
    SUM_FFN_UP = "sum:ffn_up"
    SUM_FFN_DOWN = "sum:ffn_down"
    V_CACHE = "v_cache"
    ATTN_SUM = "attn_sum"
    # a mixture of experts' routing, frozen like the gate: the experts each token selected
    # [N, k] (int64, in llama.cpp's order) and their weights [N, k]; the experts' own GLU
    # coefficients are the gate sites above, one row per selected expert, [N, k, d_ff_expert]
    MOE_EXPERTS = "moe_experts"
    MOE_WEIGHTS = "moe_weights"
    # rounding ratios of the experts' matmul inputs (anchored runs): [N, d] for gate and up
    # (one quantization of each position's input serves every expert), [N, k, d_ff_expert]
    # for down
    IN_FFN_GATE_EXPS = "in:ffn_gate_exps"
    IN_FFN_UP_EXPS = "in:ffn_up_exps"
    IN_FFN_DOWN_EXPS = "in:ffn_down_exps"


Coefficients = dict[str, torch.Tensor]  # frozen coefficients by Site (a Site is its str)

# Sites whose coefficients are one row per position ([N, ...]): the norms, the MLP's, and
# the roundings of the matmuls that act on one position at a time.
POSITION_WISE = frozenset({Site.ATTN_NORM, Site.FFN_NORM, Site.POST_ATTENTION_NORM,
                           Site.POST_FFW_NORM, Site.OUTPUT_NORM, Site.GATE, Site.GATE_FACTOR,
                           Site.UP, Site.GLU_CLAMP, Site.GLU_CLAMP_OFFSET,
                           Site.IN_FFN_GATE, Site.IN_FFN_UP, Site.IN_FFN_DOWN,
                           Site.SUM_FFN_GATE, Site.SUM_FFN_UP, Site.SUM_FFN_DOWN,
                           Site.MOE_EXPERTS, Site.MOE_WEIGHTS, Site.IN_FFN_GATE_EXPS,
                           Site.IN_FFN_UP_EXPS, Site.IN_FFN_DOWN_EXPS})


def at_last_position(store: Coefficients) -> Coefficients:
    """The recorded coefficients with the position-wise ones cut to the last position, for
    a position-wise branch (the MLP) run on the last row alone."""
    return {site: c[-1:] if Site(site) in POSITION_WISE and c.dim() >= 2 and c.shape[0] > 1
            else c for site, c in store.items()}


@dataclass(frozen=True)
class Linearization:
    detach: bool = True
    gate_path: str = "up"
    store: Coefficients | None = dataclasses.field(default=None, compare=False)
    replay: bool = False
    # Coefficients given from outside (llama.cpp's values, see anchor.py), used as computed.
    given: Coefficients | None = dataclasses.field(default=None, compare=False)
    # False: only the shape of the linear path's values is wanted (a replay run for its
    # vector-Jacobian products), so matrices read in row blocks skip their forward products.
    values: bool = True
    # Whether biases are added (`add_bias`). Only a replay may leave them out: the network
    # with its coefficients frozen, constants off, is the linear map J itself.
    constants: bool = True

    def __post_init__(self) -> None:
        if self.gate_path not in GATE_PATHS:
            raise ValueError(f"gate_path must be one of {GATE_PATHS}, not {self.gate_path!r}")
        if self.replay and (self.store is None or not self.detach):
            raise ValueError("replaying coefficients needs a store and detach=True")
        if not self.constants and not self.replay:
            raise ValueError("only a replay leaves the biases out (computed coefficients "
                             "need them)")

    def recording(self, store: Coefficients, given: Coefficients | None = None) -> Linearization:
        return dataclasses.replace(self, store=store, replay=False, given=given, values=True,
                                   constants=True)

    def replaying(self, store: Coefficients, values: bool = True,
                  constants: bool = False) -> Linearization:
        """Replay the recorded coefficients: the frozen linear map J (the biases left out);
        `constants=True` adds them, for the affine network's values (on a zero input: c).
        `values=False` when only vector-Jacobian products of the replay will be taken (its
        outputs' values are then not computed)."""
        return dataclasses.replace(self, store=store, replay=True, values=values,
                                   constants=constants)

    def coefficient(self, site: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The coefficient at `site`: computed (and recorded), or replayed; frozen if detached."""
        site = Site(site)
        if self.replay:
            return self.store[site]  # type: ignore[index]
        value = self.given[site] if self.given is not None and site in self.given else compute()
        if self.store is not None:
            self.store[site] = value.detach()
        return value.detach() if self.detach else value

    def rounding(self, site: str) -> torch.Tensor | None:
        """The frozen rounding ratio at `site`, if one is given (or was recorded)."""
        site = Site(site)
        if self.replay:
            return self.store.get(site)  # type: ignore[union-attr]
        if self.given is None or site not in self.given:
            return None
        return self.coefficient(site, lambda: self.given[site])  # type: ignore[index]


PLAIN = Linearization(detach=False)
DETACHED = Linearization(detach=True)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, lin: Linearization,
             site: str) -> torch.Tensor:
    """x · (1/rms(x)) · weight over the last dimension; 1/rms(x) is the frozen coefficient."""
    inv_rms = lin.coefficient(site, lambda: torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps))
    return x * inv_rms * weight


def gate_factor(g: torch.Tensor, activation: str) -> torch.Tensor:
    """s(g) with act(g) = g · s(g): sigmoid for SiLU, the tanh factor for GELU (tanh form)."""
    if activation == "silu":
        return torch.sigmoid(g)
    if activation == "gelu_tanh":
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (g + 0.044715 * g.pow(3))))
    raise ValueError(f"unknown activation {activation!r}")


# gpt-oss's SwiGLU constants, fixed in llama.cpp's code (build_moe_ffn, LLM_FFN_SWIGLU_OAI_MOE)
# as float32 values: alpha = 1.702f, limit = 7.0f.
SWIGLU_OAI_ALPHA = float(np.float32(1.702))
SWIGLU_OAI_LIMIT = 7.0


def _clamped_linear(v: torch.Tensor, lin: Linearization, lower: bool, one: float
                    ) -> torch.Tensor:
    """clamp(v) + one, where clamp is min(v, limit) (and max(v, -limit) when `lower`), on
    the linear path: m ⊙ v + k with the mask m = 1 where v is inside the limits (the clamp's
    slope) and k = `one` there, clamp(v) + `one` (a constant ±limit + one) where it is
    clamped; m and k are frozen, k is a constant term (dropped with the biases in the linear
    map J). Bit-identical to the plain clamp(v) + one: 1·v + one and 0·v + k round alike."""
    limit = SWIGLU_OAI_LIMIT

    def inside() -> torch.Tensor:
        m = v <= limit
        return (m & (v >= -limit) if lower else m).to(v.dtype)

    m = lin.coefficient("glu_clamp", inside)
    k = lin.coefficient("glu_clamp_offset", lambda: torch.where(
        m.bool(), torch.full_like(v, one),
        v.clamp(-limit if lower else None, limit) + one))
    return add_bias(v * m, k, lin)


def swiglu_oai_product(gate: Callable[[], torch.Tensor], up: Callable[[], torch.Tensor],
                       lin: Linearization) -> torch.Tensor:
    """gpt-oss's GLU as ggml's swiglu_oai computes it: x = min(g, limit), y = clamp(u, ±limit),
    (x · σ(α x)) · (y + 1) (ggml writes x / (1 + e^(-α x)); the product with σ is the form
    whose factor can be frozen). Detached:
    - gate path "up": a = x · σ(α x) frozen; y + 1 = m ⊙ u + k (`_clamped_linear`), so the
      linear part is a ⊙ m ⊙ u, and a ⊙ k — a itself where u is not clamped: the "+1" — is
      a constant term of c.
    - gate path "gate": σ(α x) and y + 1 frozen; x = m ⊙ g + k with k = limit where g is
      clamped, 0 elsewhere, so the linear part is m ⊙ σ ⊙ (y + 1) ⊙ g and the clamped
      entries' limit · σ(α limit) · (y + 1) are constant.
    Each mode evaluates the same expression, so the values are bit-identical."""
    limit, alpha = SWIGLU_OAI_LIMIT, SWIGLU_OAI_ALPHA
    if not lin.detach:
        x, y = gate().clamp(max=limit), up().clamp(-limit, limit)
        return (x * torch.sigmoid(alpha * x)) * (y + 1)
    if lin.gate_path == "up":
        def activated() -> torch.Tensor:
            x = gate().clamp(max=limit)
            return x * torch.sigmoid(alpha * x)
        return lin.coefficient("gate", activated) * _clamped_linear(up(), lin, True, 1.0)
    g = gate()
    s = lin.coefficient("gate_factor", lambda: torch.sigmoid(alpha * g.clamp(max=limit)))
    x = _clamped_linear(g, lin, False, 0.0)
    return (x * s) * lin.coefficient("up", lambda: up().clamp(-limit, limit) + 1)


def gated_product(gate: Callable[[], torch.Tensor], up: Callable[[], torch.Tensor],
                  activation: str, lin: Linearization) -> torch.Tensor:
    """act(g) ⊙ u for g = gate(), u = up(), with the coefficients frozen as `lin.gate_path` says.

    Always evaluated as (g · s(g)) · u, so every mode gives bit-identical values. The branch
    that is frozen is only computed when its coefficient is not replayed.
    """
    if activation == "swiglu_oai":
        return swiglu_oai_product(gate, up, lin)
    if not lin.detach:
        g = gate()
        return (g * gate_factor(g, activation)) * up()
    if lin.gate_path == "up":
        def activated() -> torch.Tensor:
            g = gate()
            return g * gate_factor(g, activation)
        return lin.coefficient("gate", activated) * up()
    g = gate()
    s = lin.coefficient("gate_factor", lambda: gate_factor(g, activation))
    return (g * s) * lin.coefficient("up", up)


def glu_linear_branch(store: Coefficients, gate_path: str
                      ) -> tuple[str, torch.Tensor]:
    """The gated product act(g) ⊙ u, replayed from recorded coefficients, as c ⊙ (linear
    branch): which projection stays linear ('ffn_up' or 'ffn_gate') and c [N, d_ff]."""
    name, c = ("ffn_up", store["gate"]) if gate_path == "up" else \
        ("ffn_gate", store["gate_factor"] * store["up"])  # (g · s) · u = g ⊙ (s · u)
    if (m := store.get("glu_clamp")) is not None:  # a clamped linear branch (swiglu_oai)
        c = c * m
    return name, c


def add_bias(y: torch.Tensor, bias: torch.Tensor | None, lin: Linearization) -> torch.Tensor:
    """y + b for a matmul with a bias; the frozen linear map (`lin.constants` False) leaves
    it out, so the same block is J's linear part there and the affine network elsewhere."""
    return y if bias is None or not lin.constants else y + bias


def frozen_rounding(x: torch.Tensor, lin: Linearization, site: str) -> torch.Tensor:
    """r ⊙ x, r = rounded(x)/x frozen at the runtime's values (anchored runs); else x itself."""
    r = lin.rounding(site)
    return x if r is None else x * r


def frozen_block_sums(x: torch.Tensor, lin: Linearization, site: str) -> torch.Tensor | None:
    """(ρ − 1) ⊙ (the block sums of x) [..., blocks], with ρ [N, blocks] the frozen ratio of
    each block's sum as the runtime stores it to the sum of x's values in it (anchored runs
    with Q4_1/Q5_1 weights; else None).

    ggml multiplies those weights' block minimum m by the activation block's sum s as Q8_1
    stores it, fp16(d·Σq), not by the sum of the rounded values, d_f16·Σq: the exact product is
    W·x + M·((ρ − 1) ⊙ blocksum(x)) for x the rounded input and M the weight's minima
    [rows, blocks]; a term on the minima alone, so it is no per-element ratio of x."""
    rho = lin.rounding(site)
    if rho is None:
        return None
    sums = x.reshape(*x.shape[:-1], rho.shape[-1], -1).sum(dim=-1)
    return sums * (rho - 1)


def attention_probs(masked_scores: Callable[[], torch.Tensor], lin: Linearization,
                    sinks: torch.Tensor | None = None) -> torch.Tensor:
    """softmax over keys of masked_scores() [heads, N, keys] (-inf where masked): the frozen
    coefficients. With `sinks` [heads] (gpt-oss) each head's sink logit joins the softmax
    as one more key without a value, as ggml's soft_max and flash kernels add it: the
    probabilities over the real keys sum to less than 1."""
    def probs() -> torch.Tensor:
        scores = masked_scores()
        if sinks is None:
            return torch.softmax(scores, dim=-1)
        sink = sinks.to(scores.dtype).view(-1, 1, 1).expand(*scores.shape[:-1], 1)
        return torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)[..., :-1]
    return lin.coefficient("attn_probs", probs)


# -- given coefficients: an anchor ------------------------------------------------------------

def is_rounding_site(site: str) -> bool:
    """Sites of frozen rounding ratios (see `frozen_rounding`)."""
    return site.startswith(("in:", "sum:")) or site in ("v_cache", "attn_sum")


@dataclass
class ReferenceRun:
    """An independent llama.cpp run on the same tokens (its own process), for the figures
    an anchored report states besides those against the run it was anchored to."""

    settings: RunSettings
    resolved: dict[str, object]
    output: np.ndarray  # the last position's final-norm output [d] ('result_norm')
    logits: np.ndarray  # the last position's logits [vocab]


@dataclass
class Anchor:
    """llama.cpp's frozen coefficients for one prompt, per layer, as given coefficients."""

    flash_attn: bool  # whether flash attention ran in the anchored run
    gate_path: str  # the detach rule the MLP coefficients were derived for
    layers: list[Coefficients]
    output_ratio: torch.Tensor | None  # the unembedding matmul's input rounding [N, d]
    output: torch.Tensor  # llama.cpp's final-norm output [N, d] (float32 values)
    logits: np.ndarray  # llama.cpp's logits [N, vocab]
    settings: RunSettings = DEFAULT_SETTINGS  # how llama.cpp was run
    resolved: dict[str, object] = field(default_factory=dict)  # what it resolved and reported
    sources: dict[str, str] = field(default_factory=dict)  # site -> where it came from
    approximations: list[str] = field(default_factory=list)  # what is not reproduced exactly
    reference: ReferenceRun | None = None  # an independent default run, if one was made

    def __post_init__(self) -> None:
        for coefficients in self.layers:
            for site in coefficients:
                Site(site)  # a misspelled site is refused here, not skipped in the sweep

    def without_roundings(self) -> Anchor:
        """llama.cpp's probabilities and gates only, none of its roundings: still exactly
        linear, no longer llama.cpp's output; shows how much of the change the roundings make."""
        layers = [{k: v for k, v in c.items() if not is_rounding_site(k)} for c in self.layers]
        return dataclasses.replace(self, layers=layers, output_ratio=None)


def logit_input(y: torch.Tensor, anchor: Anchor | None) -> torch.Tensor:
    """What the unembedding multiplies for the last position's y: y itself, or, anchored,
    y with llama.cpp's rounding of that matmul's input (a frozen ratio) applied."""
    if anchor is None or anchor.output_ratio is None:
        return y
    return y * anchor.output_ratio[-1]
