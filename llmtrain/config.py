"""Typed configuration: the only place defaults live.

Every config group in ``conf/`` is validated against one dataclass below. Hydra merges the YAML
files into these schemas, so an unknown key or a wrong type fails at composition time with the
key's full name; :func:`validate` then checks what types cannot (divisibility, ranges, the
relations between groups) before any process group or model is built.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
PACKAGE_DIR = Path(__file__).resolve().parent


class ConfigError(ValueError):
    """A configuration the run cannot start with; the message names the key."""


@dataclass
class ModelConfig:
    """A decoder-only transformer. Defaults are GPT-2 small (Radford et al. 2019)."""

    name: str = "gpt2-small"
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # grouped-query attention; None = n_head (multi-head)
    n_embd: int = 768
    ffn_hidden: int | None = None  # None = 4 * n_embd
    context_length: int = 1024  # longest sequence the positions support
    vocab_size: int = 50257  # the tokenizer's true size; padded internally for speed
    vocab_pad_multiple: int = 64
    position: str = "learned"  # learned (GPT-2) | rope (Su et al. 2021)
    rope_theta: float = 10000.0
    norm: str = "layernorm"  # layernorm | rmsnorm (Zhang & Sennrich 2019)
    norm_eps: float = 1e-5
    mlp: str = "gelu"  # gelu | swiglu (Shazeer 2020)
    bias: bool = True
    tie_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02


@dataclass
class DataConfig:
    """Where tokens come from. Every text source goes through ``datasets.load_dataset``."""

    name: str = "sample"
    source: str = "hf"  # hf: datasets.load_dataset(streaming=True) | shards: llm.c .bin files
    path: str = "sample"  # dataset repo id or builder (parquet/json/text); "sample" = shipped data
    config_name: str | None = None  # the Hub config, e.g. sample-10BT
    files: str | None = None  # a file, glob or comma-separated list for local corpora
    val_files: str | None = None  # local corpora: validation files (else held-out documents)
    text_column: str = "text"
    train_split: str = "train"
    val_split: str | None = "validation"  # None: hold out val_docs documents instead
    val_docs: int = 100
    tokenizer: str = "gpt2"
    seq_len: int = 256  # tokens per training window (context length used in training)
    stride: int | None = None  # step between windows; None = seq_len (no overlap)
    shuffle: bool = True  # shard order, reshuffled every epoch
    shuffle_buffer: int = 0  # documents; >0 breaks exact resume (see data.py)
    num_workers: int = 0
    pin_memory: bool = True
    prefetch_factor: int = 2
    tokenize_batch: int = 64  # documents per encode_ordinary_batch call
    shard_tokens: int = 100_000_000  # llmtrain-prepare: tokens per .bin shard (llm.c: 100M)


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 6e-4
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    fused: bool | None = None  # None: fused on CUDA, foreach elsewhere
    schedule: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # wsd: share of the run spent decaying
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping


@dataclass
class DistConfig:
    mode: str = "single"  # single | ddp | zero1 | zero2 | zero3 | fsdp2
    offload_optimizer: bool = False  # ZeRO: optimizer state on CPU
    offload_params: bool = False  # ZeRO-3: parameters on CPU
    reshard_after_forward: bool = True  # FSDP2 / ZeRO-3 trade memory for communication
    deepspeed_config: str | None = None  # a user JSON, checked against this config
    backend: str | None = None  # None: nccl on GPU, gloo on CPU
    timeout_s: int = 1800


@dataclass
class LoggerConfig:
    name: str = "wandb"  # wandb | none
    project: str = "llmtrain"
    entity: str | None = None
    run_name: str | None = None
    mode: str | None = None  # online | offline | disabled; None: offline when no API key
    tags: list[str] = field(default_factory=list)


@dataclass
class TrainerConfig:
    seed: int = 1337
    batch_tokens: int = 524288  # global tokens per optimizer step (GPT-2 paper: 0.5M)
    micro_batch_size: int = 16  # sequences per process per forward pass
    max_steps: int | None = None
    max_tokens: int | None = None  # token budget; sets max_steps when max_steps is None
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    compile: bool = False
    compile_mode: str = "default"  # torch.compile mode; reduce-overhead adds CUDA graphs
    attention: str = "auto"  # the attention kernel: auto | flash | efficient | cudnn | math
    loss_chunk: int = 0  # tokens per chunk of the fused head + cross-entropy (loss.py); 0: off
    set_to_none: bool = True  # free gradients after each step (False: zero them in place)
    activation_checkpointing: bool = False
    log_every: int = 10
    eval_every: int = 250
    eval_batches: int = 20
    ckpt_every: int = 1000
    keep_last: int = 3
    resume: str = "none"  # none | auto | a checkpoint directory
    sample_every: int = 0  # 0 disables sample text at eval
    sample_prompt: str = "The"
    sample_tokens: int = 48
    temperature: float = 0.8
    top_k: int = 50
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    on_save_error: str = "stop"  # a checkpoint write failed (disk full...): stop | continue


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    experiment: str | None = None  # name of the experiment file, for the receipt


GROUP_SCHEMAS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "dist": DistConfig,
    "logger": LoggerConfig,
}


def register_configs() -> None:
    """Register the schemas so ``conf/train.yaml`` and every group file merge into them."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    for group, schema in GROUP_SCHEMAS.items():
        cs.store(group=group, name=f"{group}_schema", node=schema)


register_configs()


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
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
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
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.trainer
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

    _positive(d, "data", "seq_len", "stride", "tokenize_batch", "prefetch_factor", "shard_tokens")
    _one_of(d.source, "data.source", SOURCES)
    _require(
        d.seq_len <= m.context_length,
        "data.seq_len",
        f"{d.seq_len} exceeds model.context_length={m.context_length}",
    )
    _require(
        d.stride is None or d.stride <= d.seq_len,
        "data.stride",
        f"{d.stride} is larger than data.seq_len={d.seq_len}; tokens would be skipped",
    )
    _require(d.num_workers >= 0, "data.num_workers", "must be >= 0")
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
        d.val_files is None or d.files is not None,
        "data.val_files",
        "is only read with data.files (local corpora); set data.files too, or remove it",
    )
    _require(
        d.files is None or d.source == "hf",
        "data.files",
        f"is not read by data.source={d.source} (shards come from data.path); remove it",
    )

    _positive(o, "optim", "lr", "eps")
    _one_of(o.schedule, "optim.schedule", SCHEDULES)
    _require(0.0 <= o.min_lr_ratio <= 1.0, "optim.min_lr_ratio", "must be in [0, 1]")
    _require(0.0 < o.decay_fraction <= 1.0, "optim.decay_fraction", "must be in (0, 1]")
    _require(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _require(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    _require(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 disables clipping)")
    _require(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "optim.beta1", "betas must be in [0, 1)")

    _one_of(cfg.dist.mode, "dist.mode", DIST_MODES)
    _require(
        not cfg.dist.offload_params or cfg.dist.mode == "zero3",
        "dist.offload_params",
        f"parameter offload needs dist.mode=zero3, got {cfg.dist.mode}",
    )
    _require(
        not cfg.dist.offload_optimizer or cfg.dist.mode.startswith("zero"),
        "dist.offload_optimizer",
        f"optimizer offload needs a ZeRO mode, got {cfg.dist.mode}",
    )
    dist = cfg.dist
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
    _one_of(cfg.logger.name, "logger.name", LOGGERS)
    if cfg.logger.mode is not None:
        _one_of(cfg.logger.mode, "logger.mode", LOGGER_MODES)

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
    _require(t.temperature >= 0, "trainer.temperature", "must be >= 0 (0 = greedy)")
    _require(
        t.sample_every == 0 or t.sample_tokens < m.context_length,
        "trainer.sample_tokens",
        f"{t.sample_tokens} leaves no room for the prompt in "
        f"model.context_length={m.context_length}",
    )
    steps = t.max_steps or -(-(t.max_tokens or 0) // t.batch_tokens)
    if o.schedule == "wsd" and steps:
        decay = max(1, round(o.decay_fraction * steps))
        _require(
            o.warmup_steps + decay <= steps,
            "optim.warmup_steps",
            f"{o.warmup_steps} warmup + {decay} decay steps (optim.decay_fraction="
            f"{o.decay_fraction}) exceed the {steps}-step horizon: wsd would decay during warmup",
        )
    ws = world_size or 1
    window = t.micro_batch_size * d.seq_len * ws
    _require(
        t.batch_tokens % window == 0,
        "trainer.batch_tokens",
        f"{t.batch_tokens} is not divisible by micro_batch_size x seq_len x world_size "
        f"= {t.micro_batch_size} x {d.seq_len} x {ws} = {window}; "
        f"try {max(1, t.batch_tokens // window) * window}",
    )
    _no_secrets(cfg)
    return cfg


def _no_secrets(cfg: Any, prefix: str = "") -> None:
    """Refuse a config that holds a credential from the environment (an API key pasted into
    logger.run_name, a token in a data URL): the config is saved, printed and logged."""
    secrets = {name: value for name in SECRET_ENV if len(value := os.environ.get(name, "")) >= 8}
    if not secrets:
        return
    for f in fields(cfg):
        value, key = getattr(cfg, f.name), f"{prefix}{f.name}"
        if is_dataclass(value):
            _no_secrets(value, key + ".")
            continue
        for item in value if isinstance(value, list) else [value]:
            for name, secret in secrets.items():
                _require(
                    not (isinstance(item, str) and secret in item),
                    key,
                    f"holds the value of ${name}; credentials belong in the environment only "
                    "(the config is saved beside every checkpoint and sent to the logger)",
                )


def world_size_from_env() -> int:
    """The launcher's world size, known before any process group starts."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def to_dataclass(node: Any) -> TrainConfig:
    """A composed DictConfig -> a validated plain TrainConfig object."""
    obj = OmegaConf.to_object(node)
    assert isinstance(obj, TrainConfig)
    return obj


def load_config(overrides: list[str] | None = None, world_size: int | None = None) -> TrainConfig:
    """Compose ``conf/`` exactly as the command line does and return a validated config.

    ``load_config(["model=gpt2-small", "trainer.max_steps=10"])`` is what
    ``llmtrain-train model=gpt2-small trainer.max_steps=10`` trains with.
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            node = compose(config_name="train", overrides=list(overrides or []))
    except (HydraException, OmegaConfBaseException) as e:
        cause = f"\n{e.__cause__}" if e.__cause__ else ""
        raise ConfigError(f"{e}{cause}") from e
    return validate(to_dataclass(node), world_size=world_size or world_size_from_env())


def config_to_yaml(cfg: TrainConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg))  # type: ignore[return-value]


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Rebuild a TrainConfig from a saved ``config.yaml`` (typed; unknown keys fail)."""
    try:
        return to_dataclass(OmegaConf.merge(OmegaConf.structured(TrainConfig), data))
    except OmegaConfBaseException as e:
        raise ConfigError(f"saved config does not match this llmtrain's schema: {e}") from e


__all__ = [
    "MISSING",
    "CONF_DIR",
    "PACKAGE_DIR",
    "ConfigError",
    "ModelConfig",
    "DataConfig",
    "OptimConfig",
    "DistConfig",
    "LoggerConfig",
    "TrainerConfig",
    "TrainConfig",
    "validate",
    "load_config",
    "config_to_yaml",
    "config_to_dict",
    "config_from_dict",
]
