"""Checkpoint integrity and safe loading.

Integrity: every checkpoint carries ``manifest.json``, the size and sha256 of each of its files.
The ranks share the hashing (largest files first, each to the least loaded rank), and hashing
reads a file that is still in the page cache, so it costs about one read of the checkpoint
spread over all ranks; the same pass fsyncs each file, so a machine crash after the rename
cannot leave a complete-looking directory with empty files. Resume checks the manifest before
loading: a flipped byte, a truncated shard or a missing file is named instead of being loaded.

Safe loading: a checkpoint is data, never code. Accelerate loads its files with
``torch.load(weights_only=True)``, but DeepSpeed's engine and its universal-checkpoint converter
pass ``weights_only=False``, and torch DCP unpickles its ``.metadata`` with plain ``pickle``.
:func:`safe_loading` forces ``weights_only=True`` on every ``torch.load`` while a checkpoint is
read (allowing the two DeepSpeed classes its optimizer files hold) and checks each DCP
``.metadata`` with an unpickler that refuses every global outside an allowlist.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

MANIFEST = "manifest.json"
CHUNK = 8 << 20  # bytes per read while hashing


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as it is; the message names the file."""


# --- collectives on Python objects (no-ops in a single process) --------------------------------


def rank_world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if rank_world()[1] == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    world = rank_world()[1]
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


# --- the manifest -------------------------------------------------------------------------------


def listing(root: Path) -> list[tuple[str, int]]:
    """(path relative to ``root``, size) of every file under ``root``, sorted."""
    return sorted(
        (p.relative_to(root).as_posix(), p.stat().st_size) for p in root.rglob("*") if p.is_file()
    )


def assign(files: list[tuple[str, int]], world: int) -> list[list[str]]:
    """Split files over ranks by size, largest first to the least loaded (same on every rank)."""
    load, shares = [0] * world, [[] for _ in range(world)]
    for name, size in sorted(files, key=lambda f: (-f[1], f[0])):
        r = load.index(min(load))
        shares[r].append(name)
        load[r] += size
    return shares


def sha256(path: Path, fsync: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
        if fsync:
            os.fsync(f.fileno())  # flushes the file's data even through a read-only handle
    return h.hexdigest()


def digest(root: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """Size and sha256 of ``names`` (this rank's share), each fsynced on the way."""
    return {
        n: {"size": (root / n).stat().st_size, "sha256": sha256(root / n, fsync=True)}
        for n in names
    }


def write_manifest(root: Path, entries: dict[str, dict[str, Any]]) -> None:
    text = json.dumps({"version": 1, "files": dict(sorted(entries.items()))}, indent=1)
    with open(root / MANIFEST, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` all at once: a crash leaves the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_manifest(ckpt: Path) -> dict[str, dict[str, Any]]:
    path = ckpt / MANIFEST
    try:
        files = json.loads(path.read_text())["files"]
        assert isinstance(files, dict)
        for name, entry in files.items():  # one flipped byte in a key must not pass as intact
            ok = isinstance(entry, dict) and isinstance(entry.get("size"), int)
            assert ok and isinstance(entry.get("sha256"), str), f"bad entry for {name!r}"
        return files
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the checkpoint cannot be verified") from None
    except (OSError, ValueError, KeyError, AssertionError) as e:
        raise CheckpointError(f"{path} is unreadable ({e})") from None


def check_files(ckpt: Path, entries: dict[str, dict[str, Any]], hashed: bool = True) -> str | None:
    """The first problem with ``entries`` (a share of the manifest) in ``ckpt``, or None;
    ``hashed=False`` checks presence and sizes only (seconds, not minutes, for billions of
    parameters)."""
    for name, want in sorted(entries.items()):
        path = ckpt / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != want["size"]:
            return f"{path} has {size} bytes, the manifest says {want['size']} (truncated?)"
        if hashed and sha256(path) != want["sha256"]:
            return f"{path} does not match its sha256 in {MANIFEST} (corrupted)"
    return None


def verify(ckpt: Path) -> str | None:
    """Every rank calls this; each hashes its share. The first problem (same on every rank), or
    None when the checkpoint is intact."""
    rank, world = rank_world()
    try:
        files = read_manifest(ckpt)
        problem = None
    except CheckpointError as e:
        files, problem = {}, str(e)
    if problem is None:
        mine = assign([(n, e["size"]) for n, e in files.items()], world)[rank]
        try:
            problem = check_files(ckpt, {n: files[n] for n in mine})
        except OSError as e:
            problem = f"{ckpt}: {e}"
    return next((p for p in gather(problem) if p), None)


# --- loading without arbitrary unpickling -------------------------------------------------------

# What torch DCP's .metadata pickles hold (torch 2.x): its own metadata dataclasses, sizes,
# dtypes and layouts, and the file paths of the storage entries.
DCP_MODULES = ("torch.distributed.checkpoint.metadata",)
DCP_GLOBALS = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


def _enum_member(cls: Any, name: Any) -> Any:
    """Stands in for ``builtins.getattr`` while unpickling. Some Python versions (3.11.2, the
    Debian 12 python, among them) pickle an Enum member as ``getattr(EnumClass, name)``: DCP's
    _MEM_FORMAT_ENCODING, DeepSpeed's ZeroStageEnum. Only that use is allowed; a getattr that
    would reach anything but an allowlisted Enum's member is refused."""
    if not (isinstance(cls, type) and issubclass(cls, enum.Enum) and name in cls.__members__):
        raise pickle.UnpicklingError(f"refusing getattr({cls!r}, {name!r}): not an Enum member")
    return cls[name]


class _RestrictedUnpickler(pickle.Unpickler):
    """pickle's documented pattern for untrusted data: refuse globals outside an allowlist."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("builtins", "getattr"):
            return _enum_member
        if (
            module in DCP_MODULES
            or (module, name) in DCP_GLOBALS
            or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load the global {module}.{name}")


def check_pickle(path: Path) -> None:
    """Unpickle ``path`` with the restricted unpickler; raise CheckpointError naming the file."""
    try:
        with open(path, "rb") as f:
            _RestrictedUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError) as e:
        raise CheckpointError(f"{path}: not a plain metadata pickle ({e}); refusing to load") from e


def _deepspeed_globals(ckpt: Path) -> list[Any]:
    """The classes DeepSpeed's ZeRO optimizer files hold (checked with
    torch.serialization.get_unsafe_globals_in_checkpoint on ZeRO-1/2/3 checkpoints)."""
    if not any(ckpt.glob("pytorch_model/*.pt")):
        return []
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


@contextlib.contextmanager
def safe_loading(ckpt: Path) -> Iterator[None]:
    """Inside: every ``torch.load`` is ``weights_only=True``, whoever calls it; DCP metadata in
    ``ckpt`` was checked first. A file that needs anything else fails with its name."""
    for meta in sorted(ckpt.rglob(".metadata")):
        check_pickle(meta)
    allowed = [*_deepspeed_globals(ckpt), (_enum_member, "builtins.getattr")]
    original = torch.load
    before = torch.serialization.get_safe_globals()

    def load(f: Any, map_location: Any = None, *_pickle_module: Any, **kwargs: Any) -> Any:
        kwargs.pop("pickle_module", None)  # weights_only refuses a custom pickle module
        kwargs["weights_only"] = True
        try:
            return original(f, map_location, **kwargs)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{f}: refusing to unpickle ({e})") from e

    torch.serialization.add_safe_globals(allowed)
    torch.load = load
    try:
        yield
    finally:
        torch.load = original
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)
