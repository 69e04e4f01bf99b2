"""Tokens for training: stream documents -> tokenize -> pack into windows -> split by rank.

Every text source goes through one function, :func:`load_documents`, i.e.
``datasets.load_dataset(path, name, data_files=..., streaming=True)``; FineWeb on the Hub, the
shipped sample and local files differ only in path, name and files. Documents are tokenized in
batches (tiktoken ``encode_ordinary_batch``), each followed by EOT, and the token stream is cut
into windows of ``seq_len + 1`` tokens every ``stride`` tokens (inputs = window[:-1], targets =
window[1:]). A document longer than a window continues into the next one; only the final
partial window of a finite pass is dropped.

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
import glob
import hashlib
import json
import logging
import os
import time
from collections import deque
from collections.abc import Iterator
from itertools import chain, islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from llmtrain.config import PACKAGE_DIR, DataConfig
from llmtrain.tokenizer import Tokenizer

log = logging.getLogger(__name__)

SAMPLE_DIR = PACKAGE_DIR / "assets" / "fineweb-sample"
BUILDERS = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
}
RETRY_STATUS = (429, 500, 502, 503, 504)
STATS = ("documents", "empty", "undecodable", "heldout")


class DataError(ValueError):
    """Data the run cannot use; the message names the key, file or dataset."""


def _expand(pattern: str, key: str) -> list[str]:
    files: list[str] = []
    for part in (p.strip() for p in pattern.split(",") if p.strip()):
        hits = sorted(glob.glob(os.path.expanduser(part), recursive=True))
        if not hits:
            raise DataError(f"{key}: no file matches {part!r} (cwd {os.getcwd()})")
        files += hits
    return files


def _builder(files: list[str], key: str) -> tuple[str, dict[str, Any]]:
    kinds = {BUILDERS.get(Path(f).suffix.lower()) for f in files}
    if None in kinds or len(kinds) != 1:
        raise DataError(f"{key}: files must all be one of {', '.join(BUILDERS)} (got {files[:3]})")
    kind = kinds.pop()
    # A .txt file is one document; bad bytes become U+FFFD, and such a document is counted as
    # undecodable and skipped (clean_texts) instead of failing the whole run.
    extra = {"sample_by": "document", "encoding_errors": "replace"} if kind == "text" else {}
    return kind, extra


def _retrying(fn, what: str, tries: int = 5):
    """Retry transient Hub errors (429 / 5xx) with exponential backoff; re-raise the rest."""
    for attempt in range(tries):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified below
            status = getattr(getattr(e, "response", None), "status_code", None)
            if status not in RETRY_STATUS or attempt == tries - 1:
                raise
            wait = 2.0**attempt
            log.warning(
                "data: %s: HTTP %s, retrying in %.0f s (%d/%d)",
                what,
                status,
                wait,
                attempt + 1,
                tries,
            )
            time.sleep(wait)


def load_documents(cfg: DataConfig, split: str) -> Any:
    """One split of the source as a streaming ``datasets.IterableDataset``, for every source.

    ``split`` is a split name of the source ("train", "validation", ...). Raises DataError for a
    missing file, an unreachable dataset or an unknown split (the message says which).
    """
    import datasets

    path, name, kwargs = cfg.path, cfg.config_name, {}
    if cfg.files:
        data_files = {"train": _expand(cfg.files, "data.files")}
        if cfg.val_files:
            data_files["validation"] = _expand(cfg.val_files, "data.val_files")
        path, kwargs = _builder(list(chain(*data_files.values())), "data.files")
        kwargs["data_files"] = data_files
        if path != "text":  # an empty .txt is an empty document (skipped and counted)
            for f in chain(*data_files.values()):
                if os.path.getsize(f) == 0:
                    raise DataError(f"data.files: {f} is empty (0 bytes); remove or rebuild it")
    elif path == "sample":
        path = str(SAMPLE_DIR)
    what = f"data.path={cfg.path!r}" + (f" (config {name!r})" if name else "")
    if cfg.files:
        what = f"data.files={cfg.files!r}"
    try:
        ds = _retrying(
            lambda: datasets.load_dataset(path, name, split=split, streaming=True, **kwargs), what
        )
    except (ConnectionError, datasets.exceptions.DatasetNotFoundError, FileNotFoundError) as e:
        offline = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
        raise DataError(
            f"{what}: cannot load dataset {cfg.path!r}: {e}. Offline variables: {offline}. "
            "A Hub dataset needs network (unset HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) or a local "
            "copy; offline, use data=sample, data=local data.files=... or data=shards."
        ) from e
    except ValueError as e:
        if "split" in str(e).lower():
            raise DataError(f"{what}: has no split {split!r} ({e})") from e
        raise read_error(cfg, e) from e
    except Exception as e:  # noqa: BLE001 -- a file datasets cannot parse: name it
        raise read_error(cfg, e) from e
    if ds.features is not None and cfg.text_column not in ds.features:
        raise DataError(
            f"data.text_column={cfg.text_column!r} is not a column of {what}; "
            f"columns: {', '.join(ds.features)}"
        )
    return ds.select_columns([cfg.text_column]) if ds.features is not None else ds


def _unreadable(f: str) -> str | None:
    """Why local file ``f`` cannot be read as its builder reads it, or None."""
    kind = BUILDERS.get(Path(f).suffix.lower())
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            pq.read_table(f)
        elif kind == "json":
            with open(f, encoding="utf-8") as fh:
                text = fh.read()
            try:
                json.loads(text)  # one JSON document
            except json.JSONDecodeError:
                for i, line in enumerate(text.splitlines(), 1):  # else JSON Lines
                    try:
                        if line.strip():
                            json.loads(line)
                    except json.JSONDecodeError as e:
                        return f"line {i} is not JSON ({e})"
    except Exception as e:  # noqa: BLE001 -- the reason is the message
        return f"{type(e).__name__}: {e}"
    return None


def read_error(cfg: DataConfig, e: BaseException) -> DataError:
    """A DataError for a failed read: the bad local file and why when one is found, else the
    source and the original error."""
    if cfg.files:
        files = _expand(cfg.files, "data.files")
        files += _expand(cfg.val_files, "data.val_files") if cfg.val_files else []
        for f in files:
            if (why := _unreadable(f)) is not None:
                return DataError(f"data.files: {f}: {why}; fix or remove the file")
        return DataError(f"data.files={cfg.files!r}: reading failed: {type(e).__name__}: {e}")
    return DataError(f"data.path={cfg.path!r}: reading failed: {type(e).__name__}: {e}")


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def validation_documents(cfg: DataConfig) -> tuple[Any, frozenset[bytes]]:
    """The validation stream and the digests training must exclude.

    The source's own validation split if it has one (``data.val_split`` or ``data.val_files``);
    otherwise the first ``data.val_docs`` documents of the unshuffled training split, held out
    of training by content digest wherever they appear.
    """
    has_val = cfg.val_files if cfg.files else cfg.val_split
    if has_val:
        try:
            return load_documents(cfg, "validation" if cfg.files else cfg.val_split), frozenset()
        except DataError as e:
            if "has no split" not in str(e):
                raise
            log.info("data: %s; holding out %d training documents instead", e, cfg.val_docs)
    ds = load_documents(cfg, cfg.train_split).take(cfg.val_docs)
    texts = [row[cfg.text_column] for row in ds]
    return ds, frozenset(_digest(t) for t in texts if isinstance(t, str))


def clean_texts(
    rows: list[dict], cfg: DataConfig, heldout: frozenset[bytes], stats: dict[str, int]
) -> list[str]:
    """The usable texts of ``rows``; empty, undecodable and held-out ones are counted in stats."""
    texts = []
    for row in rows:
        try:
            text = row[cfg.text_column]
        except KeyError:
            raise DataError(
                f"data.text_column={cfg.text_column!r} missing in a row of "
                f"data.path={cfg.path!r} (keys: {list(row)})"
            ) from None
        if not isinstance(text, str):
            stats["undecodable" if text is not None else "empty"] += 1
        elif not text.strip():
            stats["empty"] += 1
        elif not text.isascii() and _undecodable(text, cfg):
            stats["undecodable"] += 1
        elif heldout and _digest(text) in heldout:
            stats["heldout"] += 1
        else:
            texts.append(text)
    stats["documents"] += len(texts)
    return texts


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
            "stats": dict.fromkeys(STATS, 0),
        }
        stats = dict(pos["stats"])
        batch: list[np.ndarray] = []
        while True:  # epochs
            ds.set_epoch(self._hf_epoch(pos["epoch"]))
            ds.load_state_dict(pos["hf"])
            rows_it = iter(ds)
            while True:  # batches of documents
                try:
                    rows = list(islice(rows_it, cfg.tokenize_batch))
                except Exception as e:  # noqa: BLE001 -- corrupt file, broken stream: name it
                    raise read_error(cfg, e) from e
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
                    "stats": dict(stats),
                }
                if len(rows) < cfg.tokenize_batch:
                    break
            if not self.train or pos["epoch_docs"] == 0:
                if batch:  # a finite pass ends with its last, smaller batch
                    yield worker, np.stack(batch), pos, dict(stats)
                yield worker, None, pos, dict(stats)
                return
            pos = {**pos, "epoch": pos["epoch"] + 1, "hf": None, "epoch_docs": 0}


def _undecodable(text: str, cfg: DataConfig) -> bool:
    """Lone surrogates; or U+FFFD in a .txt corpus, where it marks bytes that were not UTF-8."""
    if "\ufffd" in text and cfg.files and _builder_of(cfg.files) == "text":
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _builder_of(files: str) -> str | None:
    return BUILDERS.get(Path(files.split(",")[0].strip()).suffix.lower())


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
        max_workers: int | None = None,
    ) -> None:
        self.source, self.cfg, self.batch_size, self.train = source, cfg, batch_size, train
        self.rank, self.world_size, self.kind = rank, world_size, kind
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
        }

    @property
    def stats(self) -> dict[str, int]:
        """Documents used, and skipped as empty / undecodable / held out, so far."""
        return {k: sum(s[k] for s in self._state["stats"]) for k in STATS}

    def state_dict(self) -> dict[str, Any]:
        windows = self._state["batches"] * self.batch_size
        return copy.deepcopy(
            {
                **self._state,
                "version": 1,
                "kind": self.kind,
                "num_workers": self.num_workers,
                "rank": self.rank,
                "world_size": self.world_size,
                "seq_len": self.cfg.seq_len,
                "windows": windows,
                "global_windows": windows * self.world_size,
                "global_tokens": windows * self.world_size * self.cfg.seq_len,
            }
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, mine in (
            ("kind", self.kind),
            ("num_workers", self.num_workers),
            ("world_size", self.world_size),
            ("seq_len", self.cfg.seq_len),
        ):
            if state.get(key) != mine:
                raise DataError(
                    f"data state was saved with {key}={state.get(key)}, this run "
                    f"has {mine}; exact resume needs the same value"
                )
        keys = ("next", "done", "workers", "stats", "batches")
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
                pin_memory=self.pin_memory,
                prefetch_factor=self.cfg.prefetch_factor,
                persistent_workers=False,
            )
        )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = max(1, self.num_workers)
        if not self.train:  # every validation pass starts from the beginning
            self._state = self._fresh_state()
        state = self._state
        items, pending = self._items(state), [deque() for _ in range(n)]
        yielded = False
        while not all(state["done"]):
            w = state["next"]
            if state["done"][w]:
                state["next"] = (w + 1) % n
                continue
            while not pending[w]:
                item = next(items)
                pending[item[0]].append(item)
            _, windows, pos, stats = pending[w].popleft()
            state["workers"][w], state["stats"][w] = pos, stats
            if windows is None:
                state["done"][w] = True
                continue
            state["next"], state["batches"] = (w + 1) % n, state["batches"] + 1
            t = torch.as_tensor(windows, dtype=torch.long)
            if self.pin_memory and self.num_workers == 0:
                t = t.pin_memory()
            yielded = True
            yield t[:, :-1], t[:, 1:]
        if not yielded and state["batches"] == 0:
            raise DataError(
                f"{self._describe()}: no {'training' if self.train else 'validation'} "
                f"window of data.seq_len+1={self.cfg.seq_len + 1} tokens "
                f"(skipped: {self.stats}); the corpus is empty or too small"
                + (
                    ". Every document was held out for validation: give the validation text "
                    "separately with data.val_files=PATH (a .txt file is one document)"
                    if self.train and self.stats.get("heldout") and not self.stats.get("documents")
                    else ""
                )
            )

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

    Validation is the same on every rank (no split), so every rank evaluates the same batches.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    train = split == "train"
    if cfg.source == "shards":
        from llmtrain.shards import ShardWindows

        source = ShardWindows(
            cfg, split, batch_size, seed, rank if train else 0, world_size if train else 1
        )
        return TokenLoader(
            source,
            cfg,
            batch_size=batch_size,
            train=train,
            rank=rank,
            world_size=world_size,
            kind="shards",
        )
    val_ds, heldout = validation_documents(cfg)
    if train:
        ds = load_documents(cfg, cfg.train_split)
        n = ds.n_shards
        if cfg.shuffle and cfg.shuffle_buffer > 0:
            ds = ds.shuffle(seed=seed, buffer_size=cfg.shuffle_buffer)
    else:
        ds, cfg, n = val_ds, dataclasses.replace(cfg, shuffle=False), val_ds.n_shards
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
    return TokenLoader(
        source,
        cfg,
        batch_size=batch_size,
        train=train,
        rank=rank,
        world_size=world_size,
        kind="hf",
        max_workers=max(1, shards),
    )
