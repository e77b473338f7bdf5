"""Per-layer, attention and MLP maps: exact, consistent with each other and with `jacobian`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from ggufjac.analysis import nearest_input_embeddings, top_tokens_by_unembedding
from ggufjac.api import open_model
from ggufjac.gguf_file import GGUFFile
from ggufjac.layers import KINDS, layer_maps
from ggufjac.linearize import Linearization
from tools.synthetic import Shape, write_synthetic_gguf

PROMPT = "the bridge out of Marin"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def _check_maps(maps, d: int) -> None:
    by = {(m.layer, m.kind): m for m in maps}
    for m in maps:
        assert m.reconstruction_rel_error() <= 1e-12, (m.layer, m.kind)
    for layer in {m.layer for m in maps}:
        # attention + MLP + the residual's identity (last position) = the layer's map
        parts = by[layer, "attention"].jacobian + by[layer, "mlp"].jacobian
        parts[:, -1, :] += torch.eye(d, dtype=parts.dtype)
        assert _rel(parts, by[layer, "layer"].jacobian) <= 1e-12
        residual = by[layer, "layer"].jacobian - by[layer, "layer_no_residual"].jacobian
        assert torch.allclose(residual[:, -1, :], torch.eye(d, dtype=parts.dtype), atol=1e-12)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3", "phi3", "olmo2"])
def test_every_family_layer_maps_are_exact(synthetic, arch: str) -> None:
    m = open_model(synthetic(arch, "Q8_0"), dtype="float64")
    tokens = m.tokenize(PROMPT)
    engine = m.engine()
    maps, y = layer_maps(engine, engine.embed(tokens), list(range(m.cfg.n_layer)))
    assert {(mp.layer, mp.kind) for mp in maps} == {(l, k) for l in range(m.cfg.n_layer)
                                                      for k in KINDS}
    _check_maps(maps, m.cfg.d_model)
    # the cumulative map at the last layer is the full Jacobian (in-memory reference path)
    full = m.jacobian(tokens, streaming=False)
    last = next(mp for mp in maps if mp.layer == m.cfg.n_layer - 1 and mp.kind == "cumulative")
    assert _rel(last.jacobian, full.jacobian) <= 1e-12
    assert torch.equal(y, full.output)


def test_real_model_layer_maps_are_exact(gemma64, bridge_tokens) -> None:
    engine = gemma64.engine()
    maps, _ = layer_maps(engine, engine.embed(bridge_tokens), [0, 9, 17])
    _check_maps(maps, gemma64.cfg.d_model)
    full = gemma64.jacobian(bridge_tokens)
    last = next(mp for mp in maps if mp.layer == 17 and mp.kind == "cumulative")
    assert _rel(last.jacobian, full.jacobian) <= 1e-12


def test_gate_paths_both_exact_and_different(synthetic) -> None:
    m = open_model(synthetic("llama", "F16"), dtype="float64")
    tokens = m.tokenize(PROMPT)
    results = {}
    for gate_path in ("up", "gate"):
        engine = m.engine(Linearization(gate_path=gate_path))
        maps, _ = layer_maps(engine, engine.embed(tokens), [0, 1])
        _check_maps(maps, m.cfg.d_model)
        results[gate_path] = {(mp.layer, mp.kind): mp.jacobian for mp in maps}
    for key in [(0, "mlp"), (1, "mlp"), (1, "cumulative")]:
        assert _rel(results["up"][key], results["gate"][key]) > 1e-3, key
    # attention alone of layer 0 does not involve the MLP: identical either way
    assert _rel(results["up"][0, "attention"], results["gate"][0, "attention"]) <= 1e-14


def test_decoders_find_known_tokens(tmp_path) -> None:
    """Unembedding row t as a direction decodes to t; embedding row s is its own nearest
    input embedding (cosine 1); a row of zero norm is never returned by the cosine search."""
    path = write_synthetic_gguf(tmp_path / "dec.gguf", "llama", Shape(n_layer=1), "F32")
    g = GGUFFile(path)
    info = g.tensor("token_embd.weight")
    d, zero_row = info.shape[0], 280
    data = bytearray(path.read_bytes())
    data[info.offset + zero_row * d * 4: info.offset + (zero_row + 1) * d * 4] = bytes(4 * d)
    g.close()
    path.write_bytes(bytes(data))
    m = open_model(path, dtype="float64")
    t, s = 290, 270
    u = m.weights.unembedding_rows([t])[0]
    assert top_tokens_by_unembedding(m.weights, u[:, None], 3)[0][0][0] == t
    e = m.weights.embedding_rows([s])[0]
    best = nearest_input_embeddings(m.weights, e[:, None], 3)[0]
    assert best[0][0] == s and abs(best[0][1] - 1.0) < 1e-12
    everything = nearest_input_embeddings(m.weights, (-e)[:, None], m.cfg.vocab_size)[0]
    finite = [tok for tok, c in everything if c != float("-inf")]
    assert zero_row not in finite and len(finite) == m.cfg.vocab_size - 1


def test_layers_cli_writes_everything(synthetic, tmp_path) -> None:
    path = synthetic("qwen3", "Q4_K_M")
    out = tmp_path / "layers"
    r = subprocess.run([sys.executable, "-m", "ggufjac.cli", "layers", str(path), "-p", PROMPT,
                        "--out", str(out), "--dtype", "float64", "--save-matrices",
                        "--gate-path", "gate"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "layers.json", "layers.safetensors", "stable_rank.png",
        "top_singular_value.png"]
    report = json.loads((out / "layers.json").read_text())
    assert report["gate_path"] == "gate" and report["layers"] == [0, 1]
    assert len(report["maps"]) == 2 * len(KINDS)
    for e in report["maps"]:
        assert e["reconstruction_rel_error"] <= 1e-12
        v = e["vectors"][0]
        assert len(v["left_tokens"]) == 5 and len(v["right_tokens"]) == 5
        assert abs(e["stable_rank"] - sum(x * x for x in e["singular_values"])
                   / e["singular_values"][0] ** 2) < 1e-9
    tensors = load_file(str(out / "layers.safetensors"))
    j = tensors["layer1.cumulative.jacobian"]
    s = torch.linalg.svdvals(j.reshape(j.shape[0], -1))
    assert torch.allclose(s, tensors["layer1.cumulative.singular_values"], rtol=1e-10)
    summary = (out / "README.md").read_text()
    header = next(line for line in summary.splitlines() if line.startswith("| layer no. |"))
    assert header.count("layer") == 3  # 'layer no.', `layer`, `layer_no_residual`


def test_layers_option_is_checked(synthetic, tmp_path) -> None:
    r = subprocess.run([sys.executable, "-m", "ggufjac.cli", "layers", str(synthetic("qwen3", "Q4_K_M")),
                        "-p", PROMPT, "--out", str(tmp_path / "o"), "--layers", "0,7"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "layer 7 does not exist (the model has layers 0..1)" in r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("shape", [(64, 640), (64, 96), (80, 40)])
def test_spectrum_is_the_svd(shape) -> None:
    """Wide maps go through a QR first: the same singular values as LAPACK's SVD of the
    matrix itself, orthonormal vectors, and U S Vᵀ equal to the matrix (float64)."""
    from ggufjac.analysis import spectrum

    torch.manual_seed(0)
    a = torch.randn(*shape, dtype=torch.float64) @ torch.diag(torch.logspace(0, -6, shape[1],
                                                                          dtype=torch.float64))
    y = torch.randn(shape[0], dtype=torch.float64)
    sp = spectrum(a, y)
    ref = torch.linalg.svdvals(a)
    assert torch.allclose(sp.singular_values, ref, rtol=0, atol=1e-13 * float(ref[0]))
    k = len(ref)
    assert torch.allclose(sp.left.T @ sp.left, torch.eye(k, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(sp.right @ sp.right.T, torch.eye(k, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(sp.left @ torch.diag(sp.singular_values) @ sp.right, a,
                          atol=1e-12 * float(ref[0]))
    assert bool(((y @ sp.left) >= 0).all())  # each left vector signed along y
