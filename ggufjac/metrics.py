"""How close two sets of logits are: the one definition of each figure ggufjac states when it
compares its logits with llama.cpp's (`check`, anchored reports, `--html`'s prediction
figures, `batch`, `compare`) or one file's with another's.

Everything here is float64 numpy on arrays already computed; nothing runs a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# `check` passes when our logits are this close to llama.cpp's (nmse), and the top-1 tokens
# agree unless llama.cpp's own top two are within this many logits (a near-tie, which
# llama.cpp's settings alone flip: flash attention on and off disagree on such prompts).
CHECK_NMSE_BOUND = 1e-2
CHECK_NEAR_TIE = 0.1


def nmse(ours: np.ndarray, reference: np.ndarray) -> float:
    """Normalized mean squared error Σ(ours − ref)² / Σ ref², in float64."""
    a, b = np.asarray(ours, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    return float(((a - b) ** 2).sum() / (b ** 2).sum())


def log_softmax(z: np.ndarray) -> np.ndarray:
    """log softmax(z) in float64 (the largest logit subtracted first)."""
    z = np.asarray(z, dtype=np.float64)
    mx = z.max()
    return z - mx - math.log(np.exp(z - mx).sum())


def top_order(z: np.ndarray, k: int) -> np.ndarray:
    """The indices of the k largest values, largest first; ties in index order, so the first
    is always `np.argmax`'s choice."""
    return np.argsort(-np.asarray(z), kind="stable")[:k]


@dataclass(frozen=True)
class LogitsAgreement:
    """Our last-position logits against a reference's (llama.cpp's, or another file's)."""

    nmse: float  # Σ(ours − ref)² / Σ ref²
    max_abs_diff: float  # the largest |ours − ref| over the vocabulary
    kl: float  # KL(p_ref ‖ p_ours) of the two softmax distributions, in nats
    ours_top1: int  # argmax of ours (the first index of the largest)
    reference_top1: int
    reference_margin: float  # the reference's top-1 logit minus its top-2 (inf: one logit)

    @property
    def top1_agree(self) -> bool:
        return self.ours_top1 == self.reference_top1


def logits_agreement(ours: np.ndarray, reference: np.ndarray) -> LogitsAgreement:
    """Every figure that says how close `ours` is to `reference` (both [vocab])."""
    a, b = np.asarray(ours, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    lp_ours, lp_ref = log_softmax(a), log_softmax(b)
    top_two = b[top_order(b, 2)]
    margin = float(top_two[0] - top_two[1]) if top_two.size > 1 else math.inf
    return LogitsAgreement(nmse=nmse(a, b), max_abs_diff=float(np.abs(a - b).max()),
                           kl=float((np.exp(lp_ref) * (lp_ref - lp_ours)).sum()),
                           ours_top1=int(np.argmax(a)), reference_top1=int(np.argmax(b)),
                           reference_margin=margin)


def check_verdict(nmse_value: float, top1_agree: bool, reference_margin: float) -> dict:
    """PASS or FAIL, and why: `passed` and `verdict` for `check`'s comparison (files with
    non-finite weights are failed before any comparison, in LoadedModel.check)."""
    reasons = []
    if nmse_value > CHECK_NMSE_BOUND:
        reasons.append(f"logits nmse {nmse_value:.2e} > {CHECK_NMSE_BOUND:g}")
    if not top1_agree and reference_margin > CHECK_NEAR_TIE:
        reasons.append(f"top-1 differs and llama.cpp's margin {reference_margin:.3f}"
                       f" is > {CHECK_NEAR_TIE}")
    passed = not reasons
    if reasons:
        verdict = "FAIL: " + "; ".join(reasons)
    elif not top1_agree:
        verdict = (f"PASS: top-1 differs, but llama.cpp's own top two are "
                   f"{reference_margin:.3f} apart (a near-tie, <= "
                   f"{CHECK_NEAR_TIE}: rounding decides it)")
    else:
        verdict = f"PASS: nmse <= {CHECK_NMSE_BOUND:g}, same top-1"
    return {"passed": passed, "verdict": verdict}
