"""The output projection + cross-entropy alone: the plain head against the fused, chunked loss
(``llmtrain/loss.py``), eager and compiled, forward + backward, same inputs.

    python benchmarks/fused_loss.py                                   # smoke size, CPU, fp32
    python benchmarks/fused_loss.py --tokens 32768 --width 768 --chunk 8192 --device cuda --bf16

The second line is gpt2-small's head at micro-batch 32 x 1024. Prints the median time per
forward + backward, the speed relative to the plain eager head, and (on CUDA) peak memory.
Each timed path's gradients are first checked against the plain eager head's on the same
device: on torch 2.11 the compiled fused loss once gave all-zero gradients (and a speed that
skipped work), which tests on another torch could not see.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F

from llmtrain.config import ModelConfig
from llmtrain.loss import chunked_lm_loss
from llmtrain.model import padded_vocab

GPT2_VOCAB = 50257


def plain(h, weight, targets, vocab_size: int, chunk: int):
    """What the model does without trainer.loss_chunk: all logits, float32 cross-entropy."""
    return F.cross_entropy((h @ weight.t()).float()[:, :vocab_size], targets)


def fused(h, weight, targets, vocab_size: int, chunk: int):
    return chunked_lm_loss(h, weight, targets, vocab_size, chunk)


def gradients(fn, h, weight, targets, args, device: torch.device) -> list[torch.Tensor]:
    autocast = torch.autocast(device.type, torch.bfloat16) if args.bf16 else None
    with autocast or contextlib.nullcontext():
        loss = fn(h, weight, targets, GPT2_VOCAB, args.chunk)
    return [g.float() for g in torch.autograd.grad(loss, (h, weight))]


def check_gradients(got: list[torch.Tensor], want: list[torch.Tensor], name: str) -> None:
    """Within bf16 rounding of the plain head's: a few ulps of the largest entry."""
    for g, w, what in zip(got, want, ("h", "weight"), strict=True):
        err = (g - w).abs().max() / w.abs().max()
        if not err <= 0.02:
            raise SystemExit(f"{name}: d(loss)/d({what}) is off the plain head's by {err:.3g}")


def time_it(fn, h, weight, targets, args, device: torch.device) -> tuple[float, float | None]:
    """(median seconds per forward + backward, peak GiB on CUDA) over args.repeats calls."""

    def call():
        autocast = torch.autocast(device.type, torch.bfloat16) if args.bf16 else None
        with autocast or contextlib.nullcontext():
            loss = fn(h, weight, targets, GPT2_VOCAB, args.chunk)
        loss.backward()
        h.grad = weight.grad = None

    for _ in range(args.warmup):  # the first compiled calls build the kernels
        call()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return statistics.median(times), peak


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=512, help="tokens per micro-batch (B x T)")
    p.add_argument("--width", type=int, default=128, help="model width n_embd")
    p.add_argument("--chunk", type=int, default=256, help="trainer.loss_chunk")
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast, as training on a GPU")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--eager-only", action="store_true", help="skip the compiled runs")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(args.tokens, args.width, generator=g).to(device).requires_grad_()
    rows = padded_vocab(ModelConfig(vocab_size=GPT2_VOCAB))
    weight = (0.02 * torch.randn(rows, args.width, generator=g)).to(device)
    weight.requires_grad_()
    targets = torch.randint(0, GPT2_VOCAB, (args.tokens,), generator=g).to(device)

    print(
        f"head {args.tokens} tokens x {args.width} -> {weight.size(0)} vocab, chunk {args.chunk}, "
        f"{device}, {'bf16 autocast' if args.bf16 else 'fp32'}, torch {torch.__version__}"
    )
    base = None
    want = gradients(plain, h, weight, targets, args, device)
    for name, fn in (("plain", plain), ("fused", fused)):
        for compiled in (False,) if args.eager_only else (False, True):
            run = torch.compile(fn) if compiled else fn
            check_gradients(gradients(run, h, weight, targets, args, device), want, name)
            seconds, peak = time_it(run, h, weight, targets, args, device)
            base = base or seconds
            mem = f", peak {peak:.2f} GiB" if peak is not None else ""
            print(
                f"  {name:5s} {'compiled' if compiled else 'eager':8s} {seconds * 1e3:8.1f} ms "
                f"({base / seconds:.2f}x plain eager){mem}",
                flush=True,
            )


if __name__ == "__main__":
    main()
