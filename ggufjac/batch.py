"""Many prompts through one opened model: each prompt's analyses as one typed result.

`PromptRunner` opens the model once and analyses prompts one at a time (`run`); the local
loop (`run_batch`) and the Ray actors (ray_batch.py) both use it, and only the caller writes
the results store (store.py). A prompt that fails (too long, a target that is not a token,
a llama.cpp error) becomes a result with status "failed" and its error; the set goes on.

Per prompt: the tokens, the prediction and the top logits; with "attribute", each input
token's exact contribution to the logit of the prompt's target (or the predicted token);
with "svd", the top-K singular values of J, its stable rank and the tokens its top left
singular vectors decode to (J formed where the prompt is short, `FULL_JACOBIAN_MAX_TOKENS`,
else block Lanczos without forming it, svd.py); with "lens", every layer's exact logit-lens
map (stable rank, top singular value, decoded tokens of its output). A mixture of experts'
frozen routing (per position and layer the experts selected and their weights) comes with
every prompt: it is computed in the forward pass.
"""

from __future__ import annotations

import dataclasses
import hashlib
import platform
import time
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import GgufjacError, PromptError
from .llamacpp import RunSettings
from .prompt_sets import PromptItem

if TYPE_CHECKING:
    import torch

    from .api import LoadedModel
    from .linearize import Linearization

ANALYSES = ("attribute", "svd", "lens")
DEFAULT_ANALYSES = ("attribute", "svd")
TOP_LOGITS = 5  # the prediction's top logits kept per prompt
DECODED_PER_VECTOR = 5  # tokens kept per decoded singular vector or lens output
# J is formed (one reverse sweep of d directions, exact spectrum) up to this many tokens;
# longer prompts get the matrix-free top-K (docs/batch.md: on Gemma 3 270M a 9-token J took
# 7.1 s against 12.6 s for Lanczos at K = 8, and Lanczos' cost hardly grows with N).
FULL_JACOBIAN_MAX_TOKENS = 32
TOKENIZE_CHUNK = 64  # prompts tokenized per llama.cpp start


@dataclass(frozen=True)
class BatchSettings:
    """What a batch computes; everything here but `max_memory` identifies a run in the store
    (a rerun with other settings is refused, or starts a new run with --extend)."""

    analyses: tuple[str, ...] = DEFAULT_ANALYSES
    top_k: int = 8
    dtype: str = "float32"
    gate_path: str = "up"
    anchored: bool = False  # coefficients from llama.cpp's run of each prompt (anchor.py)
    llama_cpp: RunSettings | None = None  # llama.cpp's top-1 per prompt, run this way
    max_tokens: int | None = None
    max_memory: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        unknown = [a for a in self.analyses if a not in ANALYSES]
        if unknown or not self.analyses:
            raise GgufjacError(f"--analyses: {', '.join(unknown) or 'none given'}; choose "
                               f"from {', '.join(ANALYSES)}")
        if self.top_k < 1:
            raise GgufjacError(f"--top-k must be at least 1, not {self.top_k}")
        if self.anchored and self.llama_cpp is None:
            raise GgufjacError("anchoring needs llama.cpp's run settings")

    def identity(self) -> dict:
        """The settings a stored run is matched on (JSON-able, stable key order)."""
        return {"analyses": sorted(self.analyses), "top_k": self.top_k, "dtype": self.dtype,
                "gate_path": self.gate_path, "anchored": self.anchored,
                "llama_cpp": None if self.llama_cpp is None else  # threads: not a result's
                {k: v for k, v in dataclasses.asdict(self.llama_cpp).items() if k != "threads"},
                "max_tokens": self.max_tokens}


@dataclass(frozen=True)
class Provenance:
    """Where a run's results came from: recorded once per run."""

    model_path: str
    model_sha256: str
    model_bytes: int
    architecture: str
    ggufjac_version: str
    llama_cpp_python_version: str
    torch_version: str
    python_version: str


@dataclass(frozen=True)
class TokenLogit:
    token_id: int
    token: str
    logit: float


@dataclass(frozen=True)
class DecodedToken:
    """One of the top tokens a direction decodes to through the unembedding."""

    source: str  # "svd": a top left singular vector of J; "lens": a layer's lens output
    layer: int | None  # the lens layer (None for "svd")
    vector: int | None  # the singular vector's index k, 0-based (None for "lens")
    rank: int  # 0-based among that direction's top tokens
    token_id: int
    token: str
    score: float  # (W_U u)_t


@dataclass(frozen=True)
class LensLayer:
    layer: int
    stable_rank: float
    top_singular_value: float
    top_token_id: int
    top_token: str


@dataclass(frozen=True)
class RoutedExpert:
    """A mixture of experts' frozen routing: one expert a position selected at a layer."""

    position: int
    layer: int
    rank: int  # 0-based in llama.cpp's order of the selection (by descending router score)
    expert: int
    weight: float  # w_e: the layer's MLP output is sum_e w_e * expert_e(x)


def routed_experts(routing: list[tuple[torch.Tensor, torch.Tensor]]) -> list[RoutedExpert]:
    """The rows of a forward record's routing (per layer: experts [N, k], weights [N, k])."""
    rows = []
    for layer, (experts, weights) in enumerate(routing):
        for position, (chosen, w) in enumerate(zip(experts.tolist(), weights.tolist())):
            rows += [RoutedExpert(position, layer, rank, int(e), float(we))
                     for rank, (e, we) in enumerate(zip(chosen, w))]
    return rows


def _shown(heading: str) -> dict[str, str]:
    """Field metadata: the column is in the batch page's table, under `heading`."""
    return {"heading": heading}


@dataclass
class PromptResult:
    """Everything a batch keeps of one prompt (plain Python values: it crosses processes).

    This dataclass is the batch's one schema: its scalar fields, in order, are the columns
    of the store's `prompts` table (store.py makes the table and its INSERT from
    `result_columns()`; a field marked `_shown` is a column of the batch page too), and its
    list fields are the per-position, per-vector and per-layer rows of the other tables."""

    id: str = field(metadata=_shown("id"))
    prompt: str = field(metadata=_shown("prompt"))
    target: str | None
    status: str = field(default="done", metadata={**_shown("status"),
                                                  "choices": ("done", "failed")})
    error: str | None = None
    n_tokens: int | None = field(default=None, metadata=_shown("tokens"))
    # the predicted token: the top of ours
    predicted_token_id: int | None = None
    predicted_token: str | None = field(default=None, metadata=_shown("predicted"))
    logit: float | None = field(default=None, metadata=_shown("logit"))
    # llama.cpp's top-1, and its logits against ours at the last position
    llama_cpp_token_id: int | None = None
    llama_cpp_token: str | None = None
    llama_cpp_logit: float | None = None
    llama_cpp_logits_nmse: float | None = None
    # the attributed token, its logit u_t · y (before any soft-cap), the contributions' sum
    attribution_token_id: int | None = None
    attribution_token: str | None = None
    attribution_logit: float | None = None
    attribution_sum: float | None = field(default=None, metadata=_shown("attribution sum"))
    # a family with biases (y = J x + c): the logit's constant part u_t · c, in the sum
    attribution_bias: float | None = None
    reconstruction_rel_error: float | None = None
    reconstruction_of: str | None = None  # "output" (‖Σ J_i x_i − y‖/‖y‖) or "logit"
    top_singular_value: float | None = field(default=None, metadata=_shown("σ₁"))
    stable_rank: float | None = field(default=None, metadata=_shown("stable rank"))
    # ‖J‖²_F / σ₁² (matrix-free: ‖J‖²_F estimated)
    jacobian_formed: bool | None = None  # svd: True from J, False matrix-free
    seconds: float = 0.0
    # rows of the other tables
    token_ids: list[int] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    contributions: list[float] | None = None  # per input position, summing to that logit
    top_logits: list[TokenLogit] = field(default_factory=list)  # ours, descending
    singular_values: list[float] = field(default_factory=list)  # top K, descending
    decoded: list[DecodedToken] = field(default_factory=list)
    lens: list[LensLayer] = field(default_factory=list)
    # a mixture of experts: per position, layer and rank the expert selected and its weight
    # (empty for a dense model)
    routing: list[RoutedExpert] = field(default_factory=list)


@dataclass(frozen=True)
class ResultColumn:
    """A scalar field of `PromptResult`: one column of the `prompts` table."""

    name: str
    kind: type  # str, int, float or bool
    nullable: bool
    heading: str | None  # on the batch page (None: not shown there)
    choices: tuple[str, ...] | None  # the only values it may hold


def result_columns() -> list[ResultColumn]:
    """`PromptResult`'s scalar fields in order (its list fields are rows of other tables)."""
    hints = typing.get_type_hints(PromptResult)
    out = []
    for f in dataclasses.fields(PromptResult):
        hint = hints[f.name]
        kinds = [a for a in typing.get_args(hint) if a is not type(None)] \
            if isinstance(hint, types.UnionType) else [hint]
        if len(kinds) != 1:
            raise TypeError(f"PromptResult.{f.name}: {hint} is neither a value nor a list")
        if typing.get_origin(kinds[0]) is list:
            continue
        out.append(ResultColumn(f.name, kinds[0], kinds[0] is not hint,
                                f.metadata.get("heading"), f.metadata.get("choices")))
    return out


def sha256_of(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _versions() -> tuple[str, str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    def of(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "unknown"
    return of("ggufjac"), of("llama_cpp_python"), torch.__version__


class PromptRunner:
    """One opened model analysing prompts with fixed settings (one per process or actor)."""

    def __init__(self, model: str | Path, settings: BatchSettings, device: str = "cpu") -> None:
        from .api import open_model
        from .linearize import Linearization

        self.settings = settings
        self.m: LoadedModel = open_model(model, dtype=settings.dtype, device=device)
        self.lin = Linearization(gate_path=settings.gate_path)
        self._tokens: dict[str, list[int]] = {}

    def close(self) -> None:
        self.m.close()

    def provenance(self) -> Provenance:
        ours, llama, torch_version = _versions()
        path = self.m.path
        return Provenance(str(path), sha256_of(path), path.stat().st_size, self.m.cfg.arch,
                          ours, llama, torch_version, platform.python_version())

    def check_targets(self, items: Iterable[PromptItem]) -> None:
        """Refuse, before any work, a target that is not one token of the vocabulary, and
        conversations for a file without a chat template."""
        items = list(items)
        conversation = next((it for it in items if it.messages is not None), None)
        if conversation is not None:
            from .chat import require_chat_template

            try:
                require_chat_template(self.m.gguf)
            except GgufjacError as e:
                raise PromptError(f"prompt {conversation.id!r} (line {conversation.line}) is "
                                  f"a conversation: {e}") from None
        for item in items:
            if item.target is not None:
                try:
                    self.m.token_for_text(item.target)
                except PromptError as e:
                    raise PromptError(f"prompt {item.id!r} (line {item.line}): {e}") from None

    def prepare(self, items: list[PromptItem]) -> None:
        """Tokenize `items` in one llama.cpp start (run() would start one per prompt)."""
        # a conversation is rendered and tokenized on its own (run)
        todo = [it for it in items if it.id not in self._tokens and it.messages is None]
        for s in range(0, len(todo), TOKENIZE_CHUNK):
            part = todo[s:s + TOKENIZE_CHUNK]
            for it, tokens in zip(part, self.m.tokenize_many([it.prompt for it in part])):
                self._tokens[it.id] = tokens

    def run(self, item: PromptItem) -> PromptResult:
        """The prompt's result; a GgufjacError becomes a failed result naming it."""
        t0 = time.perf_counter()
        result = PromptResult(item.id, item.prompt, item.target)
        try:
            tokens = self._tokens.pop(item.id, None)
            if item.messages is not None:
                tokens = self.m.chat_prompt(list(item.messages)).tokens
            elif tokens is None:
                tokens = self.m.tokenize(item.prompt)
            result.token_ids = tokens
            result.n_tokens = len(tokens) if tokens else None
            result.tokens = [self.m.token_text(t) for t in tokens]
            self.m.check_length(tokens, self.settings.max_tokens)
            analyse_prompt(self.m, tokens, item.target, self.settings, self.lin, result)
        except GgufjacError as e:
            result.status, result.error = "failed", str(e)
        result.seconds = time.perf_counter() - t0
        return result


def _token_logit(m: LoadedModel, token: int, logit: float) -> TokenLogit:
    return TokenLogit(int(token), m.token_text(int(token)), float(logit))


def _decoded(m: LoadedModel, source: str, columns: torch.Tensor, layers: list[int | None],
             vectors: list[int | None]) -> list[DecodedToken]:
    from .analysis import top_tokens_by_unembedding

    out = []
    for col, (layer, vector) in enumerate(zip(layers, vectors)):
        for rank, (t, score) in enumerate(top_tokens_by_unembedding(
                m.weights, columns[:, col:col + 1], DECODED_PER_VECTOR)[0]):
            out.append(DecodedToken(source, layer, vector, rank, int(t), m.token_text(t),
                                    float(score)))
    return out


def analyse_prompt(m: LoadedModel, tokens: list[int], target: str | None,
                   settings: BatchSettings, lin: Linearization, result: PromptResult) -> None:
    """Fill `result` with the analyses of `settings` on `tokens` (one forward pass, then a
    reverse sweep per analysis; the engine streams the layers as every command does)."""
    import torch

    from .analysis import spectrum
    from .jacobian import JacobianResult
    from .layers import cumulative_maps
    from .metrics import logits_agreement
    from .runner import unembed
    from .svd import top_singular_triplets, triplets_of_jacobian

    anchor = m.anchor(tokens, lin, settings.llama_cpp) if settings.anchored else None
    engine = m.engine(lin, max_memory=settings.max_memory, anchor=anchor)
    d, n, k = m.cfg.d_model, len(tokens), settings.top_k
    try:
        x = engine.embed(tokens)
        record = engine.forward(x)
        if (routing := record.routing()) is not None:
            result.routing = routed_experts(routing)
        y = record.output[-1]
        logits = unembed(m.weights, m.logit_input(y, anchor)[None])[0]
        z = logits.to(torch.float64).cpu().numpy()
        order = np.argsort(-z, kind="stable")[:TOP_LOGITS]
        result.top_logits = [_token_logit(m, t, z[t]) for t in order]
        predicted = result.top_logits[0]
        result.predicted_token_id, result.predicted_token, result.logit = \
            predicted.token_id, predicted.token, predicted.logit
        if "attribute" in settings.analyses:
            t = m.token_for_text(target) if target is not None else int(order[0])
            u = m.logit_rows([t], anchor)
            g = engine.pull_back_output(record, u, engine.plan(1, n).chunk)[0]  # [N, d]
            c = (g * x).sum(dim=1)
            logit = float(u[0] @ y)
            target_logit = _token_logit(m, t, logit)
            result.attribution_token_id, result.attribution_token, result.attribution_logit = \
                target_logit.token_id, target_logit.token, target_logit.logit
            result.contributions = [float(v) for v in c]
            if record.constant is not None:  # the constant term's part: no position's
                result.attribution_bias = float(u[0] @ record.constant)
            result.attribution_sum = sum(result.contributions) + (result.attribution_bias or 0.0)
            result.reconstruction_rel_error = abs(result.attribution_sum - logit) / \
                max(abs(logit), 1e-300)
            result.reconstruction_of = "logit"
        if "svd" in settings.analyses:
            if k > d:
                raise PromptError(f"--top-k {k} is more than the model's width ({d})")
            if n <= FULL_JACOBIAN_MAX_TOKENS:
                jac = engine.pull_back_output(record, torch.eye(d, dtype=x.dtype,
                                                                device=x.device),
                                              engine.plan(d, n).chunk)
                formed = JacobianResult(jac, x, y, constant=record.constant)
                triplets = triplets_of_jacobian(formed, min(k, n * d))
                result.reconstruction_rel_error = formed.reconstruction_rel_error()
                result.reconstruction_of = "output"
                del jac, formed
            else:
                m.plan_svd(engine, k, n, anchored=anchor is not None)
                triplets = top_singular_triplets(engine, record, k)
                if not triplets.converged:
                    raise GgufjacError(f"the top-{k} singular triplets did not converge in "
                                       f"{triplets.iterations} iterations")
            sv = triplets.singular_values
            result.singular_values = [float(s) for s in sv]
            result.top_singular_value = result.singular_values[0]
            result.jacobian_formed = n <= FULL_JACOBIAN_MAX_TOKENS
            result.stable_rank = triplets.frobenius_sq / float(sv[0]) ** 2 \
                if float(sv[0]) > 0 else 0.0
            result.decoded += _decoded(m, "svd", triplets.left, [None] * len(sv),
                                       list(range(len(sv))))
        if "lens" in settings.analyses:
            layers = list(range(m.cfg.n_layer))
            maps = sorted(cumulative_maps(engine, record, x, layers)[0], key=lambda mp: mp.layer)
            outputs = torch.stack([mp.output for mp in maps], dim=1)
            decoded = _decoded(m, "lens", outputs, layers, [None] * len(layers))
            for mp in maps:
                spec = spectrum(mp.jacobian.reshape(d, -1), mp.output)
                top = next(dt for dt in decoded if dt.layer == mp.layer and dt.rank == 0)
                result.lens.append(LensLayer(mp.layer, spec.stable_rank,
                                             float(spec.singular_values[0]), top.token_id,
                                             top.token))
            result.decoded += decoded
            del maps
    finally:
        engine.release()
    if settings.llama_cpp is not None:
        theirs = m.llama_cpp_logits(tokens, settings.llama_cpp, anchor)
        agreement = logits_agreement(z, theirs)
        top = agreement.reference_top1
        theirs_top = _token_logit(m, top, theirs[top])
        result.llama_cpp_token_id, result.llama_cpp_token, result.llama_cpp_logit = \
            theirs_top.token_id, theirs_top.token, theirs_top.logit
        result.llama_cpp_logits_nmse = agreement.nmse


class LocalExecutor:
    """The batch's prompts in this process, one at a time; each result is written (one
    transaction) before the next prompt starts, so a kill loses at most the one in flight."""

    def __init__(self, model: str | Path, settings: BatchSettings, device: str = "cpu") -> None:
        self.runner = PromptRunner(model, settings, device)

    def check_targets(self, items: list[PromptItem]) -> None:
        self.runner.check_targets(items)

    def provenance(self) -> Provenance:
        return self.runner.provenance()

    def run(self, items: list[PromptItem], write: Callable[[PromptResult], None]) -> None:
        for s in range(0, len(items), TOKENIZE_CHUNK):
            part = items[s:s + TOKENIZE_CHUNK]
            try:
                self.runner.prepare(part)
            except GgufjacError:
                pass  # each prompt then tokenizes alone, and a failure is that prompt's
            for item in part:
                write(self.runner.run(item))

    def close(self) -> None:
        self.runner.close()
