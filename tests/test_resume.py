"""Which checkpoint ``trainer.resume`` picks, and the shape check; damaged checkpoints and the
fall-back past them are exercised end to end in test_reliability.py."""

from __future__ import annotations

import dataclasses

import pytest
from tiny import TINY

from llmtrain.checkpoint import TRAINER_STATE
from llmtrain.config import ConfigError, ModelConfig, load_config
from llmtrain.resume import changes_values, check_compatible, resume_candidates
from llmtrain.startup import Plan


def fake_checkpoints(root, *steps, latest=None):
    for step in steps:
        d = root / f"step_{step:07d}"
        d.mkdir(parents=True)
        (d / TRAINER_STATE).write_text("{}")
    (root / "step_0000099.tmp").mkdir()  # an interrupted save is never a candidate
    (root / "step_0000098").mkdir()  # nor a step dir without its trainer state
    if latest is not None:
        (root / "latest").write_text(f"step_{latest:07d}\n")
    return root


def test_none_resumes_nothing(tmp_path):
    assert resume_candidates("none", tmp_path) == ([], False)


def test_auto_is_latest_first_then_newest_and_may_fall_back(tmp_path):
    root = fake_checkpoints(tmp_path / "checkpoints", 2, 4, 6, latest=4)
    found, fallback = resume_candidates("auto", root)
    assert [p.name for p in found] == ["step_0000004", "step_0000006", "step_0000002"]
    assert fallback


def test_auto_with_no_checkpoints_starts_fresh(tmp_path):
    assert resume_candidates("auto", tmp_path / "checkpoints") == ([], True)


def test_a_named_step_dir_is_the_only_candidate(tmp_path):
    root = fake_checkpoints(tmp_path / "checkpoints", 2, 4)
    assert resume_candidates(str(root / "step_0000002"), root) == ([root / "step_0000002"], False)


@pytest.mark.parametrize("where", ["run dir", "checkpoints root"])
def test_a_run_dir_or_checkpoints_root_may_fall_back(tmp_path, where):
    root = fake_checkpoints(tmp_path / "run" / "checkpoints", 2, 4)
    target = tmp_path / "run" if where == "run dir" else root
    found, fallback = resume_candidates(str(target), tmp_path / "elsewhere")
    assert [p.name for p in found] == ["step_0000004", "step_0000002"]
    assert fallback


def test_a_path_with_no_checkpoint_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"trainer\.resume: .*nowhere.* holds none"):
        resume_candidates(str(tmp_path / "nowhere"), tmp_path)


def test_another_shape_names_every_key_that_differs(tmp_path):
    saved = ModelConfig()
    current = dataclasses.replace(saved, n_layer=saved.n_layer + 1, mlp="swiglu")
    with pytest.raises(ConfigError) as e:
        check_compatible(saved, current, tmp_path)
    message = str(e.value)
    assert "model.n_layer" in message and "model.mlp" in message
    assert "model.n_head" not in message
    shapes = dict(n_layer=13, n_head=16, n_kv_head=4, n_embd=1024, ffn_hidden=1000,
                  vocab_size=50000, vocab_pad_multiple=128, position="rope", norm="rmsnorm",
                  mlp="swiglu", bias=False, tie_embeddings=False)  # fmt: skip
    for key, value in shapes.items():  # each alone gives some weight another shape
        with pytest.raises(ConfigError, match=f"model.{key}: checkpoint"):
            check_compatible(saved, dataclasses.replace(saved, **{key: value}), tmp_path)


def test_settings_that_do_not_change_the_shape_may_change(tmp_path):
    saved = ModelConfig()
    check_compatible(saved, dataclasses.replace(saved, dropout=0.1), tmp_path)


def test_context_length_is_a_shape_only_with_learned_positions(tmp_path):
    learned = ModelConfig(position="learned", context_length=1024)
    with pytest.raises(ConfigError, match="model.context_length: checkpoint 1024, config 2048"):
        check_compatible(learned, dataclasses.replace(learned, context_length=2048), tmp_path)
    rope = ModelConfig(position="rope", context_length=1024)
    check_compatible(rope, dataclasses.replace(rope, context_length=2048), tmp_path)


def test_a_run_dir_that_holds_a_run_is_continued_never_started_over(tmp_path):
    """Rerunning a command into the same hydra.run.dir without trainer.resume=auto used to
    replace its config.yaml and metrics.jsonl and point `latest` at a fresh step 1."""
    from llmtrain.config import load_config
    from llmtrain.resume import preflight_resume

    run, other = tmp_path / "run", tmp_path / "other"
    fake_checkpoints(run / "checkpoints", 50, 100, latest=100)
    fake_checkpoints(other / "checkpoints", 10)
    cfg = load_config(["experiment=smoke"])
    for resume in ("none", str(other)):
        with pytest.raises(ConfigError, match="already holds a run .*step_0000100.*resume=auto"):
            preflight_resume(dataclasses.replace(cfg, trainer=dataclasses.replace(
                cfg.trainer, resume=resume)), run)  # fmt: skip
    preflight_resume(cfg, tmp_path / "new")  # an empty or new dir starts fresh
    (tmp_path / "crashed" / "checkpoints" / "step_0000010.tmp").mkdir(parents=True)
    preflight_resume(cfg, tmp_path / "crashed")  # no complete checkpoint: nothing to lose


@pytest.mark.parametrize(
    "change, says",
    [
        (["dist=zero1"], "written with dist=single and this run has dist=zero1"),
        (["trainer.compile=true"], "resume with trainer.compile=false"),
    ],
)
def test_a_resume_in_another_layout_is_refused_before_it_starts(tmp_path, change, says):
    """DeepSpeed's loader failed on a single-process checkpoint with a bare AssertionError, and
    a compiled run's names did not load uncompiled (exit 1, which job scripts requeue)."""
    from llmtrain.config import load_config
    from llmtrain.resume import check_resumable

    saved = load_config(["experiment=smoke"])
    check_resumable(saved, load_config(["experiment=smoke", "dist=ddp"]), tmp_path)  # one layout
    with pytest.raises(ConfigError, match=says):
        check_resumable(saved, load_config(["experiment=smoke", *change]), tmp_path)


@pytest.mark.parametrize("saved_in, other", [("bf16", "fp32"), ("fp32", "bf16")])
def test_a_zero_resume_in_another_precision_is_refused_before_it_starts(tmp_path, saved_in, other):
    """DeepSpeed names a bf16 run's optimizer shards apart and looks only for its own kind: the
    resume failed after the process group was up with a FileNotFoundError (exit 1, requeued)."""
    from llmtrain.config import load_config
    from llmtrain.resume import check_resumable

    prefix = "bf16_" if saved_in == "bf16" else ""
    (tmp_path / "pytorch_model").mkdir()
    (tmp_path / "pytorch_model" / f"{prefix}zero_pp_rank_0_mp_rank_00_optim_states.pt").touch()
    zero2 = ["experiment=smoke", "dist=zero2"]
    saved = load_config([*zero2, f"trainer.precision={saved_in}"])
    check_resumable(saved, saved, tmp_path)
    with pytest.raises(ConfigError, match=f"in {saved_in}.* this run trains in {other}"):
        check_resumable(saved, load_config([*zero2, f"trainer.precision={other}"]), tmp_path)


def test_an_fp16_resume_needs_the_checkpoints_loss_scale(tmp_path):
    from llmtrain.config import load_config
    from llmtrain.resume import check_resumable

    saved = load_config(["experiment=smoke"])
    fp16 = load_config(["experiment=smoke", "trainer.device=auto", "trainer.precision=fp16"])
    with pytest.raises(ConfigError, match="no fp16 loss scale"):
        check_resumable(saved, fp16, tmp_path)
    (tmp_path / "scaler.pt").touch()
    check_resumable(saved, fp16, tmp_path)


def test_a_resume_names_what_it_trains_differently():
    """Each optimizer setting a resume changes is named, and so is another lr at the first
    step it trains again (the steps from the checkpoint's, 0-based, up to ``upto``)."""
    fast = [*TINY, "trainer.batch_tokens=256", "optim.warmup_steps=1"]
    saved = load_config([*fast, "trainer.max_steps=4"])
    plan = Plan.from_config(saved, 1).resumed(saved, 2, 2 * saved.trainer.batch_tokens)
    changed = dict(weight_decay=0.5, beta1=0.8, beta2=0.9, eps=1e-6, grad_clip=0.5)
    for key, value in changed.items():
        other = load_config([*fast, "trainer.max_steps=4", f"optim.{key}={value}"])
        assert changes_values(saved, other, plan, 4) == [f"optim.{key}"]
    longer = load_config([*fast, "trainer.max_steps=8"])  # the cosine stretched from step 2 on
    assert changes_values(saved, longer, dataclasses.replace(plan, max_steps=8), 3) == ["the lr"]
