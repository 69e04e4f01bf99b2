"""What stops a run before its horizon, by signal: a preemption, Slurm's warning, Ctrl-C, and
the launcher's death.

SIGTERM, SIGUSR1 (Slurm's warning before a preemption or the time limit) and SIGINT (Ctrl-C;
a second one stops at once) only set a flag; the loop finishes its step, every rank agrees at
the same step, saves, and the process exits with :data:`EXIT_PREEMPTED` so the job script
requeues it. The time limit, which needs no signal, is ``llmtrain/timelimit.py``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

from llmtrain import PARENT_PID
from llmtrain.config import rank_from_env

EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: stopped by a signal, checkpoint saved, requeue me
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_PARENT = PARENT_PID  # the process that started this one


class Preempted(Exception):
    """A preemption signal stopped the run after a checkpoint; exit with EXIT_PREEMPTED."""


class Preemption:
    """Whether a preemption signal arrived (and which); set by the handler, read by the loop."""

    def __init__(self) -> None:
        self.signal: str | None = None

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _handle(self, signum: int, frame: Any) -> None:
        # A flag: the loop finishes its step and saves. print() here could re-enter buffered
        # I/O; os.write is one unbuffered call.
        self.signal = signal.Signals(signum).name
        if signum == signal.SIGINT:  # Ctrl-C saves; a second Ctrl-C stops at once, unsaved
            signal.signal(signal.SIGINT, signal.default_int_handler)
            if rank_from_env() == 0:
                os.write(2, b"\nllmtrain: Ctrl-C: stopping after this step with a checkpoint; "
                         b"Ctrl-C again quits without saving\n")  # fmt: skip


@contextlib.contextmanager
def preemption_signals() -> Iterator[Preemption]:
    """SIGTERM / SIGUSR1 / SIGINT (Ctrl-C) set a flag while inside (the main thread only;
    elsewhere a no-op), and the previous handlers come back after."""
    flag = Preemption()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {s: signal.signal(s, flag._handle) for s in PREEMPT_SIGNALS}
    try:
        yield flag
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def stop_with_launcher() -> None:
    """Under torchrun (``accelerate launch`` of several processes), SIGTERM when the launcher
    dies. Its agent starts each training process in a session of its own, so killing the
    launcher (its process group too; ``kill -9``, an IDE's stop button) left them training
    unseen, holding the devices and the run dir's lock. Now they stop as a preempted run does:
    finish the step, save, exit 75. Linux only (prctl); a process started any other way keeps
    running without its parent, as ``nohup`` expects."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        return
    if os.getppid() != _PARENT:  # the launcher died before prctl: no signal will come
        os.kill(os.getpid(), signal.SIGTERM)
