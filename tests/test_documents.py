"""Document sources: one load_documents call per format, Hub retries, errors naming the file.

The pipeline built on top (tokenize, pack, split, resume) is tested in test_data.py.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmtrain import documents
from llmtrain.config import DataConfig
from llmtrain.documents import (
    DataError,
    clean_texts,
    load_documents,
    read_error,
    validation_documents,
    validation_source,
)


def local(files: str, **kw) -> DataConfig:
    return replace(DataConfig(), **{"files": files, "val_files": None, **kw})


@pytest.mark.parametrize("suffix", ["txt", "jsonl", "parquet"])
def test_every_local_format_streams_its_documents(tmp_path, suffix):
    texts = ["first document", "second one\nwith two lines"]
    if suffix == "txt":  # a .txt file is one document
        for i, t in enumerate(texts):
            (tmp_path / f"{i}.txt").write_text(t)
    elif suffix == "jsonl":
        (tmp_path / "0.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    else:
        pq.write_table(pa.table({"text": texts, "id": [1, 2]}), tmp_path / "0.parquet")
    ds = load_documents(local(str(tmp_path / f"*.{suffix}")), "train")
    assert sorted(row["text"] for row in ds) == sorted(texts)


def test_mixed_formats_are_refused_by_key(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "b.jsonl").write_text('{"text": "y"}\n')
    (tmp_path / "c.csv").write_text("text\nz\n")
    with pytest.raises(DataError, match="data.files: the files must all be one type; they mix "):
        load_documents(local(f"{tmp_path}/a.txt,{tmp_path}/b.jsonl"), "train")
    # both types are allowed; the one rule is one type across training and validation files
    with pytest.raises(DataError, match="data.files and data.val_files: .* mix .jsonl, .txt"):
        load_documents(local(f"{tmp_path}/b.jsonl", val_files=f"{tmp_path}/a.txt"), "train")
    with pytest.raises(DataError, match=r"c.csv: not one of \.txt"):
        load_documents(local(f"{tmp_path}/c.csv"), "train")


def test_a_txt_corpus_that_is_not_utf8_is_skipped_however_it_is_matched(tmp_path):
    """Only the pattern's suffix was read: 'corpus/[a-c]*' (no suffix) turned the check off,
    and a UTF-16 file (NUL between the letters, valid UTF-8 bytes) trained as garbage."""
    (tmp_path / "a.txt").write_text("plain English text. " * 50)
    (tmp_path / "b.txt").write_bytes("café naïve, déjà vu. ".encode("latin-1") * 50)
    (tmp_path / "c.txt").write_bytes("Notes from the meeting. ".encode("utf-16") * 50)
    for pattern in (f"{tmp_path}/*.txt", f"{tmp_path}/[a-c]*"):
        cfg = local(pattern)
        rows = list(load_documents(cfg, "train"))
        stats = dict.fromkeys(documents.STATS, 0)
        assert len(clean_texts(rows, cfg, frozenset(), stats)) == 1, pattern
        assert stats["undecodable"] == 2, pattern


def test_read_error_names_the_broken_file_and_line(tmp_path):
    (tmp_path / "good.jsonl").write_text('{"text": "fine"}\n')
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    err = read_error(local(str(tmp_path / "*.jsonl")), ValueError("parse failed"))
    assert "bad.jsonl" in str(err) and "line 2" in str(err)


def test_a_first_json_file_without_the_text_column_is_named(tmp_path):
    """datasets reads JSON files with the first one's keys: without data.text_column among them,
    the error names that file and its keys, not only the glob."""
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "a doc", "id": 1}) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "b doc"}) + "\n")
    with pytest.raises(DataError) as e:
        load_documents(local(str(tmp_path / "*.jsonl")), "train")
    assert str(e.value) == (
        f"data.text_column='text' is not a column of data.files={str(tmp_path / '*.jsonl')!r}: "
        f"{tmp_path / 'a.jsonl'}; columns: body, id"
    )


def test_files_whose_other_columns_differ_read_and_one_without_the_text_is_named(tmp_path):
    """A glob of .parquet files with the text column and other columns that differ (an
    id in one, a url in another) failed on datasets' CastError; a file without the text column
    (or a .jsonl with other keys) failed naming only the glob."""
    pq.write_table(pa.table({"text": ["a doc", "b doc"], "id": [1, 2]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"text": ["c doc"], "url": ["u"]}), tmp_path / "b.parquet")
    ds = load_documents(local(str(tmp_path / "*.parquet")), "train")
    assert [row["text"] for row in ds] == ["a doc", "b doc", "c doc"]

    pq.write_table(pa.table({"content": ["d doc"]}), tmp_path / "c.parquet")
    cfg = local(str(tmp_path / "*.parquet"))
    with pytest.raises(Exception) as e:
        list(load_documents(cfg, "train"))
    err = read_error(cfg, e.value)
    assert "c.parquet: no column 'text' (data.text_column); its columns: content" in str(err)
    with pytest.raises(DataError, match=r"/c.parquet: no column 'text'; its columns: content"):
        load_documents(local(str(tmp_path / "c.parquet")), "train")

    (tmp_path / "c.parquet").unlink()
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "c.parquet")
    with pytest.raises(DataError, match=r"c.parquet: no rows \(an empty .parquet\)"):
        try:
            list(load_documents(cfg, "train"))
        except Exception as e:
            raise read_error(cfg, e) from e

    (tmp_path / "a.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "b.jsonl").write_text('{"text": "b", "meta": {"x": 1}}\n')
    err = read_error(local(str(tmp_path / "*.jsonl")), ValueError("CastError"))
    assert "b.jsonl: its columns (meta, text) differ from the first file's (text)" in str(err)


def read_failure(cfg: DataConfig, split: str) -> str:
    """The DataError message a failed read of ``split`` becomes (as packing.py makes it)."""
    with pytest.raises(Exception) as e:
        list(load_documents(cfg, split))
    return str(read_error(cfg, e.value))


def test_a_data_path_directory_names_the_file_that_differs(tmp_path):
    """data.path=DIR (a local copy laid out as data/<split>/...) reads every file with the first
    one's columns: a file with one more column, or without the text, failed on datasets'
    CastError, naming only the directory."""
    for split in ("train", "validation"):
        (tmp_path / "pq/data" / split).mkdir(parents=True)
        (tmp_path / "js/data" / split).mkdir(parents=True)
    table = pa.table({"text": ["a doc", "b doc"]})
    pq.write_table(table, tmp_path / "pq/data/train/a.parquet")
    pq.write_table(table, tmp_path / "pq/data/validation/v.parquet")
    url = table.append_column("url", pa.array(["u", "u"]))
    pq.write_table(url, tmp_path / "pq/data/validation/w.parquet")
    (tmp_path / "js/data/train/a.jsonl").write_text('{"text": "a doc"}\n')
    (tmp_path / "js/data/train/b.jsonl").write_text('{"content": "b doc"}\n')
    (tmp_path / "js/data/validation/v.jsonl").write_text('{"text": "v doc"}\n')

    cfg = replace(DataConfig(), path=str(tmp_path / "pq"))
    err = read_failure(cfg, "validation")
    bad = tmp_path / "pq/data/validation/w.parquet"
    assert err.startswith(f"data.path={cfg.path!r}: {bad}: its columns (text, url) differ from")
    assert "data=local data.files='DIR/train/*.parquet'" in err  # reads the text column only
    cfg = replace(DataConfig(), path=str(tmp_path / "js"))
    bad = tmp_path / "js/data/train/b.jsonl"
    assert read_failure(cfg, "train").startswith(
        f"data.path={cfg.path!r}: {bad}: no column 'text' (data.text_column); its columns: content"
    )


def test_a_text_column_of_numbers_is_refused_by_file_and_nulls_are_empty(tmp_path):
    """datasets casts each file to the first one's types: a parquet file of numbers after a text
    one trained as the documents "0", "1", ...; before a text one, the run failed on a cast error
    that quoted a whole document. Nulls are missing documents: skipped and counted as empty,
    also a first file of nulls only (which made every later one fail to cast)."""
    pq.write_table(pa.table({"text": ["a doc", None]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"text": [0, 1]}), tmp_path / "b.parquet")
    cfg = local(str(tmp_path / "*.parquet"))
    held = "data.text_column='text' holds int64 values, not text; set data.text_column"
    with pytest.raises(DataError, match=rf"^data\.files: {tmp_path}/b\.parquet: {held}"):
        load_documents(cfg, "train")
    (tmp_path / "b.parquet").rename(tmp_path / "0.parquet")  # now the first file
    with pytest.raises(DataError, match=rf"^data\.files: {tmp_path}/0\.parquet: {held}"):
        load_documents(cfg, "train")
    with pytest.raises(DataError, match=rf"^data\.val_files: {tmp_path}/0\.parquet: {held}"):
        load_documents(local(f"{tmp_path}/a.parquet", val_files=f"{tmp_path}/0.parquet"), "train")
    (tmp_path / "0.jsonl").write_text('{"text": 7}\n')
    (tmp_path / "a.jsonl").write_text('{"text": "a doc"}\n')
    with pytest.raises(DataError, match=r"0\.jsonl: data.text_column='text' holds int values"):
        load_documents(local(str(tmp_path / "*.jsonl")), "train")

    (tmp_path / "0.parquet").unlink()
    pq.write_table(pa.table({"text": pa.array([None, None])}), tmp_path / "0.parquet")
    rows = list(load_documents(cfg, "train"))
    stats = dict.fromkeys(documents.STATS, 0)
    assert clean_texts(rows, cfg, frozenset(), stats) == ["a doc"] and stats["empty"] == 3
    (tmp_path / "0.jsonl").write_text('{"text": null}\n')  # JSON is read with its types
    with pytest.raises(DataError, match=r"0\.jsonl: data.text_column='text' holds nulls only"):
        load_documents(local(str(tmp_path / "*.jsonl")), "train")


class HTTPError(Exception):
    def __init__(self, status: int):
        super().__init__(f"HTTP {status}")
        self.response = type("Response", (), {"status_code": status})()


def test_transient_hub_errors_are_retried_then_given_up(monkeypatch):
    sleeps: list[float] = []
    monkeypatch.setattr(documents.time, "sleep", sleeps.append)
    answers = iter([HTTPError(429), HTTPError(503), "dataset"])

    def flaky():
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert documents._retrying(flaky, "data.path='x'") == "dataset"
    assert sleeps == [1.0, 2.0]  # exponential backoff
    with pytest.raises(HTTPError):  # a 404 is not transient: no retry
        documents._retrying(lambda: (_ for _ in ()).throw(HTTPError(404)), "x")
    assert len(sleeps) == 2
    calls = []

    def always_busy():
        calls.append(1)
        raise HTTPError(429)

    with pytest.raises(HTTPError):
        documents._retrying(always_busy, "x", tries=3)
    assert len(calls) == 3


def test_held_out_validation_documents_are_dropped_from_training(tmp_path):
    texts = [f"document number {i} " * 5 for i in range(6)]
    (tmp_path / "0.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    cfg = local(str(tmp_path / "0.jsonl"), val_docs=2)
    val, heldout = validation_documents(cfg)
    assert [row["text"] for row in val] == texts[:2] and len(heldout) == 2
    stats = dict.fromkeys(documents.STATS, 0)
    rows = [{"text": t} for t in [*texts, "", None]]
    assert clean_texts(rows, cfg, heldout, stats) == texts[2:]
    assert stats == {"documents": 4, "empty": 2, "undecodable": 0, "heldout": 2}


def test_a_validation_file_that_data_files_also_matches_is_validation_only(tmp_path):
    """data.files='corpus/*.txt' data.val_files=corpus/v.txt trained on v.txt as well."""
    for name in ("a.txt", "b.txt", "v.txt"):
        (tmp_path / name).write_text(f"the text of {name}")
    cfg = local(str(tmp_path / "*.txt"), val_files=str(tmp_path / "v.txt"))
    assert sorted(row["text"] for row in load_documents(cfg, "train")) == [
        "the text of a.txt",
        "the text of b.txt",
    ]
    assert [row["text"] for row in load_documents(cfg, "validation")] == ["the text of v.txt"]
    with pytest.raises(DataError, match="every file it matches is in data.val_files"):
        load_documents(local(str(tmp_path / "v.txt"), val_files=str(tmp_path / "v.txt")), "train")


def test_the_startup_lines_say_where_a_local_corpus_validates(tmp_path):
    """Held-out files are whole books when a corpus is a few large .txt files: say how much."""
    (tmp_path / "a.txt").write_text("a" * 900)
    (tmp_path / "b.txt").write_text("b" * 100)
    (tmp_path / "r.jsonl").write_text('{"text": "x"}\n')
    assert validation_source(DataConfig()) == ""  # the shipped sample has its own split
    assert validation_source(local(str(tmp_path / "b.txt"))) == f"the last 10% of {tmp_path}/b.txt"
    assert validation_source(local(str(tmp_path / "*.txt"), val_docs=1)) == (
        "the first 1 of 2 files, held out (90% of the text); choose others with data.val_files"
    )
    assert validation_source(local(str(tmp_path / "*.jsonl"), val_docs=3)) == (
        "the first 3 documents, held out"
    )
    with_val = local(str(tmp_path / "a.txt"), val_files=str(tmp_path / "b.txt"))
    assert validation_source(with_val) == "data.val_files (1 file)"


def test_several_patterns_compose_in_hydras_quotes(tmp_path, monkeypatch):
    """As the data=local message and conf/data/local.yaml write it: unquoted, Hydra reads the
    comma as a list and refuses the value."""
    from llmtrain.config import load_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "more").mkdir()
    for name in ("a.txt", "more/b.txt", "more/c.txt"):
        (tmp_path / name).write_text("A document. " * 20)
    cfg = load_config(["experiment=smoke", "data=local", "data.files='a.txt,more/*.txt'"])
    assert cfg.data.files == "a.txt,more/*.txt"
    assert sorted(documents._expand(cfg.data.files, "data.files")) == [
        "a.txt",
        "more/b.txt",
        "more/c.txt",
    ]
