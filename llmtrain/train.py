"""``llmtrain-train`` / ``python -m llmtrain.train``: the Hydra entry point and the training loop.

llmtrain-train experiment=smoke
accelerate launch --config_file launch/cpu.yaml -m llmtrain.train experiment=smoke dist=ddp
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from llmtrain import checkpoint as ckpt
from llmtrain.config import (
    CONF_DIR,
    ConfigError,
    TrainConfig,
    TrainerConfig,
    config_to_dict,
    config_to_yaml,
    to_dataclass,
    validate,
    world_size_from_env,
)
from llmtrain.consolidate import load_data_state, load_state
from llmtrain.data import DataError, build_dataloader
from llmtrain.dist import build_accelerator, build_dist_optimizer, check_launch, process_scope
from llmtrain.integrity import safe_loading
from llmtrain.metrics import (
    MetricsFile,
    Throughput,
    build_logger,
    console_line,
    device_peak_tflops,
    flops_per_token,
    mfu,
    perplexity,
    receipt,
)
from llmtrain.model import GPT, attention_kernel
from llmtrain.optim import lr_at, set_lr
from llmtrain.tokenizer import get_tokenizer


class _QuietAccelerate(logging.Filter):
    """Accelerate logs every file a save writes at INFO, and warns that the tied lm_head was
    dropped from model.safetensors (load_model re-ties it); the checkpoint line says enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.WARNING or (
            record.levelno == logging.WARNING and "shared tensor" not in record.getMessage()
        )


for _name in ("accelerate.accelerator", "accelerate.checkpointing", "accelerate.utils.other"):
    logging.getLogger(_name).addFilter(_QuietAccelerate())


@dataclass(frozen=True)
class Plan:
    """The numbers derived from the config, printed at startup."""

    world_size: int
    micro_batch: int
    seq_len: int
    grad_accum: int
    tokens_per_step: int
    max_steps: int

    @classmethod
    def from_config(cls, cfg: TrainConfig, world_size: int) -> Plan:
        t, seq = cfg.trainer, cfg.data.seq_len
        accum = t.batch_tokens // (t.micro_batch_size * seq * world_size)
        steps = t.max_steps or math.ceil(t.max_tokens / t.batch_tokens)
        return cls(world_size, t.micro_batch_size, seq, accum, t.batch_tokens, steps)


def startup_report(cfg: TrainConfig, plan: Plan, params: str, run_dir: Path, device) -> str:
    fpt = flops_per_token(cfg.model, plan.seq_len)
    return "\n".join(
        [
            f"llmtrain | run dir {run_dir}",
            f"  model      {params}",
            f"  data       {cfg.data.name}, seq_len {plan.seq_len}, tokenizer {cfg.data.tokenizer}",
            f"  batch      {plan.micro_batch} seq x {plan.seq_len} tok x {plan.grad_accum} accum x "
            f"{plan.world_size} proc = {plan.tokens_per_step:,} tokens/step",
            f"  horizon    {plan.max_steps:,} steps = "
            f"{plan.max_steps * plan.tokens_per_step:,} tokens",
            f"  compute    {fpt / 1e6:.1f} MFLOPs/token, {fpt * plan.tokens_per_step / 1e12:.2f} "
            f"TFLOPs/step; device {device}, dist {cfg.dist.mode}",
        ]
    )


def batches(loader, stats: Throughput):
    """Endless (x, y) micro-batches; time spent waiting on data is added to ``stats``."""
    while True:
        for_start = time.perf_counter()
        for x, y in loader:
            stats.data_wait += time.perf_counter() - for_start
            yield x, y
            for_start = time.perf_counter()


def step_flags(accelerator, grad_norm, stop: bool) -> tuple[bool, bool]:
    """(gradient finite, stop) as every rank sees them: one tiny all-reduce and the step's one
    host sync. A signal can reach the ranks at slightly different steps; summing the flags
    makes all of them stop (and save) at the same step."""
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a replicated DTensor; collectives want local
        grad_norm = grad_norm.full_tensor()
    norm = torch.as_tensor(grad_norm, dtype=torch.float32).to(accelerator.device)
    flags = torch.stack([(~torch.isfinite(norm)).float(), torch.full_like(norm, float(stop))])
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags, reduction="sum")
    bad, stops = flags.tolist()
    return bad == 0, stops > 0


@torch.no_grad()
def evaluate(model, accelerator, val_loader, n_batches: int) -> float:
    """Mean validation loss over the first ``n_batches`` batches, averaged over ranks."""
    model.eval()
    total = torch.zeros(2, device=accelerator.device)
    for i, (x, y) in enumerate(val_loader):
        if i >= n_batches:
            break
        _, loss = model(x.to(accelerator.device), y.to(accelerator.device), return_logits=False)
        total += torch.stack([loss.float(), torch.ones((), device=accelerator.device)])
    total = accelerator.reduce(total, reduction="sum")
    model.train()
    if total[1] == 0:
        raise RuntimeError("data.val_split: the validation split produced no batches")
    return (total[0] / total[1]).item()


def build_model(cfg: TrainConfig) -> GPT:
    """``GPT(cfg.model)`` with the trainer's memory options: activation checkpointing and the
    fused, chunked loss."""
    model = GPT(cfg.model)
    if cfg.trainer.activation_checkpointing:
        model.enable_activation_checkpointing()
    if cfg.trainer.loss_chunk:
        model.enable_chunked_loss(cfg.trainer.loss_chunk)
    return model


def compile_model(model: torch.nn.Module, t: TrainerConfig) -> torch.nn.Module:
    """``torch.compile`` when trainer.compile is set (mode trainer.compile_mode), else model."""
    if not t.compile:
        return model
    return torch.compile(model, mode=None if t.compile_mode == "default" else t.compile_mode)


def sample_text(model, accelerator, tokenizer, cfg: TrainConfig, seed: int) -> str:
    """A few generated tokens, so a user sees the model learn; its own RNG, never training's."""
    t = cfg.trainer
    generator = torch.Generator(device=accelerator.device).manual_seed(seed)
    prompt = torch.tensor([tokenizer.encode(t.sample_prompt)], device=accelerator.device)
    out = accelerator.unwrap_model(model).generate(
        prompt, t.sample_tokens, temperature=t.temperature, top_k=t.top_k, generator=generator
    )
    return tokenizer.decode(out[0].tolist())


def train(
    cfg: TrainConfig,
    run_dir: Path,
    step_hook: Callable[[ckpt.TrainerState, Throughput], None] | None = None,
    final_save: bool = True,
) -> ckpt.TrainerState:
    """Train ``cfg`` with outputs in ``run_dir``; returns the final trainer state.

    ``step_hook(state, throughput)`` runs after every optimizer step, before logging (how
    ``llmtrain-bench`` times the loop's own steps); ``final_save=False`` skips the checkpoint a
    run otherwise writes at its end.

    SIGTERM or SIGUSR1 make every rank finish its step, save, and raise ``ckpt.Preempted``.
    """
    with (
        ckpt.preemption_signals() as preempt,
        process_scope(),
        attention_kernel(cfg.trainer.attention),
    ):
        return _train(cfg, run_dir, preempt, step_hook, final_save)


def _train(cfg, run_dir, preempt: ckpt.Preemption, step_hook, final_save) -> ckpt.TrainerState:
    world = world_size_from_env()
    check_launch(cfg, world)
    plan = Plan.from_config(cfg, world)
    # Checked before any process group starts: a failing rank 0 then costs seconds, not a hang.
    tokenizer = get_tokenizer(cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size: {cfg.model.vocab_size} is smaller than the "
            f"{cfg.data.tokenizer} tokenizer's {tokenizer.vocab_size} tokens"
        )
    if int(os.environ.get("RANK", "0")) == 0:  # other ranks learn the run dir by broadcast
        ckpt.preflight_resume(cfg, run_dir)
    accelerator = build_accelerator(cfg, plan.grad_accum)
    is_main, rank = accelerator.is_main_process, accelerator.process_index
    run_dir = Path(accelerator_broadcast(accelerator, str(run_dir.resolve())))
    ckpt_root = run_dir / "checkpoints"
    # Verified against its manifest; trainer.resume=auto falls back past damaged checkpoints.
    resume_from = ckpt.choose_resume(cfg.trainer.resume, ckpt_root)
    if resume_from is not None:
        ckpt.check_compatible(ckpt.saved_config(resume_from).model, cfg.model, resume_from)

    torch.manual_seed(cfg.trainer.seed)
    model = build_model(cfg)
    optimizer = build_dist_optimizer(model, cfg, accelerator.device.type)
    model = compile_model(model, cfg.trainer)
    params = model.param_summary()  # before prepare(): ZeRO-3 leaves empty placeholders
    model, optimizer = accelerator.prepare(model, optimizer)

    loader_args = dict(
        batch_size=plan.micro_batch, rank=rank, world_size=world, seed=cfg.trainer.seed
    )
    train_loader = build_dataloader(cfg.data, tokenizer, split="train", **loader_args)
    val_loader = build_dataloader(cfg.data, tokenizer, split="val", **loader_args)
    for _ in val_loader:  # an empty validation split fails now (DataError), not at the first eval
        break

    state = ckpt.TrainerState(world_size=world)
    if resume_from is not None:
        state = ckpt.load_trainer_state(resume_from)
        # Both reshard when the checkpoint was written by another number of processes; nothing
        # in the checkpoint is unpickled beyond tensors and plain containers.
        with safe_loading(resume_from):
            data_state = load_data_state(resume_from, rank, world, state.world_size)
            train_loader.load_state_dict(data_state)
            load_state(accelerator, model, resume_from, state.world_size, cfg.dist.mode)
        state.world_size = world

    cfg_dict, run_receipt = config_to_dict(cfg), receipt()
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    metrics_file = MetricsFile(
        run_dir / "metrics.jsonl" if is_main else None,
        resumed_at=state.step if resume_from is not None else None,
    )
    logger = build_logger(cfg.logger, run_dir, {**cfg_dict, "receipt": run_receipt}, is_main)
    if is_main:
        (run_dir / "config.yaml").write_text(config_to_yaml(cfg))
        print(startup_report(cfg, plan, params, run_dir, accelerator.device), flush=True)
        if resume_from is not None:
            print(f"  resumed    from {resume_from} at step {state.step}", flush=True)

    peak = device_peak_tflops(
        torch.cuda.get_device_name() if accelerator.device.type == "cuda" else None
    )
    if is_main and peak is None:
        print("  mfu        n/a: no bf16 peak known for this device (see metrics.py)", flush=True)
    fpt = flops_per_token(cfg.model, plan.seq_len)
    clip = cfg.optim.grad_clip or float("inf")  # inf: measure the norm, never clip
    throughput = Throughput()
    stream = batches(train_loader, throughput)
    loss_sum = torch.zeros((), device=accelerator.device)  # summed over the log interval
    step_loss = torch.zeros((), device=accelerator.device)
    interval_steps = 0
    started, start_step, last_saved = time.perf_counter(), state.step, state.step
    model.train()

    def save(final: bool = False) -> Path | None:
        """A failed write stops the run unless trainer.on_save_error=continue (never the last
        save); NaN weights are never saved (ckpt.Diverged)."""
        try:
            path = ckpt.save_checkpoint(
                accelerator,
                ckpt_root,
                state,
                train_loader.state_dict(),
                cfg,
                run_receipt,
                cfg.trainer.keep_last,
                model=model,
            )
        except ckpt.SaveError as e:
            if final or cfg.trainer.on_save_error == "stop":
                raise
            if is_main:
                print(f"warning: {e} Continuing (trainer.on_save_error=continue).", flush=True)
            return None
        if is_main:
            print(f"checkpoint {path}", flush=True)
        return path

    stop = False  # a preemption signal reached some rank
    while state.step < plan.max_steps:
        lr = lr_at(state.step, cfg.optim, plan.max_steps)
        set_lr(optimizer, lr)
        step_loss.zero_()
        for _ in range(plan.grad_accum):
            x, y = next(stream)
            x = x.to(accelerator.device, non_blocking=True)
            y = y.to(accelerator.device, non_blocking=True)
            # Gradients sync on the last micro-batch only; under DeepSpeed, backward() there
            # also clips and steps (optimizer.step() below is then a no-op).
            with accelerator.accumulate(model):
                _, loss = model(x, y, return_logits=False)
                accelerator.backward(loss)  # divides by grad_accum
            step_loss += loss.detach()
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), clip)
        finite, stop = step_flags(accelerator, grad_norm, preempt.requested)
        if not finite:
            optimizer.zero_grad(set_to_none=cfg.trainer.set_to_none)
            state.bad_steps += 1
            state.skipped_steps += 1
            if is_main:
                print(
                    f"step {state.step + 1}: non-finite gradient norm, step skipped "
                    f"({state.bad_steps} in a row)",
                    flush=True,
                )
            if state.bad_steps >= cfg.trainer.max_bad_steps:
                last = ckpt.latest_checkpoint(ckpt_root)
                raise ckpt.Diverged(
                    f"{state.bad_steps} consecutive non-finite steps; stopping. The last good "
                    f"checkpoint is {last or 'none (no checkpoint was written)'}; lower "
                    f"optim.lr or check the data, then resume from it."
                )
            if stop:
                break
            continue
        optimizer.step()
        optimizer.zero_grad(set_to_none=cfg.trainer.set_to_none)
        state.bad_steps = 0
        state.step += 1
        state.tokens += plan.tokens_per_step
        loss_sum += step_loss
        interval_steps += 1
        throughput.tokens += plan.tokens_per_step
        if step_hook is not None:
            step_hook(state, throughput)

        if state.step % cfg.trainer.log_every == 0 or state.step == plan.max_steps:
            loss_sum = accelerator.reduce(loss_sum, reduction="mean")
            loss_val = loss_sum.item() / (plan.grad_accum * interval_steps)
            tok_s, wait = throughput.read()
            record = {
                "step": state.step,
                "tokens": state.tokens,
                "loss": loss_val,
                "ppl": perplexity(loss_val),
                "lr": lr,
                "grad_norm": float(grad_norm),
                "tokens_per_s": tok_s,
                "mfu": mfu(tok_s / world, fpt, peak),
                "peak_mem_gb": peak_memory_gb(accelerator.device),
                "data_wait": wait,
                "skipped_steps": state.skipped_steps,
            }
            metrics_file.write(record)
            logger.log(record, step=state.step)
            if is_main:
                elapsed = time.perf_counter() - started
                eta = elapsed / max(1, state.step - start_step) * (plan.max_steps - state.step)
                print(console_line(record, plan.max_steps, eta), flush=True)
            loss_sum.zero_()
            interval_steps = 0
            throughput.reset()

        if state.step % cfg.trainer.eval_every == 0 or state.step == plan.max_steps:
            val_loss = evaluate(model, accelerator, val_loader, cfg.trainer.eval_batches)
            record = {
                "step": state.step,
                "tokens": state.tokens,
                "val_loss": val_loss,
                "val_ppl": perplexity(val_loss),
            }
            metrics_file.write(record)
            logger.log(record, step=state.step)
            if is_main:
                print(
                    f"eval step {state.step}: val_loss {val_loss:.4f} | "
                    f"val_ppl {record['val_ppl']:.2f}",
                    flush=True,
                )
            every = cfg.trainer.sample_every
            if every and (state.step % every == 0 or state.step == plan.max_steps):
                text = sample_text(model, accelerator, tokenizer, cfg, cfg.trainer.seed)
                if is_main:
                    print(f"sample: {text!r}", flush=True)
            throughput.reset()

        if state.step % cfg.trainer.ckpt_every == 0:
            if save() is not None:
                last_saved = state.step
            throughput.reset()
        if stop:
            break

    stop = stop and state.step < plan.max_steps  # a signal on the last step: the run is done
    saved = ckpt.latest_checkpoint(ckpt_root) if last_saved == state.step else None
    if stop and saved is None:
        try:  # the previous checkpoint is intact if this fails; a requeue resumes from it
            saved = save(final=True)
        except ckpt.SaveError as e:
            if is_main:
                print(f"error: {e}", file=sys.stderr, flush=True)
    elif final_save and last_saved != state.step:
        save(final=True)
    metrics_file.close()
    logger.finish()
    accelerator.end_training()
    if stop:
        saved = saved or ckpt.latest_checkpoint(ckpt_root) or "the start (no checkpoint)"
        raise ckpt.Preempted(
            f"stopped by {preempt.signal or 'a signal to another rank'} after step {state.step}; "
            f"trainer.resume=auto resumes from {saved}"
        )
    return state


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # The process's peak resident memory: VmHWM (which llmtrain-bench resets between runs)
    # where Linux has it, else ru_maxrss (KiB on Linux).
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def accelerator_broadcast(accelerator, value: str) -> str:
    """Rank 0's value on every rank (the run dir is chosen once, by the main process)."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def _exit(code: int, what: str, error: Exception) -> None:
    """Print why, record the code for a job script, and exit. A launcher (torchrun, accelerate
    launch) reports its own status rather than its workers', so with ``LLMTRAIN_EXIT_FILE`` set
    (the sbatch scripts set it) the code also goes to that file: 75 requeues, 2 does not."""
    print(f"llmtrain: {what}: {error}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    if path := os.environ.get("LLMTRAIN_EXIT_FILE"):
        with contextlib.suppress(OSError):
            Path(path).write_text(f"{code}\n")
    if code == ckpt.EXIT_PREEMPTED:
        # os._exit: gloo's teardown race (DISTRIBUTED_CPU.md) must not turn the code the job
        # script requeues on into an abort; the logger is already finished.
        os._exit(code)
    sys.exit(code)


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def _hydra_main(node: DictConfig) -> None:
    try:
        cfg = validate(to_dataclass(node), world_size=world_size_from_env())
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        train(cfg, run_dir)
    except ConfigError as e:
        _exit(2, "config error", e)
    except DataError as e:
        _exit(2, "data error", e)
    except ckpt.CheckpointError as e:
        _exit(2, "checkpoint error", e)
    except (ckpt.SaveError, ckpt.Diverged) as e:
        _exit(1, "stopped", e)
    except ckpt.Preempted as e:
        _exit(ckpt.EXIT_PREEMPTED, "preempted", e)


def main() -> None:
    """Console entry. Ranks other than 0 must not create their own run dir: they start in
    ``.`` (which exists, so Hydra creates nothing) and receive rank 0's dir by broadcast."""
    if int(os.environ.get("RANK", "0")) > 0 and not any(
        a.startswith("hydra.run.dir=") for a in sys.argv[1:]
    ):
        sys.argv.append("hydra.run.dir=.")
    _hydra_main()


if __name__ == "__main__":
    main()
