"""Where documents come from: one streaming ``datasets.load_dataset`` call for every source.

FineWeb on the Hub, the shipped sample and local files (.txt / .json / .jsonl / .parquet) differ
only in path, name and files. Transient Hub errors (429 / 5xx) are retried; every other failure
becomes a :class:`DataError` that names the key, file or dataset. Validation documents come from
the source's own split, or are held out of training by content digest. :func:`clean_texts`
drops (and counts) empty, undecodable and held-out documents.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import logging
import os
import time
from itertools import chain
from pathlib import Path
from typing import Any

from llmtrain.config import PACKAGE_DIR, DataConfig
from llmtrain.localfiles import BUILDERS, columns, kind, not_text, unreadable

log = logging.getLogger(__name__)

SAMPLE_DIR = PACKAGE_DIR / "assets" / "fineweb-sample"
RETRY_STATUS = (429, 500, 502, 503, 504)
STATS = ("documents", "empty", "undecodable", "heldout")


class DataError(ValueError):
    """Data the run cannot use; the message names the key, file or dataset."""


class StreamError(DataError):
    """A remote stream that stayed unreachable through every retry: unlike a bad file, worth
    trying again later (the run exits 1, which the sbatch scripts requeue)."""


# Transport failures of the HTTP clients under datasets / huggingface_hub / fsspec, by class
# name, so that none of those libraries has to be imported to recognise them.
TRANSPORT_ERRORS = {"TransportError", "RequestException", "ClientError", "FSTimeoutError"}


def is_transient(e: BaseException) -> bool:
    """A network failure or an HTTP 429 / 5xx: the same read may well work a little later."""
    status = getattr(getattr(e, "response", None), "status_code", None)
    if status in RETRY_STATUS or isinstance(e, (ConnectionError, TimeoutError)):
        return True
    return any(c.__name__ in TRANSPORT_ERRORS for c in type(e).__mro__)


def _expand(pattern: str, key: str) -> list[str]:
    files: list[str] = []
    for part in (p.strip() for p in pattern.split(",") if p.strip()):
        hits = sorted(glob.glob(os.path.expanduser(part), recursive=True))
        if not hits:
            raise DataError(f"{key}: no file matches {part!r} (cwd {os.getcwd()})")
        files += hits
    return files


def _builder(files: list[str], key: str) -> tuple[str, dict[str, Any]]:
    if unknown := [f for f in files if Path(f).suffix.lower() not in BUILDERS]:
        raise DataError(f"{key}: {unknown[0]}: not one of {', '.join(BUILDERS)}")
    kinds = {kind(f) for f in files}
    if len(kinds) != 1:
        suffixes = sorted({Path(f).suffix.lower() for f in files})
        raise DataError(f"{key}: the files must all be one type; they mix {', '.join(suffixes)}")
    builder = kinds.pop()
    # A .txt file is one document; bad bytes become U+FFFD, and a document with many of them is
    # counted as undecodable and skipped (clean_texts) instead of failing the whole run.
    extra = {"sample_by": "document", "encoding_errors": "replace"} if builder == "text" else {}
    return builder, extra


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
            val = _expand(cfg.val_files, "data.val_files")
            # data.files='corpus/*.txt' data.val_files=corpus/v.txt: v.txt is validation only
            held = {os.path.realpath(f) for f in val}
            train = [f for f in data_files["train"] if os.path.realpath(f) not in held]
            if not train:
                raise DataError(
                    f"data.files: every file it matches is in data.val_files={cfg.val_files!r}; "
                    "give training files besides the validation ones"
                )
            data_files = {"train": train, "validation": val}
        key = "data.files and data.val_files" if cfg.val_files else "data.files"
        path, kwargs = _builder(list(chain(*data_files.values())), key)
        kwargs["data_files"] = data_files
        if path == "parquet":  # only the text: files whose other columns differ read as well
            kwargs["columns"] = [cfg.text_column]
            # as text, not as the first file's type: a first file of nulls only would make
            # every later one fail to cast (numbers, which would read as "1", are refused below)
            kwargs["features"] = datasets.Features({cfg.text_column: datasets.Value("string")})
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
        if "BuilderConfig" in str(e):  # a local copy of a Hub dataset has its default config
            raise DataError(
                f"{what}: data.config_name={name!r} is not a config of {path!r} ({e}); for a "
                "local copy laid out as data/<split>/*.parquet, set data.config_name=null"
            ) from e
        if "split" in str(e).lower():
            raise DataError(f"{what}: has no split {split!r} ({e})") from e
        raise read_error(cfg, e) from e
    except Exception as e:  # noqa: BLE001 -- a file datasets cannot parse: name it
        raise read_error(cfg, e) from e
    if ds.features is not None and cfg.text_column not in ds.features:
        listed = ", ".join(ds.features)
        if cfg.files:  # the file that lacks it (a parquet file is read for the column only)
            for f in chain(*kwargs["data_files"].values()):
                with contextlib.suppress(Exception):
                    if (have := columns(f)) is not None and cfg.text_column not in have:
                        what, listed = f"{what}: {f}", ", ".join(have)
                        break
        raise DataError(
            f"data.text_column={cfg.text_column!r} is not a column of {what}; columns: {listed}"
        )
    if ds.features is not None:
        _check_text_type(cfg, ds.features[cfg.text_column], what)
    return ds.select_columns([cfg.text_column]) if ds.features is not None else ds


def _check_text_type(cfg: DataConfig, feature: Any, what: str) -> None:
    """Raise a DataError naming the file when the text column holds numbers (or other scalars).
    datasets casts every file to the first file's types: numbers in a file after a text one
    would train as the strings "0", "1", ..., so every parquet file of data.files is checked (a
    footer read); JSON files, which must be read whole, only when the first file's values are
    not text. A data.path directory (a dataset's local copy: thousands of files, read by every
    rank) is taken as one dataset; a read that fails there still names the file (read_error).
    Mixed values (a JSON column of text and numbers) stream as they are, and clean_texts skips
    and counts the ones that are not text."""
    import datasets

    column, scalar = cfg.text_column, isinstance(feature, datasets.Value)
    text = not scalar or feature.dtype in ("string", "large_string")
    local = _local_files(cfg) if cfg.files else {}
    for key, files in local.items():
        for f in files:
            builder = kind(f)
            read = builder == "parquet" or (builder == "json" and not text)
            try:
                why = not_text(f, column) if read else None
            except Exception:  # noqa: BLE001 -- unreadable: the read names it (read_error)
                why = None
            if why:
                raise DataError(
                    f"{key}: {f}: {why}; set data.text_column to the column with the text, or "
                    "fix or remove the file"
                )
    if scalar and feature.dtype == "null":  # a first file of nulls only: later text fails to cast
        local = local or _local_files(cfg)
        first = next((f"{key}: {files[0]}" for key, files in local.items() if files), what)
        raise DataError(
            f"{first}: data.text_column={column!r} holds nulls only, and datasets reads every "
            "file with the first one's types; remove the file (it has no text)"
        )
    if not text:
        raise DataError(
            f"{what}: data.text_column={column!r} holds {feature.dtype} values, not text; set "
            "data.text_column to the column with the text"
        )


def _local_files(cfg: DataConfig) -> dict[str, list[str]]:
    """The local files of the source, by the key that names them: data.files and
    data.val_files, or every split's files that datasets finds in a data.path directory."""
    if cfg.files:
        keys = (("data.files", cfg.files), ("data.val_files", cfg.val_files))
        return {key: _expand(files, key) for key, files in keys if files}
    path = str(SAMPLE_DIR) if cfg.path == "sample" else cfg.path
    if not os.path.isdir(path):  # a dataset on the Hub
        return {}
    import datasets

    found = datasets.load_dataset_builder(path, cfg.config_name).config.data_files or {}
    return {f"data.path={cfg.path!r}": list(chain(*found.values()))}


def matched_files(cfg: DataConfig) -> str | None:
    """What data.files and data.val_files match, as a resume must find it again: the count and
    a digest of each file's name and size, so a corpus that moved is the same (None for a
    dataset on the Hub or a path)."""
    if not cfg.files:
        return None
    files = _expand(cfg.files, "data.files") + (
        _expand(cfg.val_files, "data.val_files") if cfg.val_files else []
    )
    listing = "\n".join(f"{os.path.basename(f)} {os.path.getsize(f)}" for f in files)
    digest = hashlib.blake2b(listing.encode(), digest_size=6).hexdigest()
    return f"{len(files)} files ({digest})"


def read_error(cfg: DataConfig, e: BaseException) -> DataError:
    """A DataError for a failed read: the bad local file and why when one is found, else the
    source and the original error."""
    with contextlib.suppress(Exception):  # files it cannot list: the original error says why
        for key, files in _local_files(cfg).items():
            first = None
            for f in files:
                why = unreadable(f, cfg.text_column, first, every_column=not cfg.files)
                if why is not None:
                    return DataError(f"{key}: {f}: {why}; fix or remove the file")
                if first is None:
                    first = columns(f)
    what = f"data.files={cfg.files!r}" if cfg.files else f"data.path={cfg.path!r}"
    return DataError(f"{what}: reading failed: {type(e).__name__}: {e}")


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def single_text_file(cfg: DataConfig) -> str | None:
    """The file of a local corpus that is one .txt file and no ``data.val_files``: a single
    document, so no document can be held out for validation; its text is split instead."""
    if not cfg.files or cfg.val_files:
        return None
    files = _expand(cfg.files, "data.files")
    return files[0] if len(files) == 1 and _builder(files, "data.files")[0] == "text" else None


def one_training_text_file(cfg: DataConfig) -> str | None:
    """The file of a local corpus whose training text is one .txt file (one document), with
    or without data.val_files: ranks, which split a text corpus by documents, cannot share it."""
    if one := single_text_file(cfg):
        return one
    if not cfg.files or not cfg.val_files:
        return None
    held = {os.path.realpath(f) for f in _expand(cfg.val_files, "data.val_files")}
    files = [f for f in _expand(cfg.files, "data.files") if os.path.realpath(f) not in held]
    if len(files) == 1 and kind(files[0]) == "text":
        return files[0]
    return None


def validation_source(cfg: DataConfig) -> str:
    """Where a local corpus's validation text comes from, in words; "" for other sources."""
    if not cfg.files:
        return ""
    if cfg.val_files:
        n = len(_expand(cfg.val_files, "data.val_files"))
        return f"data.val_files ({n} file{'s' if n > 1 else ''})"
    if one := single_text_file(cfg):
        return f"the last {cfg.val_fraction:.0%} of {one}"
    files = _expand(cfg.files, "data.files")
    if _builder(files, "data.files")[0] != "text":
        return f"the first {cfg.val_docs} documents, held out"
    held = files[: cfg.val_docs]  # a .txt file is one document; the stream reads them in order
    share = sum(map(os.path.getsize, held)) / max(1, sum(map(os.path.getsize, files)))
    words = f"the first {len(held)} of {len(files)} files, held out ({share:.0%} of the text)"
    return words + ("; choose others with data.val_files" if share > 0.2 else "")


def _text_part(ds: Any, cfg: DataConfig, validation: bool) -> Any:
    """The head (training) or the last ``data.val_fraction`` (validation) of each text, cut at
    the same character, as nanoGPT splits its one-file corpora."""
    column, fraction = cfg.text_column, cfg.val_fraction

    def part(row: dict) -> dict:
        text = row[column]
        cut = int(len(text) * (1 - fraction))
        return {column: text[cut:] if validation else text[:cut]}

    return ds.map(part)


def training_documents(cfg: DataConfig) -> Any:
    """The training split; of a corpus that is one .txt file, all but its validation tail."""
    ds = load_documents(cfg, cfg.train_split)
    return _text_part(ds, cfg, validation=False) if single_text_file(cfg) else ds


def holds_out(cfg: DataConfig) -> bool:
    """Whether validation is the first data.val_docs training documents: no validation split
    or files named (a missing "validation" split also falls back to them)."""
    return not (cfg.val_files if cfg.files else cfg.val_split) and not single_text_file(cfg)


def validation_documents(cfg: DataConfig) -> tuple[Any, frozenset[bytes]]:
    """The validation stream and the digests training must exclude.

    The source's own validation split if it has one (``data.val_split`` or ``data.val_files``);
    for a corpus that is one .txt file, the last ``data.val_fraction`` of its text (training
    reads the rest: :func:`training_documents`); otherwise the first ``data.val_docs``
    documents of the unshuffled training split, held out of training by content digest
    wherever they appear.
    """
    if single_text_file(cfg):
        return _text_part(load_documents(cfg, cfg.train_split), cfg, validation=True), frozenset()
    if not holds_out(cfg):
        try:
            return load_documents(cfg, "validation" if cfg.files else cfg.val_split), frozenset()
        except DataError as e:
            if "has no split" not in str(e):
                raise
            if not cfg.files and cfg.val_split != DataConfig.val_split:  # a typo, not absent
                raise DataError(f"data.val_split={cfg.val_split!r}: {e}") from e
            log.info("data: %s; holding out %d training documents instead", e, cfg.val_docs)
    ds = load_documents(cfg, cfg.train_split).take(cfg.val_docs)
    try:
        texts = [row[cfg.text_column] for row in ds]
    except Exception as e:  # noqa: BLE001 -- a corrupt file is named (exit 2), as in training
        if is_transient(e):
            raise
        raise read_error(cfg, e) from e
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
        elif (not text.isascii() or "\x00" in text) and _undecodable(text, cfg):
            stats["undecodable"] += 1
        elif heldout and _digest(text) in heldout:
            stats["heldout"] += 1
        else:
            texts.append(text)
    stats["documents"] += len(texts)
    return texts


# In a .txt corpus U+FFFD marks bytes that were not UTF-8 (or the character itself, which valid
# text may hold), and NUL is in binary files and UTF-16 text, never in UTF-8 text. Past 1 in
# 1,000 characters the file is not UTF-8 text (Latin-1, UTF-16, binary): it is skipped. Below,
# it is one stray byte or name in a big file such as input.txt: it trains.
MAX_REPLACED = 1e-3


def _undecodable(text: str, cfg: DataConfig) -> bool:
    """Lone surrogates; or a .txt document with more U+FFFD and NUL than MAX_REPLACED allows
    (counted only for .txt files: in other sources U+FFFD is plain text)."""
    txt = bool(cfg.files) and _is_text(cfg.files)  # first: other sources skip the counting
    if txt and text.count("\ufffd") + text.count("\x00") > MAX_REPLACED * len(text):
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


@functools.lru_cache(maxsize=8)
def _is_text(files: str) -> bool:
    """data.files matches .txt files (by what it matches: 'corpus/[a-e]*' names no suffix)."""
    try:
        return _builder(_expand(files, "data.files"), "data.files")[0] == "text"
    except DataError:  # load_documents has said so already
        return False
