"""What types cannot say about a config: choices, ranges, and the relations between groups.

:func:`validate` runs on every composed config (``load_config``, the ``llmtrain-train`` entry
point, the bench), before any process group or model is built. Each check raises
:class:`ConfigError` naming the key, what was wrong and, where there is one, what to set instead.
The launch-time checks that need the world size and the device are in ``llmtrain/dist.py``
(``check_launch``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmtrain.timelimit import parse_duration

if TYPE_CHECKING:
    from llmtrain.config import (
        DataConfig,
        DistConfig,
        LoggerConfig,
        ModelConfig,
        OptimConfig,
        TrainConfig,
        TrainerConfig,
    )


class ConfigError(ValueError):
    """A configuration the run cannot start with; the message names the key."""


POSITIONS = ("learned", "rope")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
SOURCES = ("hf", "shards")
SCHEDULES = ("cosine", "wsd", "constant")
DIST_MODES = ("single", "ddp", "zero1", "zero2", "zero3", "fsdp2")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
LOGGERS = ("wandb", "none")
LOGGER_MODES = ("online", "offline", "disabled")
BACKENDS = ("nccl", "gloo")
ON_SAVE_ERROR = ("stop", "continue")
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
# torch.compile's modes that capture CUDA graphs: their graph trees own the backward's outputs,
# and across the micro-batches of one step the gradients are overwritten. On an H100 with
# torch 2.11, gpt2-small at 16 micro-batches per step crashed in a backward of its first steps
# (benchmarks/RESULTS.md); pytorch/pytorch#169545 is open. The GPU idle time they would remove
# was under 1% of that step.
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
ATTENTIONS = ("auto", "flash", "efficient", "cudnn", "math")
CPU_ATTENTIONS = ("auto", "flash", "math")  # efficient and cudnn are CUDA kernels
# Environment variables holding credentials: never in a config, which is saved beside every
# checkpoint, printed and sent to the logger.
SECRET_ENV = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_API_TOKEN")


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _one_of(value: Any, key: str, choices: tuple[str, ...]) -> None:
    _require(value in choices, key, f"got {value!r}, expected one of {', '.join(choices)}")


def _positive(section: Any, prefix: str, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if value is not None:
            _require(value > 0, f"{prefix}.{name}", f"must be positive, got {value}")


def validate(cfg: TrainConfig, world_size: int | None = None) -> TrainConfig:
    """Check the relations types cannot express; raise ConfigError naming the key."""
    _check_model(cfg.model)
    _check_data(cfg.data, cfg.model)
    _check_trainer(cfg.trainer, cfg.model)
    _check_optim(cfg.optim, cfg.trainer)  # after the trainer's horizon, which wsd divides
    _check_dist(cfg.dist, cfg.trainer)
    _check_logger(cfg.logger)
    _check_batch(cfg.trainer, cfg.data, world_size or 1)
    _finite(cfg)
    _no_secrets(cfg)
    return cfg


def _check_model(m: ModelConfig) -> None:
    _positive(
        m,
        "model",
        "n_layer",
        "n_head",
        "n_kv_head",
        "n_embd",
        "ffn_hidden",
        "context_length",
        "vocab_size",
        "vocab_pad_multiple",
        "rope_theta",
        "norm_eps",
        "init_std",
    )
    _require(
        m.n_embd % m.n_head == 0,
        "model.n_embd",
        f"{m.n_embd} is not divisible by model.n_head={m.n_head}",
    )
    kv = m.n_kv_head or m.n_head
    _require(
        m.n_head % kv == 0,
        "model.n_kv_head",
        f"{kv} does not divide model.n_head={m.n_head} (grouped-query attention)",
    )
    if m.position == "rope":
        _require(
            (m.n_embd // m.n_head) % 2 == 0,
            "model.n_embd",
            "rope needs an even head dimension (n_embd / n_head)",
        )
    _require(0.0 <= m.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {m.dropout}")
    _one_of(m.position, "model.position", POSITIONS)
    _one_of(m.norm, "model.norm", NORMS)
    _one_of(m.mlp, "model.mlp", MLPS)


def _check_data(d: DataConfig, m: ModelConfig) -> None:
    _require(
        d.seq_len <= m.context_length,
        "data.seq_len",
        f"{d.seq_len} exceeds model.context_length={m.context_length}; set "
        f"data.seq_len={m.context_length} (or less), or model.context_length={d.seq_len}",
    )
    check_data(d)


def check_data(d: DataConfig) -> None:
    """The data section on its own (what llmtrain-prepare reads, with no model or trainer)."""
    _positive(d, "data", "seq_len", "stride", "tokenize_batch", "prefetch_factor", "shard_tokens")
    _one_of(d.source, "data.source", SOURCES)
    _check_tokenizer_name(d.tokenizer)
    _require(
        d.stride is None or d.stride <= d.seq_len,
        "data.stride",
        f"{d.stride} is larger than data.seq_len={d.seq_len}; tokens would be skipped",
    )
    _require(d.num_workers >= 0, "data.num_workers", "must be >= 0")
    _require(
        d.shard_tokens < 2**31,
        "data.shard_tokens",
        f"{d.shard_tokens:,} does not fit the llm.c header's int32 token count (< 2**31)",
    )
    _require(d.shuffle_buffer >= 0, "data.shuffle_buffer", "must be >= 0")
    _require(
        d.val_split is not None or d.val_docs > 0,
        "data.val_docs",
        "must be positive when data.val_split is null (the held-out set would be empty)",
    )
    _require(
        d.files is not None or d.source != "hf" or d.val_split != d.train_split,
        "data.val_split",
        f"is the training split {d.train_split!r}: validation would measure memorised data; "
        "use the source's validation split or data.val_split=null (hold out data.val_docs)",
    )
    _require(
        0 < d.val_fraction < 1,
        "data.val_fraction",
        f"is {d.val_fraction}: the share of a one-file corpus kept for validation is in (0, 1)",
    )
    _require(
        d.val_files is None or d.files is not None,
        "data.val_files",
        "is only read with data.files (local corpora); set data.files too, or remove it",
    )
    _require(
        d.files is None or d.source == "hf",
        "data.files",
        f"is not read by data.source={d.source} (shards come from data.path); remove it",
    )
    _require(
        d.files is None or d.path == "local",
        "data.files",
        f"is read by data=local; this run's data is {d.name} (data.path={d.path}): add data=local",
    )
    # Only a Hub or datasets source has splits; the others named a split that was never read.
    _require(
        d.files is None or d.val_split is None,
        "data.val_split",
        f"is {d.val_split!r}, but data=local has no splits: validation is data.val_files, the "
        "tail of a one-file corpus, or the first data.val_docs documents; remove the override",
    )
    _require(
        d.source != "shards" or d.val_split in (None, "validation"),  # the schema's default
        "data.val_split",
        f"is {d.val_split!r}, but token shards have no splits: validation is the *_val_*.bin "
        "files in data.path; remove the override",
    )
    # A group file cannot make a key required ('???' merged onto the schema's default keeps the
    # default), so the two groups whose path the user must give are checked here.
    _require(
        not (d.source == "hf" and d.path == "local" and d.files is None),
        "data.files",
        "data=local reads files on this machine: set data.files=PATH_OR_GLOB (several, "
        "comma-separated, in Hydra's quotes: \"data.files='a.txt,more/*.txt'\")",
    )
    _require(
        not (d.source == "shards" and d.path == "sample"),
        "data.path",
        "data=shards reads llm.c .bin shards from a directory: set data.path=DIR "
        "(llmtrain-prepare writes one)",
    )


def _check_optim(o: OptimConfig, t: TrainerConfig) -> None:
    # The optimizer is AdamW (torch's, or DeepSpeed's under ZeRO); optim.name labels the recipe.
    # Another name (sgd, lion) would otherwise train AdamW without a word.
    _require(
        o.name.lower().startswith("adamw"),
        "optim.name",
        f"{o.name!r}: llmtrain trains with AdamW, and optim.name names the recipe (optim=adamw "
        "or optim=adamw-wsd); a schedule is chosen with optim.schedule",
    )
    _positive(o, "optim", "lr", "eps")
    _one_of(o.schedule, "optim.schedule", SCHEDULES)
    _require(0.0 <= o.min_lr_ratio <= 1.0, "optim.min_lr_ratio", "must be in [0, 1]")
    _require(0.0 < o.decay_fraction <= 1.0, "optim.decay_fraction", "must be in (0, 1]")
    _require(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _require(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    _require(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 disables clipping)")
    _require(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "optim.beta1", "betas must be in [0, 1)")
    # wsd's decay is a fraction of the horizon; warmup must end before it starts.
    steps = t.max_steps or -(-(t.max_tokens or 0) // t.batch_tokens)
    if o.schedule == "wsd" and steps:
        decay = max(1, round(o.decay_fraction * steps))
        _require(
            o.warmup_steps + decay <= steps,
            "optim.warmup_steps",
            f"{o.warmup_steps} warmup + {decay} decay steps (optim.decay_fraction="
            f"{o.decay_fraction}) exceed the {steps}-step horizon: wsd would decay during warmup",
        )


def _check_dist(dist: DistConfig, t: TrainerConfig) -> None:
    _one_of(dist.mode, "dist.mode", DIST_MODES)
    _require(
        not dist.offload_params or dist.mode == "zero3",
        "dist.offload_params",
        f"parameter offload needs dist.mode=zero3, got {dist.mode}",
    )
    _require(
        not dist.offload_optimizer or dist.mode.startswith("zero"),
        "dist.offload_optimizer",
        f"optimizer offload needs a ZeRO mode, got {dist.mode}",
    )
    _require(
        not (t.compile and dist.mode == "zero3"),
        "trainer.compile",
        "true is not available with ZeRO-3: DeepSpeed's forward hook cannot take torch.compile's "
        "wrapper and the first step fails; use dist=fsdp2 (compiles), or trainer.compile=false",
    )
    _require(
        dist.reshard_after_forward or dist.mode != "zero3",
        "dist.reshard_after_forward",
        "false is not available with ZeRO-3 (DeepSpeed always re-partitions parameters after "
        "forward); use dist=zero2 to keep whole parameters, or dist=fsdp2",
    )
    if dist.deepspeed_config is not None:
        _require(
            dist.mode.startswith("zero"),
            "dist.deepspeed_config",
            f"is only read by the ZeRO modes, not dist.mode={dist.mode}; remove it",
        )
        _require(
            Path(dist.deepspeed_config).is_file(),
            "dist.deepspeed_config",
            f"{dist.deepspeed_config} does not exist (cwd {os.getcwd()})",
        )
    if dist.backend is not None:
        _one_of(dist.backend, "dist.backend", BACKENDS)
        _require(
            dist.backend != "nccl" or t.device != "cpu",
            "dist.backend",
            "nccl needs GPUs; trainer.device=cpu runs on gloo (leave dist.backend unset)",
        )
    _positive(dist, "dist", "timeout_s")


def _check_logger(lg: LoggerConfig) -> None:
    _one_of(lg.name, "logger.name", LOGGERS)
    if lg.mode is not None:
        _one_of(lg.mode, "logger.mode", LOGGER_MODES)


def _check_trainer(t: TrainerConfig, m: ModelConfig) -> None:
    _positive(
        t,
        "trainer",
        "batch_tokens",
        "micro_batch_size",
        "max_steps",
        "max_tokens",
        "log_every",
        "eval_every",
        "eval_batches",
        "ckpt_every",
        "keep_last",
        "sample_tokens",
        "max_bad_steps",
    )
    _require(t.loss_chunk >= 0, "trainer.loss_chunk", "must be >= 0 (0 = the plain loss)")
    every, examples = t.hellaswag_every, t.hellaswag_examples
    _require(every >= 0, "trainer.hellaswag_every", f"must be >= 0 (0 = never), got {every}")
    _require(examples >= 0, "trainer.hellaswag_examples", f"must be >= 0 (0 = all), got {examples}")
    # numpy's and datasets' generators take non-negative seeds (data order, shuffling), and the
    # shuffle's per-epoch seed (seed * 100_003 + epoch) must fit datasets' int64 epoch counter.
    _require(0 <= t.seed < 2**32, "trainer.seed", f"must be in [0, 2**32), got {t.seed}")
    _require(
        t.compile_mode not in CUDA_GRAPH_MODES,
        "trainer.compile_mode",
        f"{t.compile_mode} captures CUDA graphs, which overwrite gradients across the "
        "micro-batches of a step (pytorch/pytorch#169545); use default or "
        "max-autotune-no-cudagraphs",
    )
    _one_of(t.compile_mode, "trainer.compile_mode", COMPILE_MODES)
    _one_of(t.attention, "trainer.attention", ATTENTIONS)
    _one_of(t.precision, "trainer.precision", PRECISIONS)
    _one_of(t.device, "trainer.device", DEVICES)
    _one_of(t.on_save_error, "trainer.on_save_error", ON_SAVE_ERROR)
    _require(
        not (t.precision == "fp16" and t.device == "cpu"),
        "trainer.precision",
        "fp16 mixed precision needs a GPU; on trainer.device=cpu use fp32 or bf16",
    )
    _require(
        t.max_steps is not None or t.max_tokens is not None,
        "trainer.max_steps",
        "set trainer.max_steps or trainer.max_tokens (the run needs a horizon)",
    )
    _require(
        t.max_steps is None or t.max_tokens is None,
        "trainer.max_tokens",
        f"is set beside trainer.max_steps={t.max_steps} (an experiment file pins max_steps), "
        "and a run has one horizon; add trainer.max_steps=null to train by tokens",
    )
    if t.init_from:  # "" (trainer.init_from=) is none, as null is
        _require(
            t.resume in ("none", "auto"),
            "trainer.init_from",
            f"is set beside trainer.resume={t.resume}, and both name the weights to start from; "
            "keep trainer.resume=auto (a checkpoint of this run's own wins) or none",
        )
        # With resume=auto (every start under the sbatch scripts) the path matters only while
        # the run has no checkpoint of its own, which preflight_resume knows: a requeue then
        # continues even after the checkpoint it started from was deleted.
        _require(
            t.resume == "auto" or t.init_from.startswith("hf:") or Path(t.init_from).exists(),
            "trainer.init_from",
            f"{t.init_from!r} does not exist; give a step_XXXXXXX dir, a run or "
            "checkpoints/ dir (its newest checkpoint), or hf:REPO_OR_DIR (a transformers model)",
        )
    if t.max_time not in (None, ""):
        try:
            seconds = parse_duration(t.max_time)
        except ValueError as e:
            raise ConfigError(f"trainer.max_time: {e}") from None
        _require(seconds > 0, "trainer.max_time", f"must be > 0, got {t.max_time!r}")
    _require(t.temperature >= 0, "trainer.temperature", "must be >= 0 (0 = greedy)")
    _require(t.top_k >= 0, "trainer.top_k", f"must be >= 0 (0 = no top-k cut), got {t.top_k}")
    _require(
        t.sample_every >= 0,
        "trainer.sample_every",
        f"must be >= 0 (0 = no sample text), got {t.sample_every}",
    )


def _check_batch(t: TrainerConfig, d: DataConfig, ws: int) -> None:
    window = t.micro_batch_size * d.seq_len * ws
    if t.batch_tokens % window == 0:
        return
    nearest = max(1, round(t.batch_tokens / window)) * window
    hint = f"try {nearest} ({nearest / t.batch_tokens:.3g}x the global batch)"  # another recipe
    if t.batch_tokens % (d.seq_len * ws) == 0:  # a smaller micro-batch keeps the global batch
        rows = t.batch_tokens // (d.seq_len * ws)  # sequences per process per step
        micro = max(m for m in range(1, min(rows, t.micro_batch_size) + 1) if rows % m == 0)
        hint += f", or trainer.micro_batch_size={micro}, which keeps it"
    raise ConfigError(
        f"trainer.batch_tokens: {t.batch_tokens} is not divisible by micro_batch_size x "
        f"seq_len x world_size = {t.micro_batch_size} x {d.seq_len} x {ws} = {window}; {hint}"
    )


def _check_tokenizer_name(name: str) -> None:
    """A tiktoken encoding name; the list is tiktoken's own registry (no download)."""
    import tiktoken

    known = tiktoken.list_encoding_names()
    _require(
        name in known,
        "data.tokenizer",
        f"unknown tiktoken encoding {name!r} (known: {', '.join(known)})",
    )


def _leaves(cfg: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) for every setting of a config, sections walked."""
    for f in fields(cfg):
        value, key = getattr(cfg, f.name), f"{prefix}{f.name}"
        if is_dataclass(value):
            yield from _leaves(value, key + ".")
        else:
            yield key, value


def _finite(cfg: Any) -> None:
    """No inf or nan anywhere: ``optim.lr=inf`` passes every range check and trains on nan."""
    for key, value in _leaves(cfg):
        if isinstance(value, float):
            _require(math.isfinite(value), key, f"must be a finite number, got {value}")


def _no_secrets(cfg: Any) -> None:
    """Refuse a config that holds a credential from the environment (an API key pasted into
    logger.run_name, a token in a data URL): the config is saved, printed and logged."""
    secrets = {name: value for name in SECRET_ENV if len(value := os.environ.get(name, "")) >= 8}
    if not secrets:
        return
    for key, value in _leaves(cfg):
        for item in value if isinstance(value, list) else [value]:
            for name, secret in secrets.items():
                _require(
                    not (isinstance(item, str) and secret in item),
                    key,
                    f"holds the value of ${name}; credentials belong in the environment only "
                    "(the config is saved beside every checkpoint and sent to the logger)",
                )
