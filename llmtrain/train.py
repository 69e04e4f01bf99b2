"""The training loop: ``train(cfg, run_dir)``; ``llmtrain-train`` and ``python -m
llmtrain.train`` run it from the command line (llmtrain/cli.py: Hydra, exit codes, sweeps).

llmtrain-train experiment=smoke
accelerate launch --config_file launch/cpu.yaml -m llmtrain.train experiment=smoke dist=ddp
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from llmtrain import checkpoint as ckpt
from llmtrain.config import (
    TrainConfig,
)
from llmtrain.dist import end_processes, is_deepspeed, process_scope
from llmtrain.metrics import Throughput
from llmtrain.model import attention_kernel
from llmtrain.optim import lr_at, set_lr
from llmtrain.report import log_eval, log_hellaswag, log_sample, log_train
from llmtrain.run import Run, run_dir_lock, setup
from llmtrain.signals import Preempted, preemption_signals, stop_with_launcher
from llmtrain.timelimit import Clock, Deadline, deadline


def batches(loader, stats: Throughput):
    """Endless (x, y) micro-batches; time spent waiting on data is added to ``stats``."""
    while True:
        for_start = time.perf_counter()
        for x, y in loader:
            stats.data_wait += time.perf_counter() - for_start
            yield x, y
            for_start = time.perf_counter()


def step_flags(accelerator, grad_norm, stop: bool) -> tuple[bool, bool, bool]:
    """(gradient finite, gradient all zero, stop) as every rank sees them: one tiny all-reduce
    and the step's one host sync. A signal can reach the ranks at slightly different steps;
    summing the flags makes all of them stop (and save) at the same step."""
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a replicated DTensor; collectives want local
        grad_norm = grad_norm.full_tensor()
    norm = torch.as_tensor(grad_norm, dtype=torch.float32).to(accelerator.device)
    flags = torch.stack(
        [(~torch.isfinite(norm)).float(), (norm == 0).float(), torch.full_like(norm, float(stop))]
    )
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags, reduction="sum")
    bad, zero, stops = flags.tolist()
    return bad == 0, zero > 0, stops > 0


def signalled(accelerator, requested: bool) -> bool:
    """Whether a preemption signal reached any rank (a tiny all-reduce where there are several)."""
    if accelerator.num_processes == 1:
        return requested
    flag = torch.tensor([float(requested)], device=accelerator.device)
    return accelerator.reduce(flag, reduction="sum").item() > 0


class NoGradient(RuntimeError):
    """The first step's gradients are all zero: the loss does not reach the parameters."""


def check_gradient_reaches(run: Run, zero: bool) -> None:
    """Stop at the first step whose gradients are all zero rather than spend the run on a
    model that cannot change. DeepSpeed's fp16 loss scaler may report an overflowed step so."""
    if zero and not (run.cfg.trainer.precision == "fp16" and is_deepspeed(run.cfg)):
        raise NoGradient(
            f"step {run.state.step + 1}: every gradient is zero, so the optimizer cannot change "
            "the model. Under trainer.compile on torch 2.11, a custom autograd function whose "
            "forward changes its output in place does this (pytorch/pytorch#180642): try "
            "trainer.compile=false, or torch 2.12 or later."
        )


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

    SIGTERM or SIGUSR1 make every rank finish its step, save, and raise ``Preempted``;
    so does the time limit (trainer.max_time, a Slurm job's end) a step before it.
    """
    limit = deadline(cfg.trainer.max_time)
    with (
        run_dir_lock(run_dir),
        preemption_signals() as preempt,
        process_scope(),
        attention_kernel(cfg.trainer.attention),
    ):
        stop_with_launcher()  # its SIGTERM: a preemption, now that the handler is in place
        state, stopped = _train(cfg, run_dir, preempt, limit, step_hook, final_save)
        end_processes()  # now that _train's frame, and the model in it, are gone
        if stopped is not None:
            raise stopped
        return state


def skip_step(run: Run) -> None:
    """A non-finite gradient norm: drop the step's gradients and count it; after
    trainer.max_bad_steps in a row, stop with ``ckpt.Diverged``."""
    state = run.state
    run.optimizer.zero_grad(set_to_none=run.cfg.trainer.set_to_none)
    if (scaler := getattr(run.accelerator, "scaler", None)) is not None:
        # fp16: what GradScaler.step does on an overflow, which it expects now and then: lower
        # the loss scale and end the step (else the next step's unscale_ raises).
        scaler.update()
    state.bad_steps += 1
    state.skipped_steps += 1
    run.say(
        f"step {state.step + 1}: non-finite gradient norm, step skipped "
        f"({state.bad_steps} in a row)"
    )
    if state.bad_steps >= run.cfg.trainer.max_bad_steps:
        # The skipped steps would otherwise reach metrics.jsonl only with the next log interval.
        record = {
            "step": state.step + 1,  # the step that failed; a resume before it drops this
            "tokens": state.tokens,
            "skipped_steps": state.skipped_steps,
            "bad_steps": state.bad_steps,
            "diverged": True,
        }
        run.log(record)
        last = ckpt.latest_checkpoint(run.ckpt_root)
        then = (
            f"The last good checkpoint is {last}; lower optim.lr or check the data, then "
            "resume from it."
            if last
            else "No checkpoint was written; lower optim.lr or check the data, and start again."
        )
        raise ckpt.Diverged(f"{state.bad_steps} consecutive non-finite steps; stopping. {then}")


def _train(
    cfg, run_dir, preempt, limit, step_hook, final_save
) -> tuple[ckpt.TrainerState, Preempted | None]:
    """The run, and the stop that ended it early, raised by ``train()`` once the process group
    is gone (:func:`llmtrain.dist.end_processes`)."""
    run = setup(cfg, run_dir)
    if limit is not None:
        run.say(f"  time limit {limit.describe()}")
    t, plan, state = cfg.trainer, run.plan, run.state
    accelerator, model, optimizer = run.accelerator, run.model, run.optimizer
    clip = cfg.optim.grad_clip or float("inf")  # inf: measure the norm, never clip
    throughput = Throughput()
    stream = batches(run.train_loader, throughput)
    # Each step's mean loss, summed over the log interval (a sum of micro-batch losses would
    # depend on grad_accum, which a resume may change); a resume goes on with the interval
    # the checkpoint was in: each rank with its own sum where the process count is the saved
    # one (every rank going on with the ranks' mean logged the interval's loss an ulp off).
    own = len(state.interval_losses) == accelerator.num_processes
    partial = state.interval_losses[accelerator.process_index] if own else state.interval_loss
    loss_sum = torch.tensor(partial, device=accelerator.device)
    step_loss = torch.zeros((), device=accelerator.device)
    interval_steps, last_saved = state.interval_steps, state.step
    model.train()

    def save(final: bool = False):
        # Every rank saves; the interval's loss is kept per rank and as the ranks' mean
        # (log_train's too), so a resume on another number of processes goes on with it as well.
        sums = accelerator.gather(loss_sum.reshape(1))  # (world,) in rank order
        state.interval_losses, state.interval_steps = sums.tolist(), interval_steps
        state.interval_loss = sums.mean().item()
        return run.save(final=final)

    def due(step: int) -> list[str]:  # what follows the step's training
        end = step == plan.max_steps
        return [
            kind
            for kind, every in (
                ("eval", t.eval_every),
                ("hellaswag", t.hellaswag_every),
                ("sample", t.sample_every),
            )
            if every and (step % every == 0 or end)
        ] + (["save"] if step % t.ckpt_every == 0 else [])

    stop = False  # a preemption signal reached some rank, or the time limit is near
    out_of_time = False
    clock = Clock(limit)

    def report(kind: str) -> None:  # timed: the time limit counts it in the next step's need
        with clock.pause(kind):
            {"eval": log_eval, "hellaswag": log_hellaswag, "sample": log_sample}[kind](run)

    if t.eval_at_start and state.step == 0:  # the baseline (a fine-tune's starting point)
        for kind in ("eval", "hellaswag"):
            if kind in due(0):
                report(kind)
        throughput.reset()
    first_step = True
    last_good = (lr_at(max(0, state.step - 1), cfg.optim, plan.max_steps), float("nan"))
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
        # Time for this step's rest, the next step and their pauses, then a final save?
        out_of_time = clock.out_of_time(2, due(state.step + 1) + due(state.step + 2))
        finite, zero, stop = step_flags(accelerator, grad_norm, preempt.requested or out_of_time)
        clock.step_done()
        if first_step:
            check_gradient_reaches(run, zero)
            first_step = False
        if not finite:
            if state.bad_steps + 1 >= t.max_bad_steps and interval_steps:
                # This skip stops the run: the steps its log interval trained (the blow-up
                # to debug) are logged first.
                log_train(run, loss_sum, interval_steps, *last_good, throughput)
            skip_step(run)  # raises ckpt.Diverged after trainer.max_bad_steps in a row
            if stop:
                break
            continue
        optimizer.step()
        optimizer.zero_grad(set_to_none=t.set_to_none)
        last_good = (lr, grad_norm)
        state.bad_steps = 0
        state.step += 1
        state.tokens += plan.tokens_per_step
        loss_sum += step_loss / plan.grad_accum
        interval_steps += 1
        throughput.tokens += plan.tokens_per_step
        if step_hook is not None:
            step_hook(state, throughput)

        last = state.step == plan.max_steps
        if state.step % t.log_every == 0 or last:
            log_train(run, loss_sum, interval_steps, lr, grad_norm, throughput)
            loss_sum.zero_()
            interval_steps = 0
            throughput.reset()
        # An evaluation, sample or save: seconds to minutes in which a signal may come.
        pauses = due(state.step)
        for kind in ("eval", "hellaswag", "sample"):
            if kind in pauses:
                report(kind)
        if "save" in pauses:
            with clock.pause("save"):
                if save() is not None:
                    last_saved = state.step
        if pauses:
            throughput.reset()
            if not stop and not last:  # stop here, not after one more step and another save
                out_of_time = clock.out_of_time(1, due(state.step + 1))
                stop = signalled(accelerator, preempt.requested or out_of_time)
        if stop:
            break

    stop = stop and state.step < plan.max_steps  # a signal on the last step: the run is done
    saved = ckpt.latest_checkpoint(run.ckpt_root) if last_saved == state.step else None
    if stop and saved is None:
        try:  # the previous checkpoint is intact if this fails; a requeue resumes from it
            with clock.pause("save"):
                saved = save(final=True)
        except ckpt.SaveError as e:
            if run.is_main:
                print(f"error: {e}", file=sys.stderr, flush=True)
    elif final_save and last_saved != state.step:
        save(final=True)
    run.metrics_file.close()
    run.logger.finish()
    if stop:
        saved = saved or ckpt.latest_checkpoint(run.ckpt_root)
        then = "no checkpoint was written, so the same command starts over"
        if preempt.signal:
            by = f"stopped by {preempt.signal}"
        elif out_of_time:
            by = f"stopped before the time limit ({limit.why})"
        else:
            by = "stopped by a signal or the time limit on another rank"
        message = f"{by} after step {state.step}; " + (
            ckpt.go_on_from(saved, run.run_dir) if saved else then
        )
        timed = out_of_time and not preempt.signal
        return state, OutOfTime(message, limit) if timed else Preempted(message)
    return state, None


class OutOfTime(Preempted):
    """This rank's time limit (trainer.max_time or the Slurm job's end) stopped the run."""

    def __init__(self, message: str, limit: Deadline) -> None:
        super().__init__(message)
        self.limit = limit


def main() -> None:
    """``llmtrain-train``: the command line, in llmtrain/cli.py."""
    from llmtrain.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
