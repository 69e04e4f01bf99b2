"""Pre-tokenized shards in llm.c's ``.bin`` format, read through memmaps.

Format (llm.c ``dev/data/data_common.py``, modded-nanogpt ``data/fineweb.py``): a header of 256
int32 -- magic 20240520, version, token count -- then the tokens: uint16 for version 1, uint32
for version 2 (vocabularies over 65,535 ids). Our files hold documents each followed by EOT;
llm.c's put EOT before each document. Either way documents are EOT-separated.

Training reads the concatenation of the files (in a seed-and-epoch shuffled file order) as one
token stream; window g starts at token g * stride. With ``data.shuffle`` the epoch visits the
windows in a seed-and-epoch shuffled order, every window once (as a course's
``DataLoader(GPTDatasetV1, shuffle=True)`` does); without it, in order. Of S = world_size x
num_workers slots, slot s takes visits s, s + S, s + 2S, ... A position is just (epoch, next
visit), so resume is exact and costs nothing. A training epoch ends at the last multiple of S
visits, so every slot takes the same number per epoch: the ranks stay in step across epochs, and
a checkpoint taken at any step can move to another world size (llmtrain/consolidate.py).
Validation reads the windows in order, in batches of consecutive ones dealt to the workers in
turn: the same batches, and val_loss, whatever data.num_workers is.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from llmtrain.config import DataConfig
from llmtrain.documents import STATS, DataError

MAGIC = 20240520
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
DTYPES = {1: np.uint16, 2: np.uint32}


def write_shard(path: str | os.PathLike, tokens: np.ndarray, vocab_size: int) -> None:
    """Write ``tokens`` as one llm.c shard, atomically (a temp file renamed into place)."""
    if len(tokens) >= 2**31:
        raise DataError(f"{path}: {len(tokens):,} tokens; an llm.c shard holds fewer than 2**31")
    version = 1 if vocab_size <= 2**16 else 2
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = (MAGIC, version, len(tokens))
    tmp = f"{path}.{os.getpid()}.tmp"  # two processes writing one shard each rename a whole one
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype=DTYPES[version]).tobytes())
    os.replace(tmp, path)


def read_shard(path: str | os.PathLike) -> np.ndarray:
    """The tokens of one shard as a read-only memmap; checks magic, version and length."""
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    if len(header) < HEADER_INTS or header[0] != MAGIC:
        raise DataError(f"{path}: not an llm.c token shard (magic {MAGIC} expected)")
    version, ntok = int(header[1]), int(header[2])
    if version not in DTYPES:
        raise DataError(f"{path}: unsupported shard version {version} (known: 1 uint16, 2 uint32)")
    dtype = DTYPES[version]
    expected = HEADER_BYTES + ntok * np.dtype(dtype).itemsize
    if os.path.getsize(path) != expected:
        raise DataError(
            f"{path}: {os.path.getsize(path)} bytes, header says {expected}; "
            "the file is truncated or still being written"
        )
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(ntok,))


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """``manifest.json`` as llmtrain-prepare writes it into ``path``; {} when there is none
    (llm.c's and modded-nanogpt's shards) or it is not a JSON object."""
    with contextlib.suppress(OSError, ValueError):
        manifest = json.loads((Path(path) / "manifest.json").read_text())
        return manifest if isinstance(manifest, dict) else {}
    return {}


def unfinished_splits(path: str | os.PathLike) -> list[str]:
    """The splits llmtrain-prepare is still writing (or was stopped in) by its manifest."""
    splits = read_manifest(path).get("splits") or {}
    return [k for k, v in splits.items() if isinstance(v, dict) and not v.get("done", True)]


def shard_files(cfg: DataConfig, split: str) -> list[str]:
    """The shards of a split: the ``.bin`` files in ``data.path`` whose name ends in ``train``
    (or ``val``) as a word, before an optional shard number, as llm.c and llmtrain-prepare
    name them (``fineweb_train_000001.bin``, ``tiny_shakespeare_val.bin``): the data name
    before it may hold either word (``pre-train_val_000000.bin`` is validation)."""
    root = Path(cfg.path)
    if not root.is_dir():
        raise DataError(f"data.path={cfg.path!r}: no such directory (run llmtrain-prepare first)")
    word = "train" if split == "train" else "val"
    files = sorted(str(f) for f in root.glob("*.bin") if _split_word(f.name) == word)
    if not files:
        raise DataError(
            f"data.path={cfg.path!r}: no {split} shards (.bin files with {word!r} as a word of "
            f"the name, e.g. NAME_{word}_000000.bin)"
        )
    return files


def _split_word(name: str) -> str:
    """NAME_SPLIT_000001.bin or NAME_SPLIT.bin -> SPLIT (lowercase), the word before the number."""
    words = re.split(r"[_.\-]", name.lower().removesuffix(".bin"))
    if len(words) > 1 and words[-1].isdigit():
        words.pop()
    return words[-1]


class ShardWindows(IterableDataset):
    """Windows of seq_len + 1 tokens from memmapped shards, with the data.py item protocol."""

    def __init__(
        self, cfg: DataConfig, split: str, batch_size: int, seed: int, rank: int, world_size: int
    ) -> None:
        self.cfg, self.batch_size, self.seed = cfg, batch_size, seed
        self.train = split == "train"
        self.rank, self.world_size = rank, world_size
        self.files = shard_files(cfg, split)
        maps = [read_shard(f) for f in self.files]
        self.lengths = [len(m) for m in maps]
        self.wide_ids = any(m.dtype == np.uint32 for m in maps)  # written for a vocab > 2**16
        L, stride = cfg.seq_len + 1, cfg.stride or cfg.seq_len
        total = sum(self.lengths)
        self.windows = (total - L) // stride + 1 if total >= L else 0  # in an epoch
        self.resume: list[dict | None] = []

    def corpus(self) -> str:
        """The files as a resume must find them again: a shuffled epoch's order is drawn over
        all their windows, so another file set would move every later window."""
        pairs = zip(self.files, self.lengths, strict=True)
        names = "\n".join(f"{Path(f).name} {n}" for f, n in pairs)
        digest = hashlib.blake2b(names.encode(), digest_size=4).hexdigest()
        return f"{len(self.files)} files, {sum(self.lengths):,} tokens ({digest})"

    def listing(self) -> list[list]:
        """[file name, tokens] of every file, in the order an unshuffled epoch reads them."""
        return [[Path(f).name, n] for f, n in zip(self.files, self.lengths, strict=True)]

    def check_tokenizer(self, name: str, vocab_size: int) -> None:
        """Shards hold the ids of the tokenizer that wrote them: read with another, training
        learns garbage or stops at an embedding index out of range."""
        source = read_manifest(self.cfg.path).get("source")
        written = source.get("tokenizer") if isinstance(source, dict) else None
        if written and written != name:
            raise DataError(
                f"data.path={self.cfg.path!r} was written with data.tokenizer={written} "
                f"(its manifest.json) and this run has {name}; set data.tokenizer={written}"
            )
        if not self.wide_ids and vocab_size > 2**16:
            raise DataError(
                f"data.path={self.cfg.path!r} holds 16-bit token ids (a vocabulary of at most "
                f"65,536, such as gpt2's) and data.tokenizer={name} has {vocab_size:,}; set "
                "data.tokenizer to the one the shards were written with"
            )
        if self.wide_ids and vocab_size <= 2**16:
            raise DataError(
                f"data.path={self.cfg.path!r} holds 32-bit token ids (a vocabulary over 65,536) "
                f"and data.tokenizer={name} has {vocab_size:,}; set data.tokenizer to the one "
                "the shards were written with"
            )

    def _order(self, epoch: int) -> list[int]:
        if not (self.train and self.cfg.shuffle):
            return list(range(len(self.files)))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.files)).tolist()

    def _visits(self, epoch: int, windows: int) -> np.ndarray | None:
        """The epoch's window indices in visiting order, or None for 0, 1, 2, ... (unshuffled).
        4 bytes a window: 40 MB for the 10B-token FineWeb sample at seq 1024."""
        if not (self.train and self.cfg.shuffle):
            return None
        order = np.arange(windows, dtype=np.uint32 if windows < 2**32 else np.int64)
        np.random.default_rng([self.seed, epoch, 1]).shuffle(order)
        return order

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        slot, slots = self.rank * workers + worker, self.world_size * workers
        start = self.resume[worker] if worker < len(self.resume) else None
        yield from self._windows(worker, slot, slots, start)

    def _windows(self, worker: int, slot: int, slots: int, pos: dict | None) -> Iterator[tuple]:
        L, stride = self.cfg.seq_len + 1, self.cfg.stride or self.cfg.seq_len
        # Plain ndarray views of the maps: a np.memmap slice costs 4x more to make (per window).
        maps = [np.asarray(read_shard(f)) for f in self.files]
        if not self.train:
            yield from self._pass(worker, slot, slots, maps)
            return
        windows = self.windows
        count = windows - windows % slots  # visits per epoch, the same for every slot
        pos = dict(pos or {"epoch": 0, "next": slot})
        stats = dict.fromkeys(STATS, 0)
        batch: list[np.ndarray] = []
        while True:
            order, visits = self._order(pos["epoch"]), self._visits(pos["epoch"], windows)
            cum = np.cumsum([0] + [self.lengths[i] for i in order])
            while pos["next"] < count:
                g = pos["next"] if visits is None else int(visits[pos["next"]])
                batch.append(_read(maps, order, cum, g * stride, L))
                pos["next"] += slots
                if len(batch) == self.batch_size:
                    yield worker, np.stack(batch), dict(pos), stats
                    batch = []
            if count == 0:  # a corpus with fewer windows than ranks x workers gives no slot any
                yield worker, None, dict(pos), stats
                return
            pos = {"epoch": pos["epoch"] + 1, "next": slot}

    def _pass(self, worker: int, slot: int, slots: int, maps: list[np.ndarray]) -> Iterator[tuple]:
        """The validation pass, the files and windows in order: batch b holds windows b * B to
        b * B + B - 1 (the last batch fewer) and slot s reads batches s, s + S, ..., so the
        loader's round-robin gives the same batches, and val_loss, for any data.num_workers."""
        L, stride = self.cfg.seq_len + 1, self.cfg.stride or self.cfg.seq_len
        order, B = list(range(len(self.files))), self.batch_size
        cum = np.cumsum([0] + self.lengths)
        stats = dict.fromkeys(STATS, 0)
        batches = -(-self.windows // B)
        for b in range(slot, batches, slots):
            last = min(b * B + B, self.windows)
            windows = [_read(maps, order, cum, g * stride, L) for g in range(b * B, last)]
            yield worker, np.stack(windows), {"epoch": 0, "next": b + slots}, stats
        yield worker, None, {"epoch": 0, "next": max(slot, batches)}, stats


def _read(maps: list[np.ndarray], order: list[int], cum: np.ndarray, start: int, n: int) -> Any:
    """Tokens [start, start + n) of the files concatenated in ``order``, in the shards' dtype
    (uint16 or uint32): a view of the memory map unless the window spans two files. The batch's
    ``np.stack`` copies it out; :class:`llmtrain.data.TokenLoader` widens it to int64 once."""
    i = int(np.searchsorted(cum, start, side="right")) - 1
    parts, off = [], start - int(cum[i])
    while n > 0:
        piece = maps[order[i]][off : off + n]
        parts.append(piece)
        n -= len(piece)
        i, off = i + 1, 0
    return parts[0] if len(parts) == 1 else np.concatenate(parts)
