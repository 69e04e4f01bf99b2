"""Faults injected on CPU; a run is never lost and never trains on garbage (issue 7).

1 kill -9 mid-save   2 preemption signals   3 damaged checkpoints   4 NaN / inf
5 disk full, read-only dir   6 bad data   8 unsafe pickles and credentials
(7, bad configs, is tests/test_bad_configs.py.)
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from tiny import TINY
from torch.nn.parallel import DistributedDataParallel

import llmtrain.run as run_mod
import llmtrain.train as train_mod
from llmtrain import checkpoint as ckpt
from llmtrain import resume
from llmtrain.config import DataConfig, load_config
from llmtrain.data import DataError, build_dataloader
from llmtrain.integrity import CheckpointError, check_files, check_pickle, safe_loading, verify
from llmtrain.metrics import NullLogger
from llmtrain.optim import lr_at
from llmtrain.sample import load_gpt
from llmtrain.shards import read_shard, write_shard
from llmtrain.signals import EXIT_PREEMPTED, Preempted, preemption_signals
from llmtrain.startup import Plan
from llmtrain.tokenizer import get_tokenizer

pytestmark = pytest.mark.timeout(240)

FAST = [
    *TINY,
    "trainer.batch_tokens=256",
    "trainer.sample_every=0",
    "trainer.eval_every=1000",
    "trainer.eval_batches=1",
    "trainer.log_every=1",
    "trainer.keep_last=5",
]
ROOT = Path(__file__).resolve().parents[1]


def config(steps: int, *extra: str, world: int = 1):
    return load_config([*FAST, f"trainer.max_steps={steps}", *extra], world_size=world)


def steps_logged(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if "loss" in r]


def env() -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(ROOT),
    }


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 150) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"process ended early ({proc.returncode}):\n{out}\n{err}")
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(0.2)


def logged_at_least(run_dir: Path, n: int):
    path = run_dir / "metrics.jsonl"
    return lambda: path.is_file() and len(path.read_text().splitlines()) >= n


# --- 1. kill -9 in the middle of a checkpoint write ---------------------------------------------

KILLED_IN_SAVE = """
import os, sys, time
from pathlib import Path
import accelerate
from llmtrain.config import load_config
from llmtrain.train import train

run_dir, ready = Path(sys.argv[1]), Path(sys.argv[2])
original, calls = accelerate.Accelerator.save_state, []

def save_state(self, output_dir, **kw):
    calls.append(output_dir)
    original(self, output_dir, **kw)  # weights and optimizer are on disk, the rest is not
    if len(calls) == 2:
        ready.write_text(output_dir)
        time.sleep(600)  # the parent kill -9s us here

accelerate.Accelerator.save_state = save_state
train(load_config(sys.argv[3:]), run_dir)
"""


def test_kill_9_during_save_keeps_previous_and_resume_auto_uses_it(tmp_path, capsys):
    run_dir, ready = tmp_path / "run", tmp_path / "ready"
    args = [*FAST, "trainer.max_steps=4", "trainer.ckpt_every=2"]
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_IN_SAVE, str(run_dir), str(ready), *args],
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(ready.is_file, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL

    root = run_dir / "checkpoints"
    half = root / "step_0000004.tmp"
    assert (half / "model.safetensors").is_file() and not (half / "manifest.json").exists()
    assert (root / "latest").read_text() == "step_0000002"
    assert resume.choose_resume("auto", root) == root / "step_0000002"
    assert verify(root / "step_0000002") is None

    train_mod.train(config(4, "trainer.ckpt_every=2", "trainer.resume=auto"), run_dir)
    assert f"resumed    from {root / 'step_0000002'} at step 2" in capsys.readouterr().out
    assert not half.exists()  # the next save removed the leftover
    assert (root / "latest").read_text() == "step_0000004"
    assert verify(root / "step_0000004") is None


class Killed(BaseException):
    """The process dying at that point (nothing after it runs)."""


def test_a_kill_just_after_the_rename_resumes_from_the_new_checkpoint(tmp_path, monkeypatch):
    """`latest` was written after the rename: a kill in between left it naming step 2 beside a
    complete step 4; resume=auto went back to step 2 and its next save deleted step 4 as 'the
    branch abandoned when this run resumed an earlier step'."""
    root, rename = tmp_path / "checkpoints", os.replace

    def dies_after_the_rename(src, dst):
        rename(src, dst)
        if Path(dst) == root / "step_0000004":
            raise Killed

    monkeypatch.setattr(ckpt.os, "replace", dies_after_the_rename)
    with pytest.raises(Killed):
        train_mod.train(config(4, "trainer.ckpt_every=2"), tmp_path)
    assert verify(root / "step_0000004") is None
    assert resume.choose_resume("auto", root) == root / "step_0000004"


def test_a_kill_while_pruning_leaves_nothing_the_next_save_keeps(tmp_path, monkeypatch):
    """keep_last removed an old checkpoint in place: a kill mid-removal could take its
    trainer_state.json first, leaving a step_N dir that no listing saw again and no save ever
    removed (a whole checkpoint of disk, named 'incomplete' by the tools)."""
    root, rmtree = tmp_path / "checkpoints", shutil.rmtree

    def dies_mid_removal(path, *args, **kwargs):
        path = Path(path)
        if path.name.startswith("step_0000002") and (path / ckpt.TRAINER_STATE).exists():
            (path / ckpt.TRAINER_STATE).unlink()
            raise Killed
        rmtree(path, *args, **kwargs)

    monkeypatch.setattr(ckpt.shutil, "rmtree", dies_mid_removal)
    with pytest.raises(Killed):
        train_mod.train(config(4, "trainer.ckpt_every=2", "trainer.keep_last=1"), tmp_path)
    monkeypatch.undo()
    train_mod.train(
        config(6, "trainer.ckpt_every=2", "trainer.keep_last=1", "trainer.resume=auto"), tmp_path
    )
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000006"]


def test_a_leftover_that_cannot_be_removed_does_not_stop_saving(tmp_path, monkeypatch, capsys):
    """A checkpoint made read-only (chmod -R a-w, to keep it) is renamed to step_N.tmp by
    keep_last, which cannot empty it; the next save's removal of that leftover then raised, and
    every later save failed ('receipt.json: Permission denied (the run dir is not writable')."""
    root, rmtree = tmp_path / "checkpoints", shutil.rmtree

    def read_only_step_2(path, *args, ignore_errors: bool = False, **kwargs):
        if Path(path).name.startswith("step_0000002"):
            if not ignore_errors:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), "receipt.json")
            return
        rmtree(path, *args, ignore_errors=ignore_errors, **kwargs)

    monkeypatch.setattr(ckpt.shutil, "rmtree", read_only_step_2)
    cfg = config(6, "trainer.ckpt_every=2", "trainer.keep_last=1")
    assert train_mod.train(cfg, tmp_path).step == 6
    assert f"cannot remove the leftover {root / 'step_0000002.tmp'}" in capsys.readouterr().out
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000002.tmp", "step_0000006"]
    assert verify(root / "step_0000006") is None


# --- 2. preemption: SIGTERM / SIGUSR1 -> finish the step, save, exit 75 -------------------------

FAKE_WANDB_KEY = "0123456789abcdef0123456789abcdef01234567"
FAKE_HF_TOKEN = "hf_FakeTokenForLeakTestsOnly0123456789abc"


def test_sigterm_saves_exits_75_and_resumes_and_leaks_no_credentials(tmp_path, capsys):
    """A real ``llmtrain-train`` process, with fake credentials in its environment (item 8)."""
    run_dir = tmp_path / "run"
    cli = shutil.which("llmtrain-train") or ""
    cmd = [cli] if cli else [sys.executable, "-m", "llmtrain.train"]
    args = [*FAST, "trainer.max_steps=1000", "trainer.ckpt_every=1000", f"hydra.run.dir={run_dir}"]
    args += ["logger=wandb", "logger.mode=offline"]
    secrets = {"WANDB_API_KEY": FAKE_WANDB_KEY, "HF_TOKEN": FAKE_HF_TOKEN}
    proc = subprocess.Popen(
        [*cmd, *args],
        env={**env(), **secrets, "WANDB_MODE": "offline"},
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(logged_at_least(run_dir, 2), proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED == 75, err[-3000:]
    assert "preempted: stopped by SIGTERM" in err

    stopped = steps_logged(run_dir)[-1]
    root = run_dir / "checkpoints"
    assert ckpt.latest_checkpoint(root) == root / f"step_{stopped:07d}"
    assert ckpt.load_trainer_state(root / f"step_{stopped:07d}").step == stopped
    assert verify(root / f"step_{stopped:07d}") is None

    # Credentials appear nowhere: console, config, metrics, checkpoints, W&B's offline files.
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any("wandb" in p.parts for p in files)
    for secret in secrets.values():
        assert secret not in out and secret not in err
        for p in files:
            assert secret.encode() not in p.read_bytes(), p

    train_mod.train(config(stopped + 2, "trainer.resume=auto"), run_dir)
    assert f"from {root / f'step_{stopped:07d}'} at step {stopped}" in capsys.readouterr().out
    assert steps_logged(run_dir)[-2:] == [stopped + 1, stopped + 2]


def test_a_sigterm_to_the_whole_process_group_still_saves(tmp_path):
    """Slurm, `timeout` and `kill -- -PGID` signal every process of the job, the DataLoader
    workers too: they died of the SIGTERM first, and the run crashed (exit 1) unsaved."""
    run_dir = tmp_path / "run"
    args = [*FAST, "trainer.max_steps=1000", "trainer.ckpt_every=1000", "data.num_workers=2"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmtrain.train", *args, f"hydra.run.dir={run_dir}", "logger=none"],
        env=env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # its own process group, as a job step's
    )  # fmt: skip
    wait_for(logged_at_least(run_dir, 2), proc)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    stopped = ckpt.load_trainer_state(ckpt.latest_checkpoint(run_dir / "checkpoints")).step
    assert stopped >= 2 and "preempted: stopped by SIGTERM" in err


@pytest.mark.parametrize("name", ["runs/2026-11-24/05-55-29-326804", "lr=3e-4,bs 1M", "it's"])
def test_the_resume_advice_names_the_run_dir_as_the_shell_and_hydra_read_it(tmp_path, name):
    import shlex

    from hydra.core.override_parser.overrides_parser import OverridesParser

    words = shlex.split(ckpt.resume_overrides(tmp_path / name))
    assert words[0] == "trainer.resume=auto"
    (override,) = OverridesParser.create().parse_overrides(words[1:])
    assert override.key_or_group == "hydra.run.dir" and override.value() == str(tmp_path / name)


def test_ctrl_c_saves_like_a_preemption_and_a_second_ctrl_c_stops_at_once():
    """Ctrl-C used to kill a workstation run with a traceback and no checkpoint."""
    before = signal.getsignal(signal.SIGINT)
    with preemption_signals() as flag:
        os.kill(os.getpid(), signal.SIGINT)
        assert flag.requested and flag.signal == "SIGINT"  # the loop saves at the step's end
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def _signal_one_rank(run_dir: str, steps: int, resume: str) -> dict:
    """In each forked rank: only rank 1 gets SIGUSR1, at the start of step 3."""
    import llmtrain.train as tm

    rank = int(os.environ["RANK"])
    lr_at = tm.lr_at

    def lr_and_signal(step, *args):
        if rank == 1 and step == 2 and resume == "none":
            os.kill(os.getpid(), signal.SIGUSR1)
        return lr_at(step, *args)

    tm.lr_at = lr_and_signal
    # DDP's reducer must not be the process group's last holder (a hang at the run's end).
    destroy, alive = torch.distributed.destroy_process_group, []

    def destroy_and_count(*args, **kwargs):
        gc.collect()
        alive.append(sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects()))
        return destroy(*args, **kwargs)

    torch.distributed.destroy_process_group = destroy_and_count
    cfg = config(steps, "dist=ddp", "trainer.batch_tokens=512", f"trainer.resume={resume}", world=2)
    try:
        state = tm.train(cfg, Path(run_dir))
        return {"preempted": False, "step": state.step, "ddp_at_destroy": alive}
    except Preempted as e:
        return {"preempted": True, "message": str(e), "ddp_at_destroy": alive}


@pytest.mark.distributed
def test_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    from dist_worker import run

    run_dir = tmp_path / "run"
    results = run(_signal_one_rank, 2, str(run_dir), 10, "none", tmp=tmp_path)
    assert [r["preempted"] for r in results] == [True, True]
    assert [r["ddp_at_destroy"] for r in results] == [[0], [0]]
    assert "SIGUSR1" in results[1]["message"] and "another rank" in results[0]["message"]
    root = run_dir / "checkpoints"
    saved = root / "step_0000003"
    assert ckpt.latest_checkpoint(root) == saved, results
    assert {p.name for p in saved.glob("data_state_*.pt")} == {"data_state_0.pt", "data_state_1.pt"}
    assert steps_logged(run_dir) == [1, 2, 3]

    results = run(_signal_one_rank, 2, str(run_dir), 5, "auto", tmp=tmp_path)
    assert results == [{"preempted": False, "step": 5, "ddp_at_destroy": [0]}] * 2
    assert steps_logged(run_dir) == [1, 2, 3, 4, 5]


def _signal_one_rank_while(run_dir: str, pause: str) -> dict:
    """In each forked rank: rank 1 gets SIGUSR1 during step 2's evaluation or checkpoint save."""
    import llmtrain.run as rm
    import llmtrain.train as tm

    rank = int(os.environ["RANK"])
    original = {"eval": tm.log_eval, "save": rm.Run.save}[pause]

    def and_signal(run, *args, **kwargs):
        result = original(run, *args, **kwargs)
        if rank == 1 and run.state.step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        return result

    if pause == "eval":
        tm.log_eval = and_signal
    else:
        rm.Run.save = and_signal
    every = "trainer.eval_every=2" if pause == "eval" else "trainer.ckpt_every=2"
    cfg = config(10, "dist=ddp", "trainer.batch_tokens=512", every, world=2)
    try:
        tm.train(cfg, Path(run_dir))
        return {"preempted": False}
    except Preempted as e:
        return {"preempted": True, "message": str(e)}


@pytest.mark.distributed
@pytest.mark.parametrize("pause", ["eval", "save"])
def test_a_signal_during_an_evaluation_or_a_save_stops_at_that_step(tmp_path, pause):
    """It was read at the next step's end: one more step and, after a save, a second save, in
    the seconds a preemption leaves."""
    from dist_worker import run

    run_dir = tmp_path / "run"
    results = run(_signal_one_rank_while, 2, str(run_dir), pause, tmp=tmp_path)
    assert [r["preempted"] for r in results] == [True, True], results
    root = run_dir / "checkpoints"
    assert [p.name for p in root.glob("step_*")] == ["step_0000002"]
    assert steps_logged(run_dir) == [1, 2]


def launch_two_ranks(run_dir: Path, shell: str) -> subprocess.Popen:
    """``accelerate launch`` of a 1000-step ddp run on 2 CPU processes, after ``shell``
    (``exec`` at its end), in a session of its own."""
    args = [*FAST, "dist=ddp", "trainer.batch_tokens=512", "trainer.max_steps=1000"]
    args += ["trainer.ckpt_every=1000", f"hydra.run.dir={run_dir}"]
    launch = ["accelerate", "launch", "--config_file", str(ROOT / "launch" / "cpu.yaml")]
    line = " ".join([*launch, "-m", "llmtrain.train", *args])
    return subprocess.Popen(
        ["bash", "-c", f"{shell} {line}"],
        env={**env(), "PYTHONWARNINGS": "ignore"},
        cwd=run_dir.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


@pytest.mark.slow
@pytest.mark.distributed
def test_real_accelerate_launch_sigusr1_exits_75_on_every_rank(tmp_path):
    """As Slurm does it: USR1 to every process of the step; the launcher ignores it (the sbatch
    scripts trap it), the two training processes save one checkpoint and exit 75."""
    run_dir = tmp_path / "run"
    proc = launch_two_ranks(run_dir, "trap '' USR1; exec")
    try:
        wait_for(logged_at_least(run_dir, 2), proc, timeout=200)
        # Slurm signals every process of the step, whatever its process group (torch's agent
        # starts the workers in their own sessions, so killpg would not reach them).
        launcher = psutil.Process(proc.pid)
        for p in [launcher, *launcher.children(recursive=True)]:
            p.send_signal(signal.SIGUSR1)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert err.count("preempted: stopped by SIGUSR1") == 1, err[-3000:]  # said once, by rank 0
    assert err.count("exitcode  : 75") == 2  # torch's agent reports each worker's code...
    assert proc.returncode == 1  # ...and exits 1 itself: a job script sees 1, not 75
    stopped = steps_logged(run_dir)[-1]
    assert ckpt.latest_checkpoint(run_dir / "checkpoints").name == f"step_{stopped:07d}"


@pytest.mark.slow
@pytest.mark.distributed
def test_training_processes_stop_and_save_when_the_launcher_is_killed(tmp_path):
    """kill -9 of accelerate launch: torch's agent starts the workers in sessions of their own,
    so they went on training unseen, holding the run dir's lock. The launcher's death now
    reaches them as SIGTERM: both save one checkpoint and exit."""
    run_dir = tmp_path / "run"
    proc = launch_two_ranks(run_dir, "exec")
    workers = []
    try:
        wait_for(logged_at_least(run_dir, 2), proc, timeout=200)
        workers = psutil.Process(proc.pid).children()
        assert len(workers) == 2, workers
        proc.kill()
        _, still = psutil.wait_procs(workers, timeout=120)
        assert not still, "the training processes outlived their launcher"
        out, err = proc.communicate(timeout=30)  # the workers held the pipes open until now
    finally:
        for p in [proc, *workers]:
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                p.kill()
    assert err.count("preempted: stopped by SIGTERM") == 1, err[-3000:]  # said once, by rank 0
    stopped = steps_logged(run_dir)[-1]
    assert stopped < 1000
    assert ckpt.latest_checkpoint(run_dir / "checkpoints").name == f"step_{stopped:07d}"


# --- 3. damaged checkpoints -------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("two") / "run"
    train_mod.train(config(4, "trainer.ckpt_every=2"), run_dir)
    return run_dir


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "flipped byte": ("model.safetensors", flip_byte),
    "truncated": ("optimizer.bin", lambda p: p.write_bytes(p.read_bytes()[:100])),
    # Accelerate skips a missing RNG file with an INFO line: resume would silently differ.
    "missing rng shard": ("random_states_0.pkl", Path.unlink),
    "missing data shard": ("data_state_0.pt", Path.unlink),
    "missing manifest": ("manifest.json", Path.unlink),
    # One flipped byte in a key of the manifest itself used to raise KeyError (exit 1).
    "manifest key": (
        "manifest.json",
        lambda p: p.write_text(p.read_text().replace('"sha256"', '"sha246"', 1)),
    ),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_checkpoint_is_named_and_auto_falls_back(case, two_checkpoints, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(two_checkpoints, run_dir)
    root = run_dir / "checkpoints"
    name, damage = DAMAGE[case]
    damage(root / "step_0000004" / name)

    with pytest.raises(CheckpointError, match=name):
        resume.choose_resume(str(root / "step_0000004"), root)
    assert resume.choose_resume("auto", root) == root / "step_0000002"
    out = capsys.readouterr().out
    assert f"skipping damaged checkpoint {root / 'step_0000004'}" in out and name in out
    assert "falling back to" in out
    if case == "flipped byte":  # end to end: the run goes on from step 2
        train_mod.train(config(3, "trainer.resume=auto"), run_dir)
        assert "at step 2" in capsys.readouterr().out
        assert steps_logged(run_dir)[-1] == 3


def test_a_rollback_keeps_the_checkpoint_it_writes(two_checkpoints, tmp_path):
    """Resuming step 2 of a run that reached step 4, with keep_last=1: pruning by step number
    deleted the new step 3 and kept the abandoned step 4, with `latest` naming step 3."""
    run_dir = tmp_path / "run"
    shutil.copytree(two_checkpoints, run_dir)
    root = run_dir / "checkpoints"
    overrides = [f"trainer.resume={root / 'step_0000002'}", "trainer.keep_last=1"]
    train_mod.train(config(3, *overrides, "trainer.ckpt_every=1"), run_dir)
    assert [c.name for c in ckpt.complete_checkpoints(root)] == ["step_0000003"]
    assert ckpt.latest_checkpoint(root) == root / "step_0000003"


def _roll_back_to_step_2(two_checkpoints, tmp_path, capsys, steps: int, every: int):
    """A copy of a run that reached step 4, resumed from its step 2 and trained to ``steps``
    saving every ``every``; the abandoned step 4 is removed at its first save."""
    run_dir = tmp_path / "run"
    shutil.copytree(two_checkpoints, run_dir)
    root = run_dir / "checkpoints"
    overrides = [f"trainer.resume={root / 'step_0000002'}", f"trainer.ckpt_every={every}"]
    train_mod.train(config(steps, *overrides), run_dir)
    assert "removed step_0000004, the branch abandoned" in capsys.readouterr().out
    return run_dir, root


def test_after_a_rollback_auto_never_falls_back_onto_the_abandoned_branch(
    two_checkpoints, tmp_path, capsys
):
    """Resuming step 2 of a run that reached step 4 (the README's advice after a divergence):
    step 4 outlived the new branch's checkpoints, and once step 3 was damaged resume=auto
    'fell back' onto step 4, another history."""
    run_dir, root = _roll_back_to_step_2(two_checkpoints, tmp_path, capsys, steps=3, every=1)
    assert [c.name for c in ckpt.complete_checkpoints(root)] == ["step_0000002", "step_0000003"]
    flip_byte(root / "step_0000003" / "model.safetensors")
    train_mod.train(config(3, "trainer.resume=auto"), run_dir)
    assert "falling back to " + str(root / "step_0000002") in capsys.readouterr().out


def test_a_rollback_whose_first_save_is_past_the_abandoned_branch_removes_it(
    two_checkpoints, tmp_path, capsys
):
    """Resuming step 2 of a run that reached step 4, first saving at step 5: pruning by step
    number kept the abandoned step 4 (as one of keep_last, beside the new step 5), so a damaged
    step 5 made resume=auto fall back onto another history."""
    run_dir, root = _roll_back_to_step_2(two_checkpoints, tmp_path, capsys, steps=5, every=10)
    assert [c.name for c in ckpt.complete_checkpoints(root)] == ["step_0000002", "step_0000005"]


def test_a_resume_with_nothing_to_train_leaves_the_run_as_it_was(two_checkpoints, tmp_path):
    """Naming an older step with a horizon it has reached (a look at step 2 of a run at step
    4: there is no eval-only mode) trained nothing, yet pointed `latest` at step 2, cut
    metrics.jsonl back to step 2 and rewrote config.yaml: resume=auto then went on from 2."""
    run_dir = tmp_path / "run"
    shutil.copytree(two_checkpoints, run_dir)
    root = run_dir / "checkpoints"
    metrics, saved = ((run_dir / f).read_text() for f in ("metrics.jsonl", "config.yaml"))
    train_mod.train(config(2, f"trainer.resume={root / 'step_0000002'}"), run_dir)
    assert ckpt.latest_checkpoint(root) == root / "step_0000004"
    assert [c.name for c in ckpt.complete_checkpoints(root)] == ["step_0000002", "step_0000004"]
    assert (run_dir / "metrics.jsonl").read_text() == metrics
    assert (run_dir / "config.yaml").read_text() == saved


def test_a_rollback_that_stops_before_its_first_save_resumes_there(
    two_checkpoints, tmp_path, monkeypatch, capsys
):
    """A rollback to step 2 that crashed (or diverged) before its first checkpoint: `latest`
    still named step 4, so the requeue's resume=auto went on with the abandoned branch, and
    the divergence message called step 4 the last good checkpoint."""
    run_dir = tmp_path / "run"
    shutil.copytree(two_checkpoints, run_dir)
    root = run_dir / "checkpoints"

    def crash(state, throughput):
        raise SystemExit("killed")

    overrides = [f"trainer.resume={root / 'step_0000002'}", "trainer.ckpt_every=10"]
    with pytest.raises(SystemExit, match="killed"):
        train_mod.train(config(6, *overrides), run_dir, step_hook=crash)
    assert "rollback   step_0000004: the branch this run abandons" in capsys.readouterr().out
    assert ckpt.latest_checkpoint(root) == root / "step_0000002"
    poisoned_model(monkeypatch, set(range(1, 100)))
    with pytest.raises(ckpt.Diverged, match="last good checkpoint is .*step_0000002;"):
        train_mod.train(config(6, "trainer.resume=auto", "trainer.max_bad_steps=2"), run_dir)


def _wandb_ids(two_checkpoints, tmp_path, monkeypatch) -> tuple[Path, list[str]]:
    """A copy of ``two_checkpoints`` whose W&B run id is 0123456789ab, and the ids each
    wandb.init of a run there is given, in order (W&B itself is not started)."""
    import wandb

    inits: list[str] = []

    class FakeRun:
        def define_metric(self, *args, **kwargs):
            pass

        def log(self, *args, **kwargs):
            pass

        def finish(self):
            pass

    monkeypatch.setattr(wandb, "init", lambda **kw: inits.append(kw["id"]) or FakeRun())
    run_dir = tmp_path / "run"
    shutil.copytree(two_checkpoints, run_dir)
    (run_dir / "wandb_run_id").write_text("0123456789ab\n")
    return run_dir, inits


def test_a_rollback_logs_to_a_new_wandb_run(two_checkpoints, tmp_path, monkeypatch, capsys):
    """W&B drops every log below its run's last step. A rollback (a named step, often with a
    lower lr after a divergence) logged its steps 3..4 into the run that holds the abandoned
    branch's 3..4: the dashboard kept showing the old values, and nothing said so."""
    run_dir, inits = _wandb_ids(two_checkpoints, tmp_path, monkeypatch)
    root = run_dir / "checkpoints"
    shutil.rmtree(root / "step_0000004")  # cut off after logging step 4, before saving it
    wb = ["logger=wandb", "logger.mode=offline"]

    train_mod.train(config(4, *wb, "trainer.resume=auto"), run_dir)  # reruns 3..4 exactly
    assert inits == ["0123456789ab"]
    assert "a new W&B run" not in capsys.readouterr().out

    train_mod.train(config(4, *wb, f"trainer.resume={root / 'step_0000002'}"), run_dir)
    assert inits[1] != "0123456789ab"
    assert (run_dir / "wandb_run_id").read_text().strip() == inits[1]
    assert "a new W&B run" in capsys.readouterr().out
    assert steps_logged(run_dir) == [1, 2, 3, 4]


def test_an_auto_resume_that_changes_the_lr_logs_to_a_new_wandb_run(
    two_checkpoints, tmp_path, monkeypatch, capsys
):
    """trainer.resume=auto after an attempt logged past its last checkpoint, with another
    optim.lr (or horizon, batch): the steps it retrains take other values, and W&B kept the
    cut-off attempt's, unlike metrics.jsonl; the same resume unchanged keeps the W&B run."""
    run_dir, inits = _wandb_ids(two_checkpoints, tmp_path, monkeypatch)
    shutil.rmtree(run_dir / "checkpoints" / "step_0000004")  # logged 3..4, saved 2
    wb = ["logger=wandb", "logger.mode=offline"]
    lr = config(4).optim.lr

    train_mod.train(config(4, *wb, "trainer.resume=auto", f"optim.lr={lr / 2}"), run_dir)
    assert inits[0] != "0123456789ab"
    out = capsys.readouterr().out
    assert "a new W&B run" in out and "(this resume changes the lr)" in out
    assert steps_logged(run_dir) == [1, 2, 3, 4]

    saved = config(4, "optim.warmup_steps=1")
    plan = Plan.from_config(saved, 1).resumed(saved, 2, 2 * saved.trainer.batch_tokens)
    assert resume.changes_values(saved, saved, plan, 4) == []
    longer = config(8, "optim.warmup_steps=1")  # the cosine stretched: steps 3, 4 get other lrs
    assert resume.changes_values(saved, longer, replace(plan, max_steps=8), 4) == ["the lr"]
    warming = config(8)  # still warming up at steps 3 and 4 (smoke's 10): the same lr
    assert resume.changes_values(config(4), warming, replace(plan, max_steps=8), 4) == []
    wider = config(
        4, "optim.warmup_steps=1", f"trainer.batch_tokens={2 * saved.trainer.batch_tokens}"
    )
    assert "trainer.batch_tokens" in resume.changes_values(saved, wider, plan, 4)


def exits_2(run, capsys) -> str:
    """What a tool printed on stderr as it exited 2 (a bad input)."""
    with pytest.raises(SystemExit) as e:
        run()
    assert e.value.code == 2
    return capsys.readouterr().err


def test_the_tools_check_the_manifest_before_reading_weights(two_checkpoints, tmp_path, capsys):
    """llmtrain-export, llmtrain-sample and consolidate wrote or sampled corrupted weights."""
    from llmtrain import consolidate, export, sample

    run_dir = tmp_path / "run"
    shutil.copytree(two_checkpoints, run_dir)
    step = run_dir / "checkpoints" / "step_0000004"
    flip_byte(step / "model.safetensors")
    runs = [
        lambda: consolidate.main([str(step), "--out", str(tmp_path / "w.safetensors")]),
        lambda: export.main([str(step), str(tmp_path / "hf")]),
        lambda: sample.main([str(step), "--max-new-tokens", "2"]),
    ]
    for run in runs:
        assert "model.safetensors does not match its sha256" in exits_2(run, capsys)
    assert not (tmp_path / "w.safetensors").exists() and not (tmp_path / "hf").exists()
    two = run_dir / "checkpoints" / "step_0000002"
    over = partial(consolidate.main, [str(two), "--out", str(two / "optimizer.bin")])
    assert "part of the checkpoint" in exits_2(over, capsys)  # never over its own files


def test_consolidate_takes_a_run_dir_and_names_a_missing_path(two_checkpoints, tmp_path, capsys):
    """Like llmtrain-export: it said 'runs/mine/manifest.json is missing' for a run dir, and
    the same for a step that does not exist."""
    from llmtrain import consolidate

    consolidate.main([str(two_checkpoints), "--dtype", "bf16"])  # the run's newest checkpoint
    out = two_checkpoints / "checkpoints" / "step_0000004" / "consolidated.safetensors"
    assert capsys.readouterr().out.strip() == str(out) and out.is_file()
    out.unlink()
    nowhere = two_checkpoints / "checkpoints" / "step_0001000"
    missing = exits_2(partial(consolidate.main, [str(nowhere)]), capsys)
    assert "step_0001000: no such checkpoint or run directory" in missing


def test_compiled_checkpoints_load_under_the_model_s_own_names(two_checkpoints, monkeypatch):
    """A trainer.compile=true run saves torch.compile's wrapper: every name has _orig_mod."""
    from llmtrain import consolidate

    step = two_checkpoints / "checkpoints" / "step_0000004"
    plain, _, _ = load_gpt(step)
    load = consolidate._load_full
    monkeypatch.setattr(consolidate, "_load_full", lambda ckpt, kind: {
        f"_orig_mod.{k}": v for k, v in load(ckpt, kind).items()})  # fmt: skip
    model, _, _ = load_gpt(step)
    for name, value in plain.state_dict().items():  # the trained weights, under their names
        assert torch.equal(model.state_dict()[name], value), name


def test_the_quick_check_finds_a_truncated_file_without_hashing(tmp_path):
    """init_from and the tools check sizes only before reading weights (hashing billions of
    parameters takes minutes): a short or missing file must fail there already."""
    (tmp_path / "model.safetensors").write_bytes(b"x" * 10)
    entries = {"model.safetensors": {"size": 12, "sha256": "0" * 64}}
    problem = check_files(tmp_path, entries, hashed=False)
    assert problem is not None and "has 10 bytes, the manifest says 12" in problem
    gone = {"optimizer.bin": entries["model.safetensors"]}  # named, not a FileNotFoundError
    assert check_files(tmp_path, gone, hashed=False) == f"{tmp_path / 'optimizer.bin'} is missing"


def test_every_checkpoint_damaged_is_an_error(two_checkpoints, tmp_path):
    root = tmp_path / "checkpoints"
    shutil.copytree(two_checkpoints / "checkpoints", root)
    for step in ("step_0000002", "step_0000004"):
        flip_byte(root / step / "model.safetensors")
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        resume.choose_resume("auto", root)


# --- 4. NaN / inf ------------------------------------------------------------------------------


def poisoned_model(monkeypatch, bad_calls: set[int]) -> None:
    """The training forward returns a NaN loss on the given (1-based) calls."""
    calls = [0]

    class Poisoned(run_mod.GPT):
        def forward(self, idx, targets=None, **kwargs):
            logits, loss = super().forward(idx, targets, **kwargs)
            if self.training:
                calls[0] += 1
                if calls[0] in bad_calls and loss is not None:
                    loss = loss * float("nan")
            return logits, loss

    monkeypatch.setattr(run_mod, "GPT", Poisoned)


@pytest.mark.parametrize(
    "dist,precision", [("single", "fp32"), ("zero2", "fp32"), ("zero3", "fp32"),
                       ("single", "bf16"), ("zero2", "bf16"), ("zero3", "bf16")]
)  # fmt: skip
def test_nan_steps_are_skipped_and_counted(tmp_path, monkeypatch, capsys, dist, precision):
    """Under DeepSpeed the engine steps inside backward(); it discards a step whose gradient
    norm is not finite, and the loop counts it like any other skipped step. In bf16 ZeRO-2/3
    add the gradients up in fp32 partitions (ds_config.fp32_grad_sum): the same holds."""
    poisoned_model(monkeypatch, {3, 4})
    cfg = config(5, "trainer.max_bad_steps=3", f"dist={dist}", f"trainer.precision={precision}")
    state = train_mod.train(cfg, tmp_path)
    assert state.step == 5 and state.skipped_steps == 2 and state.bad_steps == 0
    assert capsys.readouterr().out.count("non-finite gradient norm, step skipped") == 2
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-2])
    assert last["step"] == 5 and last["skipped_steps"] == 2
    model, _, _ = load_gpt(tmp_path)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_k_bad_steps_in_a_row_stop_naming_the_last_good_checkpoint(tmp_path, monkeypatch):
    poisoned_model(monkeypatch, set(range(3, 100)))
    cfg = config(10, "trainer.max_bad_steps=3", "trainer.ckpt_every=2")
    with pytest.raises(ckpt.Diverged, match="3 consecutive non-finite steps") as e:
        train_mod.train(cfg, tmp_path)
    assert str(tmp_path / "checkpoints" / "step_0000002") in str(e.value)
    # The skipped steps reach metrics.jsonl before the run stops (no log interval ended).
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert last == {
        "step": 3, "tokens": last["tokens"], "skipped_steps": 3, "bad_steps": 3, "diverged": True
    }  # fmt: skip


def test_a_run_that_diverges_logs_the_steps_its_last_interval_trained(tmp_path, monkeypatch):
    """With log_every=10, steps 1-2 trained and then the run stopped at step 5: nothing but
    the divergence record was written, and W&B got nothing; the blow-up is what one debugs."""
    poisoned_model(monkeypatch, set(range(3, 100)))
    logged = []
    monkeypatch.setattr(NullLogger, "log", lambda self, record, step: logged.append(record))
    cfg = config(10, "trainer.max_bad_steps=3", "trainer.log_every=10")
    with pytest.raises(ckpt.Diverged):
        train_mod.train(cfg, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 3] and records[1]["diverged"] is True
    assert math.isfinite(records[0]["loss"]) and math.isfinite(records[0]["grad_norm"])
    assert records[0]["lr"] == pytest.approx(lr_at(1, cfg.optim, 10))
    assert [r["step"] for r in logged] == [2, 3]  # the logger (W&B) too


def test_a_run_that_diverges_before_any_checkpoint_says_to_start_again(tmp_path, monkeypatch):
    poisoned_model(monkeypatch, set(range(1, 100)))
    cfg = config(10, "trainer.max_bad_steps=2")
    with pytest.raises(ckpt.Diverged, match="No checkpoint was written; .* start again"):
        train_mod.train(cfg, tmp_path)


def test_an_inf_weight_is_found_as_a_nan_is():
    model = torch.nn.Linear(2, 2)
    assert ckpt.nonfinite_parameter(model) is None
    with torch.no_grad():
        model.bias[1] = float("-inf")
    assert ckpt.nonfinite_parameter(model) == "bias"


def test_nan_weights_are_never_saved(tmp_path, monkeypatch):
    """Finite gradients, but an update that leaves a NaN in the weights (step 3)."""
    build = run_mod.build_dist_optimizer

    def poisoning_optimizer(model, cfg, device_type):
        opt = build(model, cfg, device_type)
        step, count = opt.step, [0]

        def poisoned_step(*args, **kwargs):
            out = step(*args, **kwargs)
            count[0] += 1
            if count[0] == 3:
                with torch.no_grad():
                    model.transformer.ln_f.weight[0] = float("nan")
            return out

        opt.step = poisoned_step
        return opt

    monkeypatch.setattr(run_mod, "build_dist_optimizer", poisoning_optimizer)
    with pytest.raises(ckpt.Diverged, match="transformer.ln_f.weight") as e:
        train_mod.train(config(4, "trainer.ckpt_every=1"), tmp_path)
    root = tmp_path / "checkpoints"
    assert str(root / "step_0000002") in str(e.value)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000001", "step_0000002"]


# --- 5. disk full, read-only run dir ------------------------------------------------------------


def fail_second_save(monkeypatch, make_it_fail) -> None:
    original, calls = ckpt.save_checkpoint, [0]

    def save(accelerator, ckpt_root, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            with make_it_fail(accelerator, ckpt_root):
                return original(accelerator, ckpt_root, *args, **kwargs)
        return original(accelerator, ckpt_root, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_checkpoint", save)


class disk_full:
    """accelerator.save_state writes its files, then the disk is full (ENOSPC)."""

    def __init__(self, accelerator, ckpt_root):
        self.acc, self.root = accelerator, ckpt_root

    def __enter__(self):
        original = type(self.acc).save_state

        def save_state(output_dir, **kw):
            original(self.acc, output_dir, **kw)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"{output_dir}/extra.bin")

        self.acc.save_state = save_state

    def __exit__(self, *exc):
        del self.acc.save_state


class read_only:
    """The checkpoints dir cannot be written: chmod for a normal user; root ignores modes, so
    the ext4 immutable flag there (skipped where chattr is unavailable)."""

    def __init__(self, accelerator, ckpt_root):
        self.root = ckpt_root

    def __enter__(self):
        if os.geteuid() != 0:
            self.root.chmod(0o555)
        elif subprocess.run(["chattr", "+i", str(self.root)], capture_output=True).returncode:
            pytest.skip("running as root without chattr: cannot make a read-only directory")

    def __exit__(self, *exc):
        if os.geteuid() != 0:
            self.root.chmod(0o755)
        else:
            subprocess.run(["chattr", "-i", str(self.root)], check=True)


@pytest.mark.parametrize("fault", [disk_full, read_only])
def test_failed_save_stops_cleanly_keeping_the_previous_checkpoint(tmp_path, monkeypatch, fault):
    fail_second_save(monkeypatch, fault)
    root = tmp_path / "checkpoints"
    with pytest.raises(ckpt.SaveError) as e:
        train_mod.train(config(4, "trainer.ckpt_every=2"), tmp_path)
    message = str(e.value)
    assert "step_0000004 not saved" in message and str(root / "step_0000002") in message
    expected = ["No space left"] if fault is disk_full else ["denied", "not permitted"]
    assert any(text in message for text in expected), message
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000002"]
    assert (root / "latest").read_text() == "step_0000002"
    assert verify(root / "step_0000002") is None


def test_on_save_error_continue_keeps_training_and_saves_later(tmp_path, monkeypatch, capsys):
    fail_second_save(monkeypatch, disk_full)
    cfg = config(6, "trainer.ckpt_every=2", "trainer.on_save_error=continue")
    assert train_mod.train(cfg, tmp_path).step == 6
    assert "not saved" in capsys.readouterr().out
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000002", "step_0000006"]


def test_a_disk_with_less_room_than_the_last_checkpoint_is_refused_before_writing(
    tmp_path, monkeypatch
):
    """A write that fails halfway through DeepSpeed's save could leave the other ranks waiting
    in a collective: the save is refused first when the last checkpoint would not fit."""
    last = tmp_path / "step_0000002"
    last.mkdir()
    (last / ckpt.TRAINER_STATE).write_text("{}")
    (last / "manifest.json").write_text(json.dumps(
        {"version": 1, "files": {"model.safetensors": {"size": 5 * 10**9, "sha256": "0" * 64}}}
    ))  # fmt: skip
    usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(p)._replace(free=4 * 10**9))
    assert "4.00 GB free, the last checkpoint took 5.00 GB" in ckpt._free_space_problem(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(p)._replace(free=6 * 10**9))
    assert ckpt._free_space_problem(tmp_path) is None


class full_as_writers_say:
    """A full disk as the writers really report it: safetensors raises SafetensorError, torch.save
    a RuntimeError naming no OS error (both seen on a full tmpfs), and no space is left."""

    ERRORS = {
        "safetensors": "Error while serializing: I/O error: No space left on device (os error 28)",
        "torch.save": "[enforce fail at inline_container.cc:672] . unexpected pos 2576 vs 2570",
    }

    def __init__(self, accelerator, ckpt_root, writer):
        self.acc, self.writer = accelerator, writer

    def __enter__(self):
        from safetensors import SafetensorError

        original, error = type(self.acc).save_state, self.ERRORS[self.writer]
        usage = shutil.disk_usage

        def save_state(output_dir, **kw):
            original(self.acc, output_dir, **kw)
            shutil.disk_usage = lambda path: usage(path)._replace(free=0)
            raise (SafetensorError if self.writer == "safetensors" else RuntimeError)(error)

        self.acc.save_state, self.usage = save_state, usage

    def __exit__(self, *exc):
        del self.acc.save_state
        shutil.disk_usage = self.usage


@pytest.mark.parametrize("writer", list(full_as_writers_say.ERRORS))
@pytest.mark.parametrize("on_error", ["stop", "continue"])
def test_a_full_disk_as_the_writers_report_it_is_a_save_error(
    tmp_path, monkeypatch, capsys, writer, on_error
):
    """It escaped as a traceback (exit 1, on_save_error=continue ignored) and left its
    half-written step_N.tmp filling the disk until the next save."""
    fail_second_save(monkeypatch, lambda acc, root: full_as_writers_say(acc, root, writer))
    root = tmp_path / "checkpoints"
    cfg = config(6, "trainer.ckpt_every=2", f"trainer.on_save_error={on_error}")
    if on_error == "stop":
        with pytest.raises(ckpt.SaveError) as e:
            train_mod.train(cfg, tmp_path)
        message = str(e.value)
        assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000002"]
    else:
        assert train_mod.train(cfg, tmp_path).step == 6
        message = capsys.readouterr().out
        assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000002", "step_0000006"]
    assert "step_0000004 not saved" in message and "the disk is full" in message, message
    assert full_as_writers_say.ERRORS[writer] in message


# --- 6. bad data -------------------------------------------------------------------------------

TOK = get_tokenizer("gpt2")
GOOD = "A perfectly ordinary document about the weather. " * 30


def loader(**kw):
    base = {"seq_len": 32, "tokenize_batch": 8, "pin_memory": False, "val_split": None}
    cfg = DataConfig(**{**base, **kw})
    it = iter(build_dataloader(cfg, TOK, split="train", batch_size=2))
    return [next(it) for _ in range(3)]


def test_corrupt_parquet_is_an_error_naming_the_file(tmp_path):
    bad = tmp_path / "part-1.parquet"
    bad.write_bytes(b"PAR1" + os.urandom(3000) + b"PAR1")
    with pytest.raises(DataError, match=f"data.files: {bad}: .*fix or remove"):
        loader(files=str(bad), val_docs=1)


def test_malformed_json_line_is_an_error_naming_file_and_line(tmp_path):
    rows = [json.dumps({"text": GOOD})] * 20 + ["{broken"]
    (tmp_path / "c.jsonl").write_text("\n".join(rows) + "\n")
    (tmp_path / "val.jsonl").write_text(json.dumps({"text": GOOD}) + "\n")
    with pytest.raises(DataError, match=r"c.jsonl: line 21 is not JSON"):
        loader(files=str(tmp_path / "c.jsonl"), val_files=str(tmp_path / "val.jsonl"))


def test_malformed_json_among_held_out_documents_is_named_too(tmp_path):
    """Read for validation before training (no data.val_files): it was a pyarrow traceback,
    exit 1, which job scripts requeue."""
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": GOOD}) + "\n{oops\n")
    with pytest.raises(DataError, match=r"data.files: .*c.jsonl: line 2 is not JSON"):
        loader(files=str(tmp_path / "c.jsonl"), val_docs=5)


def test_a_bad_validation_file_is_named_by_its_key(tmp_path):
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": GOOD}) + "\n")
    (tmp_path / "v.jsonl").write_text("{oops\n")
    cfg = DataConfig(
        seq_len=32, files=str(tmp_path / "c.jsonl"), val_files=str(tmp_path / "v.jsonl")
    )
    with pytest.raises(DataError, match=r"data.val_files: .*v.jsonl: line 1 is not JSON"):
        list(build_dataloader(cfg, TOK, split="val", batch_size=2))


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_empty_file_is_an_error_naming_it(tmp_path, suffix):
    (tmp_path / f"empty{suffix}").write_bytes(b"")
    with pytest.raises(DataError, match=f"empty{suffix} is empty"):
        loader(files=str(tmp_path / f"empty{suffix}"), val_docs=1)


def test_unreachable_hub_dataset_is_a_data_error_naming_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="no-such-user/no-such-dataset"):
        loader(path="no-such-user/no-such-dataset")


def test_shard_with_bad_header_is_an_error_naming_it(tmp_path):
    (tmp_path / "zero_train.bin").write_bytes(b"")
    with pytest.raises(DataError, match="zero_train.bin: not an llm.c token shard"):
        read_shard(tmp_path / "zero_train.bin")
    write_shard(tmp_path / "v9_train.bin", np.arange(100), 50257)
    data = bytearray((tmp_path / "v9_train.bin").read_bytes())
    data[4:8] = np.int32(9).tobytes()
    (tmp_path / "v9_train.bin").write_bytes(bytes(data))
    with pytest.raises(DataError, match="v9_train.bin: unsupported shard version 9"):
        read_shard(tmp_path / "v9_train.bin")


def test_empty_validation_split_fails_before_the_first_step(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "train.txt").write_text(GOOD * 20)
    (corpus / "val.txt").write_text("too short")
    cfg = config(3, "data=local", f"data.files={corpus}/train.txt")
    cfg.data.val_files = str(corpus / "val.txt")
    with pytest.raises(DataError, match="no validation window"):
        train_mod.train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# --- 8. no arbitrary unpickling --------------------------------------------------------------


class Payload:
    """Runs code when unpickled (what a tampered checkpoint would carry)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def tamper(ckpt_dir: Path, name: str, payload: object) -> None:
    """Replace a file and re-sign the manifest: an attacker controls the whole directory."""
    torch.save({"state": payload}, ckpt_dir / name)
    manifest = json.loads((ckpt_dir / "manifest.json").read_text())
    from llmtrain.integrity import sha256

    path = ckpt_dir / name
    manifest["files"][name] = {"size": path.stat().st_size, "sha256": sha256(path)}
    (ckpt_dir / "manifest.json").write_text(json.dumps(manifest))


# Accelerate loads the RNG file inside `except Exception`: its refusal was swallowed, and the
# run resumed without its RNG state and without a word.
@pytest.mark.parametrize("name", ["optimizer.bin", "random_states_0.pkl"])
def test_tampered_checkpoint_never_runs_code(two_checkpoints, tmp_path, name):
    run_dir = tmp_path / "run"
    shutil.copytree(two_checkpoints, run_dir)
    step = run_dir / "checkpoints" / "step_0000004"
    marker = tmp_path / "pwned"
    tamper(step, name, Payload(marker))
    assert verify(step) is None  # the manifest cannot help here

    # DeepSpeed's engine loads its shards like this (weights_only=False): inside safe_loading
    # the payload is refused; outside it, it runs.
    with safe_loading(step), pytest.raises(CheckpointError, match=name):
        torch.load(step / name, weights_only=False)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match=name):
        train_mod.train(config(5, "trainer.resume=auto"), run_dir)
    assert not marker.exists()
    torch.load(step / name, weights_only=False)  # the control: the payload is real
    assert marker.exists()


def test_dcp_metadata_is_checked_before_pickle_loads_it(tmp_path):
    import torch.distributed.checkpoint as dcp

    good = tmp_path / "good" / "pytorch_model_fsdp_0"
    dcp.save({"w": torch.ones(3), "step": 3}, checkpoint_id=str(good))
    check_pickle(good / ".metadata")
    with safe_loading(good.parent):
        pass

    bad = tmp_path / "bad" / "pytorch_model_fsdp_0"
    bad.mkdir(parents=True)
    marker = tmp_path / "pwned"
    (bad / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    refused = pytest.raises(CheckpointError, match=r"\.metadata.*builtins.exec")
    with refused, safe_loading(bad.parent):
        pass
    assert not marker.exists()


class ByGetattr:
    """Pickles as ``getattr(owner, name)``: how Python 3.11.2 (Debian 12's) pickles an Enum
    member, which DCP's .metadata and DeepSpeed's ZeRO files hold."""

    def __init__(self, owner, name: str):
        self.owner, self.name = owner, name

    def __reduce__(self):
        return (getattr, (self.owner, self.name))


def test_enum_members_pickled_by_getattr_load_and_nothing_else_does(tmp_path):
    """Every ZeRO and FSDP2 resume failed on Python 3.11.2: 'GLOBAL getattr was not an allowed
    global'. getattr is allowed for an allowlisted Enum's member only."""
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING

    ckpt = tmp_path / "step_0000001"
    (ckpt / "pytorch_model").mkdir(parents=True)
    shard = ckpt / "pytorch_model" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"stage": ByGetattr(ZeroStageEnum, "gradients")}, shard)
    with safe_loading(ckpt):
        assert torch.load(shard, weights_only=False)["stage"] is ZeroStageEnum.gradients
    torch.save({"x": ByGetattr(torch.Tensor, "add")}, shard)  # a method, not an Enum member
    with safe_loading(ckpt), pytest.raises(CheckpointError, match="not an Enum member"):
        torch.load(shard, weights_only=False)

    meta = tmp_path / "dcp" / ".metadata"
    meta.parent.mkdir()
    meta.write_bytes(pickle.dumps([ByGetattr(_MEM_FORMAT_ENCODING, "TORCH_CONTIGUOUS_FORMAT")]))
    check_pickle(meta)
    meta.write_bytes(pickle.dumps([ByGetattr(_MEM_FORMAT_ENCODING, "__class__")]))
    with pytest.raises(CheckpointError, match="not an Enum member"):
        check_pickle(meta)
