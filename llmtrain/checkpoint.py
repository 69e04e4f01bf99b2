"""Checkpoints: atomic directories, a ``latest`` pointer, keep-last-K, exact resume.

Layout of ``RUN_DIR/checkpoints/``::

    step_0000060/            one complete checkpoint
        model.safetensors     (or DeepSpeed / FSDP shards: whatever accelerator.save_state writes)
        optimizer.bin, scheduler.bin, random_states_<rank>.pkl   (Accelerate)
        trainer_state.json    step, tokens seen, world size
        data_state_<rank>.pt  each rank's data-pipeline position
        config.yaml           the resolved config, for load_model and resume checks
        receipt.json          package version, git sha, torch version
    latest                   a text file naming the newest complete checkpoint

A checkpoint is written under ``step_XXXXXXX.tmp`` and renamed only once every rank has
finished writing, so a crash mid-save never leaves a directory that looks complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from llmtrain.config import ConfigError, ModelConfig, TrainConfig, config_from_dict, config_to_yaml

STEP_DIR = re.compile(r"^step_(\d{7,})$")
TRAINER_STATE = "trainer_state.json"


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps completed
    tokens: int = 0  # global training tokens consumed
    world_size: int = 1
    bad_steps: int = 0  # non-finite steps skipped so far


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
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint: the ``latest`` pointer if valid, else the newest dir."""
    pointer = ckpt_root / "latest"
    if pointer.is_file():
        candidate = ckpt_root / pointer.read_text().strip()
        if (candidate / TRAINER_STATE).is_file():
            return candidate
    found = complete_checkpoints(ckpt_root)
    return found[-1] if found else None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(
    accelerator,
    ckpt_root: Path,
    state: TrainerState,
    data_state: dict[str, Any],
    cfg: TrainConfig,
    receipt: dict[str, str],
    keep_last: int,
) -> Path:
    """Every rank calls this; returns the final checkpoint directory."""
    final = ckpt_root / step_dir_name(state.step)
    tmp = ckpt_root / (final.name + ".tmp")
    if accelerator.is_main_process:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover from a crashed save
        tmp.mkdir()
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    torch.save(data_state, tmp / f"data_state_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "config.yaml").write_text(config_to_yaml(cfg))
        (tmp / "receipt.json").write_text(json.dumps(receipt, indent=2))
        (tmp / TRAINER_STATE).write_text(json.dumps(asdict(state), indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_atomic(ckpt_root / "latest", final.name)
        for old in complete_checkpoints(ckpt_root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resolve_resume(resume: str, ckpt_root: Path) -> Path | None:
    """``none`` -> None; ``auto`` -> newest complete checkpoint in this run (or None);
    anything else is a checkpoint directory (or a checkpoints/ root) that must exist."""
    if resume == "none":
        return None
    if resume == "auto":
        return latest_checkpoint(ckpt_root)
    path = Path(resume)
    if (path / TRAINER_STATE).is_file():
        return path
    found = latest_checkpoint(path) or latest_checkpoint(path / "checkpoints")
    if found is None:
        raise ConfigError(
            f"trainer.resume: {resume!r} is not a complete checkpoint directory (it has no "
            f"{TRAINER_STATE}) and holds none; use trainer.resume=auto or a step_XXXXXXX dir"
        )
    return found


def saved_config(ckpt: Path) -> TrainConfig:
    import yaml

    return config_from_dict(yaml.safe_load((ckpt / "config.yaml").read_text()))


SHAPE_KEYS = (
    "n_layer",
    "n_head",
    "n_kv_head",
    "n_embd",
    "ffn_hidden",
    "vocab_size",
    "vocab_pad_multiple",
    "position",
    "norm",
    "mlp",
    "bias",
    "tie_embeddings",
)


def check_compatible(saved: ModelConfig, current: ModelConfig, ckpt: Path) -> None:
    """Refuse to resume into a model of another shape, naming every key that differs."""
    diffs = [
        f"model.{k}: checkpoint {getattr(saved, k)!r}, config {getattr(current, k)!r}"
        for k in SHAPE_KEYS
        if getattr(saved, k) != getattr(current, k)
    ]
    if diffs:
        raise ConfigError(
            f"cannot resume from {ckpt}: the model shape differs\n  "
            + "\n  ".join(diffs)
            + "\nResume with the checkpoint's model settings, or start a new run "
            "(trainer.resume=none, another hydra.run.dir)."
        )


def load_trainer_state(ckpt: Path) -> TrainerState:
    return TrainerState(**json.loads((ckpt / TRAINER_STATE).read_text()))


def load_data_state(ckpt: Path, rank: int) -> dict[str, Any] | None:
    path = ckpt / f"data_state_{rank}.pt"
    return torch.load(path, weights_only=True) if path.is_file() else None


def load_model(path: str | Path, device: str = "cpu"):
    """A checkpoint (or a run dir / checkpoints root) -> ``(GPT, TrainConfig)`` in fp32 on CPU."""
    from safetensors.torch import load_file

    from llmtrain.model import GPT

    path = Path(path)
    ckpt = (
        path
        if (path / TRAINER_STATE).is_file()
        else (latest_checkpoint(path / "checkpoints") or latest_checkpoint(path))
    )
    if ckpt is None:
        raise FileNotFoundError(f"no complete llmtrain checkpoint at {path}")
    cfg = saved_config(ckpt)
    model = GPT(cfg.model)
    weights = ckpt / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(
            f"{weights} not found: this checkpoint holds sharded weights; consolidate it first"
        )
    state = load_file(str(weights), device=device)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied_ok = {"lm_head.weight"} if cfg.model.tie_embeddings else set()
    if set(missing) - tied_ok or unexpected:
        raise RuntimeError(f"{weights}: missing {missing}, unexpected {unexpected}")
    return model.to(device).eval(), cfg
