"""llmtrain-prepare: the shipped sample into llm.c shards equal to tiktoken's ids; resumable."""

from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest

import llmtrain.prepare as prepare_mod
from llmtrain.config import ConfigError, DataConfig
from llmtrain.data import SAMPLE_DIR
from llmtrain.documents import DataError
from llmtrain.prepare import load_data_config, main, prepare, train_overrides
from llmtrain.shards import read_shard
from llmtrain.tokenizer import get_tokenizer

TOK = get_tokenizer("gpt2")


def ref_stream(split: str) -> list[int]:
    out: list[int] = []
    for f in sorted((SAMPLE_DIR / "data" / split).glob("*.parquet")):
        for t in pq.read_table(f)["text"].to_pylist():
            out += TOK.encoding.encode_ordinary(t) + [TOK.eot_id]
    return out


def tokens(out, split, manifest) -> list[int]:
    files = [out / s["file"] for s in manifest["splits"][split]["shards"]]
    return np.concatenate([read_shard(f) for f in files]).tolist()


def test_prepare_sample_equals_tiktoken_and_resumes(tmp_path):
    cfg = replace(DataConfig(), shard_tokens=100_000)
    manifest = prepare(cfg, tmp_path, num_proc=2, progress=False, chunk_docs=16)
    train = manifest["splits"]["train"]
    assert len(train["shards"]) >= 3 and train["done"]
    assert tokens(tmp_path, "train", manifest) == ref_stream("train")
    assert tokens(tmp_path, "val", manifest) == ref_stream("validation")
    # Interrupt after the first train shard: the rerun rewrites the rest identically.
    before = {p.name: p.read_bytes() for p in tmp_path.glob("*.bin")}
    first = train["shards"][0]
    partial = json.loads((tmp_path / "manifest.json").read_text())
    entry = partial["splits"]["train"]
    entry["shards"], entry["done"] = [first], False
    entry["rows"] = first["rows"]
    entry["stats"] = first["stats"]
    (tmp_path / "manifest.json").write_text(json.dumps(partial))
    for s in train["shards"][1:]:
        (tmp_path / s["file"]).unlink()
    prepare(cfg, tmp_path, num_proc=1, progress=False, chunk_docs=16)
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.bin")} == before


def test_one_txt_file_is_split_by_its_text(tmp_path):
    """A corpus of one .txt file: the val shards hold its last data.val_fraction, the train
    shards the rest; another fraction into the same out_dir is refused."""
    text = "".join(f"Line {i} of input.txt.\n" for i in range(400))
    (tmp_path / "input.txt").write_text(text)
    cfg = replace(DataConfig(), files=str(tmp_path / "input.txt"), val_split=None, val_docs=1)
    out = tmp_path / "shards"
    manifest = prepare(cfg, out, num_proc=1, progress=False)
    cut = int(len(text) * 0.9)
    for split, part in (("train", text[:cut]), ("val", text[cut:])):
        assert tokens(out, split, manifest) == TOK.encoding.encode_ordinary(part) + [TOK.eot_id]
    with pytest.raises(ConfigError, match="val_fraction: 0.1 there, 0.2 now"):
        prepare(replace(cfg, val_fraction=0.2), out, num_proc=1, progress=False)


def test_cli_parses_out_dir_and_overrides(tmp_path, capsys):
    assert load_data_config(["data=local", "data.files=x.txt"]).files == "x.txt"
    main(["data=sample", f"out_dir={tmp_path}", "num_proc=1", "data.shard_tokens=10000000"])
    out = capsys.readouterr().out
    assert "data=shards data.path=" in out
    assert "val: 1 shards, 69,097 tokens from 40 documents (skipped: 0 empty, 0 undecodable" in out
    assert sorted(p.name for p in tmp_path.glob("*.bin")) == [
        "sample_train_000000.bin",
        "sample_val_000000.bin",
    ]


@pytest.mark.parametrize(
    "args, says",
    [
        (["data=local", "data.files=nope.txt"], "data error: data.files: no file matches"),
        (["data=shards", "data.path=x"], "config error: data: already shards"),
        (["data=local"], "config error: data.files: data=local reads files"),
        (["data=sample", "data.seq_lenn=5"], "Did you mean data.seq_len?"),  # not '+data...'
        (["data=sample", "+data.shard_token=9"], "did you mean data.shard_tokens?"),  # not dropped
        (["data=sample", "data.tokenizer=gpt5"], "config error: data.tokenizer: unknown"),
        (["data=sample", "num_procs=8"], "num_procs: not an argument; did you mean num_proc=...?"),
        (["data=sample", "num_proc=eight"], "num_proc: 'eight' is not a whole number"),
        (["data=sample", "num_proc=-1"], "num_proc: -1; give 1 or more"),
        (
            ["data=sample", "OTHER SOURCE"],
            "{out}/manifest.json was written from other settings "
            "(path: 'elsewhere' there, 'sample' now); use another out_dir",
        ),  # fmt: skip
    ],
)
def test_cli_errors_are_a_message_and_exit_2(tmp_path, capsys, args, says):
    if "OTHER SOURCE" in args:  # out_dir holds another source's shards: a message, no traceback
        args = args[:-1]
        ours = {"path": "sample", "config_name": None, "files": None, "val_files": None,
                "text_column": "text", "train_split": "train", "val_split": "validation",
                "val_docs": 100, "tokenizer": "gpt2", "shard_tokens": 100_000_000}  # fmt: skip
        there = json.dumps({"source": {**ours, "path": "elsewhere"}, "splits": {}})
        (tmp_path / "manifest.json").write_text(there)
    says = says.replace("{out}", str(tmp_path))
    with pytest.raises(SystemExit) as e:
        main([*args, f"out_dir={tmp_path}", "num_proc=1"])
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_a_resume_over_other_files_is_refused(tmp_path):
    """Prepare resumes by skipping the documents it has done; with a file added to the
    corpus, one document was written twice and the new file's never, without a word."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"{i:04d}.txt").write_text(f"Document {i}. " * 40)
    cfg = replace(DataConfig(), source="hf", path=None, config_name=None,
                  files=str(corpus / "*.txt"), val_docs=1, shard_tokens=50)  # fmt: skip
    out = tmp_path / "out"
    prepare(cfg, out, num_proc=1, progress=False, chunk_docs=1)
    prepare(cfg, out, num_proc=1, progress=False, chunk_docs=1)  # the same files: nothing to do
    (corpus / "0002b.txt").write_text("A document added later. " * 40)
    with pytest.raises(ConfigError, match="matched: '6 files .*' there, '7 files .*' now"):
        prepare(cfg, out, num_proc=1, progress=False, chunk_docs=1)


def test_prepare_names_a_bad_file_and_refuses_a_corpus_without_training_text(tmp_path):
    jsonl = tmp_path / "late.jsonl"
    jsonl.write_bytes(b'{"text": "fine"}\n' * 50 + b'{"text": "caf\xe9"}\n')
    cfg = replace(DataConfig(), source="hf", path=None, config_name=None, files=str(jsonl),
                  val_docs=1)  # fmt: skip
    with pytest.raises(DataError, match="late.jsonl: .*fix or remove the file"):
        prepare(cfg, tmp_path / "a", num_proc=1, progress=False, chunk_docs=8)
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text("Some text. " * 20)
    held = replace(cfg, files=f"{tmp_path}/a.txt,{tmp_path}/b.txt", val_docs=2)
    with pytest.raises(DataError, match="no training tokens .* every document was held out"):
        prepare(held, tmp_path / "b", num_proc=1, progress=False)


def test_a_damaged_manifest_is_a_message(tmp_path):
    (tmp_path / "manifest.json").write_text('{"source": {"path": "sam')
    with pytest.raises(DataError, match="manifest.json is unreadable .* remove"):
        prepare(DataConfig(), tmp_path, num_proc=1, progress=False)


def test_the_train_with_line_names_another_tokenizer_and_its_vocabulary(monkeypatch):
    """Shards of cl100k_base were announced as 'train with: data=shards data.path=DIR', which
    llmtrain-train refused twice over: data.tokenizer, then model.vocab_size."""
    assert train_overrides(DataConfig(), "shards/x") == "data=shards data.path=shards/x"
    monkeypatch.setattr(prepare_mod, "get_tokenizer", lambda name: SimpleNamespace(vocab_size=7))
    cfg = replace(DataConfig(), tokenizer="cl100k_base")
    assert train_overrides(cfg, "shards/x") == (
        "data=shards data.path=shards/x data.tokenizer=cl100k_base model.vocab_size=7"
    )
