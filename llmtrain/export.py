"""llmtrain-export: a checkpoint of any dist mode -> a Hugging Face ``transformers`` directory.

::

    llmtrain-export runs/smoke runs/smoke-hf       # the run's newest complete checkpoint
    llmtrain-export runs/smoke/checkpoints/step_0000100 out/ --dtype bf16 --force

What OUT holds, loadable with ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained(OUT)``:

- ``config.json``: ``GPT2LMHeadModel`` or ``LlamaForCausalLM`` (:func:`llmtrain.hf.hf_config`),
  bos/eos = the tokenizer's end-of-text id.
- ``model.safetensors``: the weights through :func:`llmtrain.consolidate.full_state_dict`
  (single, DDP, ZeRO-1/2/3 or FSDP2 checkpoints alike) and :func:`llmtrain.hf.to_hf_state_dict`.
  The vocabulary padding is cut off: ``vocab_size`` in config.json is ``model.vocab_size``, the
  tokenizer's true size, so the logits have exactly as many columns as the tokenizer has ids.
  A tied ``lm_head`` is stored once, as transformers itself does.
- ``generation_config.json``: bos/eos/pad = end-of-text, so ``generate`` stops at the end of a
  document; everything else is transformers' default (greedy). The tokenizer pads with
  end-of-text on the left, so a batch of prompts (``pipeline(..., batch_size=8)``) generates as
  each prompt alone does.
- ``tokenizer.json`` + ``tokenizer_config.json``: the run's tiktoken encoding converted with
  transformers' ``TikTokenConverter`` (same ranks, same pre-tokenizer pattern). Token ids equal
  ``tiktoken``'s ``encode(text, allowed_special="all")``: ``<|endoftext|>`` in a text is the
  special token, as in every Hugging Face GPT-2 tokenizer, and ``vocab_size`` counts it (50257).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from llmtrain.checkpoint import read_newest_intact, resolve_checkpoint, saved_config
from llmtrain.config import ConfigError, TrainConfig
from llmtrain.consolidate import DTYPES, full_state_dict
from llmtrain.hf import hf_config, hf_family, to_hf_state_dict
from llmtrain.integrity import CheckpointError
from llmtrain.model import GPT
from llmtrain.tokenizer import Tokenizer, get_tokenizer

HF_CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}
TOKENIZER_CLASS = "PreTrainedTokenizerFast"


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], TrainConfig, Path]:
    """(fp32 state dict, saved config, checkpoint dir) for a checkpoint of any dist mode; of
    a run directory, its newest intact checkpoint."""
    ckpt, cfg, state = read_newest_intact(path, _config_and_weights)
    if cfg.model.tie_embeddings:  # safetensors stores a shared tensor once, under either name
        tied = state.get("transformer.wte.weight", state.get("lm_head.weight"))
        if tied is not None:
            state["transformer.wte.weight"] = state["lm_head.weight"] = tied
    with torch.device("meta"):  # the names and shapes, without allocating or initialising
        expected = {k: v.shape for k, v in GPT(cfg.model).state_dict().items()}
    problems = [f"missing {k}" for k in expected.keys() - state.keys()]
    problems += [f"unexpected {k}" for k in state.keys() - expected.keys()]
    problems += [
        f"{k}: shape {tuple(state[k].shape)}, config says {tuple(shape)}"
        for k, shape in expected.items()
        if k in state and state[k].shape != shape
    ]
    if problems:
        raise ValueError(
            f"{ckpt}: the weights do not match its config.yaml: " + "; ".join(sorted(problems)[:5])
        )
    return state, cfg, ckpt


def _config_and_weights(ckpt: Path) -> tuple[Path, TrainConfig, dict[str, torch.Tensor]]:
    return ckpt, saved_config(ckpt), full_state_dict(ckpt)  # fp32, whatever the run trained in


@lru_cache(maxsize=4)
def _converted(tokenizer: Tokenizer) -> Any:
    """A ``tokenizers.Tokenizer`` with the encoding's ranks, pattern and specials (~3 s)."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    enc = tokenizer.encoding
    with tempfile.TemporaryDirectory() as tmp:
        ranks = Path(tmp) / "ranks.tiktoken"  # tiktoken's file format: base64(bytes) rank
        lines = (f"{base64.b64encode(t).decode()} {r}\n" for t, r in enc._mergeable_ranks.items())
        ranks.write_text("".join(lines))
        # The converter gives the special tokens the ids after the ranks, in order; where an
        # encoding leaves ids unused (cl100k_base: 100256, 100261-100275) a reserved
        # placeholder takes each, so every special keeps its id.
        by_id = {i: t for t, i in enc._special_tokens.items()}
        first = len(enc._mergeable_ranks)
        added = [by_id.get(i, f"<|reserved_{i}|>") for i in range(first, enc.n_vocab)]
        # In the tokenizers library's regex (Oniguruma) "{1,3}+" is not possessive but "one
        # or more of {1,3}": cl100k_base's \p{N}{1,3}+ split 1234567890 as 123|456|78|90.
        # Greedy is the same here (nothing follows in its branch to backtrack for).
        pattern = re.sub(r"(\{\d+(?:,\d*)?\})\+", r"\1", enc._pat_str)
        # The private fields are what transformers' own convert_tiktoken_to_fast reads.
        converter = TikTokenConverter(
            vocab_file=str(ranks), pattern=pattern, extra_special_tokens=added
        )
        # tiktoken.load, which reads the file, also copies it into tiktoken's cache dir under a
        # name of its path: a new temporary path each time, a new copy each export. "" turns
        # that cache off, for the read of a file that is gone a moment later.
        with mock.patch.dict(os.environ, TIKTOKEN_CACHE_DIR=""):
            converted = converter.converted()
    # The specials join the model's vocabulary too, as in Hugging Face's own GPT-2 tokenizer:
    # its vocab_size then counts every id (gpt2: 50257, not 50256), which code sizing an
    # embedding by tokenizer.vocab_size relies on.
    from tokenizers import Tokenizer as Fast

    fields = json.loads(converted.to_str())
    for special in fields["added_tokens"]:
        fields["model"]["vocab"].setdefault(special["content"], special["id"])
    return Fast.from_str(json.dumps(fields))


def hf_tokenizer(tokenizer: Tokenizer, context_length: int) -> Any:
    """The tiktoken encoding as a transformers fast tokenizer (same ids, checked for specials)."""
    from transformers import PreTrainedTokenizerFast

    converted = _converted(tokenizer)
    specials = tokenizer.encoding._special_tokens  # {text: id}
    eot = tokenizer.decode([tokenizer.eot_id])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=converted,
        bos_token=eot,
        eos_token=eot,
        pad_token=eot,  # batches of prompts pad on the left, so each continues its own text
        padding_side="left",
        model_max_length=context_length,
        clean_up_tokenization_spaces=False,  # decode must give back the text unchanged
    )
    wrong = {t: i for t, i in specials.items() if fast.convert_tokens_to_ids(t) != i}
    if wrong:  # never seen since the reserved placeholders; a new encoding's layout may be
        raise ConfigError(
            f"data.tokenizer={tokenizer.name}: special tokens {sorted(wrong)} would get other ids "
            "in the transformers tokenizer, so the export could not be loaded as trained"
        )
    return fast


def export(
    ckpt: str | Path,
    out: str | Path,
    dtype: str = "fp32",
    force: bool = False,
    max_shard_size: str | int = "5GB",
) -> Path:
    """Write ``ckpt`` as a transformers directory ``out``; returns the checkpoint used. Weights
    larger than ``max_shard_size`` are split into model-0000i-of-0000n.safetensors files with a
    model.safetensors.index.json, as ``save_pretrained`` writes them (llama-8b in fp32 is 30 GB)."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    out = Path(out).absolute()
    if out.is_symlink():  # write where it points (another disk, perhaps) and keep the link
        out = out.resolve()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a directory")
    occupied = out.is_dir() and any(out.iterdir())
    if occupied and not force:
        raise FileExistsError(f"{out}: directory is not empty; pass --force to replace it")
    given, ckpt = ckpt, resolve_checkpoint(ckpt)
    if out.resolve() == ckpt.resolve() or out.resolve() in ckpt.resolve().parents:
        raise FileExistsError(f"{out}: holds the checkpoint {ckpt}; choose another OUT")
    root = ckpt.resolve().parent
    if root.name == "checkpoints" and root in out.resolve().parents:  # it rotates
        raise FileExistsError(
            f"{out}: inside {ckpt.parent}, where a resumed run's trainer.keep_last deletes old "
            "steps with all they hold; choose another OUT (the run dir itself is fine)"
        )
    if occupied and not (out / "config.json").is_file():  # a mistyped OUT: a run dir...
        raise FileExistsError(
            f"{out}: not an earlier export (no config.json); --force replaces only an export: "
            "choose another OUT, or empty it yourself"
        )
    state, cfg, ckpt = load_checkpoint(given)  # the newest intact one, for a run directory
    try:
        family = hf_family(cfg.model)
    except ConfigError as e:
        raise ConfigError(f"cannot export {ckpt}: {e}") from e
    tokenizer = get_tokenizer(cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"{ckpt}: model.vocab_size={cfg.model.vocab_size} is smaller than the "
            f"{tokenizer.name} tokenizer's {tokenizer.vocab_size} ids"
        )
    eot = tokenizer.eot_id

    config = hf_config(cfg.model)
    config.architectures = [HF_CLASSES[family]]
    config.bos_token_id = config.eos_token_id = eot
    config.dtype = {"fp32": "float32", "bf16": "bfloat16"}[dtype]
    generation = GenerationConfig(bos_token_id=eot, eos_token_id=eot, pad_token_id=eot)
    weights = to_hf_state_dict(state, cfg.model)
    del state  # now only weights holds the fp32 tensors: each is freed once converted
    if cfg.model.tie_embeddings:  # transformers re-ties lm_head to the embedding on load
        del weights["lm_head.weight"]
    for name in list(weights):  # one tensor at a time: never a whole second copy (bf16)
        weights[name] = weights[name].to(DTYPES[dtype]).contiguous()

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover from a crashed export
    tmp.mkdir(parents=True)
    try:
        config.save_pretrained(tmp)
        if family == "llama":  # transformers 5 writes the theta only inside rope_parameters;
            # 4.x (and other readers of config.json) take rope_theta from the top level and
            # would otherwise rotate with their default of 10000
            fields = json.loads((tmp / "config.json").read_text())
            fields["rope_theta"] = cfg.model.rope_theta
            (tmp / "config.json").write_text(json.dumps(fields, indent=2))
        split = split_torch_state_dict_into_shards(weights, max_shard_size=max_shard_size)
        for filename, names in split.filename_to_tensors.items():
            save_file({n: weights[n] for n in names}, str(tmp / filename), {"format": "pt"})
            # safetensors creates the file 0600; give it the mode (umask) the other files got
            os.chmod(tmp / filename, (tmp / "config.json").stat().st_mode & 0o777)
        if split.is_sharded:
            index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        generation.save_pretrained(tmp)
        hf_tokenizer(tokenizer, cfg.model.context_length).save_pretrained(tmp)
        # transformers 5 names its class TokenizersBackend, which 4.x cannot load; both load
        # tokenizer.json under the older name
        tok_config = tmp / "tokenizer_config.json"
        fields = json.loads(tok_config.read_text())
        tok_config.write_text(json.dumps({**fields, "tokenizer_class": TOKENIZER_CLASS}, indent=2))
        if out.is_dir():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:  # no half-written OUT.tmp (the size of the model) is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ckpt


def shard_size(value: str) -> int | str:
    """--max-shard-size: bytes, or a number and unit as save_pretrained takes it (5GB, 500MB)."""
    if value.isdigit():
        return int(value)
    if not re.fullmatch(r"\d+(\.\d+)?\s*[KMGT]B", value, flags=re.IGNORECASE):
        raise argparse.ArgumentTypeError(f"{value!r}: give bytes, or a size such as 5GB or 500MB")
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="llmtrain-export",
        description="Write an llmtrain checkpoint (any dist mode) as a Hugging Face transformers "
        "directory: GPT2LMHeadModel or LlamaForCausalLM, config, generation config, tokenizer.",
    )
    parser.add_argument("checkpoint", help="a step_XXXXXXX dir, a checkpoints/ dir or a run dir")
    parser.add_argument("out", help="output directory (created; must be empty unless --force)")
    parser.add_argument(
        "--dtype", choices=tuple(DTYPES), default="fp32", help="weights dtype (default fp32)"
    )
    parser.add_argument("--force", action="store_true", help="replace an earlier export in OUT")
    parser.add_argument(
        "--max-shard-size",
        default="5GB",
        type=shard_size,
        help="split larger weights into files of this size: 5GB (the default), 500MB, or bytes",
    )
    args = parser.parse_args(argv)
    try:
        ckpt = export(args.checkpoint, args.out, args.dtype, args.force, args.max_shard_size)
    except (OSError, ValueError, CheckpointError) as e:  # ConfigError is a ValueError
        parser.exit(2, f"llmtrain-export: error: {e}\n")
    cfg = saved_config(ckpt)
    family = HF_CLASSES[hf_family(cfg.model)]
    print(f"exported {ckpt} -> {args.out} ({family}, {args.dtype}, vocab {cfg.model.vocab_size})")
    print(f"load it: AutoModelForCausalLM.from_pretrained({str(args.out)!r})")


if __name__ == "__main__":
    main()


__all__ = ["export", "hf_tokenizer", "load_checkpoint", "resolve_checkpoint"]
