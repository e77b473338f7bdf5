"""Shared fixtures: the real Gemma 3 270M model (from the PyPI package), loaded once."""

from __future__ import annotations

import pytest
import torch

from ggufjac.api import LoadedModel, open_model
from ggufjac.resolve import resolve_model

BRIDGE = "The bridge out of Marin is the"


@pytest.fixture(scope="session")
def gemma_path():
    return resolve_model("gemma3-270m")


@pytest.fixture(scope="session")
def gemma32(gemma_path) -> LoadedModel:
    return open_model(gemma_path, dtype=torch.float32)


@pytest.fixture(scope="session")
def gemma64(gemma_path) -> LoadedModel:
    return open_model(gemma_path, dtype=torch.float64)


@pytest.fixture(scope="session")
def bridge_tokens(gemma32) -> list[int]:
    return gemma32.tokenize(BRIDGE)


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """synthetic(arch, quant): a small random-weight GGUF of that family, made once."""
    from tools.synthetic import Shape, write_synthetic_gguf

    made: dict[tuple[str, str], object] = {}

    def get(arch: str, quant: str):
        key = (arch, quant)
        if key not in made:
            path = tmp_path_factory.mktemp("synthetic") / f"{arch}-{quant}.gguf"
            made[key] = write_synthetic_gguf(path, arch, Shape(), quant,
                                             rope_freqs=arch == "llama")
        return made[key]
    return get
