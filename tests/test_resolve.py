"""Naming models: paths, the demo name, and hub references through the real HF cache code."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ggufjac.errors import GgufjacError
from ggufjac.resolve import resolve_model
from tools.synthetic import Shape, write_synthetic_gguf

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture()
def hf_home(tmp_path):
    """A Hugging Face cache holding one synthetic model, laid out as huggingface-hub does."""
    home = tmp_path / "hf"
    repo = home / "hub" / "models--someorg--tiny-llama-GGUF"
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    write_synthetic_gguf(snap / "tiny-f32.gguf", "llama", Shape(n_layer=1))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return home


def _run_offline(hf_home, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run([sys.executable, "-m", "ggufjac.cli", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def test_hub_reference_resolves_from_cache_offline(hf_home) -> None:
    r = _run_offline(hf_home, "info", "someorg/tiny-llama-GGUF:tiny-f32.gguf")
    assert r.returncode == 0, r.stderr
    assert "architecture   llama" in r.stdout and COMMIT in r.stdout


def test_hf_repo_and_file_options(hf_home) -> None:
    r = _run_offline(hf_home, "info", "--hf-repo", "someorg/tiny-llama-GGUF",
                     "--hf-file", "tiny-f32.gguf")
    assert r.returncode == 0, r.stderr
    assert "supported      yes" in r.stdout


def test_missing_hub_file_offline_is_one_clear_error(hf_home) -> None:
    r = _run_offline(hf_home, "info", "someorg/tiny-llama-GGUF:other.gguf")
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("ggufjac: error:")]
    assert len(lines) == 1 and "someorg/tiny-llama-GGUF:other.gguf" in lines[0]
    assert "Traceback" not in r.stderr


def test_unknown_name_is_refused() -> None:
    with pytest.raises(GgufjacError) as e:
        resolve_model("no-such-model")
    assert "no-such-model" in str(e.value) and "gemma3-270m" in str(e.value)


def test_demo_name_assembles_into_models_dir(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("GGUFJAC_MODELS", str(tmp_path))
    path = resolve_model("gemma3-270m")
    assert path.parent == tmp_path and path.stat().st_size > 200_000_000
    assert not list(tmp_path.glob("*.partial"))
    assert resolve_model("gemma3-270m") == path  # reused, not re-assembled
