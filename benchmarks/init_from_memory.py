"""Host memory each rank takes to load trainer.init_from, beside its built model (CPU, gloo).

python benchmarks/init_from_memory.py [--model gpt2-small] [--dist fsdp2] [--world 2] [--repeats 2]

Trains one step of ``--model`` on ``--world`` CPU processes in ``--dist`` mode (the checkpoint's
layout: fsdp2 writes DCP shards, zero1/2/3 DeepSpeed's, ddp one model.safetensors), then, in
fresh processes, builds the model and loads that checkpoint two ways, alternating: ``rank0``
(llmtrain.init_weights.load_weights: rank 0 reads; since f9d93d0 the others get the weights
from ``accelerator.prepare()``, which this script does not call) and ``every`` (each rank reads
the checkpoint itself, as llmtrain did before). Prints each rank's
peak unique memory (USS, sampled every 20 ms) over what it held with the model built, and the
seconds the load took.
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _overrides(args: argparse.Namespace) -> list[str]:
    return [
        "experiment=smoke",
        f"model={args.model}",
        "data.seq_len=64",
        "trainer.batch_tokens=256",
        "trainer.micro_batch_size=2",
    ]


def _rank(rank: int, world: int, port: int, job: str, args: argparse.Namespace, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")  # fmt: skip
    torch.set_num_threads(1)
    from llmtrain.config import load_config

    ckpt = Path(out) / "source"
    if job == "source":
        from llmtrain.train import train

        extra = ["trainer.max_steps=1", f"dist={args.dist}"]
        train(load_config([*_overrides(args), *extra], world_size=world), ckpt)
        return
    from llmtrain.init_weights import _read_into, load_weights
    from llmtrain.run import build_model

    torch.distributed.init_process_group("gloo")
    cfg = load_config([*_overrides(args), f"trainer.init_from={ckpt}"], world_size=world)
    model = build_model(cfg)
    proc = psutil.Process()
    base = proc.memory_full_info().uss
    peak, done = [base], threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak.append(proc.memory_full_info().uss)

    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.perf_counter()
    if job == "rank0":
        load_weights(model, cfg, ckpt, torch.device("cpu"))
    else:
        _read_into(model, cfg, ckpt)
    took = time.perf_counter() - start
    torch.distributed.barrier()
    done.set()
    sampler.join()
    print(f"{job:6s} rank {rank}: peak USS +{(max(peak) - base) / 2**20:7.1f} MiB over the "
          f"built model, load {took:.2f} s", flush=True)  # fmt: skip
    torch.distributed.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2-small")
    parser.add_argument("--dist", default="fsdp2")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    with tempfile.TemporaryDirectory() as out:
        jobs = ["source"] + ["every", "rank0"] * args.repeats
        for job in jobs:
            mp.start_processes(_rank, args=(args.world, _free_port(), job, args, out),
                               nprocs=args.world, start_method="fork")  # fmt: skip


if __name__ == "__main__":
    main()
