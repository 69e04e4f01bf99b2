"""``llmtrain-train`` (``python -m llmtrain.train``): the command line around the training loop.

Hydra composes the config; before it does, every override is checked (a sweep's at each
point), so a typo exits 2 rather than as Hydra's crash-like 1. Each way a run can end has its
exit code, which job scripts act on (README, "When things go wrong"): 0 done, 75 preempted or
out of time with a checkpoint (requeue), 2 an input to fix, 1 a failure a retry may cure, 130
a second Ctrl-C.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import sys
from pathlib import Path

import hydra
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
    compose_config,
    load_config,
    rank_from_env,
    to_dataclass,
    validate,
    world_size_from_env,
)
from llmtrain.data import DataError, StreamError
from llmtrain.helptext import hydra_help_with_comments
from llmtrain.run import LOCK
from llmtrain.signals import EXIT_PREEMPTED, Preempted
from llmtrain.train import NoGradient, OutOfTime, train

# Errors every rank meets alike (a config, a signal, a checkpoint they verified together) are
# printed once, by rank 0; the others may be one rank's own (its data, its disk).
ONE_RANK_ERRORS = (DataError, ckpt.SaveError)


def _exit(code: int, what: str, error: Exception | str, at_once: bool = True) -> None:
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
    if code == EXIT_PREEMPTED and at_once:
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
    except Preempted as e:
        # trainer.max_time is each sweep job's own budget: the sweep goes on to its next job
        # (one process: no launcher's teardown to race). A signal, or the Slurm job's end,
        # ends the sweep at once.
        go_on = isinstance(e, OutOfTime) and e.limit.why.startswith("trainer.max_time")
        message = _sweep_advice(str(e), run_dir)
        what = "out of time" if isinstance(e, OutOfTime) else "preempted"
        _exit(EXIT_PREEMPTED, what, message, at_once=not (go_on and _in_sweep()))
    except KeyboardInterrupt:  # the second Ctrl-C: no traceback, no checkpoint
        last = ckpt.latest_checkpoint(run_dir / "checkpoints") if run_dir else None
        _exit(130, "interrupted", "stopped at once, unsaved; " + (
            _sweep_advice(ckpt.go_on_from(last, run_dir), run_dir) if last
            else "no checkpoint was written yet"
        ))  # fmt: skip


def _sweep_advice(message: str, run_dir: Path | None) -> str:
    """A sweep's job dirs are made by -m under hydra.sweep.dir, which ignores hydra.run.dir:
    the way on is the same sweep again, in the same sweep dir, each job resuming its own."""
    if run_dir is None or not _in_sweep():
        return message
    sweep = Path(HydraConfig.get().sweep.dir)
    return message.replace(
        f"add {ckpt.resume_overrides(run_dir)} to the same command",
        f"run the same sweep (-m) again with {ckpt.resume_overrides(sweep, 'hydra.sweep.dir')}"
        " (each job goes on in its own dir)",
    )


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
        if sweep:  # Hydra's help cannot compose a sweep ("ambiguous value"): its first job's
            args = sys.argv[1:] = _first_job(args)
        # The overrides it shows applied are composed first: a typo is one line, not Hydra's
        # traceback. Composed only: help needs no horizon, nor any value checked.
        keys = [
            a
            for a in _config_dir_as_searchpath(args)
            if not a.startswith(("-", "hydra.")) or "searchpath" in a
        ]
        try:
            compose_config(keys)
        except ConfigError as e:
            _exit(2, "config error", e)
        if sweep:
            print(f"(the sweep's first job: {' '.join(keys)})")
        print(hydra_help_with_comments(_hydra_main), end="")
        return
    _check_overrides(args, sweep)
    _hydra_main()
    if failed := _SWEEP["failed"]:
        _exit(max(failed), "sweep", f"{len(failed)} of the sweep's {len(_SWEEP['jobs'])} jobs "
              "stopped (each one's reason is above); the others ran to their end")  # fmt: skip


def _config_dir_as_searchpath(args: list[str]) -> list[str]:
    """Hydra's --config-dir DIR (-cd DIR, --config-dir=DIR) as the hydra.searchpath entry it
    adds, so that composing here finds the user's own configs as Hydra will."""
    out: list[str] = []
    words = iter(args)
    for a in words:
        if a in ("--config-dir", "-cd"):
            a = f"{a}={next(words, '')}"
        flag, _, folder = a.partition("=")
        if flag in ("--config-dir", "-cd"):
            a = f"hydra.searchpath=[file://{Path(folder).resolve()}]"
        out.append(a)
    return out


def _first_job(args: list[str]) -> list[str]:
    """A sweep's command line as its first job's: no -m, each swept key at its first value."""
    job = []
    for a in args:
        if a in SWEEP_FLAGS or a == "hydra.mode=MULTIRUN":
            continue
        if not a.startswith("-"):
            try:
                (o,) = OverridesParser.create().parse_overrides([a])
            except OverrideParseException:  # composing it reports the error
                o = None
            if o is not None and o.is_sweep_override():
                a = f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}"
        job.append(a)
    return job


def _check_overrides(args: list[str], sweep: bool = False) -> None:
    """Compose the config once before Hydra does: a typo, an unknown option or a wrong type
    then exits 2 (and reaches LLMTRAIN_EXIT_FILE), which job scripts do not requeue; Hydra's
    own report of the same error exits 1, like a crash. A --config-dir is used; Hydra's other
    flags (--help, --cfg ...) leave the checks to Hydra; of hydra.* overrides the syntax is checked,
    hydra.searchpath (the user's own config dirs) is used, and the run dir must be one that can
    be made. A sweep is checked at every point (the first 256), not only its first job."""
    args = _config_dir_as_searchpath(args)
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
