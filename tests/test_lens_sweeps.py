"""The cumulative maps (exact logit lens) by one reverse sweep and by one forward pass of the
N·d input directions: equal to each other in float64, and to an independent reference, the
in-memory model's autograd Jacobian of each layer's frozen-final-norm output."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from ggufjac.api import open_model
from ggufjac.costs import lens_forward_flop, lens_reverse_flop
from ggufjac.errors import GgufjacError
from ggufjac.layers import choose_sweep, cumulative_maps, layer_maps
from ggufjac.layout import dims_of
from ggufjac.linearize import DETACHED, Coefficients, Linearization, at_last_position
from ggufjac.model import block, final_norm
from tools.synthetic import Shape, write_synthetic_gguf

PROMPT = "the bridge out of Marin"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def _reference_lens(m, tokens: list[int], layers: list[int], lin: Linearization
                    ) -> dict[int, tuple[torch.Tensor, torch.Tensor | None]]:
    """Per layer l: (J [d, N, d], c or None) of input embeddings -> final norm of the residual
    after layer l (scale frozen there), last position, by autograd through the in-memory
    detached model, and c by replaying its coefficients on a zero input with the biases on."""
    model, cfg = m.model, m.cfg
    x = model.embed(tokens).detach().clone().requires_grad_(True)
    hidden: list[torch.Tensor] = []
    model.forward(x, lin, hidden=hidden)
    d = cfg.d_model
    eye = torch.eye(d, dtype=x.dtype)
    # the constant stream, layer by layer (a family with biases)
    h, z, constants = x.detach(), torch.zeros_like(x), []
    for i in range(cfg.n_layer):
        store: Coefficients = {}
        with torch.no_grad():
            h = block(cfg, i, model.layer_weights(i), h, lin.recording(store)).out
            z = block(cfg, i, model.layer_weights(i), z,
                      lin.replaying(store, constants=True)).out
        constants.append((h, z))
    out = {}
    for l in layers:
        y = final_norm(cfg, model.output_norm, hidden[l], lin)[-1]
        (j,) = torch.autograd.grad(y, x, eye, retain_graph=True, is_grads_batched=True)
        hl, zl = constants[l]
        store = {}
        with torch.no_grad():
            final_norm(cfg, model.output_norm, hl, lin.recording(store))
            c = final_norm(cfg, model.output_norm, zl, lin.replaying(store, constants=True))[-1]
        out[l] = (j, c)
    return out


def _both(m, tokens, layers, lin=DETACHED):
    engine = m.engine(lin)
    x = engine.embed(tokens)
    record = engine.forward(x)
    rev, which_r = cumulative_maps(engine, record, x, layers, sweep="reverse")
    fwd, which_f = cumulative_maps(engine, record, x, layers, sweep="forward")
    assert (which_r, which_f) == ("reverse", "forward")
    assert [mp.layer for mp in rev] == [mp.layer for mp in fwd] == sorted(layers, reverse=True)
    return rev, fwd


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3", "phi3", "olmo2", "qwen2"])
def test_forward_and_reverse_lens_agree_with_autograd(synthetic, arch: str) -> None:
    """Every family's fixture (qwen2: biases, an affine map with a constant per layer)."""
    m = open_model(synthetic(arch, "Q8_0"), dtype="float64")
    tokens = m.tokenize(PROMPT)
    layers = list(range(m.cfg.n_layer))
    rev, fwd = _both(m, tokens, layers)
    ref = _reference_lens(m, tokens, layers, DETACHED)
    for r, f in zip(rev, fwd):
        j_ref, c_ref = ref[r.layer]
        assert _rel(f.jacobian, r.jacobian) <= 1e-12, r.layer
        assert _rel(f.jacobian, j_ref) <= 1e-12 and _rel(r.jacobian, j_ref) <= 1e-12
        assert torch.equal(f.output, r.output)
        assert f.reconstruction_rel_error() <= 1e-12
        if arch == "qwen2":
            assert f.constant is not None and _rel(f.constant, c_ref) <= 1e-12
            assert float(torch.linalg.vector_norm(f.constant)) > 0
        else:
            assert f.constant is None


def test_deeper_model_gate_path_and_chosen_layers(tmp_path) -> None:
    """Six layers, a short prompt (auto picks the forward pass: L > N), a subset of layers
    with a gap, the gate path 'gate', and the affine family."""
    path = write_synthetic_gguf(tmp_path / "deep.gguf", "qwen2", Shape(n_layer=6), "Q8_0")
    m = open_model(path, dtype="float64")
    tokens = m.tokenize("the bridge")[:2]
    lin = Linearization(gate_path="gate")
    layers = [1, 2, 4]
    rev, fwd = _both(m, tokens, layers, lin)
    ref = _reference_lens(m, tokens, layers, lin)
    for r, f in zip(rev, fwd):
        assert _rel(f.jacobian, r.jacobian) <= 1e-12
        assert _rel(f.jacobian, ref[f.layer][0]) <= 1e-12
        assert _rel(f.constant, ref[f.layer][1]) <= 1e-12
    engine = m.engine(lin)
    dims, n = dims_of(m.cfg), len(tokens)
    every = list(range(6))
    assert n <= 2 and lens_forward_flop(dims, n, every) < lens_reverse_flop(dims, n, every)
    assert choose_sweep(engine, n, every) == "forward"
    assert choose_sweep(engine, n, every, "reverse") == "reverse"
    assert choose_sweep(engine, 16, every) == "reverse"  # L well below N
    with pytest.raises(GgufjacError, match="choose from auto, reverse, forward"):
        choose_sweep(engine, n, every, "sideways")
    sweeps: list[str] = []
    maps, _ = layer_maps(engine, engine.embed(tokens), every, chosen_sweep=sweeps)
    assert sweeps == ["forward"]
    last = next(mp for mp in maps if mp.kind == "cumulative" and mp.layer == 5)
    assert _rel(last.jacobian, m.jacobian(tokens, lin, streaming=False).jacobian) <= 1e-12


def test_forward_lens_in_several_passes_under_a_memory_budget(synthetic) -> None:
    """A budget too small for all N·d directions at once: groups of positions, the same maps."""
    from ggufjac.engine import resident_bytes
    from ggufjac.layers import forward_plan

    m = open_model(synthetic("llama", "Q8_0"), dtype="float64")
    tokens = m.tokenize(PROMPT)
    layers = [0, 1]
    engine = m.engine()
    x = engine.embed(tokens)
    record = engine.forward(x)
    rev, _ = cumulative_maps(engine, record, x, layers, sweep="reverse")
    n, d = len(tokens), m.cfg.d_model
    probes_bytes, maps_bytes = n * d * n * d * 8, len(layers) * d * n * d * 8
    assert probes_bytes > 200 << 20  # so that half of them and a margin fit, all do not
    tight = m.engine(max_memory=resident_bytes() + maps_bytes + probes_bytes // 2 + (64 << 20))
    passes, _ = forward_plan(tight, record, layers)
    assert passes > 1
    fwd, which = cumulative_maps(tight, record, x, layers, sweep="forward")
    assert which == "forward"
    for r, f in zip(rev, fwd):
        assert _rel(f.jacobian, r.jacobian) <= 1e-12


def test_real_model_forward_and_reverse_lens_agree(gemma64, bridge_tokens) -> None:
    layers = [0, 9, 17]
    rev, fwd = _both(gemma64, bridge_tokens, layers)
    for r, f in zip(rev, fwd):
        assert _rel(f.jacobian, r.jacobian) <= 1e-12, r.layer
    full = gemma64.jacobian(bridge_tokens)
    assert _rel(fwd[0].jacobian, full.jacobian) <= 1e-12  # layer 17's lens is J


def test_layers_cli_reports_and_forces_the_sweep(synthetic, tmp_path) -> None:
    path = synthetic("qwen3", "Q8_0")
    reports = {}
    for sweep in ("forward", "reverse"):
        out = tmp_path / sweep
        r = subprocess.run([sys.executable, "-m", "ggufjac.cli", "layers", str(path), "-p",
                            PROMPT, "--out", str(out), "--dtype", "float64", "--sweep", sweep],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        reports[sweep] = json.loads((out / "layers.json").read_text())
        assert reports[sweep]["sweep"] == sweep
    for a, b in zip(reports["forward"]["maps"], reports["reverse"]["maps"]):
        assert (a["layer"], a["kind"]) == (b["layer"], b["kind"])
        assert a["singular_values"] == pytest.approx(b["singular_values"], rel=1e-10, abs=1e-14)
    r = subprocess.run([sys.executable, "-m", "ggufjac.cli", "layers", str(path), "-p", PROMPT,
                        "--out", str(tmp_path / "x"), "--sweep", "sideways"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "sideways" in r.stderr and "Traceback" not in r.stderr


def test_anchored_forward_lens_equals_the_reverse_one(synthetic) -> None:
    """Anchored to llama.cpp (frozen rounding ratios on the linear path: the forward pass then
    runs every row of every direction), both sweeps give the same maps, each reconstructing
    its output."""
    m = open_model(synthetic("olmo2", "Q8_0"), dtype="float64")
    tokens = m.tokenize(PROMPT)
    engine = m.engine(anchor=m.anchor(tokens))
    x = engine.embed(tokens)
    record = engine.forward(x)
    assert any(site.startswith("in:") for site in record.coefficients[0])
    rev, _ = cumulative_maps(engine, record, x, [0, 1], sweep="reverse")
    fwd, _ = cumulative_maps(engine, record, x, [0, 1], sweep="forward")
    for r, f in zip(rev, fwd):
        assert _rel(f.jacobian, r.jacobian) <= 1e-12
        assert f.reconstruction_rel_error() <= 1e-12


@pytest.mark.parametrize("streaming", [True, False])
def test_forward_lens_with_streamed_or_whole_layers(synthetic, streaming: bool) -> None:
    """Matrices read in small row blocks at each use, or held whole: the same maps as the
    reverse sweep's, whether the MLP is crossed by its matrices (all directions) or through
    its projections (one position's directions)."""
    m = open_model(synthetic("gemma3", "Q4_K_M"), dtype="float64")
    tokens = m.tokenize(PROMPT)
    x0 = m.engine().embed(tokens)
    record = m.engine().forward(x0)
    rev, _ = cumulative_maps(m.engine(), record, x0, [0, 1], sweep="reverse")
    engine = m.engine(streaming=streaming, block_elements=4096)
    fwd, _ = cumulative_maps(engine, record, x0, [0, 1], sweep="forward")
    for r, f in zip(rev, fwd):
        assert _rel(f.jacobian, r.jacobian) <= 1e-12
    # one position's d directions, below the MLP matrices' break-even
    d = m.cfg.d_model
    assert not engine.mlp_as_matrix(d // 4)
    probes = torch.zeros((d // 4, len(tokens), d), dtype=torch.float64)
    probes[:, -2, :d // 4] = torch.eye(d // 4, dtype=torch.float64)
    seen = {}
    engine.push_forward_residuals(record, probes.clone(), 1, lambda l, x: seen.update(
        {l: x[:, -1].clone()}), zero_before=[(0, d // 4, len(tokens) - 2)])
    ref = rev[0]  # layer 1's lens: its columns at position N-2 are these probes' images
    norm = torch.linalg.vector_norm
    cols = ref.jacobian[:, -2, :d // 4].T  # through the frozen final norm
    store: Coefficients = {}
    final_norm(m.cfg, engine.output_norm, record.residuals[2], engine.lin.recording(store))
    got = final_norm(m.cfg, engine.output_norm, seen[1][:, None],
                     engine.lin.replaying(at_last_position(store)))[:, 0]
    assert float(norm(got - cols) / norm(cols)) <= 1e-12
