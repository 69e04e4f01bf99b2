"""llmtrain.model: shapes, loss, init, sizes of the shipped configs, generation, checkpointing."""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from llmtrain.config import CONF_DIR, ModelConfig, load_config
from llmtrain.model import GPT, attention_kernel, sample_next

GPT2_TINY = ModelConfig(
    name="gpt2-tiny", n_layer=2, n_head=4, n_embd=32, context_length=32, vocab_size=100
)
LLAMA_TINY = replace(
    GPT2_TINY,
    name="llama-tiny",
    n_kv_head=2,
    ffn_hidden=48,
    position="rope",
    rope_theta=500000.0,
    norm="rmsnorm",
    mlp="swiglu",
    bias=False,
    tie_embeddings=False,
)
TINY = pytest.mark.parametrize("cfg", [GPT2_TINY, LLAMA_TINY], ids=["gpt2", "llama"])
MODEL_NAMES = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


def build(cfg: ModelConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg).eval()


def tokens(cfg: ModelConfig, B: int = 2, T: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (B, T), generator=g)


@TINY
def test_forward_shapes_and_padded_vocab(cfg):
    model = build(cfg)
    assert model.vocab_size == 100
    assert model.padded_vocab_size == 128  # vocab_pad_multiple 64
    assert model.transformer.wte.weight.shape == (128, cfg.n_embd)
    logits, loss = model(tokens(cfg))
    assert logits.shape == (2, 12, 128)
    assert logits.dtype == torch.float32
    assert loss is None


@TINY
def test_loss_is_cross_entropy_over_true_vocab(cfg):
    model = build(cfg)
    idx, targets = tokens(cfg), tokens(cfg, seed=2)
    targets[0, :3] = -100
    logits, loss = model(idx, targets)
    expected = F.cross_entropy(logits[..., :100].reshape(-1, 100), targets.reshape(-1))
    torch.testing.assert_close(loss, expected)
    # A fresh GPT-2 init predicts nearly uniformly: loss close to ln(vocab).
    assert abs(loss.item() - math.log(100)) < 0.5


@TINY
def test_bf16_autocast_loss_is_float32(cfg):
    model = build(cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(tokens(cfg), tokens(cfg, seed=2))
    assert logits.dtype == torch.float32 and loss.dtype == torch.float32


@TINY
def test_causality(cfg):
    model = build(cfg)
    idx = tokens(cfg)
    changed = idx.clone()
    changed[:, 7] = (changed[:, 7] + 1) % cfg.vocab_size
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_architecture_switches():
    gpt2, llama = build(GPT2_TINY), build(LLAMA_TINY)
    names = dict(gpt2.named_parameters())
    assert "transformer.wpe.weight" in names and "transformer.h.0.attn.c_attn.bias" in names
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    names = dict(llama.named_parameters())
    assert "transformer.wpe.weight" not in names
    assert "transformer.h.0.mlp.c_gate.weight" in names
    assert not any(n.endswith(".bias") for n in names)
    assert llama.lm_head.weight is not llama.transformer.wte.weight
    # grouped-query attention: q (4 heads) + k, v (2 heads each) of head_dim 8
    assert llama.transformer.h[0].attn.c_attn.weight.shape == ((4 + 2 + 2) * 8, 32)
    assert llama.transformer.h[0].mlp.c_fc.weight.shape == (48, 32)
    assert gpt2.transformer.h[0].mlp.c_fc.weight.shape == (4 * 32, 32)


def test_init_std_of_residual_projections():
    cfg = replace(GPT2_TINY, n_layer=8, n_embd=256, n_head=4, ffn_hidden=512)
    model = build(cfg)
    std = cfg.init_std
    block = model.transformer.h[0]
    assert block.attn.c_attn.weight.std().item() == pytest.approx(std, rel=0.05)
    residual = std / math.sqrt(2 * cfg.n_layer)
    assert block.attn.c_proj.weight.std().item() == pytest.approx(residual, rel=0.05)
    assert block.mlp.c_proj.weight.std().item() == pytest.approx(residual, rel=0.05)
    assert torch.all(block.attn.c_attn.bias == 0) and torch.all(block.ln_1.weight == 1)


@TINY
def test_meta_build_then_init_weights(cfg):
    with torch.device("meta"):
        model = GPT(cfg)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    reference = GPT(cfg)
    torch.manual_seed(0)
    reference.init_weights()
    for (name, p), q in zip(
        model.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(p, q, msg=name)
    tied = model.lm_head.weight is model.transformer.wte.weight
    assert tied == cfg.tie_embeddings
    logits, _ = model(tokens(cfg))  # rope tables need no buffers re-created
    torch.testing.assert_close(logits, reference(tokens(cfg))[0])


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_config_composes_and_builds_on_meta(name):
    cfg = load_config([f"model={name}", "trainer.max_steps=1"]).model
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.num_params() > 0
    logits, _ = model(torch.zeros(1, 8, dtype=torch.long, device="meta"))
    assert logits.shape == (1, 8, model.padded_vocab_size)


def meta_model(name: str, *overrides: str) -> GPT:
    cfg = load_config([f"model={name}", "trainer.max_steps=1", *overrides]).model
    with torch.device("meta"):
        return GPT(cfg)


@pytest.mark.parametrize(
    "name, millions, non_embedding",
    [
        ("gpt2-small", 124, 85.0),
        ("gpt2-medium", 355, 302.4),
        ("gpt2-large", 774, 708.0),
        ("gpt2-xl", 1558, 1475.6),
    ],
)
def test_gpt2_parameter_counts(name, millions, non_embedding):
    # GPT-2 paper sizes; ours pad the vocabulary 50257 -> 50304 (+0.05% at 124M).
    model = meta_model(name)
    assert model.num_params() == pytest.approx(millions * 1e6, rel=0.01)
    assert model.num_params(non_embedding=True) == pytest.approx(non_embedding * 1e6, rel=0.01)


def test_llama_1b_parameter_count():
    # Llama 3.2 1B: 1.24B with its 128256-token vocabulary and tied embeddings.
    model = meta_model("llama-1b", "model.vocab_size=128256")
    assert model.padded_vocab_size == 128256
    assert model.num_params() == pytest.approx(1.236e9, rel=0.01)
    assert model.num_params(non_embedding=True) == pytest.approx(0.973e9, rel=0.01)
    # The same shape on the GPT-2 tokenizer: embedding 50304 x 2048 instead of 128256 x 2048.
    model = meta_model("llama-1b")
    assert model.num_params() == pytest.approx(1.076e9, rel=0.01)
    assert "non-embedding" in model.param_summary()


def test_num_params_counts_tied_weights_once():
    tied, untied = build(GPT2_TINY), build(replace(GPT2_TINY, tie_embeddings=False))
    embedding = 128 * 32
    assert untied.num_params() - tied.num_params() == embedding
    body = tied.num_params() - embedding - 32 * 32  # minus wte and wpe
    assert tied.num_params(non_embedding=True) == body


def greedy_without_cache(model: GPT, idx: torch.Tensor, n: int) -> torch.Tensor:
    """nanoGPT's loop: every token from the last context_length tokens, recomputed."""
    for _ in range(n):
        logits, _ = model(idx[:, -model.cfg.context_length :])
        idx = torch.cat((idx, logits[:, -1, : model.vocab_size].argmax(-1, keepdim=True)), 1)
    return idx


@TINY
def test_kv_cache_generation_equals_greedy_recompute(cfg):
    model = build(cfg)
    prompt = tokens(cfg, T=5)
    cached = model.generate(prompt, max_new_tokens=10, temperature=0)
    assert cached.shape == (2, 15)
    assert torch.equal(cached, greedy_without_cache(model, prompt, 10))


@TINY
def test_cached_chunk_after_prefix_matches_full_forward(cfg):
    model = build(cfg)
    idx = tokens(cfg, T=10)
    full, _ = model(idx)
    cache = model.new_kv_cache(10)
    chunks = [model(idx[:, a:b], kv_cache=cache)[0] for a, b in ((0, 4), (4, 6), (6, 10))]
    torch.testing.assert_close(torch.cat(chunks, 1), full, atol=1e-5, rtol=1e-5)  # 2 tokens too


@TINY
@pytest.mark.parametrize("prompt_len", [5, 32, 40], ids=["short", "context", "longer"])
def test_generation_past_the_context_slides_its_window(cfg, prompt_len):
    # context_length 32: 5 + 40 new tokens pass it after 27. A larger init makes the next token
    # depend on the whole window (at 0.02 it is mostly the last token's embedding).
    model = build(replace(cfg, init_std=0.5))
    prompt = tokens(cfg, T=prompt_len)
    out = model.generate(prompt, max_new_tokens=40, temperature=0)
    assert out.shape == (2, prompt_len + 40)
    assert torch.equal(out, greedy_without_cache(model, prompt, 40))


def test_a_batch_stops_once_every_row_has_produced_the_stop_id():
    model = build(GPT2_TINY)
    prompt = tokens(GPT2_TINY, T=4)
    greedy = model.generate(prompt, 12, temperature=0)
    stop = int(greedy[0, 4])  # row 0 stops at its first new token
    ends = [row.index(stop) + 1 if stop in row else 12 for row in greedy[:, 4:].tolist()]
    assert ends[1] > 1  # row 1 goes on after it
    out = model.generate(prompt, 12, temperature=0, stop_id=stop)
    assert torch.equal(out, greedy[:, : 4 + max(ends)])


def test_sampling_stays_in_true_vocab():
    model = build(GPT2_TINY)
    with torch.no_grad():  # make the padding ids the most likely by far
        model.lm_head.weight[100:] = 1.0
        model.transformer.wte.weight[100:] = 1.0
    g = torch.Generator().manual_seed(0)
    out = model.generate(tokens(GPT2_TINY, T=2), 20, temperature=2.0, generator=g)
    assert out.max().item() < model.vocab_size


def test_top_k_and_top_p_never_pick_outside():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g)
    top5 = logits.topk(5).indices
    for _ in range(50):
        picked = sample_next(logits, temperature=1.5, top_k=5, generator=g)
        assert (picked == top5).any(-1).all()
    # logits where the top-2 hold 0.9 of the mass: top_p=0.8 keeps exactly those two.
    probs = torch.tensor([[0.5, 0.4, 0.05, 0.03, 0.02]])
    for _ in range(50):
        picked = sample_next(probs.log(), temperature=1.0, top_p=0.8, generator=g)
        assert picked.item() in (0, 1)
    # top_p small enough keeps only the argmax.
    picked = sample_next(probs.log(), top_p=0.1, generator=g)
    assert picked.item() == 0


def test_temperature_zero_is_argmax():
    logits = torch.randn(3, 20)
    assert torch.equal(sample_next(logits, temperature=0), logits.argmax(-1, keepdim=True))


@TINY
def test_activation_checkpointing_same_loss_and_grads(cfg):
    idx, targets = tokens(cfg), tokens(cfg, seed=2)
    plain, ckpt = build(cfg).train(), build(cfg).train()
    ckpt.enable_activation_checkpointing()
    _, loss_a = plain(idx, targets)
    _, loss_b = ckpt(idx, targets)
    loss_a.backward()
    loss_b.backward()
    torch.testing.assert_close(loss_a, loss_b)
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_attention_kernel_pins_one_kernel():
    """trainer.attention: a named kernel is the only one allowed, so a call it cannot serve
    fails instead of silently falling back (the efficient kernel has no CPU implementation)."""
    q = torch.randn(1, 2, 8, 4)
    want = F.scaled_dot_product_attention(q, q, q, is_causal=True)
    for name in ("auto", "flash", "math"):
        with attention_kernel(name):
            got = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        torch.testing.assert_close(got, want)
    with attention_kernel("efficient"), pytest.raises(RuntimeError, match="backend"):
        F.scaled_dot_product_attention(q, q, q, is_causal=True)


def test_param_groups_decay_matrices_only():
    model = build(LLAMA_TINY)
    decay, no_decay = model.configure_param_groups(weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() < 2 for p in no_decay["params"])
    n = sum(p.numel() for group in (decay, no_decay) for p in group["params"])
    assert n == model.num_params()
    tied = build(GPT2_TINY)  # the tied matrix appears once
    groups = tied.configure_param_groups(0.1)
    assert sum(len(g["params"]) for g in groups) == len(list(tied.parameters()))
    torch.optim.AdamW(groups, lr=1e-3)
