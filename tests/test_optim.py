import math

import pytest

from llmtrain.config import ModelConfig, OptimConfig
from llmtrain.model import GPT
from llmtrain.optim import build_optimizer, lr_at, set_lr


def test_cosine_schedule_hand_computed():
    cfg = OptimConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    cos = lambda progress: 1e-4 + 0.5 * (1 + math.cos(math.pi * progress)) * 9e-4  # noqa: E731
    assert lr_at(0, cfg, 110) == pytest.approx(1e-4)  # (0 + 1) / 10 of the peak
    assert lr_at(9, cfg, 110) == pytest.approx(1e-3)  # warmup ends at the peak
    assert lr_at(10, cfg, 110) == pytest.approx(cos(1 / 100))  # 1 of the 100 decay steps
    assert lr_at(59, cfg, 110) == pytest.approx(5.5e-4)  # half way: (peak + floor) / 2
    assert lr_at(34, cfg, 110) == pytest.approx(cos(1 / 4))
    assert lr_at(109, cfg, 110) == pytest.approx(1e-4)  # the last trained step is at the floor
    assert lr_at(500, cfg, 110) == pytest.approx(1e-4)  # and it stays there


def test_wsd_schedule_hand_computed():
    cfg = OptimConfig(
        lr=1e-3, warmup_steps=10, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.2
    )
    assert lr_at(4, cfg, 100) == pytest.approx(5e-4)
    assert lr_at(50, cfg, 100) == pytest.approx(1e-3)  # stable
    assert lr_at(79, cfg, 100) == pytest.approx(1e-3)  # the last stable step
    assert lr_at(80, cfg, 100) == pytest.approx(9.5e-4)  # decay: steps 80..99, 1/20 each
    assert lr_at(89, cfg, 100) == pytest.approx(5e-4)
    assert lr_at(99, cfg, 100) == pytest.approx(0.0)  # the last trained step is at the floor


def test_a_one_step_decay_still_decays():
    """wsd with a decay as short as one step used to end at the peak: the floor was reached
    only at step max_steps, which is never trained."""
    cfg = OptimConfig(lr=1e-3, warmup_steps=0, schedule="wsd", decay_fraction=0.1, min_lr_ratio=0)
    assert [lr_at(s, cfg, 10) for s in (8, 9)] == [1e-3, 0.0]
    rounded_to_none = OptimConfig(lr=1e-3, warmup_steps=0, schedule="wsd", decay_fraction=0.04)
    assert lr_at(9, rounded_to_none, 10) == pytest.approx(1e-4)  # 0.4 steps: one all the same
    cosine = OptimConfig(lr=1e-3, warmup_steps=0, schedule="cosine", min_lr_ratio=0.0)
    assert lr_at(11, cosine, 12) == 0.0


def test_constant_schedule():
    cfg = OptimConfig(lr=2e-3, warmup_steps=0, schedule="constant")
    assert [lr_at(s, cfg, 10) for s in (0, 5, 9)] == [2e-3] * 3


def test_the_config_s_settings_and_set_lr_reach_every_group():
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=100, context_length=8))
    cfg = OptimConfig(weight_decay=0.1, beta1=0.8, beta2=0.99, eps=1e-6)
    opt = build_optimizer(model, cfg, "cpu")
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert [(g["betas"], g["eps"]) for g in opt.param_groups] == [((0.8, 0.99), 1e-6)] * 2
    set_lr(opt, 0.123)
    assert [g["lr"] for g in opt.param_groups] == [0.123, 0.123]
