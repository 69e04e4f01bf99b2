"""How long the training loop waits for each micro-batch when the host idles between them.

python benchmarks/batch_latency.py [--micro 64] [--seq 1024] [--gap-ms 8] [--batches 300]

On a GPU the host queues a micro-step in a few milliseconds and then idles while the device
works, so every ``next(loader)`` starts on a host that has been asleep. That is what this
script imitates: it sleeps ``--gap-ms`` (a GPU micro-step's time) before each batch and times
the ``next()`` alone, as ``llmtrain.train.batches`` times it. The data is the shipped sample as
llm.c shards (``data=shards``), the source the H100 rows use. Figures: median, p90, p99 and
mean milliseconds per batch, and the data-wait fraction they imply, mean / (mean + gap).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from llmtrain.bench import cache_dir, make_sample_shards
from llmtrain.config import DataConfig
from llmtrain.data import build_dataloader
from llmtrain.tokenizer import get_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--micro", type=int, default=64, help="micro-batch size (windows)")
    ap.add_argument("--seq", type=int, default=1024, help="context length")
    ap.add_argument("--gap-ms", type=float, default=8.0, help="host idle time before each batch")
    ap.add_argument("--batches", type=int, default=300)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = replace(
        DataConfig(), source="shards", path=str(make_sample_shards(cache_dir())), seq_len=args.seq
    )
    loader = build_dataloader(cfg, get_tokenizer("gpt2"), split="train", batch_size=args.micro)
    it = iter(loader)
    for _ in range(10):  # opening the shards and first touches are not the steady state
        next(it)
    times = []
    for _ in range(args.batches):
        time.sleep(args.gap_ms / 1e3)
        start = time.perf_counter()
        next(it)
        times.append(1e3 * (time.perf_counter() - start))
    times.sort()
    mean = statistics.fmean(times)
    wait = 100 * mean / (mean + args.gap_ms)
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]  # noqa: E731
    print(
        f"micro {args.micro} x {args.seq}, gap {args.gap_ms:g} ms, torch threads "
        f"{torch.get_num_threads()}: next() median {pick(0.5):.3f} ms, p90 {pick(0.9):.3f}, "
        f"p99 {pick(0.99):.3f}, mean {mean:.3f} -> data wait {wait:.2f}%"
    )


if __name__ == "__main__":
    main()
