"""Distributed modes on CPU: 2 forked processes, gloo (see tests/dist_worker.py).

Each mode must really run as itself (several misconfigurations train happily as plain DDP or
as two unsynchronised replicas): world size 2, the expected Accelerate distributed type and
wrapped model, per-rank parameter / optimizer storage ~1/2 where the mode shards, losses equal
to one process, bitwise-equal losses after save -> fresh processes -> resume, and checkpoints
that move between 1 and 2 processes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from tiny import TINY

from llmtrain.config import ConfigError, load_config
from llmtrain.dist import check_launch
from llmtrain.run import build_model

pytestmark = pytest.mark.timeout(150)

FAST = [
    *TINY,
    "trainer.batch_tokens=1024",
    "trainer.eval_batches=1",
    "trainer.sample_every=0",
    "trainer.log_every=1",
    "trainer.eval_every=1000",
    "trainer.ckpt_every=2",
    "trainer.keep_last=5",
    "data.source=shards",
]


def test_launcher_mismatches_fail_before_any_process_group(monkeypatch):
    cfg = load_config(FAST + ["dist=ddp", "data.path=x"], world_size=2)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(ConfigError, match="dist=zero3"):
        check_launch(cfg, 2)
    cfg.dist.mode = "zero3"
    check_launch(cfg, 2)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    cfg.dist.mode = "single"
    with pytest.raises(ConfigError, match="dist.mode"):
        check_launch(cfg, 2)
    # `accelerate launch --cpu --num_processes 2`: its simple launcher starts one process with
    # the rendezvous address set and no RANK (ddp then trained alone, exit 0)
    cfg.dist.mode = "ddp"
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(ConfigError, match="starts one process, not N.*launch/cpu.yaml"):
        check_launch(cfg, 1)
    monkeypatch.setenv("PMI_RANK", "0")  # under mpirun, which that launcher is for
    check_launch(cfg, 1)


@pytest.mark.parametrize("launch", ["zero2", "zero3"])
def test_zero_launch_configs_are_accepted_by_the_plugin(monkeypatch, launch):
    """accelerate launch --config_file launch/zeroN.yaml exports the file's DeepSpeed fields
    (as ACCELERATE_CONFIG_DS_FIELDS, the way accelerate's launch command lists them), which
    DeepSpeedPlugin refuses next to the full DeepSpeed config llmtrain generates."""
    import os

    import yaml

    from llmtrain.dist import _deepspeed_plugin

    file = yaml.safe_load((Path(__file__).parents[1] / "launch" / f"{launch}.yaml").read_text())
    fields = [*file["deepspeed_config"], "mixed_precision"]
    stage = file["deepspeed_config"]["zero_stage"]
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", str(stage))
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", file["mixed_precision"])
    monkeypatch.setenv("ACCELERATE_CONFIG_DS_FIELDS", ",".join(fields))
    cfg = load_config(FAST + [f"dist={launch}", "data.path=x"], world_size=2)
    check_launch(cfg, 2)
    assert _deepspeed_plugin(cfg, 1, 2, "cpu").zero_stage == stage
    assert os.environ["ACCELERATE_CONFIG_DS_FIELDS"] == ",".join(fields)  # left as it was


def test_one_process_runs_of_any_mode_follow_each_other(tmp_path):
    """train() without a launcher cleans up after itself: a notebook may run zero3, then
    single, then zero2 in one process (each needs a fresh process group or none at all)."""
    import os

    from llmtrain.train import train

    before = {k: v for k, v in os.environ.items() if k.startswith(("ACCELERATE_", "RANK"))}
    linear = torch.nn.functional.linear
    for i, mode in enumerate(["zero3", "single", "zero2"]):
        overrides = [*FAST, "data.source=hf", "trainer.max_steps=2", f"dist={mode}"]
        state = train(load_config(overrides), tmp_path / f"run{i}")
        assert state.step == 2 and not torch.distributed.is_initialized()
        after = {k: v for k, v in os.environ.items() if k.startswith(("ACCELERATE_", "RANK"))}
        assert after == before
        assert torch.nn.functional.linear is linear  # ZeRO-3 leaves its own wrapper there


def test_a_cpu_deepspeed_run_compiles_nothing(tmp_path):
    """DeepSpeed's CPU backend would JIT-build its shared-memory all-reduce (inference only) at
    every init: half a minute on a new machine, and an interrupted build leaves a lock every
    later run waits on forever. A ZeRO run on a machine with no built ops builds none."""
    import os
    import subprocess
    import sys

    ext = tmp_path / "torch_extensions"
    cmd = [sys.executable, "-m", "llmtrain.train", *FAST, "data.source=hf", "dist=zero2"]
    cmd += ["trainer.max_steps=1", "logger=none", f"hydra.run.dir={tmp_path / 'run'}"]
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(ext), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step 1" in out.stdout + out.stderr
    assert not ext.exists() or not any(ext.iterdir()), sorted(p.name for p in ext.rglob("*"))


def test_a_stale_cpu_adam_lock_is_removed_and_a_fresh_one_kept(tmp_path, monkeypatch, capsys):
    """A compile of DeepSpeed's CPU Adam killed midway leaves a lock that every later offload
    run waits on forever. One older than any compile goes; a recent one may be a compile."""
    import time

    from llmtrain.dist import clear_stale_cpu_adam_lock

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("LOCAL_RANK", "0")
    lock = tmp_path / "cpu_adam" / "lock"
    lock.parent.mkdir()
    lock.touch()
    clear_stale_cpu_adam_lock()
    assert lock.exists()
    hours_ago = time.time() - 7200
    os.utime(lock, (hours_ago, hours_ago))
    monkeypatch.setenv("LOCAL_RANK", "1")  # the node's first rank decides, before ranks meet
    clear_stale_cpu_adam_lock()
    assert lock.exists()
    monkeypatch.setenv("LOCAL_RANK", "0")
    clear_stale_cpu_adam_lock()
    assert not lock.exists()
    assert "stopped 120 min ago left it" in capsys.readouterr().err


@pytest.mark.slow  # compiles DeepSpeed's CPU Adam: about a minute on two cores
@pytest.mark.skipif(
    not shutil.which(os.environ.get("CXX", "c++")), reason="no C++ compiler for its CPU Adam"
)
def test_optimizer_offload_compiles_past_a_stale_lock_and_trains(tmp_path):
    import subprocess
    import sys

    lock = tmp_path / "ext" / "cpu_adam" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    os.utime(lock, (0, 0))
    cmd = [sys.executable, "-m", "llmtrain.train", *FAST, "data.source=hf", "dist=zero3-offload"]
    cmd += ["trainer.max_steps=2", "logger=none", f"hydra.run.dir={tmp_path / 'run'}"]
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "DeepSpeed would wait on it forever" in out.stderr
    assert "DeepSpeed is compiling its CPU Adam" in out.stdout
    assert "step 2" in out.stdout and (lock.parent / "cpu_adam.so").exists()


# --- multi-process runs ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """The shipped sample as llm.c token shards: one global window order for every world size."""
    import pyarrow.parquet as pq

    from llmtrain.data import SAMPLE_DIR
    from llmtrain.shards import write_shard
    from llmtrain.tokenizer import get_tokenizer

    tok = get_tokenizer("gpt2")
    out = tmp_path_factory.mktemp("shards")
    for split, sub, n in (("train", "train", 120), ("val", "validation", 10)):
        files = sorted(SAMPLE_DIR.glob(f"data/{sub}/*.parquet"))
        texts = pq.read_table(files[0]).column("text").to_pylist()[:n]
        ids = [t + [tok.eot_id] for t in tok.encode_batch(texts)]
        write_shard(out / f"sample_{split}_000.bin", sum(ids, []), tok.vocab_size)
    return out


def _train(run_dir: str, overrides: list[str]) -> dict:
    """Runs in each worker: train, then report what this rank stored and saw."""
    import llmtrain.run as run_mod
    import llmtrain.train as train_mod
    from llmtrain.checkpoint import local_shard

    seen = {}
    build = run_mod.build_accelerator

    def spy(*args, **kwargs):
        acc = seen["acc"] = build(*args, **kwargs)
        prepare = acc.prepare

        def keep(*objs):
            seen["model"], seen["opt"] = out = prepare(*objs)
            return out

        acc.prepare = keep
        return acc

    run_mod.build_accelerator = spy
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    train_mod.train(load_config(FAST + overrides), Path(run_dir))
    acc = seen["acc"]
    model, opt = seen["model"], seen["opt"].optimizer
    opt_numel = 0
    for state in _optimizer_states(opt):
        for v in state.values():
            if torch.is_tensor(v) and v.dim() > 0:
                opt_numel += v.to_local().numel() if hasattr(v, "to_local") else v.numel()
    return {
        "world": acc.num_processes,
        "type": str(acc.distributed_type),
        "model": type(model).__name__,
        "bucket_view": getattr(model, "gradient_as_bucket_view", None),  # DDP's, else None
        "params": sum(local_shard(p).numel() for p in model.parameters()),
        "opt": opt_numel,
    }


def _optimizer_states(opt):
    """Optimizer moments per parameter (the base optimizer's, under DeepSpeed)."""
    base = getattr(opt, "optimizer", opt)
    return list(base.state.values())


def losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def run(tmp: Path, world: int, run_dir: Path, overrides: list[str]) -> list[dict]:
    from dist_worker import run as fork_run

    return fork_run(_train, world, str(run_dir), overrides, tmp=tmp)


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> dict[int, float]:
    """One process, same global batch: the losses every mode must reproduce."""
    tmp = tmp_path_factory.mktemp("single")
    run(tmp, 1, tmp / "run", [f"data.path={shards}", "trainer.max_steps=4"])
    return losses(tmp / "run")


EXPECT = {  # distributed type, wrapped model, parameters sharded, optimizer state sharded
    "ddp": ("MULTI_CPU", "DistributedDataParallel", False, False),
    "zero1": ("DEEPSPEED", "DeepSpeedEngine", False, True),
    "zero2": ("DEEPSPEED", "DeepSpeedEngine", False, True),
    "zero3": ("DEEPSPEED", "DeepSpeedEngine", True, True),
    "fsdp2": ("FSDP", "FSDPGPT", True, True),
}


@pytest.mark.distributed
@pytest.mark.parametrize("mode", list(EXPECT))
def test_mode_shards_matches_one_process_and_resumes_bitwise(mode, shards, reference, tmp_path):
    args = [f"data.path={shards}", f"dist={mode}"]
    full = run(tmp_path, 2, tmp_path / "full", args + ["trainer.max_steps=4"])
    dist_type, wrapped, shards_params, shards_opt = EXPECT[mode]
    total = sum(p.numel() for p in _tiny_model().parameters())
    for rank in full:
        assert rank["world"] == 2 and rank["type"].endswith(dist_type), rank
        assert rank["model"] == wrapped, rank
        assert rank["bucket_view"] is (True if mode == "ddp" else None), rank  # no grads copy
        share = rank["params"] / total
        assert (0.4 < share < 0.6) if shards_params else share == 1.0, (mode, rank, total)
        opt_share = rank["opt"] / (2 * total)  # two AdamW moments per parameter
        assert (0.4 < opt_share < 0.6) if shards_opt else opt_share == 1.0, (mode, rank)
    got = losses(tmp_path / "full")
    for step, loss in reference.items():
        assert got[step] == pytest.approx(loss, rel=2e-6, abs=2e-6), (mode, step)

    ckpt = tmp_path / "full" / "checkpoints" / "step_0000002"
    resumed = tmp_path / "resumed"
    run(tmp_path, 2, resumed, args + ["trainer.max_steps=4", f"trainer.resume={ckpt}"])
    assert [losses(resumed)[s] for s in (3, 4)] == [got[3], got[4]]  # bitwise


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["zero3", "fsdp2"])
def test_chunked_loss_under_sharded_parameters_matches_one_process(
    mode, shards, reference, tmp_path
):
    """The fused head reads lm_head.weight inside LMHead.forward, where ZeRO-3 and FSDP2 have
    gathered it (tied to wte here); its gradient reaches the shards as the plain head's does."""
    args = [f"data.path={shards}", f"dist={mode}", "trainer.max_steps=4", "trainer.loss_chunk=96"]
    run(tmp_path, 2, tmp_path / "run", args)
    got = losses(tmp_path / "run")
    for step, loss in reference.items():
        assert got[step] == pytest.approx(loss, rel=1e-5), (mode, step)


def _model_build_memory(run_dir: str, overrides: list[str], batch: torch.Tensor) -> dict:
    """In each worker: the resident memory setup() adds from building the model to the first
    broadcast of rank 0's weights (DeepSpeed's engine first casts the model to bf16 or fp16),
    and the prepared model's loss on ``batch``."""
    import psutil
    from deepspeed.runtime.engine import DeepSpeedEngine

    import llmtrain.run as run_mod

    rss = psutil.Process().memory_info
    cfg = load_config(FAST + overrides, world_size=2)
    run_mod.build_model(cfg, empty=True)  # torch's one-time costs, not counted
    build, broadcast, grew = run_mod.build_model, DeepSpeedEngine._broadcast_model, []

    def measured(*args, **kwargs):
        grew.append(rss().rss)
        model = build(*args, **kwargs)
        grew.append(rss().rss)
        return model

    def measured_broadcast(engine):
        grew.append(rss().rss)
        return broadcast(engine)

    run_mod.build_model, DeepSpeedEngine._broadcast_model = measured, measured_broadcast
    model = run_mod.setup(cfg, Path(run_dir)).model
    with torch.no_grad():
        _, loss = model(batch[:, :-1], batch[:, 1:], return_logits=False)
    return {"grew": max(grew) - grew[0], "loss": loss.item()}


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("mode", "precision"), [(m, "fp32") for m in EXPECT] + [("zero2", "bf16"), ("zero3", "bf16")]
)
def test_ranks_other_than_0_build_no_model(mode, precision, shards, tmp_path):
    """Every rank built and initialised the whole fp32 model before prepare() sharded it or
    broadcast rank 0's: eight copies of llama-8b (220 GiB) on an 8-GPU node at start. Rank 0
    builds it; the others' weights come from it in prepare(). In bf16, DeepSpeed's cast wrote
    a bf16 copy of the empty model on each rank before its broadcast."""
    from dist_worker import run as fork_run

    wide = [f"data.path={shards}", f"dist={mode}", f"trainer.precision={precision}",
            "model.n_embd=512", "model.n_head=8"]  # fmt: skip
    batch = torch.randint(0, 50257, (2, 33), generator=torch.Generator().manual_seed(0))
    ranks = fork_run(_model_build_memory, 2, str(tmp_path / "run"), wide, batch, tmp=tmp_path)
    cfg = load_config(FAST + wide)
    torch.manual_seed(cfg.trainer.seed)  # as setup() builds it, in one process
    single = build_model(cfg, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    fp32 = 4 * single.num_params()
    assert fp32 > 100e6  # 26M parameters in the embedding alone
    grew = [r["grew"] for r in ranks]
    assert grew[0] > 0.4 * fp32 and grew[1] < 0.05 * fp32, (grew, fp32)
    with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
        _, loss = single(batch[:, :-1], batch[:, 1:], return_logits=False)
    assert [r["loss"] for r in ranks] == pytest.approx([loss.item()] * 2, rel=1e-6)


@pytest.mark.distributed
def test_fsdp2_in_bf16_logs_the_fp32_loss(shards, tmp_path):
    """Accelerate's FSDP2 policy cast the model's outputs to bf16: the loss came back rounded
    (val_loss 10.78125 against ddp's 10.7578 in bf16), every logged figure off by up to half a
    bf16 step."""
    args = [f"data.path={shards}", "trainer.max_steps=3", "trainer.precision=bf16"]
    got = {}
    for mode in ("ddp", "fsdp2"):
        run(tmp_path, 2, tmp_path / mode, [*args, f"dist={mode}"])
        lines = (tmp_path / mode / "metrics.jsonl").read_text().splitlines()
        got[mode] = [r for r in map(json.loads, lines) if "val_loss" in r][-1]["val_loss"]
    assert got["fsdp2"] == pytest.approx(got["ddp"], abs=2e-3), got


def _relative_error(added: list[torch.Tensor], alone: list[list[torch.Tensor]]) -> float:
    """How far the gradients ``added`` up over micro-batches are from the sum of each
    micro-batch's gradients ``alone`` (taken in fp64): |added - sum| / |sum| over all of them."""
    summed = [sum(gs) for gs in zip(*alone, strict=True)]
    err = sum((a - s).pow(2).sum() for a, s in zip(added, summed, strict=True))
    return float((err / sum(s.pow(2).sum() for s in summed)).sqrt())


def _fsdp2_gradients(run_dir: str, overrides: list[str], micro_batches: int) -> dict:
    """In each worker: one step's gradients under dist=fsdp2 in bf16, added up over
    ``micro_batches`` micro-batches the way train.py does, and the same micro-batches each
    reduced on their own and summed in fp64."""
    from llmtrain.run import setup

    cfg = load_config(FAST + overrides + ["dist=fsdp2", "trainer.precision=bf16"], world_size=2)
    run = setup(cfg, Path(run_dir))
    accelerator, model = run.accelerator, run.model
    assert run.plan.grad_accum == micro_batches
    seed = torch.Generator().manual_seed(0)
    batches = torch.randint(0, 50257, (2, micro_batches, 1, 65), generator=seed)
    mine = batches[accelerator.process_index]

    def full_grads() -> list[torch.Tensor]:
        return [p.grad.full_tensor().double() for p in model.parameters()]

    reduced_early = None
    for i, b in enumerate(mine):
        with accelerator.accumulate(model):
            _, loss = model(b[:, :-1], b[:, 1:], return_logits=False)
            accelerator.backward(loss)
        if i == 0:  # each parameter holds its reduced gradient shard already
            reduced_early = all(p.grad is not None for p in model.parameters())
    added = full_grads()
    model.zero_grad(set_to_none=True)
    alone, in_bf16 = [], True
    for b in mine:
        _, loss = model(b[:, :-1], b[:, 1:], return_logits=False)
        (loss / micro_batches).backward()
        alone.append(full_grads())
        # the ranks' bf16 gradients added in bf16 would give bf16 values (over 2 ranks)
        shards = [p.grad.to_local() for p in model.parameters()]
        in_bf16 = in_bf16 and all(torch.equal(g, g.bfloat16().float()) for g in shards)
        model.zero_grad(set_to_none=True)
    return {
        "relative_error": _relative_error(added, alone),
        "reduced_early": reduced_early,
        "reduced_in_bf16": in_bf16,
    }


@pytest.mark.distributed
def test_fsdp2_adds_micro_batch_gradients_in_fp32_shards(tmp_path):
    """bf16 FSDP2 held 16 micro-batches' unsharded gradients in bf16 until the last one, on
    every rank (relative error 5e-3 against reducing each one), and reduced them in bf16; they
    are reduced in fp32 and reduce-scattered into the fp32 shards as they come (2e-8)."""
    from dist_worker import run as fork_run

    overrides = ["data.path=sample", "data.source=hf", "trainer.micro_batch_size=1",
                 "trainer.max_steps=1", f"trainer.batch_tokens={2 * 16 * 64}"]  # fmt: skip
    results = fork_run(_fsdp2_gradients, 2, str(tmp_path / "run"), overrides, 16, tmp=tmp_path)
    for r in results:
        assert r["reduced_early"], r
        assert r["relative_error"] < 1e-6, r
        assert not r["reduced_in_bf16"], r


def _zero_gradients(run_dir: str, overrides: list[str], micro_batches: int) -> dict:
    """In each worker: one step's gradients under a ZeRO mode in bf16, added up over
    ``micro_batches`` micro-batches the way train.py does, and the same micro-batches each
    reduced on their own (each its own accumulation boundary) and summed in fp64. Accelerate's
    backward calls engine.step() on the last micro-batch, which zeroes the gradients: they are
    read as it is called, and lr=0 makes each step leave the weights as they were."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    from llmtrain.run import setup

    cfg = load_config(FAST + overrides + ["trainer.precision=bf16"], world_size=2)
    run = setup(cfg, Path(run_dir))
    accelerator, engine = run.accelerator, run.model
    assert accelerator.num_processes == 2 and type(engine).__name__ == "DeepSpeedEngine"
    assert run.plan.grad_accum == micro_batches
    for group in engine.optimizer.param_groups:
        group["lr"] = 0.0
    params = list(engine.module.parameters())
    weights = [safe_get_full_fp32_param(p).clone() for p in params]
    read, step = [], engine.step

    def read_then_step(*args, **kwargs):
        read.append([safe_get_full_grad(p).double() for p in params])
        return step(*args, **kwargs)

    engine.step = read_then_step
    seed = torch.Generator().manual_seed(0)
    batches = torch.randint(0, 50257, (2, micro_batches, 1, 65), generator=seed)
    mine = batches[accelerator.process_index]
    for b in mine:
        with accelerator.accumulate(engine):
            _, loss = engine(b[:, :-1], b[:, 1:], return_logits=False)
            accelerator.backward(loss)
    added = read.pop()
    for b in mine:
        _, loss = engine(b[:, :-1], b[:, 1:], return_logits=False)
        engine.set_gradient_accumulation_boundary(True)
        engine.backward(loss)  # divided by the accumulation steps, as above
        engine.step()
    assert len(read) == micro_batches
    # the mean of two ranks' bf16 gradients, reduced in bf16, is a bf16 value
    in_bf16 = all(torch.equal(g, g.bfloat16().double()) for gs in read for g in gs)
    after = [safe_get_full_fp32_param(p) for p in params]  # every rank gathers every one
    return {
        "stage": engine.zero_optimization_stage(),
        "relative_error": _relative_error(added, read),
        "reduced_in_bf16": in_bf16,
        "weights_kept": all(map(torch.equal, weights, after)),
    }


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["zero2", "zero3"])
def test_zero_adds_micro_batch_gradients_in_fp32(mode, tmp_path):
    """bf16 ZeRO-2/3 added 16 micro-batches' reduced gradients up in bf16, DeepSpeed's default
    (relative error 5e-3 against adding each one's in fp64), and reduced each in bf16; they are
    reduced in fp32 and added into the fp32 gradient partition (2e-8)."""
    from dist_worker import run as fork_run

    overrides = ["data.path=sample", "data.source=hf", "trainer.micro_batch_size=1",
                 f"dist={mode}", f"trainer.batch_tokens={2 * 16 * 64}"]  # fmt: skip
    results = fork_run(_zero_gradients, 2, str(tmp_path / "run"), overrides, 16, tmp=tmp_path)
    for r in results:
        assert r["stage"] == int(mode[-1]) and r["weights_kept"], r
        assert r["relative_error"] < 1e-6, r
        assert not r["reduced_in_bf16"], r


def _tiny_model():
    from llmtrain.model import GPT

    return GPT(load_config(FAST + ["data.path=x"]).model)


@pytest.mark.distributed
@pytest.mark.parametrize(
    "mode,before,after",
    [
        ("zero3", 2, 1),
        ("zero3", 1, 2),
        ("zero2", 2, 1),
        ("ddp", 2, 1),
        ("ddp", 1, 2),
    ],
)
def test_checkpoint_moves_between_world_sizes(
    mode, before, after, shards, reference, tmp_path, capfd
):
    args = [f"data.path={shards}", f"dist={mode}" if before > 1 or mode != "ddp" else "dist=single"]
    # Step 1, an odd one: two processes have run 2 micro-batches, one process accumulates 4.
    run(tmp_path, before, tmp_path / "a", args + ["trainer.max_steps=1"])
    ckpt = tmp_path / "a" / "checkpoints" / "step_0000001"
    files = sorted(ckpt.rglob("*"))
    args[1] = f"dist={mode}" if after > 1 or mode != "ddp" else "dist=single"
    capfd.readouterr()
    run(tmp_path, after, tmp_path / "b", args + ["trainer.max_steps=4", f"trainer.resume={ckpt}"])
    out = capfd.readouterr().out  # the ranks' console: what happened to the checkpoint
    by = "1 process" if before == 1 else f"{before} processes"
    assert f"resharded  written by {by}, now {after}: its data position" in out
    assert ("converting the ZeRO checkpoint" in out) == mode.startswith("zero")
    # The checkpoint was only read (ZeRO's conversion went to a scratch dir, since deleted).
    assert sorted(ckpt.rglob("*")) == files
    assert not list((tmp_path / "b").glob(".universal-*"))
    got = losses(tmp_path / "b")
    # Same global windows in the same steps: the one-process losses, up to reduction order.
    for step in (2, 3, 4):
        assert got[step] == pytest.approx(reference[step], rel=2e-6, abs=2e-6), (step, got)
    state = torch.load(
        tmp_path / "b" / "checkpoints" / "step_0000004" / "data_state_0.pt", weights_only=True
    )
    assert state["world_size"] == after and state["global_windows"] == 4 * 1024 // 64


def _train_with_a_slow_conversion(run_dir: str, overrides: list[str]) -> dict:
    """_train, with the ZeRO conversion on rank 0 taking longer than dist.timeout_s."""
    import time

    import llmtrain.consolidate as consolidate

    convert = consolidate._universal

    def slow(*args):
        time.sleep(8)
        return convert(*args)

    consolidate._universal = slow
    return _train(run_dir, overrides)


@pytest.mark.distributed
def test_a_zero_conversion_longer_than_the_collective_timeout(shards, reference, tmp_path):
    """The other ranks waited for rank 0's conversion in a barrier, which dist.timeout_s ends:
    8B parameters, about 40 minutes by extrapolation, against the default 30."""
    from dist_worker import run as fork_run

    args = [f"data.path={shards}", "dist=zero3"]
    run(tmp_path, 1, tmp_path / "a", args + ["trainer.max_steps=1"])
    ckpt = tmp_path / "a" / "checkpoints" / "step_0000001"
    resume = ["trainer.max_steps=2", f"trainer.resume={ckpt}", "dist.timeout_s=4"]
    fork_run(_train_with_a_slow_conversion, 2, str(tmp_path / "b"), args + resume, tmp=tmp_path)
    assert losses(tmp_path / "b")[2] == pytest.approx(reference[2], rel=2e-6, abs=2e-6)


@pytest.mark.distributed
def test_fsdp2_checkpoint_reshards_to_more_processes(shards, reference, tmp_path):
    args = [f"data.path={shards}", "dist=fsdp2"]
    run(tmp_path, 2, tmp_path / "a", args + ["trainer.max_steps=2"])
    ckpt = tmp_path / "a" / "checkpoints" / "step_0000002"
    run(
        tmp_path,
        4,
        tmp_path / "b",
        args + ["trainer.max_steps=3", f"trainer.resume={ckpt}", "trainer.micro_batch_size=2"],
    )
    assert losses(tmp_path / "b")[3] == pytest.approx(reference[3], rel=2e-6, abs=2e-6)


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["zero3", "fsdp2"])
def test_consolidated_export_matches_training(mode, shards, tmp_path):
    from llmtrain.consolidate import export, full_state_dict
    from llmtrain.sample import load_gpt

    args = [f"data.path={shards}", f"dist={mode}", "trainer.max_steps=2"]
    run(tmp_path, 2, tmp_path / "r", args)
    run(tmp_path, 2, tmp_path / "d", [f"data.path={shards}", "dist=ddp", "trainer.max_steps=2"])
    ckpt = tmp_path / "r" / "checkpoints" / "step_0000002"
    sharded = full_state_dict(ckpt)
    ddp = full_state_dict(tmp_path / "d" / "checkpoints" / "step_0000002")
    for name, t in ddp.items():
        torch.testing.assert_close(sharded[name], t, rtol=1e-5, atol=1e-6, msg=name)
    from safetensors.torch import load_file

    out = export(ckpt, dtype="bf16")
    assert out == ckpt / "consolidated.safetensors"  # beside the shards, never over a listed file
    assert out.stat().st_mode & 0o777 == (ckpt / "config.yaml").stat().st_mode & 0o777
    exported = load_file(str(out))
    assert "lm_head.weight" not in exported  # tied: stored once (FSDP2's was stored twice)
    for name, t in exported.items():
        assert t.dtype == torch.bfloat16
        torch.testing.assert_close(t.float(), ddp[name], rtol=1e-2, atol=1e-2, msg=name)
    model, _, _ = load_gpt(ckpt)  # straight from the shards, fp32
    weights = model.state_dict()
    for name, t in sharded.items():  # the tied lm_head may be listed under one name only
        torch.testing.assert_close(weights[name], t, msg=name)


def _verify(ckpt: str) -> str | None:
    from llmtrain.integrity import verify

    torch.distributed.init_process_group("gloo")
    return verify(Path(ckpt))


@pytest.mark.distributed
def test_a_file_one_rank_hashed_damaged_is_every_rank_s_answer(tmp_path):
    """The ranks share the hashing: a damaged file in rank 1's share must be rank 0's answer
    too, or one rank resumes from the checkpoint while the other falls back past it."""
    from dist_worker import run as fork_run

    from llmtrain.integrity import assign, digest, write_manifest

    ckpt = tmp_path / "step_0000001"
    ckpt.mkdir()
    (ckpt / "a.bin").write_bytes(b"a" * 300)
    (ckpt / "b.bin").write_bytes(b"b" * 200)
    write_manifest(ckpt, digest(ckpt, ["a.bin", "b.bin"]))
    assert assign([("a.bin", 300), ("b.bin", 200)], 2) == [["a.bin"], ["b.bin"]]
    (ckpt / "b.bin").write_bytes(b"c" * 200)  # the same size, other bytes
    problems = fork_run(_verify, 2, str(ckpt), tmp=tmp_path / "out")
    assert problems[0] == problems[1] and "b.bin does not match its sha256" in problems[0]


def test_world_size_change_needs_a_global_window_order():
    from llmtrain.consolidate import redistribute_data_state

    hf = {"kind": "hf", "num_workers": 0}
    with pytest.raises(ConfigError, match="only with data=shards.*trainer.resume_data=false"):
        redistribute_data_state([hf, hf], rank=0, world=1)
    workers = {"kind": "shards", "num_workers": 2}
    with pytest.raises(ConfigError, match="saved with data.num_workers=2"):
        redistribute_data_state([workers, workers], rank=0, world=1)
    # shards: ranks 0 and 1 of 2 consumed windows {0..7}; 4 ranks continue from window 8.
    base = {
        "kind": "shards",
        "num_workers": 0,
        "version": 1,
        "rank": 0,
        "world_size": 2,
        "seq_len": 64,
        "next": 0,
        "done": [False],
        "batches": 1,
        "windows": 4,
        "global_windows": 8,
        "global_tokens": 512,
    }
    states = [
        {**base, "workers": [{"epoch": 0, "next": 8 + r}], "stats": [{"documents": 0}]}
        for r in range(2)
    ]
    new = [redistribute_data_state(states, r, 4) for r in range(4)]
    assert [s["workers"][0]["next"] for s in new] == [8, 9, 10, 11]
    assert all(s["world_size"] == 4 and s["rank"] == r for r, s in enumerate(new))


@pytest.mark.distributed
@pytest.mark.timeout(400)
def test_real_accelerate_launch_trains_and_resumes_auto(tmp_path):
    """The documented command, launcher and all: 2 CPU processes, ZeRO-3, then resume=auto."""
    import os
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(Path(__file__).resolve().parents[1] / "launch" / "cpu.yaml"),
        "-m",
        "llmtrain.train",
        "experiment=smoke",
        "dist=zero3",
        "logger=none",
        "trainer.ckpt_every=2",
        "trainer.sample_every=0",
        "trainer.eval_batches=1",
        "trainer.log_every=1",
        f"hydra.run.dir={run_dir}",
        "trainer.resume=auto",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for steps in (2, 4):
        out = subprocess.run(
            [*cmd, f"trainer.max_steps={steps}"],
            env=env,
            capture_output=True,
            text=True,
            timeout=360,
        )
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "resumed    from" in out.stdout and "at step 2" in out.stdout
    assert "2 proc = 1,024 tokens/step" in out.stdout  # really two processes
    # The console is llmtrain's lines: no gcc probe per rank, no per-step torch deprecation
    # warning about DeepSpeed's collectives (16 lines a step on 2 processes, before).
    assert "gcc " not in out.stdout + out.stderr and "is deprecated" not in out.stderr
    assert sorted(losses(run_dir)) == [1, 2, 3, 4]  # one metrics file across the restart
    assert (run_dir / "checkpoints" / "step_0000004" / "pytorch_model").is_dir()  # ZeRO shards


# Each rank's training loss at steps 1 and 2: float32 values whose ranks' mean at step 1,
# carried into step 2, rounds the interval's sum otherwise than the ranks' own sums do.
STEP_LOSSES = {0: (9.0, 10 + 3 * 2**-20), 1: (10 + 2**-20, 10 + 2**-20)}


def _train_with_losses(run_dir: str, overrides: list[str], start: int) -> None:
    """Runs in each worker: train from step ``start`` with the loss values of STEP_LOSSES (the
    gradients are the model's own)."""
    import llmtrain.model as model_mod
    import llmtrain.train as train_mod

    rank, step = int(os.environ["RANK"]), [start]
    forward = model_mod.GPT.forward

    def fixed(self, *args, **kwargs):
        logits, loss = forward(self, *args, **kwargs)
        if self.training:  # value STEP_LOSSES', gradient loss's
            loss = STEP_LOSSES[rank][step[0]] + (loss - loss.detach())
        return logits, loss

    def done(state, throughput) -> None:
        step[0] = state.step

    model_mod.GPT.forward = fixed
    train_mod.train(load_config(FAST + overrides, world_size=2), Path(run_dir), step_hook=done)


@pytest.mark.distributed
def test_a_resume_inside_a_log_interval_logs_its_loss_bitwise(shards, tmp_path):
    """The interval's partial loss was saved as the ranks' mean and every rank resumed with it:
    the line ending the interval then summed (m + x0) + (m + x1) for (a0 + x0) + (a1 + x1), a
    float32 ulp off the uninterrupted run's (8.61285629 for 8.61285553 in a kill test)."""
    from dist_worker import run as fork_run

    args = [f"data.path={shards}", "dist=ddp", "trainer.log_every=2", "trainer.max_steps=2"]
    args += ["trainer.ckpt_every=1"]
    fork_run(_train_with_losses, 2, str(tmp_path / "full"), args, 0, tmp=tmp_path)
    saved = tmp_path / "full" / "checkpoints" / "step_0000001"
    resumed = [*args, f"trainer.resume={saved}"]
    fork_run(_train_with_losses, 2, str(tmp_path / "resumed"), resumed, 1, tmp=tmp_path)
    assert losses(tmp_path / "resumed")[2] == losses(tmp_path / "full")[2]  # bitwise
