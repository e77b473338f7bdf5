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
