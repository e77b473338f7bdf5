"""The detach rules: forward values unchanged, Jacobian changed, output reconstructed."""

from __future__ import annotations

import pytest
import torch

from ggufjac.jacobian import detached_jacobian
from ggufjac.linearize import DETACHED, PLAIN, Linearization, gated_product, rms_norm


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_gated_product_modes_give_identical_values(activation: str) -> None:
    g, u = torch.randn(5, 64, dtype=torch.float64), torch.randn(5, 64, dtype=torch.float64)
    values = [gated_product(lambda: g, lambda: u, activation, lin) for lin in
              (PLAIN, Linearization(gate_path="up"), Linearization(gate_path="gate"))]
    assert all(torch.equal(values[0], v) for v in values[1:])
    reference = torch.nn.functional.silu(g) if activation == "silu" else \
        torch.nn.functional.gelu(g, approximate="tanh")
    torch.testing.assert_close(values[0], reference * u, rtol=1e-14, atol=1e-14)


def test_rms_norm_detached_is_linear_in_x() -> None:
    """With 1/rms frozen, the Jacobian of the norm is diag(w / rms): J x reproduces the output."""
    x = torch.randn(3, 16, dtype=torch.float64)
    w = torch.randn(16, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda t: rms_norm(t, w, 1e-6, DETACHED, 'attn_norm'), x)
    out = rms_norm(x, w, 1e-6, DETACHED, 'attn_norm')
    torch.testing.assert_close(torch.einsum("abcd,cd->ab", jac, x), out, rtol=1e-13, atol=1e-13)
    plain = torch.autograd.functional.jacobian(lambda t: rms_norm(t, w, 1e-6, PLAIN, 'attn_norm'), x)
    assert not torch.allclose(torch.einsum("abcd,cd->ab", plain, x), out, atol=1e-3)


def test_detach_leaves_forward_bit_identical(gemma32, bridge_tokens) -> None:
    m = gemma32.model
    x = m.embed(bridge_tokens)
    with torch.no_grad():
        outs = [m.forward(x, lin) for lin in
                (PLAIN, Linearization(gate_path="up"), Linearization(gate_path="gate"))]
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_plain_and_detached_jacobians_differ(gemma32, bridge_tokens) -> None:
    """The ordinary Jacobian does not reconstruct y (Euler's identity fails); the detached does."""
    m = gemma32.model
    x = m.embed(bridge_tokens)
    detached = detached_jacobian(m, x, DETACHED, chunk=160)
    plain = detached_jacobian(m, x, PLAIN, chunk=160)
    torch.testing.assert_close(plain.output, detached.output, rtol=0, atol=0)
    diff = torch.linalg.norm(plain.jacobian - detached.jacobian) / torch.linalg.norm(detached.jacobian)
    assert diff > 0.1
    assert detached.reconstruction_rel_error() < 1e-5
    assert plain.reconstruction_rel_error() > 0.1


def test_chunked_cotangents_equal_unchunked(gemma32, bridge_tokens) -> None:
    m = gemma32.model
    x = m.embed(bridge_tokens[:4])
    whole = detached_jacobian(m, x, chunk=None)
    chunked = detached_jacobian(m, x, chunk=100)
    # Float32 BLAS sums in a batch-size-dependent order: equal up to rounding, not bitwise.
    rel = torch.linalg.norm(chunked.jacobian - whole.jacobian) / torch.linalg.norm(whole.jacobian)
    assert rel < 1e-6, float(rel)


def test_a_misspelled_site_fails_instead_of_skipping_a_rounding() -> None:
    """A rounding site nobody gives is the identity; a site that does not exist is an
    error at its first use, so a typo cannot silently drop an anchored run's rounding."""
    from ggufjac.linearize import Linearization, frozen_rounding

    x = torch.ones(3, dtype=torch.float64)
    lin = Linearization(given={"in:attn_v": torch.full((3,), 0.5, dtype=torch.float64)})
    assert torch.equal(frozen_rounding(x, lin, "in:attn_v"), x * 0.5)
    assert torch.equal(frozen_rounding(x, lin, "in:ffn_down"), x)
    with pytest.raises(ValueError, match="in:atn_v"):
        frozen_rounding(x, lin, "in:atn_v")


def test_rounding_sites_are_the_layout_tables_linear_matmuls() -> None:
    from ggufjac.families import FAMILIES
    from ggufjac.layout import linear_matmuls
    from ggufjac.linearize import Site

    matmuls = {f"in:{n}" for fam in FAMILIES.values() for n in linear_matmuls(fam)}
    assert matmuls == {s.value for s in Site if s.value.startswith("in:")}
