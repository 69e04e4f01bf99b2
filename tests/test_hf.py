"""llmtrain.hf: logit parity with Hugging Face transformers, an independent implementation."""

from dataclasses import replace

import pytest
import torch

from llmtrain.config import ConfigError, ModelConfig
from llmtrain.hf import from_hf_state_dict, hf_config, to_hf_state_dict
from llmtrain.model import GPT

transformers = pytest.importorskip("transformers")

GPT2_TINY = ModelConfig(
    name="gpt2-tiny", n_layer=2, n_head=4, n_embd=32, context_length=64, vocab_size=100
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
CONFIGS = {
    "gpt2": GPT2_TINY,
    "gpt2-untied": replace(GPT2_TINY, tie_embeddings=False, ffn_hidden=80),
    "llama-gqa": LLAMA_TINY,
    "llama-tied": replace(LLAMA_TINY, tie_embeddings=True),
    "llama-mha-bias": replace(LLAMA_TINY, n_kv_head=None, bias=True, rope_theta=10000.0),
}
EACH = pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())


def random_model(cfg: ModelConfig, seed: int = 0) -> GPT:
    """Every tensor random (biases and norm gains too), so a wrong mapping cannot hide."""
    torch.manual_seed(seed)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def hf_model(cfg: ModelConfig, state_dict: dict) -> torch.nn.Module:
    config = hf_config(cfg)
    config._attn_implementation = "eager"
    cls = transformers.GPT2LMHeadModel if cfg.mlp == "gelu" else transformers.LlamaForCausalLM
    model = cls(config).eval()
    missing, unexpected = model.load_state_dict(to_hf_state_dict(state_dict, cfg), strict=False)
    assert not unexpected
    assert all("inv_freq" in k or k.endswith("attn.bias") for k in missing), missing
    return model


def tokens(cfg: ModelConfig, B: int = 2, T: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, cfg.vocab_size, (B, T), generator=g)


@EACH
def test_logit_parity(cfg):
    ours = random_model(cfg)
    theirs = hf_model(cfg, ours.state_dict())
    idx = tokens(cfg)
    with torch.no_grad():
        expected = theirs(idx).logits
        logits, _ = ours(idx)
    assert expected.shape == (2, 16, cfg.vocab_size)
    torch.testing.assert_close(logits[..., : cfg.vocab_size], expected, atol=1e-5, rtol=1e-5)


@EACH
def test_loss_parity(cfg):
    ours = random_model(cfg)
    theirs = hf_model(cfg, ours.state_dict())
    idx = tokens(cfg)
    with torch.no_grad():
        expected = theirs(idx, labels=idx).loss  # HF shifts labels inside
        _, loss = ours(idx[:, :-1], idx[:, 1:])
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


@EACH
def test_round_trip(cfg):
    ours = random_model(cfg)
    sd = ours.state_dict()
    back = from_hf_state_dict(to_hf_state_dict(sd, cfg), cfg)
    assert back.keys() == sd.keys()
    V = cfg.vocab_size
    for name, tensor in sd.items():
        if name in ("transformer.wte.weight", "lm_head.weight"):
            torch.testing.assert_close(back[name][:V], tensor[:V], rtol=0, atol=0)
            assert torch.all(back[name][V:] == 0)  # padding rows come back as zeros
        else:
            torch.testing.assert_close(back[name], tensor, rtol=0, atol=0, msg=name)
    GPT(cfg).load_state_dict(back)  # strict


@EACH
def test_import_from_hf_model(cfg):
    torch.manual_seed(1)
    config = hf_config(cfg)
    config._attn_implementation = "eager"
    cls = transformers.GPT2LMHeadModel if cfg.mlp == "gelu" else transformers.LlamaForCausalLM
    theirs = cls(config).eval()
    ours = GPT(cfg).eval()
    ours.load_state_dict(from_hf_state_dict(theirs.state_dict(), cfg))
    idx = tokens(cfg)
    with torch.no_grad():
        torch.testing.assert_close(
            ours(idx)[0][..., : cfg.vocab_size], theirs(idx).logits, atol=1e-5, rtol=1e-5
        )


@EACH
def test_greedy_generation_matches_hf_generate(cfg):
    ours = random_model(cfg)
    theirs = hf_model(cfg, ours.state_dict())
    prompt = tokens(cfg, B=1, T=5)
    expected = theirs.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    assert torch.equal(ours.generate(prompt, max_new_tokens=12, temperature=0), expected)


def test_hf_config_fields():
    config = hf_config(LLAMA_TINY)
    assert config.num_key_value_heads == 2 and config.intermediate_size == 48
    assert config.tie_word_embeddings is False and config.vocab_size == 100
    theta = getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"]
    assert theta == 500000.0
    config = hf_config(GPT2_TINY)
    assert config.n_inner == 128 and config.activation_function == "gelu_new"


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"position": "rope"}, "model.position"),
        ({"norm": "rmsnorm"}, "model.position/norm/mlp"),
        ({"bias": False}, "model.bias"),
        ({"n_kv_head": 2}, "model.n_kv_head"),
    ],
)
def test_unrepresentable_configs_fail_clearly(changes, key):
    with pytest.raises(ConfigError, match=key):
        hf_config(replace(GPT2_TINY, **changes))
