"""``trainer.init_from``: a new run (step 0, fresh optimizer, data and lr schedule) from the
weights of a checkpoint of any layout, and the refusals before anything starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_dist import shards  # noqa: F401  (the fixture: token shards, one window order)
from tiny import TINY

from llmtrain.config import ConfigError, load_config
from llmtrain.train import train

FAST = [
    *TINY,
    "trainer.batch_tokens=512",
    "trainer.eval_batches=1",
    "trainer.sample_every=0",
    "trainer.log_every=1",
    "trainer.eval_every=1000",
    "optim.warmup_steps=1",  # three steps move the weights clearly
]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def first_loss(model: torch.nn.Module, cfg) -> float:
    """The loss ``model`` gives on the first step's micro-batches of a fresh run of ``cfg``."""
    from llmtrain.data import build_dataloader
    from llmtrain.startup import Plan
    from llmtrain.tokenizer import get_tokenizer

    plan = Plan.from_config(cfg, 1)
    loader = build_dataloader(
        cfg.data, get_tokenizer(cfg.data.tokenizer), split="train", batch_size=plan.micro_batch,
        rank=0, world_size=1, seed=cfg.trainer.seed,
    )  # fmt: skip
    stream = iter(loader)
    with torch.no_grad():
        step = [model(*next(stream), return_logits=False)[1] for _ in range(plan.grad_accum)]
    return torch.stack(step).mean().item()


def test_a_new_run_starts_from_the_weights_at_step_zero(tmp_path, capsys):
    from llmtrain.sample import load_gpt

    train(load_config([*FAST, "trainer.max_steps=3"]), tmp_path / "a")
    ckpt = tmp_path / "a" / "checkpoints" / "step_0000003"
    fresh = records(tmp_path / "a")[0]  # step 1 of a fresh init, on the same first batch
    capsys.readouterr()
    cfg = load_config([*FAST, "trainer.max_steps=2", f"trainer.init_from={tmp_path / 'a'}"])
    state = train(cfg, tmp_path / "b")
    assert f"init_from  weights of {ckpt} (its step 3)" in capsys.readouterr().out
    assert state.step == 2 and state.tokens == 2 * 512  # counted from 0, not from 3
    first = records(tmp_path / "b")[0]
    assert first["step"] == 1 and first["lr"] == fresh["lr"]  # the schedule starts over
    model, _, _ = load_gpt(ckpt)
    assert first["loss"] == pytest.approx(first_loss(model, cfg), rel=1e-5)
    assert first["loss"] < fresh["loss"] - 0.2, (first, fresh)  # not a fresh init's loss
    # A requeue (resume=auto) continues the run's own checkpoint, not init_from's weights.
    auto = load_config([*FAST, "trainer.max_steps=3", "trainer.resume=auto",
                        f"trainer.init_from={ckpt}"])  # fmt: skip
    assert train(auto, tmp_path / "b").step == 3
    assert "init_from  not used" in capsys.readouterr().out
    # Where the weights began stays in every checkpoint's state, the requeue's included.
    for step in (2, 3):
        saved = tmp_path / "b" / "checkpoints" / f"step_000000{step}"
        assert json.loads((saved / "trainer_state.json").read_text())["init_from"] == str(ckpt)
        assert json.loads((saved / "receipt.json").read_text())["init_from"] == str(ckpt)


def test_another_model_or_tokenizer_is_refused_naming_the_key(tmp_path):
    import dataclasses

    from llmtrain.resume import init_source

    train(load_config([*FAST, "trainer.max_steps=1"]), tmp_path / "a")
    init = [*FAST, "trainer.max_steps=1", f"trainer.init_from={tmp_path / 'a'}"]
    refused = r"(?s)trainer\.init_from: cannot start from .*step_0000001: its model differs"
    with pytest.raises(ConfigError, match=refused + r".*model\.n_layer: checkpoint 2, config 3"):
        train(load_config([*init, "model.n_layer=3"]), tmp_path / "b")
    assert not (tmp_path / "b" / "checkpoints").exists()  # refused before the first step
    cfg = load_config(init)
    other = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer="p50k_base"))
    with pytest.raises(ConfigError, match=refused + r".*data\.tokenizer: checkpoint 'gpt2'"):
        init_source(other, resumed=False)  # other ids for the same text


@pytest.mark.parametrize("damage", ["config", "missing weights", "flipped weights"])
def test_a_run_dir_s_damaged_newest_checkpoint_gives_way_to_the_one_before(
    tmp_path, capsys, damage
):
    """A damaged config.yaml stopped the run (exit 2), a missing weight file crashed it with a
    FileNotFoundError traceback (exit 1, which job scripts requeue)."""
    from llmtrain.sample import load_gpt

    src = tmp_path / "a"
    train(load_config([*FAST, "trainer.max_steps=2", "trainer.ckpt_every=1"]), src)
    newest = src / "checkpoints" / "step_0000002"
    if damage == "config":
        with open(newest / "config.yaml", "a") as f:
            f.write("# edited\n")
    elif damage == "missing weights":
        (newest / "model.safetensors").unlink()
    else:
        blob = bytearray((newest / "model.safetensors").read_bytes())
        blob[-1] ^= 1
        (newest / "model.safetensors").write_bytes(bytes(blob))
    older = src / "checkpoints" / "step_0000001"
    capsys.readouterr()
    state = train(load_config([*FAST, "trainer.max_steps=1", f"trainer.init_from={src}"]),
                  tmp_path / "b")  # fmt: skip
    out, err = capsys.readouterr()
    assert state.step == 1 and f"init_from  weights of {older} (its step 1)" in out
    assert f"skipping damaged checkpoint {newest}" in err
    if damage != "flipped weights":  # a missing file is damage to llmtrain-sample too
        assert load_gpt(src)[2] == older


def test_a_missing_path_or_a_named_resume_is_refused_by_the_config(tmp_path):
    with pytest.raises(ConfigError, match=r"trainer\.init_from: .*nowhere.* does not exist"):
        load_config([*FAST, f"trainer.init_from={tmp_path / 'nowhere'}"])
    with pytest.raises(ConfigError, match=r"init_from: is set beside trainer\.resume=.* both"):
        load_config([*FAST, f"trainer.init_from={tmp_path}", f"trainer.resume={tmp_path}"])


def test_with_resume_auto_a_missing_path_is_refused_when_there_is_nothing_to_resume(tmp_path):
    """resume=auto (every sbatch start) checks the path only when the run has no checkpoint."""
    cfg = load_config([*FAST, f"trainer.init_from={tmp_path / 'nowhere'}", "trainer.resume=auto"])
    with pytest.raises(ConfigError, match=r"trainer\.init_from: .*nowhere: no such checkpoint"):
        train(cfg, tmp_path / "run")


@pytest.mark.distributed
@pytest.mark.timeout(150)
def test_sharded_and_full_checkpoints_start_runs_of_any_mode(shards, tmp_path):  # noqa: F811
    """A 2-process FSDP2 checkpoint (DCP shards) starts a 1-process run, whose full checkpoint
    starts a 2-process ZeRO-3 run: each first loss is the loaded weights' (one global window
    order, so 2 processes see the 1-process run's windows)."""
    from test_dist import FAST as DIST_FAST
    from test_dist import losses, run

    from llmtrain.sample import load_gpt

    data = [f"data.path={shards}", "trainer.max_steps=1", "optim.warmup_steps=1"]
    run(tmp_path, 2, tmp_path / "a", [*data, "dist=fsdp2"])
    ckpt_a = tmp_path / "a" / "checkpoints" / "step_0000001"
    single = [*data, "dist=single", f"trainer.init_from={ckpt_a}"]
    run(tmp_path, 1, tmp_path / "b", single)
    cfg = load_config([*DIST_FAST, *single])
    assert losses(tmp_path / "b")[1] == pytest.approx(first_loss(load_gpt(ckpt_a)[0], cfg), 1e-5)
    assert losses(tmp_path / "b")[1] < losses(tmp_path / "a")[1] - 0.1  # a fresh init's, before
    ckpt_b = tmp_path / "b" / "checkpoints" / "step_0000001"
    run(tmp_path, 2, tmp_path / "c", [*data, "dist=zero3", f"trainer.init_from={tmp_path / 'b'}"])
    assert losses(tmp_path / "c")[1] == pytest.approx(first_loss(load_gpt(ckpt_b)[0], cfg), 1e-5)
    # FSDP2: rank 0 alone reads them; prepare() shares them out to the empty model of rank 1
    run(tmp_path, 2, tmp_path / "d", [*data, "dist=fsdp2", f"trainer.init_from={ckpt_b}"])
    assert losses(tmp_path / "d")[1] == pytest.approx(first_loss(load_gpt(ckpt_b)[0], cfg), 1e-5)


def test_a_transformers_model_starts_a_run(tmp_path, capsys, monkeypatch):
    """hf:DIR (an export, a save_pretrained dir) or hf:REPO (the Hub, e.g. hf:gpt2): the first
    loss is the one those weights give. OpenAI's GPT-2 on the Hub is a base model (wte.weight,
    no transformer. prefix, no lm_head): read the same."""
    from safetensors.torch import load_file, save_file

    from llmtrain.export import export
    from llmtrain.sample import load_gpt

    train(load_config([*FAST, "trainer.max_steps=3"]), tmp_path / "a")
    ckpt = tmp_path / "a" / "checkpoints" / "step_0000003"
    export(ckpt, tmp_path / "hf")
    model, _, _ = load_gpt(ckpt)
    capsys.readouterr()
    cfg = load_config([*FAST, "trainer.max_steps=1", f"trainer.init_from=hf:{tmp_path / 'hf'}"])
    train(cfg, tmp_path / "b")
    assert f"init_from  weights of hf:{tmp_path / 'hf'} (" in capsys.readouterr().out
    (first,) = [r for r in records(tmp_path / "b") if "loss" in r]
    assert first["loss"] == pytest.approx(first_loss(model, cfg), rel=1e-5)
    saved = tmp_path / "b" / "checkpoints" / "step_0000001" / "trainer_state.json"
    assert json.loads(saved.read_text())["init_from"].startswith(f"hf:{tmp_path / 'hf'}")

    base = tmp_path / "base"  # as a Hub repo's snapshot: found in huggingface_hub's cache
    base.mkdir()
    (base / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    weights = load_file(str(tmp_path / "hf" / "model.safetensors"))
    base_names = {
        k.removeprefix("transformer."): v for k, v in weights.items() if "lm_head" not in k
    }
    save_file(base_names, str(base / "model.safetensors"))
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda repo, **kw: str(base))
    cfg = load_config([*FAST, "trainer.max_steps=1", "trainer.init_from=hf:openai-community/gpt2"])
    train(cfg, tmp_path / "c")
    (first,) = [r for r in records(tmp_path / "c") if "loss" in r]
    assert first["loss"] == pytest.approx(first_loss(model, cfg), rel=1e-5)


def test_a_transformers_model_of_another_shape_or_out_of_reach_is_refused(tmp_path):
    from llmtrain.export import export

    train(load_config([*FAST, "trainer.max_steps=1"]), tmp_path / "a")
    export(tmp_path / "a" / "checkpoints" / "step_0000001", tmp_path / "hf")
    deeper = [
        *FAST,
        "model.n_layer=3",
        "trainer.max_steps=1",
        f"trainer.init_from=hf:{tmp_path / 'hf'}",
    ]
    with pytest.raises(ConfigError, match=r"model.n_layer: hf:.* has 2 \(n_layer\), this config 3"):
        train(load_config(deeper), tmp_path / "b")
    with pytest.raises(ConfigError, match="'no/such-model' is neither a directory nor a Hub model"):
        train(load_config([*FAST, "trainer.max_steps=1", "trainer.init_from=hf:no/such-model"]),
              tmp_path / "c")  # fmt: skip
