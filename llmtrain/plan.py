"""``llmtrain-plan``: will this run fit, and how long will it take? Answered before launching.

Everything here is arithmetic on the config; no model is allocated, so planning an 8B model on a
laptop takes a second. Memory: ``llmtrain/memory.py``, where the accounting is stated. Compute:
:func:`llmtrain.metrics.flops_per_token` (6N + 12 * n_layer * n_embd * seq_len, PaLM appendix
B), at an assumed MFU of a stated device peak.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from llmtrain.config import ConfigError, TrainConfig, load_config, world_size_from_env
from llmtrain.dist import check_world_size
from llmtrain.ds_config import ZERO_STAGE
from llmtrain.memory import (
    activation_bytes,
    loss_bytes,
    offloaded,
    param_counts,
    shard_states,
    state_bytes_per_param,
    step_dtypes,
    weight_copy_bytes,
)
from llmtrain.metrics import PEAK_BF16_TFLOPS, flops_per_token, format_eta
from llmtrain.model import padded_vocab
from llmtrain.tokenizer import check_vocab, get_tokenizer

GiB = 2**30
H100_SXM_BF16_TFLOPS = dict(PEAK_BF16_TFLOPS)["H100"]  # the default device


# ----------------------------------------------------------------------------- the plan


@dataclass
class MemoryPlan:
    """Every number ``llmtrain-plan`` prints. Bytes are per GPU unless named cpu_*."""

    model: str
    n_params: int
    n_params_non_embedding: int
    largest_layer_params: int
    vocab_size: int
    padded_vocab_size: int
    world_size: int
    gpus_per_node: int
    mode: str
    precision: str
    offload_optimizer: bool
    offload_params: bool
    micro_batch: int
    seq_len: int
    grad_accum: int
    tokens_per_step: int
    max_steps: int | None
    bytes_per_param: dict[str, int]
    params_bytes: float
    grads_bytes: float
    optim_bytes: float
    gather_bytes: float  # zero3/fsdp2: one gathered layer (bf16 params + grads; fsdp2: fp32 too)
    cpu_bytes_per_node: float
    cpu_start_bytes_per_node: float  # rank 0's fp32 model at start (+ init_from's weights)
    init_from: bool
    activation_checkpointing: bool
    activation_bytes: float  # as configured
    activation_bytes_no_ckpt: float
    activation_bytes_ckpt: float
    loss_bytes: float
    loss_chunk: int
    weight_copy_bytes: float  # autocast's bf16 weight copies, as configured
    weight_copy_bytes_ckpt: float  # the same under activation checkpointing
    compiled: bool
    flops_per_token: float
    flops_per_step: float
    mfu: float
    peak_tflops: float
    step_time_s: float
    run_time_s: float | None
    gpu_mem_bytes: float
    reshard_after_forward: bool = True

    @property
    def states_bytes(self) -> float:
        return self.params_bytes + self.grads_bytes + self.optim_bytes + self.gather_bytes

    @property
    def total_bytes(self) -> float:
        return self.states_bytes + self.activation_bytes + self.loss_bytes + self.weight_copy_bytes

    @property
    def headroom_bytes(self) -> float:
        return self.gpu_mem_bytes - self.total_bytes

    @property
    def fits(self) -> bool:
        return self.headroom_bytes >= 0

    def hints(self) -> list[str]:
        """What would shrink the largest parts, in the order worth trying."""
        out = []
        if self.loss_chunk == 0 and self.loss_bytes > self.activation_bytes:
            out.append("trainer.loss_chunk=8192 (the fused loss: no (tokens x vocab) tensors)")
        if self.activation_bytes + self.loss_bytes > self.states_bytes:
            if not self.activation_checkpointing:
                ckpt = self.activation_bytes_ckpt + self.loss_bytes + self.weight_copy_bytes_ckpt
                out.append(
                    "trainer.activation_checkpointing=true "
                    f"(activations + loss{' + bf16 weights' if self.weight_copy_bytes else ''} "
                    f"-> {ckpt / GiB:.1f} GiB)"
                )
            if self.micro_batch > 1:
                out.append(
                    f"trainer.micro_batch_size={self.smaller_micro_batch} "
                    "(activations scale with the micro-batch; accumulation keeps "
                    "batch_tokens)"
                )
        if self.mode in ("single", "ddp", "zero1", "zero2") and self.world_size > 1:
            out.append("dist=zero3 or dist=fsdp2 (shard parameters too)")
        elif self.mode in ("single", "ddp") and self.world_size == 1:
            out.append(
                "more GPUs with dist=zero3/fsdp2, or dist=zero2 with dist.offload_optimizer=true"
            )
        if self.mode in ZERO_STAGE and not self.offload_optimizer:
            out.append("dist.offload_optimizer=true (optimizer state to CPU)")
        elif self.mode == "zero3" and not self.offload_params:
            out.append("dist.offload_params=true (parameters to CPU)")
        if not out and self.micro_batch > 1:
            out.append(f"trainer.micro_batch_size={self.smaller_micro_batch}")
        return out

    @property
    def smaller_micro_batch(self) -> int:
        """The largest micro-batch up to half this one that divides the sequences each process
        trains per step (so trainer.batch_tokens stays as it is)."""
        rows = self.micro_batch * self.grad_accum
        return max(m for m in range(1, max(1, self.micro_batch // 2) + 1) if rows % m == 0)


def plan(
    cfg: TrainConfig,
    world_size: int = 1,
    gpu_mem_gb: float = 80.0,
    mfu: float = 0.4,
    peak_tflops: float = H100_SXM_BF16_TFLOPS,
    gpus_per_node: int | None = None,
) -> MemoryPlan:
    """The memory and time plan for ``cfg`` on ``world_size`` GPUs of ``gpu_mem_gb`` GiB."""
    m, t, d = cfg.model, cfg.trainer, cfg.dist
    gpn = gpus_per_node if gpus_per_node is not None else min(world_size, 8)
    # precision "auto" trains in bf16 on a GPU, which is what this plans for.
    precision = t.precision if t.precision in ("fp32", "fp16") else "bf16"
    dt = step_dtypes(d.mode, precision)
    total, body, largest = param_counts(m)
    gpu, cpu = shard_states(
        total, world_size, d.mode, precision, d.offload_optimizer, d.offload_params
    )
    gather = 0.0
    if d.mode in ("zero3", "fsdp2"):
        gather = 2 * dt.act * largest  # params + grads, in the compute dtype
    if d.mode == "fsdp2":
        gather += 4 * largest  # the grads' reduce-scatter input, in fp32 (its reduce_dtype)
        if not d.reshard_after_forward:  # every block stays gathered, forward to backward
            gather += dt.act * (total - largest)
    b, s = t.micro_batch_size, cfg.data.seq_len
    act_off = activation_bytes(m, b, s, dt, checkpointing=False)
    act_on = activation_bytes(m, b, s, dt, checkpointing=True)
    fpt = flops_per_token(m, s)
    step_time = fpt * t.batch_tokens / (world_size * peak_tflops * 1e12 * mfu)
    steps = t.max_steps or (math.ceil(t.max_tokens / t.batch_tokens) if t.max_tokens else None)
    return MemoryPlan(
        model=m.name,
        n_params=total,
        n_params_non_embedding=body,
        largest_layer_params=largest,
        vocab_size=m.vocab_size,
        padded_vocab_size=padded_vocab(m),
        world_size=world_size,
        gpus_per_node=gpn,
        mode=d.mode,
        precision=precision,
        offload_optimizer=d.offload_optimizer,
        offload_params=d.offload_params,
        micro_batch=b,
        seq_len=s,
        grad_accum=t.batch_tokens // (b * s * world_size),
        tokens_per_step=t.batch_tokens,
        max_steps=steps,
        bytes_per_param=state_bytes_per_param(d.mode, precision, d.offload_optimizer),
        params_bytes=gpu["params"],
        grads_bytes=gpu["grads"],
        optim_bytes=gpu["optim"],
        gather_bytes=gather,
        cpu_bytes_per_node=gpn * sum(cpu.values()),
        # Rank 0 builds GPT(cfg.model) on the CPU in fp32, and prepare() broadcasts it (the
        # other ranks' are empty: run.py); trainer.init_from: rank 0 reads a full fp32 state
        # dict beside it (init_weights.py).
        cpu_start_bytes_per_node=4 * total * (2 if t.init_from else 1),
        init_from=bool(t.init_from),
        activation_checkpointing=t.activation_checkpointing,
        activation_bytes=act_on if t.activation_checkpointing else act_off,
        activation_bytes_no_ckpt=act_off,
        activation_bytes_ckpt=act_on,
        loss_bytes=loss_bytes(m, b * s, dt, t.loss_chunk),
        loss_chunk=t.loss_chunk,
        weight_copy_bytes=weight_copy_bytes(m, dt, t.activation_checkpointing, b, s),
        weight_copy_bytes_ckpt=weight_copy_bytes(m, dt, True, b, s),
        compiled=t.compile,
        flops_per_token=fpt,
        flops_per_step=fpt * t.batch_tokens,
        mfu=mfu,
        peak_tflops=peak_tflops,
        step_time_s=step_time,
        run_time_s=step_time * steps if steps else None,
        gpu_mem_bytes=gpu_mem_gb * GiB,
        reshard_after_forward=d.reshard_after_forward,
    )


# ----------------------------------------------------------------------------- report


def _count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def _gib(n: float) -> str:
    return f"{n / GiB:9.2f} GiB"


def _duration(seconds: float) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.1f} days ({format_eta(seconds)})"
    return format_eta(seconds) if seconds >= 60 else f"{seconds:.2f} s"


def format_plan(p: MemoryPlan) -> str:
    bpp = p.bytes_per_param
    optim_note = {
        8: "Adam m, v",
        12: "fp32 master + Adam m, v",
        16: "fp32 master + Adam m, v + fp32 grad partition",
    }[bpp["optim"]]
    dtype = {k: f"{v} ({p.precision if v == 2 else 'fp32'})" for k, v in bpp.items()}
    shard = {
        "single": "replicated",
        "ddp": "replicated",
        "zero1": "optimizer sharded",
        "zero2": "optimizer + grads sharded",
        "zero3": "everything sharded",
        "fsdp2": "everything sharded",
    }[p.mode]
    offload = [
        k for k, on in (("optimizer", p.offload_optimizer), ("params", p.offload_params)) if on
    ]
    moved = offloaded(p.mode, p.precision, p.offload_optimizer, p.offload_params)
    cpu = {k: ", offloaded to CPU" if k in moved else "" for k in bpp}
    ckpt = "on" if p.activation_checkpointing else "off"
    other_ckpt = (
        p.activation_bytes_no_ckpt if p.activation_checkpointing else p.activation_bytes_ckpt
    )
    lines = [
        f"llmtrain-plan | {p.model} on {p.world_size} GPU(s) ({p.gpus_per_node} per node), "
        f"dist {p.mode} ({shard}), {p.precision}"
        + (f", offload {' + '.join(offload)}" if offload else ""),
        "",
        f"  parameters     {_count(p.n_params)} total ({p.n_params:,}), "
        f"{_count(p.n_params_non_embedding)} non-embedding; vocab {p.vocab_size} padded to "
        f"{p.padded_vocab_size}",
        f"  batch          {p.micro_batch} seq x {p.seq_len} tok x {p.grad_accum} accum x "
        f"{p.world_size} GPU = {p.tokens_per_step:,} tokens/step",
        "",
        "  memory per GPU                                 bytes/param before sharding",
        f"  params        {_gib(p.params_bytes)}   {dtype['params']}{cpu['params']}",
        f"  grads         {_gib(p.grads_bytes)}   {dtype['grads']}{cpu['grads']}",
        f"  optimizer     {_gib(p.optim_bytes)}   {bpp['optim']} ({optim_note}){cpu['optim']}",
    ]
    if p.gather_bytes and not p.reshard_after_forward and p.mode == "fsdp2":
        lines.append(
            f"  gathered      {_gib(p.gather_bytes)}   every block's params, forward to backward "
            "(dist.reshard_after_forward=false)"
        )
    elif p.gather_bytes:
        lines.append(
            f"  gathered layer{_gib(p.gather_bytes)}   params + grads of the largest "
            f"layer ({_count(p.largest_layer_params)})"
            + (", grads in fp32 too" if p.mode == "fsdp2" else "")
        )
    lines += [
        f"  activations   {_gib(p.activation_bytes)}   checkpointing {ckpt} "
        f"({'off' if p.activation_checkpointing else 'on'}: {other_ckpt / GiB:.2f} GiB)",
        f"  loss          {_gib(p.loss_bytes)}   "
        + (
            f"fused, {p.loss_chunk}-token chunks (trainer.loss_chunk)"
            if p.loss_chunk
            else "fp32 log-softmax and two gradients, tokens x vocab each"
        ),
    ]
    if p.weight_copy_bytes:
        lines.append(
            f"  bf16 weights  {_gib(p.weight_copy_bytes)}   autocast's copies, "
            + ("held until the forward ends" if p.activation_checkpointing else "kept for backward")
        )
    lines.append(f"  total         {_gib(p.total_bytes)}")
    if p.cpu_bytes_per_node:
        lines.append(
            f"  CPU per node  {_gib(p.cpu_bytes_per_node)}   offloaded states of "
            f"{p.gpus_per_node} GPU(s); have 1.5x this (DeepSpeed's margin for buffers)"
        )
    weights = ", and rank 0 the trainer.init_from weights beside it" if p.init_from else ""
    lines.append(
        f"  CPU at start  {_gib(p.cpu_start_bytes_per_node)}   rank 0 builds the fp32 model "
        f"and prepare() broadcasts it{weights}"
    )
    share = 100 * p.headroom_bytes / p.gpu_mem_bytes
    if p.fits:
        verdict = f"fits: {p.headroom_bytes / GiB:.2f} GiB headroom ({share:.0f}%)"
        if share < 10:
            verdict += "; tight, CUDA context and fragmentation need ~1-3 GiB"
    else:
        verdict = f"does not fit: {-p.headroom_bytes / GiB:.2f} GiB over"
    lines += [f"  GPU {p.gpu_mem_bytes / GiB:.0f} GiB    {verdict}"]
    if not p.fits or share < 10:
        lines += ["  try           " + h for h in p.hints()]
    lines += [
        "",
        f"  compute        {p.flops_per_token / 1e9:.3f} GFLOPs/token (6N + 12 L h T), "
        f"{p.flops_per_step / 1e15:.2f} PFLOPs/step",
        f"  step time      {_duration(p.step_time_s)} at {100 * p.mfu:.0f}% MFU of "
        f"{p.peak_tflops:g} TFLOP/s x {p.world_size} GPU(s)",
    ]
    if p.max_steps:
        lines.append(
            f"  run            {p.max_steps:,} steps = {p.max_steps * p.tokens_per_step:,}"
            f" tokens: {_duration(p.run_time_s or 0.0)}"
        )
    else:
        lines.append("  run            no horizon: set trainer.max_steps or trainer.max_tokens")
    if p.compiled:
        lines.append(
            "  note           planned for eager steps; torch.compile fuses the loss and\n"
            "                 elementwise ops and keeps less (benchmarks/RESULTS.md)"
        )
    if p.activation_checkpointing:
        lines.append(
            "  note           checkpointing recomputes the forward (~1/3 more compute)\n"
            "                 and MFU counts model FLOPs only, so expect a lower one"
        )
    return "\n".join(lines)


def _load(overrides: list[str], world_size: int) -> TrainConfig:
    """load_config, but a missing horizon is no reason not to plan memory."""
    try:
        return load_config(overrides, world_size=world_size)
    except ConfigError as e:
        if not str(e).startswith("trainer.max_steps: set trainer.max_steps"):
            raise
    # A horizon long enough for any warmup and decay, dropped again after the checks.
    cfg = load_config([*overrides, f"trainer.max_steps={2**62}"], world_size=world_size)
    cfg.trainer.max_steps = None
    return cfg


DOES_NOT_FIT = 3  # not 1, a crash's code: a script can tell "too big" from "broken"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="llmtrain-plan",
        description="Memory per GPU and time for a training config, before launching: the "
        "same Hydra overrides as llmtrain-train, and the flags below, in any order.",
        epilog="example: llmtrain-plan --gpus 8 --gpu-mem 80 model=llama-8b dist=zero3 "
        "trainer.micro_batch_size=1 data.seq_len=4096 trainer.max_tokens=20_000_000_000. "
        "Exit status: 0 it fits, 3 it does not fit, 2 a bad config or flag.",
    )
    parser.add_argument(
        "--gpus",
        type=int,
        default=world_size_from_env(),
        help="world size: GPUs in the whole run (default: $WORLD_SIZE or 1)",
    )
    parser.add_argument(
        "--gpus-per-node",
        type=int,
        default=None,
        help="for CPU offload memory per node (default: min(gpus, 8))",
    )
    parser.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU (default 80)")
    parser.add_argument(
        "--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation (default 0.4)"
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=H100_SXM_BF16_TFLOPS,
        help="device peak TFLOP/s (default: H100 SXM dense bf16, 989)",
    )
    parser.add_argument(
        "--config-dir",
        "-cd",
        help="a folder of your own configs (experiment/, model/...), as llmtrain-train's",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=gpt2-small")
    args = parser.parse_intermixed_args(argv)  # README: `llmtrain-plan ... --gpu-mem 24 key=v`
    if args.gpus < 1 or not 0 < args.mfu <= 1:
        parser.error("--gpus must be >= 1, --mfu in (0, 1]")
    if not all(math.isfinite(v) and v > 0 for v in (args.gpu_mem, args.peak_tflops)):
        parser.error("--gpu-mem and --peak-tflops must be numbers > 0")
    if args.gpus_per_node is not None and not 1 <= args.gpus_per_node <= args.gpus:
        parser.error(f"--gpus-per-node must be between 1 and --gpus ({args.gpus})")
    overrides = list(args.overrides)
    if args.config_dir:
        if not Path(args.config_dir).is_dir():
            parser.error(f"--config-dir {args.config_dir}: no such folder")
        overrides.append(f"hydra.searchpath=[file://{Path(args.config_dir).resolve()}]")
    try:
        cfg = _load(overrides, args.gpus)
        check_world_size(cfg.dist.mode, args.gpus)  # what the launch would refuse
        check_vocab(get_tokenizer(cfg.data.tokenizer), cfg.model.vocab_size)  # and training
    except ConfigError as e:
        print(f"llmtrain-plan: bad config: {e}", file=sys.stderr)
        return 2
    p = plan(cfg, args.gpus, args.gpu_mem, args.mfu, args.peak_tflops, args.gpus_per_node)
    print(format_plan(p))
    if cfg.trainer.device == "cpu":
        print(
            "  note           this config trains on the CPU (trainer.device=cpu); the plan\n"
            f"                 is for {args.gpus} GPU(s) of {args.gpu_mem:g} GiB, in bf16"
        )
    return 0 if p.fits else DOES_NOT_FIT
