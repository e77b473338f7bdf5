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


class _Job:
    """One `Workers.run`: its parts, taken in order by whichever thread is free, and how
    many helper threads are inside a part now."""

    def __init__(self, fn: Callable[..., Any], parts: list[tuple[Any, ...]]) -> None:
        self.fn, self.parts = fn, parts
        self.results: list[Any] = [None] * len(parts)
        self.errors: list[BaseException] = []
        self.next, self.running, self.stopped = 0, 0, False
        self.lock = threading.Lock()
        # Held until the last helper part ends after `stop`: a plain lock, whose blocking
        # acquire an interrupt can only cut short before it is taken (no half-done state,
        # as a Condition's wait has between releasing and re-taking its lock)
        self.ended = threading.Lock()
        self.ended.acquire()

    def take(self) -> int | None:
        """The next part's index, or None when none is left or the job was stopped."""
        with self.lock:
            if self.stopped or self.next >= len(self.parts):
                return None
            self.next += 1
            return self.next - 1

    def help(self) -> None:
        """A helper thread's share: parts until none is left. A part is counted as running
        in the same locked step that takes it, so `stop` sees every part a helper began."""
        while True:
            with self.lock:
                if self.stopped or self.next >= len(self.parts):
                    return
                i, self.next, self.running = self.next, self.next + 1, self.running + 1
            try:
                self.results[i] = self.fn(*self.parts[i])
            except BaseException as e:  # handed to the caller, raised there
                self.errors.append(e)
            finally:
                with self.lock:
                    self.running -= 1
                    if self.stopped and not self.running and self.ended.locked():
                        self.ended.release()

    def stop(self) -> None:
        """No part starts from now on; returns when every part a helper began has ended.
        Waits through interrupts (a second Ctrl-C): the parts read and write the caller's
        memory by address, which unwinding the caller would free under them. An interrupt
        that came during the wait is raised once they have ended. Each pass decides from
        the count, under the lock, so an interrupt between two steps loses nothing."""
        interrupted: BaseException | None = None
        while True:
            try:
                with self.lock:
                    self.stopped = True
                    if not self.running:
                        break
                self.ended.acquire()
            except KeyboardInterrupt as e:
                interrupted = interrupted or e
        if interrupted is not None:
            raise interrupted


class Workers:
    """Helper threads for calls into C that release the interpreter (ctypes): `run` splits
    one job into parts, shared by the calling thread and the helpers. Made on first use, with
    as many helpers as asked for; a forked child makes its own (it has the object, not the
    threads)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._forget()
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._pool: ThreadPoolExecutor | None
        self._pool, self._size, self._lock = None, 0, threading.Lock()

    def run(self, fn: Callable[..., Any], parts: list[tuple[Any, ...]]) -> list[Any]:
        """[fn(*part) for part in parts], on the calling thread and len(parts) - 1 helpers.

        Returns or raises only once no part is running on any thread, whatever interrupts
        it (Ctrl-C in the calling thread included): parts are calls into C that are handed
        the caller's buffers by address, and an exception that unwound the caller while a
        helper still ran would free them under it. Parts not begun when it is interrupted
        are not run. A part's exception is raised after all parts have ended."""
        if len(parts) <= 1:
            return [fn(*p) for p in parts]
        with self._lock:
            if self._pool is None or self._size < len(parts) - 1:
                if self._pool is not None:  # its queued parts still run; then its threads end
                    self._pool.shutdown(wait=False)
                self._size = len(parts) - 1
                self._pool = ThreadPoolExecutor(self._size, thread_name_prefix=self.name)
            pool = self._pool
        job = _Job(fn, parts)
        try:
            for _ in parts[1:]:
                pool.submit(job.help)
            while (i := job.take()) is not None:
                job.results[i] = fn(*parts[i])
        finally:
            job.stop()
        if job.errors:
            raise job.errors[0]
        return job.results
