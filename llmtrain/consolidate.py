"""Moving checkpoints between layouts: full state dicts for export, other world sizes on resume.

What ``accelerator.save_state`` writes under each dist mode (every rank writes its own part)::

    single, ddp   model.safetensors, optimizer.bin                     (already full)
    zero1/2/3     pytorch_model/  mp_rank_00_model_states.pt, zero_pp_rank_<r>_..._states.pt
    fsdp2         pytorch_model_fsdp_0/, optimizer_0/                  (torch DCP)

Export: :func:`full_state_dict` rebuilds the fp32 weights from any of them on one CPU process
(DeepSpeed's ``zero_to_fp32``; DCP's own loader), and ``python -m llmtrain.consolidate CKPT``
writes them as ``CKPT/consolidated.safetensors`` (``--dtype bf16`` for half the size).

Resume on another world size (:func:`load_state`):
- single/ddp: the files are full; nothing to do.
- fsdp2: DCP reshards on load by itself.
- zero1/2/3: the checkpoint is converted to DeepSpeed's universal format (one file per
  parameter and optimizer moment) in a scratch dir of the resuming run, loaded with
  ``load_universal``, and the scratch deleted: the checkpoint itself is only read (it may be
  another run's, on read-only storage) and stays as its manifest lists it.
- data: the position is the global count of consumed windows. With ``data.source=shards``
  window g of the global stream goes to rank g mod world_size, so after G windows every
  rank of the new layout starts at G + rank: no window is repeated or skipped
  (:func:`redistribute_data_state`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from llmtrain.config import ConfigError
from llmtrain.ds_config import ZERO_STAGE

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # what --dtype names

DS_TAG = "pytorch_model"  # the DeepSpeed tag accelerator.save_state uses
FSDP_MODEL = "pytorch_model_fsdp_0"


def layout(ckpt: Path) -> str:
    if (ckpt / "model.safetensors").is_file():
        return "full"
    if (ckpt / DS_TAG).is_dir():
        return "deepspeed"
    if (ckpt / FSDP_MODEL).is_dir():
        return "dcp"
    raise FileNotFoundError(f"{ckpt}: no model.safetensors, {DS_TAG}/ or {FSDP_MODEL}/ inside")


def check_model_files(ckpt: Path, hashed: bool = True) -> None:
    """CheckpointError naming the first weight file the manifest lists that is missing, of
    another size or (``hashed``) other bytes."""
    from llmtrain.integrity import CheckpointError, check_files, read_manifest

    weights = ("model.safetensors", DS_TAG + "/", FSDP_MODEL + "/")
    listed = read_manifest(ckpt)
    mine = {n: e for n, e in listed.items() if n.startswith(weights)}
    if problem := check_files(ckpt, mine, hashed):
        raise CheckpointError(problem)


def full_state_dict(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """The model's fp32 state dict from a checkpoint of any dist mode, on CPU, no process group.

    The files it reads are checked against the checkpoint's manifest first (a damaged one is a
    CheckpointError naming the file). Names are the model's own: torch.compile's ``_orig_mod.``
    prefix, which a compiled run's checkpoint carries, is dropped.
    """
    from llmtrain.integrity import safe_loading

    ckpt = Path(ckpt)
    check_model_files(ckpt)  # first: a weight file the manifest lists and that is gone is damage
    kind = layout(ckpt)
    with safe_loading(ckpt):  # weights_only loads: a checkpoint is data, never code
        state = _load_full(ckpt, kind)
    return {k.removeprefix("_orig_mod."): v.float().contiguous() for k, v in state.items()}


def _load_full(ckpt: Path, kind: str) -> dict[str, torch.Tensor]:
    if kind == "full":
        from safetensors.torch import load_file

        return load_file(str(ckpt / "model.safetensors"))
    if kind == "deepspeed":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=DS_TAG)
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    # A directory of this call's own (two readers at once must not share a file), on the
    # checkpoint's disk, which has room for the weights; elsewhere when it is read-only.
    try:
        scratch = tempfile.TemporaryDirectory(dir=ckpt, prefix=".consolidate-")
    except OSError:
        scratch = tempfile.TemporaryDirectory(prefix="llmtrain-consolidate-")
    with scratch as d:
        tmp = Path(d) / "consolidated.pt"
        dcp_to_torch_save(str(ckpt / FSDP_MODEL), str(tmp))
        return torch.load(tmp, weights_only=True)["model"]


def export(ckpt: str | Path, out: str | Path | None = None, dtype: str = "fp32") -> Path:
    """Write the full state dict of ``ckpt`` as safetensors (tied weights stored once), by
    default to ``CKPT/consolidated.safetensors``: never over a file the checkpoint's manifest
    lists."""
    from safetensors.torch import save_file

    from llmtrain.checkpoint import read_newest_intact, saved_config
    from llmtrain.integrity import read_manifest

    # a step dir, or the newest intact checkpoint of a run or checkpoints/ dir
    ckpt, state = read_newest_intact(ckpt, lambda c: (c, full_state_dict(c)))
    out = Path(out) if out else ckpt / "consolidated.safetensors"
    listed = {(ckpt / name).resolve() for name in read_manifest(ckpt)}
    if out.resolve() in listed:
        raise ConfigError(f"--out {out}: that file is part of the checkpoint; write elsewhere")
    if saved_config(ckpt).model.tie_embeddings:  # GPT.load_state_dict re-ties the head
        state.pop("lm_head.weight", None)  # FSDP2's shards load it as a second tensor
    tensors = {name: t.to(DTYPES[dtype]).contiguous() for name, t in state.items()}
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", "dtype": dtype})
    # safetensors creates the file 0600; give it the mode the checkpoint's files have
    os.chmod(tmp, (ckpt / "config.yaml").stat().st_mode & 0o777)
    os.replace(tmp, out)
    return out


def _universal(ckpt: Path, out: Path) -> Path:
    """``ckpt``'s DeepSpeed shards in the universal format, written to ``out`` (replaced)."""
    from deepspeed.checkpoint import ds_to_universal

    shutil.rmtree(out, ignore_errors=True)  # a conversion cut off by a crash
    out.parent.mkdir(parents=True, exist_ok=True)
    args = argparse.Namespace(
        input_folder=str(ckpt / DS_TAG),
        output_folder=str(out / DS_TAG),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    ds_to_universal.main(args)
    return out


def load_state(
    accelerator, model, optimizer, ckpt: Path, saved_world: int, mode: str, scratch: Path
) -> None:
    """``accelerator.load_state`` that also accepts a checkpoint from another world size;
    ``scratch`` is a writable dir every rank sees (the run dir), for a ZeRO conversion.

    The optimizer keeps this run's hyperparameters (weight decay, betas, eps: the config's,
    as the lr is): torch's ``load_state_dict`` puts the saved run's back, and DeepSpeed's
    universal loader puts param group 0's on every group (weight decay on biases and norms).
    """
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    # Accelerate loads the RNG file inside ``except Exception`` ("Could not load random
    # states"): a file safe_loading refuses would be skipped without a word (and resume would
    # quietly lose the RNG). Loading it here first lets the refusal, naming it, reach the user.
    rng = ckpt / f"random_states_{accelerator.process_index}.pkl"
    if rng.is_file():
        from accelerate.utils import load  # as Accelerate reads it: numpy's RNG state allowed

        load(rng)
    if saved_world == accelerator.num_processes or mode not in ZERO_STAGE:
        accelerator.load_state(str(ckpt))
    else:
        _load_universal(accelerator, model, ckpt, scratch)
    for group, mine in zip(optimizer.param_groups, hyper, strict=True):
        group.update(mine)


def _load_universal(accelerator, model, ckpt: Path, scratch: Path) -> None:
    """A ZeRO checkpoint from another world size, through DeepSpeed's universal format."""
    from llmtrain.integrity import broadcast

    universal = scratch / f".universal-{ckpt.name}"
    # Rank 0 converts (minutes for billions of parameters); the others wait for its marker on
    # the file system, not in a collective, which dist.timeout_s would end. (Should rank 0
    # fail, the launcher stops them.) The marker holds this attempt's token: an older
    # attempt's cannot pass for it.
    token = broadcast(os.urandom(8).hex())
    done = universal / "done"
    if accelerator.is_main_process:
        print(
            f"resume: converting the ZeRO checkpoint {ckpt.name} for {accelerator.num_processes} "
            f"processes (DeepSpeed's universal format, in {universal})",
            flush=True,
        )
        _universal(ckpt, universal)
        done.write_text(token)
    else:
        while not (done.is_file() and done.read_text() == token):
            time.sleep(1.0)
    accelerator.wait_for_everyone()
    # The engine reads this flag at load time; the universal files carry no per-rank RNG.
    model._config.load_universal_checkpoint = True
    try:
        model.load_checkpoint(
            str(universal),
            tag=DS_TAG,
            load_module_strict=True,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
    finally:
        model._config.load_universal_checkpoint = False
    # It gives every parameter group the same ``step`` tensor, which torch's AdamW then
    # increments once per group and step: each group needs its own.
    for state in model.optimizer.optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    accelerator.wait_for_everyone()  # every rank has read the conversion
    if accelerator.is_main_process:
        shutil.rmtree(universal, ignore_errors=True)


def redistribute_data_state(states: list[dict[str, Any]], rank: int, world: int) -> dict[str, Any]:
    """The data position for ``rank`` of ``world`` from the states all old ranks saved."""
    old = len(states)
    first = states[0]
    if first["kind"] != "shards":
        raise ConfigError(
            f"trainer.resume: the checkpoint was written by {old} processes and this launch has "
            f"{world}. Its data position can move to another world size only with data=shards "
            f"(one global window order; see llmtrain-prepare); the streaming source splits "
            f"files by rank. Resume with {old} processes, convert the corpus to shards, or "
            "resume the weights and optimizer with trainer.resume_data=false (the data is "
            "then read again from its start)."
        )
    if first["num_workers"] != 0:
        raise ConfigError(
            f"trainer.resume: the checkpoint was written by {old} processes and this launch has "
            f"{world}; its data position was saved with data.num_workers={first['num_workers']}, "
            "whose workers each read their own windows. It moves to another world size only "
            f"when saved with data.num_workers=0 (the data=shards default). Resume with {old} "
            "processes."
        )
    positions = [s["workers"][0] for s in states]
    if all(p is None for p in positions):
        consumed, epoch = 0, 0
    else:
        epochs = {p["epoch"] for p in positions if p is not None}
        prefix = {p["next"] - r for r, p in enumerate(positions) if p is not None}
        if len(epochs) != 1 or len(prefix) != 1 or None in positions:
            raise ConfigError(
                f"trainer.resume: this checkpoint's data position straddles an epoch boundary "
                f"and cannot be split over {world} processes; resume with {old} processes or "
                "from another checkpoint"
            )
        consumed, epoch = prefix.pop(), epochs.pop()
    total = first["global_windows"]
    batch = first["windows"] // max(1, first["batches"]) if first["batches"] else None
    stats = {k: sum(s["stats"][0][k] for s in states) for k in states[0]["stats"][0]}
    state = {
        **first,
        "world_size": world,
        "rank": rank,
        "next": 0,
        "done": [False],
        "workers": [{"epoch": epoch, "next": consumed + rank} if total else None],
        "stats": [stats if rank == 0 else dict.fromkeys(stats, 0)],
        "windows": total // world,
    }
    if batch:
        state["batches"] = total // (batch * world)
    return state


def load_data_state(ckpt: Path, rank: int, world: int, saved_world: int) -> dict[str, Any]:
    if saved_world == world:
        path = ckpt / f"data_state_{rank}.pt"
        if not path.is_file():
            raise ConfigError(f"trainer.resume: {path} is missing; the checkpoint is incomplete")
        return torch.load(path, weights_only=True)
    states = [
        torch.load(ckpt / f"data_state_{r}.pt", weights_only=True) for r in range(saved_world)
    ]
    return redistribute_data_state(states, rank, world)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m llmtrain.consolidate",
        description="Write a checkpoint's full model weights (any dist mode) as safetensors.",
    )
    parser.add_argument(
        "checkpoint", help="a step_XXXXXXX dir, or a run or checkpoints/ dir (its newest)"
    )
    parser.add_argument("--out", help="output file (default: CHECKPOINT/consolidated.safetensors)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    from llmtrain.integrity import CheckpointError

    args = parser.parse_args(argv)
    try:
        print(export(args.checkpoint, args.out, args.dtype))
    except (OSError, ValueError, CheckpointError) as e:  # damaged, or a bad --out: it says
        parser.exit(2, f"python -m llmtrain.consolidate: error: {e}\n")


if __name__ == "__main__":
    main()


__all__ = ["full_state_dict", "export", "load_state", "load_data_state", "redistribute_data_state"]
