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
  them. `control_vector` makes one from a direction operator over k blocks:
  v_N = (λ / k) ‖h_src‖ u_N, ‖h_src‖ the source's residual norm after block N at its last
  position. The residual stream carries every addition to the output, and neighbouring
  blocks' directions point much the same way, so the k additions sum: divided by k, the
  range together adds no more than one block would (Σ‖v_N‖ = λ · mean ‖h_src‖).
  `check_control_vector` measures a file in llama.cpp itself.

Generation is greedy with a KV cache (one forward step per token). Every operator's change
at position i depends only on positions ≤ i, so steering the prompt once and each new
token as it comes equals recomputing the steered prefix at every step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from gguf.constants import Keys

from .analysis import spectrum, top_tokens_by_unembedding
from .chat import ChatRequest
from .cvector import ControlVector, check_scale, parse_layer_range
from .errors import GgufjacError
from .layers import LayerMap, cumulative_maps, layer_maps
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
        maps, _ = cumulative_maps(engine, record, inputs, layers)
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
    """v_N = (λ / k) ‖h_N‖ u_N over the k blocks of `maps` (the module's docstring says why
    the range shares λ); one block gets λ ‖h_N‖ u_N."""
    per_block = scale / len(maps)
    return ControlVector({l: per_block * mp.residual_norm * mp.direction
                          for l, mp in maps.items()}, model_hint)


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


def prompt_tokens(m: LoadedModel, prompt: str, chat: ChatRequest | None = None) -> list[int]:
    """A prompt's tokens: the raw text, or with `chat` its chat prompt (the text as a user
    message through the file's chat template, LoadedModel.chat_prompt)."""
    return m.prompt_tokens(prompt if chat is None else chat.conversation(prompt))[0]


def source_tokens(m: LoadedModel, source: str, chat: ChatRequest | None = None) -> list[int]:
    """The source prompt's tokens (`prompt_tokens`); a prompt the model cannot take names
    the option."""
    try:
        return prompt_tokens(m, source, chat)
    except GgufjacError as e:
        raise GgufjacError(f"--source: {e}") from None


@dataclass
class SteerRun:
    """What `steer` did: its settings (as the report records them), the concept tokens, and
    either one prompt's two continuations or the measured rows per scale."""

    settings: dict
    concepts: list[int]
    prompt: str | None = None
    unsteered: Continuation | None = None
    steered: Continuation | None = None
    evaluation: list[ScaleResult] | None = None
    eval_prompts: list[str] | None = None


def run_steer(m: LoadedModel, source: str, *, prompt: str | None = None,
              eval_prompts: Sequence[str] | None = None, layer: int | None = None,
              operator: str = "jacobian", control_vector: ControlVector | None = None,
              control_vector_name: str | None = None, scale: float | None = None,
              scales: Sequence[float] = (), n_new: int = 20, concept_texts: Sequence[str] = (),
              seed: int = 0, progress: Callable[[str], None] | None = None,
              chat: ChatRequest | None = None) -> SteerRun:
    """Steer one prompt's greedy continuation (`prompt`) or measure steering over a prompt
    set at each of `scales` (`eval_prompts`) with the source's maps at `layer` (default:
    `default_layer`), or with `control_vector`'s own blocks and vectors (times λ, 1 by
    default). Concepts: `concept_texts`, else the source's top 3 next tokens. With `chat`,
    the source and every prompt are read as user messages through the chat template."""
    if (prompt is None) == (eval_prompts is None):
        raise GgufjacError("give --prompt, or --eval PROMPTS (not both)")
    cfg = m.cfg
    scale = check_scale(scale if scale is not None else 1.0 if control_vector is not None
                        else DEFAULT_SCALES[operator])
    src = source_tokens(m, source, chat)
    if control_vector is not None:
        control_vector.check_fits(cfg, control_vector_name or "control vector")
        layers = sorted(control_vector.directions)
    else:
        layer = default_layer(cfg.n_layer) if layer is None else layer
        if not 0 <= layer < cfg.n_layer:
            raise GgufjacError(f"--layer {layer}: the model has blocks 0..{cfg.n_layer - 1}")
        layers = [layer]
    prompts = [prompt_tokens(m, prompt, chat)] if prompt is not None else \
        [prompt_tokens(m, p, chat) for p in eval_prompts or []]
    for tokens in prompts:
        check_context(m, tokens, n_new)
    check_memory(m)
    net = m.model
    concepts = [m.token_for_text(t) for t in concept_texts] or top_next_tokens(m, src, 3)
    if control_vector is None:
        if progress is not None:
            progress(f"source maps at block {layers[0]} ({operator}) ...")
        maps = source_maps(m, src, layers, operator, concepts)

    def make(s: float) -> Steering:
        if control_vector is not None:  # the file's vectors times λ (--control-vector-scaled)
            return DirectionSteering({n: s * v for n, v in control_vector.directions.items()},
                                     relative=False)
        return operator_steering(operator, maps, s)
    eos = m.gguf.get(Keys.Tokenizer.EOS_ID)
    stop = [] if eos is None else [int(eos)]
    settings = {"source": source,
                "operator": "control-vector" if control_vector is not None else operator,
                "control_vector": control_vector_name if control_vector is not None else None,
                "layers": layers, "scale": scale, "tokens": n_new, "seed": seed,
                "dtype": str(m.weights.dtype).removeprefix("torch."),
                "concepts": [m.token_text(t) for t in concepts]}
    if chat is not None:  # the prompts were read through the chat template
        settings["chat"] = {"system": chat.system}
    run = SteerRun(settings, concepts)
    if prompt is not None:
        run.prompt = prompt
        run.unsteered = generate(net, prompts[0], n_new, None, concepts, stop)
        run.steered = generate(net, prompts[0], n_new, make(scale), concepts, stop)
    else:
        run.eval_prompts = list(eval_prompts or [])
        run.evaluation = evaluate(net, prompts, make, scales, concepts, n_new, seed, stop)
    return run


# `cvector`'s own measurement of the file it writes, in llama.cpp: a few prompts that do not
# ask for the concept; the next-token log-probability of the concept at their last
# position, and the log-probability of their own tokens (fluency), with and without the file
CHECK_PROMPTS = ("I went to the market and bought a", "Here is a painting of the",
                 "My favourite place is the", "Yesterday I walked to the")
# A file is degraded when it lowers the mean log-probability of those prompts' own tokens
# by more than this many nats per token: their perplexity grows more than e ≈ 2.7 times
# (a random vector of the same norms costs a few tenths on Gemma 3 270M; docs/steering.md)
FLUENCY_LIMIT = 1.0


@dataclass
class LlamaCppCheck:
    """A control vector measured in llama.cpp on `prompts` (means over the prompts)."""

    prompts: list[str]
    concepts: list[str]
    seed: int  # of the random vector with the file's per-block norms
    concept_logprob_rise: float  # log P(concepts) at the last position, with - without
    random_logprob_rise: float
    fluency_change: float  # mean log-probability per token of the prompts' own tokens
    random_fluency_change: float
    unsteered_perplexity: float  # exp(-mean log-probability per token), without the file
    steered_perplexity: float

    @property
    def degraded(self) -> bool:
        return self.fluency_change < -FLUENCY_LIMIT

    @property
    def steers(self) -> bool:
        """The concept rises, and more than with the random vector."""
        return self.concept_logprob_rise > max(0.0, self.random_logprob_rise)


def random_like(cv: ControlVector, seed: int) -> ControlVector:
    """Random directions (from `seed`) with `cv`'s blocks and per-block norms."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for n, v in sorted(cv.directions.items()):
        r = torch.randn(v.numel(), generator=gen, dtype=torch.float64)
        out[n] = (r / torch.linalg.vector_norm(r) * torch.linalg.vector_norm(
            v.to(torch.float64))).to(torch.float32)
    return ControlVector(out, cv.model_hint)


def _llama_cpp_logprobs(model_path: Path, prompts: list[list[int]], concepts: list[int],
                        cv_path: Path | None) -> tuple[list[float], list[float]]:
    """Per prompt: log P(concepts) at the last position, and the log-probabilities of the
    prompt's own tokens after the first, in llama.cpp with the file `cv_path` applied."""
    from . import llamacpp

    concept_lp, own_lp = [], []
    for tokens in prompts:
        run = llamacpp.evaluate(model_path, tokens, control_vector=cv_path)
        lp = torch.log_softmax(torch.from_numpy(run.logits).to(torch.float64), dim=-1)
        concept_lp.append(float(torch.logsumexp(lp[-1, concepts], dim=0)))
        own_lp.extend(lp[torch.arange(len(tokens) - 1), torch.as_tensor(tokens[1:])].tolist())
    return concept_lp, own_lp


def check_control_vector(m: LoadedModel, cv_path: Path, random_path: Path,
                         concepts: Sequence[int], prompts: Sequence[str] = CHECK_PROMPTS,
                         seed: int = 0) -> LlamaCppCheck:
    """`cv_path` and `random_path` (a `random_like` file) measured in llama.cpp on
    `prompts`: the concepts' log-probability rise and the fluency change, each against no
    file at all."""
    tokens = [m.tokenize(p) for p in prompts]
    base_c, base_own = _llama_cpp_logprobs(m.path, tokens, list(concepts), None)
    cv_c, cv_own = _llama_cpp_logprobs(m.path, tokens, list(concepts), cv_path)
    rnd_c, rnd_own = _llama_cpp_logprobs(m.path, tokens, list(concepts), random_path)

    def rise(a: list[float]) -> float:
        return sum(x - y for x, y in zip(a, base_c, strict=True)) / len(base_c)

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs)
    return LlamaCppCheck(list(prompts), [m.token_text(t) for t in concepts], seed, rise(cv_c),
                         rise(rnd_c), mean(cv_own) - mean(base_own),
                         mean(rnd_own) - mean(base_own), math.exp(-mean(base_own)),
                         math.exp(-mean(cv_own)))


@dataclass
class ControlVectorExport:
    """What `export_control_vector` wrote (or would have): the vectors, the concepts, the
    scale each block got, and llama.cpp's measurement of the file (None: not measured)."""

    control_vector: ControlVector
    concepts: list[int]
    block_scale: float  # λ / k: direction.N = block_scale · ‖h_N‖ · u_N
    check: LlamaCppCheck | None
    path: Path


def check_export_request(operator: str, scale: float, out_path: Path, overwrite: bool) -> None:
    """What can be refused before the model is opened."""
    if operator == "jacobian":
        raise GgufjacError("--operator jacobian is position-dependent (it reads each "
                           "position's input embedding): no control vector can express it; "
                           "use cumulative-direction or layer-direction")
    if operator not in OPERATORS:
        raise GgufjacError(f"operator {operator!r} is not one of {', '.join(OPERATORS)}")
    check_scale(scale)
    if out_path.exists() and not overwrite:
        raise GgufjacError(f"{out_path} exists (--overwrite replaces it)")
    if not out_path.parent.is_dir():
        raise GgufjacError(f"{out_path.parent}: no such directory")


def export_control_vector(m: LoadedModel, source: str, layer_range: str, out_path: Path, *,
                          operator: str = "concept-direction", concept_texts: Sequence[str] = (),
                          scale: float = 0.02, overwrite: bool = False, check: bool = True,
                          force: bool = False, seed: int = 0,
                          chat: ChatRequest | None = None) -> ControlVectorExport:
    """Write the control vector of `source`'s directions over `layer_range` ("A-B" or "A")
    to `out_path`. With `check`, the file is first measured in llama.cpp
    (`check_control_vector`, before it gets its name): a degraded one (`FLUENCY_LIMIT`) is
    refused and nothing is left behind, unless `force`. With `chat`, the source is read as
    a user message through the chat template (the measurement's prompts stay raw text)."""
    from .outputs import atomic_write, scratch_file

    out_path = Path(out_path)
    check_export_request(operator, scale, out_path, overwrite)
    layers = parse_layer_range(layer_range, m.cfg.n_layer)
    src = source_tokens(m, source, chat)
    # the concept the direction is made for and the measurement reads: by default the
    # source's predicted token (what source_maps picks itself for concept-direction)
    concepts = [m.token_for_text(t) for t in concept_texts] or top_next_tokens(m, src, 1)
    maps = source_maps(m, src, layers, operator, concepts)
    cv = control_vector(maps, scale, m.cfg.arch)
    cv.validate(m.cfg, str(out_path))
    result = ControlVectorExport(cv, concepts, scale / len(layers), None, out_path)
    if not check:
        cv.write(out_path, m.cfg)
        return result

    def write_checked(tmp: Path) -> None:
        cv.write_to(tmp)
        with scratch_file(out_path.parent, out_path.name + ".random") as random_path:
            random_like(cv, seed).write_to(random_path)
            result.check = check_control_vector(m, tmp, random_path, concepts, seed=seed)
        if result.check.degraded and not force:
            c = result.check
            raise GgufjacError(
                f"{out_path}: not written: in llama.cpp this control vector lowers the mean "
                f"log-probability of neutral prompts' own tokens by {-c.fluency_change:.2f} "
                f"nats per token (perplexity {c.unsteered_perplexity:.1f} -> "
                f"{c.steered_perplexity:.1f}; the limit is {FLUENCY_LIMIT:g}), concept "
                f"log-probability {c.concept_logprob_rise:+.2f} (random vector of the same "
                f"norms {c.random_logprob_rise:+.2f}): use a smaller --scale, or --force to "
                "write it anyway")
    atomic_write(out_path, write_checked)
    return result
