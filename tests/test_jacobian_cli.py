"""`ggufjac jacobian` and `ggufjac check` end to end on the real model, files checked."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from ggufjac import llamacpp
from ggufjac.api import nmse
from ggufjac.cli import main
from test_fidelity import LOGITS_NMSE_BOUND

BRIDGE = "The bridge out of Marin is the"


@pytest.fixture(scope="module", params=["float32", "float64"])
def jacobian_run(request, tmp_path_factory, gemma_path):
    out = tmp_path_factory.mktemp(f"jac-{request.param}")
    result = CliRunner().invoke(main, ["jacobian", str(gemma_path), "--prompt", BRIDGE,
                                       "--out", str(out), "--dtype", request.param,
                                       "--overwrite"])
    assert result.exit_code == 0, result.output
    return request.param, out, result.output


def test_files_and_shapes(jacobian_run) -> None:
    dtype, out, _ = jacobian_run
    assert {p.name for p in out.iterdir()} == {"jacobian.safetensors", "report.json",
                                               "singular_values.png"}
    t = load_file(out / "jacobian.safetensors")
    n = 8
    assert t["jacobian"].shape == (640, n, 640)
    assert t["inputs"].shape == (n, 640) and t["output"].shape == (640,)
    assert all(v.dtype == getattr(torch, dtype) for v in t.values())
    assert (out / "singular_values.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reconstruction_from_saved_tensors(jacobian_run) -> None:
    dtype, out, _ = jacobian_run
    t = load_file(out / "jacobian.safetensors")
    recon = torch.einsum("onk,nk->o", t["jacobian"], t["inputs"])
    err = float(torch.linalg.norm(recon - t["output"]) / torch.linalg.norm(t["output"]))
    assert err <= (1e-5 if dtype == "float32" else 1e-12), err


def test_inputs_are_scaled_embeddings(jacobian_run, gemma32) -> None:
    """`inputs` are the rows fed into layer 0: embedding rows times sqrt(d) for Gemma."""
    _, out, _ = jacobian_run
    t = load_file(out / "jacobian.safetensors")
    report = json.loads((out / "report.json").read_text())
    rows = gemma32.weights.embedding_rows(report["token_ids"]).to(torch.float64)
    torch.testing.assert_close(t["inputs"].to(torch.float64), rows * 640 ** 0.5,
                               rtol=1e-6, atol=0)


def test_output_matches_llama_cpp_logits(jacobian_run, gemma32) -> None:
    """unembedding · output reproduces llama.cpp's last-position logits."""
    _, out, _ = jacobian_run
    t = load_file(out / "jacobian.safetensors")
    report = json.loads((out / "report.json").read_text())
    ref = llamacpp.evaluate(gemma32.path, report["token_ids"])
    w_out = t["output"].to(torch.float32)
    z = gemma32.model.logits(w_out).numpy()
    assert nmse(z, ref.logits[-1]) < LOGITS_NMSE_BOUND


def test_report_contents(jacobian_run) -> None:
    dtype, out, stdout = jacobian_run
    r = json.loads((out / "report.json").read_text())
    assert r["tokens"][:2] == ["<bos>", "The"] and len(r["tokens"]) == 8
    assert r["predicted_token"] in (" only", " first")
    s = np.array(r["singular_values"])
    assert s.shape == (640,) and np.all(np.diff(s) <= 1e-9 * s[0])
    assert 1 <= r["effective_rank"] < 20  # very low-rank, as the paper reports
    # the stable rank, recomputed from the reported spectrum: ||J||_F^2 / s_1^2 (to the
    # rounding of the computation's dtype)
    tol = 1e-12 if r["dtype"] == "float64" else 1e-5
    assert abs(r["effective_rank"] - float((s ** 2).sum() / s[0] ** 2)) < tol * r["effective_rank"]
    top = r["top_singular_tokens"]
    assert len(top) == 10 and all(len(v["tokens"]) == 5 for v in top)
    # The top left singular vector points along y and decodes to the prediction itself.
    assert top[0]["cos_with_output"] > 0.9
    assert r["predicted_token"] in top[0]["tokens"]
    assert all(v["cos_with_output"] >= 0 for v in top)
    assert r["reconstruction_rel_error"] <= (1e-5 if dtype == "float32" else 1e-12)
    assert "reconstruction rel error" in stdout


def test_existing_output_dir_is_refused(jacobian_run, gemma_path) -> None:
    _, out, _ = jacobian_run
    result = CliRunner().invoke(main, ["jacobian", str(gemma_path), "--prompt", BRIDGE,
                                       "--out", str(out)])
    assert result.exit_code == 2
    assert "--overwrite" in result.output


def test_check_cli_json(tmp_path, gemma_path) -> None:
    out = tmp_path / "check.json"
    result = CliRunner().invoke(main, ["check", str(gemma_path), "--prompt", BRIDGE,
                                       "--json", str(out), "--per-layer"])
    assert result.exit_code == 0, result.output
    r = json.loads(out.read_text())
    for key in ("top1_agree", "max_abs_logit_diff", "kl", "nmse", "ours_top1",
                "llama_cpp_top1", "llama_cpp_margin", "noise_floor_nmse"):
        assert key in r
    assert isinstance(r["top1_agree"], bool)
    assert len(r["layer_nmse"]) == 18
    assert "top-1 agree" in result.output and "layer  17" in result.output


def test_check_cli_fails_when_model_is_wrong(tmp_path, gemma_path, monkeypatch) -> None:
    """Exit code 1 when the port is wrong (here: Gemma's input scale removed)."""
    from ggufjac import families

    row = families.FAMILIES["gemma3"]
    import dataclasses

    monkeypatch.setitem(families.FAMILIES, "gemma3",
                        dataclasses.replace(row, embed_scale_sqrt_d=False))
    result = CliRunner().invoke(main, ["check", str(gemma_path), "--prompt", BRIDGE,
                                       "--no-noise-floor"])
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output


def test_demo_name_resolves(gemma_path) -> None:
    result = CliRunner().invoke(main, ["info", "gemma3-270m"])
    assert result.exit_code == 0, result.output
    assert "gemma3" in result.output and "supported      yes" in result.output
