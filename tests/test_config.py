"""llmtrain.config: composition from conf/, and errors that name the offending key."""

import pytest

from llmtrain.config import (
    ConfigError,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    config_to_yaml,
    load_config,
)

BASE = ["trainer.max_steps=1"]


def test_gpt2_small_loads():
    cfg = load_config(["model=gpt2-small", *BASE])
    assert isinstance(cfg, TrainConfig)
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd) == (12, 12, 768)
    assert cfg.trainer.max_steps == 1


def test_llama_sizes_inherit_llama_style():
    model = load_config(["model=llama-1b", *BASE]).model
    assert (model.position, model.norm, model.mlp) == ("rope", "rmsnorm", "swiglu")
    assert model.n_kv_head == 8 and model.tie_embeddings and not model.bias


def test_experiment_pins_a_run():
    cfg = load_config(["experiment=smoke"])
    assert cfg.experiment == "smoke" and cfg.model.name == "tiny"
    assert cfg.trainer.max_steps == 100


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["model.foo=1"], "foo"),
        (["model=nope"], "nope"),
        (["model.n_layer=abc"], "n_layer"),
        (["model.n_embd=130"], "model.n_embd"),  # tiny has 4 heads
        (["model.n_kv_head=3"], "model.n_kv_head"),
        (["data.seq_len=512"], "data.seq_len"),  # tiny's context_length is 256
        (["model.n_layer=0"], "model.n_layer"),
        (["model.n_embd=-64"], "model.n_embd"),
        (["model.vocab_size=0"], "model.vocab_size"),
        (["data.seq_len=0"], "data.seq_len"),
        (["trainer.micro_batch_size=0"], "trainer.micro_batch_size"),
        (["optim.lr=0"], "optim.lr"),
        (["trainer.batch_tokens=1000"], "trainer.batch_tokens"),
        (["model.position=alibi"], "model.position"),
    ],
)
def test_bad_config_names_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_config([*overrides, *BASE])


def test_missing_horizon_is_an_error():
    with pytest.raises(ConfigError, match="trainer.max_steps"):
        load_config([])


def test_batch_tokens_divisibility_counts_world_size():
    overrides = ["trainer.batch_tokens=4096", "trainer.micro_batch_size=16", *BASE]
    load_config(overrides, world_size=2)  # 16 x 128 x 2 = 4096
    with pytest.raises(ConfigError, match="trainer.batch_tokens"):
        load_config(overrides, world_size=3)


def test_dict_round_trip():
    cfg = load_config(["model=llama-1b", "trainer.max_steps=7", "logger=none"])
    data = config_to_dict(cfg)
    assert data["model"]["n_kv_head"] == 8
    assert config_from_dict(data) == cfg
    assert "n_kv_head: 8" in config_to_yaml(cfg)


def test_from_dict_rejects_unknown_keys():
    data = config_to_dict(load_config(BASE))
    data["model"]["foo"] = 1
    with pytest.raises(Exception, match="foo"):
        config_from_dict(data)
