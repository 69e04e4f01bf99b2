"""The Accelerator for a config: device, precision, process group, and the sharding plugin.

``cfg.dist.mode`` picks the plugin; the Hydra config is the single source of truth for
micro-batch, accumulation, clipping and precision, so the DeepSpeed config is generated from
it (a user's JSON is merged in only where it agrees: ``llmtrain/ds_config.py``).

    single, ddp    plain Accelerate (DDP when several processes)
    zero1/2/3      DeepSpeedPlugin; DeepSpeed owns accumulation, clipping and the step
    fsdp2          FullyShardedDataParallelPlugin(fsdp_version=2), DCP sharded checkpoints

CPU (gloo) facts this module relies on are in ``shared/DISTRIBUTED_CPU.md``: the DeepSpeed
plugin is dropped by ``Accelerator(cpu=True)``, so DeepSpeed runs on CPU without it, and
Accelerate never applies FSDP to a CPU run, so :func:`_fsdp_on_cpu` applies it.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DistributedDataParallelKwargs,
    DistributedType,
    GradientAccumulationPlugin,
    InitProcessGroupKwargs,
)

from llmtrain.checks import CPU_ATTENTIONS
from llmtrain.config import ConfigError, TrainConfig, world_size_from_env
from llmtrain.ds_config import ZERO_STAGE, deepspeed_config

EXPECTED_TYPE = {
    "single": (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU),  # 1 proc
    "ddp": (DistributedType.MULTI_GPU, DistributedType.MULTI_CPU, DistributedType.NO),
    "zero1": (DistributedType.DEEPSPEED,),
    "zero2": (DistributedType.DEEPSPEED,),
    "zero3": (DistributedType.DEEPSPEED,),
    "fsdp2": (DistributedType.FSDP,),
}


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device: cuda was asked for but torch sees no CUDA device")
    return device


def resolve_precision(precision: str, device: str) -> str:
    """Accelerate's mixed_precision name: bf16 on GPU by default, fp32 ("no") on CPU."""
    if precision == "auto":
        return "bf16" if device == "cuda" else "no"
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]


def is_deepspeed(cfg: TrainConfig) -> bool:
    return cfg.dist.mode in ZERO_STAGE


HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}  # Accelerate's mixed_precision names


def weight_dtype(cfg: TrainConfig, device: str) -> torch.dtype:
    """The dtype prepare() gives the model's weights: DeepSpeed's bf16 or fp16 (the fp32
    master copy is the optimizer's); fp32 otherwise (autocast, FSDP2's fp32 shards)."""
    precision = resolve_precision(cfg.trainer.precision, device)
    return HALF.get(precision, torch.float32) if is_deepspeed(cfg) else torch.float32


def check_world_size(mode: str, world_size: int) -> None:
    """dist=single is one process: more would each train a copy of their own."""
    if world_size > 1 and mode == "single":
        raise ConfigError(
            f"dist.mode: 'single' is one process and this run has {world_size}; choose "
            "dist=ddp, zero1, zero2, zero3 or fsdp2"
        )


def check_launch(cfg: TrainConfig, world_size: int) -> None:
    """Mismatches between the config, the launcher and the device, caught before any process
    group."""
    mode = cfg.dist.mode
    device = resolve_device(cfg.trainer.device)
    attention = cfg.trainer.attention
    if device == "cpu" and attention not in CPU_ATTENTIONS:
        raise ConfigError(
            f"trainer.attention: {attention} is a CUDA kernel and this run is on the CPU; "
            f"use one of {', '.join(CPU_ATTENTIONS)}"
        )
    if device == "cpu" and cfg.trainer.precision == "fp16":
        # checks.py refuses trainer.device=cpu with fp16; this is device=auto on a machine
        # without a GPU, where Accelerate would otherwise train in fp32 without a word.
        raise ConfigError(
            "trainer.precision: fp16 mixed precision needs a GPU and this run is on the CPU "
            "(trainer.device=auto found no CUDA device); use trainer.precision=fp32 or bf16"
        )
    if device == "cuda" and attention == "flash" and cfg.trainer.precision == "fp32":
        raise ConfigError(
            "trainer.attention: flash attention on CUDA needs bf16 or fp16; set "
            "trainer.precision=bf16 (or auto), or trainer.attention=auto"
        )
    check_world_size(mode, world_size)
    env = os.environ
    mpi_rank = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "PMIX_RANK")
    if (
        env.get("ACCELERATE_USE_CPU", "").lower() == "true"
        and "MASTER_ADDR" in env
        and "RANK" not in env
        and not any(k in env for k in mpi_rank)
    ):
        # Accelerate's simple launcher (meant to run under mpirun) took --num_processes N and
        # started one process; ddp trained alone without a word and ZeRO failed past startup.
        raise ConfigError(
            "launcher: `accelerate launch --cpu --num_processes N` starts one process, not N; "
            "launch CPU processes with `accelerate launch --config_file launch/cpu.yaml`"
        )
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        if mode not in ZERO_STAGE or (stage and int(stage) != ZERO_STAGE[mode]):
            raise ConfigError(
                f"dist.mode: {mode!r} but the accelerate config file asks for DeepSpeed ZeRO "
                f"stage {stage}; pass dist=zero{stage}"
                + (" (or zero3-offload)" if stage == "3" else "")
                + " or launch with launch/multi-gpu.yaml"
            )
    if env.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and mode != "fsdp2":
        raise ConfigError(
            f"dist.mode: {mode!r} but the accelerate config file asks for FSDP; "
            "pass dist=fsdp2 or launch with launch/multi-gpu.yaml"
        )
    if mode == "fsdp2" and device == "cpu" and world_size < 2:
        raise ConfigError(
            "dist.mode: fsdp2 on CPU needs at least 2 processes "
            "(accelerate launch --config_file launch/cpu.yaml); use dist=single"
        )


def _deepspeed_plugin(cfg: TrainConfig, grad_accum: int, world_size: int, device: str):
    from accelerate.utils import DeepSpeedPlugin

    ds = deepspeed_config(cfg, grad_accum, world_size, device)
    zero = ds["zero_optimization"]
    # Every plugin field is given, so the launcher's ACCELERATE_DEEPSPEED_* env never wins.
    # A DEEPSPEED accelerate config (launch/zero*.yaml) also lists its fields (zero_stage,
    # mixed_precision) in ACCELERATE_CONFIG_DS_FIELDS, and DeepSpeedPlugin refuses those next
    # to a full DeepSpeed config; check_launch has already held them against dist=.
    fields = os.environ.pop("ACCELERATE_CONFIG_DS_FIELDS", None)
    try:
        return DeepSpeedPlugin(
            hf_ds_config=ds,
            gradient_accumulation_steps=grad_accum,
            gradient_clipping=cfg.optim.grad_clip,
            zero_stage=zero["stage"],
            offload_optimizer_device=zero.get("offload_optimizer", {}).get("device", "none"),
            offload_param_device=zero.get("offload_param", {}).get("device", "none"),
            zero3_init_flag=False,  # llmtrain builds the model before prepare()
            zero3_save_16bit_model=False,
        )
    finally:
        if fields is not None:
            os.environ["ACCELERATE_CONFIG_DS_FIELDS"] = fields


def _fsdp2_plugin(cfg: TrainConfig, device: str):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = None
    if (precision := resolve_precision(cfg.trainer.precision, device)) != "no":
        # Accelerate's own policy also casts the model's outputs (output_dtype): the fp32 loss
        # came back rounded to bf16, so every logged loss and val_loss was off by up to half a
        # bf16 step (0.008 at a loss of 3). Weights are gathered in bf16; gradients are reduced
        # and added up over micro-batches in fp32, as torchtitan does. In bf16 (8 significant
        # bits), a sum grown to 32 micro-batches' gradients kept only 3 bits of the next one.
        policy = MixedPrecisionPolicy(param_dtype=HALF[precision], reduce_dtype=torch.float32)
    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        mixed_precision_policy=policy,
        reshard_after_forward=cfg.dist.reshard_after_forward,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["Block"],  # llmtrain.model.Block
        state_dict_type="SHARDED_STATE_DICT",  # DCP: each rank writes its shard; reshards on load
        # Rank 0's model is broadcast into every rank's shards; the others build theirs empty
        # (run.py), so a node holds one full fp32 model at start, not one per process.
        cpu_ram_efficient_loading=True,
        activation_checkpointing=False,  # the model applies its own (trainer.activation_...)
    )


def build_accelerator(cfg: TrainConfig, grad_accum: int) -> Accelerator:
    device = resolve_device(cfg.trainer.device)
    if device == "cpu":  # DeepSpeed, imported by Accelerate along the way, warns otherwise
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        if cfg.dist.mode in ZERO_STAGE:
            _skip_shm_comm_build()
    if cfg.dist.mode in ZERO_STAGE and cfg.dist.offload_optimizer:
        clear_stale_cpu_adam_lock()  # before the ranks meet: none is compiling yet
    if (cfg.dist.mode in ZERO_STAGE or cfg.dist.mode == "fsdp2") and "RANK" not in os.environ:
        _world_of_one_env()
    world = world_size_from_env()
    backend = cfg.dist.backend or ("nccl" if device == "cuda" else "gloo")
    mode = cfg.dist.mode
    plugins: dict[str, Any] = {}
    if mode in ZERO_STAGE:
        plugins["deepspeed_plugin"] = _deepspeed_plugin(cfg, grad_accum, world, device)
    elif mode == "fsdp2":
        plugins["fsdp_plugin"] = _fsdp2_plugin(cfg, device)
    # cpu=True drops a DeepSpeed plugin without a word; DeepSpeed finds the CPU itself.
    cpu = device == "cpu" and mode not in ZERO_STAGE
    # Accelerate's state reads CPU mode from the environment too; set only while it is built,
    # so a later run in this process (a notebook, a forked test) is not forced onto the CPU.
    set_env = cpu and "ACCELERATE_USE_CPU" not in os.environ
    if set_env:
        os.environ["ACCELERATE_USE_CPU"] = "1"
    try:
        accelerator = _accelerator(cfg, device, grad_accum, world, backend, cpu, plugins)
    finally:
        if set_env:
            del os.environ["ACCELERATE_USE_CPU"]
    if mode == "fsdp2" and device == "cpu":
        _fsdp_on_cpu(accelerator, plugins["fsdp_plugin"])
    expected = EXPECTED_TYPE[mode]
    if accelerator.distributed_type not in expected:
        raise RuntimeError(
            f"dist.mode={mode}: Accelerate set up {accelerator.distributed_type}, expected "
            f"{' or '.join(str(e) for e in expected)}. Check the accelerate config file "
            "(launch/*.yaml) and that transformers is installed for DeepSpeed."
        )
    return accelerator


STALE_LOCK_S = 1800  # the CPU Adam compiles in about a minute; a lock this old is abandoned


def _cpu_adam_build_dir() -> Path | None:
    """Where DeepSpeed JIT-compiles its CPU Adam, or None when this install has it built in
    (``DS_BUILD_CPU_ADAM=1``)."""
    from deepspeed.git_version_info import installed_ops
    from torch.utils.cpp_extension import _get_build_directory

    if installed_ops.get("cpu_adam"):
        return None
    return Path(_get_build_directory("cpu_adam", verbose=False))


def clear_stale_cpu_adam_lock() -> None:
    """A compile of DeepSpeed's CPU Adam killed midway (a timeout, scancel, an OOM kill) leaves
    a lock file, and every later run with optimizer offload waits on it forever without a word.
    The node's first rank removes a lock older than any compile, before the ranks meet."""
    build = _cpu_adam_build_dir()
    if build is None or int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return
    lock = build / "lock"
    with contextlib.suppress(FileNotFoundError):
        age = time.time() - lock.stat().st_mtime
        if age > STALE_LOCK_S:
            lock.unlink()
            print(
                f"llmtrain: removed {lock}: a compile of DeepSpeed's CPU Adam stopped "
                f"{age / 60:.0f} min ago left it, and DeepSpeed would wait on it forever",
                file=sys.stderr,
                flush=True,
            )


def _skip_shm_comm_build() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce at every init: ~32 s on a
    new machine, and a build interrupted midway leaves a lock that every later run waits on
    forever. Only tensor-parallel inference uses it (``inference_all_reduce``); training's
    collectives are gloo's. Replaced on the module object itself: the attribute path
    ``deepspeed.comm.torch`` names a function, not this module."""
    module = importlib.import_module("deepspeed.comm.torch")
    if hasattr(module, "build_shm_op"):
        module.build_shm_op = lambda: None


def _accelerator(
    cfg: TrainConfig,
    device: str,
    grad_accum: int,
    world: int,
    backend: str,
    cpu: bool,
    plugins: dict[str, Any],
) -> Accelerator:
    return Accelerator(
        cpu=cpu,
        mixed_precision=resolve_precision(cfg.trainer.precision, device),
        # FSDP2 reduce-scatters every micro-batch's gradients into the fp32 shards: skipping
        # the sync (no_sync) would hold the whole model's unsharded gradients on every rank
        # until the last one.
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=grad_accum, sync_each_batch=cfg.dist.mode == "fsdp2"
        ),
        step_scheduler_with_optimizer=False,
        # A backend given to a single process makes Accelerate expect a process group.
        kwargs_handlers=[
            InitProcessGroupKwargs(backend=backend, timeout=timedelta(seconds=cfg.dist.timeout_s)),
            # DDP's gradients are views into its all-reduce buckets, not a second copy of
            # every gradient beside them (4 bytes per parameter; ignored by ZeRO and FSDP2).
            DistributedDataParallelKwargs(gradient_as_bucket_view=True),
        ]
        if world > 1
        else [],
        **plugins,
    )


WORLD_OF_ONE = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def end_processes() -> None:
    """At a run's end: every rank at the same point, then the process group destroyed (what
    Accelerate's ``end_training()`` does), after the run's model is gone.

    DDP's gradient reducer holds the group. When it let go of the group last, gloo's destructor
    joined its threads with the GIL held while one of them waited for the GIL to free a finished
    collective's tensors: a 2-process CPU run hung, now and then, once trained and saved. Torch's
    own handle on the group lets go of the GIL first. The barrier: a rank tearing the group down
    while another still finishes can hang that one (pytorch/pytorch#75097).
    """
    from accelerate.state import PartialState

    gc.collect()  # a model in a reference cycle (a forward wrapper pointing back at it)
    state = PartialState()
    state.wait_for_everyone()
    state.destroy_process_group()


@contextlib.contextmanager
def process_scope() -> Iterator[None]:
    """One ``train()`` call's hold on process-wide state, when no launcher started the process.

    A launched process (``RANK`` set) keeps its process group: the launcher owns it. Otherwise
    a DeepSpeed or FSDP2 run makes a world of one (:func:`_world_of_one_env`), and on the way
    out the process group is destroyed, those variables and ``F.linear`` are restored and
    Accelerate's process-wide state is reset, so a later ``train()`` in the same process (a
    notebook, a test) may use any ``dist`` mode.
    """
    if "RANK" in os.environ:
        yield
        return

    # Accelerate's plugins also leave ACCELERATE_* variables (DeepSpeed on, the ZeRO stage).
    def ours(key: str) -> bool:
        return key in WORLD_OF_ONE or key.startswith("ACCELERATE_")

    saved = {k: v for k, v in os.environ.items() if ours(k)}
    # ZeRO-3 swaps torch.nn.functional.linear for its own wrapper and never puts it back:
    # every later run in the process would go through DeepSpeed's linear.
    linear = torch.nn.functional.linear
    try:
        yield
    finally:
        from accelerate.state import AcceleratorState, GradientState

        torch.nn.functional.linear = linear

        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        # Accelerate's end_training() destroys the group with torch's call, which leaves
        # DeepSpeed's cached groups (its clone of the world) pointing at the dead one.
        ds_groups = sys.modules.get("deepspeed.utils.groups")
        if hasattr(ds_groups, "_release_process_group_references"):
            ds_groups._release_process_group_references(None)
        for key in [k for k in os.environ if ours(k)]:
            del os.environ[key]
        os.environ.update(saved)
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def _world_of_one_env() -> None:
    """DeepSpeed and FSDP2 need a process group even for one process (``llmtrain-train
    dist=zero3`` on one GPU, no launcher); without torchrun's variables DeepSpeed goes looking
    for MPI. This sets them for a world of one on a free local port."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in zip(WORLD_OF_ONE, ("0", "0", "1", "1", "127.0.0.1", str(port)), strict=True):
        os.environ.setdefault(key, value)


def _fsdp_on_cpu(accelerator: Accelerator, plugin) -> None:
    """Accelerate applies FSDP only to accelerator devices and silently runs a CPU job as DDP;
    FSDP2 itself works on CPU with gloo. This sets the state Accelerate would have set on a
    GPU, so CPU runs (and CI) take the same prepare / save_state / load_state path as GPUs."""
    from accelerate.state import PartialState

    state = accelerator.state
    if state.distributed_type == DistributedType.FSDP:
        return
    # Both shared states: a later AcceleratorState() re-reads PartialState's.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)


def build_dist_optimizer(model: torch.nn.Module, cfg: TrainConfig, device_type: str):
    """llmtrain's AdamW, or DeepSpeed's CPU Adam (same math, AdamW mode) when ZeRO keeps the
    optimizer state on the CPU: torch's AdamW there would step on the CPU at a crawl."""
    from llmtrain.optim import build_optimizer

    if not cfg.dist.offload_optimizer:
        return build_optimizer(model, cfg.optim, device_type)
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    build = _cpu_adam_build_dir()
    first_on_node = os.environ.get("LOCAL_RANK", "0") == "0"
    if build is not None and first_on_node and not any(build.glob("*.so")):
        print(
            "llmtrain: DeepSpeed is compiling its CPU Adam for dist.offload_optimizer (about a "
            f"minute, once per machine; cached in {build})",
            flush=True,
        )
        if (build / "lock").exists():  # younger than STALE_LOCK_S, or it would be gone
            print(
                f"llmtrain: it waits for {build / 'lock'}: another run is compiling it, or one "
                "was killed while compiling it; if none is running, remove that file",
                flush=True,
            )
    o = cfg.optim
    return DeepSpeedCPUAdam(
        model.configure_param_groups(o.weight_decay),
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
        adamw_mode=True,
    )
