"""The plan (the numbers derived from the config), the startup report and its notes."""

import pytest
from tiny import TINY

from llmtrain.config import load_config
from llmtrain.optim import lr_at
from llmtrain.startup import Plan, horizon_notes, plan_notes, startup_report


@pytest.mark.parametrize(
    ("overrides", "world", "accum", "steps"),
    [
        # 4 sequences x 64 tokens = 256 tokens per micro-batch and process
        (["trainer.batch_tokens=1024", "trainer.max_steps=7"], 1, 4, 7),
        (["trainer.batch_tokens=1024", "trainer.max_steps=7"], 2, 2, 7),
        (
            ["trainer.batch_tokens=1024", "trainer.max_steps=null", "trainer.max_tokens=10000"],
            1,
            4,
            10,
        ),
        (
            ["trainer.batch_tokens=512", "trainer.max_steps=null", "trainer.max_tokens=1024"],
            2,
            1,
            2,
        ),
    ],
)
def test_plan_derives_accumulation_and_horizon_from_tokens(overrides, world, accum, steps):
    """Batch and horizon are given in tokens; accumulation = batch tokens / (micro-batch x
    context length x processes), and a token horizon rounds up to whole steps."""
    cfg = load_config([*TINY, *overrides], world_size=world)
    plan = Plan.from_config(cfg, world)
    assert (plan.micro_batch, plan.seq_len, plan.world_size) == (4, 64, world)
    assert plan.grad_accum == accum
    assert plan.tokens_per_step == plan.micro_batch * plan.seq_len * accum * world
    assert plan.max_steps == steps


def test_startup_report_prints_the_derived_numbers(tmp_path):
    cfg = load_config([*TINY, "trainer.batch_tokens=1024", "trainer.max_steps=7"])
    text = startup_report(cfg, Plan.from_config(cfg, 1), "1.2M params", tmp_path, "cpu")
    assert f"run dir {tmp_path}" in text
    assert "4 seq x 64 tok x 4 accum x 1 proc = 1,024 tokens/step" in text
    assert "7 steps = 7,168 tokens" in text
    assert "device cpu, dist single" in text
    offload = load_config(["experiment=smoke", "dist=zero3-offload"])
    text = startup_report(offload, Plan.from_config(offload, 2), "1.2M", tmp_path, "cpu:0")
    assert "device cpu, dist zero3 (offload optimizer to CPU)" in text


def resumed_at(cfg, step: int) -> Plan:
    return Plan.from_config(cfg, 1).resumed(cfg, step, step * cfg.trainer.batch_tokens)


def test_a_resume_says_when_it_has_nothing_to_do_or_moves_the_schedule_end():
    saved = load_config(["experiment=smoke"])  # 100 steps
    longer = load_config(["experiment=smoke", "trainer.max_steps=300"])
    assert horizon_notes(saved, resumed_at(saved, 60), saved) == []
    (note,) = horizon_notes(saved, resumed_at(saved, 100), saved)
    assert "nothing to train: the checkpoint is at step 100 and the horizon is 100" in note
    (note,) = horizon_notes(longer, resumed_at(longer, 60), saved)
    assert "cosine lr schedule now ends at step 300, not 100" in note
    # a finished decay extended: the lr goes back up, and the note says from what to what
    (note,) = horizon_notes(longer, resumed_at(longer, 100), saved)
    was, now = lr_at(99, saved.optim, 100), lr_at(100, longer.optim, 300)
    assert f"the lr goes from {was:.2e} at step 100 to {now:.2e} at step 101" in note
    assert f"({now / was:.3g}x)" in note and now / was > 4
    flat = load_config(["experiment=smoke", "trainer.max_steps=300", "optim.schedule=constant"])
    assert horizon_notes(flat, resumed_at(flat, 60), saved) == []


def test_a_token_horizon_counts_tokens_trained_at_another_batch_size():
    """trainer.max_tokens=4096 at 512 tokens/step, resumed at step 4 (2,048 tokens) with
    another trainer.batch_tokens: it said 'nothing to train' at 1,024 and trained to 5,120
    tokens at 256 (the steps were counted as if all had this run's size)."""
    tiny = ["experiment=smoke", "data.seq_len=64", "trainer.micro_batch_size=4"]
    horizon = ["trainer.max_steps=null", "trainer.max_tokens=4096"]
    for batch, steps in ((256, 4 + 8), (512, 8), (1024, 4 + 2)):
        cfg = load_config([*tiny, *horizon, f"trainer.batch_tokens={batch}"])
        plan = Plan.from_config(cfg, 1).resumed(cfg, 4, 2048)
        assert (plan.max_steps, plan.total_tokens) == (steps, 4096), batch
    by_steps = load_config([*tiny, "trainer.max_steps=10", "trainer.batch_tokens=1024"])
    assert Plan.from_config(by_steps, 1).resumed(by_steps, 4, 2048).max_steps == 10


def test_the_plan_notes_a_rounded_token_budget_and_a_warmup_past_the_horizon():
    def notes(*overrides):
        cfg = load_config(["experiment=smoke", *overrides])
        return plan_notes(cfg, Plan.from_config(cfg, 1))

    assert notes() == []  # 100 steps, 10 warmup
    (note,) = notes("trainer.max_steps=null", "trainer.max_tokens=20000")  # 1,024-token steps
    assert "trainer.max_tokens=20,000 is not a whole number" in note and "trains 20 steps" in note
    assert notes("trainer.max_steps=null", "trainer.max_tokens=20480") == []
    (note,) = notes("trainer.max_steps=4")
    assert "optim.warmup_steps=10 is longer than the 4-step horizon" in note
    assert "the lr ends at 1.20e-03, still warming up to optim.lr=3.00e-03" in note
    assert notes("trainer.max_steps=10") == []  # warmup's last step is the run's: at the peak
    # settings a dist mode does not use are said, not silently dropped
    (note,) = notes("trainer.max_steps=10", "dist=zero2", "dist.offload_optimizer=true",
                    "optim.fused=true")  # fmt: skip
    assert "optim.fused=True is not used: with dist.offload_optimizer" in note
    (note,) = notes("trainer.max_steps=10", "dist=zero2", "dist.reshard_after_forward=false")
    assert "dist.reshard_after_forward=false is not used" in note and "zero2 keeps" in note
    assert notes("trainer.max_steps=10", "dist=fsdp2", "dist.reshard_after_forward=false") == []
    # a schedule's own settings under another schedule
    (note,) = notes("optim.decay_fraction=0.1")
    assert "optim.decay_fraction=0.1 is not used" in note and "this one is cosine" in note
    assert notes("optim=adamw-wsd", "optim.decay_fraction=0.1") == []
    (note,) = notes("optim.schedule=constant", "optim.min_lr_ratio=0.5")
    assert "optim.min_lr_ratio=0.5 is not used: a constant schedule never decays" in note
