"""What a run knows before its first step and says at startup: the plan (the numbers derived
from the config), the startup report, and notes on what the config may not have meant."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

from llmtrain.config import DataConfig, OptimConfig, TrainConfig
from llmtrain.documents import DataError, validation_source
from llmtrain.metrics import flops_per_token
from llmtrain.optim import lr_at


@dataclass(frozen=True)
class Plan:
    """The numbers derived from the config, printed at startup."""

    world_size: int
    micro_batch: int
    seq_len: int
    grad_accum: int
    tokens_per_step: int
    max_steps: int
    start_step: int = 0  # where a resume starts: its steps and tokens count toward the horizon
    start_tokens: int = 0

    @classmethod
    def from_config(cls, cfg: TrainConfig, world_size: int) -> Plan:
        t, seq = cfg.trainer, cfg.data.seq_len
        accum = t.batch_tokens // (t.micro_batch_size * seq * world_size)
        steps = t.max_steps or math.ceil(t.max_tokens / t.batch_tokens)
        return cls(world_size, t.micro_batch_size, seq, accum, t.batch_tokens, steps)

    def resumed(self, cfg: TrainConfig, step: int, tokens: int) -> Plan:
        """This plan from a checkpoint at ``step`` with ``tokens`` trained. A horizon in
        tokens counts those at whatever batch size they were trained: the steps left are the
        tokens left over this run's batch (trainer.batch_tokens may have changed)."""
        steps = self.max_steps
        if cfg.trainer.max_steps is None:
            left = max(0, cfg.trainer.max_tokens - tokens)
            steps = step + math.ceil(left / self.tokens_per_step)
        return replace(self, max_steps=steps, start_step=step, start_tokens=tokens)

    @property
    def total_tokens(self) -> int:
        """The tokens trained by the horizon, a resumed run's earlier ones included."""
        return self.start_tokens + (self.max_steps - self.start_step) * self.tokens_per_step


def startup_report(cfg: TrainConfig, plan: Plan, params: str, run_dir: Path, device) -> str:
    fpt = flops_per_token(cfg.model, plan.seq_len)
    device = "cpu" if str(device).startswith("cpu") else device  # FSDP2 says cpu:0
    d = cfg.dist
    offload = [
        name
        for name, on in (("optimizer", d.offload_optimizer), ("params", d.offload_params))
        if on
    ]
    dist = d.mode + (f" (offload {' + '.join(offload)} to CPU)" if offload else "")
    return "\n".join(
        [
            f"llmtrain | run dir {run_dir}",
            f"  model      {params}",
            f"  data       {cfg.data.name}, seq_len {plan.seq_len}, tokenizer {cfg.data.tokenizer}"
            + _validation_words(cfg.data),
            f"  batch      {plan.micro_batch} seq x {plan.seq_len} tok x {plan.grad_accum} accum x "
            f"{plan.world_size} proc = {plan.tokens_per_step:,} tokens/step",
            f"  horizon    {plan.max_steps:,} steps = {plan.total_tokens:,} tokens",
            f"  compute    {fpt / 1e6:.1f} MFLOPs/token, {fpt * plan.tokens_per_step / 1e12:.2f} "
            f"TFLOPs/step; device {device}, dist {dist}",
        ]
    )


def _validation_words(d: DataConfig) -> str:
    """A local corpus's validation source: held-out files, a file's tail, or data.val_files."""
    try:
        words = validation_source(d) if d.source == "hf" else ""
    except DataError:  # no file matches: the data loader says so, with its own exit code
        return ""
    return f"; validation: {words}" if words else ""


def shard_notes(cfg: TrainConfig) -> list[str]:
    """Shards that llmtrain-prepare has not finished writing: training reads what is there."""
    from llmtrain.shards import unfinished_splits

    if cfg.data.source != "shards" or not (open_ := unfinished_splits(cfg.data.path)):
        return []
    return [
        f"  data       {cfg.data.path}: llmtrain-prepare has not finished its "
        f"{' and '.join(open_)} split (manifest.json); training reads the shards written so far"
    ]


def passes_notes(plan: Plan, windows: int | None) -> list[str]:
    """How many times the horizon reads training data of ``windows`` windows a pass (token
    shards: known before the first step; a stream's size is not)."""
    if not windows:
        return []
    passes = (plan.max_steps - plan.start_step) * plan.tokens_per_step / (windows * plan.seq_len)
    if passes <= 1:
        return []
    often = "; a model memorises text it sees this often" if passes >= 10 else ""
    return [
        f"  epochs     the horizon reads the training shards {passes:,.1f} times "
        f"({windows:,} windows of {plan.seq_len} tokens a pass){often}"
    ]


def plan_notes(cfg: TrainConfig, plan: Plan) -> list[str]:
    """What the run will do that the config may not have meant: legal, so not refused."""
    t, o, notes = cfg.trainer, cfg.optim, []
    if t.max_steps is None and t.max_tokens % plan.tokens_per_step:
        notes.append(
            f"  horizon    trainer.max_tokens={t.max_tokens:,} is not a whole number of "
            f"{plan.tokens_per_step:,}-token steps; the run trains {plan.max_steps:,} "
            + ("step" if plan.max_steps == 1 else "steps")
        )
    if o.warmup_steps > plan.max_steps and o.schedule != "wsd":  # wsd's is refused in checks
        last = lr_at(plan.max_steps - 1, o, plan.max_steps)  # the last trained step's
        notes.append(
            f"  schedule   optim.warmup_steps={o.warmup_steps:,} is longer than the "
            f"{plan.max_steps:,}-step horizon: the lr ends at {last:.2e}, still warming up to "
            f"optim.lr={o.lr:.2e}"
        )
    default = OptimConfig()
    if o.schedule != "wsd" and o.decay_fraction != default.decay_fraction:
        notes.append(
            f"  schedule   optim.decay_fraction={o.decay_fraction} is not used: it is the wsd "
            f"schedule's, and this one is {o.schedule} (optim=adamw-wsd for warmup-stable-decay)"
        )
    if o.schedule == "constant" and o.min_lr_ratio != default.min_lr_ratio:
        notes.append(
            f"  schedule   optim.min_lr_ratio={o.min_lr_ratio} is not used: a constant schedule "
            "never decays"
        )
    d = cfg.dist
    if o.fused is not None and d.offload_optimizer:
        notes.append(
            f"  optimizer  optim.fused={o.fused} is not used: with dist.offload_optimizer the "
            "step is DeepSpeed's CPU Adam (AdamW mode)"
        )
    if not d.reshard_after_forward and d.mode not in ("fsdp2", "zero3"):
        notes.append(
            f"  dist       dist.reshard_after_forward=false is not used: it is for fsdp2 (and "
            f"refused for zero3); {d.mode} keeps whole parameters on every rank anyway"
        )
    return notes


def horizon_notes(cfg: TrainConfig, plan: Plan, saved: TrainConfig) -> list[str]:
    """What a resume changes about the run's end: nothing left to train, or an lr schedule
    stretched or shrunk (it is a function of step and horizon, so a new horizon reshapes the
    decay from here on)."""
    step = plan.start_step
    before = Plan.from_config(saved, plan.world_size).resumed(saved, step, plan.start_tokens)
    before = before.max_steps
    notes = []
    if step >= plan.max_steps:
        notes.append(
            f"  nothing to train: the checkpoint is at step {step:,} and the horizon is "
            f"{plan.max_steps:,} steps; raise trainer.max_steps (or trainer.max_tokens) to go on"
        )
    elif before != plan.max_steps and cfg.optim.schedule != "constant":
        # The schedule is re-evaluated at the new horizon, not continued from the lr reached:
        # extending a decayed run sends the lr back up (say by how much).
        was = lr_at(step - 1, saved.optim, before) if step > 0 else 0.0
        now = lr_at(step, cfg.optim, plan.max_steps)
        jump = f" ({now / was:.3g}x)" if was > 0 else ""
        notes.append(
            f"  schedule   the {cfg.optim.schedule} lr schedule now ends at step "
            f"{plan.max_steps:,}, not {before:,} as the checkpoint's run planned: it is "
            f"recomputed for the new horizon, and the lr goes from {was:.2e} at step {step:,} "
            f"to {now:.2e} at step {step + 1:,}{jump}"
        )
    return notes


CORPUS_KEYS = ("source", "path", "config_name", "files", "train_split", "text_column")


def data_notes(cfg: TrainConfig, saved: TrainConfig) -> list[str]:
    """Where a resume's data starts: at the saved position (also in a corpus that moved), or,
    with trainer.resume_data=false, at the start of this run's data (a second phase)."""
    if not cfg.trainer.resume_data:
        return ["  data       read from its start (trainer.resume_data=false)"]
    changed = [
        f"data.{k} {getattr(saved.data, k)!r} -> {getattr(cfg.data, k)!r}"
        for k in CORPUS_KEYS
        if getattr(saved.data, k) != getattr(cfg.data, k)
    ]
    if not changed:
        return []
    return [
        f"  data       {', '.join(changed)}: the saved data position goes on in it, as in a "
        "corpus that moved; for another corpus, resume with trainer.resume_data=false to read "
        "it from its start"
    ]
