"""The whole model: one decoder-only transformer covering GPT-2 and Llama-style blocks.

``GPT(cfg)`` reads its architecture from :class:`llmtrain.config.ModelConfig`:

=============  ===========================  =================================
field          GPT-2 (Radford et al. 2019)  Llama-style (Touvron et al. 2023)
=============  ===========================  =================================
position       learned ``wpe``              rope (Su et al. 2021)
norm           LayerNorm with bias          RMSNorm (Zhang & Sennrich 2019)
mlp            GELU, 4 x n_embd             SwiGLU, ffn_hidden (Shazeer 2020)
bias           True                         False
tie_embeddings True                         False (Llama 3.2 1B/3B: True)
n_kv_head      n_head                       fewer: grouped-query (Ainslie et al. 2023)
=============  ===========================  =================================

Parameter names follow GPT-2's (``transformer.h.{i}.attn.c_attn``, ``ln_f``, ...) so converting to
and from Hugging Face checkpoints (``llmtrain/hf.py``) is a one-to-one mapping. The SwiGLU gate
is the one extra projection, ``mlp.c_gate``. Shapes: B batch, T time, C = n_embd,
nh = n_head, nkv = n_kv_head, hd = head_dim = C // nh, V = padded vocabulary.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from llmtrain.config import ModelConfig
from llmtrain.loss import IGNORE_INDEX, chunked_lm_loss

DECODE_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
ATTENTION_KERNELS = {
    "flash": SDPBackend.FLASH_ATTENTION,  # Dao 2023; bf16/fp16 on CUDA, any dtype on CPU
    "efficient": SDPBackend.EFFICIENT_ATTENTION,  # xFormers' memory-efficient kernel
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,  # the reference: materialises the (T, T) scores
}


def attention_kernel(name: str) -> contextlib.AbstractContextManager:
    """``trainer.attention``: "auto" lets torch pick per call; a name pins that one kernel (a
    call it cannot serve then fails rather than silently running another)."""
    if name == "auto":
        return contextlib.nullcontext()
    return sdpa_kernel([ATTENTION_KERNELS[name]])


def padded_vocab(cfg: ModelConfig) -> int:
    """model.vocab_size rounded up to model.vocab_pad_multiple (50304 runs faster than 50257)."""
    return math.ceil(cfg.vocab_size / cfg.vocab_pad_multiple) * cfg.vocab_pad_multiple


def human(n: float) -> str:
    """124439808 -> '124.44M'."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 as Hugging Face Llama does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.n_embd, cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


def rope_cos_sin(
    head_dim: int, theta: float, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables for ``positions`` (T,) -> cos, sin each (T, hd), in float32.

    Computed on the fly (a few kFLOPs) rather than kept as buffers, so a model built on the meta
    device and moved with ``to_empty`` needs nothing re-created, and ``model.to(bfloat16)`` cannot
    round the angles. Frequencies theta^(-2i/hd) as in RoFormer (Su et al. 2021).
    """
    exponent = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.int64).float()
    inv_freq = 1.0 / (theta ** (exponent / head_dim))  # (hd/2,)
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (T, hd/2)
    angles = torch.cat((freqs, freqs), dim=-1)  # (T, hd)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + hd/2) of x (B, nh, T, hd): the "rotate_half" layout of Hugging Face
    Llama, so its q/k weights load here without a permutation."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, nh, T, hd/2) each
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class KVCache:
    """Keys and values of one layer, preallocated for the whole generation.

    ``update`` writes the new positions and returns everything cached so far, so generating N
    tokens costs O(N) forward steps of one token each instead of O(N^2) recomputation.
    """

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.pos = 0  # positions filled so far
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, nkv, T, hd = k.shape
        if self.k is None:  # allocate on first use, in the dtype autocast produced
            self.k = k.new_zeros(B, nkv, self.max_len, hd)
            self.v = v.new_zeros(B, nkv, self.max_len, hd)
        if self.pos + T > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; cannot add {T} more")
        assert self.v is not None
        self.k[:, :, self.pos : self.pos + T] = k
        self.v[:, :, self.pos : self.pos + T] = v
        self.pos += T
        return self.k[:, :, : self.pos], self.v[:, :, : self.pos]  # (B, nkv, pos, hd)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.n_kv_head = cfg.n_kv_head or cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.dropout = cfg.dropout
        # q, k, v in one matmul: rows [q (nh*hd) | k (nkv*hd) | v (nkv*hd)]
        qkv_dim = (self.n_head + 2 * self.n_kv_head) * self.head_dim
        self.c_attn = nn.Linear(cfg.n_embd, qkv_dim, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        B, T, C = x.shape
        hd = self.head_dim
        q, k, v = self.c_attn(x).split(
            [self.n_head * hd, self.n_kv_head * hd, self.n_kv_head * hd], dim=2
        )
        q = q.view(B, T, self.n_head, hd).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_kv_head, hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, self.n_kv_head, hd).transpose(1, 2)  # (B, nkv, T, hd)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)

        past = 0
        if cache is not None:
            past = cache.pos
            k, v = cache.update(k, v)  # (B, nkv, past + T, hd)
        # is_causal masks top-left aligned, which is right only when no keys precede the queries.
        # One new token may see every cached key; a chunk after a prefix needs an explicit mask.
        mask = None
        if past > 0 and T > 1:
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
        # Flash attention on CUDA in bf16/fp16; grouped-query heads share K/V without a copy.
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=past == 0 and T > 1,
            enable_gqa=self.n_kv_head != self.n_head,
        )  # (B, nh, T, hd)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """GELU (GPT-2) or SwiGLU: c_proj(silu(c_gate(x)) * c_fc(x)) (Shazeer 2020)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = cfg.ffn_hidden or 4 * cfg.n_embd
        self.swiglu = cfg.mlp == "swiglu"
        self.c_fc = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        if self.swiglu:
            self.c_gate = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        self.c_proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            h = F.silu(self.c_gate(x)) * self.c_fc(x)  # (B, T, hidden)
        else:
            h = F.gelu(self.c_fc(x), approximate="tanh")  # GPT-2's "gelu_new"
        return self.dropout(self.c_proj(h))  # (B, T, C)


class Block(nn.Module):
    """Pre-norm residual block (GPT-2 moved the norms to the sublayer inputs)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        x = x + self.attn(self.ln_1(x), rope, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Token embedding -> n_layer blocks -> final norm -> lm_head, shaped by ``cfg``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = cfg.vocab_size
        self.padded_vocab_size = padded_vocab(cfg)
        self.head_dim = cfg.n_embd // cfg.n_head
        self.activation_checkpointing = False

        layers = {"wte": nn.Embedding(self.padded_vocab_size, cfg.n_embd)}
        if cfg.position == "learned":
            layers["wpe"] = nn.Embedding(cfg.context_length, cfg.n_embd)
        layers["drop"] = nn.Dropout(cfg.dropout)
        layers["h"] = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        layers["ln_f"] = make_norm(cfg)
        self.transformer = nn.ModuleDict(layers)
        self.lm_head = LMHead(cfg.n_embd, self.padded_vocab_size, self.vocab_size)
        self.tie_weights()
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 initialisation, in place; also the step after ``to_empty`` from the meta device.

        Weights ~ N(0, init_std), biases 0, norms 1. Projections into the residual stream
        (``c_proj``) get std / sqrt(2 * n_layer), two per block (Radford et al. 2019, sec. 2.3).
        """
        self.tie_weights()  # to_empty replaces each module's tensors separately, untying them
        std = self.cfg.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                module.reset_parameters()
        residual_std = std / math.sqrt(2 * self.cfg.n_layer)
        for block in self.transformer.h:
            nn.init.normal_(block.attn.c_proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.c_proj.weight, mean=0.0, std=residual_std)

    def tie_weights(self) -> None:
        """With tie_embeddings, one matrix embeds and unembeds (Press & Wolf 2017)."""
        wte = self.transformer.wte.weight
        if self.cfg.tie_embeddings and self.lm_head.weight is not wte:
            self.lm_head.weight = wte

    def enable_activation_checkpointing(self) -> None:
        """Recompute each block's activations in backward: less memory, ~1/3 more compute."""
        self.activation_checkpointing = True

    def enable_chunked_loss(self, chunk: int) -> None:
        """Training loss from the fused, chunked head + cross-entropy (llmtrain/loss.py)."""
        self.lm_head.loss_chunk = chunk

    def new_kv_cache(self, max_len: int) -> list[KVCache]:
        return [KVCache(max_len) for _ in range(self.cfg.n_layer)]

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: list[KVCache] | None = None,
        return_logits: bool = True,
        last_only: bool = False,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx (B, T) token ids -> logits (B, T, V) float, and the mean cross-entropy on targets.

        The loss is over the true vocabulary only (padding columns excluded), in float32;
        targets equal to -100 are ignored. With ``kv_cache`` the positions continue after the
        cached ones (generation). ``return_logits=False`` (the training step) returns None for
        the logits: the (B, T, V) float32 tensor then never has to exist, which under compile
        lets the loss fuse into the head's output (gpt2-small, batch 32: 6.6 GB per micro-batch).
        ``last_only`` (generation, no targets) gives the last position's logits only, (B, 1, V).
        """
        B, T = idx.shape
        past = kv_cache[0].pos if kv_cache else 0
        if past + T > self.cfg.context_length:
            raise ValueError(
                f"sequence of {past + T} tokens exceeds model.context_length="
                f"{self.cfg.context_length}"
            )
        positions = torch.arange(past, past + T, device=idx.device)  # (T,)
        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if self.cfg.position == "learned":
            x = x + self.transformer.wpe(positions)  # (T, C) broadcast over B
        else:
            rope = rope_cos_sin(self.head_dim, self.cfg.rope_theta, positions)  # (T, hd) x 2
        x = self.transformer.drop(x)

        recompute = self.activation_checkpointing and torch.is_grad_enabled() and kv_cache is None
        for i, block in enumerate(self.transformer.h):
            if recompute:
                x = checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope, kv_cache[i] if kv_cache else None)
        x = self.transformer.ln_f(x)
        if last_only:  # the next token's logits, not (B, T, V) float32 for a whole prompt
            if targets is not None:
                raise ValueError("last_only gives no loss: it is for generation, without targets")
            x = x[:, -1:]
        if targets is not None and self.lm_head.fuses_loss(return_logits):
            return None, self.lm_head(x, targets)  # no (B, T, V) tensor at all
        logits = self.lm_head(x)  # (B, T, padded V), in the autocast dtype

        loss = None
        if targets is not None:
            true_logits = logits[..., : self.vocab_size].float()
            loss = F.cross_entropy(
                true_logits.reshape(-1, self.vocab_size),
                targets.reshape(-1),
                ignore_index=IGNORE_INDEX,
            )
        return (logits.float() if return_logits else None), loss

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        stop_id: int | None = None,
        window: int | None = None,
    ) -> torch.Tensor:
        """Continue idx (B, T) by max_new_tokens -> (B, T + max_new_tokens).

        Each new token is predicted from at most ``window`` tokens (default and at most
        ``context_length``; a model trained on shorter windows does best with their length).
        Within it a KV cache makes each new token one position's forward pass. Past it the
        context slides, as nanoGPT crops it: each new token is predicted from the last
        ``window`` tokens (a longer prompt's too), recomputed in full, since the cached keys
        hold positions the window has moved past (a whole window per token: slower).
        temperature 0 is greedy. Only true vocabulary ids are ever produced. The caller sets
        ``eval()`` (dropout) and autocast. With ``stop_id`` it returns early, shorter, once every
        row has produced that id (rows that stopped before keep going until then: what follows
        the stop id is the caller's to drop).
        """
        window = window or self.cfg.context_length
        if not 0 < window <= self.cfg.context_length:
            raise ValueError(f"window {window}: must be in 1..{self.cfg.context_length}")
        cache = self.new_kv_cache(min(idx.size(1) + max_new_tokens, window))
        out = idx
        stopped = torch.zeros(idx.size(0), 1, dtype=torch.bool, device=idx.device)  # (B, 1)
        # Every decoding step attends over one more cached key, a new shape: cuDNN attention
        # builds a plan per shape (~40 ms each on an H100 in bf16, 40x the step itself); the
        # flash and memory-efficient kernels take any length as it comes.
        with sdpa_kernel(DECODE_ATTENTION):
            logits, _ = self(idx[:, -window:], kv_cache=cache, last_only=True)  # the prompt
            for step in range(max_new_tokens):
                last = logits[:, -1, : self.vocab_size]  # (B, vocab) padding ids cut off
                next_id = sample_next(last, temperature, top_k, top_p, generator)  # (B, 1)
                out = torch.cat((out, next_id), dim=1)
                if stop_id is not None:
                    stopped |= next_id == stop_id
                    if stopped.all():
                        break
                if step + 1 == max_new_tokens:
                    break
                if cache[0].pos < window:  # one position, the cached keys reused
                    logits, _ = self(next_id, kv_cache=cache)
                else:  # the window slides by one token
                    logits, _ = self(out[:, -window:], last_only=True)
        return out

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters, a tied matrix counted once; non_embedding leaves out wte and wpe."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wte.weight.numel()
            if "wpe" in self.transformer:
                n -= self.transformer.wpe.weight.numel()
        return n

    def param_summary(self) -> str:
        total, body = self.num_params(), self.num_params(non_embedding=True)
        return (
            f"{self.cfg.name}: {human(total)} parameters ({total:,}), "
            f"{human(body)} non-embedding; vocab {self.vocab_size} padded to "
            f"{self.padded_vocab_size}"
        )

    def configure_param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups as GPT-2/nanoGPT: decay matrices and embeddings (dim >= 2), not biases
        or norm gains."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]


class LMHead(nn.Linear):
    """The unembedding, (padded V, C) without bias; ``wte``'s matrix when tied.

    ``head(x)`` gives logits. With ``loss_chunk`` set, ``head(x, targets)`` gives the training
    loss from :func:`llmtrain.loss.chunked_lm_loss` instead; it runs inside this module's own
    forward so that ZeRO-3 and FSDP2 have gathered the weight, as for the plain head.
    """

    def __init__(self, n_embd: int, padded_vocab: int, vocab_size: int):
        super().__init__(n_embd, padded_vocab, bias=False)
        self.vocab_size = vocab_size
        self.loss_chunk = 0

    def fuses_loss(self, return_logits: bool) -> bool:
        # Evaluation (no grad) keeps the plain path: the fused one would compute gradients.
        return self.loss_chunk > 0 and not return_logits and torch.is_grad_enabled()

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is None:
            return super().forward(x)  # (B, T, padded V)
        return chunked_lm_loss(x, self.weight, targets, self.vocab_size, self.loss_chunk)


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (B, vocab) -> next ids (B, 1). Greedy at temperature 0; otherwise sample from the
    top_k most likely and/or the smallest set holding top_p of the mass (Holtzman et al. 2020)."""
    if temperature < torch.finfo(torch.float32).tiny:  # 0, or so small that float32 holds 0
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float()
    # the best logit becomes 0 and the others <= 0 before dividing: a tiny temperature then
    # underflows them to -inf instead of overflowing the best to inf (NaN probabilities)
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # mass of strictly more likely tokens
        drop_sorted = mass_before >= top_p  # the most likely token always stays
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)
