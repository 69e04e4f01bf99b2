"""llmtrain-bench on CPU at a CI-safe size: the record, the bare-loop baseline, --versus.

No timing thresholds: a shared CI host makes them flaky. What is checked is that the harness
times the real loop, that the bare loop computes the same thing (equal losses on the same
batches). The record's rendering is tested in test_bench_record.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llmtrain.bench import bench_config, main, make_sample_shards
from llmtrain.bench_record import write_table
from llmtrain.shards import read_shard
from llmtrain.train import train

pytestmark = pytest.mark.timeout(120)

TINY = [
    "experiment=smoke",
    "data=shards",
    "data.num_workers=0",
    "model.n_layer=1",
    "model.n_embd=32",
    "data.seq_len=32",
    "trainer.micro_batch_size=2",
    "trainer.batch_tokens=128",  # 2 micro-batches accumulated per step
    "trainer.loss_chunk=0",
]
REQUIRED = [
    "model",
    "dist",
    "device",
    "seq_len",
    "compile",
    "tokens_per_s",
    "mfu",
    "peak_mem_gb",
    "torch",
    "date",
    "command",
    "micro_batch",
    "batch_tokens",
    "steps",
    "step_time_s",
    "data_wait_frac",
    "compile_s",
    "precision",
    "cuda",
    "git_sha",
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_sample_shards(tmp_path_factory.mktemp("shards"))


def test_record_and_baseline(shards, tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    args = ["--steps", "2", "--warmup", "1", "--baseline", "--repeats", "2", "--out", str(out)]
    main([*args, *TINY, f"data.path={shards}"])
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert set(REQUIRED) <= set(record), set(REQUIRED) - set(record)
    assert record["model"] == "tiny" and record["dist"] == "single" and record["device"] == "cpu"
    assert record["seq_len"] == 32 and record["grad_accum"] == 2 and record["batch_tokens"] == 128
    assert record["steps"] == 2 and record["repeats"] == 2 and record["compile_s"] is None
    assert record["mfu"] is None  # no peak is known for a CPU: absent, not made up
    assert record["tokens_per_s"] == pytest.approx(128 / record["step_time_s"])
    assert record["command"].startswith("llmtrain-bench --steps 2")
    assert record["overhead_vs_bare"] == pytest.approx(
        record["step_time_p50_s"] / record["bare_step_time_p50_s"]
    )
    assert len(record["step_times_s"]) == len(record["bare_step_times_s"]) == 2
    ratios = [
        f / b for f, b in zip(record["step_times_s"], record["bare_step_times_s"], strict=True)
    ]
    assert record["overhead_vs_bare_paired"] == pytest.approx(sum(ratios) / 2)
    # Same model, seed, batches and optimizer: the bare loop trains the same model.
    assert record["loss_bare"] == pytest.approx(record["loss_framework"], rel=1e-5)
    assert "vs bare" in capsys.readouterr().out


def test_versus_times_the_change_alternating_with_the_run_without(shards, tmp_path, capsys):
    """--versus: the before and after records of one invocation, the after one with the paired
    speedup and memory ratio; the fused loss trains the same model, so the losses agree."""
    out = tmp_path / "results.jsonl"
    args = ["--steps", "2", "--warmup", "1", "--repeats", "2", "--out", str(out)]
    main([*args, "--versus", "trainer.loss_chunk=16", *TINY, f"data.path={shards}"])
    before, after = [json.loads(line) for line in out.read_text().splitlines()]
    assert before["loss_chunk"] == 0 and after["loss_chunk"] == 16
    assert before["before_of"] == after["versus"] == ["trainer.loss_chunk=16"]
    assert len(before["step_times_s"]) == len(after["step_times_s"]) == 2
    ratios = [b / a for b, a in zip(before["step_times_s"], after["step_times_s"], strict=True)]
    assert after["speedup_paired"] == pytest.approx(sum(ratios) / 2)
    assert before["peak_mem_gb"] > 0 and after["peak_mem_gb"] > 0
    assert after["peak_mem_ratio"] == pytest.approx(after["peak_mem_gb"] / before["peak_mem_gb"])
    assert after["loss_after"] == pytest.approx(after["loss_before"], rel=1e-5)
    assert "vs before" in capsys.readouterr().out
    md = tmp_path / "RESULTS.md"
    write_table(out, md)
    assert "without `trainer.loss_chunk=16`" in md.read_text()
    assert "the next row with `trainer.loss_chunk=16` added" in md.read_text()


def test_step_hook_sees_every_step_and_final_save_can_be_skipped(shards, tmp_path):
    cfg = bench_config([*TINY, f"data.path={shards}"], steps=2, warmup=1)
    seen = []
    state = train(cfg, tmp_path, step_hook=lambda s, t: seen.append((s.step, t.tokens)),
                  final_save=False)  # fmt: skip
    assert state.step == 3 and [s for s, _ in seen] == [1, 2, 3]
    assert [t for _, t in seen] == [128, 256, 384]  # no log / eval reset inside the window
    assert not (tmp_path / "checkpoints").exists()


def test_runs_without_datasets_wandb_deepspeed(tmp_path):
    """The GPU host has none of them: a shards run must not import them, and with no
    data.path the sample is written as shards into the cache on first use."""
    code = (
        "import sys\n"
        "for m in ('datasets', 'wandb', 'deepspeed'): sys.modules[m] = None\n"
        "from llmtrain.bench import main\n"
        f"main(['--steps', '1', '--warmup', '1', '--no-record', *{TINY!r}])\n"
        "assert not [m for m in ('datasets', 'wandb', 'deepspeed') if sys.modules.get(m)]\n"
    )
    env = {**os.environ, "LLMTRAIN_CACHE": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=100
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tokens/s" in done.stdout
    assert (tmp_path / "sample-shards" / "sample_train_000.bin").exists()


def test_sample_shards_are_remade_when_the_sample_changes(tmp_path):
    """The cache was reused because its files existed: an llmtrain with another sample or
    tokenizer would have benched on the old shards. A digest of both now keys it."""
    out = make_sample_shards(tmp_path)
    train = out / "sample_train_000.bin"
    first = train.stat().st_mtime_ns
    assert (out / "SOURCE").read_text().strip() and len(read_shard(train)) > 100_000
    make_sample_shards(out)
    assert train.stat().st_mtime_ns == first  # the same sample: reused
    (out / "SOURCE").write_text("another sample\n")
    train.write_bytes(b"stale")
    make_sample_shards(out)
    assert len(read_shard(train)) > 100_000 and (out / "SOURCE").read_text() != "another sample\n"


def test_peak_table_covers_the_benchmark_gpus():
    from llmtrain.metrics import device_peak_tflops

    names = {
        "NVIDIA H100 80GB HBM3": 989.0,  # SXM
        "NVIDIA H100 PCIe": 756.0,
        "NVIDIA H100 NVL": 835.0,
        "NVIDIA H200": 989.0,
        "NVIDIA H200 NVL": 835.0,
        "NVIDIA A100-SXM4-80GB": 312.0,
        "NVIDIA L40S": 362.0,
        "NVIDIA B200": 2250.0,
    }
    assert {n: device_peak_tflops(n) for n in names} == names


def test_fused_loss_benchmark_runs():
    """benchmarks/fused_loss.py (the head alone, plain vs fused) at a CI-safe size."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "fused_loss.py"
    args = ["--tokens", "64", "--width", "16", "--chunk", "16", "--repeats", "2", "--eager-only"]
    out = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, check=True
    ).stdout
    assert "head 64 tokens x 16 -> 50304 vocab, chunk 16, cpu, fp32" in out
    assert "plain eager" in out and "fused eager" in out and "compiled" not in out


def test_fused_loss_benchmark_refuses_to_time_wrong_gradients():
    """On torch 2.11 the compiled fused loss gave all-zero gradients and a speedup that was
    skipped work; the script now stops before timing a path whose gradients are off."""
    import runpy

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "fused_loss.py"
    check = runpy.run_path(str(script))["check_gradients"]
    want = [torch.randn(8, 4), torch.randn(16, 4)]
    check([w + 1e-4 for w in want], want, "fused")  # rounding passes
    with pytest.raises(SystemExit, match=r"fused: d\(loss\)/d\(h\) is off the plain head's by 1"):
        check([torch.zeros(8, 4), want[1]], want, "fused")


def test_repeats_under_a_launcher_are_refused_before_any_run(shards, monkeypatch, capsys):
    """Under a launcher the first run's end destroys the process group, and a second run in
    the same process failed ('Default process group has not been initialized'): --repeats and
    --versus are refused up front, with the way out."""
    import llmtrain.bench as bench

    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "2")):
        monkeypatch.setenv(key, value)

    def no_run(*args, **kwargs):
        raise AssertionError("a timed run started")

    monkeypatch.setattr(bench, "run_framework", no_run)
    args = ["--steps", "1", "--warmup", "1", "--repeats", "2", "--no-record"]
    with pytest.raises(SystemExit) as e:
        main([*args, *TINY, "dist=ddp", f"data.path={shards}"])
    assert e.value.code == 2
    assert "--repeats 1 and no --versus" in capsys.readouterr().err


def test_record_pins_code_versions_and_model_shape(shards):
    """Enough to reproduce a row without the repo's git history (the GPU host has none):
    the resolved config, the parameter count, a hash of the source, library versions, and
    whether torch.compile found its caches warm."""
    import argparse

    from llmtrain.bench_record import build_record
    from llmtrain.startup import Plan

    cfg = bench_config([*TINY, f"data.path={shards}"], steps=2, warmup=1)
    run = dict(step_time_s=0.1, step_time_p50_s=0.1, times=[0.1, 0.1], first_step_s=0.2,
               data_wait_frac=0.0, peak_mem_gb=1.0)  # fmt: skip
    args = argparse.Namespace(warmup=1, steps=2, note=None)
    r = build_record(cfg, Plan.from_config(cfg, 1), [run], command="x",
                     device=torch.device("cpu"), precision="no", args=args)  # fmt: skip
    assert r["config"]["model"]["n_embd"] == 32 and r["n_params"] > 0
    assert len(r["source_sha"]) == 12 and r["python"] and r["accelerate"]
    assert "compile_cache_warm" in r


def test_baseline_is_refused_where_the_bare_loop_would_time_other_work(shards, capsys):
    """Under ZeRO the framework keeps bf16 weights (zero3-offload steps with DeepSpeed's CPU
    Adam) and the bare loop does not: the 1.18x it recorded was not overhead."""
    with pytest.raises(SystemExit) as e:
        main(["--steps", "2", "--warmup", "1", "--baseline", "--no-record", *TINY,
              f"data.path={shards}", "dist=zero1"])  # fmt: skip
    assert e.value.code == 2 and "dist=single" in capsys.readouterr().err


def test_compile_fields_say_when_a_run_compiled_nothing_or_from_a_warm_cache(shards):
    """A --versus run after a compiled one reuses its code: its 'compile_s' was the noise
    between two steady steps (-0.5 s); a cache directory with anything in it read as warm."""
    import argparse

    from llmtrain.bench_record import build_record
    from llmtrain.startup import Plan

    cfg = bench_config([*TINY, f"data.path={shards}", "trainer.compile=true"], steps=2, warmup=1)
    args = argparse.Namespace(warmup=1, steps=2, note=None)
    base = dict(step_time_s=0.1, step_time_p50_s=0.1, times=[0.1, 0.1], first_step_s=0.2,
                data_wait_frac=0.0, peak_mem_gb=1.0)  # fmt: skip

    def record(graphs, hits, misses):
        run = {**base, "compiled": dict(graphs=graphs, cache_hits=hits, cache_misses=misses)}
        return build_record(cfg, Plan.from_config(cfg, 1), [run], command="x",
                            device=torch.device("cpu"), precision="no", args=args)  # fmt: skip

    reused = record(0, 0, 0)
    assert reused["compile_s"] is None and reused["compile_cache_warm"] is None
    cold, warm = record(3, 0, 3), record(3, 3, 0)
    assert cold["compile_s"] == warm["compile_s"] == pytest.approx(0.1)
    assert cold["compile_cache_warm"] is False and warm["compile_cache_warm"] is True


def test_a_launched_run_records_the_launchers_command(tmp_path):
    from llmtrain.bench import launcher_command

    fake = tmp_path / "accelerate"  # stands in for the launcher, as its parent process
    fake.write_text("import time\ntime.sleep(30)\n")
    words = ["launch", "--config_file", "launch/cpu.yaml", "-m", "llmtrain.bench", "--steps", "2"]
    proc = subprocess.Popen([sys.executable, str(fake), *words])
    cmdline = Path(f"/proc/{proc.pid}/cmdline")
    for _ in range(100):  # a process just started shows an empty command line for a moment
        if cmdline.read_bytes():
            break
        time.sleep(0.05)
    try:
        assert launcher_command(proc.pid) == "accelerate " + " ".join(words)
    finally:
        proc.kill()
        proc.wait()
