"""llmtrain.ds_config: the DeepSpeed JSON comes from Hydra; a user JSON must agree with it."""

from __future__ import annotations

import json

import pytest
from tiny import TINY

from llmtrain.config import ConfigError, load_config
from llmtrain.ds_config import deepspeed_config

FAST = [*TINY, "trainer.batch_tokens=1024", "data.source=shards"]


def test_deepspeed_config_comes_from_hydra(tmp_path):
    cfg = load_config(
        FAST + ["dist=zero3-offload", "optim.grad_clip=0.5", "data.path=x"], world_size=2
    )
    ds = deepspeed_config(cfg, grad_accum=2, world_size=2, device="cpu")
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 16 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "offload_param" not in ds["zero_optimization"]
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]

    user = tmp_path / "ds.json"
    user.write_text(
        json.dumps(
            {
                "gradient_clipping": "auto",
                "zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": 123},
            }
        )
    )
    cfg.dist.deepspeed_config = str(user)
    merged = deepspeed_config(cfg, 2, 2, "cpu")
    assert merged["zero_optimization"]["stage3_prefetch_bucket_size"] == 123
    assert merged["gradient_clipping"] == 0.5

    user.write_text(
        json.dumps(
            {
                "train_micro_batch_size_per_gpu": 8,
                "gradient_clipping": 1.0,
                "zero_optimization": {"stage": 2},
            }
        )
    )
    with pytest.raises(ConfigError) as e:
        deepspeed_config(cfg, 2, 2, "cpu")
    for key in (
        "train_micro_batch_size_per_gpu",
        "trainer.micro_batch_size",
        "gradient_clipping",
        "optim.grad_clip",
        "zero_optimization.stage",
    ):
        assert key in str(e.value)


def test_bf16_zero2_and_zero3_add_gradients_up_in_fp32(tmp_path):
    """DeepSpeed's default added bf16 micro-batches' gradients up in bf16 (tests/test_dist.py
    measures it); zero1 is left so: there fp32 would swap in DeepSpeed's BF16_Optimizer."""
    fp32 = {"data_types": {"grad_accum_dtype": "fp32"}, "communication_data_type": "fp32"}
    for mode, precision, expected in [
        ("zero2", "bf16", fp32),
        ("zero3-offload", "bf16", fp32),
        ("zero1", "bf16", {}),
        ("zero3", "fp32", {}),
    ]:
        cfg = load_config(
            FAST + [f"dist={mode}", f"trainer.precision={precision}", "data.path=x"], world_size=2
        )
        ds = deepspeed_config(cfg, grad_accum=2, world_size=2, device="cpu")
        assert {k: ds[k] for k in fp32 if k in ds} == expected, mode

    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"data_types": {"grad_accum_dtype": "bf16"}}))
    cfg.dist.deepspeed_config = str(user)  # zero3 in fp32: the dtype is the JSON's to choose
    assert deepspeed_config(cfg, 2, 2, "cpu")["data_types"]["grad_accum_dtype"] == "bf16"
    cfg.trainer.precision = "bf16"
    with pytest.raises(ConfigError, match="data_types.grad_accum_dtype: ds.json has 'bf16'"):
        deepspeed_config(cfg, 2, 2, "cpu")
    # a key Hydra leaves out when it is off is still Hydra's
    user.write_text(json.dumps({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}))
    with pytest.raises(ConfigError, match="offload_optimizer.device: ds.json has 'cpu'"):
        deepspeed_config(cfg, 2, 2, "cpu")
