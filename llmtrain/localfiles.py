"""Local data files (data.files, or a data.path directory) looked at before and after datasets
reads them: which builder reads a file, its columns and rows, and why one is not text or cannot
be read, so that an error names the file instead of datasets' traceback.

Every function returns the reason in words (or None); :mod:`llmtrain.documents` turns it into
the DataError that names the key as well.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

BUILDERS = {  # a file's suffix: the datasets builder that reads it
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
}


def kind(f: str) -> str | None:
    """The builder that reads file ``f`` ("text", "json", "parquet"), None for other suffixes."""
    return BUILDERS.get(Path(f).suffix.lower())


def not_text(f: str, column: str) -> str | None:
    """Why ``column`` of local file ``f`` is not text (a parquet file without it, or values of
    another type), else None. Nulls are text: they are skipped and counted as empty documents.
    Read once per file version in a process: every loader a run builds asks (train, validation,
    each rank and worker), and data.files may match thousands of files."""
    st = os.stat(f)
    return _not_text(f, column, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=65536)
def _not_text(f: str, column: str, mtime_ns: int, size: int) -> str | None:
    if kind(f) == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pq.read_schema(f)
        if column not in schema.names:  # read for this column only, so no other check sees it
            return f"no column {column!r}; its columns: {', '.join(sorted(schema.names))}"
        held = schema.field(column).type
        text = pa.types.is_string(held) or pa.types.is_large_string(held) or pa.types.is_null(held)
        return None if text else f"data.text_column={column!r} holds {held} values, not text"
    values = (r.get(column) for r in rows(f) if isinstance(r, dict))
    held = ", ".join(sorted({type(v).__name__ for v in values if v is not None} - {"str"}))
    return f"data.text_column={column!r} holds {held} values, not text" if held else None


def unreadable(
    f: str, column: str, first: list[str] | None = None, every_column: bool = False
) -> str | None:
    """Why local file ``f`` cannot be read as its builder reads it, or None. ``column`` is
    data.text_column; ``first`` is the first file's columns, which datasets reads every JSON
    file with, and every parquet file of a data.path directory (``every_column``; data.files
    reads parquet files for ``column`` only)."""
    builder = kind(f)
    try:
        have = columns(f)
    except BadLine as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 -- the reason is the message
        return f"{type(e).__name__}: {e}"
    if builder == "parquet":
        import pyarrow.parquet as pq

        if pq.ParquetFile(f).metadata.num_rows == 0:  # datasets: "BatchSize must be > 0"
            return "no rows (an empty .parquet)"
    if have is not None and column not in have:
        return f"no column {column!r} (data.text_column); its columns: {', '.join(have)}"
    if builder == "json" and first is not None and have is not None and have != first:
        return (
            f"its columns ({', '.join(have)}) differ from the first file's "
            f"({', '.join(first)}), and datasets reads every JSON file with the first one's; "
            "give the files the same keys"
        )
    if builder == "parquet" and every_column and first is not None and have != first:
        return (
            f"its columns ({', '.join(have or [])}) differ from the first file's "
            f"({', '.join(first)}), and datasets reads every file of a directory with the first "
            "one's; give the files the same columns, or have only the text column read: "
            "data=local data.files='DIR/train/*.parquet' data.val_files='DIR/validation/*.parquet'"
        )
    return None


class BadLine(ValueError):
    """A JSON Lines line that does not parse; the message says which."""


def columns(f: str) -> list[str] | None:
    """The columns (keys) of a .parquet / .json / .jsonl file, sorted; None for text files.
    Reads the whole file, so a corrupt one raises."""
    builder = kind(f)
    if builder == "parquet":
        import pyarrow.parquet as pq

        return sorted(pq.read_table(f).column_names)
    if builder != "json":
        return None
    return sorted({k for r in rows(f) if isinstance(r, dict) for k in r})


def rows(f: str) -> list[Any]:
    """The rows of a .json / .jsonl file: one JSON document, a JSON array, or JSON Lines."""
    with open(f, encoding="utf-8") as fh:
        text = fh.read()
    try:
        found = [json.loads(text)]  # one JSON document
    except json.JSONDecodeError:
        found = []
        for i, line in enumerate(text.splitlines(), 1):  # else JSON Lines
            if line.strip():
                try:
                    found.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise BadLine(f"line {i} is not JSON ({e})") from None
    return found[0] if len(found) == 1 and isinstance(found[0], list) else found  # a JSON array
