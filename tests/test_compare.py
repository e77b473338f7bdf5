"""`compare`: two GGUF files of one model, by their detached Jacobians.

References: the figures' formulas written out here (Spearman's 1 − 6Σd²/(n(n²−1)), planes
rotated by known angles), the in-memory autograd Jacobian (detached_jacobian) and the
attribution's own reverse sweep (LoadedModel.attribute) for what `compare` computes from its
streamed J, and llama.cpp's quantizer for the files compared."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ggufjac import llamacpp
from ggufjac.api import open_model
from ggufjac.cli import main
from ggufjac.compare import (ANALYSES, analyse, check_comparable, compare_prompts,
                             principal_angles, spearman, top_overlap)
from ggufjac.errors import GgufjacError
from ggufjac.linearize import Linearization

PROMPT = "the quick brown fox jumps over the lazy"


# -- the figures, against their formulas -----------------------------------------------------

def test_principal_angles_of_planes_rotated_by_known_angles() -> None:
    """span(e_0..e_3) against the same basis with e_j rotated by θ_j towards e_{4+j}: the
    principal angles are the θ_j, from 1e-12 up to π/2, each to rounding."""
    n, k = 12, 4
    theta = torch.tensor([1e-12, 1e-6, 0.3, math.pi / 2], dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=generator)).Q
    mixing = torch.randn(k, k, dtype=torch.float64, generator=generator)
    a = q[:, :k] @ mixing  # a basis, not orthonormal
    b = q[:, :k] * torch.cos(theta) + q[:, k:2 * k] * torch.sin(theta)
    got = principal_angles(a, b)
    # Rounding: a few ulps of 1 times the mixing's condition number (the basis is
    # orthonormalised first); an arccos of the cosines alone would miss 1e-12 by ~1e-8.
    rounding = 64 * torch.finfo(torch.float64).eps * float(torch.linalg.cond(mixing))
    assert torch.allclose(got, theta, rtol=1e-6, atol=rounding), got
    assert float(principal_angles(a, a).abs().max()) < rounding


def test_spearman_and_top_overlap_formulas() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal(15), rng.standard_normal(15)
    ra = np.argsort(np.argsort(a)) + 1
    rb = np.argsort(np.argsort(b)) + 1
    n = len(a)
    expected = 1 - 6 * ((ra - rb) ** 2).sum() / (n * (n * n - 1))
    assert spearman(a, b) == pytest.approx(expected, abs=1e-12)
    assert spearman(a, 3 * a + 1) == pytest.approx(1.0, abs=1e-15)
    assert spearman(a, -a) == pytest.approx(-1.0, abs=1e-15)
    # ties: average ranks ([1, 2.5, 2.5, 4] against [1, 2, 3, 4]): Pearson of the ranks
    tied = spearman(np.array([1.0, 2.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0, 4.0]))
    r1, r2 = np.array([1, 2.5, 2.5, 4]), np.array([1.0, 2, 3, 4])
    assert tied == pytest.approx(np.corrcoef(r1, r2)[0, 1], abs=1e-12)
    assert spearman(np.array([2.0]), np.array([5.0])) is None
    # top 3 by |value|: positions {0, 1, 4} against {0, 4, 3}: 2 shared of 3
    assert top_overlap(np.array([9.0, -8, 1, 2, 7]), np.array([9.0, 0, 1, 5, -7])) == \
        pytest.approx(2 / 3)
    assert top_overlap(np.array([1.0, 2]), np.array([2.0, 1])) == 1.0  # k = N below 3


# -- a file with itself ----------------------------------------------------------------------

def test_a_file_compared_with_itself_is_zero_everywhere(synthetic) -> None:
    path = synthetic("llama", "Q4_K_M")
    with open_model(path, dtype="float64") as a, open_model(path, dtype="float64") as b:
        entry = compare_prompts(a, b, [PROMPT], ANALYSES, 4, None, Linearization(),
                                llamacpp.RunSettings())[0]
    assert entry["logits_nmse"] == 0.0
    assert entry["llama_cpp_logits_nmse"] == 0.0  # llama.cpp is deterministic on one file
    assert entry["jacobian_rel_difference"] == 0.0
    assert entry["delta_stable_rank"] == 0.0
    assert entry["singular_values_a"] == entry["singular_values_b"]
    # angles from bit-identical bases: zero to the rounding of their orthonormalization
    assert max(entry["left_angles"] + entry["right_angles"]) < 1e-14
    assert entry["top_left_cosine"] == pytest.approx(1.0, abs=1e-14)
    assert entry["top_right_cosine"] == pytest.approx(1.0, abs=1e-14)
    assert entry["attribution_spearman"] == pytest.approx(1.0, abs=1e-15)
    assert entry["attribution_top3_overlap"] == 1.0
    assert entry["contributions_a"] == entry["contributions_b"]
    assert len(entry["lens"]) == 2
    for row in entry["lens"]:
        assert row["lens_rel_difference"] == 0.0 and row["lens_tokens_agree"]
        assert row["lens_largest_left_angle"] < 1e-14
    assert entry["first_layer_lens_tokens_differ"] is None
    assert entry["same_prediction"]


# -- the figures against independent computations --------------------------------------------

def test_figures_equal_independent_recomputation(synthetic) -> None:
    """J's difference from the in-memory autograd Jacobians, the attributions from
    LoadedModel.attribute's own sweep, the lens of the last layer from J itself."""
    from ggufjac.jacobian import detached_jacobian

    pa, pb = synthetic("qwen3", "F32"), synthetic("qwen3", "Q4_K_M")
    with open_model(pa, dtype="float64") as a, open_model(pb, dtype="float64") as b:
        tokens = a.tokenize(PROMPT)
        lin = Linearization()
        side_a = analyse(a, tokens, ANALYSES, None, lin, None)
        target = int(np.argmax(side_a.logits))
        side_b = analyse(b, tokens, ANALYSES, target, lin, None)
        ja = detached_jacobian(a.model, a.model.embed(tokens), lin).jacobian
        jb = detached_jacobian(b.model, b.model.embed(tokens), lin).jacobian
        entry = compare_prompts(a, b, [PROMPT], ANALYSES, 4, None, lin, None)[0]
        attr_b = b.attribute(tokens, [target], lin)["targets"][0]["contributions"]
        attr_a = a.attribute(tokens, [target], lin)["targets"][0]["contributions"]
    expected = float(torch.linalg.vector_norm(jb - ja) / torch.linalg.vector_norm(ja))
    assert entry["jacobian_rel_difference"] == pytest.approx(expected, rel=1e-9)
    assert 0 < expected < 1
    assert np.allclose(entry["contributions_a"], attr_a, rtol=1e-9, atol=1e-12)
    assert np.allclose(entry["contributions_b"], attr_b, rtol=1e-9, atol=1e-12)
    assert entry["attribution_target"]["id"] == target
    ra = np.argsort(np.argsort(attr_a)) + 1
    rb = np.argsort(np.argsort(attr_b)) + 1
    n = len(tokens)
    assert entry["attribution_spearman"] == pytest.approx(
        1 - 6 * ((ra - rb) ** 2).sum() / (n * (n * n - 1)), abs=1e-12)
    # the last layer's lens map is the model's J (final norm frozen at its value)
    last = entry["lens"][-1]
    assert last["lens_rel_difference"] == pytest.approx(expected, rel=1e-9)
    u_a = torch.linalg.svd(ja.reshape(ja.shape[0], -1))[0][:, :4]
    u_b = torch.linalg.svd(jb.reshape(jb.shape[0], -1))[0][:, :4]
    sine = torch.linalg.matrix_norm(u_b - u_a @ (u_a.T @ u_b), ord=2)
    assert entry["largest_left_angle"] == pytest.approx(float(torch.arcsin(sine)), rel=1e-6)


# -- quantizations of one F32 file, ordered --------------------------------------------------

# Two families keep the suite short: the ordering is a property of the quantizer, and these
# cover the sandwich-norm GELU block and the affine (biased) one.
@pytest.mark.parametrize("arch", ["gemma3", "qwen2"])
def test_quantizations_are_ordered_by_their_bits(arch, synthetic) -> None:
    """F32 against F16, Q8_0, Q4_K_M and Q2_K of the same weights (llama.cpp's quantizer):
    J's difference grows with each type's weight error. Margin: each step at least 2x.
    Why 2x: a J difference small against J is linear in the weight error to first order,
    and the types' relative weight errors step by far more than 2x (F16's 11-bit mantissa
    ~3e-4, Q8_0's 8 bits in blocks of 32 ~4e-3, Q4_K's 4 bits ~7e-2, Q2_K's 2 bits ~0.3 on
    Gaussian weights); 2x leaves room for the steps' different mixes of tensor types."""
    base = synthetic(arch, "F32")
    diffs = {}
    with open_model(base, dtype="float64") as a:
        for quant in ("F16", "Q8_0", "Q4_K_M", "Q2_K"):
            with open_model(synthetic(arch, quant), dtype="float64") as b:
                entry = compare_prompts(a, b, [PROMPT], ("jacobian",), 4, None,
                                        Linearization(), None)[0]
            diffs[quant] = entry["jacobian_rel_difference"]
    assert 0 < diffs["F16"] < 1e-3, diffs
    assert diffs["Q8_0"] > 2 * diffs["F16"], diffs
    assert diffs["Q4_K_M"] > 2 * diffs["Q8_0"], diffs
    assert diffs["Q2_K"] > 2 * diffs["Q4_K_M"], diffs


# -- files that are not two versions of one model --------------------------------------------

def test_mismatched_files_are_refused_naming_the_difference(synthetic, tmp_path) -> None:
    from tools.synthetic import Shape, write_synthetic_gguf

    llama, qwen = synthetic("llama", "F32"), synthetic("qwen3", "F32")
    wide = write_synthetic_gguf(tmp_path / "wide.gguf", "llama", Shape(d_ff=768))
    with open_model(llama) as a, open_model(qwen) as b:
        with pytest.raises(GgufjacError, match="arch is 'llama' in the first and 'qwen3'"):
            check_comparable(a, b)
    with open_model(llama) as a, open_model(wide) as b:
        with pytest.raises(GgufjacError, match="d_ff is 512 in the first and 768"):
            check_comparable(a, b)
    with open_model(llama) as a, open_model(llama) as b:
        pieces = list(b.vocab.pieces)
        pieces[300] = "other"
        b.vocab._pieces = pieces
        with pytest.raises(GgufjacError, match="token 300 is .* in the first and 'other'"):
            check_comparable(a, b)
    r = CliRunner().invoke(main, ["compare", str(llama), str(qwen), "-p", PROMPT])
    assert r.exit_code == 2 and "not two files of one model" in r.output
    assert "Traceback" not in r.output


# -- the command -----------------------------------------------------------------------------

def test_cli_prompt_set_files_and_errors(synthetic, tmp_path) -> None:
    a, b = str(synthetic("gemma3", "F32")), str(synthetic("gemma3", "Q4_K_M"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\n\nthe capital of France is\n")
    out = tmp_path / "cmp"
    r = CliRunner().invoke(main, ["compare", a, b, "--prompts", str(prompts), "--out",
                                  str(out), "--top-k", "3"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "comparison.json",
                                                     "distributions.png", "lens.png"]
    report = json.loads((out / "comparison.json").read_text())
    assert [e["prompt"] for e in report["prompts"]] == [PROMPT, "the capital of France is"]
    assert report["summary"]["prompts"] == 2
    assert report["summary"]["jacobian_rel_difference"]["n"] == 2
    assert len(report["summary"]["lens"]) == 2
    assert report["a"]["tensor_types"] == {"F32": len(open_model(a).gguf.tensors)}
    assert "Q4_K" in report["b"]["tensor_types"]
    for e in report["prompts"]:
        assert len(e["left_angles"]) == 3
        # each file's llama.cpp run next to ours: far below the quantization's difference
        assert e["a_vs_own_llama_cpp_nmse"] < 1e-3 and e["b_vs_own_llama_cpp_nmse"] < 1e-3
        assert e["attribution_target"]["token"] == e["top5_a"][0]["token"]
    assert "jacobian_rel_difference" in (out / "README.md").read_text()

    long = tmp_path / "long.txt"
    long.write_text("short one\n" + "fox " * 40 + "\n")
    r = CliRunner().invoke(main, ["compare", a, b, "--prompts", str(long), "--max-tokens",
                                  "20", "--out", str(tmp_path / "none")])
    assert r.exit_code == 2 and "prompt 2 ('fox fox" in r.output and "20" in r.output
    assert not (tmp_path / "none").exists()  # a failed run leaves nothing behind
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": \n')
    cases = [(["--prompts", str(bad)], "bad.jsonl, line 2: not JSON"),
             (["-p", PROMPT, "--analyses", "jacobian,svd"], "choose from jacobian"),
             ([], "give one of --prompt, --prompt-file, --prompts and --messages"),
             (["-p", PROMPT, "--prompts", str(prompts)], "give one of"),
             (["-p", PROMPT, "--token", "not-a-token-here"], "not a single token"),
             (["-p", PROMPT, "--out", str(out)], "not empty"),
             (["-p", PROMPT, "--no-llama-cpp", "--flash-attn", "off"],
              "--flash-attn needs llama.cpp's runs")]
    for args, message in cases:
        r = CliRunner().invoke(main, ["compare", a, b, *args])
        assert r.exit_code == 2 and message in r.output, (args, r.output)
        assert "Traceback" not in r.output


def test_cli_sweep_reverse_and_forward_give_the_same_lens_and_are_recorded(synthetic,
                                                                          tmp_path) -> None:
    """--sweep reverse (each lens map pulled back from its layer) and --sweep forward (one
    pass of the N·d input directions): two different computations of the same maps, so
    their per-layer figures agree to float64 rounding; comparison.json names the sweep asked
    and the one each file's maps were made by; a value that is no sweep, or a sweep without
    the lens, is refused in one line."""
    a, b = str(synthetic("llama", "F32")), str(synthetic("llama", "Q8_0"))
    args = ["compare", a, b, "-p", PROMPT, "--dtype", "float64", "--analyses", "lens",
            "--no-llama-cpp", "--top-k", "2"]
    reports = {}
    for sweep in ("reverse", "forward"):
        out = tmp_path / sweep
        r = CliRunner().invoke(main, [*args, "--sweep", sweep, "--out", str(out)])
        assert r.exit_code == 0, r.output
        assert f"lens maps by one {sweep} sweep" in r.output
        reports[sweep] = json.loads((out / "comparison.json").read_text())
        assert reports[sweep]["settings"]["sweep"] == sweep
        entry = reports[sweep]["prompts"][0]
        assert entry["lens_sweep_a"] == entry["lens_sweep_b"] == sweep
    reverse, forward = (reports[s]["prompts"][0] for s in ("reverse", "forward"))
    assert len(reverse["lens"]) == len(forward["lens"]) == 2
    for rr, ff in zip(reverse["lens"], forward["lens"]):
        assert rr["layer"] == ff["layer"]
        assert rr["lens_rel_difference"] > 1e-6  # two files that differ: a figure to agree on
        assert ff["lens_rel_difference"] == pytest.approx(rr["lens_rel_difference"],
                                                          rel=1e-12, abs=0)
        assert ff["lens_top_left_cosine"] == pytest.approx(rr["lens_top_left_cosine"],
                                                           rel=1e-12, abs=0)
        assert (ff["top_token_a"], ff["top_token_b"]) == (rr["top_token_a"], rr["top_token_b"])

    r = CliRunner().invoke(main, [*args, "--sweep", "sideways"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    errors = [line for line in r.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "'sideways' is not one of" in errors[0], r.output
    r = CliRunner().invoke(main, ["compare", a, b, "-p", PROMPT, "--analyses", "jacobian",
                                  "--no-llama-cpp", "--sweep", "forward"])
    assert r.exit_code == 2 and "--sweep forward makes the lens maps" in r.output, r.output
    assert "Traceback" not in r.output


def test_real_model_against_its_requantizations(gemma_path, tmp_path) -> None:
    """The shipped Gemma 3 270M Q4_K_M file against llama.cpp's Q8_0 and Q2_K
    requantizations of it: both load with the same vocabulary; Q2_K's differences are far
    larger than Q8_0's (Q8_0 rounds the Q4_K values to 8 bits, Q2_K throws 2 bits away);
    each file's own llama.cpp run stays within `check`'s bound of ours."""
    from ggufjac.metrics import CHECK_NMSE_BOUND

    entries = {}
    for name, ftype in (("Q8_0", 7), ("Q2_K", 10)):
        requantized = tmp_path / f"gemma-{name}.gguf"
        llamacpp.quantize(gemma_path, requantized, ftype, allow_requantize=True)
        with open_model(gemma_path) as a, open_model(requantized) as b:
            entries[name] = compare_prompts(a, b, ["The capital of France is"],
                                            ("jacobian", "attribute"), 8, None,
                                            Linearization(), llamacpp.RunSettings())[0]
    q8, q2 = entries["Q8_0"], entries["Q2_K"]
    assert 0 < q8["jacobian_rel_difference"] and 2 * q8["jacobian_rel_difference"] < \
        q2["jacobian_rel_difference"]
    assert 0 < q8["logits_nmse"] and 2 * q8["logits_nmse"] < q2["logits_nmse"]
    for e in entries.values():
        assert e["a_vs_own_llama_cpp_nmse"] < CHECK_NMSE_BOUND
        assert e["b_vs_own_llama_cpp_nmse"] < CHECK_NMSE_BOUND
        assert len(e["contributions_a"]) == len(e["tokens"])


def test_anchored_comparison_explains_each_files_own_llama_cpp_run(synthetic) -> None:
    """--anchor llama.cpp: each file's coefficients from its own llama.cpp run, so each
    file's logits reproduce that run (an independent one: `reference`) to anchoring's
    rounding, far below what separates the two files."""
    pa, pb = synthetic("llama", "F32"), synthetic("llama", "Q8_0")
    with open_model(pa, dtype="float64") as a, open_model(pb, dtype="float64") as b:
        plain = compare_prompts(a, b, [PROMPT], ("jacobian",), settings=llamacpp.RunSettings())
        anchored = compare_prompts(a, b, [PROMPT], ("jacobian",),
                                   settings=llamacpp.RunSettings(), anchored=True)
        with pytest.raises(GgufjacError, match="anchoring needs"):
            compare_prompts(a, b, [PROMPT], anchored=True)
    e = anchored[0]
    assert e["a_vs_own_llama_cpp_nmse"] < 1e-8 and e["b_vs_own_llama_cpp_nmse"] < 1e-8
    assert e["a_vs_own_llama_cpp_nmse"] < plain[0]["a_vs_own_llama_cpp_nmse"]
    assert e["logits_nmse"] > 100 * max(e["a_vs_own_llama_cpp_nmse"],
                                        e["b_vs_own_llama_cpp_nmse"])
    # B's anchored map carries llama.cpp's rounding of Q8_0 matmul inputs as frozen
    # per-element ratios (A's F32 matmuls round nothing): the maps part further than the
    # plain ones, though both outputs are reproduced (docs/quantization.md)
    assert e["jacobian_rel_difference"] > plain[0]["jacobian_rel_difference"] > 0


def test_shared_work_once_equals_each_run_made_alone(synthetic) -> None:
    """A prompt set's tokens and llama.cpp runs come from one start per file, and J and every
    layer's lens from one sweep per file: each equals its own separate recomputation — the
    tokens and last-position logits of one llama.cpp start per prompt, and each layer's lens
    difference from the in-memory model's autograd maps (tests/test_lens_sweeps.py's
    reference); the forward sweep gives the reverse one's figures."""
    from tests.test_lens_sweeps import _reference_lens

    pa, pb = synthetic("gemma3", "F32"), synthetic("gemma3", "Q8_0")
    prompts = [PROMPT, "the capital of France is"]
    settings = llamacpp.RunSettings()
    with open_model(pa, dtype="float64") as a, open_model(pb, dtype="float64") as b:
        entries = {sweep: compare_prompts(a, b, prompts, ANALYSES, 4, None, Linearization(),
                                          settings, sweep=sweep)
                   for sweep in ("reverse", "forward")}
        layers = list(range(a.cfg.n_layer))
        for prompt, entry in zip(prompts, entries["reverse"]):
            tokens = llamacpp.tokenize(pa, prompt)
            assert llamacpp.tokenize(pb, prompt) == tokens and entry["n_tokens"] == len(tokens)
            own = {p: np.asarray(llamacpp.evaluate(p, tokens, settings, last_only=True)
                                 .logits[-1], dtype=np.float64) for p in (pa, pb)}
            nmse = float(((own[pb] - own[pa]) ** 2).sum() / (own[pa] ** 2).sum())
            assert entry["llama_cpp_logits_nmse"] == pytest.approx(nmse, rel=1e-12)
            ref_a = _reference_lens(a, tokens, layers, Linearization())
            ref_b = _reference_lens(b, tokens, layers, Linearization())
            for row in entry["lens"]:
                ja, jb = ref_a[row["layer"]][0], ref_b[row["layer"]][0]
                expected = float(torch.linalg.vector_norm(jb - ja) / torch.linalg.vector_norm(ja))
                assert row["lens_rel_difference"] == pytest.approx(expected, rel=1e-9)
            last = entry["lens"][-1]["lens_rel_difference"]
            assert entry["jacobian_rel_difference"] == pytest.approx(last, rel=1e-12)
        for r, f in zip(entries["reverse"], entries["forward"]):
            assert f["jacobian_rel_difference"] == pytest.approx(r["jacobian_rel_difference"],
                                                                 rel=1e-9)
            assert f["contributions_b"] == pytest.approx(r["contributions_b"], rel=1e-9)
            for rr, ff in zip(r["lens"], f["lens"]):
                assert ff["lens_rel_difference"] == pytest.approx(rr["lens_rel_difference"],
                                                                  rel=1e-9)
                assert ff["top_token_b"] == rr["top_token_b"]
