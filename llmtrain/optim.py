"""AdamW over the model's decay / no-decay groups; learning-rate schedules as pure functions
of the step."""

from __future__ import annotations

import math

import torch

from llmtrain.config import OptimConfig


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """The learning rate for optimizer step ``step`` (0-based) of a ``max_steps`` run.

    cosine: linear warmup, then cosine decay to ``lr * min_lr_ratio`` (GPT-3 paper, appendix B).
    wsd: linear warmup, constant, then linear decay over the last ``decay_fraction`` of the run
    (warmup-stable-decay, Hu et al. 2024 "MiniCPM").
    constant: linear warmup, then constant.
    """
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "cosine":
        span = max(1, max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - floor)
    # wsd
    decay_steps = max(1, round(cfg.decay_fraction * max_steps))
    decay_start = max_steps - decay_steps
    if step < decay_start:
        return peak
    progress = min(1.0, (step - decay_start) / decay_steps)
    return peak + progress * (floor - peak)


def build_optimizer(model, cfg: OptimConfig, device_type: str):
    """AdamW; the fused CUDA kernel on GPU (one launch for all parameters), foreach elsewhere."""
    fused = cfg.fused if cfg.fused is not None else device_type == "cuda"
    return torch.optim.AdamW(
        model.configure_param_groups(cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=fused or None,
        foreach=None if fused else True,
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's only state is the step, so the lr is written, not stepped."""
    for group in optimizer.param_groups:
        group["lr"] = lr
