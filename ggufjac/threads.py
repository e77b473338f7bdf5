"""How many threads torch and llama.cpp use: the cores this process may run on, or what
the user sets. The command line sets it before torch is imported (torch's OpenMP pool
reads OMP_NUM_THREADS when it starts)."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any


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


class Workers:
    """Helper threads for calls into C that release the interpreter (ctypes): `run` splits
    one job into parts, the calling thread taking the first. Made on first use, with as many
    helpers as asked for; a forked child makes its own (it has the object, not the threads)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._forget()
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._pool: ThreadPoolExecutor | None
        self._pool, self._size, self._lock = None, 0, threading.Lock()

    def run(self, fn: Callable[..., Any], parts: list[tuple[Any, ...]]) -> list[Any]:
        """[fn(*part) for part in parts], parts[1:] on helper threads."""
        if len(parts) <= 1:
            return [fn(*p) for p in parts]
        with self._lock:
            if self._pool is None or self._size < len(parts) - 1:
                if self._pool is not None:  # its queued parts still run; then its threads end
                    self._pool.shutdown(wait=False)
                self._size = len(parts) - 1
                self._pool = ThreadPoolExecutor(self._size, thread_name_prefix=self.name)
            pool = self._pool
        futures = [pool.submit(fn, *p) for p in parts[1:]]
        first = fn(*parts[0])
        return [first, *(f.result() for f in futures)]
