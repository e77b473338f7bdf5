"""metrics.py's figures against independent computations (torch, sorted lists, the formulas)."""

from __future__ import annotations

import math

import numpy as np
import torch

from ggufjac.metrics import (CHECK_NEAR_TIE, CHECK_NMSE_BOUND, check_verdict, logits_agreement,
                             nmse, top_order)


def test_logits_agreement_against_torch_and_the_formulas() -> None:
    rng = np.random.default_rng(3)
    reference = rng.standard_normal(1000).astype(np.float32) * 4
    ours = reference + rng.standard_normal(1000).astype(np.float32) * 0.3
    a = logits_agreement(ours, reference)
    r64, o64 = torch.tensor(reference, dtype=torch.float64), torch.tensor(ours, dtype=torch.float64)
    kl = torch.nn.functional.kl_div(torch.log_softmax(o64, 0), torch.log_softmax(r64, 0),
                                    reduction="sum", log_target=True)
    assert math.isclose(a.kl, float(kl), rel_tol=1e-12)
    assert math.isclose(a.nmse, float(((o64 - r64) ** 2).sum() / (r64 ** 2).sum()), rel_tol=1e-12)
    assert a.max_abs_diff == float((o64 - r64).abs().max())
    ranked = sorted(range(1000), key=lambda i: -float(reference[i]))
    assert a.reference_top1 == ranked[0]
    assert a.ours_top1 == max(range(1000), key=lambda i: float(ours[i]))
    assert a.reference_margin == float(r64[ranked[0]] - r64[ranked[1]])
    assert a.top1_agree == (a.ours_top1 == a.reference_top1)
    assert nmse(ours, reference) == a.nmse


def test_identical_logits_agree_exactly_and_ties_go_to_the_first_index() -> None:
    z = np.array([1.0, 5.0, 5.0, -2.0])
    a = logits_agreement(z, z)
    assert (a.nmse, a.max_abs_diff, a.kl, a.ours_top1, a.reference_margin) == \
        (0.0, 0.0, 0.0, 1, 0.0)
    assert top_order(z, 3).tolist() == [1, 2, 0]
    assert logits_agreement(z[:1], z[:1]).reference_margin == math.inf


def test_check_verdict_states_each_reason() -> None:
    assert check_verdict(CHECK_NMSE_BOUND / 2, True, 3.0) == \
        {"passed": True, "verdict": f"PASS: nmse <= {CHECK_NMSE_BOUND:g}, same top-1"}
    near_tie = check_verdict(0.0, False, CHECK_NEAR_TIE / 2)
    assert near_tie["passed"] and "near-tie" in near_tie["verdict"]
    failed = check_verdict(CHECK_NMSE_BOUND * 2, False, CHECK_NEAR_TIE * 2)
    assert not failed["passed"]
    assert failed["verdict"].startswith("FAIL: logits nmse") and "top-1 differs" in \
        failed["verdict"]
