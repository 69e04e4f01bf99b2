"""Checkpoints: atomic directories, a ``latest`` pointer, keep-last-K, exact resume, and what
happens when things go wrong (see "When things go wrong" in the README).

Layout of ``RUN_DIR/checkpoints/``::

    step_0000060/            one complete checkpoint
        model.safetensors     (or DeepSpeed / FSDP shards: whatever accelerator.save_state writes)
        optimizer.bin, scheduler.bin, random_states_<rank>.pkl   (Accelerate)
        trainer_state.json    the loop's counters (TrainerState): step, tokens, world size...
        data_state_<rank>.pt  each rank's data-pipeline position
        config.yaml           the resolved config: the model's shape, resume checks
        receipt.json          package version, git sha, torch version
        manifest.json         size and sha256 of every file above (llmtrain/integrity.py)
    latest                   a text file naming the newest complete checkpoint

A checkpoint is written under ``step_XXXXXXX.tmp``, hashed and fsynced, and renamed only once
every rank has finished, so a crash mid-save never leaves a directory that looks complete; the
next save removes the leftover. A failed write on any rank (disk full, read-only directory)
fails the save on every rank and leaves the previous checkpoint and ``latest`` as they were.
Weights with a NaN or inf are never saved. Which checkpoint a run resumes from, and whether it
is intact and fits the model, is ``llmtrain/resume.py``.

A signal (a preemption, Ctrl-C) or the time limit stops a run with one more save:
``llmtrain/signals.py``, ``llmtrain/timelimit.py``.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import re
import shlex
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from llmtrain.config import TrainConfig, config_from_dict, config_to_yaml
from llmtrain.integrity import (
    MANIFEST,
    CheckpointError,
    assign,
    broadcast,
    check_files,
    digest,
    fsync_dir,
    gather,
    listing,
    rank_world,
    read_manifest,
    write_atomic,
    write_manifest,
)

STEP_DIR = re.compile(r"^step_(\d{7,})$")
TRAINER_STATE = "trainer_state.json"
T = TypeVar("T")


class SaveError(RuntimeError):
    """A checkpoint could not be written; the previous one and ``latest`` are untouched."""


class Diverged(RuntimeError):
    """Training went non-finite beyond recovery; the message names the last good checkpoint."""


def resume_overrides(run_dir: Path, key: str = "hydra.run.dir") -> str:
    """What to add to the same command to go on from ``run_dir``'s latest checkpoint, as shell
    words. The run dir is named: by default each start makes a new dated one, where
    ``trainer.resume=auto`` alone would find nothing and start over. (A sweep's jobs go on
    with ``key="hydra.sweep.dir"``, the dir holding theirs.)"""
    value = str(run_dir)
    if not re.fullmatch(r"[\w./+@%:-]+", value, flags=re.ASCII):  # Hydra would parse it
        value = "'" + value.replace("'", "\\'") + "'"
    return f"trainer.resume=auto {shlex.quote(f'{key}={value}')}"


def go_on_from(saved: Path, run_dir: Path) -> str:
    """How to go on from checkpoint ``saved`` of the run in ``run_dir``, as a user reads it."""
    return f"go on from {saved}: add {resume_overrides(run_dir)} to the same command"


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps completed
    tokens: int = 0  # global training tokens consumed
    world_size: int = 1
    bad_steps: int = 0  # consecutive non-finite steps skipped (resets on a good step)
    skipped_steps: int = 0  # non-finite steps skipped over the whole run
    # The log interval in progress (its steps' mean losses summed), so the first line after
    # a resume averages the same steps as an uninterrupted run's: the ranks' mean, and each
    # rank's own sum (rank order), which a resume on as many processes goes on with.
    interval_loss: float = 0.0
    interval_steps: int = 0
    interval_losses: list[float] = field(default_factory=list)
    init_from: str | None = None  # the checkpoint whose weights the run started from, if any


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first (``.tmp`` leftovers are not listed)."""
    if not ckpt_root.is_dir():
        return []
    found = [
        p
        for p in ckpt_root.iterdir()
        if p.is_dir() and STEP_DIR.match(p.name) and (p / TRAINER_STATE).is_file()
    ]
    return sorted(found, key=_step)


def candidates(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints to resume from, best first: ``latest``'s target, then newest first."""
    found = complete_checkpoints(ckpt_root)[::-1]
    pointer = ckpt_root / "latest"
    if pointer.is_file():
        with contextlib.suppress(OSError, UnicodeDecodeError):
            target = ckpt_root / pointer.read_text().strip()
            if target in found:
                found.remove(target)
                found.insert(0, target)
    return found


def roll_back(ckpt_root: Path, target: Path) -> list[Path]:
    """A run resuming an earlier checkpoint of its own: point ``latest`` at it, so a crash
    before the new branch's first save resumes (resume=auto) there, and a divergence names
    it, not the abandoned branch. Returns that branch (``prune`` removes it at that save)."""
    if target.parent.resolve() != ckpt_root.resolve():
        return []
    later = [c for c in complete_checkpoints(ckpt_root) if _step(c) > _step(target)]
    if later:
        write_atomic(ckpt_root / "latest", target.name)  # as save() writes it
    return later


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint: the ``latest`` pointer if valid, else the newest dir."""
    found = candidates(ckpt_root)
    return found[0] if found else None


HINTS = {
    errno.ENOSPC: "the disk is full: free space or point hydra.run.dir at a larger disk",
    errno.EDQUOT: "the disk quota is exceeded: free space or point hydra.run.dir elsewhere",
    errno.EFBIG: "a file exceeds the size limit (ulimit -f or the file system's)",
    errno.EACCES: "the run dir is not writable by this user",
    errno.EPERM: "the run dir does not allow writing",
    errno.EROFS: "the run dir is on a read-only file system",
}


def _describe(e: OSError, where: Path) -> str:
    hint = HINTS.get(e.errno or 0)
    return f"{e.filename or where}: {e.strerror or e}" + (f" ({hint})" if hint else "")


def _describe_write(e: Exception, where: Path) -> str:
    """A failed checkpoint write as one line. The writers do not raise OSError for a full disk:
    safetensors raises SafetensorError ("... No space left on device (os error 28)") and
    torch.save's zip writer a RuntimeError ("unexpected pos 25767936 vs 25767824") that names
    no OS error at all; a file system left with no free space then gets the ENOSPC hint."""
    if isinstance(e, OSError):
        return _describe(e, where)
    text = " ".join(str(e).split()) or "no message"
    code = int(m.group(1)) if (m := re.search(r"\(os error (\d+)\)", text)) else None
    if code is None:
        with contextlib.suppress(OSError):
            if shutil.disk_usage(where if where.exists() else where.parent).free < 1 << 20:
                code = errno.ENOSPC
    hint = HINTS.get(code or 0)
    return f"{where}: {type(e).__name__}: {text}" + (f" ({hint})" if hint else "")


def _free_space_problem(ckpt_root: Path) -> str | None:
    """Refuse early when the last checkpoint's size is more than the free space: a write that
    fails halfway through DeepSpeed's save could leave the other ranks waiting in a collective."""
    last = latest_checkpoint(ckpt_root)
    if last is None:
        return None
    try:
        need = sum(e["size"] for e in read_manifest(last).values())
    except CheckpointError:
        return None
    free = shutil.disk_usage(ckpt_root).free
    if free >= need:
        return None
    err = OSError(errno.ENOSPC, f"{free / 1e9:.2f} GB free, the last checkpoint took "
                  f"{need / 1e9:.2f} GB", str(ckpt_root))  # fmt: skip
    return _describe(err, ckpt_root)


def local_shard(p: torch.Tensor) -> torch.Tensor:
    """The part of parameter ``p`` this rank stores: its ZeRO-3 partition (``p`` itself is an
    empty placeholder then), its FSDP2 DTensor shard, or ``p`` whole."""
    if hasattr(p, "ds_tensor"):
        return p.ds_tensor
    return p.to_local() if hasattr(p, "to_local") else p


def nonfinite_parameter(model: torch.nn.Module) -> str | None:
    """The name of the first parameter with a NaN or inf in this rank's part, or None."""
    names, flags = [], []
    for name, p in model.named_parameters():
        t = local_shard(p)
        if t.numel():
            names.append(name)
            flags.append(torch.isfinite(t.detach()).all())
    if not flags:
        return None
    ok = torch.stack(flags).cpu()  # one host sync for the whole model
    return None if bool(ok.all()) else names[int((~ok).nonzero()[0])]


def save_checkpoint(
    accelerator,
    ckpt_root: Path,
    state: TrainerState,
    data_state: dict[str, Any],
    cfg: TrainConfig,
    receipt: dict[str, str],
    keep_last: int,
    model: torch.nn.Module | None = None,
    abandoned: list[Path] | tuple[Path, ...] = (),
) -> Path:
    """Every rank calls this; returns the final checkpoint directory.

    Raises Diverged (on every rank) when ``model`` holds a non-finite weight, and SaveError when
    any rank fails to write; neither leaves anything but the previous checkpoints behind.
    """
    final = ckpt_root / step_dir_name(state.step)
    tmp = ckpt_root / (final.name + ".tmp")
    main, rank = accelerator.is_main_process, accelerator.process_index
    previous = latest_checkpoint(ckpt_root)

    bad = [b for b in gather(nonfinite_parameter(model) if model is not None else None) if b]
    if bad:
        raise Diverged(
            f"step {state.step}: the weights hold NaN or inf (first: {bad[0]}); refusing to save "
            f"them. The last good checkpoint is {previous or 'none (none was written)'}; lower "
            "optim.lr or check the data, then resume from it."
        )

    def agree(error: str | None) -> None:
        errors = [e for e in gather(error) if e]
        if errors:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise SaveError(
                f"checkpoint {final.name} not saved: {errors[0]}. The previous checkpoint "
                f"{previous or '(none)'} is intact and {ckpt_root / 'latest'} is unchanged."
            )

    error = None
    if main:
        try:
            ckpt_root.mkdir(parents=True, exist_ok=True)
            for stale in [*ckpt_root.glob("step_*.tmp"), ckpt_root / "latest.tmp"]:
                remove_leftover(stale)
            error = _free_space_problem(ckpt_root)
            if error is None:
                tmp.mkdir()
        except OSError as e:
            error = _describe(e, ckpt_root)
    agree(error)

    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
        torch.save(data_state, tmp / f"data_state_{rank}.pt")
        if main:
            (tmp / "config.yaml").write_text(config_to_yaml(cfg))
            (tmp / "receipt.json").write_text(json.dumps(receipt, indent=2))
            (tmp / TRAINER_STATE).write_text(json.dumps(asdict(state), indent=2))
            if (weights := tmp / "model.safetensors").is_file():
                # safetensors creates it 0600; give it the mode (umask) the other files got
                os.chmod(weights, (tmp / TRAINER_STATE).stat().st_mode & 0o777)
    except Exception as e:  # noqa: BLE001 -- every rank must reach agree(), or the others hang
        error = _describe_write(e, tmp)
    agree(error)

    # Every rank hashes (and fsyncs) a share of the files, largest first; rank 0 lists them.
    files = broadcast(listing(tmp) if main else None)
    entries = {}
    try:
        entries = digest(tmp, assign(files, rank_world()[1])[rank])
    except OSError as e:
        error = _describe(e, tmp)
    agree(error)
    parts = gather(entries)

    if main:
        try:
            write_manifest(tmp, {k: v for part in parts for k, v in part.items()})
            fsync_dir(tmp)
            shutil.rmtree(final, ignore_errors=True)
            # `latest` before the rename: a crash between the two leaves it naming a directory
            # that does not exist yet, which resume passes over (to the previous checkpoint).
            # After the rename it left `latest` on the previous step beside this complete one,
            # and resume=auto went back to it.
            write_atomic(ckpt_root / "latest", final.name)
            os.replace(tmp, final)
            fsync_dir(ckpt_root)
        except OSError as e:
            error = _describe(e, final)
            with contextlib.suppress(OSError):
                if not final.is_dir():  # the rename failed: `latest` goes back as it was
                    if previous is not None:
                        write_atomic(ckpt_root / "latest", previous.name)
                    else:
                        (ckpt_root / "latest").unlink(missing_ok=True)
    agree(error)
    if main:
        prune(ckpt_root, final, keep_last, abandoned)
    accelerator.wait_for_everyone()
    return final


def remove_leftover(stale: Path) -> None:
    """Remove a crashed save's (or removal's) leftover. One that cannot go (a checkpoint made
    read-only, then rotated out by keep_last) is named and left: it stopped every later save."""
    try:
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()
    except OSError as e:
        print(f"checkpoint: cannot remove the leftover {stale} ({e.strerror or e}); remove it "
              "by hand", flush=True)  # fmt: skip


def prune(
    ckpt_root: Path, final: Path, keep_last: int, abandoned: list[Path] | tuple[Path, ...] = ()
) -> None:
    """Keep ``final`` (just written) and the ``keep_last - 1`` before it. After a rollback
    (this run resumed an older step of its own), checkpoints past ``final`` are the abandoned
    branch: they go too, or a later resume=auto could fall back onto them (another history);
    so do those ``roll_back`` named (``abandoned``), also where ``final`` is past them."""
    step = _step(final)
    gone = {c.name for c in abandoned}
    others = [c for c in complete_checkpoints(ckpt_root) if c != final]
    abandoned = [c for c in others if _step(c) > step or c.name in gone]
    before = [c for c in others if _step(c) < step and c.name not in gone]
    if abandoned:
        print(
            f"checkpoint: removed {', '.join(c.name for c in abandoned)}, the branch abandoned "
            f"when this run resumed an earlier step",
            flush=True,
        )
    for old in abandoned + before[: max(0, len(before) - (keep_last - 1))]:
        # Renamed out of every listing first: a kill mid-removal leaves a step_N.tmp, which the
        # next save removes, not a step_N without its trainer_state.json that nothing removes.
        doomed = old.with_name(old.name + ".tmp")
        try:
            os.replace(old, doomed)
        except OSError:
            doomed = old
        shutil.rmtree(doomed, ignore_errors=True)


def _step(ckpt: Path) -> int:
    return int(STEP_DIR.match(ckpt.name).group(1))


def saved_config(ckpt: Path) -> TrainConfig:
    """The checkpoint's config.yaml, checked against the manifest first: a damaged one is a
    CheckpointError naming it, as a damaged weight file is."""
    import yaml

    path = ckpt / "config.yaml"
    listed = read_manifest(ckpt) if (ckpt / MANIFEST).is_file() else {}
    if path.name in listed and (problem := check_files(ckpt, {path.name: listed[path.name]})):
        raise CheckpointError(problem)
    try:
        return config_from_dict(yaml.safe_load(path.read_text()))
    except (yaml.YAMLError, ValueError) as e:  # ConfigError is a ValueError
        raise CheckpointError(f"{path}: {str(e).splitlines()[0]}") from None


def resolve_checkpoint(path: str | Path) -> Path:
    """A step directory, a ``checkpoints/`` root (or its ``latest``) or a run directory -> one
    complete checkpoint."""
    return _with_config(checkpoints_in(path)[0])


def checkpoints_in(path: str | Path) -> list[Path]:
    """A step directory -> [it]; a ``checkpoints/`` root (or its ``latest``) or a run
    directory -> its complete checkpoints, best first (as trainer.resume=auto orders them)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint or run directory")
    if path.name == "latest" and path.is_file():  # the pointer: what it names, as resume does
        path = path.parent
    if not path.is_dir():
        raise NotADirectoryError(f"{path}: not a directory; give a step_XXXXXXX or run directory")
    if (path / TRAINER_STATE).is_file():
        return [path]
    if STEP_DIR.match(path.name.removesuffix(".tmp")):
        raise FileNotFoundError(
            f"{path}: incomplete checkpoint (no {TRAINER_STATE}: its save never finished); "
            "use an older step_XXXXXXX directory or the run directory"
        )
    found = candidates(path / "checkpoints") or candidates(path)
    if not found:
        raise FileNotFoundError(
            f"{path}: no complete llmtrain checkpoint inside (expected a step_XXXXXXX "
            f"directory with {TRAINER_STATE}, a checkpoints/ directory or a run directory)"
        )
    return found


def _with_config(ckpt: Path) -> Path:
    if not (ckpt / "config.yaml").is_file():
        raise FileNotFoundError(f"{ckpt / 'config.yaml'} is missing: the model shape is unknown")
    return ckpt


def read_newest_intact(path: str | Path, read: Callable[[Path], T]) -> T:
    """``read(checkpoint)`` for the checkpoint ``path`` names. Given a run or ``checkpoints/``
    directory, a checkpoint whose files are damaged (``read`` raises CheckpointError) is
    skipped, saying so on stderr, for the one before it, as trainer.resume=auto does; a named
    step directory is read or fails."""
    found = checkpoints_in(path)
    for ckpt, older in itertools.pairwise(found):
        try:
            return read(_with_config(ckpt))
        except CheckpointError as e:
            print(f"skipping damaged checkpoint {ckpt}: {e}; trying {older}", file=sys.stderr)
    return read(_with_config(found[-1]))


def load_trainer_state(ckpt: Path) -> TrainerState:
    return TrainerState(**json.loads((ckpt / TRAINER_STATE).read_text()))
