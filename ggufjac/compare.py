"""Two GGUF files of one model (two quantizations, say) compared by their detached Jacobians.

Per prompt, each file gets the same tokens and the same analyses (`analyse`): its logits and
its own llama.cpp run's, the full Jacobian J with its spectrum, the exact attribution of one
target token's logit to the input tokens, and the exact logit lens (the cumulative map of
every layer). `compare_sides` then reduces the two to figures that are zero for a file
compared with itself: logits nmse, J's relative Frobenius difference, principal angles
between the top-k singular subspaces, Spearman correlation and top-3 overlap of the
attributions, and per layer the lens maps' difference. The figures' definitions are in
`DEFINITIONS`; reports.comparison_report writes them out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from gguf.constants import Keys

from .analysis import Spectrum, spectrum, top_tokens_by_unembedding
from . import llamacpp
from .errors import GgufjacError, PromptError
from .layers import cumulative_maps
from .linearize import Linearization
from .metrics import logits_agreement, nmse
from .run_settings import RunSettings
from .runner import unembed

if TYPE_CHECKING:
    from .api import LoadedModel
    from .chat import ChatPrompt, Message

ANALYSES = ("jacobian", "attribute", "lens")
TOP_OVERLAP = 3  # the attribution's top positions compared

DEFINITIONS = {
    "logits_nmse": "Σ(z_B − z_A)² / Σ z_A² over the vocabulary, last position (z: logits)",
    "jacobian_rel_difference": "‖J_B − J_A‖_F / ‖J_A‖_F, J as a d × (N·d) matrix",
    "left_angles": "principal angles (radians) between the spans of the top-k left singular "
                   "vectors of J_A and J_B (output space), ascending",
    "right_angles": "principal angles between the spans of the top-k right singular vectors "
                    "(input space, all positions), ascending",
    "top_left_cosine": "|u_A·u_B| of the top left singular vectors (a singular pair's sign is "
                       "arbitrary)",
    "top_right_cosine": "|v_A·v_B| of the top right singular vectors",
    "delta_stable_rank": "stable rank of J_B minus that of J_A (‖J‖_F² / σ_1²)",
    "attribution_spearman": "Spearman rank correlation of the two files' per-token "
                            "contributions to the same target logit (average ranks for ties)",
    "attribution_top3_overlap": "shared positions among each file's 3 largest |contributions|,"
                                " over 3 (over N for prompts of fewer tokens)",
    "constant_rel_difference": "‖c_B − c_A‖ / ‖c_A‖ of the constant terms (a family with "
                               "biases: y = Σ_i J_i x_i + c; the Jacobians compared above are "
                               "the linear parts, and the attribution figures rank input "
                               "positions, the bias rows u_t · c apart: attribution_bias_a/b)",
    "lens_rel_difference": "per layer l: ‖L_B − L_A‖_F / ‖L_A‖_F of the exact logit lens maps "
                           "(input embeddings → final norm of the residual after layer l)",
    "lens_top_left_cosine": "per layer: |cos| of the lens maps' top left singular vectors",
    "lens_tokens_agree": "per layer: whether the two lens outputs decode to the same top token",
}


def check_comparable(a: LoadedModel, b: LoadedModel) -> None:
    """Refuse two files that are not two versions of one model: the first difference in
    architecture, sizes, settings or tokenizer, named."""
    names = f"{a.path.name} and {b.path.name}"
    for f in dataclasses.fields(a.cfg):
        if f.name == "family":
            continue
        va, vb = getattr(a.cfg, f.name), getattr(b.cfg, f.name)
        if va != vb:
            raise GgufjacError(f"{names} are not two files of one model: {f.name} is "
                               f"{va!r} in the first and {vb!r} in the second")
    for key in (Keys.Tokenizer.MODEL, Keys.Tokenizer.PRE, Keys.Tokenizer.BOS_ID,
                Keys.Tokenizer.ADD_BOS):
        va, vb = a.gguf.get(key), b.gguf.get(key)
        if va != vb:
            raise GgufjacError(f"{names} have different tokenizers: {key} is {va!r} in the "
                               f"first and {vb!r} in the second")
    pa, pb = a.vocab.pieces, b.vocab.pieces
    if len(pa) != len(pb):
        raise GgufjacError(f"{names} have different vocabularies: {len(pa)} and {len(pb)} "
                           "tokens")
    for i in range(len(pa)):
        if pa[i] != pb[i]:
            raise GgufjacError(f"{names} have different vocabularies: token {i} is "
                               f"{pa[i]!r} in the first and {pb[i]!r} in the second")


@dataclass
class LensLayer:
    layer: int
    jacobian: torch.Tensor  # [d, N, d]
    spectrum: Spectrum
    top_token: int  # the lens output's top token through the unembedding


@dataclass
class Side:
    """One file's results on one prompt."""

    logits: np.ndarray  # ours, last position [vocab], float64
    llama_cpp_logits: np.ndarray | None  # its own llama.cpp run's
    inputs: torch.Tensor  # x [N, d]
    output: torch.Tensor  # y [d]
    jacobian: torch.Tensor | None  # [d, N, d]
    spectrum: Spectrum | None  # of J as d × (N·d)
    contributions: torch.Tensor | None  # [N] to the target's logit
    lens: list[LensLayer]
    constant: torch.Tensor | None = None  # c [d] of y = J x + c (a family with biases)
    bias: float | None = None  # the target logit's constant part u_t · c (with attribute)
    lens_sweep: str | None = None  # which sweep made the lens maps: 'reverse' or 'forward'

    def top(self, k: int = 5) -> list[tuple[int, float]]:
        order = np.argsort(-self.logits, kind="stable")[:k]
        return [(int(t), float(self.logits[t])) for t in order]


def analyse(m: LoadedModel, tokens: list[int], analyses: tuple[str, ...],
            target: int | None, lin: Linearization, settings: RunSettings | None,
            anchored: bool = False, max_memory: int | None = None,
            llama_cpp_logits: np.ndarray | None = None, sweep: str = "auto") -> Side:
    """One file's side of a comparison. `target`: the token whose logit is attributed (None:
    this file's own prediction, for the first file); `settings`: how its llama.cpp run is
    made (None: no llama.cpp run); `anchored`: coefficients from that run (anchor.py);
    `llama_cpp_logits`: that run's last-position logits, already made (a prompt set's runs
    are made from one start, `compare_prompts`). With the lens, J is its last layer's map
    (the final norm frozen at its own value: the model's output), so one sweep (`sweep`:
    layers.cumulative_maps') gives J and every layer's lens."""
    anchor = m.anchor(tokens, lin, settings) if anchored else None
    engine = m.engine(lin, max_memory=max_memory, anchor=anchor)
    d, n = m.cfg.d_model, len(tokens)
    spec, lens_sweep = None, None
    try:
        x = engine.embed(tokens)
        want_j = "jacobian" in analyses or "attribute" in analyses
        plan = engine.plan(d if want_j else 1, n)
        record = engine.forward(x)
        y, constant = record.output[-1], record.constant
        logits = unembed(m.weights, m.logit_input(y, anchor)[None])[0]
        logits_np = logits.to(torch.float64).cpu().numpy()
        jac = None
        lens: list[LensLayer] = []
        if "lens" in analyses:
            layers = list(range(m.cfg.n_layer))
            maps, lens_sweep = cumulative_maps(engine, record, x, layers, sweep=sweep)
            maps = sorted(maps, key=lambda mp: mp.layer)
            outputs = torch.stack([mp.output for mp in maps], dim=1)  # [d, L]
            tops = top_tokens_by_unembedding(m.weights, outputs, 1)
            for mp, top in zip(maps, tops):
                lens.append(LensLayer(mp.layer, mp.jacobian,
                                      spectrum(mp.jacobian.reshape(d, -1), mp.output),
                                      top[0][0]))
            if want_j:
                jac, spec = lens[-1].jacobian, lens[-1].spectrum
        elif want_j:
            jac = engine.pull_back_output(record, torch.eye(d, dtype=x.dtype, device=x.device),
                                          plan.chunk)
    finally:
        engine.release()
    if "jacobian" not in analyses:
        spec = None
    elif spec is None and jac is not None:
        spec = spectrum(jac.reshape(d, -1), y)
    contributions, bias = None, None
    if "attribute" in analyses:
        t = int(np.argmax(logits_np)) if target is None else target
        u = m.logit_rows([t], anchor)[0]
        contributions = ((u @ jac.reshape(d, -1)).reshape(n, d) * x).sum(dim=1)
        bias = None if constant is None else float(u @ constant)
        if "jacobian" not in analyses:
            jac = None
    theirs = llama_cpp_logits
    if theirs is None and (anchor is not None or settings is not None):
        theirs = m.llama_cpp_logits(tokens, settings, anchor)
    elif theirs is not None:
        theirs = np.asarray(theirs, dtype=np.float64)
    return Side(logits_np, theirs, x, y, jac, spec, contributions, lens, constant, bias,
                lens_sweep)


# -- figures --------------------------------------------------------------------------------

def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖b − a‖_F / ‖a‖_F (0 when both are zero)."""
    num = float(torch.linalg.vector_norm(b - a))
    den = float(torch.linalg.vector_norm(a))
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


def principal_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The principal angles (radians, ascending) between the column spans of a [n, k] and
    b [n, k], in float64. Small angles from their sines, the singular values of the part
    of b's basis outside a's span (arccos of the cosines loses half the digits near 0);
    large ones from their cosines (Knyazev & Argentati, SIAM J. Sci. Comput. 2002)."""
    qa = torch.linalg.qr(a.to(torch.float64)).Q
    qb = torch.linalg.qr(b.to(torch.float64)).Q
    cross = qa.T @ qb
    cos = torch.linalg.svdvals(cross).clamp(max=1.0)  # descending: smallest angle first
    sin = torch.linalg.svdvals(qb - qa @ cross).flip(0).clamp(max=1.0)  # ascending
    return torch.where(cos.pow(2) >= 0.5, torch.arcsin(sin), torch.arccos(cos))


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of x, ties given the mean of the ranks they span."""
    s = np.sort(x)
    return (np.searchsorted(s, x, "left") + np.searchsorted(s, x, "right") + 1) / 2


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman's rank correlation (None when either side is constant, e.g. one token)."""
    ra, rb = average_ranks(a) - (len(a) + 1) / 2, average_ranks(b) - (len(b) + 1) / 2
    den = float(np.sqrt((ra ** 2).sum() * (rb ** 2).sum()))
    return float((ra * rb).sum() / den) if den > 0 else None


def top_overlap(a: np.ndarray, b: np.ndarray, k: int = TOP_OVERLAP) -> float:
    """Shared positions among the k largest |a| and the k largest |b|, over k."""
    k = min(k, len(a))
    top_a = set(np.argsort(-np.abs(a), kind="stable")[:k].tolist())
    top_b = set(np.argsort(-np.abs(b), kind="stable")[:k].tolist())
    return len(top_a & top_b) / k


def _subspace_figures(sa: Spectrum, sb: Spectrum, k: int, n: int, d: int,
                      right: bool) -> dict:
    k = min(k, sa.left.shape[1], sb.left.shape[1])
    out = {"left_angles": principal_angles(sa.left[:, :k], sb.left[:, :k]).tolist(),
           "top_left_cosine": abs(float(sa.left[:, 0].to(torch.float64)
                                        @ sb.left[:, 0].to(torch.float64)))}
    if right:
        va, vb = sa.right[:k].reshape(k, n * d), sb.right[:k].reshape(k, n * d)
        out["right_angles"] = principal_angles(va.T, vb.T).tolist()
        out["top_right_cosine"] = abs(float(va[0].to(torch.float64) @ vb[0].to(torch.float64)))
    return out


def compare_sides(a: Side, b: Side, k: int) -> dict:
    """The figures of `DEFINITIONS` for one prompt (`comparison_entry` adds tokens)."""
    n, d = a.inputs.shape
    out: dict = {"logits_nmse": nmse(b.logits, a.logits),
                 "same_prediction": int(np.argmax(a.logits)) == int(np.argmax(b.logits))}
    if a.llama_cpp_logits is not None and b.llama_cpp_logits is not None:
        out["llama_cpp_logits_nmse"] = nmse(b.llama_cpp_logits, a.llama_cpp_logits)
        out["a_vs_own_llama_cpp_nmse"] = logits_agreement(a.logits, a.llama_cpp_logits).nmse
        out["b_vs_own_llama_cpp_nmse"] = logits_agreement(b.logits, b.llama_cpp_logits).nmse
    if a.jacobian is not None and b.jacobian is not None:
        out["jacobian_rel_difference"] = relative_difference(a.jacobian, b.jacobian)
        out.update(_subspace_figures(a.spectrum, b.spectrum, k, n, d, right=True))
        out["stable_rank_a"], out["stable_rank_b"] = a.spectrum.stable_rank, b.spectrum.stable_rank
        out["delta_stable_rank"] = b.spectrum.stable_rank - a.spectrum.stable_rank
        out["singular_values_a"] = a.spectrum.singular_values[:k].tolist()
        out["singular_values_b"] = b.spectrum.singular_values[:k].tolist()
    if a.contributions is not None and b.contributions is not None:
        ca = a.contributions.to(torch.float64).cpu().numpy()
        cb = b.contributions.to(torch.float64).cpu().numpy()
        out["attribution_spearman"] = spearman(ca, cb)
        out["attribution_top3_overlap"] = top_overlap(ca, cb)
        out["contributions_a"], out["contributions_b"] = ca.tolist(), cb.tolist()
        if a.bias is not None and b.bias is not None:
            out["attribution_bias_a"], out["attribution_bias_b"] = a.bias, b.bias
    if a.constant is not None and b.constant is not None:
        out["constant_rel_difference"] = relative_difference(a.constant, b.constant)
    if a.lens and b.lens:
        layers = []
        for la, lb in zip(a.lens, b.lens):
            row = {"layer": la.layer,
                   "lens_rel_difference": relative_difference(la.jacobian, lb.jacobian),
                   "top_token_a": la.top_token, "top_token_b": lb.top_token,
                   "lens_tokens_agree": la.top_token == lb.top_token}
            sub = _subspace_figures(la.spectrum, lb.spectrum, k, n, d, right=False)
            row["lens_top_left_cosine"] = sub["top_left_cosine"]
            row["lens_largest_left_angle"] = max(sub["left_angles"])
            layers.append(row)
        out["lens"] = layers
        differ = [r["layer"] for r in layers if not r["lens_tokens_agree"]]
        out["first_layer_lens_tokens_differ"] = differ[0] if differ else None
    return out


def distribution(values: list[float]) -> dict:
    """Summary statistics of one figure over a prompt set."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if v.size == 0:
        return {"n": 0}
    return {"n": int(v.size), "mean": float(v.mean()), "median": float(np.median(v)),
            "p10": float(np.percentile(v, 10)), "p90": float(np.percentile(v, 90)),
            "min": float(v.min()), "max": float(v.max())}


def comparison_entry(a: LoadedModel, prompt: str, tokens: list[int], target: int | None,
                     top_a: list[tuple[int, float]], top_b: list[tuple[int, float]],
                     figures: dict) -> dict:
    """One prompt's comparison: the figures (compare_sides) with tokens named."""
    entry = {"prompt": prompt, "tokens": [a.token_text(t) for t in tokens],
             "n_tokens": len(tokens),
             "top5_a": [{"token": a.token_text(t), "id": t, "logit": z} for t, z in top_a],
             "top5_b": [{"token": a.token_text(t), "id": t, "logit": z} for t, z in top_b]}
    if target is not None:
        entry["attribution_target"] = {"token": a.token_text(target), "id": target}
    entry.update(figures)
    if "left_angles" in figures:
        entry["largest_left_angle"] = max(figures["left_angles"])
        entry["largest_right_angle"] = max(figures["right_angles"])
    for row in entry.get("lens", []):
        row["top_token_a"] = a.token_text(row["top_token_a"])
        row["top_token_b"] = a.token_text(row["top_token_b"])
    return entry


# -- a prompt set ---------------------------------------------------------------------------

def compare_prompts(a: LoadedModel, b: LoadedModel, prompts: list[str | list[Message]],
                    analyses: tuple[str, ...] = ANALYSES, k: int = 8,
                    target: int | None = None, lin: Linearization | None = None,
                    settings: RunSettings | None = None, anchored: bool = False,
                    max_memory: int | None = None, max_tokens: int | None = None,
                    on_prompt: Callable[[int, str], None] | None = None,
                    sweep: str = "auto") -> list[dict]:
    """Every prompt's comparison entry (`comparison_entry`): the top-`k` subspaces;
    the attribution target is `target`, or else file A's prediction, for both files;
    `settings`: each file's own llama.cpp run (None: none); `anchored`: each file's
    coefficients from that run. A prompt that is a conversation (a list of messages) is
    compared on its chat prompt, rendered by each file's own template (the entry gets its
    conversation and token segments, "chat"). `sweep`: how the lens maps are made
    (layers.SWEEPS; the one each file's maps were made by is in its entry, "lens_sweep_a"
    and "lens_sweep_b")."""
    check_comparable(a, b)
    lin = lin or Linearization()
    if anchored and settings is None:
        raise GgufjacError("anchoring needs llama.cpp's run settings")
    shown = [given if isinstance(given, str) else given[-1].content for given in prompts]
    whiches = [f"prompt {i + 1} ({text[:40]!r})" if len(prompts) > 1 else "the prompt"
               for i, text in enumerate(shown)]
    # the work both files share, done before any analysis: every prompt's tokens (one
    # llama.cpp start per file) and, unanchored, each file's llama.cpp runs (one start each)
    tokenized_a = prompt_tokens_all(a, prompts, max_tokens, whiches)
    tokenized_b = prompt_tokens_all(b, prompts, max_tokens, whiches)
    for which, (tokens, _), (tokens_b, _) in zip(whiches, tokenized_a, tokenized_b):
        if tokens != tokens_b:
            raise GgufjacError(f"{a.path.name} and {b.path.name} tokenize {which} "
                               f"differently ({len(tokens)} and {len(tokens_b)} tokens)")
    theirs_a: list[np.ndarray | None] = [None] * len(prompts)
    theirs_b = list(theirs_a)
    if settings is not None and not anchored:
        every = [tokens for tokens, _ in tokenized_a]
        theirs_a = list(llamacpp.evaluate_many(a.path, every, settings))
        theirs_b = list(llamacpp.evaluate_many(b.path, every, settings))
    entries = []
    for i, given in enumerate(prompts):
        if on_prompt is not None:
            on_prompt(i, shown[i])
        tokens, chat = tokenized_a[i]
        prompt = given if chat is None else chat.rendered.text
        side_a = analyse(a, tokens, analyses, target, lin, settings, anchored, max_memory,
                         theirs_a[i], sweep)
        t = None
        if "attribute" in analyses:
            t = target if target is not None else int(np.argmax(side_a.logits))
        side_b = analyse(b, tokens, analyses, t, lin, settings, anchored, max_memory,
                         theirs_b[i], sweep)
        entries.append(comparison_entry(a, prompt, tokens, t, side_a.top(), side_b.top(),
                                        compare_sides(side_a, side_b, k)))
        if side_a.lens_sweep is not None:  # auto picks per file, by its counted cost
            entries[-1]["lens_sweep_a"] = side_a.lens_sweep
            entries[-1]["lens_sweep_b"] = side_b.lens_sweep
        if chat is not None:
            entries[-1]["chat"] = chat.describe()
        del side_a, side_b
    return entries


def prompt_tokens_all(m: LoadedModel, prompts: list[str | list[Message]],
                      max_tokens: int | None, whiches: list[str]
                      ) -> list[tuple[list[int], ChatPrompt | None]]:
    """`LoadedModel.prompt_tokens` of every prompt, the raw ones tokenized from one llama.cpp
    start; a prompt refused is named by its entry in `whiches`."""
    raw = [i for i, given in enumerate(prompts) if isinstance(given, str)]
    for i in raw:
        if not prompts[i] or not prompts[i].strip():  # type: ignore[union-attr]
            raise PromptError(f"{whiches[i]}: the prompt is empty (or only whitespace)")
    tokenized = dict(zip(raw, m.tokenize_many([prompts[i] for i in raw]))) if raw else {}
    out = []
    for i, given in enumerate(prompts):
        try:
            if i in tokenized:
                m.check_length(tokenized[i], max_tokens)
                out.append((tokenized[i], None))
            else:
                out.append(m.prompt_tokens(given, max_tokens))
        except PromptError as e:
            raise PromptError(f"{whiches[i]}: {e}") from None
    return out
