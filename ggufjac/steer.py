"""Steering generation with a source prompt's detached Jacobians, and measuring it.

Operators, each a change of the residual stream after block L (llama.cpp's `l_out-L`):
- "jacobian" (Golden, arXiv 2505.24293): J, the source's cumulative map at L (input
  embeddings -> the frozen final norm of the residual after block L, last position; the
  `cumulative` map of `ggufjac layers`), n_src positions. For the steered sequence with
  input embeddings e_k: s_k = J[:, k mod n_src, :] e_k, a_i = Σ_{k≤i} s_k, and the residual
  h_i gains λ a_i ‖h_i‖ / (2 ‖a_i‖) at every position i. Position-dependent: no control
  vector can express it.
- "concept-direction": one unit vector u per steered block, the concept tokens' logit rows
  pulled back through the source's detached map from that block's output (last position)
  to the output: the direction the source's own linear map reads as the concept (the
  exact attribution sweep, stopped at block L); h_i gains λ ‖h_i‖ u.
- "cumulative-direction" / "layer-direction": u is the top left singular vector of the
  source's cumulative map at that block (or of the block's own map, input -> output with
  the residual), signed so u·(map output) > 0; h_i gains λ ‖h_i‖ u.
- a control vector (cvector.py): fixed vectors v_N added after block N, as llama.cpp adds
  them. `control_vector` makes one from a direction operator: v_N = λ ‖h_src‖ u_N, ‖h_src‖
  the source's residual norm after block N at its last position.

Generation is greedy with a KV cache (one forward step per token). Every operator's change
at position i depends only on positions ≤ i, so steering the prompt once and each new
token as it comes equals recomputing the steered prefix at every step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .analysis import spectrum, top_tokens_by_unembedding
from .cvector import ControlVector
from .errors import GgufjacError
from .layers import LayerMap, layer_maps, lens_maps
from .linearize import PLAIN, Linearization
from .runner import ResidualEdit, Transformer

if TYPE_CHECKING:
    from .api import LoadedModel

OPERATORS = ("jacobian", "concept-direction", "cumulative-direction", "layer-direction")
# λ by operator: the paper's Gemma 3 value for its operator; for the directions, a fraction
# of ‖h‖ that moves Gemma 3 270M's next-token logits by a few units (docs/steering.md)
DEFAULT_SCALES = {"jacobian": 0.17, "concept-direction": 0.02, "cumulative-direction": 0.03,
                  "layer-direction": 0.03}


def check_memory(m: LoadedModel) -> None:
    """Generation runs the in-memory model (every layer dequantized, and the unembedding
    table held): refuse a model that does not fit the memory available, before loading it."""
    from .engine import available_bytes
    from .units import format_size

    itemsize = torch.empty((), dtype=m.weights.dtype).element_size()
    need = itemsize * sum(info.n_elements for info in m.gguf.tensors.values())
    have = available_bytes(m.weights.device)
    if need > 0.9 * have:
        raise GgufjacError(f"steering holds the whole model in memory: {format_size(need)} in "
                           f"{str(m.weights.dtype).removeprefix('torch.')}, and "
                           f"{format_size(have)} is available")


def check_context(m: LoadedModel, prompt: list[int], n_new: int) -> None:
    if len(prompt) + n_new > m.cfg.context_length:
        raise GgufjacError(f"the prompt's {len(prompt)} tokens and --tokens {n_new} make "
                           f"{len(prompt) + n_new}, more than the model's context length "
                           f"({m.cfg.context_length})")


def default_layer(n_layer: int) -> int:
    """Two thirds of the depth, as the paper's notebooks steer (e.g. 22 of 32 layers)."""
    return min(n_layer - 1, (2 * n_layer) // 3)


@dataclass
class SourceMap:
    """What steering takes from the source prompt at one block."""

    layer: int
    cumulative: torch.Tensor | None  # [d, n_src, d] (not made for concept-direction)
    direction: torch.Tensor  # [d] unit: top left singular vector of the chosen map
    residual_norm: float  # ‖h‖ after this block, the source's last position


def source_maps(m: LoadedModel, tokens: list[int], layers: Sequence[int], operator: str,
                concepts: Sequence[int] | None = None, lin: Linearization | None = None
                ) -> dict[int, SourceMap]:
    """The source's maps at `layers` on the streaming engine; "concept-direction" reads the
    concept tokens (default: the source's own next token, from the same forward pass)."""
    if operator not in OPERATORS:
        raise GgufjacError(f"operator {operator!r} is not one of {', '.join(OPERATORS)}")
    engine = m.engine(lin or Linearization())
    inputs = engine.embed(tokens)
    layers = sorted(set(layers))
    if operator == "concept-direction":
        record = engine.forward(inputs)
        if not concepts:
            concepts = [t for t, _ in top_tokens_by_unembedding(
                m.weights, record.output[-1][:, None], 1)[0]]
        rows = m.logit_rows(list(concepts), None)
        cot = engine.output_cotangents(record.residuals[-1], rows)
        out = {}
        for l in layers:  # the concepts' logit rows pulled back to the residual after l
            g = engine.pull_back(record, {engine.cfg.n_layer: cot}, to_residual=l + 1)[:, -1]
            u = g.sum(dim=0)
            out[l] = SourceMap(l, None, u / torch.linalg.vector_norm(u),
                               float(torch.linalg.vector_norm(record.residuals[l + 1][-1])))
        return out
    if operator == "layer-direction":
        maps, _ = layer_maps(engine, inputs, layers)
        residuals = None
    else:
        record = engine.forward(inputs)
        maps = lens_maps(engine, record, inputs, layers,
                         engine.plan(engine.cfg.d_model * len(layers), len(tokens)).chunk)
        residuals = {l: float(torch.linalg.vector_norm(record.residuals[l + 1][-1]))
                     for l in layers}
    by_layer: dict[int, dict[str, LayerMap]] = {}
    for mp in maps:
        by_layer.setdefault(mp.layer, {})[mp.kind] = mp
    out = {}
    for l in layers:
        cum = by_layer[l]["cumulative"]
        chosen = by_layer[l]["layer" if operator == "layer-direction" else "cumulative"]
        d, n, d_in = chosen.jacobian.shape
        u = spectrum(chosen.jacobian.reshape(d, n * d_in), chosen.output).left[:, 0]
        norm = residuals[l] if residuals is not None else \
            float(torch.linalg.vector_norm(chosen.output))
        out[l] = SourceMap(l, cum.jacobian, u, norm)
    return out


class Steering:
    """A change of the residual stream after some blocks, given the input embeddings of
    every position so far (the Jacobian operator reads them)."""

    layers: frozenset[int]

    def delta(self, layer: int, h: torch.Tensor, start: int, inputs: torch.Tensor
              ) -> torch.Tensor:
        raise NotImplementedError


@dataclass
class JacobianSteering(Steering):
    layer: int
    jacobian: torch.Tensor  # [d, n_src, d]
    scale: float

    def __post_init__(self) -> None:
        self.layers = frozenset({self.layer})

    def delta(self, layer: int, h: torch.Tensor, start: int, inputs: torch.Tensor
              ) -> torch.Tensor:
        n_src = self.jacobian.shape[1]
        upto = start + h.shape[0]
        which = torch.arange(upto, device=h.device) % n_src
        s = torch.einsum("dkj,kj->kd", self.jacobian[:, which, :].to(h.dtype), inputs[:upto])
        a = s.cumsum(dim=0)[start:]
        a_norm = torch.linalg.vector_norm(a, dim=-1, keepdim=True)
        # a_i = 0 (a zero embedding row, e.g. a padding BOS) has no direction: no change
        factor = torch.linalg.vector_norm(h, dim=-1, keepdim=True) / (2 * a_norm)
        return self.scale * a * torch.where(a_norm > 0, factor, torch.zeros_like(factor))


@dataclass
class DirectionSteering(Steering):
    """h_i gains ‖h_i‖ v (relative) or v itself (a control vector's fixed vectors)."""

    vectors: dict[int, torch.Tensor]
    relative: bool

    def __post_init__(self) -> None:
        self.layers = frozenset(self.vectors)

    def delta(self, layer: int, h: torch.Tensor, start: int, inputs: torch.Tensor
              ) -> torch.Tensor:
        v = self.vectors[layer].to(h.dtype)
        return torch.linalg.vector_norm(h, dim=-1, keepdim=True) * v if self.relative else \
            v.expand_as(h)


def operator_steering(operator: str, maps: dict[int, SourceMap], scale: float) -> Steering:
    if operator == "jacobian":
        (mp,) = maps.values()
        return JacobianSteering(mp.layer, mp.cumulative, scale)
    return DirectionSteering({l: scale * mp.direction for l, mp in maps.items()}, relative=True)


def random_control(steering: Steering, scale: float, seed: int, d: int, dtype: torch.dtype
                   ) -> DirectionSteering:
    """Random unit directions (one per steered block, from `seed`) changing h by the same
    norm as `steering` does: λ‖h‖/2 for the Jacobian operator, λ‖h‖ for a direction."""
    gen = torch.Generator().manual_seed(seed)
    size = scale / 2 if isinstance(steering, JacobianSteering) else scale
    vectors = {}
    for l in sorted(steering.layers):
        r = torch.randn(d, generator=gen, dtype=torch.float64)
        vectors[l] = (size * r / torch.linalg.vector_norm(r)).to(dtype)
    return DirectionSteering(vectors, relative=True)


def control_vector(maps: dict[int, SourceMap], scale: float, model_hint: str) -> ControlVector:
    return ControlVector({l: scale * mp.residual_norm * mp.direction for l, mp in maps.items()},
                         model_hint)


def _edit(steering: Steering | None, inputs: list[torch.Tensor]) -> ResidualEdit | None:
    if steering is None:
        return None

    def edit(layer: int, h: torch.Tensor, start: int) -> torch.Tensor:
        if layer not in steering.layers:
            return h
        return h + steering.delta(layer, h, start, torch.cat(inputs))
    return edit


@dataclass
class Continuation:
    """A greedy continuation: its tokens, and per step the probability the model gave the
    concept tokens (all together) before the step's token was chosen."""

    tokens: list[int]
    concept_probability: list[float] = field(default_factory=list)


@torch.no_grad()
def generate(model: Transformer, prompt: list[int], n_new: int,
             steering: Steering | None = None, concepts: Sequence[int] = (),
             stop: Sequence[int] = ()) -> Continuation:
    """Greedy generation with a KV cache: the prompt once, then one position per step."""
    model.hold_unembedding()
    caches = model.new_caches()
    inputs = [model.embed(prompt)]
    edit = _edit(steering, inputs)
    logits = model.forward(inputs[0], PLAIN, edit=edit, caches=caches)[-1:]
    out = Continuation([])
    concept_ids = torch.as_tensor(list(concepts), dtype=torch.long)
    for step in range(n_new):
        z = model.logits(logits[-1])
        if len(concept_ids):
            p = torch.softmax(z.to(torch.float64), dim=-1)
            out.concept_probability.append(float(p[concept_ids].sum()))
        token = int(z.argmax())
        out.tokens.append(token)
        if token in stop or step == n_new - 1:
            break
        inputs.append(model.embed([token]))
        logits = model.forward(inputs[-1], PLAIN, edit=edit, caches=caches)
    return out


def top_next_tokens(m: LoadedModel, tokens: list[int], k: int) -> list[int]:
    """The k most likely next tokens after `tokens`, on the streaming engine (no whole
    model in memory: `cvector` runs on files larger than RAM)."""
    engine = m.engine()
    y = engine.forward(engine.embed(tokens)).output[-1]
    return [t for t, _ in top_tokens_by_unembedding(m.weights, y[:, None], k)[0]]


@torch.no_grad()
def perplexity(model: Transformer, prompt: list[int], continuation: list[int]) -> float:
    """The unsteered model's perplexity of `continuation` after `prompt` (teacher-forced)."""
    if not continuation:
        return float("nan")
    model.hold_unembedding()
    seq = prompt + continuation
    y = model.forward(model.embed(seq[:-1]), PLAIN)[len(prompt) - 1:]
    logp = torch.log_softmax(model.logits(y).to(torch.float64), dim=-1)
    nll = -logp[torch.arange(len(continuation)), torch.as_tensor(continuation)]
    return float(torch.exp(nll.mean()))


@dataclass
class ScaleResult:
    """One scale of `evaluate`, over the prompt set: means of per-prompt figures."""

    scale: float
    concept_logprob_rise: float  # mean over steps of log P(concepts), steered - unsteered
    control_logprob_rise: float  # the same with the random control direction
    contains_rate: float  # share of steered continuations holding a concept token
    control_contains_rate: float
    unsteered_contains_rate: float
    perplexity: float  # unsteered model's perplexity of the steered text (geometric mean)
    control_perplexity: float
    unsteered_perplexity: float


def _mean_log(ps: list[float]) -> float:
    return sum(math.log(max(p, 1e-300)) for p in ps) / len(ps)


def _geometric_mean(xs: list[float]) -> float:
    xs = [x for x in xs if math.isfinite(x)]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def evaluate(model: Transformer, prompts: list[list[int]],
             make_steering: Callable[[float], Steering], scales: Sequence[float],
             concepts: Sequence[int], n_new: int, seed: int, stop: Sequence[int] = ()
             ) -> list[ScaleResult]:
    """For each scale: the steered, the random-control and the unsteered continuation of
    every prompt; `make_steering(scale)` gives the operator at that scale."""
    d, dtype = model.cfg.d_model, model.dtype
    plain = [generate(model, p, n_new, None, concepts, stop) for p in prompts]
    plain_ppl = [perplexity(model, p, c.tokens) for p, c in zip(prompts, plain)]
    concept_set = set(concepts)

    def holds(c: Continuation) -> float:
        return float(bool(concept_set & set(c.tokens)))

    results = []
    for scale in scales:
        steering = make_steering(scale)
        control = random_control(steering, scale, seed, d, dtype)
        rise, c_rise, has, c_has, ppl, c_ppl = [], [], [], [], [], []
        for p, base in zip(prompts, plain):
            s = generate(model, p, n_new, steering, concepts, stop)
            c = generate(model, p, n_new, control, concepts, stop)
            rise.append(_mean_log(s.concept_probability) - _mean_log(base.concept_probability))
            c_rise.append(_mean_log(c.concept_probability) - _mean_log(base.concept_probability))
            has.append(holds(s))
            c_has.append(holds(c))
            ppl.append(perplexity(model, p, s.tokens))
            c_ppl.append(perplexity(model, p, c.tokens))
        n = len(prompts)
        results.append(ScaleResult(scale, sum(rise) / n, sum(c_rise) / n, sum(has) / n,
                                   sum(c_has) / n, sum(map(holds, plain)) / n,
                                   _geometric_mean(ppl), _geometric_mean(c_ppl),
                                   _geometric_mean(plain_ppl)))
    return results
