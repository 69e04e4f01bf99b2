"""Tokens for training: stream documents -> tokenize -> pack into windows -> split by rank.

Documents come from :mod:`llmtrain.documents` (one streaming ``datasets.load_dataset`` call for
FineWeb on the Hub, the shipped sample and local files alike). They are tokenized in
batches (tiktoken ``encode_ordinary_batch``), each followed by EOT, and the token stream is cut
into windows of ``seq_len + 1`` tokens every ``stride`` tokens (inputs = window[:-1], targets =
window[1:]). A document longer than a window continues into the next one; only the final
partial window of a finite pass is dropped.

The packing itself is :class:`llmtrain.packing.PackedDocuments` (text sources) or
:class:`llmtrain.shards.ShardWindows` (pre-tokenized shards); this module deals their batches
out in a fixed worker order and builds the loader for a config.

Splitting: ranks get shards (or every world_size-th document) through
``datasets.distributed.split_dataset_by_node``; DataLoader workers get shards from ``datasets``
itself. Each worker packs its own documents, so no token is seen twice or skipped.

Exact resume: a worker's position is (epoch, the ``datasets`` state before its current batch of
documents, the tokens carried over from earlier batches (< seq_len + 1), tokens consumed since).
Every batch travels with that position, and :class:`TokenLoader` hands batches out in a fixed
worker order, so ``state_dict()`` after batch k restores exactly batch k + 1, with or without
workers. The exception is ``data.shuffle_buffer > 0``: ``datasets`` does not save the buffer's
content, so a resumed run skips the documents that were in it (about ``shuffle_buffer``
documents). Shard-order shuffling (the default) resumes exactly.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
import signal
import threading
from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from llmtrain.config import DataConfig
from llmtrain.documents import (
    SAMPLE_DIR,
    STATS,
    DataError,
    StreamError,
    holds_out,
    matched_files,
    one_training_text_file,
    single_text_file,
    training_documents,
    validation_documents,
)
from llmtrain.packing import PackedDocuments
from llmtrain.signals import PREEMPT_SIGNALS
from llmtrain.tokenizer import Tokenizer

__all__ = [
    "SAMPLE_DIR",
    "DataError",
    "PackedDocuments",
    "StreamError",
    "TokenLoader",
    "build_dataloader",
]


# The settings behind a saved data position's keys, as an error names them.
NAMES = {
    "kind": "data.source",
    "world_size": "world size",
    "seed": "trainer.seed",
    "held_out": "held-out validation (data.val_docs / val_split / val_files / val_fraction)",
    "corpus": "the shards in data.path",
    "files": "the files data.files matches",
}
# Meanings a checkpoint from an older llmtrain lacks, and why its position cannot go on here.
BEFORE = {
    "order": "the data position was saved by an llmtrain whose data.shuffle ordered the shard "
    "files only; this one also shuffles the windows inside them, so the saved position would "
    "read other windows. Resume with trainer.resume_data=false (the model, optimizer and step "
    "are kept; the data is read from its start, in the new order)",
}


def _check_files_read(saved: list[list], now: list[list]) -> None:
    """Unshuffled shards are read file after file, so a position keeps its place when files
    are added after the saved ones (a corpus prepared further); any other change moves it."""
    if now[: len(saved)] == saved:
        return
    i = next((i for i, (a, b) in enumerate(zip(saved, now, strict=False)) if a != b), len(now))
    was = f"{saved[i][0]} ({saved[i][1]:,} tokens)"
    is_now = f"{now[i][0]} ({now[i][1]:,} tokens)" if i < len(now) else "missing"
    raise DataError(
        f"the data position was saved over {len(saved)} files in data.path, read in order, and "
        f"file {i + 1} was {was}, now {is_now}: the saved position would read other windows. "
        "Only files added after the saved ones keep it; restore the files, or resume with "
        "trainer.resume_data=false to read this run's data from its start"
    )


def _ignore_stop_signals(worker_id: int) -> None:
    """In a DataLoader worker: the stop signals are the training process's to handle (finish
    the step, save). A SIGTERM to the whole process group (Slurm, ``timeout``, ``kill --
    -PGID``) killed the workers first, and the run crashed unsaved; a Ctrl-C printed its
    message once more per worker. SIGTERM from the training process itself (the loader, or
    Python's exit, shutting its workers down) still ends the worker: a thread waits for it and
    looks at the sender."""
    for sig in PREEMPT_SIGNALS:
        if sig != signal.SIGTERM:
            signal.signal(sig, signal.SIG_IGN)
    # Blocked in this thread (and every thread started after it), taken by the waiting one.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    parent = os.getppid()

    def wait() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
                os._exit(0)

    threading.Thread(target=wait, name="llmtrain-sigterm", daemon=True).start()


def _from_worker(e: DataError) -> DataError:
    """The DataError as a DataLoader worker raised it: torch re-raises it in the training
    process with the worker's whole traceback as its message, which the user would read."""
    head = f"\n{type(e).__module__}.{type(e).__qualname__}: "
    message = str(e)
    return type(e)(message.rpartition(head)[2].strip()) if head in message else e


class TokenLoader:
    """Batches of (x, y) long tensors (batch_size, seq_len) with an exact, small state.

    Train loaders run forever (epochs for finite corpora) and each ``iter()`` continues from the
    current state; validation loaders make one deterministic pass from the start at every
    ``iter()``. Batches come from workers in a fixed round-robin order, so the state is
    (next worker, each worker's position) and resuming needs the same num_workers.
    """

    def __init__(
        self,
        source: Any,
        cfg: DataConfig,
        *,
        batch_size: int,
        train: bool,
        rank: int,
        world_size: int,
        kind: str,
        seed: int = 0,
        max_workers: int | None = None,
    ) -> None:
        self.source, self.cfg, self.batch_size, self.train = source, cfg, batch_size, train
        self.rank, self.world_size, self.kind, self.seed = rank, world_size, kind, seed
        # More workers than shards would idle (datasets gives workers whole shards).
        self.num_workers = min(cfg.num_workers, max_workers or cfg.num_workers)
        self.pin_memory = cfg.pin_memory and torch.cuda.is_available()
        self._state = self._fresh_state()

    def _fresh_state(self) -> dict[str, Any]:
        n = max(1, self.num_workers)
        return {
            "next": 0,
            "done": [False] * n,
            "workers": [None] * n,
            "stats": [dict.fromkeys(STATS, 0)] * n,
            "batches": 0,
            "windows": 0,  # this rank's, counted as they come (a resume may change batch_size)
        }

    @property
    def stats(self) -> dict[str, int]:
        """Documents used, and skipped as empty / undecodable / held out, so far."""
        return {k: sum(s[k] for s in self._state["stats"]) for k in STATS}

    @property
    def epoch(self) -> int:
        """The pass over its training data this rank is in: 1, then 2 once any of its workers
        has delivered a batch from a second reading of its documents, and so on."""
        return 1 + max((w["epoch"] for w in self._state["workers"] if w), default=0)

    @property
    def reshuffles(self) -> bool:
        """Whether a new epoch reads in another order: data.shuffle orders a stream's files
        (so a corpus of one file has a single order) and every window of token shards."""
        return self.cfg.shuffle and (self.kind == "shards" or self.source.ds.n_shards > 1)

    def _meaning(self) -> dict[str, Any]:
        """What a saved position means depends on; a resume must match every value. A stream
        position indexes into one batch of documents' tokens (data.tokenize_batch; their text
        column, less the documents held out for validation) and into an epoch's shard order
        (data.shuffle, and trainer.seed when shuffled); a window index depends on the stride."""
        keys = {
            "kind": self.kind,
            "num_workers": self.num_workers,
            "world_size": self.world_size,
            "seq_len": self.cfg.seq_len,
            "stride": self.cfg.stride or self.cfg.seq_len,
            "shuffle": self.cfg.shuffle,
        }
        if self.kind == "hf":
            keys["tokenize_batch"] = self.cfg.tokenize_batch
            keys["text_column"] = self.cfg.text_column
            if files := matched_files(self.cfg):  # the position counts documents in these
                keys["files"] = files
            if single_text_file(self.cfg):
                keys["held_out"] = f"the last {self.cfg.val_fraction:g} of the text"
            else:
                held = sorted(getattr(self.source, "heldout", ()))
                digest = hashlib.blake2b(b"".join(held), digest_size=4).hexdigest()
                keys["held_out"] = f"{len(held)} documents ({digest})"
        if self.cfg.shuffle:
            keys["seed"] = self.seed
            if self.kind == "shards":
                keys["order"] = "windows"  # see BEFORE
                keys["corpus"] = self.source.corpus()
        elif self.kind == "shards":
            keys["files_read"] = self.source.listing()  # see _check_files_read
        return keys

    def state_dict(self) -> dict[str, Any]:
        windows = self._state["windows"]
        return copy.deepcopy(
            {
                **self._state,
                **self._meaning(),
                "version": 1,
                "rank": self.rank,
                "windows": windows,
                "global_windows": windows * self.world_size,
                "global_tokens": windows * self.world_size * self.cfg.seq_len,
            }
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        always = ("kind", "num_workers", "world_size", "seq_len")  # older checkpoints lack the rest
        meaning = self._meaning()
        if "files_read" in meaning and "files_read" in state:
            _check_files_read(state["files_read"], meaning.pop("files_read"))
        for key, mine in meaning.items():
            # Before f68bc3d a position did not record data.shuffle, which was on then too.
            if key in BEFORE and key not in state and state.get("shuffle", True):
                raise DataError(BEFORE[key])
            if (key in always or key in state) and state.get(key) != mine:
                name = NAMES.get(key, f"data.{key}")
                raise DataError(
                    f"the data position was saved with {name}={state.get(key)} and this run "
                    f"has {mine}; exact resume needs the same value (set {name} back), or "
                    "resume with trainer.resume_data=false to read this run's data from its start"
                )
        keys = ("next", "done", "workers", "stats", "batches", "windows")
        self._state = copy.deepcopy({k: state[k] for k in keys})

    def _items(self, state: dict[str, Any]) -> Iterator[tuple]:
        self.source.resume = state["workers"] if self.train else []
        if self.num_workers == 0:
            return iter(self.source)
        return iter(
            DataLoader(
                self.source,
                batch_size=None,
                num_workers=self.num_workers,
                pin_memory=False,  # pinned in _inputs_and_targets, after slicing
                prefetch_factor=self.cfg.prefetch_factor,
                persistent_workers=False,
                # Each iter() draws the workers' base seed from this generator; from the global
                # one, every evaluation (and a resume) would move training's dropout RNG.
                generator=torch.Generator().manual_seed(0),
                worker_init_fn=_ignore_stop_signals,
            )
        )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = max(1, self.num_workers)
        if not self.train:  # every validation pass starts from the beginning
            self._state = self._fresh_state()
        state = self._state
        items, pending = self._items(state), [deque() for _ in range(n)]
        while not all(state["done"]):
            w = state["next"]
            if state["done"][w]:
                state["next"] = (w + 1) % n
                continue
            while not pending[w]:
                try:
                    item = next(items)
                except DataError as e:
                    raise _from_worker(e) from e.__cause__
                pending[item[0]].append(item)
            _, windows, pos, stats = pending[w].popleft()
            state["workers"][w], state["stats"][w] = pos, stats
            if windows is None:
                state["done"][w] = True
                continue
            state["next"], state["batches"] = (w + 1) % n, state["batches"] + 1
            state["windows"] += len(windows)
            yield self._inputs_and_targets(windows)
        if self.train or state["batches"] == 0:
            raise DataError(self._ran_out())

    def _ran_out(self) -> str:
        """Why the stream ended: a training stream is endless (epochs), so for it any end is an
        error (an empty loop would spin forever); a validation pass must give one batch."""
        readers = self.world_size * max(1, self.num_workers)
        if self.kind == "shards" and self.train and 0 < self.source.windows < readers:
            return (
                f"{self._describe()}: no training window for rank {self.rank}: the shards hold "
                f"{self.source.windows} windows of data.seq_len+1={self.cfg.seq_len + 1} tokens, "
                f"fewer than the {readers} readers ({self.world_size} processes x "
                f"{max(1, self.num_workers)} DataLoader workers) that each take one; use fewer "
                "processes or data.num_workers, or a shorter data.seq_len"
            )
        if self.train and self._state["batches"] > 0:
            what = (
                f"the training stream of rank {self.rank} ended after "
                f"{self._state['batches']} batches: none of its DataLoader workers has a window "
                "left to give"
            )
        else:
            what = (
                f"no {'training' if self.train else 'validation'} window of "
                f"data.seq_len+1={self.cfg.seq_len + 1} tokens"
            )
        none_used = not self.stats.get("documents")
        held_out_all = self.train and self.stats.get("heldout") and none_used
        why = "the corpus is empty or too small"
        if not self.train and not none_used and holds_out(self.cfg):
            why = (
                f"validation is the first data.val_docs={self.cfg.val_docs} training "
                "document(s), and together they are shorter than one window; raise "
                "data.val_docs, or give the validation text with data.val_files=PATH"
            )
        elif none_used and self.stats.get("undecodable"):
            why = (
                "no document could be used: the undecodable ones are not UTF-8 text (a .txt "
                "file is skipped when over 1 in 1,000 of its characters are not); save it as "
                "UTF-8"
            )
        return f"{self._describe()}: {what} (skipped: {self.stats}); {why}" + (
            ". Every document was held out for validation: give the validation text "
            "separately with data.val_files=PATH (a .txt file is one document)"
            if held_out_all
            else ""
        )

    def _inputs_and_targets(self, windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """x = windows[:, :-1], y = windows[:, 1:] as contiguous int64 tensors (B, seq_len).

        On a CUDA machine both live in one pinned buffer, so ``.to(device, non_blocking=True)``
        is a true asynchronous copy: a strided view, or pageable memory, would make the copy
        stage through a pageable buffer and block the host.

        numpy fills the buffer (widening shards' uint16 to int64 in the same pass), not
        ``Tensor.copy_``: torch splits a copy of 32,768+ elements over its OpenMP threads, which
        sleep while the GPU works, and waking them is paid in the loop's data wait (1 batch of
        64 x 1024 in 20 took ~12 ms on a 2-core VM: ``benchmarks/batch_latency.py``, RESULTS.md).
        """
        b, t = windows.shape[0], windows.shape[1] - 1
        xy = torch.empty((2, b, t), dtype=torch.long, pin_memory=self.pin_memory)
        out = xy.numpy()
        out[0] = windows[:, :-1]
        out[1] = windows[:, 1:]
        return xy[0], xy[1]

    def _describe(self) -> str:
        return (
            f"data.files={self.cfg.files!r}" if self.cfg.files else f"data.path={self.cfg.path!r}"
        )


def build_dataloader(
    cfg: DataConfig,
    tokenizer: Tokenizer,
    *,
    split: str,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
) -> TokenLoader:
    """The ``split`` ("train" or "val") of ``cfg`` for one rank, as a resumable TokenLoader.

    Validation is the same on every rank (no split), so every rank evaluates the same batches,
    and its windows never overlap: a token's loss counts once, so val_loss compares across
    strides.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    train = split == "train"
    if not train:  # every validation token scored once, in order, whatever training's stride
        cfg = dataclasses.replace(cfg, shuffle=False, stride=None)
    loader_args = dict(batch_size=batch_size, train=train, rank=rank, world_size=world_size)
    if cfg.source == "shards":
        from llmtrain.shards import ShardWindows

        source = ShardWindows(
            cfg, split, batch_size, seed, rank if train else 0, world_size if train else 1
        )
        source.check_tokenizer(cfg.tokenizer, tokenizer.vocab_size)
        return TokenLoader(source, cfg, kind="shards", seed=seed, **loader_args)
    if train and world_size > 1 and (one := one_training_text_file(cfg)):
        raise DataError(
            f"data.files={one} is one document, and {world_size} ranks split a text corpus by "
            "documents. Token shards split by windows: llmtrain-prepare data=local "
            f"data.files={one}{f' data.val_files={cfg.val_files}' if cfg.val_files else ''} "
            "out_dir=DIR, then train with data=shards data.path=DIR"
        )
    val_ds, heldout = validation_documents(cfg)
    if train:
        ds = training_documents(cfg)
        n = ds.n_shards
        if cfg.shuffle and cfg.shuffle_buffer > 0:
            ds = ds.shuffle(seed=seed, buffer_size=cfg.shuffle_buffer)
    else:
        ds, n = val_ds, val_ds.n_shards
    # A rank gets n_shards / world_size shards when that divides, else every shard (and every
    # world_size-th document of it); datasets then deals the rank's shards to its workers.
    shards = n // world_size if train and n % world_size == 0 else n
    if not train and heldout:
        shards = 1  # take(val_docs) would be divided among workers; keep its order
    source = PackedDocuments(
        ds,
        tokenizer,
        cfg,
        batch_size,
        train,
        seed,
        heldout if train else frozenset(),
        node=(rank, world_size) if train else None,  # split in each worker (see _dataset)
    )
    return TokenLoader(source, cfg, kind="hf", seed=seed, max_workers=max(1, shards), **loader_args)
