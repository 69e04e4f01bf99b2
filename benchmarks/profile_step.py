"""Where a training step's GPU time goes: the top kernels of a few steps under torch.profiler.

    python benchmarks/profile_step.py model=gpt2-small data.seq_len=1024 --micro 16 --compile
    python benchmarks/profile_step.py model=gpt2-small data.seq_len=1024 --micro 32 --compile \
        trainer.loss_chunk=8192

The step is the framework's math without its loop: the model as training builds it (the
trainer's loss_chunk, activation checkpointing, attention kernel and compile_mode apply),
forward + backward in bf16 autocast on random tokens, clipping, the configured AdamW. Prints
kernel families (matmul, attention, elementwise, ...) with their share of the CUDA time, then
the top kernels, then the step time and MFU.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections import defaultdict

import torch

from llmtrain.config import load_config
from llmtrain.metrics import device_peak_tflops, flops_per_token
from llmtrain.model import attention_kernel
from llmtrain.optim import build_optimizer
from llmtrain.run import build_model, compile_model

FAMILIES = (  # first match wins; kernel names are lower-cased
    ("attention (flash)", ("flash", "fmha", "sdpa", "attention")),
    ("matmul", ("gemm", "cutlass", "sm90_xmma", "nvjet", "cublas", "matmul", "wgmma")),
    ("optimizer", ("adam", "foreach", "multi_tensor")),
    ("cross-entropy / softmax", ("softmax", "nll", "cross_entropy", "log_softmax")),
    ("layernorm / rmsnorm", ("layer_norm", "rms_norm", "norm")),
    ("triton fused (inductor)", ("triton",)),
    ("copies / casts", ("copy", "cast", "memcpy", "memset", "fill")),
)


def family(name: str) -> str:
    low = name.lower()
    for fam, keys in FAMILIES:
        if any(k in low for k in keys):
            return fam
    return "other elementwise"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--micro", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--top", type=int, default=15)
    args, overrides = parser.parse_known_args()
    cfg = load_config(
        ["logger=none", "data=shards", "data.path=unused", "trainer.max_steps=1", *overrides]
    )
    torch.manual_seed(0)
    model = build_model(cfg).cuda()
    opt = build_optimizer(model, cfg.optim, "cuda")
    trainer = dataclasses.replace(cfg.trainer, compile=args.compile or cfg.trainer.compile)
    step_model = compile_model(model, trainer)
    seq = cfg.data.seq_len
    x = torch.randint(0, 50257, (args.micro, seq + 1), device="cuda")

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16), attention_kernel(trainer.attention):
            _, loss = step_model(x[:, :-1], x[:, 1:], return_logits=False)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):  # compile and warm up
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / 10
    tokens = args.micro * seq
    peak = device_peak_tflops(torch.cuda.get_device_name())
    mfu = flops_per_token(cfg.model, seq) * tokens / dt / (peak * 1e12) if peak else float("nan")
    print(
        f"{cfg.model.name} micro {args.micro} x {seq}, compile {trainer.compile}, loss_chunk "
        f"{trainer.loss_chunk}: "
        f"{dt * 1e3:.1f} ms/step, {tokens / dt / 1e3:.1f}k tok/s, MFU {mfu:.1%}"
    )

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in kernels) or 1.0
    fams: dict[str, float] = defaultdict(float)
    for e in kernels:
        fams[family(e.key)] += e.self_device_time_total
    print(
        f"CUDA time per step {total / args.steps / 1e3:.1f} ms "
        f"(wall {dt * 1e3:.1f} ms: the rest is GPU idle, launch or host time)"
    )
    for fam, t in sorted(fams.items(), key=lambda kv: -kv[1]):
        print(f"  {t / total:6.1%}  {fam}")
    print("top kernels:")
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[: args.top]:
        print(
            f"  {e.self_device_time_total / total:6.1%}  {e.count // args.steps:4d}x  {e.key[:110]}"
        )


if __name__ == "__main__":
    main()
