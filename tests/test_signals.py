"""What stops a run by signal (llmtrain/signals.py): the flag its handler sets, and the
launcher's death reaching torchrun's training processes as SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmtrain.signals import Preemption, preemption_signals

ROOT = Path(__file__).resolve().parents[1]
linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")

# A training process's start, in short: the handler, then stop_with_launcher(), then a wait
# for the flag (the loop would finish its step and save). Prints the death signal it holds.
CHILD = """
import ctypes, sys, time
from llmtrain import signals
if len(sys.argv) > 1:
    signals._PARENT = -1  # as if the launcher had died before prctl
with signals.preemption_signals() as flag:
    signals.stop_with_launcher()
    held = ctypes.c_int()
    ctypes.CDLL(None).prctl(2, ctypes.byref(held), 0, 0, 0)  # PR_GET_PDEATHSIG
    print(held.value, flush=True)
    for _ in range(300):
        if flag.requested:
            break
        time.sleep(0.05)
    print(flag.signal, flush=True)
"""


def child(*args: str, torchrun: bool = True, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TORCHELASTIC_RUN_ID", None)
    if torchrun:
        env["TORCHELASTIC_RUN_ID"] = "test"
    return subprocess.Popen([sys.executable, "-c", CHILD, *args], env=env, text=True,
                            stdout=subprocess.PIPE, **kwargs)  # fmt: skip


def test_a_signal_sets_the_flag_and_the_handlers_come_back():
    before = signal.getsignal(signal.SIGUSR1)
    with preemption_signals() as flag:
        assert not flag.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert flag.signal == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) == before
    assert Preemption().signal is None


@linux
def test_the_launchers_death_is_a_sigterm_to_a_torchrun_process():
    """The launcher, here a python process, is killed with SIGKILL: its child, started as
    torchrun starts one, gets SIGTERM and stops as a preempted run does."""
    starts = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {CHILD!r}])"
    launcher = subprocess.Popen(
        [sys.executable, "-c", starts + "; time.sleep(60)"],
        env={**os.environ, "PYTHONPATH": str(ROOT), "TORCHELASTIC_RUN_ID": "test"},
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert launcher.stdout.readline().strip() == str(int(signal.SIGTERM))  # prctl holds it
        launcher.kill()
        assert launcher.stdout.readline().strip() == "SIGTERM"  # the child's flag
    finally:
        launcher.kill()
        launcher.communicate(timeout=30)


@linux
def test_a_launcher_dead_before_prctl_is_noticed():
    proc = child("dead")
    out, _ = proc.communicate(timeout=60)
    assert out.split() == [str(int(signal.SIGTERM)), "SIGTERM"]


@linux
def test_a_process_not_started_by_torchrun_outlives_its_parent():
    """nohup llmtrain-train ... &: the shell may exit; training goes on."""
    proc = child(torchrun=False)
    try:
        assert proc.stdout.readline().strip() == "0"  # no death signal
    finally:
        proc.kill()
        proc.communicate(timeout=30)


def test_the_launchers_pid_is_read_before_torch_is_imported():
    """A launcher that died during the worker's 1.3 s torch import went unnoticed: the parent
    was read after it, as the reaper."""
    code = "import sys, llmtrain; print('torch' in sys.modules, llmtrain.PARENT_PID)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout.split()  # fmt: skip
    assert out == ["False", str(os.getpid())]
