"""``llmtrain-train`` / ``python -m llmtrain.train``: the Hydra entry point and the training loop.

llmtrain-train experiment=smoke
accelerate launch --config_file launch/cpu.yaml -m llmtrain.train experiment=smoke dist=ddp
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig

from llmtrain import checkpoint as ckpt
from llmtrain.config import (
    CONF_DIR,
    DATED_DIR,
    ConfigError,
    TrainConfig,
    load_config,
    rank_from_env,
    to_dataclass,
    validate,
    world_size_from_env,
)
from llmtrain.data import DataError, StreamError
from llmtrain.dist import is_deepspeed, process_scope
from llmtrain.helptext import hydra_help_with_comments
from llmtrain.metrics import Throughput
from llmtrain.model import attention_kernel
from llmtrain.optim import lr_at, set_lr
from llmtrain.report import log_eval, log_sample, log_train
from llmtrain.run import LOCK, Run, run_dir_lock, setup
from llmtrain.timelimit import Clock, deadline


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

    SIGTERM or SIGUSR1 make every rank finish its step, save, and raise ``ckpt.Preempted``;
    so does the time limit (trainer.max_time, a Slurm job's end) a step before it.
    """
    limit = deadline(cfg.trainer.max_time)
    with (
        run_dir_lock(run_dir),
        ckpt.preemption_signals() as preempt,
        process_scope(),
        attention_kernel(cfg.trainer.attention),
    ):
        return _train(cfg, run_dir, preempt, limit, step_hook, final_save)


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


def _train(cfg, run_dir, preempt, limit, step_hook, final_save) -> ckpt.TrainerState:
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
    # the checkpoint was in.
    loss_sum = torch.tensor(state.interval_loss, device=accelerator.device)
    step_loss = torch.zeros((), device=accelerator.device)
    interval_steps, last_saved = state.interval_steps, state.step
    model.train()

    def save(final: bool = False):
        # Every rank saves; the interval's loss is kept as the ranks' mean (log_train's too),
        # so a resume on another number of processes goes on with it as well.
        partial = accelerator.reduce(loss_sum.clone(), reduction="mean")
        state.interval_loss, state.interval_steps = partial.item(), interval_steps
        return run.save(final=final)

    def due(step: int) -> list[str]:  # what follows the step's training
        end = step == plan.max_steps
        return [
            kind
            for kind, every in (("eval", t.eval_every), ("sample", t.sample_every))
            if every and (step % every == 0 or end)
        ] + (["save"] if step % t.ckpt_every == 0 else [])

    stop = False  # a preemption signal reached some rank, or the time limit is near
    out_of_time = False
    clock = Clock(limit)
    if t.eval_at_start and state.step == 0:  # the baseline (a fine-tune's starting point)
        with clock.pause("eval"):
            log_eval(run)
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
        if "eval" in pauses:
            with clock.pause("eval"):
                log_eval(run)
        if "sample" in pauses:
            with clock.pause("sample"):
                log_sample(run)
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
    # Every rank at the same point before end_training() destroys the process group: a rank
    # tearing it down while another still finishes can hang that one (pytorch/pytorch#75097).
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if stop:
        saved = saved or ckpt.latest_checkpoint(run.ckpt_root)
        then = "no checkpoint was written, so the same command starts over"
        if preempt.signal:
            by = f"stopped by {preempt.signal}"
        elif out_of_time:
            by = f"stopped before the time limit ({limit.why})"
        else:
            by = "stopped by a signal or the time limit on another rank"
        raise ckpt.Preempted(
            f"{by} after step {state.step}; "
            + (ckpt.go_on_from(saved, run.run_dir) if saved else then)
        )
    return state


# Errors every rank meets alike (a config, a signal, a checkpoint they verified together) are
# printed once, by rank 0; the others may be one rank's own (its data, its disk).
ONE_RANK_ERRORS = (DataError, ckpt.SaveError)


def _exit(code: int, what: str, error: Exception | str) -> None:
    """Print why, record the code for a job script, and exit. A launcher (torchrun, accelerate
    launch) reports its own status rather than its workers', so with ``LLMTRAIN_EXIT_FILE`` set
    (the sbatch scripts set it) the code also goes to that file: 75 requeues, 2 does not."""
    rank = rank_from_env()
    if rank == 0 or isinstance(error, ONE_RANK_ERRORS):
        where = f" (rank {rank})" if rank else ""
        print(f"llmtrain{where}: {what}: {error}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    if path := os.environ.get("LLMTRAIN_EXIT_FILE"):
        with contextlib.suppress(OSError):
            Path(path).write_text(f"{code}\n")
    if code == ckpt.EXIT_PREEMPTED:
        # os._exit: gloo's teardown race (DISTRIBUTED_CPU.md) must not turn the code the job
        # script requeues on into an abort; the logger is already finished.
        os._exit(code)
    sys.exit(code)


# A sweep's (-m) jobs run, and the exit codes of those that stopped: it goes on to the next.
_SWEEP: dict[str, list[int]] = {"jobs": [], "failed": []}
SWEEP_FLAGS = ("-m", "--multirun")


def _in_sweep() -> bool:
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:  # no Hydra job running
        return False


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def _hydra_main(node: DictConfig) -> None:
    """One job. In a sweep, a job that stops (diverged, a bad value for it, its data) exits
    with its code after the others have run, not before them; a preemption or Ctrl-C still
    ends the sweep at once."""
    sweep = _in_sweep()
    if sweep:
        _SWEEP["jobs"].append(HydraConfig.get().job.num)
    try:
        _job(node)
    except SystemExit as e:
        _drop_if_empty(Path(HydraConfig.get().runtime.output_dir))
        if not sweep or e.code == 130:
            raise
        _SWEEP["failed"].append(int(e.code or 0))
        wandb = sys.modules.get("wandb")  # a run stopped midway left its W&B run open
        if wandb is not None and getattr(wandb, "run", None) is not None:
            wandb.finish(exit_code=int(e.code or 0))


def _drop_if_empty(run_dir: Path) -> None:
    """A run refused before it wrote anything (a config, data or launch error) leaves no empty
    run dir behind, nor an empty dated dir (runs/<date>/) above Hydra's default one. Rank 0
    only: the others run in ``.``."""
    if rank_from_env() == 0 and run_dir.resolve() != Path.cwd().resolve():
        with contextlib.suppress(OSError):  # not empty, or already gone
            if [p.name for p in run_dir.iterdir()] == [LOCK]:  # the run dir lock's file only
                (run_dir / LOCK).unlink()
            run_dir.rmdir()
            if re.fullmatch(DATED_DIR, run_dir.parent.name):
                run_dir.parent.rmdir()


def _job(node: DictConfig) -> None:
    run_dir = None
    try:
        cfg = validate(to_dataclass(node), world_size=world_size_from_env())
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        train(cfg, run_dir)
    except ConfigError as e:
        _exit(2, "config error", e)
    except StreamError as e:  # the network: a later try may work
        _exit(1, "data stream unreachable", e)
    except DataError as e:
        _exit(2, "data error", e)
    except ckpt.CheckpointError as e:
        _exit(2, "checkpoint error", e)
    except (ckpt.Diverged, NoGradient) as e:  # the same again from a checkpoint: not requeued
        _exit(2, "stopped", e)
    except ckpt.SaveError as e:
        _exit(1, "stopped", e)
    except ckpt.Preempted as e:
        _exit(ckpt.EXIT_PREEMPTED, "preempted", e)
    except KeyboardInterrupt:  # the second Ctrl-C: no traceback, no checkpoint
        last = ckpt.latest_checkpoint(run_dir / "checkpoints") if run_dir else None
        _exit(130, "interrupted", "stopped at once, unsaved; " + (
            ckpt.go_on_from(last, run_dir) if last else "no checkpoint was written yet"
        ))  # fmt: skip


def main() -> None:
    """Console entry. Ranks other than 0 must not create their own run dir: they start in
    ``.`` (which exists, so Hydra creates nothing) and receive rank 0's dir by broadcast."""
    if rank_from_env() > 0 and not any(a.startswith("hydra.run.dir=") for a in sys.argv[1:]):
        sys.argv.append("hydra.run.dir=.")
    args = sys.argv[1:]
    for record in _SWEEP.values():
        record.clear()
    sweep = any(a in SWEEP_FLAGS for a in args) or "hydra.mode=MULTIRUN" in args
    if sweep and "RANK" in os.environ:
        _exit(2, "config error", "-m/--multirun: a sweep runs its jobs one after another in one "
              "process, and a launcher's process group ends with the first job; start one launch "
              "per sweep point (a shell loop over accelerate launch or sbatch), or sweep without "
              "a launcher")  # fmt: skip
    if "--help" in args or "-h" in args:  # Hydra's, with what each setting means
        print(hydra_help_with_comments(_hydra_main), end="")
        return
    _check_overrides(args, sweep)
    _hydra_main()
    if failed := _SWEEP["failed"]:
        _exit(max(failed), "sweep", f"{len(failed)} of the sweep's {len(_SWEEP['jobs'])} jobs "
              "stopped (each one's reason is above); the others ran to their end")  # fmt: skip


def _check_overrides(args: list[str], sweep: bool = False) -> None:
    """Compose the config once before Hydra does: a typo, an unknown option or a wrong type
    then exits 2 (and reaches LLMTRAIN_EXIT_FILE), which job scripts do not requeue; Hydra's
    own report of the same error exits 1, like a crash. Hydra's other flags (--help, --cfg,
    --config-dir ...) are left to Hydra; of hydra.* overrides the syntax is checked,
    hydra.searchpath (the user's own config dirs) is used, and the run dir must be one that can
    be made. A sweep is checked at every point (the first 256), not only its first job."""
    if any(a.startswith("-") and a not in SWEEP_FLAGS for a in args):
        return
    dir_key = "hydra.sweep.dir" if sweep else "hydra.run.dir"
    run_dir = "multirun" if sweep else "runs"  # the defaults' first part, before ${now:...}
    values: list[list[str]] = []  # each override's values: one, or every value of a sweep
    for a in (a for a in args if not a.startswith("-")):
        try:
            (o,) = OverridesParser.create().parse_overrides([a])
        except OverrideParseException as e:  # hydra.run.dir=runs/lr=3e-4, for one
            _exit(2, "config error", f"{a}: {str(e).splitlines()[0]} (quote the value: '...')")
        if o.key_or_group.split(".")[0].split("/")[0] == "hydra":
            if o.key_or_group == "hydra.searchpath":
                values.append([a])
            elif o.key_or_group == dir_key:
                run_dir = str(o.value())
            continue
        if sweep and o.is_sweep_override():
            values.append([f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()])
        else:
            values.append([a])
    # A compose takes ~0.1 s (256 points: under half a minute); a bad value in a sweep's
    # seventh job would otherwise be found after six whole runs.
    for point in itertools.islice(itertools.product(*values), 256):
        try:
            load_config(list(point))
        except ConfigError as e:
            where = f" (in the sweep's job with {' '.join(point)})" if sweep else ""
            _exit(2, "config error", f"{e}{where}")
    # Hydra makes the run dir before the job starts: one it cannot make was a traceback.
    if problem := _unmakeable(run_dir):
        _exit(2, "config error", f"{dir_key}={run_dir}: {problem}; choose another {dir_key}")


def _unmakeable(path: str) -> str | None:
    """Why directory ``path`` cannot be made and written in (None: it can): its nearest
    existing ancestor must be a directory this process may write."""
    p = Path(path).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        return f"{p} is a file, not a directory"
    if not os.access(p, os.W_OK | os.X_OK):
        return f"{p} is not writable"
    return None


if __name__ == "__main__":
    main()
