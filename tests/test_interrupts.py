"""Ctrl-C during work split across helper threads (threads.Workers, which the quantized
products and llama.cpp's dequantizers run on): the caller's buffers are handed to C by
address, so `run` must not return or raise while any helper's part is still running.

No timing: the helper's part blocks on an event that is set only once the calling thread is
seen waiting inside `run` (a profile hook on the calling thread watches for it). Code that
let the interrupt out at once would never wait there, and the part would still be blocked
when `run` raised."""

from __future__ import annotations

import signal
import sys
import threading

import pytest

from ggufjac.threads import Workers


class _Scenario:
    """Parts that record the order of events: the calling thread's part is interrupted by a
    real SIGINT once a helper's part has begun; the helper's part ends only when released,
    which happens when the calling thread starts to wait inside `run`."""

    def __init__(self, interrupt_while_waiting: bool) -> None:
        self.caller = threading.get_ident()
        self.helper_began, self.release = threading.Event(), threading.Event()
        self.interrupted = threading.Event()
        self.helper_ended, self.triggered = False, False
        self.interrupt_while_waiting = interrupt_while_waiting

    def part(self, i: int) -> int:
        if threading.get_ident() == self.caller:
            assert self.helper_began.wait(60), "no helper began a part"
            self.interrupted.set()
            signal.raise_signal(signal.SIGINT)  # KeyboardInterrupt in this thread, now
            return i
        self.helper_began.set()
        assert self.release.wait(60), "the helper's part was never released"
        self.helper_ended = True
        return i

    def _interrupt_then_release(self) -> None:
        signal.pthread_kill(self.caller, signal.SIGINT)  # Ctrl-C again, while it waits
        self.release.set()

    def profile(self, frame, event: str, arg) -> None:
        """On the calling thread, after the interrupt: when it starts to wait (a call of a
        `wait`, or of a lock's acquire), interrupt it again if asked, and release the
        helper's part."""
        waiting = (event == "call" and frame.f_code.co_name == "wait") or \
            (event == "c_call" and getattr(arg, "__name__", "") == "acquire")
        if not (waiting and self.interrupted.is_set()) or self.triggered:
            return
        self.triggered = True
        if self.interrupt_while_waiting:  # the signal is pending before the part can end
            threading.Thread(target=self._interrupt_then_release).start()
        else:
            self.release.set()


@pytest.fixture
def default_sigint():
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("interrupt_while_waiting", [False, True], ids=["once", "twice"])
def test_ctrl_c_waits_for_every_helper_part(default_sigint, interrupt_while_waiting: bool
                                            ) -> None:
    """Ctrl-C in the calling thread (and again while it waits) reaches the caller only
    after the helper's part has ended."""
    assert threading.current_thread() is threading.main_thread()  # where SIGINT is raised
    scenario = _Scenario(interrupt_while_waiting)
    workers = Workers("test-interrupts")
    ended_when_run_raised = None
    sys.setprofile(scenario.profile)
    try:
        workers.run(scenario.part, [(0,), (1,)])
    except KeyboardInterrupt:
        ended_when_run_raised = scenario.helper_ended
    finally:
        sys.setprofile(None)
        scenario.release.set()  # never leave the helper blocked, whatever happened
    assert scenario.interrupted.is_set()
    assert ended_when_run_raised is not None, "run returned instead of raising KeyboardInterrupt"
    assert ended_when_run_raised, "run raised while a helper's part was still running"


def test_results_and_errors_come_back_after_every_part() -> None:
    """Normal runs: results in the parts' order; a helper's exception is raised by run."""
    workers = Workers("test-interrupts")
    assert workers.run(lambda a, b: a * b, [(i, i + 1) for i in range(7)]) == \
        [i * (i + 1) for i in range(7)]

    def fails_on_three(i: int) -> int:
        if i == 3:
            raise ValueError("part 3")
        return i

    with pytest.raises(ValueError, match="part 3"):
        workers.run(fails_on_three, [(i,) for i in range(5)])
