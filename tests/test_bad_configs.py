"""A catalogue of wrong configurations (issue 7, item 7): each is refused before any process
group starts, with a message naming the key. The basic ones (unknown keys, wrong types, sizes
that do not divide) are in tests/test_config.py."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import TINY

import llmtrain.run as run_mod
import llmtrain.train as train_mod
from llmtrain.config import ConfigError, config_to_yaml, load_config

BASE = [
    *TINY,
    "trainer.batch_tokens=512",
]
FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"
FAKE_HF = "hf_FakeTokenForConfigTests0123456789abcde"

# (overrides, world size, key the message must name, environment)
CASES = {
    "unknown dist mode": (["dist.mode=fsdp3"], 1, "dist.mode", {}),
    "zero3 keeps params": (
        ["dist=zero3", "dist.reshard_after_forward=false"],
        2,
        "dist.reshard_after_forward",
        {},
    ),
    "param offload without zero3": (
        ["dist=zero2", "dist.offload_params=true"],
        2,
        "dist.offload_params",
        {},
    ),
    "deepspeed json without zero": (
        ["dist=ddp", "dist.deepspeed_config={tmp}/ds.json"],
        2,
        "dist.deepspeed_config",
        {},
    ),
    "deepspeed json missing": (
        ["dist=zero2", "dist.deepspeed_config={tmp}/nope.json"],
        2,
        "dist.deepspeed_config",
        {},
    ),
    "fp16 on cpu": (["trainer.precision=fp16"], 1, "trainer.precision", {}),
    "fp16 on auto without a gpu": (
        ["trainer.device=auto", "trainer.precision=fp16"],
        1,
        "trainer.precision",
        {},
    ),
    "unknown tokenizer": (["data.tokenizer=gpt5"], 1, "data.tokenizer", {}),
    "negative init std": (["model.init_std=-1"], 1, "model.init_std", {}),
    "infinite lr": (["optim.lr=inf"], 1, "optim.lr", {}),
    "nan temperature": (["trainer.temperature=nan"], 1, "trainer.temperature", {}),
    "negative top_k": (["trainer.top_k=-1"], 1, "trainer.top_k", {}),
    "negative sample_every": (["trainer.sample_every=-5"], 1, "trainer.sample_every", {}),
    "nccl on cpu": (["dist.backend=nccl"], 1, "dist.backend", {}),
    "unknown backend": (["dist.backend=mpi"], 1, "dist.backend", {}),
    "cuda attention kernel on cpu": (["trainer.attention=efficient"], 1, "trainer.attention", {}),
    "unknown attention kernel": (["trainer.attention=sparse"], 1, "trainer.attention", {}),
    "unknown compile mode": (["trainer.compile_mode=fast"], 1, "trainer.compile_mode", {}),
    # On an H100, 16 micro-batches per step: "accessing tensor output of CUDAGraphs that has
    # been overwritten by a subsequent run" in a backward of its first steps.
    "cuda graphs": (["trainer.compile_mode=reduce-overhead"], 1, "trainer.compile_mode", {}),
    "autotuned cuda graphs": (["trainer.compile_mode=max-autotune"], 1, "trainer.compile_mode", {}),
    "negative loss chunk": (["trainer.loss_chunk=-1"], 1, "trainer.loss_chunk", {}),
    "zero timeout": (["dist.timeout_s=0"], 1, "dist.timeout_s", {}),
    "negative lr": (["optim.lr=-0.001"], 1, "optim.lr", {}),
    "wsd warmup into decay": (
        ["optim=adamw-wsd", "optim.warmup_steps=90"],
        1,
        "optim.warmup_steps",
        {},
    ),
    "eval split empty": (["data.val_split=null", "data.val_docs=0"], 1, "data.val_docs", {}),
    "eval on the train split": (["data.val_split=train"], 1, "data.val_split", {}),
    # Both were accepted and never read: validation came from elsewhere.
    "a split of local files": (
        ["data=local", "data.files={tmp}/x.txt", "data.val_split=validation"],
        1,
        "data.val_split",
        {},
    ),
    "a split of shards": (["data=shards", "data.val_split=val"], 1, "data.val_split", {}),
    "val_files without files": (["data.val_files={tmp}/v.txt"], 1, "data.val_files", {}),
    "files with shards": (["data=shards", "data.files={tmp}/x.bin"], 1, "data.files", {}),
    "local without files": (["data=local"], 1, "data.files", {}),
    # The files were read in place of the sample while the banner said "data sample".
    "files without data=local": (["data.files={tmp}/x.txt"], 1, "data.files", {}),
    # The experiment's max_steps won, and a run meant for 20,480 tokens trained 102,400.
    "max_tokens beside max_steps": (["trainer.max_tokens=20480"], 1, "trainer.max_tokens", {}),
    "shards without a path": (["data=shards"], 1, "data.path", {}),
    "unknown on_save_error": (["trainer.on_save_error=ignore"], 1, "trainer.on_save_error", {}),
    "max_bad_steps 0": (["trainer.max_bad_steps=0"], 1, "trainer.max_bad_steps", {}),
    "keep_last 0": (["trainer.keep_last=0"], 1, "trainer.keep_last", {}),
    "unknown logger mode": (["logger.mode=onlin"], 1, "logger.mode", {}),
    "batch not divisible by world": (["trainer.batch_tokens=768"], 2, "trainer.batch_tokens", {}),
    "resume another shape": (["model.n_layer=3", "trainer.resume=auto"], 1, "model.n_layer", {}),
    "resume another context length": (
        ["model.context_length=512", "trainer.resume=auto"],
        1,
        "model.context_length",
        {},
    ),
    "resume from nothing": (["trainer.resume={tmp}/nowhere"], 1, "trainer.resume", {}),
    "fsdp2 on one cpu process": (["dist=fsdp2"], 1, "dist.mode", {}),
    # DeepSpeed's ZeRO-3 forward hook met torch.compile's wrapper at the first step:
    # AttributeError: 'dict' object has no attribute '_in_forward' (both recipes compile).
    "compile with zero3": (["dist=zero3", "trainer.compile=true"], 2, "trainer.compile", {}),
    "compile with zero3-offload": (
        ["dist=zero3-offload", "trainer.compile=true"],
        2,
        "trainer.compile",
        {},
    ),
    "single with two processes": (["dist=single"], 2, "dist.mode", {}),
    "vocab smaller than tokenizer": (["model.vocab_size=1000"], 1, "model.vocab_size", {}),
    "vocab larger than tokenizer": (  # sampling would draw ids with no text
        ["model.vocab_size=50304"],
        1,
        "set model.vocab_size=50257",
        {},
    ),
    "api key in the config": (
        [f"logger.run_name=run-{FAKE_KEY}"],
        1,
        "logger.run_name",
        {"WANDB_API_KEY": FAKE_KEY},
    ),
    "hub token in a url": (
        [f"data.path=https://u:{FAKE_HF}@example.org/d"],
        1,
        "data.path",
        {"HF_TOKEN": FAKE_HF},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_config_is_refused_before_any_process_group(case, tmp_path, monkeypatch):
    overrides, world, key, env = CASES[case]
    overrides = [o.replace("{tmp}", str(tmp_path)) for o in overrides]
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # trainer.device=auto: CPU
    run_dir = tmp_path / "run"
    # A checkpoint of the 2-layer model, for the resume cases.
    saved = run_dir / "checkpoints" / "step_0000002"
    saved.mkdir(parents=True)
    (saved / "config.yaml").write_text(config_to_yaml(load_config([*BASE, "trainer.max_steps=2"])))
    (saved / "trainer_state.json").write_text(json.dumps({"step": 2, "tokens": 1024}))

    def no_process_group(*args, **kwargs):
        raise AssertionError("a process group was about to start")

    monkeypatch.setattr(run_mod, "build_accelerator", no_process_group)
    with pytest.raises(ConfigError) as e:
        train_mod.train(load_config([*BASE, *overrides], world_size=world), run_dir)
    assert key in str(e.value)
    for secret in env.values():
        assert secret not in str(e.value)  # the refusal does not print the credential itself


@pytest.mark.parametrize(
    "overrides",
    [
        ["data.path=/nonexistent/corpus"],
        ["data.val_split=valdation"],
        ["data.text_column=content"],
    ],
)
def test_a_data_error_comes_before_the_model_is_built(overrides, tmp_path, monkeypatch):
    """It came after the model was built and sharded: minutes for billions of parameters."""
    from llmtrain.data import DataError

    def no_model(*args, **kwargs):
        raise AssertionError("the model was about to be built")

    monkeypatch.setattr(run_mod, "build_model", no_model)
    with pytest.raises(DataError):
        train_mod.train(load_config([*BASE, *overrides]), tmp_path / "run")
