"""The training core end to end on CPU: smoke run, exact resume, accumulation, the CLI."""

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from tiny import TINY

import llmtrain.cli as cli_mod
from llmtrain.checkpoint import latest_checkpoint
from llmtrain.config import ConfigError, config_to_dict, load_config
from llmtrain.data import DataError
from llmtrain.sample import load_gpt
from llmtrain.signals import Preempted
from llmtrain.train import train

FAST = [
    *TINY,
    "trainer.batch_tokens=512",
    "trainer.eval_batches=2",
    "trainer.sample_every=0",
]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


def test_a_new_run_evaluates_before_its_first_step_and_a_resume_does_not(tmp_path, capsys):
    """nanoGPT and llm.c log the loss a run starts from; a fine-tune (init_from) needs it."""
    cfg = ["trainer.max_steps=2", "trainer.eval_every=2", "trainer.eval_at_start=true"]
    train(load_config([*FAST, *cfg]), tmp_path)
    assert [r["step"] for r in records(tmp_path) if "val_loss" in r] == [0, 2]
    assert capsys.readouterr().out.count("eval step 0:") == 1
    more = ["trainer.max_steps=3", "trainer.resume=auto"]
    train(load_config([*FAST, *cfg, *more]), tmp_path)
    assert [r["step"] for r in records(tmp_path) if "val_loss" in r] == [0, 2, 3]
    off = tmp_path / "off"
    train(load_config([*FAST, *cfg, "trainer.eval_at_start=false"]), off)
    assert [r["step"] for r in records(off) if "val_loss" in r] == [2]


def test_the_logger_gets_the_derived_numbers_with_the_config(tmp_path, monkeypatch):
    """W&B runs are grouped by what the plan derives, the process count and accumulation."""
    import llmtrain.run as run_mod

    seen = {}
    real = run_mod.build_logger
    monkeypatch.setattr(run_mod, "build_logger", lambda lg, d, config, *a, **k: (
        seen.update(config) or real(lg, d, config, *a, **k)))  # fmt: skip
    train(load_config([*FAST, "trainer.max_steps=1"]), tmp_path)
    assert seen["plan"]["world_size"] == 1 and seen["plan"]["grad_accum"] == 2
    assert seen["trainer"]["batch_tokens"] == 512 and "receipt" in seen


def test_smoke_run_learns_evaluates_checkpoints(tmp_path, capsys):
    cfg = load_config(
        [
            "experiment=smoke",
            "logger=none",
            "trainer.max_steps=40",
            "trainer.eval_every=20",
            "trainer.ckpt_every=20",
            "trainer.log_every=5",
            "trainer.sample_every=10",  # on its own schedule, not only at an evaluation
            "trainer.sample_tokens=8",
        ]
    )
    state = train(cfg, tmp_path)
    samples = [line for line in capsys.readouterr().out.splitlines() if line.startswith("sample")]
    assert [line.split(":")[0] for line in samples] == [
        f"sample step {s}" for s in (10, 20, 30, 40)
    ]
    assert state.step == 40 and state.tokens == 40 * cfg.trainer.batch_tokens
    train_loss = losses(tmp_path)
    first, last = train_loss[5], train_loss[40]
    assert first > 9.0 and last < first - 2.0, train_loss  # from ~ln(50257) = 10.8, clearly down
    evals = [r for r in records(tmp_path) if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 20, 40]  # 0: before the first step
    assert evals[0]["val_loss"] > 10.0 and evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.5
    for r in evals:
        assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]))
    for r in records(tmp_path):
        if "loss" in r:
            assert {
                "tokens",
                "ppl",
                "lr",
                "grad_norm",
                "tokens_per_s",
                "mfu",
                "peak_mem_gb",
                "data_wait",
            } <= set(r)
    ckpts = tmp_path / "checkpoints"
    assert latest_checkpoint(ckpts).name == "step_0000040"
    assert (ckpts / "latest").read_text() == "step_0000040"
    assert (tmp_path / "config.yaml").is_file()
    model, saved, _ = load_gpt(tmp_path)
    assert saved.model == cfg.model and not model.training


def run_steps(run_dir: Path, steps: int, extra: list[str], resume: str = "none") -> dict:
    cfg = load_config(
        FAST
        + [
            f"trainer.max_steps={steps}",
            "trainer.log_every=1",
            "trainer.eval_every=1000",
            "trainer.ckpt_every=1000",
            f"trainer.resume={resume}",
            *extra,
        ]
    )
    train(cfg, run_dir)
    return losses(run_dir)


@pytest.fixture
def local_text(tmp_path) -> Path:
    """A local .txt corpus (one document per file) built from the shipped sample's text."""
    import pyarrow.parquet as pq

    from llmtrain.data import SAMPLE_DIR

    texts = pq.read_table(sorted(SAMPLE_DIR.glob("data/train/*.parquet"))[0]).column("text")
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i, text in enumerate(texts.to_pylist()[:40]):
        (folder / f"doc{i:03d}.txt").write_text(text)
    return folder


@pytest.mark.parametrize("source", ["sample", "local-stride"])
def test_exact_resume_is_bitwise(tmp_path, source, request):
    extra = []
    if source == "local-stride":
        folder = request.getfixturevalue("local_text")
        extra = [
            "data=local",
            f"data.files={folder}/*.txt",
            "data.stride=48",
            "data.seq_len=64",
            "data.val_split=null",
            "data.val_docs=4",
        ]
    n = 3
    full = run_steps(tmp_path / "full", 2 * n, extra)
    part = tmp_path / "part"
    run_steps(part, n, extra)
    # A run stopped after n steps leaves a final checkpoint; resume=auto continues it to 2n.
    resumed = run_steps(part, 2 * n, extra, resume="auto")
    assert [resumed[s] for s in range(n + 1, 2 * n + 1)] == [
        full[s] for s in range(n + 1, 2 * n + 1)
    ]  # bitwise: exact floats, not approx
    logged = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == list(range(1, 2 * n + 1))


def test_the_first_line_after_a_resume_averages_the_same_steps(tmp_path):
    """Preempted at step 2 with trainer.log_every=4: the step-4 line after the resume averaged
    steps 3-4 only (8.51 against 8.15 uninterrupted, on the quickstart), in the console,
    metrics.jsonl and W&B."""
    import signal

    every = ["trainer.log_every=4", "trainer.ckpt_every=2", "trainer.eval_every=1000"]
    cfg = load_config([*FAST, "trainer.max_steps=6", *every])
    train(cfg, tmp_path / "full")

    def preempt_at_1(state, throughput):
        if state.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # the step after finishes, saves, stops

    part = tmp_path / "part"
    with pytest.raises(Preempted, match="after step 2") as e:
        train(cfg, part, step_hook=preempt_at_1)
    # the run dir is named: a default one is new and dated on every start (resume=auto alone
    # started over in it)
    assert f"add trainer.resume=auto hydra.run.dir={part} to the same command" in str(e.value)
    resumed = load_config([*FAST, "trainer.max_steps=6", *every, "trainer.resume=auto"])
    train(resumed, part)
    assert losses(part) == losses(tmp_path / "full")  # steps 4 and 6, bitwise
    assert sorted(losses(part)) == [4, 6]


def test_a_resume_with_another_accumulation_count_goes_on_training(tmp_path):
    """Saved at step 1 with 1 x 8 sequences per step, resumed with 2 x 4 (what a move to half
    the processes does too): Accelerate's restored micro-batch count put the gradient sync on
    the wrong micro-batch, every later optimizer step was skipped and the loss stood still;
    and the step-2 line, half from before the save, divided by the new accumulation count."""
    every = [
        "trainer.log_every=2",
        "trainer.ckpt_every=1",
        "trainer.keep_last=4",
        "trainer.eval_every=1000",
    ]
    common = [*FAST, "trainer.max_steps=4", *every, "data.shuffle=false"]
    train(load_config([*common, "trainer.micro_batch_size=8"]), tmp_path / "full")
    step_1 = tmp_path / "full" / "checkpoints" / "step_0000001"
    resumed = [*common, "trainer.micro_batch_size=4", f"trainer.resume={step_1}"]
    train(load_config(resumed), tmp_path / "resumed")
    full, got = losses(tmp_path / "full"), losses(tmp_path / "resumed")
    assert sorted(got) == [2, 4]
    for step in (2, 4):  # the same sums in another order: equal to float rounding
        assert got[step] == pytest.approx(full[step], rel=1e-5), step


def test_a_resume_trains_with_the_configs_optimizer_settings(tmp_path):
    """Like the lr, weight decay, betas and eps are the config's: the optimizer's
    load_state_dict put the saved run's back, so a new optim.weight_decay at a resume was
    written to config.yaml and W&B and never used."""
    base = [*FAST, "trainer.max_steps=1", "trainer.eval_every=1000"]
    train(load_config(base), tmp_path)
    changed = ["optim.weight_decay=0.5", "optim.beta1=0.5", "optim.eps=1e-3"]
    train(load_config([*base, "trainer.max_steps=2", "trainer.resume=auto", *changed]), tmp_path)
    saved = torch.load(tmp_path / "checkpoints" / "step_0000002" / "optimizer.bin")
    got = [(g["weight_decay"], g["betas"], g["eps"]) for g in saved["param_groups"]]
    assert got == [(0.5, (0.5, 0.95), 1e-3), (0.0, (0.5, 0.95), 1e-3)]  # decay, no-decay group
    # AdamW's moments went on from the checkpoint's (two steps, not one from a fresh start).
    assert {int(s["step"]) for s in saved["state"].values()} == {2}


def test_skipped_documents_are_reported_at_each_evaluation(tmp_path, local_text, capsys):
    """Counted since the start, but shown nowhere while training."""
    (local_text / "doc038.txt").write_text("")
    (local_text / "doc039.txt").write_bytes(b"\xff\xfe bad bytes " * 50)
    local = ["data=local", f"data.files={local_text}/*.txt", "data.val_split=null"]
    cfg = load_config([*FAST, *local, "data.val_docs=4", "trainer.max_steps=2"])
    train(cfg, tmp_path)
    (last,) = [r for r in records(tmp_path) if "val_loss" in r]
    assert (last["docs_empty"], last["docs_undecodable"]) == (1, 1)
    assert last["docs_used"] > 0 and last["docs_heldout"] == 4
    assert "skipped so far: 1 empty, 1 undecodable" in capsys.readouterr().out


def test_a_new_epoch_is_logged_and_said_once(tmp_path, capsys):
    """A corpus shorter than the run is read again: each record carries the epoch, and the
    console says when a new one begins (a resume into it does not say it again)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):  # about 300 tokens each; one is held out for validation
        (corpus / f"doc{i}.txt").write_text(f"Document {i} is short. " * 60)
    local = ["data=local", f"data.files={corpus}/*.txt", "data.val_split=null", "data.val_docs=1"]
    every = [*FAST, *local, "trainer.log_every=1", "trainer.eval_every=1000"]
    run = tmp_path / "run"
    train(load_config([*every, "trainer.max_steps=4"]), run)
    first = capsys.readouterr().out
    train(load_config([*every, "trainer.max_steps=6", "trainer.resume=auto"]), run)
    epochs = [r["epoch"] for r in records(run) if "loss" in r]
    assert epochs[0] == 1 and epochs == sorted(epochs) and epochs[-1] >= 3
    said = first + capsys.readouterr().out
    for epoch in range(2, epochs[-1] + 1):
        step = epochs.index(epoch) + 1
        assert said.count(f"data: epoch {epoch} by step {step}: the training data ran out") == 1
    assert "is read again, reshuffled" in said  # three files: their order changes
    assert said.count("data: epoch") == epochs[-1] - 1


def test_resume_auto_says_when_it_finds_nothing_to_resume(tmp_path, capsys):
    """A mistyped hydra.run.dir with trainer.resume=auto started from step 0 without a word."""
    train(load_config([*FAST, "trainer.max_steps=1", "trainer.resume=auto"]), tmp_path / "typo")
    assert "resume     auto: no checkpoint in" in capsys.readouterr().out


def test_a_token_horizon_is_kept_when_a_resume_changes_the_batch(tmp_path):
    horizon = [*FAST, "trainer.max_steps=null", "trainer.max_tokens=2048", "trainer.log_every=1"]
    train(load_config([*horizon, "trainer.eval_every=1000"]), tmp_path)  # 4 steps of 512
    more = ["trainer.max_tokens=4096", "trainer.batch_tokens=1024", "trainer.resume=auto"]
    train(load_config([*horizon, *more]), tmp_path)  # 2 steps of 1,024
    logged = [(r["step"], r["tokens"]) for r in records(tmp_path) if "loss" in r]
    assert logged[-3:] == [(4, 2048), (5, 3072), (6, 4096)]


def test_a_second_phase_reads_its_corpus_from_the_start(tmp_path, local_text, capsys):
    """A corpus that moved goes on at its saved position, and the resume says so; another
    corpus is refused (its documents differ) unless trainer.resume_data=false, which reads the
    new data from its start (here also at another context length, which a saved position
    would refuse)."""
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(local_text, moved)
    local = ["data=local", "data.val_split=null", "data.val_docs=2", "trainer.eval_every=1000"]
    run = tmp_path / "run"
    train(
        load_config([*FAST, *local, f"data.files={local_text}/doc00*.txt", "trainer.max_steps=2"]),
        run,
    )
    on = [*FAST, *local, "trainer.resume=auto"]
    train(load_config([*on, f"data.files={moved}/doc00*.txt", "trainer.max_steps=3"]), run)
    assert "data.files" in capsys.readouterr().out.split("goes on in it")[0]
    other = [*on, f"data.files={local_text}/doc01*.txt", "trainer.max_steps=4"]
    with pytest.raises(DataError, match="saved with the files data.files matches=10 files"):
        train(load_config(other), run)
    train(load_config([*other, "trainer.resume_data=false", "data.seq_len=32"]), run)
    assert "data       read from its start (trainer.resume_data=false)" in capsys.readouterr().out
    data = torch.load(run / "checkpoints" / "step_0000004" / "data_state_0.pt")
    assert data["windows"] == 512 // 32  # one step's windows: the position started over


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    common = [
        "trainer.max_steps=1",
        "trainer.log_every=1",
        "trainer.eval_every=1000",
        "data.shuffle=false",
        "optim.warmup_steps=0",
    ]
    cfg_a = load_config(FAST + common + ["trainer.micro_batch_size=2"])  # 4 x 2 sequences
    cfg_b = load_config(FAST + common + ["trainer.micro_batch_size=8"])  # 1 x 8 sequences
    train(cfg_a, tmp_path / "a")
    train(cfg_b, tmp_path / "b")
    first = {k: records(tmp_path / k)[0] for k in "ab"}
    assert first["a"]["loss"] == pytest.approx(first["b"]["loss"], rel=1e-6)
    # The accumulated gradient equals the big batch's (its norm is logged before clipping).
    assert first["a"]["grad_norm"] == pytest.approx(first["b"]["grad_norm"], rel=1e-5)
    assert_same_weights(tmp_path / "a", tmp_path / "b")


def assert_same_weights(run_a: Path, run_b: Path) -> None:
    """The final checkpoints agree. One AdamW step moves a weight by about lr = 3e-3; fp32
    summation order may flip the direction of a handful of near-zero gradients' updates by
    ~1e-6, nothing near lr."""
    model_a, _, _ = load_gpt(run_a)
    model_b, _, _ = load_gpt(run_b)
    for (name, pa), pb in zip(
        model_a.state_dict().items(), model_b.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-5, msg=name)


def test_speed_options_train_the_same_model(tmp_path):
    """The issue-6 switches change how a step runs, not what it computes: the fused chunked
    loss, a pinned attention kernel and zeroed (not freed) gradients give the plain run's
    losses, gradient norms and weights."""
    common = ["trainer.max_steps=3", "trainer.log_every=1", "trainer.eval_every=1000"]
    fast = ["trainer.loss_chunk=100", "trainer.attention=math", "trainer.set_to_none=false"]
    train(load_config(FAST + common), tmp_path / "plain")
    train(load_config(FAST + common + fast), tmp_path / "fast")
    plain, fast_ = records(tmp_path / "plain"), records(tmp_path / "fast")
    for a, b in zip(plain, fast_, strict=True):
        for key in ("loss", "grad_norm", "val_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5), (key, a["step"])
    assert_same_weights(tmp_path / "plain", tmp_path / "fast")


def test_resume_refuses_another_model_shape(tmp_path):
    run_steps(tmp_path, 1, [])
    with pytest.raises(ConfigError, match="model.n_layer"):
        run_steps(tmp_path, 2, ["model.n_layer=3"], resume="auto")


def cli(args: list[str], cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "llmtrain.train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cli_trains_with_wandb_offline_and_a_resume_logs_to_the_same_run(tmp_path):
    run_dir = tmp_path / "run"
    args = FAST + ["logger=wandb", "logger.mode=offline", "trainer.log_every=1"]
    out = cli([*args, "trainer.max_steps=2", f"hydra.run.dir={run_dir}"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "tokens/step" in out.stdout and "step      2/2" in out.stdout
    assert (run_dir / "checkpoints" / "step_0000002").is_dir()
    assert not (run_dir / "train.log").exists()  # Hydra's log file stayed empty: not written
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    assert [p.name.endswith(run_id) for p in (run_dir / "wandb").glob("offline-run-*")] == [True]

    out = cli(
        [*args, "trainer.max_steps=3", "trainer.resume=auto", f"hydra.run.dir={run_dir}"], tmp_path
    )
    assert out.returncode == 0, out.stderr[-3000:]
    # One W&B run across the restart: each attempt's offline dir carries the same run id, and
    # `wandb sync` uploads them in order into that one run.
    attempts = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(attempts) == 2 and all(run_id in p.name for p in attempts)
    assert (run_dir / "wandb_run_id").read_text().strip() == run_id


def test_cli_bad_config_fails_fast_naming_the_key(tmp_path):
    out = cli(["experiment=smoke", "trainer.batch_tokens=1000"], tmp_path, timeout=60)
    assert out.returncode == 2
    assert "trainer.batch_tokens" in out.stderr
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("*.jsonl"))


@pytest.mark.parametrize(
    "override, says",
    [
        ("trainer.max_step=10", "Did you mean trainer.max_steps?"),  # Hydra's own check
        ("+trainer.max_step=10", "did you mean trainer.max_steps?"),  # '+' got past Hydra
        ("model=gpt2small", "gpt2-small"),  # the options are listed
        ("trainer.max_steps=abc", "trainer.max_steps"),
        ("hydra.run.dir=runs/lr=3e-4", "hydra.run.dir=runs/lr=3e-4: mismatched input '='"),
    ],
)
def test_cli_a_misspelt_key_exits_2_so_job_scripts_do_not_requeue_it(tmp_path, override, says):
    """Errors Hydra finds while composing used to exit 1, the code of a crash, which the sbatch
    scripts requeue; and Hydra's advice for a typo (use '+key=...') trained without the key."""
    exit_file = tmp_path / "exit"
    env = {**os.environ, "LLMTRAIN_EXIT_FILE": str(exit_file)}
    out = subprocess.run(
        [sys.executable, "-m", "llmtrain.train", "experiment=smoke", override],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2 and exit_file.read_text().strip() == "2"
    assert says in out.stderr and "To append" not in out.stderr
    assert not (tmp_path / "runs").exists()


def test_an_fp16_overflow_is_skipped_and_lowers_the_loss_scale():
    """GradScaler expects an overflow now and then (its scale doubles every 2000 good steps).
    Skipping that step without telling the scaler made the next step's unscale_ raise."""
    from types import SimpleNamespace

    from llmtrain.checkpoint import TrainerState
    from llmtrain.train import skip_step

    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    run = SimpleNamespace(
        state=TrainerState(), optimizer=optimizer, accelerator=SimpleNamespace(scaler=scaler),
        cfg=load_config(["experiment=smoke"]), say=lambda text: None, ckpt_root=Path("."),
    )  # fmt: skip
    for overflow in (True, False):
        scaler.scale(model(torch.ones(2, 4)).sum()).backward()
        if overflow:
            model.weight.grad[0, 0] = float("inf")
        scaler.unscale_(optimizer)  # what accelerator.clip_grad_norm_ does under fp16
        if overflow:
            skip_step(run)
        else:
            scaler.step(optimizer)
            scaler.update()
    assert scaler.get_scale() == 2.0**15 and run.state.skipped_steps == 1


@pytest.mark.parametrize("error, code", [("Diverged", 2), ("SaveError", 1), ("Preempted", 75)])
def test_how_a_run_stops_decides_whether_job_scripts_requeue_it(tmp_path, monkeypatch, error, code):
    """A diverged run diverges again from the same checkpoint: 2, never requeued (it was 1)."""
    import llmtrain.checkpoint as ckpt
    import llmtrain.signals

    def stop(cfg, run_dir):
        raise getattr(ckpt, error, None) or getattr(llmtrain.signals, error)("stopped")

    monkeypatch.setattr(cli_mod, "train", stop)
    monkeypatch.setattr(cli_mod.os, "_exit", sys.exit)  # 75 leaves with os._exit
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["llmtrain-train", "experiment=smoke", "hydra.run.dir=r"])
    monkeypatch.setenv("LLMTRAIN_EXIT_FILE", str(tmp_path / "exit"))
    with pytest.raises(SystemExit) as e:
        cli_mod.main()
    assert e.value.code == code and (tmp_path / "exit").read_text().strip() == str(code)


def test_a_loss_that_reaches_no_parameter_stops_at_the_first_step(tmp_path, monkeypatch):
    """All-zero gradients at step 1 (a compiled fused loss on torch 2.11 gave them: an H100 bench
    of gpt2-small trained 15 steps without changing a weight) stop the run, exit 2, naming it."""
    import llmtrain.model as model_mod
    import llmtrain.train as train_mod

    forward = model_mod.GPT.forward

    def detached(self, *args, **kwargs):
        logits, loss = forward(self, *args, **kwargs)
        return logits, loss.detach().requires_grad_()

    monkeypatch.setattr(model_mod.GPT, "forward", detached)
    with pytest.raises(train_mod.NoGradient, match="step 1: every gradient is zero"):
        run_steps(tmp_path / "run", 3, [])
    assert latest_checkpoint(tmp_path / "run" / "checkpoints") is None
    monkeypatch.setattr(cli_mod, "train", lambda cfg, run_dir: (_ for _ in ()).throw(
        train_mod.NoGradient("zero")))  # fmt: skip
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["llmtrain-train", "experiment=smoke", "hydra.run.dir=r"])
    with pytest.raises(SystemExit) as e:
        cli_mod.main()
    assert e.value.code == 2


def test_cli_help_lists_the_groups_a_user_picks_from(tmp_path):
    out = cli(["--help"], tmp_path, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("llmtrain-train: pretrain a GPT-style model")
    groups = out.stdout.split("== Configuration groups ==")[1].split("== Config ==")[0]
    assert "model: gpt2-large, gpt2-medium, gpt2-small," in groups
    assert "_schema" not in groups  # the schemas are types, not options


def test_cli_help_with_a_bad_override_says_which_in_one_line(tmp_path):
    """It printed Hydra's traceback and exited 1, like a crash."""
    out = cli(["--help", "experiment=smoke", "trainer.max_stepz=1"], tmp_path, timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "Did you mean trainer.max_steps?" in out.stderr


def test_cli_help_for_a_sweep_shows_its_first_job(tmp_path):
    """Hydra's help printed an "ambiguous value" traceback for a swept override."""
    out = cli(["--help", "-m", "experiment=smoke", "optim.lr=1e-3,2e-3"], tmp_path, timeout=60)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stdout.startswith("(the sweep's first job: experiment=smoke optim.lr=0.001)")
    assert re.search(r"\n  lr: 0.001 +# the peak learning rate", out.stdout)


@pytest.mark.parametrize(
    "flag", [["--config-dir"], ["-cd"], []], ids=["--config-dir DIR", "-cd DIR", "--config-dir=DIR"]
)
def test_cli_help_composes_with_a_config_dir_of_ones_own(tmp_path, flag):
    """--help took the folder after --config-dir (-cd) for an override ("Error parsing override"),
    and with --config-dir=DIR composed without it ("Could not find 'experiment/mine'"); a run
    with a config dir skipped the checks, so a typo exited 1 (requeued, like a crash), not 2."""
    mine = tmp_path / "myconf"
    (mine / "experiment").mkdir(parents=True)
    (mine / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /model: gpt2-small\nexperiment: mine\n"
    )
    where = [*flag, str(mine)] if flag else [f"--config-dir={mine}"]
    out = cli([*where, "--help", "experiment=mine"], tmp_path, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "\n  name: gpt2-small " in out.stdout and "\nexperiment: mine " in out.stdout
    typo = cli([*where, "experiment=mine", "model.n_layr=3"], tmp_path, timeout=60)
    assert typo.returncode == 2 and "Did you mean model.n_layer?" in typo.stderr  # Hydra's: 1


def test_cli_help_says_what_each_setting_means(tmp_path):
    """The composed config, overrides applied, with config.py's comment beside each setting (or
    above it, for a longer one); still YAML that reads back as the config."""
    out = cli(["--help", "experiment=smoke", "trainer.max_time=2h"], tmp_path, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    shown = out.stdout.split("== Config ==")[1].split("\n", 2)[2].split("\n\n")[0]
    lines = shown.splitlines()
    assert any(re.fullmatch(r"  seed: 1337 +# model init, data order and shuffling, samples", x)
               for x in lines)  # fmt: skip
    at = lines.index("  max_time: 2h")
    assert lines[at - 3].startswith("  # Wall-clock budget of this process's training")
    assert yaml.safe_load(shown) == config_to_dict(
        load_config(["experiment=smoke", "trainer.max_time=2h"])
    )
    # a setting without a comment is one whose name says it all
    bare = [
        x.split(":")[0].strip()
        for x, before in zip(lines[1:], lines[:-1], strict=True)
        if x.startswith("  ") and "#" not in x and not before.lstrip().startswith("#")
    ]
    assert bare == ["norm_eps", "beta2"], bare


def test_an_error_every_rank_meets_is_printed_once(monkeypatch, capsys):
    """On two processes each config error and preemption message was printed twice; an error
    of one rank's own (its data, its disk) is still printed by that rank, naming it."""
    from llmtrain.data import DataError

    monkeypatch.setenv("RANK", "1")
    for error, printed in ((ConfigError("bad key"), ""), (DataError("bad file"), "(rank 1)")):
        with pytest.raises(SystemExit):
            cli_mod._exit(2, "error", error)
        err = capsys.readouterr().err
        assert (printed in err) if printed else err == ""
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit):
        cli_mod._exit(2, "config error", ConfigError("bad key"))
    assert capsys.readouterr().err == "llmtrain: config error: bad key\n"


def test_ctrl_c_says_what_it_does_and_a_second_one_leaves_without_a_traceback(
    tmp_path, monkeypatch, capfd
):
    """The first Ctrl-C printed nothing until the step ended; the second, a 40-line
    KeyboardInterrupt traceback."""
    import signal

    from llmtrain.signals import Preemption

    previous = signal.getsignal(signal.SIGINT)
    try:
        Preemption()._handle(signal.SIGINT, None)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert "stopping after this step with a checkpoint; Ctrl-C again" in capfd.readouterr().err

    def interrupted(cfg, run_dir):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_mod, "train", interrupted)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["llmtrain-train", "experiment=smoke", "hydra.run.dir=r"])
    with pytest.raises(SystemExit) as e:
        cli_mod.main()
    err = capfd.readouterr().err
    assert e.value.code == 130 and "llmtrain: interrupted: stopped at once, unsaved" in err
    assert "no checkpoint was written yet" in err and "Traceback" not in err


def test_a_sweep_goes_on_after_one_of_its_jobs_stops(tmp_path, monkeypatch, capsys):
    """`-m optim.lr=1e30,3e-4`: the first job diverged, exited 2, and the second never ran."""
    import llmtrain.checkpoint as ckpt

    lrs = []

    def train(cfg, run_dir):
        lrs.append(cfg.optim.lr)
        if cfg.optim.lr > 1:
            raise ckpt.Diverged("5 consecutive non-finite steps")

    monkeypatch.setattr(cli_mod, "train", train)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        sys, "argv", ["llmtrain-train", "-m", "experiment=smoke", "optim.lr=1e30,3e-4"]
    )
    monkeypatch.setenv("LLMTRAIN_EXIT_FILE", str(tmp_path / "exit"))
    with pytest.raises(SystemExit) as e:
        cli_mod.main()
    assert lrs == [1e30, 3e-4]
    assert e.value.code == 2 and (tmp_path / "exit").read_text().strip() == "2"
    assert "1 of the sweep's 2 jobs" in capsys.readouterr().err


def test_a_stopped_sweep_job_says_to_run_the_sweep_again(tmp_path, monkeypatch, capsys):
    """-m ignores hydra.run.dir: the advice to add it went nowhere (a new dated sweep dir, every
    job from step 0). The same sweep with trainer.resume=auto in its sweep dir goes on."""
    import llmtrain.checkpoint as ckpt
    import llmtrain.train as train_mod
    from llmtrain.timelimit import deadline

    def train(cfg, run_dir):
        saved = run_dir / "checkpoints" / "step_0000001"
        raise train_mod.OutOfTime("stopped; " + ckpt.go_on_from(saved, run_dir), deadline("1h"))

    monkeypatch.setattr(cli_mod, "train", train)
    monkeypatch.setattr(cli_mod.os, "_exit", sys.exit)  # the sweep's 75 leaves with os._exit
    monkeypatch.chdir(tmp_path)
    argv = ["llmtrain-train", "-m", "experiment=smoke", "trainer.max_time=1h", "hydra.sweep.dir=sw"]
    monkeypatch.setattr(sys, "argv", [*argv, "optim.lr=1e-3,3e-4"])
    with pytest.raises(SystemExit):
        cli_mod.main()
    err = capsys.readouterr().err
    again = "run the same sweep (-m) again with trainer.resume=auto hydra.sweep.dir=sw "
    assert err.count(again) == 2
    assert "hydra.run.dir" not in err


@pytest.mark.parametrize(("max_time", "slurm_end", "ran"), [("1h", None, 2), ("1h", 600, 1)])
def test_a_sweep_goes_on_after_max_time_stops_a_job(
    tmp_path, monkeypatch, capsys, max_time, slurm_end, ran
):
    """trainer.max_time is each job's budget: its stop (exit 75) ended the whole sweep at once,
    and the jobs after it never ran. A signal, or the Slurm job's end, still ends it."""
    import llmtrain.train as train_mod
    from llmtrain.timelimit import deadline

    lrs = []

    def train(cfg, run_dir):
        lrs.append(cfg.optim.lr)
        raise train_mod.OutOfTime("stopped before the time limit", deadline(max_time))

    class ExitNow(BaseException):  # os._exit's, which would end pytest too
        pass

    def exit_now(code):
        raise ExitNow(code)

    monkeypatch.setattr(cli_mod, "train", train)
    monkeypatch.setattr(cli_mod.os, "_exit", exit_now)
    if slurm_end:  # in 10 minutes: the job's end is the earlier deadline
        monkeypatch.setenv("SLURM_JOB_END_TIME", str(int(time.time()) + slurm_end))
    monkeypatch.chdir(tmp_path)
    argv = ["llmtrain-train", "-m", "experiment=smoke", f"trainer.max_time={max_time}"]
    monkeypatch.setattr(sys, "argv", [*argv, "optim.lr=1e-3,3e-4"])
    with pytest.raises((SystemExit, ExitNow)) as e:
        cli_mod.main()
    assert len(lrs) == ran and e.value.args[0] == 75
    assert "llmtrain: out of time: stopped before the time limit" in capsys.readouterr().err


def test_a_sweep_under_a_launcher_is_refused(tmp_path, monkeypatch, capsys):
    """Every job after the first crashed: the first one's end_training() ends the launcher's
    process group ("Default process group has not been initialized")."""

    monkeypatch.setattr(cli_mod, "train", lambda cfg, run_dir: pytest.fail("trained"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(
        sys, "argv", ["llmtrain-train", "-m", "experiment=smoke", "dist=ddp", "optim.lr=1e-3,3e-4"]
    )
    with pytest.raises(SystemExit) as e:
        cli_mod.main()
    assert e.value.code == 2 and "-m/--multirun" in capsys.readouterr().err


def test_the_override_check_sees_what_hydra_will_run(tmp_path, capsys):
    """The pre-check that makes a typo exit 2 dropped hydra.searchpath (the user's own configs:
    'Could not find experiment/mine'), composed a hydra.mode=MULTIRUN sweep as one run ('add
    --multirun'), and skipped -m sweeps (a typo there got Hydra's exit 1 and its '+key' advice)."""
    from llmtrain.cli import _check_overrides

    mine = tmp_path / "myconf" / "experiment"
    mine.mkdir(parents=True)
    (mine / "mine.yaml").write_text("# @package _global_\ndefaults:\n  - smoke\n")
    _check_overrides([f"hydra.searchpath=[file://{tmp_path / 'myconf'}]", "experiment=mine"])
    _check_overrides(["hydra.mode=MULTIRUN", "optim.lr=1e-3,3e-3", "experiment=smoke"], True)
    _check_overrides(["-m", "optim.lr=range(1,3)", "experiment=smoke"], sweep=True)
    a_file = tmp_path / "a_file"
    a_file.touch()
    for args, sweep in (
        (["-m", "experiment=smoke", "trainer.max_step=5"], True),
        (["optim.lr=1e-3,3e-3", "experiment=smoke"], False),  # no sweep asked for: Hydra refuses
        (["-m", "experiment=smoke", "optim.lr=1e-3,-1"], True),  # its second job: after a run
        ([f"hydra.run.dir={a_file}/run", "experiment=smoke"], False),  # Hydra's mkdir traceback
        (["-m", f"hydra.sweep.dir={a_file}", "experiment=smoke"], True),
    ):
        with pytest.raises(SystemExit) as e:
            _check_overrides(args, sweep)
        assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Did you mean trainer.max_steps?" in err and "--multirun" in err
    assert "(in the sweep's job with experiment=smoke optim.lr=-1)" in err
    assert f"hydra.run.dir={a_file}/run: {a_file} is a file, not a directory" in err
    assert f"hydra.sweep.dir={a_file}: {a_file} is a file" in err


def test_a_run_refused_before_it_wrote_anything_leaves_no_run_dir(tmp_path, monkeypatch):

    monkeypatch.chdir(tmp_path)
    args = ["llmtrain-train", "experiment=smoke", "data=local", "data.files=none.txt"]
    monkeypatch.setattr(sys, "argv", [*args, "hydra.run.dir=runs/refused"])
    with pytest.raises(SystemExit) as e:
        cli_mod.main()
    assert e.value.code == 2 and (tmp_path / "runs").is_dir()
    assert not (tmp_path / "runs" / "refused").exists()  # Hydra made it; nothing went in
    # Hydra's default dir, runs/<date>/<time>: the dated dir above it goes too.
    monkeypatch.setattr(sys, "argv", args)
    with pytest.raises(SystemExit) as e:
        cli_mod.main()
    assert e.value.code == 2 and list((tmp_path / "runs").iterdir()) == []
