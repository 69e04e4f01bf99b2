"""Typed configuration: the only place defaults live.

Every config group in ``conf/`` is validated against one dataclass below. Hydra merges the YAML
files into these schemas, so an unknown key or a wrong type fails at composition time with the
key's full name; ``llmtrain/checks.py`` then checks what types cannot (divisibility, ranges,
the relations between groups) before any process group or model is built.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from llmtrain.checks import ConfigError, validate

PACKAGE_DIR = Path(__file__).resolve().parent
# A checkout (or `pip install -e`) reads the repo's conf/; a wheel carries it as llmtrain/conf.
CONF_DIR = next(
    (
        d
        for d in (PACKAGE_DIR.parent / "conf", PACKAGE_DIR / "conf")
        if (d / "train.yaml").is_file()
    ),
    PACKAGE_DIR.parent / "conf",
)


def cache_root() -> Path:
    """Where llmtrain keeps what it builds or downloads: $LLMTRAIN_CACHE, or ~/.cache/llmtrain."""
    return Path(os.environ.get("LLMTRAIN_CACHE") or Path.home() / ".cache" / "llmtrain")


# The date level of Hydra's default run dirs, runs/<date>/<time> (conf/train.yaml).
DATED_DIR = r"\d{4}-\d{2}-\d{2}"


@dataclass
class ModelConfig:
    """A decoder-only transformer. Defaults are GPT-2 small (Radford et al. 2019)."""

    name: str = "gpt2-small"  # a label, in the startup lines and the receipt
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads (query heads)
    n_kv_head: int | None = None  # grouped-query attention; null = n_head (multi-head)
    n_embd: int = 768  # the residual stream's width
    ffn_hidden: int | None = None  # null = 4 * n_embd
    context_length: int = 1024  # longest sequence the positions support
    vocab_size: int = 50257  # the tokenizer's true size; padded internally for speed
    vocab_pad_multiple: int = 64  # embedding rows padded to a multiple (faster matmuls)
    position: str = "learned"  # learned (GPT-2) | rope (Su et al. 2021)
    rope_theta: float = 10000.0  # RoPE's base
    norm: str = "layernorm"  # layernorm | rmsnorm (Zhang & Sennrich 2019)
    norm_eps: float = 1e-5
    mlp: str = "gelu"  # gelu | swiglu (Shazeer 2020)
    bias: bool = True  # biases in the linear layers and norms (GPT-2: yes, Llama: no)
    tie_embeddings: bool = True  # the output head shares the token embedding matrix
    dropout: float = 0.0  # on embeddings, attention and MLP outputs; 0 for pretraining
    init_std: float = 0.02  # weights ~ N(0, init_std); residual projections scaled by depth


@dataclass
class DataConfig:
    """Where tokens come from. Every text source goes through ``datasets.load_dataset``."""

    name: str = "sample"  # a label, in the startup lines and the receipt
    source: str = "hf"  # hf: datasets.load_dataset(streaming=True) | shards: llm.c .bin files
    path: str = "sample"  # dataset repo id or builder (parquet/json/text); "sample" = shipped data
    config_name: str | None = None  # the Hub config, e.g. sample-10BT
    files: str | None = None  # a file, glob or comma-separated list for local corpora
    val_files: str | None = None  # local corpora: validation files (else held-out documents)
    text_column: str = "text"  # the column (or JSON key) holding each document
    train_split: str = "train"  # the source's split to train on
    val_split: str | None = "validation"  # null: hold out val_docs documents instead
    val_docs: int = 100  # documents held out for validation where there is no split
    val_fraction: float = 0.1  # a corpus of one .txt file: its last tenth is validation
    tokenizer: str = "gpt2"  # a tiktoken encoding: gpt2 | r50k_base | cl100k_base | ...
    seq_len: int = 256  # tokens per training window (context length used in training)
    stride: int | None = None  # between training windows; null = seq_len (validation: always)
    shuffle: bool = True  # each epoch: a stream's file order; every window of token shards
    shuffle_buffer: int = 0  # documents; >0 breaks exact resume (see data.py)
    num_workers: int = 0  # DataLoader worker processes per rank (a resume needs the same)
    pin_memory: bool = True  # page-locked batches for faster copies to the GPU
    prefetch_factor: int = 2  # batches each worker loads ahead
    tokenize_batch: int = 64  # documents per encode_ordinary_batch call
    shard_tokens: int = 100_000_000  # llmtrain-prepare: tokens per .bin shard (llm.c: 100M)


@dataclass
class OptimConfig:
    name: str = "adamw"  # the recipe's label: adamw or adamw-... (the optimizer is AdamW)
    lr: float = 6e-4  # the peak learning rate, reached after warmup
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    weight_decay: float = 0.1  # decoupled, on matrices and embeddings; not biases or norms
    beta1: float = 0.9  # AdamW's moment decay rates (GPT-3: 0.9, 0.95)
    beta2: float = 0.95
    eps: float = 1e-8  # AdamW's denominator term
    fused: bool | None = None  # null: fused on CUDA, foreach elsewhere
    schedule: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 100  # steps of linear warmup up to lr
    decay_fraction: float = 0.2  # wsd: share of the run spent decaying
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping


@dataclass
class DistConfig:
    mode: str = "single"  # single | ddp | zero1 | zero2 | zero3 | fsdp2
    offload_optimizer: bool = False  # ZeRO: optimizer state on CPU
    offload_params: bool = False  # ZeRO-3: parameters on CPU
    reshard_after_forward: bool = True  # FSDP2 / ZeRO-3 trade memory for communication
    deepspeed_config: str | None = None  # a user JSON, checked against this config
    backend: str | None = None  # null: nccl on GPU, gloo on CPU
    timeout_s: int = 1800  # seconds a collective may wait for a rank before the run fails


@dataclass
class LoggerConfig:
    name: str = "wandb"  # wandb | none
    project: str = "llmtrain"  # W&B project
    entity: str | None = None  # W&B team or user; null: the key's default
    run_name: str | None = None  # null: from the run dir (runs/<date>/<time>)
    mode: str | None = None  # online | offline | disabled; null: online when W&B has a key
    tags: list[str] = field(default_factory=list)  # W&B tags, e.g. [baseline,fineweb]
    group: str | None = None  # W&B run group: a sweep's jobs, a second phase beside its first


@dataclass
class TrainerConfig:
    seed: int = 1337  # model init, data order and shuffling, samples
    batch_tokens: int = 524288  # global tokens per optimizer step (GPT-2 paper: 0.5M)
    micro_batch_size: int = 16  # sequences per process per forward pass
    max_steps: int | None = None  # optimizer steps; the lr schedule's horizon
    max_tokens: int | None = None  # token budget; sets max_steps when max_steps is null
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    compile: bool = False  # torch.compile the model
    compile_mode: str = "default"  # torch.compile mode: default | max-autotune-no-cudagraphs
    attention: str = "auto"  # the attention kernel: auto | flash | efficient | cudnn | math
    loss_chunk: int = 0  # tokens per chunk of the fused head + cross-entropy (loss.py); 0: off
    set_to_none: bool = True  # free gradients after each step (false: zero them in place)
    activation_checkpointing: bool = False  # recompute each block in backward: less memory
    log_every: int = 10  # steps per console line and metrics record
    eval_every: int = 250  # steps between validation loss / perplexity
    eval_batches: int = 20  # validation micro-batches per evaluation, split among ranks
    eval_at_start: bool = True  # also before a new run's first step: the loss it starts from
    ckpt_every: int = 1000  # steps between checkpoints (a run also saves at its end)
    keep_last: int = 3  # checkpoints kept; older ones are deleted after a save
    resume: str = "none"  # none | auto | a checkpoint directory
    resume_data: bool = True  # false: a resume reads the data from its start (a new corpus)
    # A new run (step 0, fresh optimizer, data and lr schedule) from the weights of a checkpoint
    # of any dist mode: a step dir, or the newest of a run or checkpoints/ dir; or of a
    # transformers GPT-2 / Llama model: hf:gpt2 (the Hub), hf:DIR. With resume=auto, a
    # checkpoint of this run's own wins (a requeued job continues).
    init_from: str | None = None
    sample_every: int = 0  # steps between generated samples on the console (0: none)
    sample_prompt: str = "The"  # "": start from end-of-text
    sample_tokens: int = 48  # new tokens per sample; past data.seq_len the context slides
    temperature: float = 0.8  # 0: greedy
    top_k: int = 50  # sample among the k likeliest tokens; 0: all
    # HellaSwag accuracy (hellaswag.py), llm.c's zero-shot benchmark for GPT-2, every N steps
    # and at step 0 with eval_at_start (0: never)
    hellaswag_every: int = 0
    hellaswag_data: str | None = None  # null: the validation file, downloaded once; or its path
    hellaswag_examples: int = 0  # the first N examples; 0: all 10,042
    # Wall-clock budget of this process's training (seconds, 90m, 12h, HH:MM:SS, D-HH:MM:SS):
    # it stops a step early enough to save, exits 75 and resume=auto goes on. Under Slurm the
    # job's end (SLURM_JOB_END_TIME) is a deadline too.
    max_time: str | None = None
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
    """Register the root schema: ``conf/train.yaml`` starts from it, so every group file merges
    into its typed section (``model:`` into ModelConfig...). Only the root is registered: a
    schema stored in a group would be listed as one of its options in ``--help``."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


register_configs()


def world_size_from_env() -> int:
    """The launcher's world size, known before any process group starts."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_from_env() -> int:
    """This process's rank as the launcher set it (0 without a launcher)."""
    return int(os.environ.get("RANK", "0"))


def to_dataclass(node: Any) -> TrainConfig:
    """A composed DictConfig -> a plain TrainConfig object (``validate`` checks the values)."""
    _no_unknown_keys(node, TrainConfig, "")
    try:  # interpolations resolve here: ${oc.env:UNSET}, ${trainer.nope}, a str for an int
        obj = OmegaConf.to_object(node)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "config"
        raise ConfigError(f"{key}: {str(e).splitlines()[0]}") from e
    assert isinstance(obj, TrainConfig)
    return obj


def _no_unknown_keys(node: Any, schema: type, prefix: str) -> None:
    """Hydra's ``+key=value`` adds a key the schema lacks, and converting to the dataclass
    would drop it without a word: a typo such as ``+trainer.max_step=10`` must fail instead."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in node:
        if key not in fields:
            meant = _meant(prefix.rstrip("."), key)
            hint = f"did you mean {meant}? " if meant else ""
            raise ConfigError(
                f"{prefix}{key}: not a setting (a '+' override cannot add one); {hint}the "
                f"settings of {prefix.rstrip('.') or 'the config'} are: {', '.join(fields)}"
            )
        sub = {**GROUP_SCHEMAS, "trainer": TrainerConfig}.get(key) if not prefix else None
        if sub is not None and isinstance(node[key], DictConfig):
            _no_unknown_keys(node[key], sub, f"{prefix}{key}.")


def _without_append_hint(message: str, error: BaseException) -> str:
    """Hydra answers a misspelt key with "To append to your config use +key=...", which would
    only make it fail later (see _no_unknown_keys); name the setting that was meant instead."""
    lines = [line for line in message.splitlines() if not line.startswith("To append")]
    key = getattr(error, "full_key", None) or ""
    section, _, name = key.rpartition(".")
    if len(lines) < len(message.splitlines()) and (meant := _meant(section, name)):
        lines.insert(1, f"Did you mean {meant}?")
    return "\n".join(lines)


# What nanoGPT, litgpt, the HF Trainer and Lightning call a setting, and its name here.
FOREIGN_NAMES = {
    "learning_rate": "optim.lr",
    "lr": "optim.lr",
    "min_lr": "optim.min_lr_ratio (a fraction of optim.lr)",
    "warmup_iters": "optim.warmup_steps",
    "max_iters": "trainer.max_steps",
    "lr_decay_iters": "trainer.max_steps (the schedule decays over the whole run)",
    "block_size": "model.context_length (and data.seq_len, the training window)",
    "batch_size": "trainer.micro_batch_size (trainer.batch_tokens is the global batch)",
    "gradient_accumulation_steps": "trainer.batch_tokens (accumulation follows from it)",
    "betas": "optim.beta1 and optim.beta2",
    "max_grad_norm": "optim.grad_clip",
    "gradient_clip_val": "optim.grad_clip",
    "eval_interval": "trainer.eval_every",
    "eval_iters": "trainer.eval_batches",
    "log_interval": "trainer.log_every",
    "dtype": "trainer.precision",
    "out_dir": "hydra.run.dir",
    "zero_stage": "dist=zero1, dist=zero2 or dist=zero3 (the group sets dist.mode)",
}


def _meant(section: str, name: str) -> str | None:
    """The setting a misspelt or foreign key most likely means: another trainer's name for it,
    the same name in another section (trainer.lr -> optim.lr), a close name in its own
    section, then a close name in any."""
    if name in FOREIGN_NAMES:
        return FOREIGN_NAMES[name]
    sections = {**GROUP_SCHEMAS, "trainer": TrainerConfig}
    everywhere: dict[str, list[str]] = {}
    for s, schema in sections.items():
        for f in dataclasses.fields(schema):
            everywhere.setdefault(f.name, []).append(f"{s}.{f.name}")
    if name in everywhere:
        return " or ".join(everywhere[name])
    own = [f.name for f in dataclasses.fields(sections[section])] if section in sections else []
    if close := difflib.get_close_matches(name, own, n=1):
        return f"{section}.{close[0]}"
    close = difflib.get_close_matches(name, list(everywhere), n=1)
    return " or ".join(everywhere[close[0]]) if close else None


def compose_config(overrides: list[str] | None = None) -> TrainConfig:
    """Compose ``conf/`` exactly as the command line does, typed, before :func:`validate`:
    Hydra's errors and a ``+key`` the schema lacks are ConfigErrors naming the key."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            node = compose(config_name="train", overrides=list(overrides or []))
    except (HydraException, OmegaConfBaseException) as e:
        cause = f"\n{e.__cause__}" if e.__cause__ else ""
        message = _without_append_hint(f"{e}{cause}", e.__cause__ or e)
        raise ConfigError(_more_hints(_plus_group_hint(message, overrides or []))) from e
    return to_dataclass(node)


def _more_hints(message: str) -> str:
    """What to write instead, for Hydra errors that only say what went wrong."""
    deleting = re.match(r"Error merging override ~([\w.]+)", message)
    if deleting or message.startswith("Could not delete from config."):  # the schema keeps keys
        key = deleting[1] if deleting else message.split("'")[1] if "'" in message else "KEY"
        return f"{message}\nEvery setting stays in the config; to unset one, write {key}=null"
    if "of type 'float' could not be converted to Integer" in message:
        return f"{message}\nWrite a whole number without an exponent: 10_000_000_000, not 1e10"
    return message


def _plus_group_hint(message: str, overrides: list[str]) -> str:
    """``+experiment=smoke`` (Hydra's docs write experiments so) adds a group train.yaml already
    lists, and Hydra answers "use 'override experiment: smoke'", YAML for a file, or "model
    appears more than once in the final defaults list"; every group here is in the defaults."""
    for o in overrides:
        group, _, option = o.lstrip("+").partition("=")
        if o.startswith("+") and not o.startswith("++") and (CONF_DIR / group).is_dir():
            return (
                f"{o}: {group} is a group of train.yaml's defaults already; write "
                f"{group}={option}, without the '+'"
            )
    return message


def load_config(overrides: list[str] | None = None, world_size: int | None = None) -> TrainConfig:
    """Compose ``conf/`` exactly as the command line does and return a validated config.

    ``load_config(["model=gpt2-small", "trainer.max_steps=10"])`` is what
    ``llmtrain-train model=gpt2-small trainer.max_steps=10`` trains with.
    """
    return validate(compose_config(overrides), world_size=world_size or world_size_from_env())


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
    "compose_config",
    "load_config",
    "config_to_yaml",
    "config_to_dict",
    "config_from_dict",
]
