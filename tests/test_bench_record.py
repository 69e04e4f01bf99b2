"""The benchmark record's two renderings: the console report and the RESULTS.md table.

Records are written by hand here, so these tests run in milliseconds and pin the wording users
read; tests/test_bench.py produces real records from timed CPU runs.
"""

from __future__ import annotations

import json

from llmtrain.bench_record import BEGIN, END, render, report, write_table


def _record(**kw) -> dict:
    base = {
        "date": "2026-01-01T00:00:00+00:00",
        "command": "llmtrain-bench experiment=smoke",
        "model": "tiny",
        "dist": "single",
        "world_size": 1,
        "device": "cpu",
        "seq_len": 128,
        "micro_batch": 8,
        "grad_accum": 1,
        "compile": False,
        "precision": "fp32",
        "tokens_per_s": 1000.0,
        "tokens_per_s_per_device": 1000.0,
        "mfu": None,
        "step_time_s": 1.024,
        "step_time_p50_s": 1.0,
        "step_time_p90_s": 1.1,
        "data_wait_frac": 0.001,
        "peak_mem_gb": 1.5,
        "compile_s": None,
        "torch": "2.13.0",
        "cuda": None,
        "git_sha": "abc",
        "overhead_vs_bare": 1.02,
        "overhead_vs_bare_paired": 1.01,
        "bare_step_time_s": 1.0,
    }
    return {**base, **kw}


def test_table_lists_unmeasured_gpu_goals(tmp_path):
    results, md = tmp_path / "results.jsonl", tmp_path / "RESULTS.md"
    h100 = _record(
        model="gpt2-small",
        device="NVIDIA H100 80GB HBM3",
        seq_len=1024,
        compile=True,
        precision="bf16",
        tokens_per_s=530_000.0,
        tokens_per_s_per_device=530_000.0,
        mfu=0.46,
        compile_s=40.0,
        cuda="13.0",
        overhead_vs_bare=None,
    )
    results.write_text("".join(json.dumps(r) + "\n" for r in (_record(), h100)))
    md.write_text("# Benchmarks\n\n## Data pipeline throughput\n\nkept prose\n")
    write_table(results, md)
    write_table(results, md)  # idempotent: the block is replaced, not appended
    text = md.read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1 and "kept prose" in text
    block = text.split(BEGIN)[1].split(END)[0]
    rows = [line for line in block.splitlines() if line.startswith("| -")]
    assert len(rows) == 3 and all("unmeasured" in r for r in rows)  # 4 goals, 1 measured
    assert "| gpt2-small, seq 1024, compile on, 1 H100 | >= 520,000 tokens/s | 530,000" in block
    assert "| gpt2-small, seq 1024, compile off, 1 H100 | >= 520,000 tokens/s | unmeasured" in block
    assert "1.020 by median step, 1.010 paired (#1, latest) | met" in block
    assert "`llmtrain-bench experiment=smoke`" in block
    assert "unmeasured" in render([]) and "46.0%" in block


def test_report_reads_as_the_readme_shows_it():
    r = _record(
        world_size=2,
        batch_tokens=2048,
        steps=20,
        repeats=3,
        first_step_s=2.5,
        peak_mem_kind="cpu peak RSS, measured steps",
        overhead_vs_bare_mean=1.024,
        bare_step_time_p50_s=0.98,
        loss_framework=7.5,
        loss_bare=7.5,
    )
    text = report(r)
    assert text.splitlines()[0] == (
        "bench | tiny on cpu x2 (single), seq 128, 8 x 1 accum = 2,048 tokens/step, fp32, "
        "compile off"
    )
    assert "tokens/s    1,000 global, 1,000 per device" in text
    assert "mfu         n/a (no peak for device)" in text
    assert "p50 1000.0 ms, p90 1100.0 ms over 20 steps" in text
    assert "data wait   0.10% of the step" in text
    assert "vs bare     1.020x by median step" in text and "paired 1.010x" in text
    assert "compile  " not in text and "vs before" not in text

    after = _record(
        mfu=0.41,
        compile=True,
        compile_s=31.3,
        batch_tokens=2048,
        steps=8,
        repeats=3,
        first_step_s=40.0,
        peak_mem_kind="cuda max_memory_allocated, measured steps",
        versus=["trainer.loss_chunk=8192"],
        speedup_paired=1.081,
        before_tokens_per_s=925.0,
        peak_mem_ratio=0.62,
        before_peak_mem_gb=2.42,
        loss_before=7.5,
        loss_after=7.5,
    )
    del after["overhead_vs_bare"]
    text = report(after)
    assert "mfu         41.0%" in text
    assert "compile     31.3 s (first step minus a steady step)" in text
    assert "vs before   1.081x tokens/s paired with the run without trainer.loss_chunk=8192" in text
    assert "peak memory 0.62x (2.42 GiB)" in text and "vs bare" not in text
    assert "warning" not in text
    # The H100's compiled fused loss on torch 2.11: 1.085x, and no weight changed in 15 steps.
    after.update(loss_before=9.771272786458333, loss_after=11.003685506184896)
    assert "warning     the losses differ by 12.6%: the change alters what is trained" in report(
        after
    )


def test_cpu_goal_is_inconclusive_when_the_repeats_straddle_it():
    """Row 14 of results.jsonl: paired median 1.004, but its repeats run 0.896 to 1.187;
    'met' claimed more than the runs show."""
    r = _record(step_times_s=[1.187, 1.105, 0.896, 0.993], bare_step_times_s=[1.0] * 4,
                overhead_vs_bare=0.99, overhead_vs_bare_paired=1.049)  # fmt: skip
    block = render([r])
    assert "0.918-1.173 over 4 repeats" in block and "| inconclusive |" in block
    steady = _record(step_times_s=[1.01, 1.02], bare_step_times_s=[1.0, 1.0])
    assert "| met |" in render([steady])


def test_gpu_goals_count_only_the_named_model_on_one_device():
    """A row whose command changed the model's shape (model.n_layer=2 keeps the name
    gpt2-small) must not meet gpt2-small's goal; the measured cell names the dist mode."""
    base = dict(model="gpt2-small", device="NVIDIA H100 80GB HBM3", seq_len=1024,
                precision="bf16", compile=True, mfu=0.4, overhead_vs_bare=None)  # fmt: skip
    small = _record(**base, tokens_per_s=900_000.0, tokens_per_s_per_device=900_000.0,
                    command="llmtrain-bench model=gpt2-small model.n_layer=2")  # fmt: skip
    real = _record(**base, tokens_per_s=466_000.0, tokens_per_s_per_device=466_000.0,
                   dist="fsdp2", command="llmtrain-bench model=gpt2-small dist=fsdp2")  # fmt: skip
    block = render([small, real])
    assert "compile on, 1 H100 | >= 520,000 tokens/s | 466,000 (#2, fsdp2) | below" in block
    # A run found wrong after the fact (the compiled fused loss that trained nothing) stays in
    # the record, struck through, and counts for no goal.
    wrong = _record(**base, tokens_per_s=530_000.0, tokens_per_s_per_device=530_000.0,
                    command="llmtrain-bench model=gpt2-small",
                    invalid="all-zero gradients")  # fmt: skip
    block = render([small, real, wrong])
    assert "| ~~530,000~~ | ~~530,000~~ |" in block
    assert "**invalid:** all-zero gradients" in block
    assert "compile on, 1 H100 | >= 520,000 tokens/s | 466,000 (#2, fsdp2) | below" in block


def test_p90_is_the_nearest_rank_not_the_slowest_step():
    import argparse

    import torch

    from llmtrain.bench_record import build_record
    from llmtrain.config import load_config
    from llmtrain.startup import Plan

    cfg = load_config(["experiment=smoke", "trainer.max_steps=10"])
    times = [0.1 * i for i in range(1, 11)]  # 0.1 .. 1.0 s: p90 is 0.9, not the slowest 1.0
    run = dict(step_time_s=0.55, step_time_p50_s=0.55, times=times, first_step_s=1.0,
               data_wait_frac=0.0, peak_mem_gb=1.0)  # fmt: skip
    args = argparse.Namespace(warmup=1, steps=10, note=None)
    r = build_record(cfg, Plan.from_config(cfg, 1), [run], command="x",
                     device=torch.device("cpu"), precision="no", args=args)  # fmt: skip
    assert abs(r["step_time_p90_s"] - 0.9) < 1e-9
