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
    Warmup's last step is at the peak and the run's last step, ``max_steps - 1``, at the floor.
    """
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "cosine":
        progress = _progress(step, cfg.warmup_steps, max_steps)
        return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - floor)
    # wsd
    decay_start = max_steps - max(1, round(cfg.decay_fraction * max_steps))
    if step < decay_start:
        return peak
    return peak + _progress(step, decay_start, max_steps) * (floor - peak)


def _progress(step: int, start: int, max_steps: int) -> float:
    """How far step is through the decay over steps start .. max_steps - 1: 1/n after the first
    of its n steps, 1 at the last (which is trained at the floor)."""
    return min(1.0, (step + 1 - start) / max(1, max_steps - start))


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
