"""The rules in llmtrain/checks.py on their own (no Hydra): each names its key. Whole-run
refusals before any process group starts are in test_bad_configs.py."""

from __future__ import annotations

import dataclasses

import pytest

from llmtrain.checks import ConfigError, validate
from llmtrain.config import TrainConfig, TrainerConfig


def config(**trainer) -> TrainConfig:
    return TrainConfig(trainer=TrainerConfig(**{"max_steps": 10, **trainer}))


def test_the_defaults_pass():
    cfg = config()
    assert validate(cfg) is cfg


def test_a_zero_batch_is_refused_before_the_wsd_horizon_divides_by_it():
    cfg = config(max_steps=None, max_tokens=1000, batch_tokens=0)
    cfg.optim.schedule = "wsd"
    with pytest.raises(ConfigError, match=r"^trainer\.batch_tokens: must be positive"):
        validate(cfg)


def test_the_world_size_is_part_of_the_batch_window():
    cfg = config(batch_tokens=8 * 1024, micro_batch_size=4)
    cfg.data.seq_len = 1024
    validate(cfg, world_size=2)
    with pytest.raises(ConfigError, match=r"4 x 1024 x 4 = 16384; try 16384"):
        validate(cfg, world_size=4)


def test_the_batch_hint_is_the_nearest_batch_that_splits():
    """batch_tokens=1000 with 512-token windows was told 'try 512 (0.512x)', not 1024."""
    cfg = config(batch_tokens=1000, micro_batch_size=8)
    cfg.data.seq_len = 64
    with pytest.raises(ConfigError, match=r"try 1024 \(1\.02x the global batch\)"):
        validate(cfg)


@pytest.mark.parametrize(
    ("section", "change", "key"),
    [
        ("model", {"n_head": 5}, "model.n_embd"),
        ("model", {"position": "alibi"}, "model.position"),
        ("data", {"stride": 2048}, "data.stride"),
        ("data", {"val_fraction": 1.0}, "data.val_fraction"),
        ("optim", {"beta2": 1.0}, "optim.beta1"),
        ("dist", {"mode": "zero2", "offload_params": True}, "dist.offload_params"),
        ("logger", {"mode": "later"}, "logger.mode"),
        ("trainer", {"temperature": -1.0}, "trainer.temperature"),
        ("trainer", {"seed": -1}, "trainer.seed"),  # numpy's generators: "reading failed"
        ("trainer", {"seed": 2**32}, "trainer.seed"),  # datasets' epoch counter overflowed
        ("optim", {"name": "sgd"}, "optim.name"),  # would have trained AdamW without a word
        ("data", {"shard_tokens": 2**31}, "data.shard_tokens"),  # llm.c's int32 header count
    ],
)
def test_each_section_names_its_key(section, change, key):
    cfg = config()
    setattr(cfg, section, dataclasses.replace(getattr(cfg, section), **change))
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        validate(cfg)


def test_a_credential_in_the_config_is_refused_without_printing_it(monkeypatch):
    secret = "wandb-key-0123456789"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    cfg = config()
    cfg.logger.run_name = f"run-{secret}"
    with pytest.raises(
        ConfigError, match=r"^logger\.run_name: holds the value of \$WANDB_API_KEY"
    ) as e:
        validate(cfg)
    assert secret not in str(e.value)
