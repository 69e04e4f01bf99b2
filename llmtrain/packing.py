"""One rank's documents as windows of seq_len + 1 tokens, with a resumable position.

The stream of :mod:`llmtrain.documents` is tokenized in batches of ``data.tokenize_batch``
documents (tiktoken ``encode_ordinary_batch``), each followed by EOT, and cut into windows every
``data.stride`` tokens. A worker's position is (epoch, the ``datasets`` state before its current
batch of documents, the tokens carried over from earlier batches (< seq_len + 1), tokens
consumed since); every batch of windows travels with it, so :class:`llmtrain.data.TokenLoader`
can restore exactly the next one. Training streams run forever, an epoch after another; a
stream that drops is reopened at the same document (see ``_next_documents``).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterator
from itertools import chain, islice
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from llmtrain.config import DataConfig
from llmtrain.documents import STATS, StreamError, clean_texts, is_transient, read_error
from llmtrain.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# Seconds between reopenings of a remote stream whose read failed (see _next_documents).
STREAM_RETRY_WAITS = (10, 20, 40, 80, 160, 300)
# Shuffled epochs in a row in which a worker that never read a document reads none, before its
# share of the corpus is taken to be empty for good (see PackedDocuments._never_again).
EMPTY_EPOCHS = 16


class PackedDocuments(IterableDataset):
    """One rank's documents as (batch_size, seq_len + 1) windows, with a resumable position.

    Iterating yields ``(worker, windows | None, position, stats)``; ``None`` marks a worker with
    nothing more to give. ``resume[worker]`` is the position to start each worker from.
    """

    def __init__(
        self,
        ds: Any,
        tokenizer: Tokenizer,
        cfg: DataConfig,
        batch_size: int,
        train: bool,
        seed: int,
        heldout: frozenset[bytes],
        node: tuple[int, int] | None = None,
    ) -> None:
        self.ds, self.tok, self.cfg = ds, tokenizer, cfg
        self.batch_size, self.train, self.seed, self.heldout = batch_size, train, seed, heldout
        self.node = node  # (rank, world_size) to split ds by, in each worker (see _dataset)
        self.resume: list[dict | None] = []

    def _dataset(self) -> Any:
        """This worker's own ``datasets`` view of the rank's documents, made in the worker.

        ``datasets`` keeps a dataset's epoch in a torch tensor in shared memory, shared by the
        parent and every forked DataLoader worker, and ``set_epoch`` is a read-modify-write of it.
        On one shared dataset, two workers setting the epoch at once could leave it at twice the
        value (another shard order: two workers read the same shard and one shard is skipped),
        and a worker starting a new epoch changed the shard order of one starting beside it. A
        dataset made here has an epoch of its own. Validation (node None) is never shuffled: its
        epoch stays 0.
        """
        if self.node is None:
            return self.ds
        from datasets.distributed import split_dataset_by_node

        rank, world_size = self.node
        return split_dataset_by_node(self.ds, rank=rank, world_size=world_size)

    def _hf_epoch(self, epoch: int) -> int:
        # datasets reshuffles the shard order with default_rng(epoch) for any nonzero epoch;
        # 0 keeps the files' own order (validation, or data.shuffle=false).
        return self.seed * 100_003 + epoch + 1 if self.cfg.shuffle else 0

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        start = self.resume[worker] if worker < len(self.resume) else None
        yield from self._windows(self._dataset(), worker, copy.deepcopy(start))

    def _windows(self, ds: Any, worker: int, pos: dict | None) -> Iterator[tuple]:
        cfg, L = self.cfg, self.cfg.seq_len + 1
        stride = cfg.stride or cfg.seq_len
        eot = self.tok.eot_id
        pos = pos or {
            "epoch": 0,
            "hf": None,
            "carry": [],
            "consumed": 0,
            "epoch_docs": 0,
            "empty_epochs": 0,  # epochs in a row without a document (see _never_again)
            "stats": dict.fromkeys(STATS, 0),
        }
        stats = dict(pos["stats"])
        batch: list[np.ndarray] = []
        while True:  # epochs
            ds.set_epoch(self._hf_epoch(pos["epoch"]))
            ds.load_state_dict(pos["hf"])
            rows_it = iter(ds)
            while True:  # batches of documents
                rows, rows_it = self._next_documents(ds, rows_it, pos)
                hf_after = ds.state_dict() if rows else None
                texts = clean_texts(rows, cfg, self.heldout, stats)
                ids = self.tok.encode_batch(texts)
                for t in ids:
                    t.append(eot)
                n = sum(len(t) for t in ids)
                buf = np.fromiter(chain(pos["carry"], *ids), np.int64, len(pos["carry"]) + n)
                p = pos["consumed"]
                while p + L <= len(buf):
                    batch.append(buf[p : p + L])
                    p += stride
                    if len(batch) == self.batch_size:
                        yield worker, np.stack(batch), {**pos, "consumed": p}, dict(stats)
                        batch = []
                after_docs = pos["epoch_docs"] + len(texts)
                pos = {
                    "epoch": pos["epoch"],
                    "hf": hf_after,
                    "carry": buf[p:].tolist(),
                    "consumed": 0,
                    "epoch_docs": after_docs,
                    "empty_epochs": pos.get("empty_epochs", 0),
                    "stats": dict(stats),
                }
                if len(rows) < cfg.tokenize_batch:
                    break
            empty = pos["epoch_docs"] == 0
            pos["empty_epochs"] = pos.get("empty_epochs", 0) + 1 if empty else 0
            if not self.train or (empty and self._never_again(pos, stats)):
                if batch and not self.train:  # a finite pass ends with its last, smaller batch
                    yield worker, np.stack(batch), pos, dict(stats)
                yield worker, None, pos, dict(stats)
                return
            pos = {**pos, "epoch": pos["epoch"] + 1, "hf": None, "epoch_docs": 0}

    def _next_documents(self, ds: Any, rows_it: Iterator, pos: dict) -> tuple[list, Iterator]:
        """The next data.tokenize_batch documents, and the iterator to read on from.

        ``datasets`` retries each failed read of a remote file (for about 100 s). When a read
        still fails on a network error, the stream is reopened where this batch of documents
        began (``pos["hf"]``: nothing is skipped or read twice) after STREAM_RETRY_WAITS, about
        10 minutes in all, well inside the ranks' collective timeout (dist.timeout_s). A stream
        still unreachable is a StreamError (requeued); anything else, such as a corrupt file,
        is a DataError naming the source.
        """
        attempt = 0
        while True:
            try:
                return list(islice(rows_it, self.cfg.tokenize_batch)), rows_it
            except Exception as e:  # noqa: BLE001 -- corrupt file, broken stream: name it
                if not is_transient(e):
                    raise read_error(self.cfg, e) from e
                if attempt == len(STREAM_RETRY_WAITS):
                    raise StreamError(f"{read_error(self.cfg, e)} (after {attempt} retries)") from e
                wait, attempt = STREAM_RETRY_WAITS[attempt], attempt + 1
                log.warning(
                    "data: %s: %s: %s; reopening the stream at the same document in %g s "
                    "(%d/%d)", self.cfg.path, type(e).__name__, e, wait, attempt,
                    len(STREAM_RETRY_WAITS),
                )  # fmt: skip
                time.sleep(wait)
                ds.load_state_dict(pos["hf"])
                rows_it = iter(ds)

    def _never_again(self, pos: dict, stats: dict[str, int]) -> bool:
        """After an epoch in which this worker read no document: will later epochs give one?

        Each shuffled epoch deals the shards out afresh among the ranks and their workers, so a
        worker whose shards were all held out for validation (or empty) this epoch gets others
        in the next: it goes on. It stops when it reads the same files every epoch (it is the
        only reader, the order is not shuffled, or there is one shard), or after EMPTY_EPOCHS
        empty epochs in a row without ever having read a document.
        """
        info = get_worker_info()
        readers = (info.num_workers if info is not None else 1) * (self.node or (0, 1))[1]
        if readers == 1 or not self.cfg.shuffle or self.ds.n_shards <= 1:
            return True
        return stats["documents"] == 0 and pos["empty_epochs"] >= EMPTY_EPOCHS
