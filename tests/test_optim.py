import math

import pytest

from llmtrain.config import ModelConfig, OptimConfig
from llmtrain.model import GPT
from llmtrain.optim import build_optimizer, lr_at, set_lr


def test_cosine_schedule_hand_computed():
    cfg = OptimConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    assert lr_at(0, cfg, 110) == pytest.approx(1e-4)  # (0 + 1) / 10 of the peak
    assert lr_at(9, cfg, 110) == pytest.approx(1e-3)  # warmup ends at the peak
    assert lr_at(10, cfg, 110) == pytest.approx(1e-3)  # cosine starts at the peak
    assert lr_at(60, cfg, 110) == pytest.approx(5.5e-4)  # half way: (peak + floor) / 2
    assert lr_at(35, cfg, 110) == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi / 4)) * 9e-4)
    assert lr_at(110, cfg, 110) == pytest.approx(1e-4)  # ends at the floor
    assert lr_at(500, cfg, 110) == pytest.approx(1e-4)  # and stays there


def test_wsd_schedule_hand_computed():
    cfg = OptimConfig(
        lr=1e-3, warmup_steps=10, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.2
    )
    assert lr_at(4, cfg, 100) == pytest.approx(5e-4)
    assert lr_at(50, cfg, 100) == pytest.approx(1e-3)  # stable
    assert lr_at(79, cfg, 100) == pytest.approx(1e-3)
    assert lr_at(80, cfg, 100) == pytest.approx(1e-3)  # decay starts at 80 = 100 - 20
    assert lr_at(90, cfg, 100) == pytest.approx(5e-4)
    assert lr_at(100, cfg, 100) == pytest.approx(0.0)


def test_constant_schedule():
    cfg = OptimConfig(lr=2e-3, warmup_steps=0, schedule="constant")
    assert [lr_at(s, cfg, 10) for s in (0, 5, 9)] == [2e-3] * 3


def test_set_lr_writes_every_group():
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=100, context_length=8))
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1), "cpu")
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    set_lr(opt, 0.123)
    assert [g["lr"] for g in opt.param_groups] == [0.123, 0.123]
