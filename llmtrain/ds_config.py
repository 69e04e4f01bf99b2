"""The DeepSpeed JSON, generated from the Hydra config.

Hydra is the single source of truth for micro-batch, accumulation, clipping, precision and the
ZeRO stage. A user's JSON (``dist.deepspeed_config``) may add tuning keys (bucket sizes,
prefetch), and every key Hydra owns must agree with the config or the run is refused with a
list of the keys that disagree.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmtrain.config import ConfigError, TrainConfig

ZERO_STAGE = {"zero1": 1, "zero2": 2, "zero3": 3}

# DeepSpeed keys that restate a Hydra value; a user JSON must agree with them or be refused.
OWNED_KEYS = (
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "train_batch_size",
    "gradient_clipping",
    "zero_optimization.stage",
    "bf16.enabled",
    "fp16.enabled",
    "zero_optimization.offload_optimizer.device",
    "zero_optimization.offload_param.device",
    "data_types.grad_accum_dtype",
    "communication_data_type",
)
HYDRA_KEY = {
    "train_micro_batch_size_per_gpu": "trainer.micro_batch_size",
    "gradient_accumulation_steps": "trainer.batch_tokens (derived accumulation)",
    "train_batch_size": "trainer.batch_tokens / data.seq_len",
    "gradient_clipping": "optim.grad_clip",
    "zero_optimization.stage": "dist.mode",
    "bf16.enabled": "trainer.precision",
    "fp16.enabled": "trainer.precision",
    "zero_optimization.offload_optimizer.device": "dist.offload_optimizer",
    "zero_optimization.offload_param.device": "dist.offload_params",
    "data_types.grad_accum_dtype": "trainer.precision=bf16 with dist=zero2/zero3",
    "communication_data_type": "trainer.precision=bf16 with dist=zero2/zero3",
}


def fp32_grad_sum(mode: str, precision: str) -> bool:
    """Whether DeepSpeed adds the micro-batches' gradients up in fp32, reducing each in fp32.

    DeepSpeed's default, the model's dtype, added 16 micro-batches' reduced gradients in bf16
    (5e-3 relative error against the exact sum; reduced in bf16 and added in fp32, 1.5e-3;
    both in fp32, 2e-8). zero1 is left in bf16: there DeepSpeed swaps in its BF16_Optimizer,
    which keeps the whole model's fp32 gradients on every rank and writes checkpoints its own
    zero_to_fp32 (llmtrain's export) cannot read.
    """
    return precision == "bf16" and mode in ("zero2", "zero3")


def _get(d: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deepspeed_config(
    cfg: TrainConfig, grad_accum: int, world_size: int, device: str
) -> dict[str, Any]:
    """The DeepSpeed JSON for ``cfg``; ``dist.deepspeed_config`` (a user file) may add tuning
    keys (bucket sizes, prefetch) but every key Hydra owns must agree or the run is refused."""
    d, t = cfg.dist, cfg.trainer
    from llmtrain.dist import resolve_precision  # dist builds the plugin from this module

    precision = resolve_precision(t.precision, device)
    offload = {"device": "cpu", "pin_memory": device == "cuda"}
    zero: dict[str, Any] = {
        "stage": ZERO_STAGE[d.mode],
        "contiguous_gradients": True,
        "overlap_comm": device == "cuda",
    }
    if d.offload_optimizer:
        zero["offload_optimizer"] = offload
    if d.offload_params:
        zero["offload_param"] = offload
    if d.mode == "zero3":
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    generated = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": t.micro_batch_size * grad_accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip,  # 0 disables, as in optim.grad_clip
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        # The optimizer is llmtrain's torch AdamW (or DeepSpeedCPUAdam when offloading).
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    if fp32_grad_sum(d.mode, precision):
        generated["data_types"] = {"grad_accum_dtype": "fp32"}
        generated["communication_data_type"] = "fp32"
    if d.deepspeed_config is None:
        return generated
    path = Path(d.deepspeed_config)
    try:
        user = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"dist.deepspeed_config: cannot read {path}: {e}") from e
    if "optimizer" in user or "scheduler" in user:
        raise ConfigError(
            f"dist.deepspeed_config: {path} has an optimizer/scheduler block; "
            "llmtrain builds them from the optim group, remove the block"
        )
    wrong = []
    for key in OWNED_KEYS:
        mine, theirs = _get(generated, key), _get(user, key)
        if key.endswith("offload_optimizer.device") or key.endswith("offload_param.device"):
            mine = mine or "none"
        if mine is None:  # left to DeepSpeed under this config (the dtypes, outside bf16 ZeRO-2/3)
            continue
        if theirs not in (None, "auto") and theirs != mine:
            wrong.append(
                f"  {key}: {path.name} has {theirs!r}, the config gives {mine!r} "
                f"(from {HYDRA_KEY[key]})"
            )
    if wrong:
        raise ConfigError(
            "dist.deepspeed_config: the DeepSpeed JSON disagrees with the Hydra "
            "config, which is the source of truth:\n"
            + "\n".join(wrong)
            + '\nSet these keys to "auto" (or delete them) in the JSON, or change '
            "the Hydra values."
        )
    return _merge(user, generated)
