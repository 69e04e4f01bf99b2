"""llmtrain-plan: its states against DeepSpeed's own memory estimators, the time estimate and the
command line. The memory model itself is checked in test_memory.py."""

import os

import pytest

from llmtrain.config import load_config
from llmtrain.memory import param_counts
from llmtrain.plan import GiB, main, plan


def cfg_for(*overrides, world_size=1):
    return load_config(["trainer.max_steps=10", *overrides], world_size=world_size)


# ------------------------------------------------------------------ DeepSpeed's estimators


@pytest.fixture(scope="module")
def ds_estimators():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    stage12 = pytest.importorskip("deepspeed.runtime.zero.stage_1_and_2")
    stage3 = pytest.importorskip("deepspeed.runtime.zero.stage3")
    return (
        stage12.estimate_zero2_model_states_mem_needs,
        stage3.estimate_zero3_model_states_mem_needs,
    )


def states(cfg, n):
    p = plan(cfg, world_size=n)
    return p, p.params_bytes + p.grads_bytes + p.optim_bytes + p.gather_bytes


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_zero2_matches_deepspeed(ds_estimators, n, precision):
    """DeepSpeed: GPU 2P + 18P/N; ours in fp16 2 params + (2 grads + 12 + 4 fp32 grad
    partition) / N -- the same bytes. bf16 adds the gradients up in the fp32 partition
    (ds_config.py) with no 16-bit one beside it: 2P/N less. With offload DeepSpeed keeps only
    the 16-bit params on the GPU, as fp16 does; bf16's fp32 sum stays there too (4P/N).
    DeepSpeed's CPU figure is ours x its additional_buffer_factor (1.5), except that for N > 4
    it counts max(4N, 16): N fp32 model copies while loading, not training state."""
    est2, _ = ds_estimators
    bf16 = precision == "bf16"
    cfg = cfg_for(
        "model=gpt2-medium",
        "dist.mode=zero2",
        "trainer.micro_batch_size=1",
        f"trainer.precision={precision}",
        world_size=n,
    )
    p, gpu = states(cfg, n)
    P = p.n_params
    ds_cpu, ds_gpu = est2(P, n, 1, cpu_offload=False, additional_buffer_factor=1.5)
    assert gpu == pytest.approx(ds_gpu - (2 * P / n if bf16 else 0), abs=1)

    cfg.dist.offload_optimizer = True
    p, gpu = states(cfg, n)
    ds_cpu, ds_gpu = est2(P, n, 1, cpu_offload=True, additional_buffer_factor=1.5)
    assert gpu == pytest.approx(ds_gpu + (4 * P / n if bf16 else 0), abs=1)
    load_factor = max(4 * n, 16) / 16
    assert 1.5 * load_factor * p.cpu_bytes_per_node == pytest.approx(ds_cpu, abs=2)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("n", [1, 8, 64])
def test_zero3_matches_deepspeed(ds_estimators, n, precision):
    """DeepSpeed: GPU 4 x largest layer + 18P/N, 18 = 2 16-bit params + 16 for the optimizer
    and its fp32 gradient; it does not count the 16-bit gradient partition (grad_accum_dtype
    defaults to the model's dtype), which fp16 has: ours is exactly 2P/N more. bf16 adds the
    gradients up in an fp32 partition (ds_config.py) beside the step's fp32 copy: 4P/N more,
    on the CPU under offload. Otherwise with offload the figures agree on GPU and, up to the
    1.5 buffer factor, on CPU (zero_init=True)."""
    _, est3 = ds_estimators
    cfg = cfg_for(
        "model=llama-8b",
        "dist.mode=zero3",
        "trainer.micro_batch_size=1",
        f"trainer.precision={precision}",
        world_size=n,
    )
    nodes, per_node = max(1, n // 8), min(n, 8)
    grads = 4 if precision == "bf16" else 2  # bytes per parameter of the gradient partition
    p, gpu = states(cfg, n)
    P, L = p.n_params, p.largest_layer_params
    _, ds_gpu, ds_layer = est3(P, L, per_node, nodes, cpu_offload=False, zero_init=True)
    assert p.gather_bytes == ds_layer
    assert gpu - grads * P / n == pytest.approx(ds_gpu, abs=1)

    # fp16's gradient partition lands in the optimizer's fp32 one; bf16's fp32 sum is its own
    extra_cpu = 1.5 * per_node * (4 if precision == "bf16" else 0) * P / n
    cfg.dist.offload_optimizer = True
    p, gpu = states(cfg, n)
    ds_cpu, ds_gpu, _ = est3(
        P, L, per_node, nodes, cpu_offload=True, cpu_offload_params=False, zero_init=True
    )
    assert gpu == pytest.approx(ds_gpu, abs=1)
    assert 1.5 * p.cpu_bytes_per_node - extra_cpu == pytest.approx(ds_cpu, rel=1e-9)

    cfg.dist.offload_params = True
    p, gpu = states(cfg, n)
    ds_cpu, ds_gpu, _ = est3(
        P, L, per_node, nodes, cpu_offload=True, cpu_offload_params=True, zero_init=True
    )
    assert gpu == ds_gpu
    assert 1.5 * p.cpu_bytes_per_node - extra_cpu == pytest.approx(ds_cpu, rel=1e-9)


def test_sharding_order_and_fp32_accounting():
    P = param_counts(cfg_for("model=gpt2-small").model)[0]
    plans, totals = {}, {}
    for mode in ("ddp", "zero1", "zero2", "zero3", "fsdp2"):
        plans[mode], totals[mode] = states(
            cfg_for(
                f"dist.mode={mode}", "model=gpt2-small", "trainer.micro_batch_size=4", world_size=8
            ),
            8,
        )
    assert totals["ddp"] == 16 * P  # 2 + 2 + 12, replicated
    # bf16 gradients added up in bf16 under zero1, in the fp32 partition under zero2/3
    assert plans["zero1"].bytes_per_param == {"params": 2, "grads": 2, "optim": 16}
    assert plans["zero2"].bytes_per_param == {"params": 2, "grads": 4, "optim": 12}
    assert plans["zero3"].bytes_per_param == {"params": 2, "grads": 4, "optim": 16}
    assert totals["ddp"] > totals["zero1"] > totals["zero2"] > totals["zero3"]
    zero3, fsdp2 = plans["zero3"], plans["fsdp2"]
    # no fp32 gradient partition; but the gathered layer's gradients are reduced in fp32
    assert totals["fsdp2"] - fsdp2.gather_bytes < totals["zero3"] - zero3.gather_bytes
    assert fsdp2.gather_bytes == zero3.gather_bytes + 4 * fsdp2.largest_layer_params
    p, total = states(cfg_for("model=gpt2-small", "trainer.precision=fp32"), 1)
    assert p.bytes_per_param == {"params": 4, "grads": 4, "optim": 8} and total == 16 * P


# ------------------------------------------------------------------ measured on CPU


# ------------------------------------------------------------------ time and the CLI


def test_time_estimate():
    cfg = cfg_for("model=gpt2-small", "data.seq_len=1024", "trainer.micro_batch_size=16")
    p = plan(cfg, world_size=1, mfu=0.5, peak_tflops=100.0)
    assert p.flops_per_step == p.flops_per_token * 524288
    assert p.step_time_s == pytest.approx(p.flops_per_step / 50e12)
    assert p.run_time_s == pytest.approx(10 * p.step_time_s)
    p8 = plan(
        cfg_for(
            "model=gpt2-small", "data.seq_len=1024", "trainer.micro_batch_size=16", world_size=8
        ),
        world_size=8,
        mfu=0.5,
        peak_tflops=100.0,
    )
    assert p8.step_time_s == pytest.approx(p.step_time_s / 8)


def test_cli_fits(capsys):
    assert main(["--gpus", "1", "--gpu-mem", "80", "model=gpt2-small"]) == 0
    out = capsys.readouterr().out
    assert "fits" in out and "does not fit" not in out
    assert "124.48M" in out and "GFLOPs/token" in out


def test_cli_does_not_fit_gives_hints(capsys):
    argv = [
        "--gpus",
        "8",
        "--gpu-mem",
        "80",
        "model=llama-8b",
        "dist.mode=zero1",
        "data.seq_len=4096",
        "trainer.micro_batch_size=8",
        "trainer.batch_tokens=1048576",
        "trainer.max_tokens=1000000000",
    ]
    assert main(argv) == 3  # does not fit (1 is a crash's code)
    out = capsys.readouterr().out
    assert "does not fit" in out
    assert "activation_checkpointing=true" in out and "zero3" in out
    assert "954 steps" in out


def test_cli_bad_config_names_the_key(capsys):
    assert main(["--gpus", "3", "model=gpt2-small", "trainer.max_steps=1"]) == 2
    assert "trainer.batch_tokens" in capsys.readouterr().err


def test_cli_refuses_what_the_launch_refuses(capsys):
    assert main(["--gpus", "2", "experiment=smoke"]) == 2  # it planned dist=single on 2 GPUs
    assert "dist.mode: 'single' is one process and this run has 2" in capsys.readouterr().err
    assert main(["--gpus", "2", "experiment=smoke", "dist=ddp"]) == 0


def test_plan_reports_gib():
    p = plan(cfg_for("model=gpt2-small"), world_size=1, gpu_mem_gb=24)
    assert p.gpu_mem_bytes == 24 * GiB
    assert p.fits == (p.total_bytes <= 24 * GiB)


def test_cli_says_when_the_config_trains_on_the_cpu(capsys):
    assert main(["experiment=smoke"]) == 0
    assert "this config trains on the CPU (trainer.device=cpu)" in capsys.readouterr().out
    main(["model=gpt2-small", "trainer.max_steps=1"])
    assert "trains on the CPU" not in capsys.readouterr().out


def test_cli_takes_flags_and_overrides_in_any_order(capsys):
    """The README's `llmtrain-plan experiment=... --gpu-mem 24 trainer.micro_batch_size=16`
    was 'unrecognized arguments'."""
    argv = ["experiment=gpt2-124m-fineweb", "--gpu-mem", "24", "trainer.micro_batch_size=16"]
    assert main(argv) == 0  # it fits a 24 GiB card at micro-batch 16
    assert "batch          16 seq x 1024 tok x 32 accum" in capsys.readouterr().out


def test_cli_reads_a_users_config_dir_as_training_does(tmp_path, capsys):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /model: gpt2-medium\n"
        "experiment: mine\ntrainer:\n  max_steps: 7\n"
    )
    assert main(["experiment=mine", "--config-dir", str(tmp_path), "--gpu-mem", "80"]) == 0
    out = capsys.readouterr().out
    assert "gpt2-medium" in out and "7 steps" in out  # from the user's file
    with pytest.raises(SystemExit) as e:
        main(["experiment=mine", "--config-dir", str(tmp_path / "nope")])
    assert e.value.code == 2 and "no such folder" in capsys.readouterr().err


def test_cli_plans_a_wsd_schedule_without_a_horizon(capsys):
    """Planned with a 1-step horizon, WSD's warmup and decay 'exceeded' it: a bad config."""
    assert main(["model=llama-1b", "optim=adamw-wsd"]) == 0
    assert "no horizon" in capsys.readouterr().out


def test_the_micro_batch_hint_divides_the_batch(capsys):
    """9 sequences per step: half of 9 is 4, which the same tool then refused."""
    argv = ["--gpu-mem", "24", "model=gpt2-xl", "data.seq_len=1024", "trainer.max_steps=10",
            "trainer.batch_tokens=9216", "trainer.micro_batch_size=9"]  # fmt: skip
    assert main(argv) == 3
    assert "trainer.micro_batch_size=3 " in capsys.readouterr().out
    assert main([*argv[:-1], "trainer.micro_batch_size=3", "--gpu-mem", "80"]) == 0


def test_fsdp2_without_resharding_keeps_every_block_gathered():
    args = ["model=llama-8b", "dist=fsdp2", "data.seq_len=4096", "trainer.micro_batch_size=1",
            "trainer.batch_tokens=1048576"]  # fmt: skip
    resharded = plan(cfg_for(*args, world_size=8), world_size=8)
    kept = plan(cfg_for(*args, "dist.reshard_after_forward=false", world_size=8), world_size=8)
    extra = kept.gather_bytes - resharded.gather_bytes
    assert extra == pytest.approx(2 * kept.n_params, rel=0.05)  # bf16 copies of every block


@pytest.mark.parametrize(
    "flags",
    [["--gpus-per-node", "0"], ["--gpus-per-node", "-4"], ["--gpus-per-node", "16"],
     ["--gpu-mem", "nan"], ["--gpu-mem", "inf"], ["--peak-tflops", "inf"], ["--mfu", "nan"]],
)  # fmt: skip
def test_cli_refuses_meaningless_flags(flags, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--gpus", "2", *flags, "dist=zero3-offload", "model=gpt2-small"])
    assert e.value.code == 2 and "llmtrain-plan: error" in capsys.readouterr().err


def test_an_fp16_run_is_planned_as_fp16(capsys):
    assert main(["model=gpt2-small", "trainer.precision=fp16", "trainer.max_steps=1"]) == 0
    out = capsys.readouterr().out
    assert "dist single (replicated), fp16" in out and "bf16" not in out.splitlines()[0]


def test_cli_refuses_a_vocab_that_is_not_the_tokenizer_s(capsys):
    """llmtrain-train refused it; llmtrain-plan planned a 50,257-token embedding for cl100k."""
    argv = ["experiment=smoke", "model.vocab_size=1000"]
    assert main(argv) == 2
    assert "set model.vocab_size=50257" in capsys.readouterr().err


def test_cli_says_what_building_the_model_takes_on_the_cpu(capsys, tmp_path):
    """Rank 0 builds the fp32 model on the CPU, and prepare() broadcasts it (every process
    built one before: 8 x 4 x 7.39B bytes for llama-8b on an 8-GPU node); with
    trainer.init_from rank 0 reads one more copy (every rank read one before
    llmtrain/init_weights.py)."""
    argv = ["--gpus", "8", "--gpu-mem", "80", "model=llama-8b", "dist=zero3"]
    main(argv)
    assert (
        "  CPU at start      27.54 GiB   rank 0 builds the fp32 model and prepare() broadcasts"
        in capsys.readouterr().out
    )
    main([*argv, f"trainer.init_from={tmp_path}"])
    out = capsys.readouterr().out
    assert "  CPU at start      55.07 GiB" in out and "rank 0 the trainer.init_from weights" in out


def test_the_cpu_at_start_is_what_building_the_model_takes():
    """Measured: a fresh process's resident memory grows by the plan's per-process figure
    when it builds gpt2-medium (355M parameters) as training does, and by almost nothing when
    it builds the model empty, as ranks other than 0 and a resume do."""
    import subprocess
    import sys

    build = (
        "import psutil; from llmtrain.config import load_config; from llmtrain.run import "
        "build_model; cfg = load_config(['experiment=smoke', 'model=gpt2-medium']); "
        "build_model(load_config(['experiment=smoke']), empty=True); "  # torch's one-time costs
        "rss = lambda: psutil.Process().memory_info().rss; before = rss(); "
        "empty = build_model(cfg, empty=True); print(rss() - before); before = rss(); "
        "model = build_model(cfg); print(rss() - before)"
    )
    grew = subprocess.run([sys.executable, "-c", build], capture_output=True, text=True,
                          check=True).stdout.split()  # fmt: skip
    planned = plan(cfg_for("model=gpt2-medium"), world_size=1).cpu_start_bytes_per_node
    assert int(grew[1]) == pytest.approx(planned, rel=0.1)
    assert int(grew[0]) < 0.02 * planned
