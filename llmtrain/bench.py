"""``llmtrain-bench``: tokens/s, MFU, step time, data wait and peak memory of any config.

The framework is timed through its real loop (:func:`llmtrain.train.train`, with a step hook
that syncs the device and reads the clock at each step boundary); ``--baseline`` also times a
bare PyTorch loop over the same model, seed, batches (already on the device), optimizer,
precision, compile, accumulation and clipping, interleaved with it in the same process.

    llmtrain-bench --steps 30 --warmup 5 --baseline --repeats 3 experiment=smoke
    llmtrain-bench model=gpt2-small data=shards trainer.batch_tokens=524288 \\
        trainer.micro_batch_size=16 trainer.compile=true
    python -m llmtrain.bench --table          # benchmarks/results.jsonl -> RESULTS.md

Every measured run appends one JSON object to ``benchmarks/results.jsonl``. ``data=shards``
without ``data.path`` uses the shipped sample written once as llm.c shards (no ``datasets``).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import hashlib
import json
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from llmtrain.bench_record import build_record, paired_interval, paired_ratio, report
from llmtrain.config import (
    CONF_DIR,
    PACKAGE_DIR,
    ConfigError,
    TrainConfig,
    cache_root,
    load_config,
    rank_from_env,
    validate,
    world_size_from_env,
)
from llmtrain.data import DataError

# The record lives in the repo's benchmarks/; installed from a wheel, under the current dir.
REPO = CONF_DIR.parent if CONF_DIR.parent != PACKAGE_DIR else Path.cwd()
RESULTS = REPO / "benchmarks" / "results.jsonl"
MARKDOWN = REPO / "benchmarks" / "RESULTS.md"
NEVER = 10**9  # an interval past any bench horizon: no log, eval or checkpoint in the window


def cache_dir() -> Path:
    return cache_root() / "sample-shards"


def make_sample_shards(out: Path) -> Path:
    """The shipped FineWeb sample as llm.c shards (train and val), read with pyarrow only.

    Shards already in ``out`` are reused only if ``out/SOURCE`` holds the digest of this
    install's sample and tokenizer; another llmtrain's sample rewrites them.
    """
    import pyarrow.parquet as pq

    from llmtrain.data import SAMPLE_DIR
    from llmtrain.shards import write_shard
    from llmtrain.tokenizer import get_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    parquets = sorted(SAMPLE_DIR.glob("data/*/*.parquet"))
    digest = hashlib.sha256(b"tokenizer gpt2\n")
    for f in parquets:
        digest.update(f"{f.relative_to(SAMPLE_DIR).as_posix()}\n".encode() + f.read_bytes())
    stamp, source = out / "SOURCE", f"{digest.hexdigest()}\n"
    current = stamp.exists() and stamp.read_text() == source
    tok = get_tokenizer("gpt2")
    for split, sub in (("train", "train"), ("val", "validation")):
        path = out / f"sample_{split}_000.bin"
        if current and path.exists():
            continue
        texts = [
            t
            for f in parquets
            if f.parent.name == sub
            for t in pq.read_table(f).column("text").to_pylist()
        ]
        ids = [i for doc in tok.encode_batch(texts) for i in (*doc, tok.eot_id)]
        write_shard(path, ids, tok.vocab_size)
    if not current:
        tmp = out / f"SOURCE.{os.getpid()}.tmp"
        tmp.write_text(source)
        os.replace(tmp, stamp)
    return out


def bench_config(overrides: list[str], steps: int, warmup: int) -> TrainConfig:
    """The config as the overrides compose it, run for warmup + steps steps with logging,
    eval, checkpoints and samples out of the measured window."""
    overrides = list(overrides)
    wants_shards = any(o in ("data=shards", "data.source=shards") for o in overrides)
    if wants_shards and not any(o.startswith("data.path=") for o in overrides):
        overrides.append(f"data.path={make_sample_shards(cache_dir())}")
    # The horizon is the bench's (set below); a placeholder first so validation passes.
    cfg = load_config(["trainer.max_steps=1", *overrides])
    cfg.trainer = dataclasses.replace(
        cfg.trainer,
        max_steps=warmup + steps,
        max_tokens=None,
        log_every=NEVER,  # the loop still logs (one record) and evals after its last step
        eval_every=NEVER,
        eval_batches=1,
        eval_at_start=False,
        ckpt_every=NEVER,
        sample_every=0,
        hellaswag_every=0,
        resume="none",
    )
    cfg.logger = dataclasses.replace(cfg.logger, name="none")
    return validate(cfg, world_size=world_size_from_env())


class StepClock:
    """The step hook: device-synced wall time and cumulative data wait after every step, and
    the peak memory of the measured steps (reset at the end of warm-up, so neither setup,
    compilation nor the run's final evaluation counts)."""

    def __init__(self, device: torch.device, warmup: int, total: int):
        self.device, self.warmup, self.total = device, warmup, total
        self.start: float | None = None
        self.ends: list[float] = []
        self.waits: list[float] = []
        self.reset_s = 0.0
        self.peak_gb = 0.0

    def __call__(self, state, throughput) -> None:
        from llmtrain.metrics import peak_memory_gb

        if self.device.type == "cuda":
            torch.cuda.synchronize()
        if self.start is None:  # the loop's Throughput is not reset before the first step
            self.start = throughput.start
        self.ends.append(time.perf_counter())
        self.waits.append(throughput.data_wait)
        if len(self.ends) == self.warmup:
            reset_peak(self.device, release_cache=False)
            self.reset_s = time.perf_counter() - self.ends[-1]
            self.ends[-1] += self.reset_s  # the reset belongs to no step
        if len(self.ends) == self.total:  # before the run's final evaluation
            self.peak_gb = peak_memory_gb(self.device)

    def summary(self) -> dict[str, Any]:
        times = [b - a for a, b in zip([self.start, *self.ends], self.ends, strict=False)]
        times[self.warmup - 1] -= self.reset_s
        measured = times[self.warmup :]
        window = self.ends[-1] - self.ends[self.warmup - 1]
        return {
            "window_s": window,
            "step_time_s": window / len(measured),
            "step_time_p50_s": statistics.median(measured),
            "first_step_s": times[0],
            "data_wait_frac": (self.waits[-1] - self.waits[self.warmup - 1]) / window,
            "times": measured,
            "peak_mem_gb": self.peak_gb,
        }


def reset_peak(device: torch.device, release_cache: bool = True) -> None:
    """Start a new peak-memory window. ``release_cache=False`` inside a timed loop: emptying
    CUDA's cache there would make the next step pay for cudaMalloc again."""
    if release_cache:
        gc.collect()
    if device.type == "cuda":
        if release_cache:
            torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        # Linux with glibc: hand freed heap back to the OS, then reset the peak RSS (VmHWM,
        # "5") to what is live, so the window reports its own peak.
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")


def run_framework(cfg: TrainConfig, warmup: int, plan, device) -> dict[str, Any]:
    """One timed run of the real loop; its mean training loss comes from its own log record."""
    from llmtrain.train import train

    reset_peak(device)
    clock = StepClock(device, warmup, plan.max_steps)
    before = compile_counts()
    with tempfile.TemporaryDirectory(prefix="llmtrain-bench-") as run_dir:
        train(cfg, Path(run_dir), step_hook=clock, final_save=False)
        metrics = Path(run_dir) / "metrics.jsonl"  # written by the main process only
        lines = metrics.read_text().splitlines() if metrics.exists() else []
    losses = [r["loss"] for r in map(json.loads, lines) if "loss" in r]
    compiled = {k: v - before[k] for k, v in compile_counts().items()}
    return {
        **clock.summary(),
        "loss": losses[-1] if losses else None,
        "compiled": compiled,
    }


def compile_counts() -> dict[str, int]:
    """Graphs dynamo compiled in this process so far, and inductor's on-disk cache hits and
    misses: a run that compiled no graph reused code compiled in memory by an earlier run (its
    first step is no compile time), and one with no cache miss compiled from a warm cache."""
    from torch._dynamo.utils import counters

    return {
        "graphs": counters["stats"]["unique_graphs"],
        "cache_hits": counters["inductor"]["fxgraph_cache_hit"],
        "cache_misses": counters["inductor"]["fxgraph_cache_miss"],
    }


def sample_batches(cfg: TrainConfig, plan, total_steps: int, max_bytes: int = 2**30):
    """The framework's first micro-batches in its order (same loader, seed, rank), on the CPU;
    at most ``max_bytes``, cycled when the run needs more (then the loss check is skipped)."""
    from llmtrain.data import build_dataloader
    from llmtrain.tokenizer import get_tokenizer

    need = total_steps * plan.grad_accum
    per_batch = 2 * 8 * plan.micro_batch * plan.seq_len
    n = min(need, max(plan.grad_accum, max_bytes // per_batch))
    tokenizer = get_tokenizer(cfg.data.tokenizer)
    loader = build_dataloader(
        cfg.data, tokenizer, split="train", batch_size=plan.micro_batch, seed=cfg.trainer.seed
    )
    out = []
    for x, y in loader:
        out.append((x.contiguous(), y.contiguous()))
        if len(out) == n:
            break
    return out, n == need


def run_bare(cfg: TrainConfig, cpu_batches, warmup: int, plan, device) -> dict[str, Any]:
    """A bare PyTorch loop: what the framework's step computes, with nothing around it."""
    from llmtrain.dist import resolve_precision
    from llmtrain.model import attention_kernel
    from llmtrain.optim import build_optimizer, lr_at, set_lr
    from llmtrain.run import build_model, compile_model

    reset_peak(device)
    batches = [(x.to(device), y.to(device)) for x, y in cpu_batches]
    torch.manual_seed(cfg.trainer.seed)
    model = build_model(cfg).to(device)
    optimizer = build_optimizer(model, cfg.optim, device.type)
    model = compile_model(model, cfg.trainer)
    precision = resolve_precision(cfg.trainer.precision, device.type)
    dtype = torch.bfloat16 if precision == "bf16" else None
    accum, clip, total = plan.grad_accum, cfg.optim.grad_clip or math.inf, plan.max_steps
    loss_sum = torch.zeros((), device=device)
    clock, no_wait = StepClock(device, warmup, plan.max_steps), _NoWait()
    model.train()
    with attention_kernel(cfg.trainer.attention):
        for step in range(total):
            set_lr(optimizer, lr_at(step, cfg.optim, total))
            for i in range(accum):
                x, y = batches[(step * accum + i) % len(batches)]
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    _, loss = model(x, y, return_logits=False)
                (loss / accum).backward()
                loss_sum += loss.detach()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=cfg.trainer.set_to_none)
            clock(None, no_wait)
    loss = loss_sum.item() / (accum * total)
    summary = clock.summary()
    if device.type == "cuda":  # the framework holds one batch at a time, not all of them
        held = sum(x.nbytes + y.nbytes for x, y in batches) - batches[0][0].nbytes * 2
        summary["peak_mem_gb"] -= held / 2**30
    del model, optimizer, batches
    return {**summary, "loss": loss}


class _NoWait:
    """The bare loop's stand-in for the loop's Throughput: batches are already on the device."""

    def __init__(self) -> None:
        self.start, self.data_wait = time.perf_counter(), 0.0


def command_line(argv: list[str] | None) -> str:
    if argv is not None or not sys.argv[0].endswith(".py"):
        prog = "llmtrain-bench"
    else:
        prog = "python -m llmtrain.bench"
    if "LOCAL_RANK" in os.environ:  # under accelerate launch / torchrun: its command line
        if launcher := launcher_command():
            return launcher
        prog = f"<launcher, WORLD_SIZE={os.environ.get('WORLD_SIZE', '1')}> {prog}"
    return " ".join([prog, shlex.join(sys.argv[1:] if argv is None else argv)]).strip()


def launcher_command(pid: int | None = None) -> str | None:
    """The launcher's command line (``accelerate launch --config_file ... -m llmtrain.bench
    ...``), read from the parent process (Linux), with the interpreter's path dropped."""
    try:
        words = Path(f"/proc/{pid or os.getppid()}/cmdline").read_bytes().decode().split("\0")
    except (OSError, UnicodeDecodeError):
        return None
    words = [w for w in words if w]
    if not any("llmtrain" in w for w in words):
        return None
    if Path(words[0]).name.startswith("python"):
        words = ["python", *words[1:]] if words[1:2] == ["-m"] else words[1:]
    return shlex.join([Path(words[0]).name, *words[1:]])


def measure(args: argparse.Namespace, argv: list[str] | None) -> list[dict[str, Any]]:
    """Run the loops, alternating; one record, or two with ``--versus`` (before, after)."""
    from llmtrain.dist import resolve_device, resolve_precision
    from llmtrain.startup import Plan

    if min(args.warmup, args.steps, args.repeats) < 1:
        raise ConfigError("--warmup, --steps and --repeats must each be at least 1")
    cfg = bench_config(args.overrides, args.steps, args.warmup)
    after_cfg = (
        bench_config([*args.overrides, *args.versus], args.steps, args.warmup)
        if args.versus
        else cfg
    )
    world = world_size_from_env()
    plan, after_plan = Plan.from_config(cfg, world), Plan.from_config(after_cfg, world)
    device = torch.device(resolve_device(cfg.trainer.device))
    precision = resolve_precision(cfg.trainer.precision, device.type)
    if args.baseline and (world > 1 or precision == "fp16" or cfg.dist.mode != "single"):
        # ZeRO keeps bf16 weights (and zero3-offload steps with DeepSpeed's CPU Adam): the
        # bare loop would time other work, and the ratio would read as overhead.
        raise ConfigError(
            "--baseline: the bare loop is one process of dist=single in fp32 or bf16; run it "
            "with one process, dist=single and trainer.precision=bf16 or fp32"
        )
    # Under a launcher each run's end (Accelerate's end_training) destroys the process group
    # the launcher made, and a second run in the process cannot start another.
    timed = args.repeats * (1 + bool(args.versus))
    if "RANK" in os.environ and (world > 1 or cfg.dist.mode != "single") and timed > 1:
        raise ConfigError(
            f"under a launcher each process times one run: use --repeats 1 and no --versus "
            f"(asked for {timed} runs), and launch again for each further run"
        )
    cpu_batches, same_batches = (
        sample_batches(cfg, plan, plan.max_steps) if args.baseline else ([], False)
    )
    loops = ["framework"] + ["bare"] * args.baseline + ["after"] * bool(args.versus)
    runs: dict[str, list[dict[str, Any]]] = {which: [] for which in loops}
    for r in range(args.repeats):
        # Rotate which loop goes first, so a drift in machine load hits every loop alike.
        for which in loops[r % len(loops) :] + loops[: r % len(loops)]:
            if which == "framework":
                runs[which].append(run_framework(cfg, args.warmup, plan, device))
            elif which == "bare":
                runs[which].append(run_bare(cfg, cpu_batches, args.warmup, plan, device))
            else:
                runs[which].append(run_framework(after_cfg, args.warmup, after_plan, device))
    common = dict(
        command=command_line(argv),
        device=device,
        precision=precision,
        args=args,
    )
    record = build_record(cfg, plan, runs["framework"], **common)
    if args.baseline:
        bare = runs["bare"]
        bare_time = statistics.median(x["step_time_s"] for x in bare)
        bare_p50 = statistics.median(t for x in bare for t in x["times"])
        record.update(
            bare_step_time_s=bare_time,
            bare_step_time_p50_s=bare_p50,
            bare_tokens_per_s=plan.tokens_per_step / bare_time,
            bare_peak_mem_gb=max(x["peak_mem_gb"] for x in bare),
            # The median step of every run pooled: robust to bursts of load on a shared host.
            overhead_vs_bare=record["step_time_p50_s"] / bare_p50,
            overhead_vs_bare_mean=record["step_time_s"] / bare_time,
            # Each framework run against the bare run taken next to it: cancels slow drift.
            overhead_vs_bare_paired=paired_ratio(
                record["step_times_s"], [x["step_time_s"] for x in bare]
            ),
            # The noise the goal is read against: mean +- 2 standard errors of those ratios.
            overhead_vs_bare_paired_interval=paired_interval(
                record["step_times_s"], [x["step_time_s"] for x in bare]
            ),
            bare_step_times_s=[x["step_time_s"] for x in bare],
            # Same batches in the same order: the mean losses agree (to fp rounding).
            loss_framework=runs["framework"][0]["loss"] if same_batches else None,
            loss_bare=bare[0]["loss"] if same_batches else None,
        )
    if not args.versus:
        return [record]
    record["before_of"] = list(args.versus)
    after = build_record(after_cfg, after_plan, runs["after"], **common)
    per_token = [t / plan.tokens_per_step for t in record["step_times_s"]]
    after_per_token = [t / after_plan.tokens_per_step for t in after["step_times_s"]]
    after.update(
        versus=list(args.versus),
        before_tokens_per_s=record["tokens_per_s"],
        before_peak_mem_gb=record["peak_mem_gb"],
        # before / after time per token, each pair of runs taken back to back: > 1 is faster.
        speedup_paired=paired_ratio(per_token, after_per_token),
        peak_mem_ratio=after["peak_mem_gb"] / record["peak_mem_gb"],
        loss_before=runs["framework"][0]["loss"],
        loss_after=runs["after"][0]["loss"],
    )
    return [record, after]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="llmtrain-bench", description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="measured steps, default 20")
    ap.add_argument("--warmup", type=int, default=3, help="warm-up steps, not measured; default 3")
    ap.add_argument("--baseline", action="store_true", help="also time the bare PyTorch loop")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each loop; default 1")
    ap.add_argument(
        "--versus",
        action="append",
        default=[],
        metavar="OVERRIDE",
        help="also time the run with this override added (repeatable), alternating with the "
        "run without it; its record holds the paired speedup and memory ratio",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=RESULTS,
        help="JSON-lines file to append to (default: benchmarks/results.jsonl of this checkout)",
    )
    ap.add_argument("--no-record", action="store_true", help="print only, append nothing")
    ap.add_argument("--note", default=None, help="free text stored in the record")
    ap.add_argument("--make-shards", type=Path, metavar="DIR", help="write sample shards, exit")
    ap.add_argument("--table", action="store_true", help="render --out into --markdown, exit")
    ap.add_argument(
        "--markdown",
        type=Path,
        default=MARKDOWN,
        help="the page --table writes (default: benchmarks/RESULTS.md of this checkout)",
    )
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, as for llmtrain-train")
    args = ap.parse_intermixed_args(argv)
    if args.make_shards:
        print(f"sample shards in {make_sample_shards(args.make_shards)}")
        return
    if args.table:
        from llmtrain.bench_record import write_table

        write_table(args.out, args.markdown)
        print(f"wrote {args.markdown} from {args.out}")
        return
    try:
        records = measure(args, argv)
    except (ConfigError, DataError) as e:
        print(f"llmtrain-bench: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    if rank_from_env() != 0:
        return
    for record in records:
        print(report(record), flush=True)
    if not args.no_record:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a", encoding="utf-8") as fh:
            fh.writelines(json.dumps(record) + "\n" for record in records)
        print(f"  recorded in {args.out}", flush=True)


if __name__ == "__main__":
    main()
