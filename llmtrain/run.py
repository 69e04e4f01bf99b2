"""Setting a run up: the model, the accelerator, the loaders, a restored checkpoint, and the
records the loop writes (``Run``); the plan and the startup report are in startup.py."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import socket
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmtrain import checkpoint as ckpt
from llmtrain import resume
from llmtrain.config import (
    ConfigError,
    TrainConfig,
    TrainerConfig,
    config_to_dict,
    config_to_yaml,
    rank_from_env,
    world_size_from_env,
)
from llmtrain.consolidate import load_data_state, load_state
from llmtrain.data import build_dataloader
from llmtrain.dist import build_accelerator, build_dist_optimizer, check_launch, weight_dtype
from llmtrain.documents import DataError
from llmtrain.hellaswag import HELLASWAG_VAL, Example, load_examples
from llmtrain.hf import is_hf_source
from llmtrain.init_weights import load_weights
from llmtrain.integrity import safe_loading
from llmtrain.metrics import MetricsFile, Pace, build_logger, device_peak_tflops, receipt
from llmtrain.model import GPT
from llmtrain.startup import (
    Plan,
    data_notes,
    horizon_notes,
    passes_notes,
    plan_notes,
    shard_notes,
    startup_report,
)
from llmtrain.tokenizer import check_vocab, get_tokenizer

LOCK = ".lock"


@contextlib.contextmanager
def run_dir_lock(run_dir: Path, wait_s: float = 120.0) -> Iterator[None]:
    """Rank 0 holds an exclusive lock on ``run_dir`` while it trains: a second run started in
    the same dir (the same command in another terminal, a job submitted twice) would write
    the same checkpoints and metrics.jsonl, and resume=auto read the other's half-written
    steps. The lock goes with the process, however it ends. A held lock is waited on for
    ``wait_s`` (a network file system keeps a dead node's lock for a lease of ~90 s), then the
    run is refused. Where the file system has no locks, nothing is locked."""
    if rank_from_env() != 0:
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOCK, "a+") as f:
        deadline, said = time.monotonic() + wait_s, False
        while (locked := _try_lock(f)) is False:
            f.seek(0)
            holder = f.read().strip() or "another process"
            if time.monotonic() >= deadline:
                raise ConfigError(
                    f"{run_dir}: another run ({holder}) is training in this run dir; wait for "
                    "it to end, or give this one another hydra.run.dir"
                )
            if not said:
                print(f"llmtrain: {run_dir} is locked by {holder}; waiting up to "
                      f"{wait_s:.0f} s for it to end", file=sys.stderr, flush=True)  # fmt: skip
                said = True
            time.sleep(min(1.0, wait_s))
        if locked:
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            f.flush()
        try:
            yield
        finally:
            if locked:
                fcntl.flock(f, fcntl.LOCK_UN)


def _try_lock(f) -> bool | None:
    """True: locked; False: another process holds it; None: the file system has no locks."""
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:  # ENOLCK, EOPNOTSUPP
        return None


class _QuietAccelerate(logging.Filter):
    """Accelerate logs every file a save writes at INFO (under FSDP2 at the scratch ``.tmp``
    path, which is renamed a moment later), and warns that the tied lm_head was dropped from
    model.safetensors (loading re-ties it); the checkpoint line says enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.WARNING or (
            record.levelno == logging.WARNING and "shared tensor" not in record.getMessage()
        )


for _name in (
    "accelerate.accelerator",
    "accelerate.checkpointing",
    "accelerate.utils.other",
    "accelerate.utils.fsdp_utils",
):
    logging.getLogger(_name).addFilter(_QuietAccelerate())
# DeepSpeed probes for libaio by compiling a test program when it loads; setuptools logs each
# gcc command at INFO, which Hydra's logging config prints.
logging.getLogger("compilers").setLevel(logging.WARNING)
# ZeRO calls two collectives that torch deprecates, and torch warns at every call (filter
# changes elsewhere reset the once-per-place registry): 16 lines per step on 2 processes, about
# DeepSpeed's code, which no setting of ours changes.
warnings.filterwarnings(
    "ignore",
    message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
    category=FutureWarning,
)


def build_model(cfg: TrainConfig, empty: bool = False, dtype: torch.dtype = torch.float32) -> GPT:
    """``GPT(cfg.model)`` in ``dtype`` with the trainer's memory options: activation
    checkpointing and the fused, chunked loss.

    ``empty``: its tensors allocated but never written, so they take no host memory (a rank
    other than 0, which prepare() gives rank 0's weights). Allocated rather than left on the
    meta device: Accelerate maps FSDP2's optimizer parameters to the sharded ones by address,
    and every meta tensor has address 0. ``dtype``: DeepSpeed's bf16 or fp16 (``weight_dtype``),
    to which it casts the model before broadcasting rank 0's; cast already, an empty model
    stays unwritten.
    """
    if empty:
        with torch.device("meta"):
            model = GPT(cfg.model).to(dtype)
        model.to_empty(device="cpu").tie_weights()
    else:
        model = GPT(cfg.model).to(dtype)
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


@dataclass
class Run:
    """What ``setup`` builds and the loop uses: the prepared model and optimizer, the loaders,
    the trainer state, and where the run's records go."""

    cfg: TrainConfig
    plan: Plan
    accelerator: Any
    model: torch.nn.Module
    optimizer: Any
    tokenizer: Any
    train_loader: Any
    val_loader: Any
    state: ckpt.TrainerState
    run_dir: Path
    receipt: dict[str, Any]
    metrics_file: MetricsFile
    logger: Any
    peak_tflops: float | None  # the device's dense bf16 peak, None where unknown (no MFU)
    pace: Pace = field(default_factory=Pace)  # the ETA's; start_step set by setup()
    epoch: int = 1  # the pass over the training data last reported (rank 0's)
    # A rollback's abandoned branch (main process): removed at this run's first save, also
    # where that save's step is past theirs (pruning by step number alone then kept them).
    abandoned: list[Path] = field(default_factory=list)
    hellaswag: list[Example] = field(default_factory=list)  # trainer.hellaswag_every's examples

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"

    def say(self, text: str) -> None:
        """A console line, from the main process only."""
        if self.is_main:
            print(text, flush=True)

    def log(self, record: dict[str, Any], line: str | None = None) -> None:
        """One record to metrics.jsonl and the logger, and its console line if any."""
        self.metrics_file.write(record)
        self.logger.log(record, step=record["step"])
        if line is not None:
            self.say(line)

    def save(self, final: bool = False) -> Path | None:
        """A failed write stops the run unless trainer.on_save_error=continue (never the last
        save); NaN weights are never saved (ckpt.Diverged)."""
        try:
            path = ckpt.save_checkpoint(
                self.accelerator,
                self.ckpt_root,
                self.state,
                self.train_loader.state_dict(),
                self.cfg,
                self.receipt,
                self.cfg.trainer.keep_last,
                model=self.model,
                abandoned=self.abandoned,
            )
        except ckpt.SaveError as e:
            if final or self.cfg.trainer.on_save_error == "stop":
                raise
            self.say(f"warning: {e} Continuing (trainer.on_save_error=continue).")
            return None
        self.abandoned = []
        self.say(f"checkpoint {path}")
        return path


def setup(cfg: TrainConfig, run_dir: Path) -> Run:
    """Check the launch, build the accelerator, model, optimizer and loaders, restore a
    checkpoint when resuming, and open the run's records."""
    world = world_size_from_env()
    check_launch(cfg, world)
    plan = Plan.from_config(cfg, world)
    # Checked before any process group starts: a failing rank 0 then costs seconds, not a hang.
    tokenizer = get_tokenizer(cfg.data.tokenizer)
    check_vocab(tokenizer, cfg.model.vocab_size)
    t, hellaswag = cfg.trainer, []
    if t.hellaswag_every:  # every process reads it (the first start downloads it into the cache)
        source, key = t.hellaswag_data or HELLASWAG_VAL, "trainer.hellaswag_data"
        try:
            hellaswag = load_examples(source, t.hellaswag_examples or None, key)
        except DataError as e:  # StreamError too: a failed download is worth another try
            raise type(e)(f"{e}; or trainer.hellaswag_every=0 for none") from e
    if rank_from_env() == 0:  # other ranks learn the run dir by broadcast
        resume.preflight_resume(cfg, run_dir)
    accelerator = build_accelerator(cfg, plan.grad_accum)
    is_main, rank = accelerator.is_main_process, accelerator.process_index
    run_dir = Path(accelerator_broadcast(accelerator, str(run_dir.resolve())))
    ckpt_root = run_dir / "checkpoints"  # Run.ckpt_root
    # Verified against its manifest; trainer.resume=auto falls back past damaged checkpoints.
    resume_from = resume.choose_resume(cfg.trainer.resume, ckpt_root)
    abandoned: list[Path] = []
    nothing_left = False  # the checkpoint is at or past the horizon: the run dir stays as it is
    if resume_from is not None:
        resume.check_resumable(ckpt.saved_config(resume_from), cfg, resume_from)
        saved_state = ckpt.load_trainer_state(resume_from)
        left = plan.resumed(cfg, saved_state.step, saved_state.tokens).max_steps
        nothing_left = left <= saved_state.step
        # A run that trains nothing must not roll the run back (`latest`, metrics.jsonl,
        # config.yaml): naming an older step to look at it left the run resuming there.
        if is_main and not nothing_left:
            abandoned = ckpt.roll_back(ckpt_root, resume_from)
    init_from = resume.init_source(cfg, resumed=resume_from is not None)

    # The data first: a wrong path, split or column fails in seconds, not after the model is
    # built and sharded (minutes for billions of parameters).
    loader_args = dict(
        batch_size=plan.micro_batch, rank=rank, world_size=world, seed=cfg.trainer.seed
    )
    train_loader = build_dataloader(cfg.data, tokenizer, split="train", **loader_args)
    val_loader = build_dataloader(cfg.data, tokenizer, split="val", **loader_args)
    for _ in val_loader:  # an empty validation split fails now (DataError), not at the first eval
        break

    torch.manual_seed(cfg.trainer.seed)
    # Rank 0 alone builds (or reads) the weights. prepare() broadcasts them to the other ranks
    # (DDP and DeepSpeed as they start, FSDP2 into each rank's shards), whose models are
    # empty: a full fp32 model per process took 220 GiB of an 8-GPU node for llama-8b. A
    # resume's weights are its checkpoint's: rank 0's model stays empty too.
    empty = rank != 0 or resume_from is not None
    model = build_model(cfg, empty=empty, dtype=weight_dtype(cfg, accelerator.device.type))
    if init_from is not None:  # of a run dir, its newest intact checkpoint
        init_from = load_weights(model, cfg, init_from)
    optimizer = build_dist_optimizer(model, cfg, accelerator.device.type)
    model = compile_model(model, cfg.trainer)
    params = model.param_summary()  # before prepare(): ZeRO-3 leaves empty placeholders
    model, optimizer = accelerator.prepare(model, optimizer)

    state = ckpt.TrainerState(world_size=world)
    saved_world = world
    if resume_from is not None:
        state = ckpt.load_trainer_state(resume_from)
        saved_world = state.world_size
        # Both reshard when the checkpoint was written by another number of processes; nothing
        # in the checkpoint is unpickled beyond tensors and plain containers.
        with safe_loading(resume_from):
            if cfg.trainer.resume_data:
                data_state = load_data_state(resume_from, rank, world, state.world_size)
                train_loader.load_state_dict(data_state)
            load_state(
                accelerator, model, optimizer, resume_from, state.world_size, cfg.dist.mode, run_dir
            )
        state.world_size = world
        plan = plan.resumed(cfg, state.step, state.tokens)
        # load_state restored Accelerate's micro-batch count, a multiple of the saved run's
        # accumulation steps. Another world size or micro-batch size makes it a misfit for
        # this run's, gradients would then sync on the wrong micro-batch and every
        # optimizer.step() be skipped; each step starts a fresh accumulation window.
        accelerator.step = 0

    if init_from is not None:  # kept in every checkpoint's trainer_state.json from here on
        hf = is_hf_source(cfg.trainer.init_from)
        state.init_from = f"{cfg.trainer.init_from} ({init_from})" if hf else str(init_from)
    cfg_dict, run_receipt = config_to_dict(cfg), receipt()
    if state.init_from:  # to the logger too: what the run's weights began as
        run_receipt["init_from"] = state.init_from
    if is_main and not nothing_left:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_to_yaml(cfg))
    metrics_file = MetricsFile(
        run_dir / "metrics.jsonl" if is_main and not nothing_left else None,
        resumed_at=state.step if resume_from is not None else None,
    )
    # W&B never rewrites a step it holds: a resume before the last logged step logs those steps
    # again and W&B drops them. trainer.resume=auto retrains them exactly, so nothing is lost,
    # unless the resume changed what they train (the lr, its schedule's horizon, the batch);
    # a step the user named (a rollback, often with a lower lr after a divergence) trains other
    # values too. Those go to a new W&B run rather than vanish behind the abandoned branch's.
    logged_past = metrics_file.logged_past
    named = resume_from is not None and cfg.trainer.resume not in ("auto", "none")
    named = named and Path(cfg.trainer.resume).resolve() == resume_from.resolve()
    retrained: list[str] = []
    if resume_from is not None and logged_past is not None and not named:
        retrained = resume.changes_values(ckpt.saved_config(resume_from), cfg, plan, logged_past)
    rollback = (named or bool(retrained)) and logged_past is not None
    logger = build_logger(
        cfg.logger,
        run_dir,
        # The derived numbers too: W&B runs can then be grouped by process count.
        {**cfg_dict, "receipt": run_receipt, "plan": dataclasses.asdict(plan)},
        is_main,
        resume=resume_from is not None and not rollback,
    )
    peak = device_peak_tflops(
        torch.cuda.get_device_name() if accelerator.device.type == "cuda" else None
    )
    run = Run(
        cfg, plan, accelerator, model, optimizer, tokenizer, train_loader, val_loader, state,
        run_dir, run_receipt, metrics_file, logger, peak, Pace(start_step=state.step),
        epoch=train_loader.epoch, abandoned=abandoned, hellaswag=hellaswag,
    )  # fmt: skip
    run.say(startup_report(cfg, plan, params, run_dir, accelerator.device))
    windows = getattr(train_loader.source, "windows", None)  # shards: a pass's, all ranks'
    for note in plan_notes(cfg, plan) + shard_notes(cfg) + passes_notes(plan, windows):
        run.say(note)
    if hellaswag:
        every = "every step" if t.hellaswag_every == 1 else f"every {t.hellaswag_every:,} steps"
        asked = t.hellaswag_examples
        short = f" (all the file has, of {asked:,} asked)" if len(hellaswag) < asked else ""
        run.say(
            f"  hellaswag  {every}: {len(hellaswag):,} examples{short}, rows cut to "
            f"{cfg.data.seq_len} tokens"
        )
    if resume_from is None and init_from is None and cfg.trainer.resume == "auto":
        run.say(
            f"  resume     auto: no checkpoint in {run.ckpt_root}; from step 0 (to go "
            "on with an earlier run, name its dir: hydra.run.dir=...)"
        )
    if init_from is not None:
        step = "" if hf else f" (its step {ckpt.load_trainer_state(init_from).step:,})"
        run.say(
            f"  init_from  weights of {state.init_from}{step}; this run starts at step 0 "
            "with a fresh optimizer, lr schedule and data position"
        )
    elif cfg.trainer.init_from and resume_from is not None:
        run.say("  init_from  not used: the run resumes a checkpoint of its own")
    if resume_from is not None:
        run.say(f"  resumed    from {resume_from} at step {state.step}")
        if saved_world != world:
            moved = "its data position redistributed, " if cfg.trainer.resume_data else ""
            by = "1 process" if saved_world == 1 else f"{saved_world} processes"
            run.say(
                f"  resharded  written by {by}, now {world}: {moved}the optimizer state resharded"
            )
        if abandoned:
            run.say(
                f"  rollback   {', '.join(c.name for c in abandoned)}: the branch this run "
                f"abandons, removed at its first checkpoint; until then `latest` names "
                f"{resume_from.name}"
            )
        saved = ckpt.saved_config(resume_from)
        for note in horizon_notes(cfg, plan, saved) + data_notes(cfg, saved):
            run.say(note)
        if rollback and cfg.logger.name == "wandb":
            why = f" (this resume changes {', '.join(retrained)})" if retrained else ""
            run.say(
                f"  wandb      a new W&B run: the run dir's last one holds steps up to "
                f"{logged_past:,} of the branch abandoned at step {state.step:,}{why}"
            )
    if peak is None:
        run.say("  mfu        n/a: no bf16 peak known for this device (see metrics.py)")
    return run


def accelerator_broadcast(accelerator, value: str) -> str:
    """Rank 0's value on every rank (the run dir is chosen once, by the main process)."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]
