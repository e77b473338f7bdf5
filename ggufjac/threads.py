"""How many threads torch and llama.cpp use: the cores this process may run on, or what
the user sets. The command line sets it before torch is imported (torch's OpenMP pool
reads OMP_NUM_THREADS when it starts)."""

from __future__ import annotations

import os
import sys


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity), not all the machine has."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def use_threads(n: int | None) -> None:
    """Use `n` threads for torch's matrix work (None: torch's default, the cores in this
    process's affinity mask); llama.cpp's runs take `RunSettings.threads`."""
    if n is None:
        return
    os.environ["OMP_NUM_THREADS"] = str(n)
    if "torch" in sys.modules:  # already started: set its pool directly
        sys.modules["torch"].set_num_threads(n)
