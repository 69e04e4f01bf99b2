"""llmtrain-eval: the validation loss and perplexity of a checkpoint, without training (nanoGPT's
``eval_only``).

::

    llmtrain-eval runs/smoke                          # the newest intact checkpoint, the run's data
    llmtrain-eval runs/smoke/checkpoints/step_0000050 --batches all --json
    llmtrain-eval runs/smoke data=fineweb data.path=/data/fineweb data.config_name=null

By default it reads the validation data of the checkpoint's own saved config, in
``trainer.eval_batches`` batches of ``trainer.micro_batch_size`` windows of ``data.seq_len``
tokens, exactly as the training run evaluated (the same loader, the same
:func:`llmtrain.report.evaluate`): the ``val_loss`` it prints equals the one the run logged for
that step in ``metrics.jsonl`` (same precision; a run on several processes split the batches
among them and added the sums in another order, so to float rounding). ``--batches N`` /
``--batch-size B`` change how much; ``--batches all`` (or 0) reads the whole validation split.

Other data: Hydra overrides after the checkpoint, composed as ``llmtrain-train`` composes them
(``data=NAME`` takes ``conf/data/NAME.yaml``; ``data.KEY=VALUE`` changes one key of the run's
data, or of that group), type-checked the same way. The windows stay the run's
``data.seq_len`` unless ``data.seq_len`` is given (a group file's own seq_len does not count).
Only ``data.*``, ``trainer.eval_batches`` and ``trainer.micro_batch_size`` can be overridden:
the model is the checkpoint's, and so is the tokenizer. Evaluating on a training split
(``data.val_split=train``) is allowed here.

``--hellaswag`` (``--hellaswag-data JSONL``: a local copy) gives the checkpoint's HellaSwag
accuracy instead (llmtrain/hellaswag.py).

Under ``accelerate launch -m llmtrain.eval`` (or torchrun) each process holds the whole model
and evaluates a share of the batches or examples; the sums are added and rank 0 prints.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
from omegaconf import OmegaConf

from llmtrain.checkpoint import load_trainer_state
from llmtrain.checks import check_data
from llmtrain.config import ConfigError, TrainConfig, compose_config
from llmtrain.consolidate import DTYPES
from llmtrain.data import build_dataloader
from llmtrain.documents import validation_source
from llmtrain.hellaswag import HELLASWAG_VAL, hellaswag_checkpoint
from llmtrain.integrity import CheckpointError
from llmtrain.metrics import format_loss, format_ppl, perplexity
from llmtrain.report import evaluate
from llmtrain.sample import device_and_dtype, load_gpt
from llmtrain.tokenizer import get_tokenizer

# What an override may change: the data, and how much of it is evaluated.
TRAINER_KEYS = ("trainer.eval_batches", "trainer.micro_batch_size")
# The saved data section becomes this group option, so a key override applies to it.
SAVED_DATA = "llmtrain_eval_checkpoint"


def _override_key(override: str) -> str:
    return override.lstrip("+~").partition("=")[0].strip()


def check_overrides(overrides: Sequence[str]) -> None:
    """Only the data, and how much of it is evaluated, can change: the model is the checkpoint's."""
    for o in overrides:
        key = _override_key(o)
        if not (key == "data" or key.startswith("data.") or key in TRAINER_KEYS):
            raise ConfigError(
                f"{o}: llmtrain-eval evaluates the checkpoint's own model and settings; only "
                "data=NAME, data.KEY=VALUE, trainer.eval_batches and trainer.micro_batch_size "
                "can be overridden"
            )


def eval_config(saved: TrainConfig, overrides: Sequence[str]) -> TrainConfig:
    """The checkpoint's config with ``overrides`` (``data=NAME``, ``data.KEY=VALUE``,
    ``trainer.eval_batches=N``, ``trainer.micro_batch_size=N``) applied through Hydra, as
    ``llmtrain-train`` composes them; the model (and tokenizer) stay the checkpoint's."""
    check_overrides(overrides)
    if not overrides:
        return saved
    group = any(_override_key(o) == "data" for o in overrides)
    with tempfile.TemporaryDirectory() as tmp:
        first = []
        if not group:  # the run's data section, as a group option the key overrides apply to
            (Path(tmp) / "data").mkdir()
            yaml = OmegaConf.to_yaml(OmegaConf.structured(saved.data))
            (Path(tmp) / "data" / f"{SAVED_DATA}.yaml").write_text(yaml)
            first = [f"hydra.searchpath=['file://{tmp}']", f"data={SAVED_DATA}"]
        composed = compose_config(first + list(overrides))
    trainer = saved.trainer
    for key in {_override_key(o) for o in overrides} & set(TRAINER_KEYS):
        name = key.split(".")[1]
        trainer = dataclasses.replace(trainer, **{name: getattr(composed.trainer, name)})
    data = composed.data
    given = [o for o in overrides if _override_key(o) == "data.tokenizer"]
    if given and data.tokenizer != saved.data.tokenizer:
        raise ConfigError(
            f"data.tokenizer={data.tokenizer}: the checkpoint was trained with "
            f"data.tokenizer={saved.data.tokenizer}, and its model reads that tokenizer's ids; "
            "remove the override"
        )
    data = dataclasses.replace(data, tokenizer=saved.data.tokenizer)  # a group file's default
    if group and "data.seq_len" not in {_override_key(o) for o in overrides}:
        data = dataclasses.replace(data, seq_len=saved.data.seq_len)  # the run's windows
    return dataclasses.replace(saved, data=data, trainer=trainer)


def check_eval_config(cfg: TrainConfig) -> None:
    """What ``validate`` checks of the data, for a model that is fixed: the windows fit its
    positions. A validation split equal to the training split is fine here (a train loss)."""
    d, m = cfg.data, cfg.model
    if d.seq_len > m.context_length:
        raise ConfigError(
            f"data.seq_len={d.seq_len} exceeds the checkpoint's model.context_length="
            f"{m.context_length}: the model has no positions past it; use data.seq_len="
            f"{m.context_length} or less"
        )
    # check_data refuses val_split == train_split (validation on memorised data) for training
    check_data(dataclasses.replace(d, train_split="") if d.val_split == d.train_split else d)
    t = cfg.trainer
    if t.micro_batch_size < 1:
        raise ConfigError(f"trainer.micro_batch_size={t.micro_batch_size}: must be >= 1")
    if t.eval_batches < 0:
        raise ConfigError(f"trainer.eval_batches={t.eval_batches}: must be >= 0 (0: all)")


def describe_data(d: Any) -> str:
    """Which validation text, in words."""
    if d.source == "shards":
        return f"{d.name}: the validation shards of data.path={d.path}"
    if d.files:
        return f"{d.name}: data.files={d.files}, validation {validation_source(d)}"
    where = f"data.path={d.path}" + (f" ({d.config_name})" if d.config_name else "")
    if d.val_split is None:
        first = f"the first {d.val_docs} documents of split {d.train_split!r}, held out"
        return f"{d.name}: {where}, {first}"
    return f"{d.name}: {where}, split {d.val_split!r}"


class _Counted:
    """The loader's batches, counting the batches and target tokens that pass."""

    def __init__(self, loader: Any) -> None:
        self.loader, self.batches, self.tokens = loader, 0, 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self.loader:
            self.batches += 1
            self.tokens += y.numel()
            yield x, y


class Processes:
    """What :func:`llmtrain.report.evaluate` and :func:`llmtrain.hellaswag.hellaswag` need of
    an Accelerator: under a launcher (``accelerate launch``, torchrun: ``WORLD_SIZE`` > 1)
    each process takes its share of the batches or examples and the process group adds the
    sums; alone, one process takes all. No model is wrapped: each process holds it whole."""

    def __init__(self, device: str, alone: bool = False) -> None:
        self.num_processes = 1 if alone else int(os.environ.get("WORLD_SIZE", "1"))
        self.process_index = int(os.environ.get("RANK", "0")) if self.num_processes > 1 else 0
        if device == "cuda" and self.num_processes > 1:
            torch.cuda.set_device(local := int(os.environ.get("LOCAL_RANK", "0")))
            device = f"cuda:{local}"
        self.device = torch.device(device)
        if self.num_processes > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if device != "cpu" else "gloo")

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        if self.num_processes > 1:
            torch.distributed.all_reduce(tensor)
        return tensor

    def end(self) -> None:
        """Every process at the same point, then the group goes (a launched run's last act)."""
        if self.num_processes > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def evaluate_checkpoint(
    path: str | Path,
    overrides: Sequence[str] = (),
    batches: int | None = None,
    batch_size: int | None = None,
    device: str = "cpu",
    dtype: str = "fp32",
    processes: Processes | None = None,
) -> dict[str, Any]:
    """Validation loss of the checkpoint ``path`` names (of a run dir, its newest intact one).

    ``batches``: None = the run's trainer.eval_batches, 0 = the whole validation split;
    ``batch_size``: None = the run's trainer.micro_batch_size; ``processes``: those a
    launcher started (llmtrain-eval's :class:`Processes`), each evaluating a share of the
    batches, or None: this process alone."""
    processes = processes or Processes(device, alone=True)
    check_overrides(overrides)  # before minutes of reading a large checkpoint
    model, saved, ckpt = load_gpt(path, "cpu")
    cfg = eval_config(saved, overrides)
    if batches is not None:
        trainer = dataclasses.replace(cfg.trainer, eval_batches=batches)
        cfg = dataclasses.replace(cfg, trainer=trainer)
    if batch_size is not None:
        trainer = dataclasses.replace(cfg.trainer, micro_batch_size=batch_size)
        cfg = dataclasses.replace(cfg, trainer=trainer)
    check_eval_config(cfg)
    if cfg.trainer.loss_chunk:  # the run evaluated through the fused head + loss too
        model.enable_chunked_loss(cfg.trainer.loss_chunk)
    model = model.to(processes.device)
    tokenizer = get_tokenizer(cfg.data.tokenizer)
    loader = build_dataloader(
        cfg.data,
        tokenizer,
        split="val",
        batch_size=cfg.trainer.micro_batch_size,
        seed=cfg.trainer.seed,
    )
    counted = _Counted(loader)
    n = cfg.trainer.eval_batches or None  # 0: every batch of the split
    with torch.autocast(torch.device(device).type, DTYPES[dtype], enabled=dtype != "fp32"):
        val_loss = evaluate(model, processes, counted, n)
    d = cfg.data
    return {
        "checkpoint": str(ckpt),
        "step": load_trainer_state(ckpt).step,
        "val_loss": val_loss,
        "val_ppl": perplexity(val_loss),
        "tokens": counted.tokens,
        "batches": counted.batches,
        "all": n is None,
        "batch_size": cfg.trainer.micro_batch_size,
        "seq_len": d.seq_len,
        "device": device,
        "dtype": dtype,
        "processes": processes.num_processes,
        "data": {
            "name": d.name,
            "source": d.source,
            "path": d.path,
            "config_name": d.config_name,
            "files": d.files,
            "val_files": d.val_files,
            "val_split": d.val_split,
            "tokenizer": d.tokenizer,
            "description": describe_data(d),
        },
        "trained_seq_len": saved.data.seq_len,
        "position": saved.model.position,
    }


def batches_arg(value: str) -> int:
    """--batches: a count, or 0 / all for the whole validation split."""
    if value.lower() == "all":
        return 0
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: give a number of batches, or all") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"{n}: must be >= 0 (0 or all: the whole split)")
    return n


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """File descriptor 1 and ``sys.stdout`` point at stderr inside, so a handler that kept the
    original stdout object (DeepSpeed's logger) writes there too."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="llmtrain-eval",
        description="Validation loss and perplexity of an llmtrain checkpoint (any dist mode), "
        "on its run's validation data or, with Hydra overrides (data=NAME, data.KEY=VALUE), "
        "on other data.",
    )
    parser.add_argument("checkpoint", help="a step_XXXXXXX dir, a checkpoints/ dir or a run dir")
    parser.add_argument(
        "overrides",
        nargs="*",
        help="data=NAME, data.KEY=VALUE, trainer.eval_batches=N, trainer.micro_batch_size=N",
    )
    parser.add_argument(
        "--batches",
        type=batches_arg,
        default=None,
        help="batches to evaluate (default: the run's trainer.eval_batches); 0 or all: the "
        "whole validation split",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="windows per batch (default: the run's trainer.micro_batch_size)",
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--dtype", choices=("auto", "fp32", "bf16"), default="auto", help="auto: bf16 on cuda"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--hellaswag",
        action="store_true",
        help="HellaSwag accuracy instead (its validation split); --batch-size is then examples "
        "per batch (default 8)",
    )
    parser.add_argument(
        "--hellaswag-data",
        default=None,
        metavar="JSONL",
        help="a local copy of hellaswag_val.jsonl, or a URL (default: downloaded once from the "
        "HellaSwag repository); implies --hellaswag",
    )
    parser.add_argument(
        "--examples", type=int, default=None, help="with --hellaswag: the first N (default: all)"
    )
    args = parser.parse_intermixed_args(argv)
    args.hellaswag = args.hellaswag or args.hellaswag_data is not None
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f"--batch-size {args.batch_size}: must be >= 1")
    if args.examples is not None and (not args.hellaswag or args.examples < 1):
        parser.error(f"--examples {args.examples}: a count >= 1, with --hellaswag")
    if args.hellaswag and (args.overrides or args.batches is not None):
        parser.error("--hellaswag reads its own examples: no data overrides or --batches")
    device, dtype = device_and_dtype(parser, args.device, args.dtype)
    processes = Processes(device)
    (_main_hellaswag if args.hellaswag else _main_loss)(args, device, dtype, processes)
    processes.end()


def _failed(e: Exception, processes: Processes) -> NoReturn:
    rank = f" (rank {processes.process_index})" if processes.process_index else ""
    print(f"llmtrain-eval{rank}: error: {e}", file=sys.stderr)
    sys.exit(2)


def _on(device: str, dtype: str, processes: Processes) -> str:
    n = processes.num_processes
    return f"{device}/{dtype}" + (f" x {n} processes" if n > 1 else "")


def _main_loss(args: argparse.Namespace, device: str, dtype: str, processes: Processes) -> None:
    try:
        # --json: stdout holds the one object; what libraries print meanwhile (DeepSpeed's
        # logger and zero_to_fp32 consolidating a ZeRO checkpoint) goes to stderr.
        with _stdout_to_stderr() if args.json else contextlib.nullcontext():
            result = evaluate_checkpoint(
                args.checkpoint, args.overrides, args.batches, args.batch_size, device, dtype,
                processes,
            )  # fmt: skip
    except (OSError, ValueError, CheckpointError) as e:  # ConfigError, DataError: ValueErrors
        _failed(e, processes)
    if processes.process_index:  # the result is the same on every process: one prints it
        return
    if result["position"] == "learned" and result["seq_len"] > result["trained_seq_len"]:
        print(
            f"note: the run trained on windows of data.seq_len={result['trained_seq_len']} "
            f"tokens; learned positions {result['trained_seq_len']}..{result['seq_len'] - 1} "
            "were never trained, so the loss past them says little about the model",
            file=sys.stderr,
        )
    if args.json:  # JSON has no inf or nan: an overflowing perplexity is null
        finite = {k: v if not isinstance(v, float) or math.isfinite(v) else None
                  for k, v in result.items()}  # fmt: skip
        print(json.dumps(finite, allow_nan=False))
        return
    how = "the whole validation split of"
    if not result["all"]:  # the split's last batch may be a partial one
        full = result["tokens"] == result["batches"] * result["batch_size"] * result["seq_len"]
        how = f"{result['batches']} batches of" + ("" if full else " up to")
    print(
        f"{result['checkpoint']} (step {result['step']}) on {_on(device, dtype, processes)}: "
        f"{result['data']['description']}",
        file=sys.stderr,
    )
    print(
        f"step {result['step']}: val_loss {format_loss(result['val_loss']).strip()} | "
        f"val_ppl {format_ppl(result['val_ppl']).strip()} | {result['tokens']:,} tokens "
        f"({how} {result['batch_size']} x {result['seq_len']} tokens)"
    )


def _main_hellaswag(
    args: argparse.Namespace, device: str, dtype: str, processes: Processes
) -> None:
    try:
        with _stdout_to_stderr() if args.json else contextlib.nullcontext():
            source = args.hellaswag_data or HELLASWAG_VAL
            result = hellaswag_checkpoint(
                args.checkpoint, source, args.examples, args.batch_size or 8, device, dtype,
                processes,
            )  # fmt: skip
    except (OSError, ValueError, CheckpointError) as e:
        _failed(e, processes)
    if processes.process_index:
        return
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['checkpoint']} (step {result['step']}) on {_on(device, dtype, processes)}: "
          f"HellaSwag from {result['source']}", file=sys.stderr)  # fmt: skip
    if args.examples and result["examples"] < args.examples:
        print(f"--examples {args.examples:,}: the file has {result['examples']:,}; all of them "
              "scored", file=sys.stderr)  # fmt: skip
    right = round(result["acc_norm"] * result["examples"])
    print(
        f"step {result['step']}: hellaswag acc_norm {result['acc_norm']:.4f} "
        f"({right:,}/{result['examples']:,}) | acc {result['acc']:.4f} (chance 0.25)"
    )


if __name__ == "__main__":
    main()


__all__ = ["eval_config", "evaluate_checkpoint"]
