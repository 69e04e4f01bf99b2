"""A benchmark record: built from the timed runs, printed, and tabulated.

:func:`build_record` makes the JSON object that ``llmtrain-bench`` appends to
``benchmarks/results.jsonl``; :func:`report` prints it; :func:`write_table` renders every
record into the Markdown table in ``benchmarks/RESULTS.md`` (``--table``). Only the text between
the two marker comments is rewritten; the rest of that file is prose. Goal rows nobody has
measured are listed as "unmeasured", never estimated.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import statistics
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from llmtrain.config import TrainConfig, world_size_from_env

BEGIN = "<!-- llmtrain-bench:begin -->"
END = "<!-- llmtrain-bench:end -->"
UNMEASURED = "unmeasured"

# (model, seq_len, compile, tokens/s per GPU goal) on one H100 in bf16 (issue 6).
GPU_GOALS: tuple[tuple[str, int, bool, int], ...] = (
    ("gpt2-small", 1024, False, 520_000),
    ("gpt2-small", 1024, True, 520_000),
    ("llama-1b", 2048, False, 60_000),
    ("llama-1b", 2048, True, 60_000),
)
GOAL_DEVICE = "H100"
CPU_OVERHEAD_GOAL = 1.05

COLUMNS = (
    "#",
    "date",
    "device",
    "model",
    "dist",
    "seq",
    "micro x accum",
    "compile",
    "prec",
    "tokens/s",
    "per device",
    "MFU",
    "step ms (p50 / p90)",
    "data wait",
    "peak GiB",
    "compile s",
    "compared with",
)


def build_record(
    cfg: TrainConfig,
    plan,
    framework: list[dict[str, Any]],
    *,
    command: str,
    device: torch.device,
    precision: str,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """The JSON record of one config's runs (the fields issue 6 names, and more)."""
    compiled = framework[0].get("compiled", {})  # bench.compile_counts over the first run
    from llmtrain.config import config_to_dict
    from llmtrain.memory import param_counts
    from llmtrain.metrics import (
        device_peak_tflops,
        flops_per_token,
        git_sha,
        mfu,
        package_version,
        source_sha,
    )

    world = world_size_from_env()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak_tflops = device_peak_tflops(name if device.type == "cuda" else None)
    fpt = flops_per_token(cfg.model, plan.seq_len)
    step_time = statistics.median(x["step_time_s"] for x in framework)
    times = sorted(t for x in framework for t in x["times"])  # every measured step, all runs
    tok_s = plan.tokens_per_step / step_time
    t = cfg.trainer
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "model": cfg.model.name,
        "dist": cfg.dist.mode,
        "world_size": world,
        "device": name,
        "seq_len": plan.seq_len,
        "micro_batch": plan.micro_batch,
        "grad_accum": plan.grad_accum,
        "batch_tokens": plan.tokens_per_step,
        "data": f"{cfg.data.name} ({cfg.data.source}, {cfg.data.num_workers} workers)",
        "compile": t.compile,
        "compile_mode": t.compile_mode,
        "attention": t.attention,
        "loss_chunk": t.loss_chunk,
        "set_to_none": t.set_to_none,
        "activation_checkpointing": t.activation_checkpointing,
        "precision": "fp32" if precision == "no" else precision,
        "fused_adamw": cfg.optim.fused if cfg.optim.fused is not None else device.type == "cuda",
        "warmup": args.warmup,
        "steps": args.steps,
        "repeats": len(framework),
        "tokens_per_s": tok_s,
        "tokens_per_s_per_device": tok_s / world,
        "flops_per_token": fpt,
        "peak_tflops": peak_tflops,
        "mfu": mfu(tok_s / world, fpt, peak_tflops),
        "step_time_s": step_time,
        "step_time_p50_s": statistics.median(times),
        "step_time_p90_s": times[math.ceil(0.9 * len(times)) - 1],  # nearest rank: 9th of 10
        "step_times_s": [x["step_time_s"] for x in framework],
        "first_step_s": framework[0]["first_step_s"],
        # The first step also compiles; what it costs beyond a steady step is compile time
        # (from the first run: later repeats may hit the compile caches). None when the run
        # compiled no graph: it ran code an earlier run in the process had compiled.
        "compile_s": (
            framework[0]["first_step_s"] - framework[0]["step_time_p50_s"]
            if t.compile and compiled.get("graphs", 1) > 0
            else None
        ),
        # Inductor's on-disk cache served every graph (no miss): a fraction of a cold compile.
        "compile_cache_warm": (
            compiled["cache_misses"] == 0 and compiled["cache_hits"] > 0
            if t.compile and compiled.get("graphs", 0) > 0
            else None
        ),
        "data_wait_frac": statistics.median(x["data_wait_frac"] for x in framework),
        "peak_mem_gb": max(x["peak_mem_gb"] for x in framework),
        "peak_mem_kind": ("cuda max_memory_allocated" if device.type == "cuda" else "cpu peak RSS")
        + ", measured steps",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_threads": torch.get_num_threads(),
        "host": platform.node(),
        "git_sha": git_sha(),
        "source_sha": source_sha(),  # llmtrain/ and conf/ as run: pins code without git
        "python": platform.python_version(),
        "accelerate": package_version("accelerate"),
        "deepspeed": package_version("deepspeed") if cfg.dist.mode.startswith("zero") else None,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "n_params": param_counts(cfg.model)[0],
        "config": config_to_dict(cfg),  # the resolved config: the model's shape included
        "note": args.note,
    }


def report(r: dict[str, Any]) -> str:
    mfu_s = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a (no peak for device)"
    lines = [
        f"bench | {r['model']} on {r['device']} x{r['world_size']} ({r['dist']}), "
        f"seq {r['seq_len']}, {r['micro_batch']} x {r['grad_accum']} accum = "
        f"{r['batch_tokens']:,} tokens/step, "
        f"{r['precision']}, compile {'on' if r['compile'] else 'off'}",
        f"  tokens/s    {r['tokens_per_s']:,.0f} global, "
        f"{r['tokens_per_s_per_device']:,.0f} per device",
        f"  mfu         {mfu_s}",
        f"  step time   mean {1e3 * r['step_time_s']:.1f} ms, p50 {1e3 * r['step_time_p50_s']:.1f}"
        f" ms, p90 {1e3 * r['step_time_p90_s']:.1f} ms over {r['steps']} steps "
        f"(mean: median of {r['repeats']} runs; p50/p90 over all their steps); first step "
        f"{r['first_step_s']:.2f} s",
        f"  data wait   {100 * r['data_wait_frac']:.2f}% of the step",
        f"  peak memory {r['peak_mem_gb']:.2f} GiB ({r['peak_mem_kind']})",
    ]
    if r["compile_s"] is not None:
        cache = {True: "; inductor cache warm", False: "; cold"}.get(
            r.get("compile_cache_warm"), ""
        )
        lines.append(
            f"  compile     {r['compile_s']:.1f} s (first step minus a steady step{cache})"
        )
    elif r["compile"]:
        lines.append("  compile     none: ran the code an earlier run in this process compiled")
    if "overhead_vs_bare" in r:
        lines.append(
            f"  vs bare     {r['overhead_vs_bare']:.3f}x by median step: framework "
            f"{1e3 * r['step_time_p50_s']:.1f} ms, bare loop {1e3 * r['bare_step_time_p50_s']:.1f}"
            f" ms; by mean step {r['overhead_vs_bare_mean']:.3f}x ({1e3 * r['step_time_s']:.1f} "
            f"vs {1e3 * r['bare_step_time_s']:.1f} ms); paired {r['overhead_vs_bare_paired']:.3f}x "
            f"(median over repeats of framework / bare run next to it{_interval_text(r)}); losses "
            f"{r['loss_framework']} vs {r['loss_bare']}"
        )
    if "versus" in r:
        lines.append(
            f"  vs before   {r['speedup_paired']:.3f}x tokens/s paired with the run without "
            f"{' '.join(r['versus'])} ({r['before_tokens_per_s']:,.0f} tokens/s); peak memory "
            f"{r['peak_mem_ratio']:.2f}x ({r['before_peak_mem_gb']:.2f} GiB); losses "
            f"{r['loss_before']} vs {r['loss_after']}"
        )
        if (gap := loss_gap(r["loss_before"], r["loss_after"])) is not None and gap > 0.01:
            # A compiled fused loss that trained nothing once showed as 1.085x here.
            lines.append(
                f"  warning     the losses differ by {100 * gap:.1f}%: the change alters what is "
                "trained (a model change), or one run does not train; the ratio compares "
                "different work"
            )
    return "\n".join(lines)


def loss_gap(before: float | None, after: float | None) -> float | None:
    """|after - before| / |before|: the mean training losses of a --versus pair, which see
    the same batches; None where a loss is missing."""
    if before is None or after is None or before == 0:
        return None
    return abs(after - before) / abs(before)


def read_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _num(v: float | None, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def _row(i: int, r: dict[str, Any]) -> list[str]:
    world = r.get("world_size", 1)
    return [
        str(i),
        r["date"][:10],
        r["device"] + (f" x{world}" if world > 1 else ""),
        r["model"],
        r["dist"],
        str(r["seq_len"]),
        f"{r['micro_batch']} x {r['grad_accum']}",
        "on" if r["compile"] else "off",
        r["precision"],
        _struck(f"{r['tokens_per_s']:,.0f}", r),
        _struck(f"{r['tokens_per_s_per_device']:,.0f}", r),
        "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
        f"{1e3 * r['step_time_s']:.1f} ({1e3 * r['step_time_p50_s']:.1f} / "
        f"{1e3 * r['step_time_p90_s']:.1f})",
        f"{100 * r['data_wait_frac']:.2f}%",
        f"{r['peak_mem_gb']:.2f}",
        _num(r.get("compile_s"), ".1f"),
        _compared(r),
    ]


def _struck(cell: str, r: dict[str, Any]) -> str:
    return f"~~{cell}~~" if r.get("invalid") else cell


def _compared(r: dict[str, Any]) -> str:
    """Why the record does not count (``invalid``, set by hand after the fact), then the bare
    loop's overhead ratio, or the speedup over the run without --versus."""
    if r.get("invalid"):
        return f"**invalid:** {r['invalid']}; " + _compared({**r, "invalid": None})
    if "versus" in r:
        return (
            f"without `{' '.join(r['versus'])}`: {r['speedup_paired']:.3f}x tokens/s, "
            f"{r['peak_mem_ratio']:.2f}x peak memory (paired)"
        )
    if "before_of" in r:
        return f"the next row with `{' '.join(r['before_of'])}` added"
    if r.get("overhead_vs_bare") is None:
        return ""
    return (
        f"bare loop: {r['overhead_vs_bare']:.3f}x, paired {_paired(r):.3f}x "
        f"(bare p50 {1e3 * _bare_p50(r):.1f} ms{_interval_text(r)})"
    )


def paired_interval(step_times: list[float], bare_step_times: list[float]) -> list[float]:
    """[low, high]: the mean per-repeat framework / bare ratio, +- two standard errors (about
    95%). The goal is read against it: a single ratio to three decimals hides how much the
    repeats disagree (on a shared 2-core VM, single repeats ranged 0.85 to 1.11)."""
    ratios = [f / b for f, b in zip(step_times, bare_step_times, strict=True)]
    mean = statistics.fmean(ratios)
    half = 2 * statistics.stdev(ratios) / len(ratios) ** 0.5 if len(ratios) > 1 else 0.0
    return [mean - half, mean + half]


def _paired_interval(r: dict[str, Any]) -> list[float] | None:
    """The record's interval, from its per-repeat times (older records have them too); None
    with a single repeat, which has no spread to show."""
    times, bare = r.get("step_times_s") or [], r.get("bare_step_times_s") or []
    if len(times) < 2 or len(times) != len(bare):
        return None
    return paired_interval(times, bare)


def _interval_text(r: dict[str, Any]) -> str:
    iv = _paired_interval(r)
    n = len(r.get("step_times_s") or [])
    return f"; {iv[0]:.3f}-{iv[1]:.3f} over {n} repeats, mean +- 2 SE" if iv else ""


def paired_ratio(step_times: list[float], bare_step_times: list[float]) -> float:
    """Median over repeats of framework / bare mean step time; the two runs of a repeat are
    taken back to back, so a drift in machine speed between repeats cancels."""
    return statistics.median(f / b for f, b in zip(step_times, bare_step_times, strict=True))


def _paired(r: dict[str, Any]) -> float:
    """The recorded paired ratio; records older than the field have the per-run times."""
    if "overhead_vs_bare_paired" in r:
        return r["overhead_vs_bare_paired"]
    return paired_ratio(r["step_times_s"], r["bare_step_times_s"])


def _bare_p50(r: dict[str, Any]) -> float:
    return r.get("bare_step_time_p50_s", r["bare_step_time_s"])


def _model_overrides(r: dict[str, Any]) -> list[str]:
    """The model.* overrides a record ran with, from its command (a --versus value counts for
    the record with the change only): a named model with its shape changed is not that model."""
    try:
        argv = shlex.split(r["command"])
    except ValueError:
        return ["(unparsed command)"]
    # Values of --versus and --note are not this record's overrides.
    values = {i + 1 for i, a in enumerate(argv) if a in ("--versus", "--note")}
    mine = [a for i, a in enumerate(argv) if i not in values and a.startswith("model.")]
    return mine + [v for v in r.get("versus", []) if v.startswith("model.")]


def _goal_match(r: dict[str, Any], model: str, seq: int, compile_: bool) -> bool:
    """One GPU of the goal's kind, bf16, the named model unchanged, a valid run."""
    return (
        not r.get("invalid")
        and GOAL_DEVICE in r["device"]
        and r.get("world_size", 1) == 1
        and r["precision"] == "bf16"
        and r["model"] == model
        and not _model_overrides(r)
        and r["seq_len"] == seq
        and bool(r["compile"]) == compile_
    )


def render(records: list[dict[str, Any]]) -> str:
    """The generated block: every record, then the goals with their status."""
    out = [
        BEGIN,
        "<!-- generated by `python -m llmtrain.bench --table` from benchmarks/results.jsonl -->",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---:" if c in ("tokens/s", "per device") else "---" for c in COLUMNS) + "|",
    ]
    for i, r in enumerate(records, 1):
        out.append("| " + " | ".join(_row(i, r)) + " |")
    for model, seq, compile_, _ in GPU_GOALS:
        if not any(_goal_match(r, model, seq, compile_) for r in records):
            cells = ["-", "-", GOAL_DEVICE, model, "single", str(seq), "-"]
            cells += ["on" if compile_ else "off", "bf16"]
            cells += [UNMEASURED] * (len(COLUMNS) - len(cells))
            out.append("| " + " | ".join(cells) + " |")

    out += [
        "",
        "Goals (issue 6):",
        "",
        "| goal | target | measured | status |",
        "|---|---|---|---|",
    ]
    for model, seq, compile_, target in GPU_GOALS:
        hits = [(i, r) for i, r in enumerate(records, 1) if _goal_match(r, model, seq, compile_)]
        what = f"{model}, seq {seq}, compile {'on' if compile_ else 'off'}, 1 {GOAL_DEVICE}"
        if not hits:
            out.append(f"| {what} | >= {target:,} tokens/s | {UNMEASURED} | {UNMEASURED} |")
            continue
        i, best = max(hits, key=lambda h: h[1]["tokens_per_s_per_device"])
        got = best["tokens_per_s_per_device"]
        status = "met" if got >= target else "below"
        got_s = f"{got:,.0f} (#{i}, {best['dist']})"
        out.append(f"| {what} | >= {target:,} tokens/s | {got_s} | {status} |")
    cpu = [(i, r) for i, r in enumerate(records, 1) if r["device"] == "cpu"]
    # dist=single only: under ZeRO the framework keeps other weights than the bare loop.
    cpu = [
        (i, r) for i, r in cpu if r.get("overhead_vs_bare") is not None and r["dist"] == "single"
    ]
    what = "CPU: framework / bare-loop step time"
    if cpu:
        i, r = cpu[-1]
        pooled, paired = r["overhead_vs_bare"], _paired(r)
        lo, hi = _paired_interval(r) or (paired, paired)
        # Met when the whole interval is within the goal, above when it is all past it; else
        # the repeats disagree by more than the goal asks to resolve.
        if hi <= CPU_OVERHEAD_GOAL:
            status = "met"
        elif lo > CPU_OVERHEAD_GOAL:
            status = "above"
        else:
            status = "inconclusive"
        got = f"{pooled:.3f} by median step, {paired:.3f} paired{_interval_text(r)} (#{i}, latest)"
        out.append(f"| {what} | <= {CPU_OVERHEAD_GOAL} | {got} | {status} |")
    else:
        out.append(f"| {what} | <= {CPU_OVERHEAD_GOAL} | {UNMEASURED} | {UNMEASURED} |")

    if records:
        out += ["", "Commands:", ""]
        for i, r in enumerate(records, 1):
            extra = f"torch {r['torch']}" + (f", CUDA {r['cuda']}" if r.get("cuda") else "")
            sha = r.get("git_sha", "unknown")
            extra += f", git {sha[:10]}" + (" (edited)" if sha.endswith("-dirty") else "")
            if r.get("note") and "--note" not in r["command"]:
                extra += f"; {r['note']}"
            out.append(f"{i}. `{r['command']}` ({extra})")
    out.append(END)
    return "\n".join(out)


def write_table(results: Path, markdown: Path) -> None:
    """Replace the block between the markers (or put it first when there is none yet)."""
    block = render(read_records(results))
    text = markdown.read_text() if markdown.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        title = "## Training throughput (llmtrain-bench)\n\n"
        text = title + block + "\n" + ("\n" + text.lstrip("\n") if text else "")
    markdown.write_text(text)
