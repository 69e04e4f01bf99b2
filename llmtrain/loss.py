"""The language-model loss: the output projection and cross-entropy, fused and chunked.

The plain training step computes ``logits = h @ W.T`` for every token, (N, V) with N = B * T
and V = 50304, then the cross-entropy, then in backward the (N, V) gradient of the logits. For
gpt2-small at micro-batch 32 those are 32768 x 50304 values, 3.3 GB each in bf16 and twice
that for the float32 softmax. :func:`chunked_lm_loss` never holds them whole: it walks the
tokens ``chunk`` at a time and, for each chunk, computes the logits, the loss, and at once the
gradients of the loss with respect to ``h`` and ``W`` (softmax minus one-hot, then two
matmuls). Backward only scales those gradients. The FLOPs are the plain path's (three
N x C x V matmuls); the memory is one chunk's logits instead of all of them.

The same idea as Liger Kernel's fused linear cross-entropy and Wijmans et al. 2024 ("Cut Your
Losses in Large-Vocabulary Language Models"), written with torch operations only.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """mean over valid targets of -log softmax(h @ W.T)[target], gradients computed in forward.

    h (N, C) and weight (Vp, C) arrive in the compute dtype (bf16 under autocast); logits are
    taken in float32 per chunk. Columns at and past ``vocab_size`` (padding) are masked out,
    yet stay in the matmul so its shape keeps the padded, fast size.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, vocab_size: int, chunk: int):
        n_tokens = h.size(0)
        valid_all = targets != IGNORE_INDEX  # (N,)
        # The mean's weight per token, 0 on ignored ones; a tensor, so no host sync.
        weight_all = valid_all / valid_all.sum().clamp(min=1)  # (N,) float32
        # Under torch.compile nothing here is mutated: torch 2.11 routes the gradient of a
        # returned tensor that forward changed in place to the wrong output, and training sees
        # all-zero gradients (pytorch/pytorch#180642; seen on an H100, benchmarks/RESULTS.md).
        # Eager reuses memory instead: each chunk's gradients go straight into place.
        pure = torch.compiler.is_compiling()
        grad_h = [] if pure else torch.empty_like(h)  # (N, C)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)  # (Vp, C)
        losses = []
        for start in range(0, n_tokens, chunk):
            h_c = h[start : start + chunk]  # (n, C)
            t_c = targets[start : start + chunk].clamp(min=0).unsqueeze(1)  # (n, 1)
            w_c = weight_all[start : start + chunk].unsqueeze(1)  # (n, 1)
            logits = (h_c @ weight.t()).float()  # (n, Vp)
            # d(loss)/d(logits) = (softmax - one_hot(target)) * w, in float32 as the plain
            # path's cross-entropy backward, then in the matmul dtype.
            chunk_loss, grad_logits = (_terms_pure if pure else _terms_in_place)(
                logits, t_c, w_c, vocab_size
            )
            losses.append(chunk_loss)
            grad_logits = grad_logits.to(h.dtype)
            # d(W) (Vp, C) is summed in float32; the chunk's product is freed at once.
            if pure:
                grad_h.append(grad_logits @ weight)
                grad_w = grad_w + (grad_logits.t() @ h_c).float()
            else:
                grad_h[start : start + chunk] = grad_logits @ weight  # (n, C)
                grad_w += (grad_logits.t() @ h_c).float()
        if pure:
            grad_h = torch.cat(grad_h)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return torch.stack(losses).sum()

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        # grad_loss is 1 / grad_accum under Accelerate: scale in float32, never in bf16.
        grad_h = (grad_h.float() * grad_loss).to(grad_h.dtype)
        return grad_h, (grad_w * grad_loss).to(ctx.weight_dtype), None, None, None


def _terms_in_place(logits, t_c, w_c, vocab_size: int):
    """(the chunk's share of the loss, d(loss)/d(logits)), overwriting ``logits`` (n, Vp): in
    eager mode each op is a pass over the chunk's memory, so reusing it saves passes."""
    if logits.size(1) > vocab_size:
        logits[:, vocab_size:] = float("-inf")
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # (n, 1)
    loss = ((lse - logits.gather(1, t_c)) * w_c).sum()
    grad = torch.exp_(logits.sub_(lse))  # softmax, in the logits' memory
    grad.scatter_add_(1, t_c, torch.full_like(lse, -1.0))
    return loss, grad.mul_(w_c)


def _terms_pure(logits, t_c, w_c, vocab_size: int):
    """The same as :func:`_terms_in_place` without mutation, for ``torch.compile``: inductor
    fuses pure ops into one reduction and one elementwise kernel per chunk, and in-place ones
    keep it from doing so (on CPU, fused-loss training steps were 0.89x the plain compiled
    head's with the in-place form; see benchmarks/RESULTS.md)."""
    cols = torch.arange(logits.size(1), device=logits.device)  # (Vp,)
    logits = logits.masked_fill(cols >= vocab_size, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # (n, 1)
    loss = ((lse - logits.gather(1, t_c)) * w_c).sum()
    grad = (torch.exp(logits - lse) - (cols == t_c).float()) * w_c
    return loss, grad


def chunked_lm_loss(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int, chunk: int
) -> torch.Tensor:
    """Mean cross-entropy of ``h (..., C) @ weight (Vp, C).T`` on ``targets (...)``, over the
    first ``vocab_size`` columns, ``chunk`` tokens at a time; -100 targets are ignored.

    Under autocast the matmuls run in the autocast dtype, as ``nn.Linear`` would; the casts
    happen here, outside the autograd function, so autograd returns the weight's gradient to
    the float32 parameter as it does for the plain head.
    """
    device = h.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        h, weight = h.to(dtype), weight.to(dtype)
    with torch.autocast(device, enabled=False):
        return _ChunkedLinearCrossEntropy.apply(
            h.reshape(-1, h.size(-1)), weight, targets.reshape(-1), vocab_size, chunk
        )
