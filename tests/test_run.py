"""Setting a run up: the model the config builds, the checks before it starts, its logs."""

import os

import pytest
import torch
from tiny import TINY

from llmtrain.config import ConfigError, load_config
from llmtrain.run import build_model, compile_model

FAST = [*TINY, "trainer.max_steps=1"]


def test_build_model_applies_the_trainer_options():
    plain = build_model(load_config(FAST))
    assert not plain.activation_checkpointing and plain.lm_head.loss_chunk == 0
    cfg = load_config([*FAST, "trainer.activation_checkpointing=true", "trainer.loss_chunk=64"])
    model = build_model(cfg)
    assert model.activation_checkpointing and model.lm_head.loss_chunk == 64


def test_a_resume_builds_no_model_of_its_own(tmp_path, monkeypatch):
    """A resume initialised a model (rank 0's, which prepare() broadcasts) that its checkpoint
    then replaced: 4 bytes per parameter of host memory and the init's time at every requeue.
    It continues exactly as the uninterrupted run (test_reliability.py, test_dist.py)."""
    import psutil

    import llmtrain.run as run_mod
    from llmtrain.train import train

    wide = [*FAST, "model.n_embd=512", "model.n_head=8"]
    train(load_config(wide), tmp_path / "run")
    build, grew, rss = run_mod.build_model, [], psutil.Process().memory_info
    build(load_config(FAST), empty=True)  # torch's one-time costs, not counted

    def measured(*args, **kwargs):
        before = rss().rss
        model = build(*args, **kwargs)
        grew.append(rss().rss - before)
        return model

    monkeypatch.setattr(run_mod, "build_model", measured)
    resumed = load_config([*wide, "trainer.max_steps=2", "trainer.resume=auto"])
    assert train(resumed, tmp_path / "run").step == 2
    assert grew[0] < 0.05 * 4 * build(resumed).num_params(), grew


def test_compile_model_passes_the_mode(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: calls.append(kw) or model)
    model = build_model(load_config(FAST))
    for overrides, want in (
        ([], []),
        (["trainer.compile=true"], [{"mode": None}]),
        (
            ["trainer.compile=true", "trainer.compile_mode=max-autotune-no-cudagraphs"],
            [{"mode": "max-autotune-no-cudagraphs"}],
        ),
    ):
        calls.clear()
        cfg = load_config([*FAST, *overrides])
        assert compile_model(model, cfg.trainer) is model
        assert calls == want


def test_accelerate_s_per_file_save_logs_stay_off_the_console(caplog):
    """FSDP2 saves logged four INFO lines per checkpoint, at the scratch .tmp path."""
    import logging

    import llmtrain.run  # noqa: F401 -- installs the filters

    with caplog.at_level(logging.INFO):
        for name in ("accelerate.utils.fsdp_utils", "accelerate.checkpointing"):
            logging.getLogger(name).info("[RANK 0] Saving model to step_0000002.tmp/x")
        logging.getLogger("accelerate.utils.fsdp_utils").error("a real problem")
    assert [r.getMessage() for r in caplog.records] == ["a real problem"]


def test_a_second_run_in_a_locked_run_dir_waits_then_is_refused(tmp_path, monkeypatch, capsys):
    """Two runs in one dir wrote the same checkpoints; resume=auto read the other's half-saved
    step (FileNotFoundError: trainer_state.json). The lock goes with its process."""
    import functools
    import subprocess
    import sys
    import time

    import llmtrain.train as train_mod
    from llmtrain.run import LOCK, run_dir_lock

    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pathlib import Path\n"
         "from llmtrain.run import run_dir_lock\n"
         f"with run_dir_lock(Path({str(run_dir)!r})):\n"
         "    print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == "locked\n"
        start = time.monotonic()
        refused = pytest.raises(ConfigError, match=rf"another run \(pid {holder.pid} on ")
        with refused, run_dir_lock(run_dir, wait_s=1.0):
            pass
        assert 1.0 <= time.monotonic() - start < 10
        assert f"locked by pid {holder.pid}" in capsys.readouterr().err
        # train() takes it: refused before anything is built
        monkeypatch.setattr(train_mod, "run_dir_lock", functools.partial(run_dir_lock, wait_s=0))
        monkeypatch.setattr(train_mod, "setup", lambda *a: pytest.fail("set up"))
        with pytest.raises(ConfigError, match="is training in this run dir"):
            train_mod.train(load_config(["experiment=smoke"]), run_dir)
    finally:
        holder.kill()
        holder.wait()
    with run_dir_lock(run_dir, wait_s=0):  # the holder's end released it
        assert (run_dir / LOCK).read_text().startswith(f"pid {os.getpid()} on ")
