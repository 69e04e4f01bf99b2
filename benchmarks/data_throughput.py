"""Packed tokens/s of the data pipeline on the shipped sample vs raw tiktoken (not a test).

OMP_NUM_THREADS=1 python benchmarks/data_throughput.py [--workers 2] [--passes 2] [--rounds 5]

Each figure is the median of ``--rounds`` timings: a single pass of raw tiktoken over the sample
takes about 0.2 s, and on a shared or throttled host one timing varies by +-30%.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import datasets
import pyarrow.parquet as pq

from llmtrain.config import DataConfig
from llmtrain.data import SAMPLE_DIR, build_dataloader
from llmtrain.tokenizer import get_tokenizer

datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    tok = get_tokenizer("gpt2")
    texts = [
        t
        for f in sorted((SAMPLE_DIR / "data" / "train").glob("*.parquet"))
        for t in pq.read_table(f)["text"].to_pylist()
    ]
    raws = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        n = sum(len(ids) + 1 for ids in tok.encode_batch(texts, num_threads=1))
        raws.append(n / (time.perf_counter() - start))
    raw = statistics.median(raws)
    print(f"raw tiktoken encode_ordinary_batch, 1 thread: {raw:,.0f} tokens/s ({n:,} tokens)")
    for workers in (0, args.workers):
        cfg = replace(DataConfig(), seq_len=1024, num_workers=workers, pin_memory=False)
        loader = build_dataloader(cfg, tok, split="train", batch_size=8)
        batches = args.passes * n // (8 * 1024)
        it = iter(loader)
        next(it)  # start-up (load_dataset, worker processes) is not throughput
        rates = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            for _ in range(batches):
                next(it)
            rates.append(batches * 8 * 1024 / (time.perf_counter() - start))
        rate = statistics.median(rates)
        label = "per core (num_workers=0)" if workers == 0 else f"num_workers={workers}"
        print(f"pipeline {label}: {rate:,.0f} tokens/s = {rate / raw:.0%} of raw")


if __name__ == "__main__":
    main()
