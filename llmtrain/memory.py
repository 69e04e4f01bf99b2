"""What a training step keeps in memory, in bytes, from the config alone (``llmtrain-plan``).

The accounting, stated once (Psi = parameters, N = world size):

* States, mixed precision (bf16/fp16) under the DeepSpeed ZeRO modes: 2 bytes bf16 params + 2
  bytes bf16 grads + 12 bytes optimizer (fp32 master weights, Adam m and v) -- the ZeRO paper's
  2 + 2 + K, K = 12 (Rajbhandari et al. 2020, sec. 3.1) -- plus 4 bytes of fp32 gradient
  partition, sharded like the optimizer: DeepSpeed casts each gradient partition to fp32 for
  the step (stage 3 per sub-group, at most the whole partition), and its own
  ``estimate_zero2_model_states_mem_needs`` counts 18 = 2 + 4 + 4 + 8 bytes per sharded
  parameter. That is fp16, and bf16 under zero1. Under zero2/zero3 bf16 gradients are added
  up in fp32 (``ds_config.fp32_grad_sum``): a 4-byte fp32 gradient partition instead of the
  2-byte bf16 one. zero2 hands it to the step as it is (2 + 4 + 12), zero3 flattens a copy for
  the step (2 + 4 + 16). With optimizer offload zero2's sum stays on the GPU and is copied
  into the CPU's fp32 partition (2 + 4 + 16), zero3's is on the CPU (read in DeepSpeed
  0.19.8's source). Measured on 2 CPU ranks (live tensors, 16 micro-batches, no offload):
  bf16 zero2 2 + 16/N, zero3 22/N bytes per parameter at the step. single, ddp and fsdp2 keep
  the weights in fp32 and compute in bf16 (autocast; FSDP2 gathers each layer in bf16):
  4 + 4 + 8, with autocast's bf16 weight copies or FSDP2's gathered layer on top. fp32
  training: 4 + 4 + 8.
* Sharding: zero1 shards the optimizer over N, zero2 also the gradients, zero3 and fsdp2 also
  the parameters. zero3/fsdp2 then gather one layer at a time: 4 bytes (bf16 params + grads)
  x the largest layer, DeepSpeed's ``largest_layer_memory`` term.
* Offload (ZeRO-Offload, Ren et al. 2021): ``offload_optimizer`` moves the optimizer shard and,
  for zero3 (and zero2 adding up in bf16), the gradient shard to CPU, where the Adam step runs;
  ``offload_params`` (zero3) moves the parameter shard too. CPU memory is reported per node.
* Activations: Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
  Models", eq. 1): s*b*h*(34 + 5*a*s/h) bytes per layer in 16-bit, generalised below to
  grouped-query attention, SwiGLU and any MLP width. The model runs attention through
  ``scaled_dot_product_attention`` (flash / memory-efficient), which keeps no s x s scores,
  so the 5as/h term goes away. Not counted: CUDA context, allocator fragmentation and
  communication buckets -- keep ~10% headroom. (ZeRO-3's reduce bucket holds
  ``reduce_bucket_size`` elements, 5e8 by default, in the communication dtype: 2 GB in fp32.)
"""

from __future__ import annotations

from dataclasses import dataclass

from llmtrain.config import ModelConfig
from llmtrain.ds_config import ZERO_STAGE, fp32_grad_sum
from llmtrain.model import padded_vocab

# ----------------------------------------------------------------------------- parameters


def _norm_params(m: ModelConfig) -> int:
    # LayerNorm: weight + bias (bias only with model.bias); RMSNorm: weight only.
    return m.n_embd * (2 if m.norm == "layernorm" and m.bias else 1)


def layer_params(m: ModelConfig) -> dict[str, int]:
    """Parameters of each module in one block, named as in ``llmtrain/model.py``."""
    h, hd = m.n_embd, m.n_embd // m.n_head
    kv = m.n_kv_head or m.n_head
    f = m.ffn_hidden or 4 * h
    qkv = (m.n_head + 2 * kv) * hd
    b = 1 if m.bias else 0
    out = {
        "ln_1": _norm_params(m),
        "attn.c_attn": h * qkv + b * qkv,
        "attn.c_proj": h * h + b * h,
        "ln_2": _norm_params(m),
        "mlp.c_fc": h * f + b * f,
        "mlp.c_proj": f * h + b * h,
    }
    if m.mlp == "swiglu":
        out["mlp.c_gate"] = h * f + b * f
    return out


def param_counts(m: ModelConfig) -> tuple[int, int, int]:
    """(total, non-embedding, largest single module), as ``GPT(m).num_params()`` counts them:
    padded vocabulary, a tied head counted once, non-embedding leaves out wte and wpe."""
    vocab = padded_vocab(m)
    embed = vocab * m.n_embd + (m.context_length * m.n_embd if m.position == "learned" else 0)
    block = layer_params(m)
    head = 0 if m.tie_embeddings else vocab * m.n_embd
    body = m.n_layer * sum(block.values()) + _norm_params(m) + head  # + ln_f
    largest = max([vocab * m.n_embd, *block.values()])
    return embed + body, body, largest


# ----------------------------------------------------------------------------- activations


@dataclass(frozen=True)
class StepDtypes:
    """Bytes per element of what one training step keeps, by how the run casts."""

    act: int  # matmul inputs and outputs: the compute dtype
    resid: int  # the residual stream between blocks
    norm_in: int  # what LayerNorm keeps of its input: fp32 under autocast, which runs it in fp32
    weight_copies: bool  # autocast keeps a bf16 copy of each fp32 matmul weight for backward


FP32 = StepDtypes(act=4, resid=4, norm_in=4, weight_copies=False)
AUTOCAST = StepDtypes(act=2, resid=4, norm_in=4, weight_copies=True)  # fp32 weights, autocast
BF16_WEIGHTS = StepDtypes(act=2, resid=2, norm_in=4, weight_copies=False)  # + autocast on top
BF16_MODEL = StepDtypes(act=2, resid=2, norm_in=2, weight_copies=False)  # no autocast


def step_dtypes(mode: str, precision: str) -> StepDtypes:
    """single / ddp: Accelerate's autocast over fp32 weights, so the residual stream (the
    embeddings' output) stays fp32; fsdp2: weights gathered in bf16 (its param_dtype), autocast
    on top; the DeepSpeed modes: the module itself is cast to bf16 and no autocast runs."""
    if precision == "fp32":
        return FP32
    if mode in ZERO_STAGE:
        return BF16_MODEL
    return BF16_WEIGHTS if mode == "fsdp2" else AUTOCAST


def _norm_saved(m: ModelConfig, dt: StepDtypes) -> int:
    """Bytes per token one norm keeps: LayerNorm its input; model.py's RMSNorm, computed in
    fp32, the fp32 input and the normalized output in the residual stream's dtype."""
    return m.n_embd * (dt.norm_in if m.norm == "layernorm" else 4 + dt.resid)


def activation_bytes_per_layer(
    m: ModelConfig, batch: int, seq: int, dt: StepDtypes = BF16_MODEL, flash: bool = True
) -> int:
    """Bytes one block saves for backward (Korthikanti et al. 2022, sec. 4.1, generalised).

    In units of s*b elements: two norm inputs 2h; attention: c_attn input h, Q h, K and V
    h_kv each, c_proj input h; MLP: c_fc input h, then GELU input + output 2f, or SwiGLU's
    gate, silu(gate), up and product 4f. With h_kv = h, f = 4h and 2 bytes this is the paper's
    32 sbh, plus 2 sbh of 1-byte dropout masks when dropout > 0 -> 34 sbh. Without flash
    attention the scores add 2as^2b (softmax output) and, with dropout, 3as^2b -> 5as^2b.
    Terms that are this model's own or the cast's (measured in tests/test_plan.py): the norms
    keep fp32 under autocast and model.py's RMSNorm also its normalized output
    (:func:`_norm_saved`), and under RoPE the rotated Q and K are new tensors while V still
    views the fused c_attn output, which therefore stays whole (+h + h_kv).
    """
    h, a = m.n_embd, m.n_head
    kv = (m.n_kv_head or m.n_head) * (h // a)
    f = m.ffn_hidden or 4 * h
    mlp = 4 * f if m.mlp == "swiglu" else 2 * f
    attn = 3 * h + 2 * kv + (h + kv if m.position == "rope" else 0)
    per_token = (attn + h + mlp) * dt.act + 2 * _norm_saved(m, dt)
    if m.dropout > 0:
        per_token += 2 * h  # residual dropout masks, 1 byte each
    if flash:
        per_token += a * 4  # the fp32 log-sum-exp flash attention keeps per head and row
    else:
        per_token += a * seq * (dt.act + (1 + dt.act if m.dropout > 0 else 0))
    return batch * seq * per_token


def loss_bytes(m: ModelConfig, tokens: int, dt: StepDtypes, chunk: int = 0) -> int:
    """The output projection and cross-entropy at their peak, on top of the blocks' activations.

    Plain (``trainer.loss_chunk=0``): in backward, the fp32 log-softmax the loss saved, the
    gradient nll_loss hands back and log-softmax's own gradient are three (tokens, V) fp32
    tensors alive at once: 12 bytes x tokens x V. Then the head's backward, the larger moment
    when the micro-batch has few tokens for the model's width: the logits' gradient (tokens, Vp)
    with the weight gradient (Vp, C); under autocast the weight gradient made in bf16 and its
    fp32 cast for the .grad it adds into (the head's bf16 copy is freed by then).
    Fused (``llmtrain/loss.py``): the gradients it computes in forward, d(h) (tokens, C) and
    d(W) (Vp, C) in fp32, one chunk's fp32 logits and their gradient in the compute dtype,
    and, while one chunk's weight gradient is added, the (Vp, C) product and its fp32 cast.
    """
    vp, c = padded_vocab(m), m.n_embd
    narrow = dt.act if dt.act < 4 else 0  # a cast to the compute dtype is a copy only below fp32
    if chunk <= 0:
        # autocast: the bf16 weight gradient and its fp32 cast (the head's copy freed by then);
        # else the logits' gradient and the weight gradient, both in the weights' dtype
        head_backward = 4 * vp * c if dt.weight_copies else (tokens + c) * vp * dt.act
        return max(12 * tokens * m.vocab_size, head_backward)
    chunk = min(chunk, tokens)
    return (
        tokens * c * dt.act
        + vp * c * (4 + dt.act + (4 if narrow else 0))
        + chunk * vp * (4 + narrow)
    )


def weight_copy_bytes(
    m: ModelConfig, dt: StepDtypes, checkpointing: bool, batch: int, seq: int
) -> int:
    """Autocast's bf16 copies of the matmul weights (single / ddp), on top of activations and
    loss at the step's peak.

    Without checkpointing each block saves its copies for backward: all of them are held when
    backward starts. With checkpointing the blocks save none, but autocast caches every cast
    until the forward ends, so two moments compete: the end of the forward, all copies with
    only the blocks' inputs (one block's activations fewer than :func:`activation_bytes`
    counts), and the backward, the head's copy and the recomputed block's.
    """
    if not dt.weight_copies:
        return 0
    block = sum(v for k, v in layer_params(m).items() if not k.startswith("ln_"))
    head = padded_vocab(m) * m.n_embd
    every = 2 * (head + m.n_layer * block)
    if not checkpointing:
        return every
    forward_end = every - activation_bytes_per_layer(m, batch, seq, dt)
    return max(forward_end, 2 * (head + block))


def activation_bytes(
    m: ModelConfig, batch: int, seq: int, dt: StepDtypes, checkpointing: bool
) -> int:
    """Blocks + final norm bytes held when backward reaches the loss, for one micro-batch.

    With checkpointing each block keeps only its input (the paper's "full recomputation", in
    the residual stream's dtype) and one block's activations are rebuilt at a time in backward.
    """
    per_layer = activation_bytes_per_layer(m, batch, seq, dt)
    if checkpointing:
        blocks = m.n_layer * batch * seq * m.n_embd * dt.resid + per_layer
    else:
        blocks = m.n_layer * per_layer
    # ln_f, the lm_head's input, int64 token ids
    final = batch * seq * (_norm_saved(m, dt) + m.n_embd * dt.act + 8)
    return blocks + final


# ----------------------------------------------------------------------------- states


def state_bytes_per_param(
    mode: str, precision: str, offload_optimizer: bool = False
) -> dict[str, int]:
    """Bytes per parameter before sharding: params, grads, optimizer (see the module doc)."""
    if precision == "fp32" or mode not in ZERO_STAGE:
        return {"params": 4, "grads": 4, "optim": 8}
    if fp32_grad_sum(mode, precision):
        # the step's own fp32 copy of the summed partition: zero3's, and on the CPU when offloading
        copy = 4 if mode == "zero3" or offload_optimizer else 0
        return {"params": 2, "grads": 4, "optim": 12 + copy}
    return {"params": 2, "grads": 2, "optim": 16}


def offloaded(
    mode: str, precision: str, offload_optimizer: bool, offload_params: bool
) -> list[str]:
    """The states ``dist.offload_optimizer`` / ``offload_params`` move to the CPU."""
    moved = []
    if offload_optimizer:
        # ZeRO-Offload streams each reduced gradient partition to CPU for the Adam step; under
        # zero1 the full gradients still accumulate on the GPU first, and zero2's fp32 sum
        # stays there until the last micro-batch.
        moved = ["optim"]
        if mode == "zero3" or (mode == "zero2" and not fp32_grad_sum(mode, precision)):
            moved.append("grads")
    if offload_params:
        moved.append("params")
    return moved


def shard_states(
    n_params: int,
    world_size: int,
    mode: str,
    precision: str,
    offload_optimizer: bool = False,
    offload_params: bool = False,
) -> tuple[dict[str, float], dict[str, float]]:
    """(GPU bytes, CPU bytes) per process for params, grads and optimizer state."""
    per = state_bytes_per_param(mode, precision, offload_optimizer)
    sharded = {
        "single": (),
        "ddp": (),
        "zero1": ("optim",),
        "zero2": ("optim", "grads"),
        "zero3": ("optim", "grads", "params"),
        "fsdp2": ("optim", "grads", "params"),
    }[mode]
    gpu = {k: n_params * v / (world_size if k in sharded else 1) for k, v in per.items()}
    cpu = dict.fromkeys(gpu, 0.0)
    moved = offloaded(mode, precision, offload_optimizer, offload_params)
    for k in moved:
        cpu[k], gpu[k] = gpu[k], 0.0
    if "grads" in moved and per["grads"] == 2:
        # On CPU the reduced 16-bit shard lands in the fp32 gradient partition, already counted
        # (an fp32 sum is a buffer of its own, copied into that one at the last micro-batch).
        cpu["grads"] = 0.0
    return gpu, cpu
