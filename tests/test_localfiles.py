"""Local data files: why one is not text or cannot be read (llmtrain/localfiles.py). How these
reasons reach the user through DataError is tested in test_documents.py."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq

from llmtrain import localfiles


def test_a_parquet_footer_is_read_once_per_version_of_the_file(tmp_path, monkeypatch):
    """Every loader a run builds (train and validation, each rank and worker) checks every
    file of data.files; a corpus of thousands of parquet files read them all three times."""
    f = str(tmp_path / "0.parquet")
    pq.write_table(pa.table({"text": ["a", "b"]}), f)
    reads = []
    read_schema = pq.read_schema
    monkeypatch.setattr(pq, "read_schema", lambda p: reads.append(p) or read_schema(p))
    assert [localfiles.not_text(f, "text") for _ in range(3)] == [None] * 3
    assert reads == [f]

    pq.write_table(pa.table({"text": [1, 2, 3]}), f)  # the file changed: read again
    os.utime(f, ns=(1, 1))  # even where the clock's grain hides the rewrite
    assert localfiles.not_text(f, "text") == "data.text_column='text' holds int64 values, not text"
    assert localfiles.not_text(f, "body").startswith("no column 'body'")
    assert len(reads) == 3


def test_json_reasons_name_the_line_the_type_and_the_columns(tmp_path):
    f = tmp_path / "0.jsonl"
    f.write_text(json.dumps({"text": "a"}) + "\n{not json\n")
    assert localfiles.unreadable(str(f), "text").startswith("line 2 is not JSON")
    f.write_text("".join(json.dumps(r) + "\n" for r in ({"text": 1}, {"text": "b", "id": 2})))
    assert localfiles.columns(str(f)) == ["id", "text"]
    assert localfiles.not_text(str(f), "text") == (
        "data.text_column='text' holds int values, not text"
    )
    assert localfiles.unreadable(str(f), "text", first=["text"]).startswith(
        "its columns (id, text) differ from the first file's (text)"
    )
    assert localfiles.kind("A.JSONL") == "json" and localfiles.kind("notes.csv") is None
