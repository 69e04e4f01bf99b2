"""HellaSwag (Zellers et al. 2019): which of four endings continues a sentence, the zero-shot
accuracy llm.c and nanoGPT report for GPT-2 (124M: about 0.29-0.30 ``acc_norm``; chance: 0.25).

Each example is a context (``ctx``) and four ``endings``, one of them right (``label``). The
model reads ``ctx`` followed by ``" " + ending`` for each; the ending whose tokens it finds
likeliest is its answer: by the mean loss per token (``acc_norm``, length-normalised, the number
llm.c reports) and by their summed loss (``acc``). The examples are the validation split's
10,042 (``HELLASWAG_VAL``, the file llm.c and nanoGPT read), downloaded once into
``$LLMTRAIN_CACHE`` (default ``~/.cache/llmtrain``); a local copy of it reads the same way.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import shutil
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from llmtrain.checkpoint import load_trainer_state
from llmtrain.config import cache_root
from llmtrain.consolidate import DTYPES
from llmtrain.documents import DataError, StreamError
from llmtrain.model import GPT
from llmtrain.sample import load_gpt
from llmtrain.tokenizer import Tokenizer, get_tokenizer

HELLASWAG_VAL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"


@dataclass(frozen=True)
class Example:
    ctx: str
    endings: tuple[str, ...]
    label: int


def cached_download(url: str, key: str = "--hellaswag-data") -> Path:
    """The file at ``url``, downloaded once into $LLMTRAIN_CACHE (default ~/.cache/llmtrain)."""
    path = cache_root() / "hellaswag" / Path(urllib.parse.urlparse(url).path).name
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:  # a download cut short never becomes the cached file
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as f:
            shutil.copyfileobj(response, f)
            # A connection closed early ends read() as the file's end would: only the length
            # the server announced tells them apart (a chunked body raises IncompleteRead).
            if (size := response.headers.get("Content-Length")) and f.tell() != int(size):
                raise OSError(f"the connection closed after {f.tell():,} of {int(size):,} bytes")
        os.replace(partial, path)
    except (OSError, http.client.HTTPException) as e:  # urllib's errors are OSErrors
        partial.unlink(missing_ok=True)
        raise StreamError(
            f"{key} {url}: cannot download it ({e}); offline, download "
            "hellaswag_val.jsonl where there is network and give its path"
        ) from e
    return path


def load_examples(
    source: str = HELLASWAG_VAL, limit: int | None = None, key: str = "--hellaswag-data"
) -> list[Example]:
    """The first ``limit`` examples (None: all) of HellaSwag JSON lines at a URL or path;
    ``key`` is the option that named it, for the errors (DataError, or StreamError: a failed
    download, worth another try)."""
    path = cached_download(source, key) if "://" in source else Path(source)
    if not path.is_file():
        raise DataError(f"{key} {source}: no such file")
    examples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if limit is not None and len(examples) == limit:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                example = Example(row["ctx"], tuple(row["endings"]), int(row["label"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise DataError(
                    f"{key} {source}: line {number} is not a HellaSwag example "
                    f"({type(e).__name__}: {e}); each line holds ctx, endings and label"
                ) from None
            if len(example.endings) != 4 or not 0 <= example.label < 4:
                raise DataError(
                    f"{key} {source}: line {number} has {len(example.endings)} endings "
                    f"and label {example.label}; HellaSwag has four, labelled 0-3"
                )
            examples.append(example)
    if not examples:
        raise DataError(f"{key} {source}: no examples in it")
    return examples


def _rows(example: Example, tokenizer: Tokenizer, window: int) -> list[tuple[list[int], int]]:
    """(tokens, where the ending starts) per ending, each cut to its last ``window`` tokens (the
    context loses its start; the ending is kept whole where it fits)."""
    ctx = tokenizer.encode(example.ctx)
    rows = []
    for ending in example.endings:
        tokens = ctx + tokenizer.encode(" " + ending)
        cut = max(0, len(tokens) - window)
        rows.append((tokens[cut:], max(1, len(ctx) - cut)))  # the first token has no prediction
    return rows


@torch.no_grad()
def ending_losses(
    model: GPT,
    tokenizer: Tokenizer,
    examples: list[Example],
    window: int,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss and token count of each ending, (len(examples), endings) each: one forward
    pass over the examples' rows, right-padded (a causal model never reads the padding)."""
    rows = [row for ex in examples for row in _rows(ex, tokenizer, window)]
    device = device or next(model.parameters()).device
    length = max(len(tokens) for tokens, _ in rows)
    idx = torch.zeros(len(rows), length, dtype=torch.long)
    scored = torch.zeros(len(rows), length, dtype=torch.bool)  # the positions of the ending
    for i, (tokens, start) in enumerate(rows):
        idx[i, : len(tokens)] = torch.tensor(tokens)
        scored[i, start : len(tokens)] = True
    idx, scored = idx.to(device), scored.to(device)
    logits, _ = model(idx)  # (rows, length, padded vocab), float
    loss = F.cross_entropy(
        logits[:, :-1, : model.vocab_size].transpose(1, 2), idx[:, 1:], reduction="none"
    )  # (rows, length - 1): the loss of token t + 1 given tokens ..t
    mask = scored[:, 1:]
    total = (loss * mask).sum(1).view(len(examples), -1)
    count = mask.sum(1).view(len(examples), -1)
    return total, count


def hellaswag(
    model: GPT,
    tokenizer: Tokenizer,
    examples: list[Example],
    window: int,
    batch_size: int = 8,
    accelerator: Any = None,
) -> dict[str, float | int]:
    """``acc_norm`` (mean loss per token), ``acc`` (summed loss) and ``examples``, over
    ``batch_size`` examples per forward pass. The caller sets ``eval()`` and autocast.

    With an ``accelerator``, each process scores every world_size-th example and the counts
    are summed; all take the same number of forward passes (a ZeRO-3 or FSDP2 model gathers
    its weights in each, together), one with no examples left scoring one it does not count.
    """
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    device = accelerator.device if accelerator else next(model.parameters()).device
    share = examples[rank::world]
    batches = math.ceil(math.ceil(len(examples) / world) / batch_size)
    counts = torch.zeros(3, dtype=torch.long, device=device)  # (acc, acc_norm, examples)
    for b in range(batches):
        batch = share[b * batch_size : (b + 1) * batch_size]
        total, count = ending_losses(model, tokenizer, batch or examples[:1], window, device)
        if batch:
            labels = torch.tensor([ex.label for ex in batch], device=device)
            counts[0] += (total.argmin(1) == labels).sum()
            counts[1] += ((total / count).argmin(1) == labels).sum()
            counts[2] += len(batch)
    if accelerator:
        counts = accelerator.reduce(counts, reduction="sum")
    acc, acc_norm, n = counts.tolist()
    return {"acc": acc / n, "acc_norm": acc_norm / n, "examples": n}


def hellaswag_checkpoint(
    path: str,
    source: str = HELLASWAG_VAL,
    limit: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    dtype: str = "fp32",
    processes: Any = None,
) -> dict[str, Any]:
    """HellaSwag accuracy of the checkpoint ``path`` names (of a run dir, its newest intact
    one), each row cut to the run's training window, ``data.seq_len``; with ``processes``
    (llmtrain-eval's), each process scores a share of the examples."""
    examples = load_examples(source, limit)  # before minutes of reading a large checkpoint
    model, cfg, ckpt = load_gpt(path, processes.device if processes else device)
    tokenizer = get_tokenizer(cfg.data.tokenizer)
    window = min(cfg.data.seq_len, cfg.model.context_length)
    with torch.autocast(torch.device(device).type, DTYPES[dtype], enabled=dtype != "fp32"):
        scores = hellaswag(model, tokenizer, examples, window, batch_size, processes)
    step = load_trainer_state(ckpt).step
    return {"checkpoint": str(ckpt), "step": step, "task": "hellaswag", "source": source,
            **scores, "device": device, "dtype": dtype,
            "processes": processes.num_processes if processes else 1}  # fmt: skip


__all__ = [
    "HELLASWAG_VAL",
    "Example",
    "cached_download",
    "ending_losses",
    "hellaswag",
    "hellaswag_checkpoint",
    "load_examples",
]
