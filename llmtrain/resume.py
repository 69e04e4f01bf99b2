"""Which checkpoint a run resumes from, and whether it fits (see "When things go wrong" in
the README).

``trainer.resume`` is ``none``, ``auto`` (this run's newest intact checkpoint), a run dir or
checkpoints root, or one ``step_XXXXXXX`` directory. Before any process group starts, the main
process checks that a named target exists and that its model has this config's shape. Once the
ranks are up, each candidate's manifest is verified (the ranks share the hashing) and every rank
gets the same answer; ``auto`` and a run dir fall back past damaged checkpoints, a named
``step_XXXXXXX`` does not.

``trainer.init_from`` starts a new run from another checkpoint's weights (:func:`init_source`),
or a transformers model's (``hf:gpt2``, ``hf:DIR``); with ``resume=auto`` a checkpoint of the
run's own wins, so a requeued job continues.
"""

from __future__ import annotations

from pathlib import Path

from llmtrain.checkpoint import TRAINER_STATE, candidates, read_newest_intact, saved_config
from llmtrain.config import ConfigError, ModelConfig, TrainConfig
from llmtrain.hf import check_hf_model, hf_source, is_hf_source
from llmtrain.integrity import CheckpointError, broadcast, rank_world, verify


def resume_candidates(resume: str, ckpt_root: Path) -> tuple[list[Path], bool]:
    """The checkpoints ``trainer.resume`` may use, best first, and whether falling back to the
    next is allowed: ``auto`` (this run) or a run dir / checkpoints root may fall back; a
    ``step_XXXXXXX`` directory named by the user may not. A path that holds none is an error."""
    if resume == "none":
        return [], False
    if resume == "auto":
        return candidates(ckpt_root), True
    path = Path(resume)
    if (path / TRAINER_STATE).is_file():
        return [path], False
    found = candidates(path) or candidates(path / "checkpoints")
    if not found:
        raise ConfigError(
            f"trainer.resume: {resume!r} is not a complete checkpoint directory (it has no "
            f"{TRAINER_STATE}) and holds none; use trainer.resume=auto or a step_XXXXXXX dir"
        )
    return found, True


def preflight_resume(cfg: TrainConfig, run_dir: Path) -> None:
    """Before any process group starts (main process): a named resume target must exist and
    the checkpoint to resume must have this model's shape; a run dir that already holds a run
    is continued, never silently started over."""
    resume = cfg.trainer.resume
    if resume != "auto" and (mine := candidates(run_dir / "checkpoints")):
        inside = resume != "none" and Path(resume).resolve().is_relative_to(run_dir.resolve())
        if not inside:
            raise ConfigError(
                f"hydra.run.dir={str(run_dir)!r} already holds a run (checkpoints up to "
                f"{mine[0].name}); trainer.resume={resume} would start a new one in it, over its "
                "config.yaml, metrics.jsonl and checkpoints. Continue it with "
                "trainer.resume=auto, or give a new hydra.run.dir"
            )
    found, _ = resume_candidates(resume, run_dir / "checkpoints")
    if not found:
        init_source(cfg, resumed=False)
        return
    try:
        saved = saved_config(found[0])
    except Exception:  # noqa: BLE001 -- a damaged checkpoint is reported by choose_resume
        return
    check_resumable(saved, cfg, found[0])


def choose_resume(resume: str, ckpt_root: Path) -> Path | None:
    """Every rank calls this once the process group is up; returns the same checkpoint on all.

    Each candidate's manifest is verified (the ranks share the hashing). A damaged checkpoint
    is skipped with a message when falling back is allowed, else it is a CheckpointError
    naming the file; so is a run whose every checkpoint is damaged.
    """
    if resume == "none":
        return None
    main = rank_world()[0] == 0
    found: tuple[list[str], bool, str | None] = ([], False, None)
    if main:
        try:
            paths, fallback = resume_candidates(resume, ckpt_root)
            found = ([str(p) for p in paths], fallback, None)
        except ConfigError as e:
            found = ([], False, str(e))
    paths, fallback, error = broadcast(found)
    if error:
        raise ConfigError(error)
    problems = []
    for path in map(Path, paths):
        problem = verify(path)
        if problem is None:
            if problems and main:
                print(f"resume: falling back to {path}, the newest intact checkpoint", flush=True)
            return path
        if not fallback:
            raise CheckpointError(f"cannot resume from {path}: {problem}")
        if main:
            print(f"resume: skipping damaged checkpoint {path}: {problem}", flush=True)
        problems.append(problem)
    if problems:
        raise CheckpointError(
            "no intact checkpoint to resume from:\n  "
            + "\n  ".join(problems)
            + "\nMove the damaged checkpoints away (or start over with trainer.resume=none and "
            "another hydra.run.dir)."
        )
    return None


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


def shape_diffs(saved: ModelConfig, current: ModelConfig) -> list[str]:
    """One line for every model key whose value gives the checkpoint's weights another shape."""
    # Learned positions are a (context_length, n_embd) table; rotary ones have no weights.
    keys = SHAPE_KEYS + (("context_length",) if current.position == "learned" else ())
    return [
        f"model.{k}: checkpoint {getattr(saved, k)!r}, config {getattr(current, k)!r}"
        for k in keys
        if getattr(saved, k) != getattr(current, k)
    ]


def check_compatible(saved: ModelConfig, current: ModelConfig, ckpt: Path) -> None:
    """Refuse to resume into a model of another shape, naming every key that differs."""
    if diffs := shape_diffs(saved, current):
        raise ConfigError(
            f"cannot resume from {ckpt}: the model shape differs\n  "
            + "\n  ".join(diffs)
            + "\nResume with the checkpoint's model settings, or start a new run "
            "(trainer.resume=none, another hydra.run.dir)."
        )


# What accelerator.save_state writes, by dist.mode: one full file (single and DDP alike),
# DeepSpeed's per-stage shards, or torch DCP shards.
LAYOUT = {"single": "full", "ddp": "full", "fsdp2": "fsdp2"}


def check_resumable(saved: TrainConfig, current: TrainConfig, ckpt: Path) -> None:
    """The model shape must match (:func:`check_compatible`), the checkpoint's layout must be
    one this dist.mode loads, and its parameter names must be the ones this run has."""
    check_compatible(saved.model, current.model, ckpt)
    was, now = saved.dist.mode, current.dist.mode
    if LAYOUT.get(was, was) != LAYOUT.get(now, now):
        raise ConfigError(
            f"cannot resume from {ckpt}: it was written with dist={was} and this run has "
            f"dist={now}; a checkpoint resumes in the layout it was written in (single and ddp "
            f"share one). Resume with dist={was}, or start a new run (step 0, fresh optimizer) "
            f"from its weights: trainer.init_from={ckpt} with another hydra.run.dir"
        )
    check_precision(current, ckpt)
    if saved.trainer.compile != current.trainer.compile:
        raise ConfigError(
            f"cannot resume from {ckpt}: it was written with trainer.compile="
            f"{str(saved.trainer.compile).lower()}, whose parameter names "
            f"{'carry' if saved.trainer.compile else 'lack'} torch.compile's _orig_mod. prefix; "
            f"resume with trainer.compile={str(saved.trainer.compile).lower()}"
        )


def check_precision(cfg: TrainConfig, ckpt: Path) -> None:
    """Mixed precision changes what a checkpoint must hold, and the loaders fail deep inside
    (a FileNotFoundError, exit 1, which job scripts requeue) when it lacks it: DeepSpeed looks
    only for its own kind of optimizer shards (``bf16_zero_pp_rank_*`` for bf16), and an fp16
    run loads its loss scale from ``scaler.pt``."""
    from llmtrain.consolidate import DS_TAG
    from llmtrain.dist import resolve_device, resolve_precision
    from llmtrain.ds_config import ZERO_STAGE

    now = resolve_precision(cfg.trainer.precision, resolve_device(cfg.trainer.device))
    now = {"no": "fp32"}.get(now, now)
    fix = (
        f"; resume with the checkpoint's trainer.precision, or start a new run (step 0, fresh "
        f"optimizer) from its weights: trainer.init_from={ckpt} with another hydra.run.dir"
    )
    if cfg.dist.mode in ZERO_STAGE and (ckpt / DS_TAG).is_dir():
        saved_bf16 = any((ckpt / DS_TAG).glob("bf16_zero_pp_rank_*"))
        if saved_bf16 != (now == "bf16"):
            was = "bf16" if saved_bf16 else "fp32 or fp16"
            raise ConfigError(
                f"cannot resume from {ckpt}: it was written in {was} and this run trains in "
                f"{now} (trainer.precision={cfg.trainer.precision}); DeepSpeed's optimizer "
                f"shards differ between bf16 and the rest{fix}"
            )
    elif now == "fp16" and cfg.dist.mode not in ZERO_STAGE and not (ckpt / "scaler.pt").is_file():
        raise ConfigError(
            f"cannot resume from {ckpt}: this run trains in fp16 and the checkpoint has no fp16 "
            f"loss scale (scaler.pt): it was written in another precision{fix}"
        )


def init_source(cfg: TrainConfig, resumed: bool) -> Path | None:
    """The checkpoint ``trainer.init_from`` names (a step dir, or the newest intact one of a
    run or checkpoints/ dir), checked to hold this config's model; None without one, or when
    the run resumes a checkpoint of its own (``resume=auto`` on a requeue wins over init_from).
    Its weight files are checked for presence and size here, hashed when they are read."""
    from llmtrain.consolidate import check_model_files

    if not cfg.trainer.init_from or resumed:
        return None
    if is_hf_source(cfg.trainer.init_from):  # a transformers model: its directory
        # Rank 0 reads the weights and broadcasts them (init_weights.py); the others check
        # its config.json only.
        source = hf_source(cfg.trainer.init_from, weights=rank_world()[0] == 0)
        check_hf_model(source, cfg.model, cfg.trainer.init_from)
        return source

    def usable(ckpt: Path) -> Path:
        check_model_files(ckpt, hashed=False)
        check_init_model(saved_config(ckpt), cfg, ckpt)
        return ckpt

    try:
        return read_newest_intact(cfg.trainer.init_from, usable)
    except OSError as e:  # missing, a file, no complete checkpoint inside
        raise ConfigError(f"trainer.init_from: {e}") from None


def check_init_model(saved: TrainConfig, cfg: TrainConfig, ckpt: Path) -> None:
    """Refuse to start from ``ckpt`` when its model or tokenizer differs from the config's."""
    diffs = shape_diffs(saved.model, cfg.model)
    if saved.data.tokenizer != cfg.data.tokenizer:  # same ids, other tokens: garbage in
        diffs.append(
            f"data.tokenizer: checkpoint {saved.data.tokenizer!r}, config {cfg.data.tokenizer!r}"
        )
    if diffs:
        raise ConfigError(
            f"trainer.init_from: cannot start from {ckpt}: its model differs from this config's\n  "
            + "\n  ".join(diffs)
            + "\nSet these keys to the checkpoint's values (its config.yaml), or start from "
            "another checkpoint."
        )


def changes_values(saved: TrainConfig, cfg: TrainConfig, plan, upto: int) -> list[str]:
    """What makes this resume train steps ``plan.start_step + 1 .. upto`` (logged by the attempt
    that wrote the checkpoint) to other values than that attempt did: another lr at any of
    them (optim.lr, its schedule, or the horizon the schedule is a function of), other optimizer
    settings, another global batch, or the data read from its start. A micro-batch or process
    count of its own is not listed: the same batch, summed in other pieces."""
    from llmtrain.optim import lr_at
    from llmtrain.startup import Plan

    before = Plan.from_config(saved, plan.world_size).resumed(
        saved, plan.start_step, plan.start_tokens
    )
    changed = []
    steps = range(plan.start_step, min(upto, plan.max_steps))  # 0-based steps of the lr schedule
    if any(
        lr_at(s, saved.optim, before.max_steps) != lr_at(s, cfg.optim, plan.max_steps)
        for s in steps
    ):
        changed.append("the lr")
    for key in ("weight_decay", "beta1", "beta2", "eps", "grad_clip"):
        if getattr(saved.optim, key) != getattr(cfg.optim, key):
            changed.append(f"optim.{key}")
    if saved.trainer.batch_tokens != cfg.trainer.batch_tokens:
        changed.append("trainer.batch_tokens")
    if not cfg.trainer.resume_data:
        changed.append("the data (trainer.resume_data=false)")
    return changed
