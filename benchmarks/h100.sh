#!/usr/bin/env bash
# llmtrain-bench on one H100, from the repo root (not pip-installed there: PYTHONPATH=.).
# Needs on the device: torch (2.11+cu130), accelerate, tiktoken, pyarrow, numpy, safetensors,
# pyyaml, plus the carried hydra-core / omegaconf / antlr4-python3-runtime wheels.
# datasets, wandb and deepspeed are NOT needed (except by the zero3 run in part 3) (data=shards: the harness writes
# the shipped sample as llm.c shards into ~/.cache/llmtrain/sample-shards on first use).
#
# Device time: ~30 min per session, 10 min per call. Run one part per `run` call:
#   bash benchmarks/h100.sh 1    # env + gpt2-small compile off (+ bare baseline) and on  ~4 min
#   bash benchmarks/h100.sh 2    # llama-1b seq 2048 compile off and on                  ~5 min
#   bash benchmarks/h100.sh 3    # gpt2-small 1 process under dist=fsdp2 (and zero3)      ~3 min
#   bash benchmarks/h100.sh 4    # compiled before/after: fused chunked loss, micro 64,
#                                #   bare-loop ratio at micro 64                          ~6 min
#   bash benchmarks/h100.sh 5    # eager before/after: fused AdamW, attention kernel, set_to_none,
#                                #   pinned memory                                        ~6 min
#   bash benchmarks/h100.sh 6    # eager before/after: workers, activation checkpointing, vocab
#                                #   padding, tied embeddings, fused loss                 ~6 min
#   bash benchmarks/h100.sh 7    # compiled before/after: max-autotune-no-cudagraphs (its
#                                #   autotuning is minutes; run alone)                  <=10 min
#   bash benchmarks/h100.sh 8    # where the compiled step's time goes now (profile_step.py),
#                                #   plain head and fused loss                           ~3 min
#   bash benchmarks/h100.sh 9    # one HellaSwag evaluation's cost (hellaswag_cost.py,
#                                #   synthetic rows), gpt2-small and llama-1b            ~3 min
# The wheels travel in .whl/ (git-ignored via .git/info/exclude, named in the call's carry);
# each call then starts with (the 2026-11-24 session's exact preamble):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 || exit;
#   bash benchmarks/h100.sh 4
# Each part copies the records it appended to $OUT/new-<part>.jsonl; back here:
#   cat <files_at>/new-*.jsonl >> benchmarks/results.jsonl && python -m llmtrain.bench --table
set -uo pipefail
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}. HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline
export TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/bench-out}; mkdir -p "$OUT"
PART=${1:-1}
R=benchmarks/results.jsonl
N0=$( [ -f $R ] && wc -l < $R || echo 0 )
B="python3 -m llmtrain.bench"
L="python3 -m accelerate.commands.launch --num_processes 1"  # accelerate launch

# GPT-2 124M at seq 1024: 32 x 1024 x 16 accum = 524,288 tokens/step (the GPT-2 / llm.c batch).
GPT2="model=gpt2-small data=shards data.seq_len=1024 trainer.micro_batch_size=32 trainer.batch_tokens=524288"
# Llama 1B at seq 2048: 8 x 2048 x 8 accum = 131,072 tokens/step, no activation checkpointing.
# If micro 8 runs out of memory: trainer.micro_batch_size=4 (accum becomes 16).
LLAMA="model=llama-1b data=shards data.seq_len=2048 trainer.micro_batch_size=8 trainer.batch_tokens=131072"

case $PART in
1)
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/env.txt"
  python3 -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" | tee -a "$OUT/env.txt"
  $B --make-shards ~/.cache/llmtrain/sample-shards
  $B --steps 15 --warmup 3 --baseline $GPT2 trainer.compile=false 2>&1 | tee "$OUT/gpt2-eager.log"
  $B --steps 15 --warmup 3 $GPT2 trainer.compile=true 2>&1 | tee "$OUT/gpt2-compile.log"
  ;;
2)
  $B --steps 10 --warmup 2 $LLAMA trainer.compile=false 2>&1 | tee "$OUT/llama-eager.log"
  $B --steps 10 --warmup 3 $LLAMA trainer.compile=true 2>&1 | tee "$OUT/llama-compile.log"
  ;;
3)
  # FSDP2 needs a process group even for 1 process: launch through accelerate (torchrun inside).
  $L --config_file launch/fsdp2.yaml -m llmtrain.bench \
    --steps 10 --warmup 3 $GPT2 dist=fsdp2 trainer.compile=false 2>&1 | tee "$OUT/gpt2-fsdp2.log"
  # ZeRO-3 needs `deepspeed` importable (carry its wheel: pip wheel deepspeed --no-deps builds a
  # pure-Python wheel with DS_BUILD_OPS=0; plus hjson, ninja, py-cpuinfo, msgpack, pydantic,
  # nvidia-ml-py, einops if absent). Skipped when it is missing.
  if python3 -c "import deepspeed" 2>/dev/null; then
    $L --config_file launch/zero3.yaml -m llmtrain.bench \
      --steps 10 --warmup 3 $GPT2 dist=zero3 trainer.compile=false 2>&1 | tee "$OUT/gpt2-zero3.log"
  else
    echo "deepspeed not importable: dist=zero3 skipped" | tee "$OUT/gpt2-zero3.log"
  fi
  ;;
4)
  # The head alone first (seconds): plain vs fused, eager and compiled, gpt2-small's shapes; it
  # stops if a path's gradients are off the plain head's (rows 33-35 and 56-57 were).
  python3 benchmarks/fused_loss.py --tokens 32768 --width 768 --chunk 8192 --device cuda --bf16 \
    2>&1 | tee "$OUT/fused-loss-head.log"
  # Each --versus run alternates with the run without the change, in one process; the after
  # record holds the paired speedup and the peak-memory ratio.
  $B --steps 12 --warmup 3 $GPT2 trainer.compile=true \
    --versus trainer.loss_chunk=8192 2>&1 | tee "$OUT/gpt2-compile-losschunk.log"
  # The memory the fused loss frees, spent on a larger micro-batch (accum 16 -> 8).
  $B --steps 12 --warmup 3 $GPT2 trainer.compile=true trainer.loss_chunk=8192 \
    --versus trainer.micro_batch_size=64 2>&1 | tee "$OUT/gpt2-compile-losschunk-mb64.log"
  # Data wait read 5.4-5.9% at micro-batch 64 (rows 56-57, 16 torch CPU threads) against 0.26%
  # in row 11 (1 thread). The batch is now built by numpy, with no torch CPU kernel (whose
  # OpenMP threads sleep while the GPU works). This host's own batch latency first (seconds),
  # then the bare loop, on pre-loaded batches, says whether any host time left costs throughput.
  for threads in 0 1; do
    python3 benchmarks/batch_latency.py --micro 64 --threads $threads 2>&1 | tee -a "$OUT/batch-latency.log"
  done
  $B --steps 12 --warmup 3 --baseline $GPT2 trainer.compile=true trainer.micro_batch_size=64 \
    2>&1 | tee "$OUT/gpt2-compile-mb64-baseline.log"
  ;;
5|6)
  # Eager, so that each switch is seen on its own, not through what inductor fuses anyway.
  E="$B --steps 8 --warmup 2 $GPT2 trainer.compile=false"
  if [ "$PART" = 5 ]; then
    changes="optim.fused=false trainer.attention=math trainer.attention=cudnn
      trainer.set_to_none=false data.pin_memory=false"
  else
    changes="data.num_workers=2 trainer.activation_checkpointing=true
      model.vocab_pad_multiple=1 model.tie_embeddings=false trainer.loss_chunk=8192"
  fi
  for change in $changes; do
    $E --versus "$change" 2>&1 | tee "$OUT/gpt2-eager-${change//[.=]/-}.log"
  done
  ;;
7)
  # Inductor's autotuned matmul / Triton choices, without CUDA graphs (refused: d5df932).
  $B --steps 12 --warmup 3 $GPT2 trainer.compile=true \
    --versus trainer.compile_mode=max-autotune-no-cudagraphs 2>&1 | tee "$OUT/gpt2-compile-autotune.log"
  ;;
8)
  # RESULTS.md's profile predates the logits change (row 5): the step as it is now, and with the
  # fused loss, is the evidence for what limits gpt2-small below 520k tokens/s.
  P="python3 benchmarks/profile_step.py model=gpt2-small data.seq_len=1024 --micro 32 --compile"
  $P 2>&1 | tee "$OUT/profile-gpt2-compile.log"
  $P trainer.loss_chunk=8192 2>&1 | tee "$OUT/profile-gpt2-compile-losschunk.log"
  ;;
9)
  # trainer.hellaswag_every's cost (gpt2-124m-fineweb evaluates every 1,000 steps), eager bf16.
  for model in gpt2-small llama-1b; do
    python3 benchmarks/hellaswag_cost.py --model $model 2>&1 | tee "$OUT/hellaswag-$model.log"
  done
  ;;
esac
tail -n +$((N0 + 1)) $R > "$OUT/new-$PART.jsonl" 2>/dev/null || true
echo "appended $(wc -l < "$OUT/new-$PART.jsonl") record(s) -> $OUT/new-$PART.jsonl"
