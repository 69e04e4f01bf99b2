"""Hugging Face transformers <-> llmtrain: the config and weight-name mapping, written once.

GPT-2-style configs map to ``GPT2LMHeadModel``, Llama-style ones to ``LlamaForCausalLM``.
Differences in layout handled here:

- GPT-2 in transformers uses ``Conv1D`` (weight stored (in, out)): our ``nn.Linear`` weights
  (out, in) are transposed.
- Llama keeps q/k/v and gate/up/down as separate projections; ours fuses q/k/v into ``c_attn``
  (rows [q | k | v]). Our RoPE already uses transformers' "rotate_half" (non-interleaved) layout,
  so no q/k permutation is needed.
- Our vocabulary is padded to ``vocab_pad_multiple``; the padding rows are dropped on export and
  re-added as zeros on import.

transformers is imported lazily: it is a dev/export dependency, not a training one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from llmtrain.config import ConfigError, ModelConfig
from llmtrain.model import padded_vocab

StateDict = dict[str, torch.Tensor]

GPT2_STYLE = {"position": "learned", "norm": "layernorm", "mlp": "gelu"}
LLAMA_STYLE = {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu"}


def hf_family(cfg: ModelConfig) -> str:
    """'gpt2' or 'llama'; ConfigError for a mix transformers has no model class for."""
    fields = {name: getattr(cfg, name) for name in GPT2_STYLE}
    if fields == GPT2_STYLE:
        if not cfg.bias:
            raise ConfigError("model.bias: GPT-2 in transformers always has biases; set bias=true")
        if (cfg.n_kv_head or cfg.n_head) != cfg.n_head:
            raise ConfigError(
                "model.n_kv_head: GPT-2 in transformers has no grouped-query attention; "
                "leave n_kv_head null or equal to n_head"
            )
        return "gpt2"
    if fields == LLAMA_STYLE:
        return "llama"
    raise ConfigError(
        f"model.position/norm/mlp = {fields['position']}/{fields['norm']}/{fields['mlp']}: "
        "transformers can represent learned/layernorm/gelu (GPT-2) or rope/rmsnorm/swiglu "
        "(Llama), not a mix"
    )


def hf_config(cfg: ModelConfig) -> Any:
    """A ``transformers.GPT2Config`` or ``LlamaConfig`` describing the same network."""
    import transformers

    hidden = cfg.ffn_hidden or 4 * cfg.n_embd
    if hf_family(cfg) == "gpt2":
        gpt2_tokens = 50256 if cfg.vocab_size == 50257 else None
        return transformers.GPT2Config(
            vocab_size=cfg.vocab_size,
            n_positions=cfg.context_length,
            n_embd=cfg.n_embd,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            n_inner=hidden,
            activation_function="gelu_new",  # the tanh approximation GPT-2 trained with
            resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout,
            layer_norm_epsilon=cfg.norm_eps,
            initializer_range=cfg.init_std,
            tie_word_embeddings=cfg.tie_embeddings,
            bos_token_id=gpt2_tokens,
            eos_token_id=gpt2_tokens,
        )
    return transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.n_embd,
        intermediate_size=hidden,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head or cfg.n_head,
        head_dim=cfg.n_embd // cfg.n_head,
        hidden_act="silu",
        max_position_embeddings=cfg.context_length,
        initializer_range=cfg.init_std,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        attention_bias=cfg.bias,
        attention_dropout=cfg.dropout,
        mlp_bias=cfg.bias,
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=None,
        eos_token_id=None,
    )


def _layer_names(cfg: ModelConfig) -> list[tuple[str, str, bool]]:
    """(our suffix, HF suffix, transpose) for the per-block tensors that map one to one."""
    if hf_family(cfg) == "gpt2":
        names = [
            ("ln_1.weight", "ln_1.weight", False),
            ("ln_1.bias", "ln_1.bias", False),
            ("attn.c_attn.weight", "attn.c_attn.weight", True),
            ("attn.c_attn.bias", "attn.c_attn.bias", False),
            ("attn.c_proj.weight", "attn.c_proj.weight", True),
            ("attn.c_proj.bias", "attn.c_proj.bias", False),
            ("ln_2.weight", "ln_2.weight", False),
            ("ln_2.bias", "ln_2.bias", False),
            ("mlp.c_fc.weight", "mlp.c_fc.weight", True),
            ("mlp.c_fc.bias", "mlp.c_fc.bias", False),
            ("mlp.c_proj.weight", "mlp.c_proj.weight", True),
            ("mlp.c_proj.bias", "mlp.c_proj.bias", False),
        ]
        return names
    names = [
        ("ln_1.weight", "input_layernorm.weight", False),
        ("ln_2.weight", "post_attention_layernorm.weight", False),
    ]
    for ours, theirs in (
        ("attn.c_proj", "self_attn.o_proj"),
        ("mlp.c_gate", "mlp.gate_proj"),
        ("mlp.c_fc", "mlp.up_proj"),
        ("mlp.c_proj", "mlp.down_proj"),
    ):
        names.append((f"{ours}.weight", f"{theirs}.weight", False))
        if cfg.bias:
            names.append((f"{ours}.bias", f"{theirs}.bias", False))
    return names


def _qkv_sizes(cfg: ModelConfig) -> list[int]:
    hd = cfg.n_embd // cfg.n_head
    kv = cfg.n_kv_head or cfg.n_head
    return [cfg.n_head * hd, kv * hd, kv * hd]


def _prefixes(cfg: ModelConfig) -> tuple[str, str, str]:
    """(HF block prefix, HF embedding name, HF final norm name)."""
    if hf_family(cfg) == "gpt2":
        return "transformer.h", "transformer.wte.weight", "transformer.ln_f"
    return "model.layers", "model.embed_tokens.weight", "model.norm"


def to_hf_state_dict(state_dict: StateDict, cfg: ModelConfig) -> StateDict:
    """Our ``GPT.state_dict()`` -> the state dict of the matching transformers model.

    Padding rows of the vocabulary are dropped. ``lm_head.weight`` is always present (equal to
    the embedding when tied), as ``state_dict()`` of the transformers model has it too.
    """
    family = hf_family(cfg)
    blocks, wte, ln_f = _prefixes(cfg)
    sd = {k.removeprefix("_orig_mod."): v for k, v in state_dict.items()}  # torch.compile'd
    V = cfg.vocab_size
    out: StateDict = {wte: sd["transformer.wte.weight"][:V]}
    if family == "gpt2":
        out["transformer.wpe.weight"] = sd["transformer.wpe.weight"]
    for i in range(cfg.n_layer):
        ours, theirs = f"transformer.h.{i}.", f"{blocks}.{i}."
        for our_name, hf_name, transpose in _layer_names(cfg):
            w = sd[ours + our_name]
            out[theirs + hf_name] = w.t() if transpose else w
        if family == "llama":
            for part in ("weight", "bias") if cfg.bias else ("weight",):
                q, k, v = sd[f"{ours}attn.c_attn.{part}"].split(_qkv_sizes(cfg), dim=0)
                out[f"{theirs}self_attn.q_proj.{part}"] = q
                out[f"{theirs}self_attn.k_proj.{part}"] = k
                out[f"{theirs}self_attn.v_proj.{part}"] = v
    out[f"{ln_f}.weight"] = sd["transformer.ln_f.weight"]
    if "transformer.ln_f.bias" in sd:
        out[f"{ln_f}.bias"] = sd["transformer.ln_f.bias"]
    out["lm_head.weight"] = sd["lm_head.weight"][:V]
    return {k: v.contiguous() for k, v in out.items()}


def from_hf_state_dict(hf_sd: StateDict, cfg: ModelConfig) -> StateDict:
    """A transformers state dict -> ours, ready for ``GPT(cfg).load_state_dict``.

    The vocabulary is padded back to ``vocab_pad_multiple`` with zero rows (never a target, so
    they stay inert). Buffers transformers keeps (rotary ``inv_freq``, causal masks) are ignored.
    """
    family = hf_family(cfg)
    blocks, wte, ln_f = _prefixes(cfg)
    V = cfg.vocab_size
    padded = padded_vocab(cfg)

    def pad(w: torch.Tensor) -> torch.Tensor:  # (V, C) -> (padded, C)
        if w.size(0) != V:
            raise ValueError(f"vocabulary has {w.size(0)} rows, model.vocab_size is {V}")
        return torch.cat((w, w.new_zeros(padded - V, w.size(1))), dim=0)

    out: StateDict = {"transformer.wte.weight": pad(hf_sd[wte])}
    if family == "gpt2":
        out["transformer.wpe.weight"] = hf_sd["transformer.wpe.weight"]
    for i in range(cfg.n_layer):
        ours, theirs = f"transformer.h.{i}.", f"{blocks}.{i}."
        for our_name, hf_name, transpose in _layer_names(cfg):
            w = hf_sd[theirs + hf_name]
            out[ours + our_name] = w.t() if transpose else w
        if family == "llama":
            for part in ("weight", "bias") if cfg.bias else ("weight",):
                qkv = [hf_sd[f"{theirs}self_attn.{p}_proj.{part}"] for p in "qkv"]
                out[f"{ours}attn.c_attn.{part}"] = torch.cat(qkv, dim=0)
    out["transformer.ln_f.weight"] = hf_sd[f"{ln_f}.weight"]
    if f"{ln_f}.bias" in hf_sd:
        out["transformer.ln_f.bias"] = hf_sd[f"{ln_f}.bias"]
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["transformer.wte.weight"]
    else:
        out["lm_head.weight"] = pad(hf_sd["lm_head.weight"])
    return {k: v.contiguous() for k, v in out.items()}


# trainer.init_from=hf:REPO_OR_DIR: a transformers model's weights (GPT-2 from the Hub, or an
# export of ours) into this config's model. Its config.json must describe the same network:
# each key compared, as (transformers' name, ours, the default when config.json leaves it out).
HF_PREFIX = "hf:"
_SAME = {
    "gpt2": [
        ("n_layer", "n_layer", None),
        ("n_head", "n_head", None),
        ("n_embd", "n_embd", None),
        ("n_positions", "context_length", None),
        ("vocab_size", "vocab_size", None),
        ("n_inner", "ffn_hidden", None),  # null: 4 x n_embd
        ("layer_norm_epsilon", "norm_eps", 1e-5),
        ("tie_word_embeddings", "tie_embeddings", True),
    ],
    "llama": [
        ("num_hidden_layers", "n_layer", None),
        ("num_attention_heads", "n_head", None),
        ("num_key_value_heads", "n_kv_head", None),  # null: num_attention_heads
        ("hidden_size", "n_embd", None),
        ("intermediate_size", "ffn_hidden", None),
        ("vocab_size", "vocab_size", None),
        ("rope_theta", "rope_theta", 10000.0),
        ("rms_norm_eps", "norm_eps", 1e-6),
        ("tie_word_embeddings", "tie_embeddings", False),
        ("attention_bias", "bias", False),
    ],
}


def is_hf_source(init_from: str | None) -> bool:
    return bool(init_from) and str(init_from).startswith(HF_PREFIX)


def hf_source(spec: str, weights: bool = True) -> Path:
    """The directory ``hf:REPO_OR_DIR`` names: a local one as it is (``llmtrain-export``'s
    output, a ``save_pretrained`` dir), else a Hub repo's config and safetensors weights,
    downloaded by huggingface_hub into its cache (or found there, offline). ``weights=False``:
    its JSON files only, for a rank that gets the weights from rank 0 (every rank fetched an
    8B model's 16 GB before)."""
    name = spec.removeprefix(HF_PREFIX)
    if Path(name).expanduser().is_dir():
        return Path(name).expanduser().absolute()
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors"] if weights else ["*.json"]
    try:
        return Path(snapshot_download(name, allow_patterns=patterns))
    except Exception as e:  # no network (HF_HUB_OFFLINE), no such repo, a gated one
        raise ConfigError(
            f"trainer.init_from={spec}: {name!r} is neither a directory nor a Hub model that "
            f"could be fetched ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None


def check_hf_model(directory: Path, cfg: ModelConfig, spec: str) -> None:
    """Refuse a transformers model whose network differs from ``cfg``'s, naming each key."""
    try:
        theirs = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"trainer.init_from={spec}: no readable config.json ({e})") from None
    family = hf_family(cfg)
    if theirs.get("model_type") != family:
        raise ConfigError(
            f"trainer.init_from={spec}: a {theirs.get('model_type')!r} model, and this config's "
            f"model is {family}-style; llmtrain reads gpt2 and llama models"
        )
    rope = theirs.get("rope_parameters") or {}  # transformers 5 keeps rope_theta in it
    theirs.setdefault("rope_theta", rope.get("rope_theta"))
    scaled = theirs.get("rope_scaling") or rope.get("rope_type", "default") != "default"
    if scaled:
        raise ConfigError(
            f"trainer.init_from={spec}: its RoPE is scaled ({theirs.get('rope_scaling') or rope}),"
            " which llmtrain's attention does not do"
        )
    defaults = {"n_inner": 4 * theirs.get("n_embd", 0),
                "num_key_value_heads": theirs.get("num_attention_heads")}  # fmt: skip
    ours = {"ffn_hidden": cfg.ffn_hidden or 4 * cfg.n_embd,
            "n_kv_head": cfg.n_kv_head or cfg.n_head}  # fmt: skip
    diffs = []
    for key, our_key, default in _SAME[family]:
        value = theirs.get(key)
        value = (defaults.get(key) if default is None else default) if value is None else value
        mine = ours.get(our_key, getattr(cfg, our_key))
        if value != mine:
            diffs.append(f"model.{our_key}: {spec} has {value} ({key}), this config {mine}")
    if diffs:
        raise ConfigError(
            f"trainer.init_from: cannot start from {spec}: its network differs from this "
            "config's\n  " + "\n  ".join(diffs) + "\nSet these keys (model=gpt2-small is "
            "OpenAI's GPT-2 124M)."
        )


def read_hf_weights(directory: Path, cfg: ModelConfig) -> StateDict:
    """Our state dict from the safetensors files in ``directory`` (fp32). A base model's names
    (``wte.weight``, as OpenAI's GPT-2 on the Hub stores them) get the head model's prefix."""
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ConfigError(
            f"trainer.init_from: no .safetensors weights in {directory} (pytorch_model.bin is a "
            "pickle, which llmtrain does not load)"
        )
    hf_sd: StateDict = {}
    for f in files:
        hf_sd.update(load_file(str(f)))
    blocks, _, _ = _prefixes(cfg)
    head = blocks.split(".")[0] + "."  # transformer. | model.
    if not any(k.startswith(head) for k in hf_sd):
        hf_sd = {k if k.startswith("lm_head.") else head + k: v for k, v in hf_sd.items()}
    try:
        return {k: v.float() for k, v in from_hf_state_dict(hf_sd, cfg).items()}
    except KeyError as e:
        raise ConfigError(f"trainer.init_from: {directory} lacks the weight {e}") from None


__all__ = ["hf_config", "hf_family", "to_hf_state_dict", "from_hf_state_dict"]
