"""trainer.max_time and a Slurm job's end: the run stops with a checkpoint while there is still
time to write one. The loop is timed by a fake clock: each step takes 10 s, an evaluation or a
save as long as the test says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny import TINY

import llmtrain.run as run_mod
import llmtrain.timelimit as timelimit
import llmtrain.train as train_mod
from llmtrain import checkpoint as ckpt
from llmtrain.config import ConfigError, load_config
from llmtrain.signals import Preempted
from llmtrain.timelimit import Clock, Deadline, deadline, format_duration, parse_duration

pytestmark = pytest.mark.timeout(240)

FAST = [
    *TINY,
    "trainer.batch_tokens=256",
    "trainer.eval_batches=1",
    "trainer.log_every=1",
    "trainer.keep_last=5",
    "trainer.max_steps=10",
]
BASE = 1_000_000_000.0  # the fake clock's start; the deadline is 100 s after it


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("3600", 3600),
        ("85800", 85800),  # YAML reads an unquoted 23:50:00 as this
        ("90s", 90),
        ("45m", 2700),
        ("1.5h", 5400),
        ("2d", 172800),
        ("23:50:00", 85800),
        ("1-12:00:00", 129600),
        ("0:00:30", 30),
    ],
)
def test_durations_read_as_seconds(text, seconds):
    assert parse_duration(text) == seconds


def test_durations_print_as_slurm_writes_them():
    assert [format_duration(s) for s in (30, 85800, 129600)] == [
        "0:00:30",
        "23:50:00",
        "1-12:00:00",  # the days kept
    ]


@pytest.mark.parametrize("text", ["abc", "12:00", "1h30m", "-5", "1:60:00", ""])
def test_other_durations_are_refused(text):
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


@pytest.mark.parametrize("value", ["soon", "0", "12:00"])
def test_a_bad_max_time_is_a_config_error(value):
    with pytest.raises(ConfigError, match="trainer.max_time"):
        load_config([*TINY, f"trainer.max_time={value}"])


def test_the_deadline_is_the_earlier_of_max_time_and_the_slurm_jobs_end():
    assert deadline(None, 0.0, environ={}) is None
    assert deadline("1h", 100.0, environ={}) == Deadline(3700.0, "trainer.max_time=1h")
    slurm = {"SLURM_JOB_END_TIME": "2000"}
    assert deadline("1h", 100.0, environ=slurm).why.startswith("the Slurm job's end")
    assert deadline("10m", 100.0, environ=slurm).at == 700.0
    # a save finished at the job's end leaves the job script no time to requeue the job
    assert deadline("1h", 100.0, environ=slurm).at == 2000.0 - timelimit.SLURM_REQUEUE_MARGIN_S
    assert deadline(None, 100.0, environ={"SLURM_JOB_END_TIME": "Unknown"}) is None
    # past at the start: stale (a time limit raised since); it would stop every step at once
    assert deadline(None, 100.0, environ={"SLURM_JOB_END_TIME": "150"}) is None


def test_the_clock_counts_the_steps_pauses_and_the_longest_save(monkeypatch):
    fake = FakeTime()
    monkeypatch.setattr(timelimit, "time", fake)
    clock = Clock(Deadline(BASE + 120, "test"))
    fake.now += 10
    clock.step_done()
    for took in (30, 20):  # the longest save counts
        with clock.pause("save"):
            fake.now += took
    with clock.pause("eval"):
        fake.now += 5
    clock.step_done()  # only the pauses passed since the last step: no time of its own
    assert (clock.step_s, clock.took) == (0, {"eval": 5, "hellaswag": 0, "sample": 0, "save": 30})
    fake.now += 10
    clock.step_done()
    assert clock.step_s == 10
    # now BASE + 75: two steps (20) and the final save (30) pass BASE + 120; one step fits
    assert clock.out_of_time(2, []) and not clock.out_of_time(1, [])
    assert clock.out_of_time(1, ["eval", "eval"])  # 10 + 5 + 5 + 30 > 45
    assert not Clock(None).out_of_time(1000, ["save"])


class FakeTime:
    """time.time() and time.monotonic() for timelimit: what the test advances, no more."""

    def __init__(self) -> None:
        self.now = BASE

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def fake(monkeypatch) -> FakeTime:
    """A fake clock, and a Slurm job that ends 100 s after it starts."""
    fake = FakeTime()
    monkeypatch.setattr(timelimit, "time", fake)
    end = BASE + 100 + timelimit.SLURM_REQUEUE_MARGIN_S  # the job script's time to requeue
    monkeypatch.setenv("SLURM_JOB_END_TIME", str(int(end)))
    return fake


def _slow(monkeypatch, fake: FakeTime, name: str, seconds: float) -> None:
    """``train.log_eval`` or ``Run.save`` take ``seconds`` on the fake clock."""
    owner = train_mod if name == "log_eval" else run_mod.Run
    original = getattr(owner, name)

    def slow(*args, **kwargs):
        fake.now += seconds
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, slow)


def _train(fake: FakeTime, run_dir: Path, *extra: str) -> ckpt.TrainerState:
    def ten_seconds(state, throughput):
        fake.now += 10

    return train_mod.train(load_config([*FAST, *extra]), run_dir, step_hook=ten_seconds)


def steps_logged(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if "loss" in r]


def test_the_run_stops_while_a_save_as_long_as_the_last_one_fits(tmp_path, monkeypatch, fake):
    """Saves take 25 s. Step 2 ends at 20 s and its save at 45; step 3 ends at 55, and step 4
    with its save and a final one would end at 115, so the run stops after step 3 and its save
    ends at 80. Counting no save time, it would start step 5 at 90 and be killed mid-save."""
    _slow(monkeypatch, fake, "save", 25)
    run_dir = tmp_path / "run"
    with pytest.raises(Preempted, match="before the time limit .the Slurm job's end"):
        _train(fake, run_dir, "trainer.ckpt_every=2", "trainer.eval_every=1000")
    assert fake.now == BASE + 80
    assert ckpt.latest_checkpoint(run_dir / "checkpoints").name == "step_0000003"
    assert steps_logged(run_dir) == [1, 2, 3]


def test_an_evaluation_due_next_counts_as_long_as_the_last_one(tmp_path, monkeypatch, fake):
    """Evaluations take 30 s. Step 3 ends at 30 s and its evaluation at 60; step 5 ends at 80,
    and step 6 with its evaluation would end at 120: the run stops after step 5. The run then
    goes on to its end with trainer.resume=auto once the job has time again."""
    _slow(monkeypatch, fake, "log_eval", 30)
    run_dir = tmp_path / "run"
    with pytest.raises(Preempted, match="time limit"):
        _train(fake, run_dir, "trainer.eval_every=3")
    assert ckpt.latest_checkpoint(run_dir / "checkpoints").name == "step_0000005"
    assert steps_logged(run_dir) == [1, 2, 3, 4, 5]

    monkeypatch.delenv("SLURM_JOB_END_TIME")
    assert _train(fake, run_dir, "trainer.eval_every=3", "trainer.resume=auto").step == 10
    assert steps_logged(run_dir) == list(range(1, 11))


def test_max_time_stops_the_run_too(tmp_path, monkeypatch, fake):
    """45 s from the start: step 4 ends at 40 s and step 5 would end at 50."""
    monkeypatch.delenv("SLURM_JOB_END_TIME")
    run_dir = tmp_path / "run"
    with pytest.raises(Preempted, match=r"time limit \(trainer.max_time=45\) after step 4;"):
        _train(fake, run_dir, "trainer.max_time=45", "trainer.eval_every=1000")
    assert ckpt.latest_checkpoint(run_dir / "checkpoints").name == "step_0000004"
