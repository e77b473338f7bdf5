"""The reports of one model's analyses (JSON dicts), built from computed results: the
Jacobian's, the top singular triplets', an attribution's, a check's, the layer maps', the
anchored run's figures and the prediction's. What `LoadedModel`'s methods return is built here.

Nothing here runs a model or llama.cpp: each function is given the numbers (llama.cpp's run
included) and names them. `reports.py` builds on these: what the commands write, and the
reports of `compare` and `steer`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from .analysis import ENTROPY_RANK_DEFINITION, STABLE_RANK_DEFINITION, gram_spectrum, \
    spectrum, top_tokens_by_unembedding
from .chat import ChatPrompt
from .components import BIAS_ASSIGNMENT, COMPONENTS_DEFINITION, LayerComponents
from .families import ModelConfig
from .gguf_file import GGUFFile
from .jacobian import JacobianFile, JacobianResult, reconstruction_rel_error
from .linearize import Anchor, Linearization, logit_input
from .llamacpp import LlamaCppRun, RunSettings
from .metrics import logits_agreement, log_softmax, top_order
from .runner import unembed
from .svd import PerTokenTriplets, TopSingularTriplets
from .vocab import Vocabulary
from .weights import GGUFWeights


# What each command does with the constant term c of a detached network that is affine
# (y = Σ_i J_i x_i + c: a family with biases), stated in its report as report["constant"].
CONSTANT_DEFINITION = ("y = sum_i J_i x_i + c: with biases the detached network is affine; "
                       "c is its output for zero input embeddings (the recorded coefficients "
                       "replayed with the biases on), computed apart from J")
CONSTANT_HANDLING = {
    "jacobian": "J is the linear part; c is written as 'constant' in jacobian.safetensors and "
                "added in reconstruction_rel_error; the spectrum and vectors are J's alone",
    "svd": "the triplets are J's (c has no direction); c is written as 'constant' in "
           "svd.safetensors and added in truncated_reconstruction_rel_error",
    "attribute": "each target's 'bias' is u_t . c, the constant term's part of the logit (no "
                 "input token's); the contributions plus it sum to the logit; with components, "
                 "each layer's 'bias_above' is the part of it the layers above make",
    "layers": "each map is the linear part of an affine map; its constant (the map's output "
              "for a zero input) is added in reconstruction_rel_error; spectra and vectors are "
              "the linear parts'",
    "compare": "the Jacobians compared are the linear parts; constant_rel_difference compares "
               "the files' c; attribution figures rank input positions, the bias row apart",
    "steer": "the direction is J's top left singular vector (the linear part); the constant "
             "c does not enter it, and the steered runs keep their biases",
    "batch": "attribution_sum includes attribution_bias (u_t . c); the output's "
             "reconstruction_rel_error adds c; singular values are J's",
}


def constant_statement(command: str) -> dict:
    """What c is and what `command` does with it (CONSTANT_HANDLING)."""
    return {"definition": CONSTANT_DEFINITION, "handling": CONSTANT_HANDLING[command]}


def constant_report(c: torch.Tensor | None, y: torch.Tensor, command: str) -> dict | None:
    """report["constant"] for a network with a constant term c [d] (None without one): its
    size against the output y and what `command` does with it (`constant_statement`)."""
    if c is None:
        return None
    c_norm, y_norm = torch.linalg.vector_norm(c), torch.linalg.vector_norm(y)
    return {**constant_statement(command),
            "norm": float(c_norm),
            "norm_over_output_norm": float(c_norm / y_norm) if y_norm > 0 else None,
            "cos_with_output": float(c @ y / (c_norm * y_norm))
            if c_norm > 0 and y_norm > 0 else None}


class OpenedModel(Protocol):
    """What a report reads of an opened model (api.LoadedModel is one): its file, config,
    weights and vocabulary."""

    path: Path
    gguf: GGUFFile
    cfg: ModelConfig
    weights: GGUFWeights
    vocab: Vocabulary

    def token_text(self, token_id: int) -> str: ...


def anchor_summary(m: OpenedModel, anchor: Anchor, y: torch.Tensor,
                   result: JacobianResult | None = None) -> dict:
    """How closely the anchored model reproduces llama.cpp's run (last position): y is the
    anchored final-norm output; `result`, the full Jacobian if one was computed."""
    ours = unembed(m.weights, logit_input(y, anchor)[None])[0]
    ours = ours.to(torch.float64).cpu().numpy()
    agreement = logits_agreement(ours, anchor.logits[-1])
    y_ref = anchor.output[-1].to(y.dtype)
    summary = {
        "runtime": "llama.cpp",
        "flash_attn": anchor.flash_attn,
        "llama_cpp_settings": dataclasses.asdict(anchor.settings),
        "llama_cpp_resolved": anchor.resolved,
        "anchor_logits_nmse": agreement.nmse,
        "anchor_logits_nmse_definition": "nmse of the unembedding of the anchored output "
                                         "(its input rounding frozen too) vs llama.cpp's "
                                         "logits, last position",
        "anchor_output_rel_error": float(torch.linalg.vector_norm(y - y_ref)
                                         / torch.linalg.vector_norm(y_ref)),
        "llama_cpp_top1": m.token_text(agreement.reference_top1),
        "anchored_top1": m.token_text(agreement.ours_top1),
        "top1_agree": agreement.top1_agree,
        "coefficient_sources": anchor.sources,
        "approximations": anchor.approximations,
    }
    if result is not None:
        summary["reconstruction_rel_error_vs_llama_cpp"] = reconstruction_rel_error(
            result.jacobian, result.inputs, y_ref, result.constant)
    if anchor.reference is not None:
        ref = anchor.reference
        independent = logits_agreement(ours, ref.logits)
        y_default = torch.from_numpy(ref.output.astype(np.float64)).to(y)
        summary["independent_run"] = {
            "what": "an independent llama.cpp run (separate process, the same settings) "
                    "decoding the prompt as llama.cpp's own tools do: the last position's "
                    "logits only",
            "llama_cpp_settings": dataclasses.asdict(ref.settings),
            "llama_cpp_resolved": ref.resolved,
            "logits_nmse": independent.nmse,
            "output_rel_error": float(torch.linalg.vector_norm(y - y_default)
                                      / torch.linalg.vector_norm(y_default)),
            "llama_cpp_top1": m.token_text(independent.reference_top1),
        }
    return summary


ROUTING_DEFINITION = (
    "per layer, the experts each position's router selected (in llama.cpp's order: by "
    "descending score, ties as its sort leaves them) and their weights w_e, frozen: the "
    "layer's MLP is sum_e w_e * expert_e(x) over those experts; the others contribute 0")


def routing_report(m: OpenedModel, tokens: list[int],
                   routing: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """A mixture of experts' routing (per layer and token: experts and weights) and the
    share of the file the prompt's sweeps read: the bytes of the experts some position
    selected against the file's size and its experts' bytes."""
    expert_bytes = sum(info.n_bytes for name, info in m.gguf.tensors.items()
                       if len(info.shape) == 3 and "_exps" in name)
    file_bytes = Path(m.gguf.path).stat().st_size
    read = m.weights.expert_bytes_read()
    return {
        "definition": ROUTING_DEFINITION,
        "experts_per_token": m.cfg.n_expert_used, "n_expert": m.cfg.n_expert,
        "layers": [{"layer": i,
                    "experts": experts.tolist(),
                    "weights": [[round(float(v), 8) for v in row] for row in weights]}
                   for i, (experts, weights) in enumerate(routing)],
        "tokens": [m.token_text(t) for t in tokens],
        "expert_bytes_read": read,
        "expert_bytes_in_file": expert_bytes,
        "file_bytes": file_bytes,
        "share_of_experts_read": read / expert_bytes if expert_bytes else 0.0,
        # every other tensor is read whole: the share of the file this prompt touched
        "share_of_file_read": (file_bytes - expert_bytes + read) / file_bytes,
    }


def jacobian_report(m: OpenedModel, tokens: list[int], result: JacobianResult, lin: Linearization,
                    n_vectors: int = 10, n_tokens: int = 5,
                    anchor: Anchor | None = None) -> dict:
    """Reconstruction, spectrum, ranks and decoded singular vectors of a full Jacobian
    (and, if anchored, how it matches llama.cpp's run)."""
    d, n = result.jacobian.shape[0], result.jacobian.shape[1]
    on_disk = isinstance(result.jacobian, JacobianFile)
    spec = gram_spectrum(result.jacobian, result.output) if on_disk else \
        spectrum(result.jacobian.reshape(d, n * result.jacobian.shape[2]), result.output)
    k = min(n_vectors, spec.left.shape[1])
    # One walk over the unembedding decodes the singular vectors and y itself (the
    # predicted token: a final soft-cap is monotone, so it does not change the argmax).
    directions = torch.cat((spec.left[:, :k], logit_input(result.output, anchor)[:, None]),
                           dim=1)
    decoded = top_tokens_by_unembedding(m.weights, directions, n_tokens)
    predicted = decoded[k][0][0]
    report = {
        "model": str(m.path),
        "architecture": m.cfg.arch,
        "dtype": str(result.jacobian.dtype).removeprefix("torch."),
        "detach": lin.detach,
        "gate_path": lin.gate_path,
        "tokens": [m.token_text(t) for t in tokens],
        "token_ids": tokens,
        "predicted_token": m.token_text(predicted),
        "predicted_token_id": predicted,
        "reconstruction_rel_error": result.reconstruction_rel_error(),
        "singular_values": spec.singular_values.tolist(),
        "effective_rank": spec.stable_rank,
        "effective_rank_definition": STABLE_RANK_DEFINITION,
        "entropy_effective_rank": spec.entropy_rank,
        "entropy_effective_rank_definition": ENTROPY_RANK_DEFINITION,
        "sign_convention": "each left singular vector u is negated if needed so that "
                           "u . output > 0 (its right vector with it)",
        "spectrum_method": "eigenvalues of J J^T accumulated from the file (J was larger "
                           "than the memory budget)" if on_disk else
                           "SVD of J (Householder QR of J^T, then the SVD of R)",
        "top_singular_tokens": [
            {"index": j, "singular_value": float(spec.singular_values[j]),
             "cos_with_output": float(spec.left[:, j] @ result.output.to(spec.left.dtype)
                                      / torch.linalg.vector_norm(result.output)),
             "tokens": [m.token_text(t) for t, _ in decoded[j]],
             "scores": [s for _, s in decoded[j]]}
            for j in range(k)],
    }
    if result.constant is not None:
        report["constant"] = constant_report(result.constant, result.output, "jacobian")
    if result.routing is not None:
        report["routing"] = routing_report(m, tokens, result.routing)
    if anchor is not None:
        report["anchor"] = anchor_summary(m, anchor, result.output, result)
    return report


def svd_report(m: OpenedModel, tokens: list[int], result: TopSingularTriplets,
               lin: Linearization, anchor: Anchor | None = None,
               per_token: PerTokenTriplets | None = None, n_tokens: int = 5) -> dict:
    """`svd`'s report: the top-K triplets of J (σ, residuals, decoded left vectors, where
    each right vector reads), the truncated reconstruction, ‖J‖²_F and the stable rank;
    with `per_token`, every block J_i's top triplets and its top left vector decoded."""
    k, y = result.singular_values.shape[0], result.output
    columns = [result.left, logit_input(y, anchor)[:, None]]
    if per_token is not None:
        columns.append(per_token.left[:, :, 0].T)
    decoded = top_tokens_by_unembedding(m.weights, torch.cat(columns, dim=1), n_tokens)
    predicted = decoded[k][0][0]
    s1 = float(result.singular_values[0])
    positions = result.input_weights()
    y_norm = torch.linalg.vector_norm(y)
    report = {
        "model": str(m.path), "architecture": m.cfg.arch,
        "dtype": str(result.singular_values.dtype).removeprefix("torch."),
        "gate_path": lin.gate_path,
        "tokens": [m.token_text(t) for t in tokens], "token_ids": tokens,
        "predicted_token": m.token_text(predicted), "predicted_token_id": predicted,
        "method": "matrix-free block Lanczos on J J^T (forward and reverse sweeps), then the "
                  "SVD of U^T J for the top Ritz vectors U" if result.iterations else
                  "dense SVD of the formed Jacobian",
        "top_k": k, "converged": result.converged, "iterations": result.iterations,
        "sigma_relative_change": result.sigma_change, "tolerance": result.tolerance,
        "krylov_dimension": result.krylov_dimension, "vectors_swept": result.vectors_swept,
        "singular_values": result.singular_values.tolist(),
        "residuals": result.residuals.tolist(),
        "residual_definition": "||J v_k - s_k u_k|| / s_k (||J^T u_k - s_k v_k|| is zero by "
                               "construction)",
        "truncated_reconstruction_rel_error": result.truncated_reconstruction_rel_error(),
        "truncated_reconstruction_definition": "||y - sum_k s_k u_k (v_k . x)|| / ||y||",
        "frobenius_norm_sq": result.frobenius_sq,
        "frobenius_norm_sq_std": result.frobenius_sq_std,
        "frobenius_definition": "||J||_F^2: exact on the Krylov space, plus a Hutchinson "
                                "estimate over its complement (std: its standard error)",
        "stable_rank": result.stable_rank,
        "stable_rank_std": result.frobenius_sq_std / (s1 * s1) if s1 > 0 else 0.0,
        "stable_rank_definition": STABLE_RANK_DEFINITION,
        "sign_convention": "each left singular vector u is negated if needed so that "
                           "u . output > 0 (its right vector with it)",
        "vectors": [
            {"index": j, "singular_value": float(result.singular_values[j]),
             "residual": float(result.residuals[j]),
             "cos_with_output": float(result.left[:, j] @ y / y_norm),
             "tokens": [m.token_text(t) for t, _ in decoded[j]],
             "scores": [sc for _, sc in decoded[j]],
             "input_position_norms": positions[j].tolist()}
            for j in range(k)],
        "sweeps": [t.as_dict() for t in result.sweeps],
    }
    if per_token is not None:
        report["per_token"] = [
            {"position": i, "token": m.token_text(tokens[i]),
             "singular_values": per_token.singular_values[i].tolist(),
             "top_left_tokens": [m.token_text(t) for t, _ in decoded[k + 1 + i]]}
            for i in range(len(tokens))]
    if result.constant is not None:
        report["constant"] = constant_report(result.constant, y, "svd")
    if anchor is not None:
        report["anchor"] = anchor_summary(m, anchor, y)
    return report


def add_chat(report: dict, chat: ChatPrompt) -> dict:
    """A chat prompt's conversation and token segments in `report` (report["chat"]); per
    attribution target, its token contributions summed by segment ("segment_sums": they sum
    to the sum of contributions; a constant term is no token's and is not in them); per
    decoded singular vector with per-position norms, the share of its squared norm that
    reads from each segment ("segment_shares")."""
    report["chat"] = chat.describe()
    for row in report.get("targets", []):
        row["segment_sums"] = chat.segment_sums(row["contributions"])
    for v in report.get("vectors", []):
        norms = v.get("input_position_norms")
        if norms is not None and len(norms) == len(chat.segments):
            squares = chat.segment_sums([float(n) ** 2 for n in norms])
            total = sum(squares.values())
            v["segment_shares"] = {k: (q / total if total > 0 else 0.0)
                                   for k, q in squares.items()}
    return report


def attribution_report(m: OpenedModel, tokens: list[int], lin: Linearization,
                       dtype: torch.dtype, targets: list[int], contributions: torch.Tensor,
                       logits: torch.Tensor, y: torch.Tensor, anchor: Anchor | None,
                       constant: torch.Tensor | None = None,
                       biases: torch.Tensor | None = None,
                       layer_components: list[LayerComponents] | None = None) -> dict:
    """`attribute`'s report: per target, its logit u_t · y, the contributions [targets, N],
    their sum, and (anchored) llama.cpp's logit. For an affine network (`constant` c), each
    target's `biases` entry u_t · c is its 'bias' row, in the sum. With `layer_components`
    (components.component_sweep), each target's logit split at every layer ('components')."""
    cap = m.cfg.final_logit_softcap
    rows = []
    for j, t in enumerate(targets):
        c = contributions[j]
        total = float(c.sum()) + (0.0 if biases is None else float(biases[j]))
        row = {"token": m.token_text(t), "id": t, "logit": float(logits[j]),
               "sum_of_contributions": total,
               "rel_error": abs(total - float(logits[j])) / max(abs(float(logits[j])), 1e-300),
               "contributions": [float(v) for v in c]}
        if biases is not None:
            row["bias"] = float(biases[j])
        if cap is not None:
            row["logit_after_softcap"] = float(torch.tanh(logits[j] / cap) * cap)
        if anchor is not None:
            row["llama_cpp_logit"] = float(anchor.logits[-1][t])
        if layer_components is not None:
            row["components"] = components_report(layer_components, j, float(logits[j]))
        alternative = m.vocab.space_prefixed(t)
        if alternative is not None:
            alt_logit = float(m.weights.unembedding_rows([alternative])[0] @ y)
            if alt_logit > row["logit"]:
                row["space_prefixed_alternative"] = {
                    "token": m.token_text(alternative), "id": alternative,
                    "logit": alt_logit}
        rows.append(row)
    report = {"model": str(m.path), "architecture": m.cfg.arch,
            "dtype": str(dtype).removeprefix("torch."), "gate_path": lin.gate_path,
            "tokens": [m.token_text(t) for t in tokens], "token_ids": tokens,
            "logit_definition": "u_t . y, y the last position's final-norm output"
                                + (" (before the final soft-cap)" if cap is not None else "")
                                + (", its input rounded as llama.cpp's unembedding matmul "
                                   "rounds it (frozen ratio)" if anchor is not None else ""),
            "targets": rows}
    if constant is not None:
        report["constant"] = constant_report(constant, y, "attribute")
    if layer_components is not None:
        report["components_definition"] = {"definition": COMPONENTS_DEFINITION,
                                           "biases": BIAS_ASSIGNMENT}
    if anchor is not None:
        report["anchor"] = anchor_summary(m, anchor, y)
    return report


# The per-layer totals of a components report: the kinds (components.py) each one sums.
COMPONENT_COLUMNS = {"stream": ("stream",), "attention": ("head", "attention_bias"),
                     "mlp": ("mlp", "expert"), "bias_above": ("bias_above",)}


def components_report(layers: list[LayerComponents], target: int, logit: float) -> dict:
    """One target's components at every layer: each component's contribution, the
    columns' totals (COMPONENT_COLUMNS), their sum and its relative difference from the
    logit (the exactness check; rounding only), and the largest of those over the layers."""
    rows = []
    for lc in layers:
        values = [float(v) for v in lc.values[target]]
        total = float(lc.values[target].sum())
        kinds = [c.kind for c in lc.components]
        rows.append({"layer": lc.layer,
                     "components": [{"name": c.name, "kind": c.kind, "index": c.index,
                                     "value": v} for c, v in zip(lc.components, values)],
                     "totals": {column: sum(v for k, v in zip(kinds, values) if k in members)
                                for column, members in COMPONENT_COLUMNS.items()
                                if any(k in members for k in kinds)},
                     "sum": total,
                     "rel_error": abs(total - logit) / max(abs(logit), 1e-300)})
    return {"layers": rows, "max_rel_error": max((r["rel_error"] for r in rows), default=0.0)}


def check_report(m: OpenedModel, prompt: str, tokens: list[int], ours: np.ndarray,
                 theirs: np.ndarray, settings: RunSettings, resolved: dict, top: int) -> dict:
    """`check`'s comparison of our last-position logits with llama.cpp's."""
    agreement = logits_agreement(ours, theirs)
    lp_ours, lp_ref = log_softmax(ours), log_softmax(theirs)
    order_ours, order_ref = top_order(ours, top), top_order(theirs, top)
    return {
        "prompt": prompt,
        "tokens": [m.token_text(t) for t in tokens],
        "dtype": str(m.weights.dtype).removeprefix("torch."),
        "ours_top": [{"token": m.token_text(int(i)), "id": int(i),
                      "logit": float(ours[i]), "prob": float(np.exp(lp_ours[i]))}
                     for i in order_ours],
        "llama_cpp_top": [{"token": m.token_text(int(i)), "id": int(i),
                           "logit": float(theirs[i]), "prob": float(np.exp(lp_ref[i]))}
                          for i in order_ref],
        "ours_top1": m.token_text(agreement.ours_top1),
        "llama_cpp_top1": m.token_text(agreement.reference_top1),
        "top1_agree": agreement.top1_agree,
        "llama_cpp_margin": agreement.reference_margin,
        "max_abs_logit_diff": agreement.max_abs_diff,
        "kl": agreement.kl,
        "nmse": agreement.nmse,
        "llama_cpp_settings": dataclasses.asdict(settings),
        "llama_cpp_resolved": resolved,
    }


def layers_report(m: OpenedModel, tokens: list[int], chosen: list[int], lin: Linearization,
                  device: str, seconds: float, predicted: int, entries: list[dict],
                  anchored: Anchor | None, y: torch.Tensor, affine: bool = False) -> dict:
    """`layers`' report: every map's figures and decoded vectors (layers.describe_maps);
    `affine`: the network has a constant term (each map's own is in its entry)."""
    report = {"model": str(m.path), "architecture": m.cfg.arch, "tokens":
              [m.token_text(t) for t in tokens], "token_ids": tokens,
              "dtype": str(m.weights.dtype).removeprefix("torch."), "gate_path": lin.gate_path,
              "device": device,
              "layers": chosen, "seconds": seconds,
              "predicted_token": m.token_text(predicted),
              "kinds": {"cumulative": "input embeddings -> final norm (frozen) of the residual "
                                      "after the layer, last position",
                        "layer": "layer input (all positions) -> layer output, last position",
                        "layer_no_residual": "the same without the residual: attention + MLP",
                        "attention": "layer input -> attention part's output, last position",
                        "mlp": "layer input -> MLP part's output, last position"},
              "stable_rank_definition": "||J||_F^2 / s_1^2",
              "maps": entries}
    if affine:
        report["constant"] = constant_statement("layers")
    if anchored is not None:
        report["anchor"] = anchor_summary(m, anchored, y)
    return report


def prediction_report(m: OpenedModel, y: torch.Tensor, anchor: Anchor | None = None,
                      run: LlamaCppRun | None = None, k: int = 5) -> dict:
    """Our top-k next tokens (logits of y, the final soft-cap applied) and, given llama.cpp's
    own `run` on the same tokens (last position), its top-k, the logits nmse between the two
    and whether the top-1 tokens agree."""
    z = unembed(m.weights, logit_input(y, anchor)).to(torch.float64)
    top = torch.topk(z, min(k, z.numel()))
    out: dict = {"top_logits": [{"token": m.token_text(int(t)), "id": int(t), "logit": float(v)}
                                for v, t in zip(top.values, top.indices)]}
    if run is not None:
        theirs = run.logits[-1].astype(np.float64)
        agreement = logits_agreement(z.cpu().numpy(), theirs)
        out["llama_cpp"] = {
            "settings": run.settings.describe(), "flash_attn": run.flash_attn,
            "top_logits": [{"token": m.token_text(int(t)), "id": int(t),
                            "logit": float(theirs[t])} for t in top_order(theirs, k)],
            "logits_nmse": agreement.nmse,
            "max_abs_logit_diff": agreement.max_abs_diff,
            "top1_agree": agreement.top1_agree}
    return out
