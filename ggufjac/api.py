"""The Python API: open a GGUF model, compare it with llama.cpp, compute its detached Jacobian.

    from ggufjac.api import open_model
    m = open_model("gemma3-270m", dtype="float64")
    tokens = m.tokenize("The bridge out of Marin is the")
    result = m.jacobian(tokens)          # J [d, N, d], inputs [N, d], output [d]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from gguf.constants import Keys

from . import llamacpp, model_reports
from .anchor import anchor_from_run, capture_names
from .analysis import top_tokens_by_unembedding
from .components import component_sweep
from .chat import ChatPrompt, Message, render_file_chat_spans, token_segments
from .device_weights import SETTINGS, device_budget
from .errors import GGUFError, GgufjacError, LlamaCppError, PromptError
from .families import ModelConfig, config_from_gguf
from .gguf_file import GGUFFile
from .engine import StreamingEngine
from .jacobian import JacobianResult, detached_jacobian, jacobian_to_file, streamed_jacobian
from .layout import layer_tensor_name
from .linearize import Anchor, Linearization, ReferenceRun, logit_input
from .llamacpp import DEFAULT_SETTINGS, RunSettings
from .metrics import check_verdict, nmse  # nmse: part of the API
from .runner import Transformer, unembed
from .resolve import resolve_model
from .svd import (FROBENIUS_PROBES, PerTokenTriplets, TopSingularTriplets, default_block,
                  per_token_triplets, top_singular_triplets, triplets_of_jacobian)
from .vocab import Vocabulary, has_tokenizer, tokenizer_model
from .weights import GGUFWeights

DTYPES = {"float32": torch.float32, "float64": torch.float64,
          "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise GgufjacError(f"dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass
class LoadedModel:
    path: Path
    gguf: GGUFFile
    cfg: ModelConfig
    weights: GGUFWeights
    vocab: Vocabulary
    _model: Transformer | None = field(default=None, repr=False)
    # Weights held in the device's memory (device_weights.py): whether to, and the budget
    # given for it (None: a share of the free memory), read once, at the first engine.
    hold_weights: bool = False
    max_gpu_memory: int | None = None

    def close(self) -> None:
        """Unmap the file and drop what was loaded from it; the model is unusable after."""
        self._model = None
        self.weights.release_device_weights()
        self.gguf.close()

    def held_weights(self) -> None:
        """Read the weights that fit the device budget into its memory, once (later calls,
        and later prompts of a batch, find them there)."""
        if self.hold_weights and self.weights.residency is None:
            budget = device_budget(self.weights.device, self.max_gpu_memory)
            self.weights.hold_on_device(budget)

    def __enter__(self) -> LoadedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def model(self) -> Transformer:
        if self._model is None:
            self._model = Transformer(self.weights)
        return self._model

    def tokenize(self, prompt: str, max_tokens: int | None = None,
                 started: llamacpp.PendingCall | None = None) -> list[int]:
        """llama.cpp's tokens for `prompt` (BOS added as the file asks); `started`: the same
        tokenization already started (`llamacpp.start_tokenize`), to wait for."""
        try:
            if not prompt or not prompt.strip():
                raise PromptError("the prompt is empty (or only whitespace)")
            self._check_tokenizer()
            tokens = started.result(300)["tokens"].tolist() if started is not None else \
                llamacpp.tokenize(self.path, prompt)
        finally:
            if started is not None:
                started.close()
        self.check_length(tokens, max_tokens)
        return tokens

    def chat_prompt(self, messages: list[Message], max_tokens: int | None = None,
                    started: llamacpp.PendingCall | None = None) -> ChatPrompt:
        """A conversation as the model reads it in chat: rendered through the file's own
        chat template with a generation prompt, tokenized as llama-cpp-python tokenizes a
        chat prompt (special-token texts parsed as special tokens, no BOS added beyond the
        template's), and each token's segment (system, template, user, assistant).
        `started`: the same tokenization already started (`llamacpp.start_tokenize` of the
        rendered text with special=True), to wait for."""
        try:
            rendered = render_file_chat_spans(self.gguf, messages)
            if not rendered.text.strip():
                raise PromptError("the chat template renders the conversation as empty text")
            self._check_tokenizer()
            if started is None:
                started = llamacpp.start_tokenize(self.path, rendered.text, special=True)
            out = started.result(300)
        finally:
            if started is not None:
                started.close()
        tokens = out["tokens"].tolist()
        chat = ChatPrompt(rendered, tokens, token_segments(rendered, llamacpp.pieces_of(out)))
        self.check_length(tokens, max_tokens)
        return chat

    def prompt_tokens(self, prompt: str | list[Message], max_tokens: int | None = None,
                      started: llamacpp.PendingCall | None = None
                      ) -> tuple[list[int], ChatPrompt | None]:
        """The tokens of a raw prompt (`tokenize`), or of a conversation with its chat
        prompt (`chat_prompt`; None for a raw prompt)."""
        if isinstance(prompt, str):
            return self.tokenize(prompt, max_tokens, started), None
        chat = self.chat_prompt(prompt, max_tokens, started)
        return chat.tokens, chat

    def tokenize_many(self, prompts: list[str]) -> list[list[int]]:
        """llama.cpp's tokens of each prompt, from one llama.cpp start (lengths unchecked:
        `check_length`)."""
        self._check_tokenizer()
        return llamacpp.tokenize_many(self.path, prompts)

    def _check_tokenizer(self) -> None:
        if not has_tokenizer(self.gguf):
            raise GGUFError(self.path, Keys.Tokenizer.MODEL,
                            f"the file has no tokenizer ({tokenizer_model(self.gguf)!r}); "
                            "prompts cannot be tokenized")

    def check_length(self, tokens: list[int], max_tokens: int | None = None) -> None:
        """Refuse a prompt longer than the context length or `max_tokens`."""
        limit = min(self.cfg.context_length, max_tokens or self.cfg.context_length)
        if len(tokens) > limit:
            which = "--max-tokens" if max_tokens and max_tokens < self.cfg.context_length \
                else "the model's context length"
            raise PromptError(f"the prompt is {len(tokens)} tokens, more than {which} ({limit})")

    def nonfinite_weights(self) -> dict[str, int]:
        """{tensor name: count} of weights that dequantize to NaN or Inf (empty if none)."""
        return self.weights.nonfinite_counts()

    def token_text(self, token_id: int) -> str:
        return self.vocab.text(token_id)

    def engine(self, lin: Linearization | None = None, progress: bool = False,
               max_memory: int | None = None, prefetch: bool | None = None,
               anchor: Anchor | None = None, streaming: bool | None = None,
               block_elements: int | None = None) -> StreamingEngine:
        """The streaming engine over this file (at most one layer's weights in memory at a
        time, or one row block of them: `streaming`, `block_elements`, see StreamingEngine);
        with an `anchor`, its coefficients are llama.cpp's (see `anchor`)."""
        extra = {} if block_elements is None else {"block_elements": block_elements}
        self.held_weights()
        if max_memory is None and self.hold_weights and self.max_gpu_memory is not None \
                and self.weights.device.type == "cuda":
            max_memory = self.max_gpu_memory  # the sweeps' budget is the device's
        return StreamingEngine(self.weights, lin or Linearization(), progress, max_memory,
                               prefetch, anchor, streaming, **extra)

    def anchor(self, tokens: list[int], lin: Linearization | None = None,
               settings: RunSettings = DEFAULT_SETTINGS, reference: bool = True) -> Anchor:
        """Run llama.cpp on `tokens` and take the detached model's frozen coefficients from
        its graph tensors (anchor.py): the Jacobian then explains llama.cpp's own prediction.
        `settings`: how llama.cpp runs (default: as its own tools run it on this machine).
        `reference`: also make an independent default run (a separate process) whose output
        and logits the report compares with."""
        if self.weights.dtype not in (torch.float64, torch.float32):
            raise GgufjacError("anchoring to llama.cpp needs dtype float64 (or float32), not "
                               + str(self.weights.dtype).removeprefix("torch."))
        lin = lin or Linearization()
        run = llamacpp.evaluate(self.path, tokens, settings, capture=capture_names(self.cfg))

        def weight_type(layer: int | None, name: str) -> int:
            full = self.weights.unembedding_name if layer is None else \
                layer_tensor_name(layer, name)
            return int(self.gguf.tensor(full).type)

        def attn_sinks(layer: int) -> np.ndarray:
            return self.weights.tensor(layer_tensor_name(layer, "attn_sinks")).cpu() \
                .to(torch.float64).numpy()

        anchor = anchor_from_run(run, self.cfg, weight_type, lin.gate_path, self.weights.dtype,
                                 self.weights.device,
                                 attn_sinks if self.cfg.family.attn_sinks else None)
        if reference:
            ref = llamacpp.evaluate(self.path, tokens, settings, capture=["result_norm"],
                                    last_only=True)
            output = ref.captured["result_norm"].reshape(-1, self.cfg.d_model)[-1]
            anchor.reference = ReferenceRun(settings, ref.resolved, output, ref.logits[-1])
        return anchor

    @staticmethod
    def logit_input(y: torch.Tensor, anchor: Anchor | None) -> torch.Tensor:
        """What the unembedding multiplies for the last position's y: y itself, or, anchored,
        y with llama.cpp's rounding of that matmul's input (a frozen ratio) applied."""
        return logit_input(y, anchor)

    def logit_rows(self, targets: list[int], anchor: Anchor | None) -> torch.Tensor:
        """The unembedding rows u_t [m, d] of `targets`, such that u_t · y is the logit;
        anchored, with llama.cpp's rounding of the matmul's input folded in (`logit_input`)."""
        u = self.weights.unembedding_rows(targets)
        if anchor is not None and anchor.output_ratio is not None:
            u = u * anchor.output_ratio[-1]
        return u

    def anchor_summary(self, anchor: Anchor, y: torch.Tensor,
                       result: JacobianResult | None = None) -> dict:
        """How closely the anchored model reproduces llama.cpp's run (model_reports.py)."""
        return model_reports.anchor_summary(self, anchor, y, result)

    def llama_cpp_logits(self, tokens: list[int], settings: RunSettings = DEFAULT_SETTINGS,
                         anchor: Anchor | None = None) -> np.ndarray:
        """llama.cpp's last-position logits [vocab] (float64) for `tokens`, run with
        `settings`; anchored, those of the anchor's independent run (or else of the run it
        was anchored to) rather than a new run."""
        if anchor is not None:
            theirs = anchor.reference.logits if anchor.reference is not None \
                else anchor.logits[-1]
        else:
            theirs = llamacpp.evaluate(self.path, tokens, settings, last_only=True).logits[-1]
        return np.asarray(theirs, dtype=np.float64)

    @torch.no_grad()
    def logits(self, tokens: list[int], hidden: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Our logits at every position [N, vocab], streaming through the layers. The detached
        forward pass is bit-identical to the plain one. `hidden` gets each layer's output."""
        engine = self.engine()
        record = engine.forward(engine.embed(tokens))
        if hidden is not None:
            hidden.extend(record.residuals[1:])
        return unembed(self.weights, record.output)

    def jacobian(self, tokens: list[int], lin: Linearization | None = None,
                 progress: bool = False, streaming: bool = True, max_memory: int | None = None,
                 directions: torch.Tensor | None = None,
                 anchor: Anchor | None = None) -> JacobianResult:
        """The detached Jacobian J [d, N, d] (or directions @ J [m, N, d]).

        `streaming=False` is the in-memory reference path (all layers held, one autograd
        graph); both give the same J to rounding. With an `anchor` (from `self.anchor`) the
        coefficients are llama.cpp's.
        """
        lin = lin or Linearization()
        if not streaming:
            if directions is not None or anchor is not None:
                raise GgufjacError("output directions and anchoring need the streaming path")
            model = self.model
            return detached_jacobian(model, model.embed(tokens), lin, chunk=128,
                                     progress=progress)
        engine = self.engine(lin, progress, max_memory, anchor=anchor)
        try:
            return streamed_jacobian(engine, engine.embed(tokens), directions)
        finally:
            engine.release()

    def svd(self, tokens: list[int], k: int, lin: Linearization | None = None,
            tol: float | None = None, max_iterations: int = 100, block: int | None = None,
            progress: bool = False, max_memory: int | None = None,
            anchor: Anchor | None = None, seed: int = 0,
            on_iteration: Callable[[int, float, float], None] | None = None
            ) -> TopSingularTriplets:
        """The top `k` singular triplets of the detached Jacobian without forming it
        (svd.py: block Lanczos on J Jᵀ by forward and reverse sweeps; `on_iteration` is told
        each iteration's largest relative σ change and Ritz residual)."""
        engine = self.engine(lin or Linearization(), progress, max_memory, anchor=anchor)
        try:
            self.plan_svd(engine, k, len(tokens), block)
            record = engine.forward(engine.embed(tokens))
            result = top_singular_triplets(engine, record, k, tol, max_iterations, block, seed,
                                           on_iteration)
        finally:
            engine.release()
        result.sweeps = list(engine.sweeps)
        return result

    @staticmethod
    def plan_svd(engine: StreamingEngine, k: int, n_tokens: int, block: int | None = None,
                 anchored: bool = False) -> None:
        """Refuse, before any work, a budget the svd's widest sweep cannot meet."""
        b = block or default_block(k, n_tokens)
        engine.plan(k + b + FROBENIUS_PROBES, n_tokens, anchored=anchored)

    def per_token_svd(self, tokens: list[int], k: int, lin: Linearization | None = None,
                      progress: bool = False, max_memory: int | None = None,
                      anchor: Anchor | None = None, scratch: Path | None = None,
                      directions: int | None = None
                      ) -> tuple[TopSingularTriplets, PerTokenTriplets, JacobianResult]:
        """The top `k` triplets of every per-token block J_i, and of J itself, from the
        formed Jacobian (svd.per_token_triplets says why it is formed). With `scratch`, J is
        written to that file, `directions` rows per sweep, and read back from it."""
        if scratch is not None:
            result = self.jacobian_to_file(tokens, scratch, directions or self.cfg.d_model,
                                           lin, progress, max_memory, anchor)
        else:
            result = self.jacobian(tokens, lin, progress, max_memory=max_memory, anchor=anchor)
        return (triplets_of_jacobian(result, k),
                per_token_triplets(result.jacobian, k, result.output), result)

    def jacobian_to_file(self, tokens: list[int], path: Path, directions: int,
                         lin: Linearization | None = None, progress: bool = False,
                         max_memory: int | None = None,
                         anchor: Anchor | None = None) -> JacobianResult:
        """The detached Jacobian written to the safetensors file `path` as it is made,
        `directions` output rows per reverse sweep (`jacobian.directions_per_sweep`: the
        most that fit), for a J larger than memory; the result reads it from the file."""
        import json

        engine = self.engine(lin or Linearization(), progress, max_memory, anchor=anchor)
        try:
            return jacobian_to_file(engine, engine.embed(tokens), path, directions,
                                    {"tokens": json.dumps(tokens)})
        finally:
            engine.release()

    def token_for_text(self, text: str) -> int:
        """The vocabulary entry that is exactly `text` (e.g. " Paris")."""
        token = self.vocab.token_id(text)
        if token is None:
            raise PromptError(f"--token {text!r} is not a single token of this model's "
                              "vocabulary (mind the leading space, e.g. ' Paris')")
        return token

    def attribute(self, tokens: list[int], targets: list[int] | None = None,
                  lin: Linearization | None = None, progress: bool = False,
                  max_memory: int | None = None, anchor: Anchor | None = None,
                  llama_cpp: bool = False, chat: ChatPrompt | None = None,
                  components: bool = False) -> dict:
        """Each input token's exact additive contribution (u_tᵀ J_i) · x_i to the logit of
        each target token t (default: the predicted one), and for a family with biases the
        constant term's u_t · c (the 'bias' row), from one reverse sweep; with the
        top-5 next tokens, and with `llama_cpp` llama.cpp's own on the same tokens. With
        `chat` (the chat prompt of `tokens`), the contributions summed by role segment too.
        With `components`, the same sweep also splits each logit at every layer between the
        stream entering it, each attention head, the MLP and the biases (components.py).

        Anchored, the logit is llama.cpp's: u_t · (r ⊙ y) with r the frozen rounding of the
        unembedding matmul's input, so the contributions sum to llama.cpp's logit."""
        lin = lin or Linearization()
        engine = self.engine(lin, progress, max_memory, anchor=anchor)
        try:
            x = engine.embed(tokens)
            plan = engine.plan(len(targets) if targets else 1, len(tokens))
            record = engine.forward(x)
            y = record.output[-1]
            if not targets:
                targets = [top_tokens_by_unembedding(
                    self.weights, self.logit_input(y, anchor)[:, None], 1)[0][0][0]]
            u = self.logit_rows(targets, anchor)
            layer_components = None
            if components:
                jac, layer_components = component_sweep(engine, record, u, plan.chunk)
            else:
                jac = engine.pull_back_output(record, u, plan.chunk)
        finally:
            engine.release()
        contributions = torch.einsum("mnk,nk->mn", jac, x)  # [targets, positions]
        c = record.constant  # an affine network's constant: its part u_t · c is the bias row
        report = model_reports.attribution_report(self, tokens, lin, x.dtype, targets,
                                                  contributions, u @ y, y, anchor, c,
                                                  None if c is None else u @ c,
                                                  layer_components)
        report["sweeps"] = [s.as_dict() for s in engine.sweeps]
        if (routing := record.routing()) is not None:
            report["routing"] = model_reports.routing_report(self, tokens, routing)
        report.update(prediction_figures(self, tokens, y, anchor, llama_cpp))
        if chat is not None:
            model_reports.add_chat(report, chat)
        return report

    # -- reports -------------------------------------------------------------------------

    def check(self, prompt: str | list[Message], layers: bool = False, top: int = 5,
              noise_floor: bool = True, max_tokens: int | None = None,
              settings: RunSettings = DEFAULT_SETTINGS, anchor: bool = False,
              progress: Callable[[str], None] | None = None,
              started: llamacpp.PendingCall | None = None) -> dict:
        """Our forward pass vs llama.cpp's run with `settings` (by default the run its own
        tools make) on the same tokens (last position); the noise floor is llama.cpp against
        itself over the settings users flip (flash attention on/off, repacking on/off).
        `anchor`: also anchor to that run and report how exactly the anchored model
        reproduces it and an independent run (the self-test of anchoring on this CPU).
        `progress` is told what runs next (the CLI prints it on stderr). A conversation
        (a list of messages) is compared on its chat prompt (`chat_prompt`)."""
        say = progress or (lambda text: None)
        tokens, chat = self.prompt_tokens(prompt, max_tokens, started)
        if chat is not None:
            prompt = chat.rendered.text
        say(f"{len(tokens)} tokens; scanning the weights for NaN/Inf")
        bad = self.nonfinite_weights()
        if bad:  # the forward pass would be NaN: name the weights instead of comparing
            return {"prompt": prompt, "tokens": [self.token_text(t) for t in tokens],
                    "dtype": str(self.weights.dtype).removeprefix("torch."),
                    "nonfinite_weights": bad, "passed": False,
                    "verdict": "FAIL: non-finite weights (" + ", ".join(bad) + ")"}
        capture = [f"l_out-{i}" for i in range(self.cfg.n_layer)] if layers else []
        say(f"llama.cpp ({settings.describe()})")
        ref = llamacpp.evaluate(self.path, tokens, settings, capture=capture)
        say("our forward pass")
        hidden: list[torch.Tensor] = []
        ours_all = self.logits(tokens, hidden).to(torch.float64).cpu().numpy()
        ours, theirs = ours_all[-1], ref.logits[-1].astype(np.float64)
        report = model_reports.check_report(self, prompt, tokens, ours, theirs, settings,
                                            ref.resolved, top)
        if noise_floor:
            report["noise_floor"] = []
            for flash, repack in ((f, r) for f in ("on", "off") for r in (True, False)):
                if flash == ("on" if ref.flash_attn else "off") and repack == settings.repack:
                    continue  # the reference run itself
                other = settings.flipped(flash_attn=flash, repack=repack)
                say(f"llama.cpp for the noise floor ({other.describe()})")
                try:
                    run = llamacpp.evaluate(self.path, tokens, other)
                except LlamaCppError as e:  # e.g. repacked weights that do not fit in RAM
                    report["noise_floor"].append({"llama_cpp_settings": other.describe(),
                                                  "failed": str(e)})
                    continue
                report["noise_floor"].append({"llama_cpp_settings": other.describe(),
                                              "nmse": nmse(run.logits[-1], theirs)})
            floor = [v["nmse"] for v in report["noise_floor"] if "nmse" in v]
            report["noise_floor_nmse"] = max(floor) if floor else None
        if layers:
            report["layer_nmse"] = [nmse(h.to(torch.float64).cpu().numpy(), their_h)
                                    for h, their_h in zip(hidden, ref.layer_outputs(self.cfg.n_layer))]
        if anchor:
            say("anchoring to llama.cpp's run, and an independent run")
            anchored = self.anchor(tokens, Linearization(), settings)
            engine = self.engine(anchor=anchored)
            try:
                y = engine.forward(engine.embed(tokens)).output[-1]
            finally:
                engine.release()
            report["anchor"] = self.anchor_summary(anchored, y)
        report["nonfinite_weights"] = {}
        if chat is not None:
            report["chat"] = chat.describe()
        report.update(check_verdict(report["nmse"], report["top1_agree"],
                                    report["llama_cpp_margin"]))
        return report

    def jacobian_report(self, tokens: list[int], result: JacobianResult, lin: Linearization,
                        n_vectors: int = 10, n_tokens: int = 5,
                        anchor: Anchor | None = None) -> dict:
        """Reconstruction, spectrum, ranks and decoded vectors of a full Jacobian
        (model_reports.py)."""
        return model_reports.jacobian_report(self, tokens, result, lin, n_vectors, n_tokens,
                                             anchor)


def prediction_figures(m: LoadedModel, tokens: list[int], y: torch.Tensor,
                       anchor: Anchor | None = None, llama_cpp: bool = False, k: int = 5
                       ) -> dict:
    """Our top-k next tokens (logits of y, the final soft-cap applied) and, with
    `llama_cpp`, llama.cpp's own run on the same tokens (its default, last position): its
    top-k, the logits nmse between the two and whether the top-1 tokens agree
    (model_reports.prediction_report states them)."""
    run = llamacpp.evaluate(m.path, tokens, last_only=True) if llama_cpp else None
    return model_reports.prediction_report(m, y, anchor, run, k)


def check_device(device: str) -> torch.device:
    """A torch device that exists on this machine, or one clear error."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise GgufjacError(f"device {device!r} is not a torch device (cpu, cuda, cuda:1, mps)") \
            from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GgufjacError(f"device {device!r}: torch sees no CUDA GPU here")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise GgufjacError(f"device {device!r}: torch has no MPS backend here")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise GgufjacError(f"device {device!r}: use cpu, cuda or mps")
    return dev


def open_model(name: str | Path, dtype: str | torch.dtype = "float32",
               device: str = "cpu", hold_weights: bool | None = None,
               max_gpu_memory: int | None = None) -> LoadedModel:
    """Open a GGUF file (or demo model name) and read its config; no weights are loaded yet.

    `hold_weights` (default: on a CUDA device, as device_weights.SETTINGS say): the first
    engine reads the quantized weights that fit `max_gpu_memory` (default: the settings',
    else a share of the free memory) into the device's memory, the rest read by staged
    reads at each use (device_weights.py)."""
    dev = check_device(device)
    if hold_weights is None:
        hold_weights = dev.type == "cuda" and SETTINGS.hold_weights
    if max_gpu_memory is None:
        max_gpu_memory = SETTINGS.max_gpu_memory
    path = resolve_model(str(name))
    gguf = GGUFFile(path)
    try:
        cfg = config_from_gguf(gguf)
        weights = GGUFWeights(gguf, cfg, parse_dtype(dtype), dev)
    except BaseException:
        gguf.close()
        raise
    return LoadedModel(path, gguf, cfg, weights, Vocabulary(gguf), hold_weights=hold_weights,
                       max_gpu_memory=max_gpu_memory)
