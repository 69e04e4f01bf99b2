"""llmtrain-prepare: tokenize any data source into llm.c ``.bin`` shards, resumably.

    llmtrain-prepare data=fineweb out_dir=/data/fineweb10B [num_proc=16] [data.shard_tokens=...]

``out_dir=`` and ``num_proc=`` (default: all cores) are this command's own arguments and are
taken out of the command line; everything else is a Hydra override of the training config, so
``data=...`` means exactly what it means for ``llmtrain-train``. Writes
``{name}_val_000000.bin, ...`` and ``{name}_train_000000.bin, ...`` (documents in source order,
each followed by EOT; shards end at document boundaries, about ``data.shard_tokens`` tokens each)
plus ``manifest.json``. An interrupted run resumes after the last finished shard. Train with
``data=shards data.path=OUT_DIR``.
"""

from __future__ import annotations

import difflib
import json
import os
import sys
from dataclasses import asdict
from itertools import islice
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np

from llmtrain.checks import check_data
from llmtrain.config import ConfigError, DataConfig, compose_config
from llmtrain.documents import (
    STATS,
    DataError,
    clean_texts,
    is_transient,
    matched_files,
    read_error,
    single_text_file,
    training_documents,
    validation_documents,
)
from llmtrain.integrity import write_atomic
from llmtrain.shards import write_shard
from llmtrain.tokenizer import get_tokenizer

_TOKENIZER = None


def _init(name: str) -> None:
    global _TOKENIZER
    _TOKENIZER = get_tokenizer(name)


def _encode(chunk: tuple[int, list[str], dict]) -> tuple[int, np.ndarray, dict]:
    rows, texts, stats = chunk
    ids = _TOKENIZER.encode_batch(texts)
    for doc in ids:
        doc.append(_TOKENIZER.eot_id)
    return rows, np.fromiter((t for doc in ids for t in doc), np.uint32), stats


def _chunks(ds: Any, cfg: DataConfig, heldout: frozenset, size: int) -> Any:
    """(rows read, usable texts, their skip counts) per ``size`` rows, in source order."""
    it = iter(ds)
    while True:
        try:
            rows = list(islice(it, size))
        except Exception as e:  # noqa: BLE001 -- a corrupt file is named (exit 2), as in training
            if is_transient(e):
                raise
            raise read_error(cfg, e) from e
        if not rows:
            return
        stats = dict.fromkeys(STATS, 0)
        yield len(rows), clean_texts(rows, cfg, heldout, stats), stats


def prepare(
    cfg: DataConfig,
    out_dir: str | os.PathLike,
    num_proc: int | None = None,
    progress: bool = True,
    chunk_docs: int = 256,  # documents per task sent to a tokenizer process
) -> dict[str, Any]:
    """Write the val and train shards of ``cfg`` into ``out_dir``; returns the manifest."""
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = {
        k: v
        for k, v in asdict(cfg).items()
        if k
        in (
            "path",
            "config_name",
            "files",
            "val_files",
            "text_column",
            "train_split",
            "val_split",
            "val_docs",
            "tokenizer",
            "shard_tokens",
        )
    }
    if single_text_file(cfg):  # its split point decides which text is validation
        source["val_fraction"] = cfg.val_fraction
    if matched := matched_files(cfg):  # a resume skips the rows done: in the same files only
        source["matched"] = matched
    manifest_path = out / "manifest.json"
    manifest: dict[str, Any] = {
        "format": "llm.c .bin (magic 20240520)",
        "source": source,
        "splits": {},
    }
    if manifest_path.exists():
        try:
            old = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as e:
            raise DataError(
                f"{manifest_path} is unreadable ({e}); to start over, remove {out} or use "
                "another out_dir"
            ) from None
        if (was := old.get("source") or {}) != source:
            diffs = [
                f"{k}: {was.get(k)!r} there, {source.get(k)!r} now"
                for k in sorted(set(was) | set(source))
                if was.get(k) != source.get(k)
            ]
            raise ConfigError(
                f"{manifest_path} was written from other settings ({'; '.join(diffs)}); "
                "use another out_dir, or the settings it was written with"
            )
        manifest = old
    tok = get_tokenizer(cfg.tokenizer)

    def save() -> None:  # a kill mid-write leaves the previous manifest, never half of one
        write_atomic(manifest_path, json.dumps(manifest, indent=1))

    val_ds, heldout = validation_documents(cfg)
    splits = {
        "val": (val_ds, frozenset()),
        "train": (training_documents(cfg), heldout),
    }
    with Pool(
        num_proc or os.cpu_count() or 1, initializer=_init, initargs=(cfg.tokenizer,)
    ) as pool:
        for split, (ds, exclude) in splits.items():
            entry = manifest["splits"].setdefault(
                split, {"shards": [], "rows": 0, "done": False, "stats": dict.fromkeys(STATS, 0)}
            )
            if entry["done"]:
                continue
            stats = dict(entry["stats"])
            chunks = _chunks(
                ds.skip(entry["rows"]) if entry["rows"] else ds, cfg, exclude, chunk_docs
            )
            bar = tqdm(
                desc=f"{split} docs", initial=entry["rows"], unit="doc", disable=not progress
            )
            buf: list[np.ndarray] = []
            rows_done = entry["rows"]
            for rows, ids, chunk_stats in pool.imap(_encode, chunks):
                rows_done += rows
                stats = {k: stats[k] + chunk_stats[k] for k in STATS}
                bar.update(rows)
                buf.append(ids)
                if sum(len(b) for b in buf) >= cfg.shard_tokens:
                    _flush(
                        buf,
                        out / f"{cfg.name}_{split}_{len(entry['shards']):06d}.bin",
                        tok.vocab_size,
                        entry,
                        rows_done,
                        stats,
                    )
                    save()
            if buf:
                _flush(
                    buf,
                    out / f"{cfg.name}_{split}_{len(entry['shards']):06d}.bin",
                    tok.vocab_size,
                    entry,
                    rows_done,
                    stats,
                )
            entry["done"], entry["rows"], entry["stats"] = True, rows_done, dict(stats)
            save()
            bar.close()
    train = manifest["splits"]["train"]
    if not sum(s["tokens"] for s in train["shards"]):
        stats = train["stats"]
        why = (
            "every document was held out for validation: give the validation text separately "
            "with data.val_files=PATH"
            if stats["heldout"] and not stats["documents"]
            else "the corpus is empty or too small"
        )
        raise DataError(f"{out}: no training tokens (skipped: {stats}); {why}")
    return manifest


def _flush(
    buf: list[np.ndarray], path: Path, vocab_size: int, entry: dict, rows: int, stats: dict
) -> None:
    """Write the buffered tokens as the split's next shard and record it in the manifest."""
    tokens = np.concatenate(buf)
    write_shard(path, tokens, vocab_size)
    entry["shards"].append(
        {"file": path.name, "tokens": int(len(tokens)), "rows": rows, "stats": dict(stats)}
    )
    entry["rows"], entry["stats"] = rows, dict(stats)
    buf.clear()


OWN_ARGS = ("out_dir", "num_proc")  # llmtrain-prepare's own; the rest go to Hydra


def _parse(argv: list[str]) -> tuple[list[str], str, int | None]:
    out_dir, num_proc, overrides = None, None, []
    for arg in argv:
        key, _, value = arg.partition("=")
        if key.lstrip("+") == "out_dir":
            out_dir = value
        elif key.lstrip("+") == "num_proc":
            try:
                num_proc = int(value)
            except ValueError:
                raise ConfigError(f"num_proc: {value!r} is not a whole number") from None
            if num_proc < 1:
                raise ConfigError(f"num_proc: {num_proc}; give 1 or more tokenizer processes")
        elif close := difflib.get_close_matches(key.lstrip("+"), OWN_ARGS, n=1, cutoff=0.7):
            raise ConfigError(f"{key}: not an argument; did you mean {close[0]}=...?")
        else:
            overrides.append(arg)
    if not out_dir:
        raise ConfigError("out_dir: missing; usage: llmtrain-prepare data=<source> out_dir=DIR")
    return overrides, out_dir, num_proc


def load_data_config(overrides: list[str]) -> DataConfig:
    """Compose ``conf/`` with the overrides, as llmtrain-train does, and return only its data
    section (no training horizon needed)."""
    data = compose_config(overrides).data
    check_data(data)
    return data


USAGE = """usage: llmtrain-prepare data=<source> out_dir=DIR [num_proc=N] [data.* overrides]

Tokenize a text source once into llm.c token shards (DIR/*_train_*.bin, DIR/*_val_*.bin);
train on them with data=shards data.path=DIR. Examples:
  llmtrain-prepare data=sample out_dir=shards/sample
  llmtrain-prepare data=fineweb out_dir=shards/fineweb num_proc=8   # resumable; stop any time
  llmtrain-prepare data=local data.files='corpus/*.txt' out_dir=shards/corpus"""


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return
    try:
        overrides, out_dir, num_proc = _parse(args)
        cfg = load_data_config(overrides)
        if cfg.source == "shards":
            raise ConfigError("data: already shards; pick a text source, e.g. data=fineweb")
    except ConfigError as e:
        print(f"llmtrain-prepare: config error: {e}\n\n{USAGE}", file=sys.stderr)
        sys.exit(2)
    try:
        manifest = prepare(cfg, out_dir, num_proc)
    except (DataError, ConfigError) as e:  # it names the file, dataset or key: no traceback
        kind = "config" if isinstance(e, ConfigError) else "data"
        print(f"llmtrain-prepare: {kind} error: {e}", file=sys.stderr)
        sys.exit(2)
    for split, entry in manifest["splits"].items():
        tokens = sum(s["tokens"] for s in entry["shards"])
        stats = entry["stats"]
        skipped = ", ".join(f"{stats[k]:,} {k}" for k in STATS if k != "documents")
        print(
            f"{split}: {len(entry['shards'])} shards, {tokens:,} tokens from "
            f"{stats['documents']:,} documents (skipped: {skipped})"
        )
    print(f"train with: {train_overrides(cfg, out_dir)}")


def train_overrides(cfg: DataConfig, out_dir: str | Path) -> str:
    """The overrides that train on these shards: another tokenizer than the default needs its
    name and its vocabulary size too, or llmtrain-train refuses them (one error at a time)."""
    words = f"data=shards data.path={out_dir}"
    if cfg.tokenizer != DataConfig.tokenizer:
        vocab = get_tokenizer(cfg.tokenizer).vocab_size
        words += f" data.tokenizer={cfg.tokenizer} model.vocab_size={vocab}"
    return words


if __name__ == "__main__":
    main()
