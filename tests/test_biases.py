"""Biases: the qwen2 family (q/k/v biases) and the affine detached network y = Σ_i J_i x_i + c.

Checked against llama.cpp (its logits, plain and anchored), and c against an independent
float64 forward of the detached model written here in numpy from gguf-py's tensors: the
coefficients frozen on the prompt, then a zero input run through with the biases on.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf.constants import GGUFValueType

import numpy_reference
from numpy_reference import gguf_py_tensors, neox_rope

from ggufjac import llamacpp, model
from ggufjac.api import nmse, open_model
from ggufjac.errors import GGUFError, UnsupportedModelError
from ggufjac.layers import layer_maps
from ggufjac.linearize import Linearization
from ggufjac.llamacpp import DEFAULT_SETTINGS
from tools.synthetic import (Shape, _vocab, _write_f32_or_typed, model_tensors,
                             write_synthetic_gguf)

PROMPT = "the quick brown fox"
SMALL = Shape(n_layer=2, d_model=64, d_ff=128, n_head=4, n_kv_head=2, head_dim=16)
VOCAB = len(_vocab()[0])


@pytest.fixture(scope="module")
def qwen2_small(tmp_path_factory) -> dict:
    """Small qwen2 files (F32 and llama.cpp's Q8_0), made once."""
    d = tmp_path_factory.mktemp("qwen2")
    return {q: write_synthetic_gguf(d / f"qwen2-{q}.gguf", "qwen2", SMALL, q)
            for q in ("F32", "Q8_0")}




def _reference(path, tokens: list[int], gate_path: str) -> tuple[np.ndarray, np.ndarray]:
    """(y, c) at the last position: the detached qwen2 network in float64, its coefficients
    (norm scales, attention probabilities, gate) computed on the prompt, and the same frozen
    network applied to a zero input with its biases on."""
    w = gguf_py_tensors(path)
    s, eps, base = SMALL, 1e-6, 10000.0
    n, hd = len(tokens), s.head_dim
    rope = neox_rope(n, hd, base)

    def inv_rms(v):
        return numpy_reference.inv_rms(v, eps)

    x = w["token_embd.weight"][tokens]
    z = np.zeros_like(x)
    rep = s.n_head // s.n_kv_head
    for i in range(s.n_layer):
        p = lambda name: w[f"blk.{i}.{name}"]  # noqa: E731
        r = inv_rms(x)
        h, hz = x * r * p("attn_norm.weight"), z * r * p("attn_norm.weight")
        q = (h @ p("attn_q.weight").T + p("attn_q.bias")).reshape(n, s.n_head, hd)
        k = (h @ p("attn_k.weight").T + p("attn_k.bias")).reshape(n, s.n_kv_head, hd)
        k = np.repeat(rope(k), rep, axis=1)
        scores = np.einsum("qhd,khd->hqk", rope(q), k) / np.sqrt(hd)
        scores = np.where(np.tril(np.ones((n, n), bool))[None], scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)

        def attend(hh):
            v = (hh @ p("attn_v.weight").T + p("attn_v.bias")).reshape(n, s.n_kv_head, hd)
            o = np.einsum("hqk,khd->qhd", probs, np.repeat(v, rep, axis=1)).reshape(n, -1)
            return o @ p("attn_output.weight").T
        x, z = x + attend(h), z + attend(hz)
        r = inv_rms(x)
        h, hz = x * r * p("ffn_norm.weight"), z * r * p("ffn_norm.weight")
        g, u = h @ p("ffn_gate.weight").T, h @ p("ffn_up.weight").T
        sig = 1.0 / (1.0 + np.exp(-g))
        if gate_path == "up":  # act(g) frozen, up linear
            m, mz = (g * sig * u), (g * sig) * (hz @ p("ffn_up.weight").T)
        else:  # s(g) and u frozen, g linear
            m, mz = (g * sig * u), (hz @ p("ffn_gate.weight").T) * sig * u
        x, z = x + m @ p("ffn_down.weight").T, z + mz @ p("ffn_down.weight").T
    r = inv_rms(x[-1])
    return x[-1] * r * w["output_norm.weight"], z[-1] * r * w["output_norm.weight"]


@pytest.mark.parametrize("gate_path", ["up", "gate"])
def test_affine_map_reconstructs_exactly_and_its_constant_is_the_zero_input_output(
        qwen2_small, gate_path: str) -> None:
    m = open_model(qwen2_small["F32"], dtype="float64")
    tokens = m.tokenize(PROMPT)
    lin = Linearization(gate_path=gate_path)
    y_ref, c_ref = _reference(qwen2_small["F32"], tokens, gate_path)
    for streaming in (True, False):
        r = m.jacobian(tokens, lin, streaming=streaming)
        c = r.constant.numpy()
        assert np.linalg.norm(c - c_ref) <= 1e-12 * np.linalg.norm(c_ref)
        assert np.linalg.norm(r.output.numpy() - y_ref) <= 1e-12 * np.linalg.norm(y_ref)
        assert r.reconstruction_rel_error() <= 1e-12
        recon = torch.einsum("onk,nk->o", r.jacobian, r.inputs).numpy() + c_ref
        assert np.linalg.norm(recon - y_ref) <= 1e-12 * np.linalg.norm(y_ref)
        # c is not small here: without it y is far from reconstructed
        assert np.linalg.norm(c_ref) > 0.1 * np.linalg.norm(y_ref)
    m32 = open_model(qwen2_small["F32"], dtype="float32")
    assert m32.jacobian(tokens, lin).reconstruction_rel_error() <= 1e-5


def test_attribution_has_a_bias_row_and_sums_to_the_logit(qwen2_small) -> None:
    path = qwen2_small["F32"]
    m = open_model(path, dtype="float64")
    tokens = m.tokenize(PROMPT)
    report = m.attribute(tokens)
    y_ref, c_ref = _reference(path, tokens, "up")
    table = gguf_py_tensors(path)["token_embd.weight"]  # tied: the unembedding
    row = report["targets"][0]
    u = table[row["id"]]
    assert row["logit"] == pytest.approx(u @ y_ref, rel=1e-12)
    assert row["bias"] == pytest.approx(u @ c_ref, rel=1e-10)
    assert sum(row["contributions"]) + row["bias"] == pytest.approx(row["logit"], rel=1e-12)
    assert row["sum_of_contributions"] == pytest.approx(row["logit"], rel=1e-12)
    assert "constant" in report and "bias" in report["constant"]["handling"]


def test_svd_and_layer_maps_are_the_linear_parts(qwen2_small) -> None:
    m = open_model(qwen2_small["F32"], dtype="float64")
    tokens = m.tokenize(PROMPT)
    r = m.jacobian(tokens)
    d = m.cfg.d_model
    dense = torch.linalg.svdvals(r.jacobian.reshape(d, -1))
    top = m.svd(tokens, 4)  # matrix free: push_forward must leave the biases out
    assert torch.allclose(top.singular_values, dense[:4], rtol=1e-8)
    assert torch.equal(top.constant, r.constant)
    engine = m.engine()
    maps, _ = layer_maps(engine, engine.embed(tokens), [0, 1])
    for mp in maps:
        assert mp.constant is not None
        assert mp.reconstruction_rel_error() <= 1e-12, (mp.layer, mp.kind)
    top_lens = next(mp for mp in maps if mp.kind == "cumulative" and mp.layer == 1)
    assert torch.allclose(top_lens.constant, r.constant, rtol=1e-12, atol=0)


@pytest.mark.parametrize("quant", ["F32", "Q8_0"])
def test_qwen2_matches_llama_cpp_and_its_biases_matter(qwen2_small, monkeypatch,
                                                       quant: str) -> None:
    path = qwen2_small[quant]
    m = open_model(path, dtype="float64")
    tokens = m.tokenize(PROMPT)
    theirs = llamacpp.evaluate(path, tokens).logits[-1]
    floor = nmse(llamacpp.evaluate(path, tokens, DEFAULT_SETTINGS.flipped(
        flash_attn="off")).logits[-1], theirs)
    ours = m.logits(tokens).numpy()[-1]
    # within llama.cpp's noise floor (its own flash on/off difference), with a margin
    assert nmse(ours, theirs) <= max(10 * floor, 1e-6 if quant == "F32" else 1e-3)
    assert ours.argmax() == theirs.argmax()
    monkeypatch.setattr(model, "add_bias", lambda y, bias, lin: y)
    without = open_model(path, dtype="float64").logits(tokens).numpy()[-1]
    assert nmse(without, theirs) > 100 * max(nmse(ours, theirs), 1e-12)


@pytest.mark.parametrize("flash", ["on", "off"])
def test_anchored_qwen2_reproduces_llama_cpp(qwen2_small, flash: str) -> None:
    m = open_model(qwen2_small["Q8_0"], dtype="float64")
    tokens = m.tokenize(PROMPT)
    anchor = m.anchor(tokens, Linearization(), DEFAULT_SETTINGS.flipped(flash_attn=flash))
    assert anchor.flash_attn == (flash == "on")
    r = m.jacobian(tokens, anchor=anchor)
    summary = m.anchor_summary(anchor, r.output, r)
    assert summary["anchor_logits_nmse"] <= 1e-10
    assert summary["independent_run"]["logits_nmse"] <= 1e-10
    assert summary["anchor_output_rel_error"] <= 1e-6
    assert r.reconstruction_rel_error() <= 1e-12
    assert summary["reconstruction_rel_error_vs_llama_cpp"] <= 1e-6


def test_families_without_biases_write_no_constant(synthetic, tmp_path, qwen2_small) -> None:
    from click.testing import CliRunner
    from safetensors import safe_open

    from ggufjac.cli import main

    for path, affine in ((synthetic("llama", "Q8_0"), False), (qwen2_small["Q8_0"], True)):
        out = tmp_path / ("qwen2" if affine else "llama")
        res = CliRunner().invoke(main, ["jacobian", str(path), "-p", PROMPT, "--out", str(out),
                                        "--dtype", "float64"])
        assert res.exit_code == 0, res.output
        assert ("constant term c" in res.output) == affine
        with safe_open(str(out / "jacobian.safetensors"), "pt") as f:
            assert ("constant" in f.keys()) == affine
    m = open_model(synthetic("llama", "Q8_0"), dtype="float64")
    report = m.attribute(m.tokenize(PROMPT))
    assert "bias" not in report["targets"][0] and "constant" not in report


def _write_qwen2(path, change) -> None:
    tensors = model_tensors("qwen2", SMALL, VOCAB, seed=0)
    change(tensors)
    _write_f32_or_typed(path, "qwen2", SMALL, tensors, None)


@pytest.mark.parametrize("change, error, named", [
    (lambda t: t.update({"blk.0.attn_v.bias": np.ones(7, np.float32)}), GGUFError,
     "blk.0.attn_v.bias"),
    (lambda t: t.update({"blk.1.attn_k.bias": t["blk.1.attn_k.bias"].astype(np.float16)}),
     UnsupportedModelError, "blk.1.attn_k.bias"),
    (lambda t: t.update({"blk.0.attn_output.bias": np.ones(64, np.float32)}),
     UnsupportedModelError, "blk.0.attn_output.bias"),
    (lambda t: t.update({"output.bias": np.ones(VOCAB, np.float32)}), UnsupportedModelError,
     "output.bias"),
])
def test_bad_bias_tensors_are_refused_naming_them(tmp_path, change, error, named: str) -> None:
    path = tmp_path / "bad.gguf"
    _write_qwen2(path, change)
    with pytest.raises(error) as e:
        open_model(path)
    assert named in str(e.value)


def test_qwen2_without_its_optional_biases_is_linear(tmp_path) -> None:
    """llama.cpp reads qwen2's biases as optional: a file without them is read as zeros."""
    path = tmp_path / "nobias.gguf"
    _write_qwen2(path, lambda t: [t.pop(k) for k in [k for k in t if k.endswith(".bias")]])
    m = open_model(path, dtype="float64")
    r = m.jacobian(m.tokenize(PROMPT))
    assert r.reconstruction_rel_error() <= 1e-12
    assert float(r.constant.abs().max()) == 0.0


@pytest.mark.parametrize("key, value", [
    ("attention.head_count_kv", (3, GGUFValueType.UINT32)),
    ("rope.freq_base", (1.0, GGUFValueType.FLOAT32)),
    ("attention.layer_norm_rms_epsilon", (float("nan"), GGUFValueType.FLOAT32)),
])
def test_hostile_qwen2_metadata_is_refused_naming_the_key(tmp_path, key: str, value) -> None:
    path = write_synthetic_gguf(tmp_path / "hostile.gguf", "qwen2", SMALL,
                                metadata={key: value})
    with pytest.raises(GGUFError) as e:
        open_model(path)
    assert f"qwen2.{key}" in str(e.value)
