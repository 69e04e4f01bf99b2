"""The Accelerator for a config: device, precision, process group, and the sharding plugin."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from llmtrain.config import ConfigError, TrainConfig


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device: cuda was asked for but torch sees no CUDA device")
    return device


def resolve_precision(precision: str, device: str) -> str:
    """Accelerate's mixed_precision name: bf16 on GPU by default, fp32 ("no") on CPU."""
    if precision == "auto":
        return "bf16" if device == "cuda" else "no"
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]


def check_launch(cfg: TrainConfig, world_size: int) -> None:
    """Mismatches between the dist group and the launcher, caught before any process group."""
    if world_size > 1 and cfg.dist.mode == "single":
        raise ConfigError(
            f"dist.mode: 'single' but the launcher started {world_size} processes; "
            "choose dist=ddp, zero1, zero2, zero3 or fsdp2"
        )


def build_accelerator(cfg: TrainConfig, grad_accum: int) -> Accelerator:
    device = resolve_device(cfg.trainer.device)
    backend = cfg.dist.backend or ("nccl" if device == "cuda" else "gloo")
    if device == "cpu":
        os.environ.setdefault("ACCELERATE_USE_CPU", "1")
    return Accelerator(
        cpu=device == "cpu",
        mixed_precision=resolve_precision(cfg.trainer.precision, device),
        gradient_accumulation_steps=grad_accum,
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[
            InitProcessGroupKwargs(backend=backend, timeout=timedelta(seconds=cfg.dist.timeout_s))
        ],
    )
