"""A time limit: ``trainer.max_time``, and a Slurm job's end (``SLURM_JOB_END_TIME``).

A run with a deadline stops after the step where the next one would not leave time for a
checkpoint: it saves and exits 75 like a preempted run, so a job script requeues it and
``trainer.resume=auto`` goes on. What the next step needs is measured in this process: the
last step's time (counted twice: the rest of this one, then the next), the evaluation and
sample due at either step as long as the last ones took, and a save as long as the longest so
far. Before its first save a process does not know how long one takes and counts none: leave
a margin in ``trainer.max_time`` (under Slurm, ``--signal=USR1@90`` covers the first save; the
deadline covers saves longer than its warning once one has been timed).
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# Kept free before a Slurm job's end: after the save, the launcher exits and the job script
# requeues the job (scontrol requeue, retried for up to 50 s). Slurm ends the job, its batch
# script included, at SLURM_JOB_END_TIME: a save finished just before it was never requeued.
SLURM_REQUEUE_MARGIN_S = 60
DURATION_FORMS = "seconds, 90m, 12h, 2d, HH:MM:SS or D-HH:MM:SS"


def parse_duration(text: str) -> float:
    """Seconds in ``text``: ``3600``, ``90s``, ``45m``, ``12h``, ``2d``, ``HH:MM:SS`` or
    Slurm's ``D-HH:MM:SS``. (A YAML file reads an unquoted 23:50:00 as seconds, 85800.)"""
    text = str(text).strip()
    if m := re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhd]?)", text):
        return float(m[1]) * _UNITS[m[2] or "s"]
    if m := re.fullmatch(r"(?:(\d+)-)?(\d+):([0-5]?\d):([0-5]?\d)", text):
        days, hours, minutes, seconds = (int(g or 0) for g in m.groups())
        return float(((days * 24 + hours) * 60 + minutes) * 60 + seconds)
    raise ValueError(f"{text!r} is not a duration ({DURATION_FORMS})")


def format_duration(seconds: float) -> str:
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    text = f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
    return f"{days}-{text}" if days else text


@dataclass(frozen=True)
class Deadline:
    at: float  # time.time() by which the run must have stopped and saved
    why: str  # what set it, as the user named it

    def describe(self) -> str:
        left = format_duration(max(0.0, self.at - time.time()))
        when = datetime.fromtimestamp(self.at).strftime("%Y-%m-%d %H:%M:%S")
        return f"stops with a checkpoint before {when} (in {left}; {self.why})"


def deadline(max_time: str | None, started: float | None = None, environ=os.environ):
    """The earlier of trainer.max_time from ``started`` (now) and the Slurm job's end, or None."""
    started = time.time() if started is None else started
    found = []
    if max_time not in (None, ""):
        found.append(Deadline(started + parse_duration(max_time), f"trainer.max_time={max_time}"))
    end = environ.get("SLURM_JOB_END_TIME", "")
    # One already past is stale (the environment keeps the end the job started with; a time
    # limit raised since, by scontrol update, is not in it): the signals still stop the run.
    if end.isdigit() and float(end) - SLURM_REQUEUE_MARGIN_S > started:
        why = f"the Slurm job's end, SLURM_JOB_END_TIME, less {SLURM_REQUEUE_MARGIN_S} s to requeue"
        found.append(Deadline(float(end) - SLURM_REQUEUE_MARGIN_S, why))
    return min(found, key=lambda d: d.at, default=None)


class Clock:
    """The loop's durations, and whether the deadline leaves time for one more step."""

    def __init__(self, limit: Deadline | None) -> None:
        self.limit = limit
        self.step_s = 0.0  # the last step's time, its evaluation, sample and save left out
        # The last evaluation, HellaSwag and sample took, and the longest save.
        self.took = {"eval": 0.0, "hellaswag": 0.0, "sample": 0.0, "save": 0.0}
        self._last = time.monotonic()
        self._paused = 0.0

    def step_done(self) -> None:
        """After the step's one host sync, so the time is the device's too."""
        now = time.monotonic()
        self.step_s = now - self._last - self._paused
        self._last, self._paused = now, 0.0

    @contextlib.contextmanager
    def pause(self, kind: str) -> Iterator[None]:
        """Times an evaluation, sample or save (``kind``), which the step time leaves out."""
        start = time.monotonic()
        try:
            yield
        finally:
            took = time.monotonic() - start
            self._paused += took
            self.took[kind] = max(took, self.took[kind]) if kind == "save" else took

    def out_of_time(self, steps: int, pauses: list[str]) -> bool:
        """Whether ``steps`` more steps, the ``pauses`` due in them and a final save would pass
        the deadline."""
        if self.limit is None:
            return False
        need = steps * self.step_s + sum(self.took[k] for k in pauses) + self.took["save"]
        return time.time() + need > self.limit.at
