"""The reverse sweep's batched paths against plain autograd on the recorded (detached) graph.

A replayed layer's cotangent rows are pulled back as a batch by one backward of the layer
applied to its input repeated (engine._pull_back_batched), and the MLP matrices of several
positions are formed by one product (model.mlp_branch_matrices). The references here build
the detached layer as the forward pass records it (coefficients computed from the input and
detached, not replayed) and take one plain backward per cotangent row, or autograd's
Jacobian per position: no batching, no replay, no matrices. float64, every family's
synthetic file and the real Gemma 3 270M, within 1e-12.
"""

from __future__ import annotations

import pytest
import torch

from ggufjac.api import open_model
from ggufjac.families import FAMILIES
from ggufjac.linearize import Linearization
from ggufjac.model import block, mlp_branch, mlp_branch_matrices

PROMPT = "the bridge out of Marin"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def _rows_by_plain_backward(engine, layer: int, w, x: torch.Tensor, part: str,
                            cotangents: torch.Tensor) -> torch.Tensor:
    """cotangents [m, N, d] on the detached layer's `part`, recorded afresh from x (not
    replayed), pulled back to x one row at a time."""
    xg = x.detach().clone().requires_grad_(True)
    out = getattr(block(engine.cfg, layer, w, xg, engine.lin.recording({})), part)
    rows = [torch.autograd.grad(out, xg, c, retain_graph=True)[0] for c in cotangents]
    return torch.stack(rows)


def _check_layer(m, layer: int, m_small: int, seed: int) -> None:
    engine = m.engine()
    tokens = m.tokenize(PROMPT)
    record = engine.forward(engine.embed(tokens))
    w = m.weights.layer(layer)  # every tensor: the reference records q, k and the gate too
    n, d = record.inputs.shape
    gen = torch.Generator().manual_seed(seed)
    x = record.residuals[layer]
    cases = [("out", torch.randn(d, n, d, dtype=torch.float64, generator=gen)),  # matrices
             ("out", torch.randn(m_small, n, d, dtype=torch.float64, generator=gen))]
    last = torch.zeros(m_small, n, d, dtype=torch.float64)
    last[:, -1] = torch.randn(m_small, d, dtype=torch.float64, generator=gen)
    cases.append(("out", last))  # the last row alone (the top layer's case)
    for part in ("attn", "mlp"):
        cases.append((part, torch.randn(m_small, n, d, dtype=torch.float64, generator=gen)))
    for part, cot in cases:
        expect = _rows_by_plain_backward(engine, layer, w, x, part, cot)
        got = engine.layer_vjp(layer, w, record, cot.clone(), part, chunk=3)
        assert _rel(got, expect) <= 1e-12, (part, cot.shape)


@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_batched_layer_pullback_every_family(synthetic, arch: str) -> None:
    """Every path of layer_vjp (the MLP by its matrices, by autograd, on the last row alone;
    the attention and MLP parts alone), chunks of 3 rows, against one plain backward per row."""
    m = open_model(synthetic(arch, "Q4_K_M"), dtype="float64")
    _check_layer(m, 1, 5, seed=3)


def test_batched_layer_pullback_real(gemma64) -> None:
    _check_layer(gemma64, 7, 4, seed=4)


@pytest.mark.parametrize("arch", ["llama", "phi3", "gemma3", "olmo2"])
@pytest.mark.parametrize("gate_path", ["up", "gate"])
def test_mlp_matrices_of_several_positions(synthetic, arch: str, gate_path: str) -> None:
    """The positions' MLP matrices formed side by side equal autograd's Jacobian of the
    replayed MLP branch at each position, rounding ratios included (random ones stand in for
    an anchored run's), for any subset and order of positions and d_ff chunk."""
    m = open_model(synthetic(arch, "Q4_K_M"), dtype="float64")
    engine = m.engine(Linearization(gate_path=gate_path))
    record = engine.forward(engine.embed(m.tokenize(PROMPT)))
    w = m.weights.layer(1)
    gen = torch.Generator().manual_seed(5)
    store = dict(record.coefficients[1])
    n, d = record.inputs.shape
    store["in:" + ("ffn_up" if gate_path == "up" else "ffn_gate")] = \
        1 + 0.1 * torch.randn(n, d, dtype=torch.float64, generator=gen)
    store["in:ffn_down"] = 1 + 0.1 * torch.randn(n, m.cfg.d_ff, dtype=torch.float64,
                                                 generator=gen)
    mid = record.residuals[1] + 0.5 * torch.randn(n, d, dtype=torch.float64, generator=gen)
    lin = engine.lin.replaying(store)
    positions = [n - 1, 0, n // 2]
    got = mlp_branch_matrices(m.cfg, w, store, gate_path, positions, ffn_chunk=96)
    assert got.shape == (d, len(positions), d)
    for i, p in enumerate(positions):
        def branch_at(row: torch.Tensor) -> torch.Tensor:
            return mlp_branch(m.cfg, w, torch.cat((mid[:p], row[None], mid[p + 1:])), lin)[p]
        expect = torch.autograd.functional.jacobian(branch_at, mid[p])
        assert _rel(got[:, i], expect) <= 1e-13


def test_mlp_matrices_real(gemma64, bridge_tokens) -> None:
    """The same on the real model's layers 0 and 17, all eight positions at once."""
    engine = gemma64.engine()
    record = engine.forward(engine.embed(bridge_tokens))
    n = len(bridge_tokens)
    for layer in (0, 17):
        w = gemma64.weights.layer(layer)
        store = record.coefficients[layer]
        lin = engine.lin.replaying(store)
        mid = record.residuals[layer]
        got = mlp_branch_matrices(gemma64.cfg, w, store, "up", list(range(n)), ffn_chunk=1024)
        for p in (0, n - 1):
            def branch_at(row: torch.Tensor) -> torch.Tensor:
                return mlp_branch(gemma64.cfg, w, torch.cat((mid[:p], row[None], mid[p + 1:])),
                                  lin)[p]
            expect = torch.autograd.functional.jacobian(branch_at, mid[p], vectorize=True)
            assert _rel(got[:, p], expect) <= 1e-12
