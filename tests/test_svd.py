"""The matrix-free top-K SVD (svd.py) against the dense SVD of the formed Jacobian.

References are independent of the Lanczos code: LAPACK's SVD of J from the in-memory
autograd path (synthetic families) or of the streamed full J (the real model), and, for the
forward sweep, J applied by einsum."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from ggufjac.api import open_model
from ggufjac.cli import main
from ggufjac.families import FAMILIES
from ggufjac.linearize import Linearization
from ggufjac.svd import per_token_triplets, top_singular_triplets

PROMPT = "the bridge out of Marin is the city of"


def _dense(jacobian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d = jacobian.shape[0]
    return torch.linalg.svd(jacobian.reshape(d, -1).double(), full_matrices=False)


def _largest_angle(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest principal angle between the column spaces of a and b (orthonormal columns,
    as many): arcsin of ‖b − a aᵀb‖₂, which resolves small angles (arccos of the cosines
    cannot below ~1.5e-8 in float64)."""
    a, b = a.double(), b.double()
    sine = torch.linalg.matrix_norm(b - a @ (a.T @ b), ord=2).clamp(max=1.0)
    return float(torch.arcsin(sine))


def _separated(s: torch.Tensor, k: int, gap: float = 1e-3) -> list[int]:
    """Indices j < k whose σ_j is separated from its neighbours by `gap` relative, and k
    itself if the top-k block is separated from σ_{k+1}: where vectors are determined."""
    rel = lambda a, b: abs(float(a - b)) / float(a)  # noqa: E731
    single = [j for j in range(k) if (j == 0 or rel(s[j - 1], s[j]) > gap)
              and rel(s[j], s[j + 1]) > gap]
    return single


def _check_against_dense(result, jacobian: torch.Tensor, k: int, sigma_rel: float,
                         angle: float) -> None:
    u, s, vh = _dense(jacobian)
    assert result.converged
    assert float(((result.singular_values.double() - s[:k]).abs() / s[:k]).max()) <= sigma_rel
    n, d = jacobian.shape[1], jacobian.shape[2]
    right = result.right.reshape(k, n * d)
    for j in _separated(s, k):  # each separated singular pair, one vector at a time
        assert _largest_angle(u[:, j:j + 1], result.left[:, j:j + 1]) <= angle
        assert _largest_angle(vh[j:j + 1].T, right[j:j + 1].T) <= angle
    if float((s[k - 1] - s[k]) / s[k - 1]) > 1e-3:  # the whole top-k subspace
        assert _largest_angle(u[:, :k], result.left) <= angle
        assert _largest_angle(vh[:k].T, right.T) <= angle


def _identity_error(result) -> float:
    """max_k |u_kᵀ (y − c) − σ_k (v_k · x)| / |u_kᵀ (y − c)|: true singular triplets of a
    map with y = J x + c (c = 0 without biases) satisfy it exactly."""
    linear_part = result.output if result.constant is None else result.output - result.constant
    lhs = result.left.T @ linear_part
    rhs = result.singular_values * torch.einsum("knd,nd->k", result.right, result.inputs)
    return float(((lhs - rhs).abs() / lhs.abs()).max())


@pytest.mark.parametrize("arch,gate_path", [(a, "up") for a in sorted(FAMILIES)]
                         + [("llama", "gate"), ("gemma3", "gate")])
def test_top_k_equals_dense_svd_every_family_float64(synthetic, arch: str, gate_path: str) -> None:
    m = open_model(synthetic(arch, "Q4_K_M"), dtype="float64")
    tokens, lin, k = m.tokenize(PROMPT), Linearization(gate_path=gate_path), 6
    reference = m.jacobian(tokens, lin, streaming=False)  # in-memory autograd
    result = m.svd(tokens, k, lin)
    _check_against_dense(result, reference.jacobian, k, 1e-10, 1e-8)
    assert _identity_error(result) <= 1e-10
    assert float(result.residuals.max()) <= 1e-8
    # the left vectors are signed as `jacobian` signs them: u · y > 0
    assert bool((result.left.T @ result.output > 0).all())


@pytest.mark.parametrize("arch", ["gemma3", "qwen3"])
def test_blocks_of_one_vector_equal_dense_svd_float64(synthetic, arch: str) -> None:
    """Lanczos one vector at a time (the default from 1,024 tokens on) meets the same bounds
    as blocks of 2, anchored to nothing but LAPACK's SVD of the autograd Jacobian."""
    m = open_model(synthetic(arch, "Q4_K_M"), dtype="float64")
    tokens, k = m.tokenize(PROMPT), 6
    reference = m.jacobian(tokens, streaming=False)
    result = m.svd(tokens, k, block=1)
    assert result.iterations == result.krylov_dimension  # one vector per iteration
    _check_against_dense(result, reference.jacobian, k, 1e-10, 1e-8)
    assert _identity_error(result) <= 1e-10


def test_residuals_are_those_of_j_itself(synthetic) -> None:
    """The reported ‖J v_k − σ_k u_k‖ / σ_k (read off the stored images, no sweep) equal
    the same residuals computed with the formed J, on a run stopped early (residuals far
    from zero, so the comparison means something)."""
    m = open_model(synthetic("llama", "Q4_K_M"), dtype="float64")
    tokens, k = m.tokenize(PROMPT), 6
    jac = m.jacobian(tokens, streaming=False).jacobian
    d = jac.shape[0]
    result = m.svd(tokens, k, max_iterations=1, block=2)
    assert not result.converged
    applied = jac.reshape(d, -1) @ result.right.reshape(k, -1).T
    direct = torch.linalg.vector_norm(applied - result.left * result.singular_values, dim=0) \
        / result.singular_values
    assert float(direct.min()) > 1e-4
    assert torch.allclose(result.residuals, direct, rtol=1e-8, atol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_top_k_float32_bounds(synthetic, arch: str) -> None:
    """Float32 sweeps: σ within 1e-5 relative of the float64 dense SVD (float32 rounding of
    J itself is ~1e-6 here, measured by the float32 streamed J against the float64 one)."""
    m64 = open_model(synthetic(arch, "Q4_K_M"), dtype="float64")
    m32 = open_model(synthetic(arch, "Q4_K_M"), dtype="float32")
    tokens, k = m64.tokenize(PROMPT), 4
    reference = m64.jacobian(tokens, streaming=False)
    result = m32.svd(tokens, k)
    _check_against_dense(result, reference.jacobian, k, 1e-5, 1e-3)
    assert _identity_error(result) <= 1e-4


def test_push_forward_is_j_times_probes(synthetic) -> None:
    m = open_model(synthetic("phi3", "Q4_K_M"), dtype="float64")
    tokens = m.tokenize(PROMPT)
    reference = m.jacobian(tokens, Linearization(gate_path="gate"), streaming=False).jacobian
    engine = m.engine(Linearization(gate_path="gate"))
    record = engine.forward(engine.embed(tokens))
    probes = torch.randn(5, len(tokens), m.cfg.d_model, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(3))
    applied = engine.push_forward(record, probes, chunk=2)
    expected = torch.einsum("onk,mnk->mo", reference, probes)
    assert float(torch.linalg.vector_norm(applied - expected)
                 / torch.linalg.vector_norm(expected)) <= 1e-12
    # the same with the layers' matrices read in row blocks (3 rows of the widest and a
    # remainder per block: the blocks divide no row count)
    streamed = m.engine(Linearization(gate_path="gate"), streaming=True,
                        block_elements=3 * m.weights.widest_row() + 5)
    record_streamed = streamed.forward(streamed.embed(tokens))
    applied_streamed = streamed.push_forward(record_streamed, probes, chunk=2)
    assert all(t.streamed for t in streamed.sweeps)
    assert float(torch.linalg.vector_norm(applied_streamed - expected)
                 / torch.linalg.vector_norm(expected)) <= 1e-12
    # J applied to the inputs themselves is y (the map is exactly linear)
    y = engine.push_forward(record, record.inputs[None])[0]
    assert float(torch.linalg.vector_norm(y - record.output[-1])
                 / torch.linalg.vector_norm(y)) <= 1e-12


def test_all_d_triplets_reconstruct_y_and_frobenius(synthetic) -> None:
    """k = d: the Krylov space becomes all of R^d, so ‖J‖²_F is exact and the truncated
    reconstruction is the full one (zero to rounding)."""
    m = open_model(synthetic("olmo2", "Q4_K_M"), dtype="float64")
    tokens = m.tokenize("the bridge")
    d = m.cfg.d_model
    reference = m.jacobian(tokens, streaming=False).jacobian
    result = m.svd(tokens, d, block=64)
    assert result.krylov_dimension == d and result.frobenius_sq_std == 0.0
    frob = float(reference.pow(2).sum())
    assert abs(result.frobenius_sq - frob) / frob <= 1e-10
    assert result.truncated_reconstruction_rel_error() <= 1e-10


def test_frobenius_estimate_and_truncated_reconstruction(synthetic) -> None:
    m = open_model(synthetic("gemma3", "Q4_K_M"), dtype="float64")
    tokens, k = m.tokenize(PROMPT), 5
    ref = m.jacobian(tokens, streaming=False)
    u, s, vh = _dense(ref.jacobian)
    result = m.svd(tokens, k)
    frob = float(s.pow(2).sum())
    assert abs(result.frobenius_sq - frob) <= 4 * result.frobenius_sq_std
    assert result.frobenius_sq_std < 0.1 * frob
    x = ref.inputs.reshape(-1)
    approx = u[:, :k] @ (s[:k] * (vh[:k] @ x))
    expected = float(torch.linalg.vector_norm(ref.output - approx)
                     / torch.linalg.vector_norm(ref.output))
    assert abs(result.truncated_reconstruction_rel_error() - expected) <= 1e-9
    weights = result.input_weights()
    assert torch.allclose(weights.pow(2).sum(dim=1), torch.ones(k, dtype=torch.float64))


def test_per_token_triplets_equal_each_blocks_svd(synthetic) -> None:
    m = open_model(synthetic("qwen3", "Q4_K_M"), dtype="float64")
    ref = m.jacobian(m.tokenize(PROMPT), streaming=False)
    per = per_token_triplets(ref.jacobian, 3, ref.output, positions_per_batch=4)
    for i in range(ref.jacobian.shape[1]):
        u, s, vh = torch.linalg.svd(ref.jacobian[:, i, :])
        assert torch.allclose(per.singular_values[i], s[:3], rtol=1e-12, atol=0)
        for j in range(3):  # the same vectors up to the sign convention u · y > 0
            sign = 1.0 if float(u[:, j] @ ref.output) > 0 else -1.0
            assert torch.allclose(per.left[i, :, j], sign * u[:, j], atol=1e-10)
            assert torch.allclose(per.right[i, j], sign * vh[j], atol=1e-10)


def test_real_model_plain_and_anchored_float64(gemma64, bridge_tokens) -> None:
    k = 4
    full = gemma64.jacobian(bridge_tokens)
    result = gemma64.svd(bridge_tokens, k)
    _check_against_dense(result, full.jacobian, k, 1e-10, 1e-8)
    assert _identity_error(result) <= 1e-10
    anchor = gemma64.anchor(bridge_tokens, reference=False)
    full = gemma64.jacobian(bridge_tokens, anchor=anchor)
    result = gemma64.svd(bridge_tokens, k, anchor=anchor)
    _check_against_dense(result, full.jacobian, k, 1e-10, 1e-8)
    assert _identity_error(result) <= 1e-10


def test_not_converging_is_reported(synthetic) -> None:
    m = open_model(synthetic("llama", "Q4_K_M"), dtype="float64")
    engine = m.engine()
    record = engine.forward(engine.embed(m.tokenize(PROMPT)))
    figures: list[tuple[int, float, float]] = []  # (iteration, σ change, Ritz residual)
    result = top_singular_triplets(engine, record, 4, max_iterations=2,
                                   on_iteration=lambda *f: figures.append(f))
    assert not result.converged and result.iterations == 2
    assert [i for i, _, _ in figures] == [1, 2]
    _, change, residual = figures[-1]
    assert result.sigma_change == change
    # the stopping rule (both below the tolerance) failed at the last iteration
    assert change > result.tolerance or residual > result.tolerance, (change, residual)


def test_cli_files_report_and_errors(tmp_path, synthetic) -> None:
    path = str(synthetic("llama", "Q4_K_M"))
    m = open_model(path, dtype="float64")
    tokens = m.tokenize(PROMPT)
    d, n, k = m.cfg.d_model, len(tokens), 3
    out = tmp_path / "svd"
    r = CliRunner().invoke(main, ["svd", path, "-p", PROMPT, "--top-k", str(k), "--out",
                                  str(out), "--dtype", "float64"])
    assert r.exit_code == 0, r.output
    t = load_file(out / "svd.safetensors")
    assert t["singular_values"].shape == (k,) and t["left"].shape == (d, k)
    assert t["right"].shape == (k, n, d) and t["inputs"].shape == (n, d)
    assert t["output"].shape == (d,)
    report = json.loads((out / "report.json").read_text())
    assert report["converged"] and len(report["residuals"]) == k
    assert len(report["vectors"][0]["input_position_norms"]) == n
    assert (out / "singular_values.png").stat().st_size > 0
    reference = _dense(m.jacobian(tokens, streaming=False).jacobian)[1][:k]
    assert torch.allclose(t["singular_values"], reference, rtol=1e-10, atol=0)

    def error(*args: str) -> str:
        r = CliRunner().invoke(main, ["svd", path, "--out", str(tmp_path / "e"), *args])
        assert r.exit_code == 2, r.output
        assert not (tmp_path / "e").exists()
        return r.output
    assert "--top-k must be at least 1" in error("-p", PROMPT, "--top-k", "0")
    assert f"rank at most {d}" in error("-p", PROMPT, "--top-k", str(d + 1))
    assert "prompt is empty" in error("-p", "  ")
    assert "--tolerance must be positive" in error("-p", PROMPT, "--tolerance", "0")
    # not converging within the iteration limit: the result says so and the exit status is 1
    r = CliRunner().invoke(main, ["svd", path, "-p", PROMPT, "--top-k", "4", "--out",
                                  str(tmp_path / "nc"), "--max-iterations", "1"])
    assert r.exit_code == 1 and "NOT converged" in r.output
    assert not json.loads((tmp_path / "nc" / "report.json").read_text())["converged"]


def test_directions_per_sweep_halves_until_the_plan_fits() -> None:
    from types import SimpleNamespace

    from ggufjac.errors import GgufjacError
    from ggufjac.jacobian import directions_per_sweep

    def plan(c: int, n: int, anchored: bool = False) -> None:
        if c > 40:
            raise GgufjacError("too much")
    engine = SimpleNamespace(cfg=SimpleNamespace(d_model=256), plan=plan)
    assert directions_per_sweep(engine, 9) == 32

    def never(c: int, n: int, anchored: bool = False) -> None:
        raise GgufjacError("--max-memory 1 MiB cannot be met")
    engine.plan = never
    with pytest.raises(GgufjacError, match="cannot be met"):
        directions_per_sweep(engine, 9)


def test_jacobian_larger_than_budget_is_written_to_disk(tmp_path, synthetic, monkeypatch) -> None:
    """`jacobian` with J over the budget (made so here: 37 directions per sweep) writes J
    to the file as it is made; the file and the report equal the in-memory run's."""
    import ggufjac.jacobian

    path = str(synthetic("gemma3", "Q4_K_M"))
    args = ["jacobian", path, "-p", PROMPT, "--dtype", "float64"]
    r = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "mem")])
    assert r.exit_code == 0, r.output
    monkeypatch.setattr(ggufjac.jacobian, "directions_per_sweep", lambda *a, **k: 37)
    r = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "disk")])
    assert r.exit_code == 0, r.output
    assert "larger than the memory budget" in r.output and "written to disk" in r.output
    assert sorted(p.name for p in (tmp_path / "disk").iterdir()) == \
        ["jacobian.safetensors", "report.json", "singular_values.png"]
    mem, disk = (load_file(tmp_path / n / "jacobian.safetensors") for n in ("mem", "disk"))
    for name in ("inputs", "output"):
        assert torch.equal(mem[name], disk[name])
    # 37 directions per sweep cross the MLP by autograd, all 256 at once through its
    # per-position matrices: the same J to float64 rounding
    rel = torch.linalg.vector_norm(mem["jacobian"] - disk["jacobian"]) \
        / torch.linalg.vector_norm(mem["jacobian"])
    assert float(rel) <= 1e-12
    rm, rd = (json.loads((tmp_path / n / "report.json").read_text()) for n in ("mem", "disk"))
    assert not rd["jacobian_in_memory"] and rm["jacobian_in_memory"]
    assert abs(rd["reconstruction_rel_error"] - rm["reconstruction_rel_error"]) <= 1e-12
    s_mem, s_disk = torch.tensor(rm["singular_values"]), torch.tensor(rd["singular_values"])
    assert float(((s_disk[:10] - s_mem[:10]).abs() / s_mem[:10]).max()) <= 1e-10
    assert [v["tokens"] for v in rd["top_singular_tokens"][:3]] == \
        [v["tokens"] for v in rm["top_singular_tokens"][:3]]

    # svd --per-token takes the same path through a scratch file it removes
    out = tmp_path / "tok"
    r = CliRunner().invoke(main, ["svd", path, "-p", PROMPT, "--dtype", "float64", "--top-k",
                                  "2", "--per-token", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == \
        ["report.json", "singular_values.png", "svd.safetensors"]
    t = load_file(out / "svd.safetensors")
    jac = mem["jacobian"]
    for i in (0, jac.shape[1] - 1):
        s = torch.linalg.svdvals(jac[:, i, :])
        assert torch.allclose(t["per_token_singular_values"][i], s[:2], rtol=1e-12, atol=0)
    s = torch.linalg.svdvals(jac.reshape(jac.shape[0], -1))
    assert torch.allclose(t["singular_values"], s[:2], rtol=1e-10, atol=0)


@pytest.mark.parametrize("arch,gate_path", [("llama", "gate"), ("qwen3", "up")])
def test_anchored_top_k_equals_dense_svd_synthetic(synthetic, arch: str, gate_path: str) -> None:
    """Anchored to llama.cpp's run (its coefficients and roundings frozen), the matrix-free
    triplets are still those of the anchored J's dense SVD."""
    m = open_model(synthetic(arch, "Q4_K_M"), dtype="float64")
    tokens, lin, k = m.tokenize(PROMPT), Linearization(gate_path=gate_path), 4
    anchor = m.anchor(tokens, lin, reference=False)
    full = m.jacobian(tokens, lin, anchor=anchor)
    result = m.svd(tokens, k, lin, anchor=anchor)
    _check_against_dense(result, full.jacobian, k, 1e-10, 1e-8)
    assert _identity_error(result) <= 1e-10
