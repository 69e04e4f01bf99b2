"""What one HellaSwag evaluation (``trainer.hellaswag_every``) costs a model, in seconds.

python benchmarks/hellaswag_cost.py [--model gpt2-small] [--examples 10042] [--ctx 80] [--ending 25]

The real validation file cannot be downloaded everywhere (the GPU hosts here have no network),
so the examples are synthetic, with the shape that matters for the cost: ``--ctx`` context
tokens and four endings of ``--ending`` tokens, cut from the shipped FineWeb sample. The model
is the named config at random init (the cost does not depend on the weights), eager, in bf16
autocast on a GPU, scored as the training loop scores it (``llmtrain.hellaswag.hellaswag``,
batches of 8 examples). The shapes are this script's choice, not HellaSwag's measured lengths:
say which were used with any figure.
"""

from __future__ import annotations

import argparse
import time

import pyarrow.parquet as pq
import torch

from llmtrain.config import load_config
from llmtrain.data import SAMPLE_DIR
from llmtrain.hellaswag import Example, hellaswag
from llmtrain.model import GPT
from llmtrain.tokenizer import get_tokenizer


def synthetic_examples(n: int, ctx: int, ending: int) -> list[Example]:
    """``n`` examples of ``ctx`` and 4 x ``ending`` tokens of FineWeb text (label 0)."""
    tok = get_tokenizer("gpt2")
    files = sorted((SAMPLE_DIR / "data").glob("*/*.parquet"))
    ids = [i for f in files for text in pq.read_table(f, columns=["text"])["text"].to_pylist()
           for i in tok.encode(text)]  # fmt: skip
    size = ctx + 4 * ending
    examples = []
    for k in range(n):
        at = (k * size) % (len(ids) - size)
        parts = [ids[at : at + ctx]] + [
            ids[at + ctx + e * ending : at + ctx + (e + 1) * ending] for e in range(4)
        ]
        text = [tok.decode(p) for p in parts]
        examples.append(Example(text[0], tuple(text[1:]), 0))
    return examples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gpt2-small", help="a conf/model name")
    ap.add_argument("--examples", type=int, default=10042, help="HellaSwag val has 10,042")
    ap.add_argument("--ctx", type=int, default=80, help="context tokens per example")
    ap.add_argument("--ending", type=int, default=25, help="tokens per ending")
    ap.add_argument("--batch", type=int, default=8, help="examples per forward pass")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = load_config([f"model={args.model}", "trainer.max_steps=1"])
    model = GPT(cfg.model).to(device).eval()
    tok = get_tokenizer(cfg.data.tokenizer)
    examples = synthetic_examples(args.examples, args.ctx, args.ending)
    with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        hellaswag(model, tok, examples[: 2 * args.batch], cfg.data.seq_len, args.batch)  # warm
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        hellaswag(model, tok, examples, cfg.data.seq_len, args.batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
    took = time.perf_counter() - start
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(
        f"hellaswag cost | {args.model} on {name}, torch {torch.__version__}: {args.examples:,} "
        f"synthetic examples ({args.ctx} + 4 x {args.ending} tokens), batch {args.batch}: "
        f"{took:.1f} s, {args.examples / took:,.1f} examples/s"
    )


if __name__ == "__main__":
    main()
