"""llmtrain-sample: text from a checkpoint of any dist mode, through ``GPT.generate``.

::

    llmtrain-sample runs/smoke --prompt "The meaning of life is" --num-samples 3 --seed 1

Generation keeps a KV cache (one forward pass per new token over one position), so its cost grows
linearly with the length. Each new token is predicted from at most ``--context-length`` tokens:
by default the run's training window, ``data.seq_len`` (positions past it were never trained).
Past that the context slides, as nanoGPT crops it: each new token is predicted from the last
ones, recomputed in full.
``--temperature 0`` is greedy and ignores top-k/top-p; otherwise the next token is drawn from the
``top_k`` most likely and/or the smallest set holding ``top_p`` of the probability (Holtzman et
al. 2020). All samples are one batch drawn from one seeded generator:
the same seed gives the same text. A sample ends at the tokenizer's end-of-text token (the model
would start an unrelated document after it) or after ``--max-new-tokens``.

The prompt may contain ``<|endoftext|>`` as the special token (as the exported Hugging Face
tokenizer reads it); an empty prompt starts from end-of-text alone, like GPT-2's unconditional
samples.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from llmtrain.checkpoint import load_trainer_state
from llmtrain.config import TrainConfig
from llmtrain.consolidate import DTYPES
from llmtrain.export import load_checkpoint
from llmtrain.integrity import CheckpointError
from llmtrain.model import GPT
from llmtrain.tokenizer import get_tokenizer


def load_gpt(path: str | Path, device: str = "cpu") -> tuple[GPT, TrainConfig, Path]:
    """(model in eval mode on ``device``, saved config, checkpoint dir) for CKPT of any layout."""
    state, cfg, ckpt = load_checkpoint(path)
    model = GPT(cfg.model)
    model.load_state_dict(state)  # load_checkpoint checked names and shapes; tied heads are both
    return model.to(device).eval(), cfg, ckpt


def device_and_dtype(parser: argparse.ArgumentParser, device: str, dtype: str) -> tuple[str, str]:
    """--device auto|cpu|cuda and --dtype auto|fp32|bf16 as used: auto is cuda where there is
    one, and bf16 there (fp32 on the CPU)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available (use --device cpu)")
    return device, dtype if dtype != "auto" else ("bf16" if device == "cuda" else "fp32")


@torch.no_grad()
def sample(
    model: GPT,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    num_samples: int = 1,
    stop_id: int | None = None,
    dtype: torch.dtype = torch.float32,
    window: int | None = None,
) -> list[list[int]]:
    """``num_samples`` continuations of ``prompt`` (new ids only), each cut after ``stop_id``;
    each token predicted from at most ``window`` tokens (default: model.context_length)."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([prompt] * num_samples, device=device)  # (num_samples, T)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        out = model.generate(
            idx, max_new_tokens, temperature, top_k, top_p, generator, stop_id, window
        )
    samples = []
    for row in out[:, len(prompt) :].tolist():
        if stop_id in row:
            row = row[: row.index(stop_id) + 1]
        samples.append(row)
    return samples


def length_notes(cfg: TrainConfig, window: int, prompt_len: int, max_new: int) -> list[str]:
    """What a user should know about a prompt and sample this long, each token predicted from
    at most ``window`` tokens."""
    trained = cfg.data.seq_len
    why = "--context-length" if window != trained else "data.seq_len, the run's training window"
    notes = []
    if prompt_len > window:
        notes.append(f"the prompt is {prompt_len} tokens; the model sees its last {window} ({why})")
    if prompt_len + max_new > window:
        notes.append(
            f"past {window} tokens ({why}) the context slides: each new token is predicted from "
            "the last ones, recomputed in full (slower than the cached tokens before it)"
        )
    used = min(prompt_len + max_new - 1, window)  # positions read: the last token is not
    if cfg.model.position == "learned" and used > trained:
        # model.context_length sizes the position table; training fills only its first
        # data.seq_len rows, and the others keep their random initial values.
        notes.append(
            f"the run that wrote this checkpoint trained on windows of data.seq_len={trained} "
            f"tokens; learned positions {trained}..{used - 1} were never trained "
            f"(model.context_length={cfg.model.context_length} is the table's size), so the "
            f"text may degrade: --context-length {trained} stays within them"
        )
    return notes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="llmtrain-sample",
        description="Generate text from an llmtrain checkpoint (any dist mode) with a KV cache.",
    )
    parser.add_argument("checkpoint", help="a step_XXXXXXX dir, a checkpoints/ dir or a run dir")
    parser.add_argument("--prompt", default="", help="text to continue (default: unconditional)")
    parser.add_argument("--prompt-file", default=None, help="continue this file's text instead")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="tokens per sample (default: 100); past the context length, the context slides",
    )
    parser.add_argument(
        "--context-length",
        type=int,
        default=None,
        help="tokens each new token is predicted from (default: data.seq_len the run trained "
        "on; at most model.context_length)",
    )
    parser.add_argument("--temperature", type=float, default=0.8, help="default 0.8; 0 = greedy")
    parser.add_argument("--top-k", type=int, default=50, help="default 50; 0 = no cut")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus mass, default 1 = no cut")
    parser.add_argument("--seed", type=int, default=None, help="default: a fresh random seed")
    parser.add_argument("--num-samples", type=int, default=1, help="default 1")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--dtype", choices=("auto", "fp32", "bf16"), default="auto", help="auto: bf16 on cuda"
    )
    args = parser.parse_args(argv)
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        parser.error(f"--temperature {args.temperature}: must be >= 0 (0 is greedy)")
    if args.top_k < 0:
        parser.error(f"--top-k {args.top_k}: must be >= 0 (0 disables it)")
    if not 0 < args.top_p <= 1:
        parser.error(f"--top-p {args.top_p}: must be in (0, 1]")
    if args.num_samples < 1:
        parser.error(f"--num-samples {args.num_samples}: must be >= 1")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens {args.max_new_tokens}: must be >= 1")
    if args.context_length is not None and args.context_length < 1:
        parser.error(f"--context-length {args.context_length}: must be >= 1")
    if args.prompt_file is not None:
        if args.prompt:
            parser.error("--prompt and --prompt-file: give one of them")
        try:
            args.prompt = Path(args.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            parser.error(f"--prompt-file {args.prompt_file}: {e}")
    device, dtype = device_and_dtype(parser, args.device, args.dtype)
    seed = args.seed if args.seed is not None else torch.seed() % 2**31

    try:
        model, cfg, ckpt = load_gpt(args.checkpoint, device)
        tokenizer = get_tokenizer(cfg.data.tokenizer)
        prompt = tokenizer.encode_prompt(args.prompt)
        window = args.context_length or min(cfg.data.seq_len, cfg.model.context_length)
        if window > cfg.model.context_length:  # no position past it was ever trained
            parser.error(
                f"--context-length {window}: the model's model.context_length is "
                f"{cfg.model.context_length}"
            )
        max_new = args.max_new_tokens or 100
        for note in length_notes(cfg, window, len(prompt), max_new):
            print(f"note: {note}", file=sys.stderr)
        step = load_trainer_state(ckpt).step
        greedy = args.temperature == 0
        how = (
            "greedy"
            if greedy
            else f"temperature {args.temperature}, top_k {args.top_k or 'off'}, "
            f"top_p {args.top_p}, seed {seed}"
        )
        print(f"{ckpt} (step {step}, {cfg.model.name}) on {device}/{dtype}: {how}", file=sys.stderr)
        samples = sample(
            model,
            prompt,
            max_new,
            temperature=args.temperature,
            top_k=args.top_k or None,
            top_p=args.top_p,
            seed=seed,
            num_samples=args.num_samples,
            stop_id=tokenizer.eot_id,
            dtype=DTYPES[dtype],
            window=window,
        )
    except (OSError, ValueError, CheckpointError) as e:  # ConfigError is a ValueError
        parser.exit(2, f"llmtrain-sample: error: {e}\n")
    for i, ids in enumerate(samples, 1):
        ended = ids[-1:] == [tokenizer.eot_id]
        text = tokenizer.decode(ids[:-1] if ended else ids)
        print(f"=== sample {i}/{len(samples)} ===")
        print(args.prompt + text + ("\n[end of text]" if ended else ""), flush=True)


if __name__ == "__main__":
    main()


__all__ = ["load_gpt", "sample"]
