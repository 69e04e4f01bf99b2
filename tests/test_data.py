"""The data pipeline (data.py, packing.py) against tiktoken itself: token ids, rank/worker splits,
exact resume, bad data.

Offline, CPU. Tests that read ../shared/data skip when it is absent; the rest use the shipped
sample or files they write themselves.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import re
import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from llmtrain.config import DataConfig
from llmtrain.data import SAMPLE_DIR, DataError, build_dataloader
from llmtrain.tokenizer import get_tokenizer

os.environ.setdefault("OMP_NUM_THREADS", "1")
datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0  # 5 s per shuffled pass otherwise
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is absent")
TOK = get_tokenizer("gpt2")
EOT = TOK.eot_id


def docs_of(files: list[Path]) -> list[str]:
    return [t for f in sorted(files) for t in pq.read_table(f)["text"].to_pylist()]


def stream_of(texts: list[str]) -> list[int]:
    """The reference token stream: tiktoken's own encode_ordinary, EOT after each document."""
    out: list[int] = []
    for t in texts:
        out += TOK.encoding.encode_ordinary(t) + [EOT]
    return out


def unwindow(batches, stride: int) -> list[int]:
    """Windows taken every ``stride`` tokens back into the stream they were cut from."""
    windows = [w for x, y in batches for w in torch.cat([x, y[:, -1:]], 1).tolist()]
    out = list(windows[0])
    for w in windows[1:]:
        out += w[len(w) - stride :]
    return out


def take(loader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    it = iter(loader)
    return [next(it) for _ in range(n)]


def small(**kw) -> DataConfig:
    return replace(DataConfig(), **{"seq_len": 32, "tokenize_batch": 8, "pin_memory": False, **kw})


def test_sample_val_equals_tiktoken():
    cfg = small(seq_len=64)
    batches = list(build_dataloader(cfg, TOK, split="val", batch_size=4))
    x, y = batches[0]
    assert x.dtype == torch.long and x.shape == (4, 64) and torch.equal(x[:, 1:], y[:, :-1])
    ref = stream_of(docs_of(list((SAMPLE_DIR / "data" / "validation").glob("*.parquet"))))
    got = unwindow(batches, 64)
    assert got == ref[: len(got)] and len(ref) - len(got) < 65  # only the final partial window
    assert len(list(build_dataloader(cfg, TOK, split="val", batch_size=4))) == len(batches)


@pytest.mark.parametrize("workers", [0, 1])
def test_batches_are_contiguous_so_device_copies_can_be_async(workers):
    x, y = next(iter(build_dataloader(small(num_workers=workers), TOK, split="val", batch_size=4)))
    assert x.is_contiguous() and y.is_contiguous() and x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_a_batch_is_built_without_torch_cpu_kernels():
    # torch splits a CPU copy of 32,768+ elements over its OpenMP threads, which sleep while a
    # GPU works: waking them made some batches take ~10 ms (benchmarks/batch_latency.py).
    it = iter(build_dataloader(small(), TOK, split="train", batch_size=4))
    next(it)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        next(it)
    ops = {e.key for e in prof.key_averages()}
    assert not ops & {"aten::copy_", "aten::_to_copy", "aten::clone"}, ops


@pytest.mark.gpu
@pytest.mark.parametrize("workers", [0, 1])
def test_batches_are_pinned_on_a_cuda_machine(workers):
    cfg = small(num_workers=workers, pin_memory=True)
    x, y = next(iter(build_dataloader(cfg, TOK, split="train", batch_size=4)))
    assert x.is_pinned() and y.is_pinned() and x.is_contiguous() and y.is_contiguous()


def test_sample_train_unshuffled_equals_tiktoken():
    cfg = small(shuffle=False)
    got = unwindow(take(build_dataloader(cfg, TOK, split="train", batch_size=8), 30), 32)
    ref = stream_of(docs_of(list((SAMPLE_DIR / "data" / "train").glob("*.parquet"))))
    assert got == ref[: len(got)]


def test_stride_overlaps_training_windows_only(tmp_path):
    (tmp_path / "a.txt").write_text("one two three four five six seven eight nine ten " * 40)
    (tmp_path / "v.txt").write_text("validation text, " * 80)
    files = {"files": str(tmp_path / "a.txt"), "val_files": str(tmp_path / "v.txt")}
    cfg = small(**files, stride=8, shuffle=False)
    x, y = next(iter(build_dataloader(cfg, TOK, split="train", batch_size=3)))
    ref = stream_of([(tmp_path / "a.txt").read_text()])
    for i in range(3):  # GPTDatasetV1: window i starts at i * stride
        assert (
            x[i].tolist() == ref[8 * i : 8 * i + 32]
            and y[i].tolist() == ref[8 * i + 1 : 8 * i + 33]
        )
    # Overlapping validation windows counted a token's loss up to seq_len / stride times, so
    # the same model's val_loss changed with the training stride.
    val = [torch.cat(b) for b in build_dataloader(cfg, TOK, split="val", batch_size=3)]
    unstrided = build_dataloader(small(**files), TOK, split="val", batch_size=3)
    unstrided = [torch.cat(b) for b in unstrided]
    assert len(val) == len(unstrided) > 1 and all(map(torch.equal, val, unstrided))


@pytest.mark.parametrize(
    "where", ["shipped", pytest.param("shared", marks=needs_shared)]
)  # the shipped sample runs everywhere, CI too; ../shared's FineWeb sample where it exists
def test_fineweb_code_path_holds_out_documents(where):
    root = SAMPLE_DIR if where == "shipped" else SHARED / "fineweb-sample"
    cfg = small(path=str(root), val_split=None, val_docs=5, shuffle=False)
    docs = docs_of(list((root / "data" / "train").glob("*.parquet")))
    val = unwindow(list(build_dataloader(cfg, TOK, split="val", batch_size=4)), 32)
    assert val == stream_of(docs[:5])[: len(val)]
    workers = build_dataloader(replace(cfg, num_workers=2), TOK, split="val", batch_size=4)
    assert unwindow(list(workers), 32) == val  # the same 5 documents, not 5 per worker
    loader = build_dataloader(cfg, TOK, split="train", batch_size=8)
    train = unwindow(take(loader, 20), 32)
    assert train == stream_of(docs[5:])[: len(train)]


def test_no_validation_split_holds_out_documents_but_a_misspelt_one_is_refused(tmp_path):
    """Any missing split held out training documents: data.val_split=valdation validated on
    them without a word."""
    shutil.copytree(SAMPLE_DIR / "data" / "train", tmp_path / "data" / "train")
    cfg = small(path=str(tmp_path), val_docs=5, shuffle=False)  # the schema's "validation"
    val = unwindow(list(build_dataloader(cfg, TOK, split="val", batch_size=4)), 32)
    docs = docs_of(list((tmp_path / "data" / "train").glob("*.parquet")))
    assert val == stream_of(docs[:5])[: len(val)]
    with pytest.raises(DataError, match=r"^data\.val_split='valdation': .* has no split"):
        build_dataloader(small(val_split="valdation"), TOK, split="val", batch_size=4)


def test_fineweb_offline_is_one_fast_clear_error(monkeypatch):
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cfg = small(path="HuggingFaceFW/fineweb", config_name="sample-10BT", val_split=None)
    start = time.perf_counter()
    with pytest.raises(DataError, match="HuggingFaceFW/fineweb") as e:
        build_dataloader(cfg, TOK, split="train", batch_size=2)
    assert "HF_HUB_OFFLINE" in str(e.value) and "HF_DATASETS_OFFLINE" in str(e.value)
    assert time.perf_counter() - start < 15


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_and_workers_are_disjoint_and_cover(world_size):
    """One pass over the sample's train split by every (rank, worker): each document once."""
    check_disjoint_and_cover(world_size)


def test_workers_setting_the_epoch_at_once_keep_their_shards(monkeypatch):
    """datasets' set_epoch is ``epoch_tensor += epoch - epoch_tensor`` on a tensor in shared
    memory. Force both workers of a rank to read it before either writes: on a dataset shared
    by the workers the epoch became twice the value, so one worker read another shard order --
    one shard twice, one never (an intermittent failure of the test above). Each worker must
    have an epoch of its own."""
    barrier = multiprocessing.get_context("fork").Barrier(2)

    def set_epoch(self, epoch):
        delta = epoch - self._epoch  # datasets' own read-modify-write, ...
        try:
            barrier.wait(timeout=20)  # ... with both workers reading before either writes
        except threading.BrokenBarrierError:
            barrier.reset()
        self._epoch += delta

    monkeypatch.setattr(datasets.IterableDataset, "set_epoch", set_epoch)
    check_disjoint_and_cover(2)


def check_disjoint_and_cover(world_size: int) -> None:
    docs = docs_of(list((SAMPLE_DIR / "data" / "train").glob("*.parquet")))
    ref = {tuple(stream_of([d])) for d in docs}
    assert len(ref) == len(docs)
    cfg = small(num_workers=2)
    found, covered, slots = [], 0, 0
    for rank in range(world_size):
        loader = build_dataloader(cfg, TOK, split="train", batch_size=4, rank=rank,
                                  world_size=world_size, seed=3)  # fmt: skip
        assert loader.num_workers == 2
        loader.train = loader.source.train = False  # one pass, ending with each worker's last batch
        per_worker: dict[int, list] = {0: [], 1: []}
        for batch in loader:  # the worker that made a batch is the one before "next"
            per_worker[(loader.state_dict()["next"] - 1) % 2].append(batch)
        for batches in per_worker.values():
            slots += 1
            tokens = unwindow(batches, 32)
            covered += len(tokens)
            pieces, cur = [], []
            for t in tokens:
                cur.append(t)
                if t == EOT:
                    pieces.append(tuple(cur))
                    cur = []
            found += pieces
    assert len(found) == len(set(found)) and set(found) <= ref  # disjoint, real documents
    total = sum(len(d) for d in ref)
    assert total - covered < slots * 33 and len(ref) - len(found) <= slots


def test_training_batches_come_from_the_workers_in_turn():
    """Each worker reads its own shards: a worker passed over would leave its share of the
    corpus untrained (only the other one's position would move)."""
    loader = build_dataloader(small(num_workers=2), TOK, split="train", batch_size=4, seed=7)
    turns = [loader.state_dict()["next"] for _ in zip(range(6), loader, strict=False)]
    assert turns == [1, 0, 1, 0, 1, 0]
    assert all(loader.state_dict()["workers"])  # both positions moved


def write_txt_corpus(root: Path, n: int = 12) -> str:
    docs = [d for d in docs_of(list((SAMPLE_DIR / "data" / "validation").glob("*.parquet")))][:n]
    for i, d in enumerate(docs):
        (root / f"doc{i:02d}.txt").write_text(d[:1500])
    return str(root / "*.txt")


def resume_case(kind: str, tmp_path: Path) -> DataConfig:
    if kind == "parquet":
        return small()
    if kind == "txt-stride":
        return small(files=write_txt_corpus(tmp_path), stride=20, val_docs=2, seq_len=24)
    if kind == "jsonl-buffer-free":
        rows = docs_of(list((SAMPLE_DIR / "data" / "validation").glob("*.parquet")))[:30]
        (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
        return small(files=str(tmp_path / "c.jsonl"), val_docs=3)
    raise AssertionError(kind)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize(
    ("kind", "k"), [("parquet", 9), ("txt-stride", 70), ("jsonl-buffer-free", 7)]
)
def test_resume_is_exact(tmp_path, kind, k, workers):
    cfg = replace(resume_case(kind, tmp_path), num_workers=workers)
    build = lambda: build_dataloader(cfg, TOK, split="train", batch_size=4, seed=7)
    loader = build()
    it = iter(loader)
    for _ in range(k):
        next(it)
    buf = io.BytesIO()
    torch.save(loader.state_dict(), buf)  # plain, picklable
    expected = [next(it) for _ in range(6)]
    resumed = build()
    buf.seek(0)
    resumed.load_state_dict(torch.load(buf, weights_only=False))
    got = take(resumed, 6)
    for (x, y), (ex, ey) in zip(got, expected, strict=True):
        assert torch.equal(x, ex) and torch.equal(y, ey)
    state = loader.state_dict()
    assert state["windows"] == (k + 6) * 4 and state["global_tokens"] == (k + 6) * 4 * cfg.seq_len


def test_epochs_reshuffle_and_count(tmp_path):
    """Each epoch reads every training document once, in a new order (it only counted)."""
    docs = docs_of(list((SAMPLE_DIR / "data" / "validation").glob("*.parquet")))[:6]
    for i, d in enumerate(docs):
        (tmp_path / f"doc{i:02d}.txt").write_text(f"[doc{i}] {d[:300]}")
    cfg = small(files=str(tmp_path / "*.txt"), val_docs=1, seq_len=16, num_workers=0)
    loader = build_dataloader(cfg, TOK, split="train", batch_size=4, seed=1)
    text = TOK.decode(unwindow(take(loader, 120), 16))
    assert loader.state_dict()["workers"][0]["epoch"] >= 3
    order = [int(m) for m in re.findall(r"\[doc(\d)\]", text)]
    epochs = [order[i : i + 5] for i in range(0, len(order) - 4, 5)][:3]
    assert all(sorted(e) == sorted(epochs[0]) and len(set(e)) == 5 for e in epochs), order
    assert len({tuple(e) for e in epochs}) > 1, epochs  # not the same order every epoch
    other = build_dataloader(cfg, TOK, split="train", batch_size=4, seed=2)
    other_text = TOK.decode(unwindow(take(other, 120), 16))
    other_order = [int(m) for m in re.findall(r"\[doc(\d)\]", other_text)]
    assert other_order != order  # trainer.seed draws the orders


def test_a_pass_that_ends_at_a_window_s_end_keeps_that_window(tmp_path):
    """Only a final partial window is dropped: 16 tokens and EOT are one whole window of
    seq_len=16 (+1)."""
    (tmp_path / "train.txt").write_text("hello " * 100)
    (tmp_path / "val.txt").write_text("hello" + " hello" * 15)
    cfg = small(files=str(tmp_path / "train.txt"), val_files=str(tmp_path / "val.txt"), seq_len=16)
    [(x, y)] = list(build_dataloader(cfg, TOK, split="val", batch_size=4))
    assert x.shape == (1, 16) and y[0].tolist() == stream_of(["hello" + " hello" * 15])[1:]


def test_a_worker_that_never_reads_a_document_stops_after_empty_epochs(tmp_path, monkeypatch):
    """Shuffled epochs deal files out afresh, so an empty epoch may be followed by a full one;
    a worker that has read nothing in EMPTY_EPOCHS of them in a row stops (here every document
    is held out), rather than looping over empty epochs forever."""
    from llmtrain import packing

    for i in range(2):
        (tmp_path / f"doc{i}.txt").write_text(f"document {i} " * 50)
    cfg = small(files=str(tmp_path / "*.txt"), val_split=None, val_docs=2, seq_len=16)
    epochs = []
    hf_epoch = packing.PackedDocuments._hf_epoch

    def counted(self, epoch: int) -> int:
        epochs.append(epoch)
        assert len(epochs) <= 2 * packing.EMPTY_EPOCHS, "the empty stream never ends"
        return hf_epoch(self, epoch)

    monkeypatch.setattr(packing.PackedDocuments, "_hf_epoch", counted)
    loader = build_dataloader(cfg, TOK, split="train", batch_size=1, rank=0, world_size=2)
    with pytest.raises(DataError, match="Every document was held out"):
        next(iter(loader))
    assert epochs == list(range(packing.EMPTY_EPOCHS))


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="data.files"):
        build_dataloader(small(files=str(tmp_path / "nope.txt")), TOK, split="train", batch_size=2)


def test_missing_text_column(tmp_path):
    pq.write_table(pa.table({"content": ["a b c"] * 5}), tmp_path / "x.parquet")
    with pytest.raises(DataError, match="content"):
        build_dataloader(small(files=str(tmp_path / "x.parquet")), TOK, split="train", batch_size=2)


def test_a_data_error_in_a_worker_reads_as_the_worker_raised_it(tmp_path):
    """torch re-raises a worker's exception with the worker's whole traceback as its message:
    the console showed some 40 lines of it before the one naming the file."""
    doc = "A perfectly ordinary document about the weather. " * 30
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": doc}) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": doc, "url": "u"}) + "\n")
    (tmp_path / "v.jsonl").write_text(json.dumps({"text": "validation text " * 40}) + "\n")
    cfg = small(files=str(tmp_path / "*.jsonl"), val_files=str(tmp_path / "v.jsonl"), num_workers=2)
    loader = build_dataloader(cfg, TOK, split="train", batch_size=2)
    with pytest.raises(DataError) as e:
        take(loader, 8)
    assert str(e.value).startswith(
        f"data.files: {tmp_path}/b.jsonl: its columns (text, url) differ"
    )


def test_empty_corpus(tmp_path):
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.txt").write_text("  \n")
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "v.txt").write_text("validation text " * 40)
    cfg = small(files=str(tmp_path / "*.txt"), val_files=str(tmp_path / "val" / "v.txt"))
    loader = build_dataloader(cfg, TOK, split="train", batch_size=2)
    with pytest.raises(DataError, match="no training window"):
        next(iter(loader))
    assert loader.stats["empty"] == 2


def test_one_txt_file_trains_on_its_head_and_validates_on_its_tail(tmp_path):
    """nanoGPT's input.txt: one .txt file is one document, so none can be held out. The last
    data.val_fraction of its text is validation, and training reads exactly the rest."""
    text = "".join(f"Line {i}: the one file of this corpus, read twice?\n" for i in range(300))
    (tmp_path / "input.txt").write_text(text)
    cfg = small(files=str(tmp_path / "input.txt"), val_docs=1, shuffle=False)
    cut = int(len(text) * 0.9)
    head, tail = stream_of([text[:cut]]), stream_of([text[cut:]])
    val = build_dataloader(cfg, TOK, split="val", batch_size=2)
    assert unwindow(list(val), 32) == tail[: len(tail) - (len(tail) - 1) % 32]
    train = build_dataloader(cfg, TOK, split="train", batch_size=2)
    epoch = take(train, (len(head) - 1) // 64)
    assert unwindow(epoch, 32) == head[: 64 * len(epoch) + 1]
    assert train.stats["documents"] == 1 and train.stats["heldout"] == 0
    assert not train.reshuffles  # one file: every epoch reads it in the same order
    with pytest.raises(DataError, match="one document, and 2 ranks .* llmtrain-prepare"):
        build_dataloader(cfg, TOK, split="train", batch_size=2, rank=1, world_size=2)
    # With its validation text in another file it is still one document: rank 1 got none and
    # failed with "the corpus is empty or too small".
    (tmp_path / "val.txt").write_text(text[:500])
    with_val = replace(cfg, files=f"{tmp_path}/*.txt", val_files=str(tmp_path / "val.txt"))
    one = r"input.txt is one document, and 2 ranks .* data.val_files="
    with pytest.raises(DataError, match=one):
        build_dataloader(with_val, TOK, split="train", batch_size=2, rank=1, world_size=2)
    assert "the last 0.1 of the text" in str(train.state_dict())
    quarter = build_dataloader(replace(cfg, val_fraction=0.25), TOK, split="val", batch_size=2)
    got = unwindow(list(quarter), 32)
    assert got == stream_of([text[int(len(text) * 0.75) :]])[: len(got)] and len(got) > len(tail)


def test_non_utf8_and_empty_documents_are_skipped_and_counted(tmp_path):
    good = "A perfectly ordinary document about the weather. " * 30
    (tmp_path / "good.txt").write_text(good)
    (tmp_path / "bad.txt").write_bytes(b"valid start \xff\xfe broken bytes " * 20)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "v.txt").write_text("validation text " * 40)  # *.txt matches it: validation only
    cfg = small(files=str(tmp_path / "*.txt"), val_files=str(tmp_path / "v.txt"))
    loader = build_dataloader(cfg, TOK, split="train", batch_size=2)
    got = unwindow(take(loader, 3), 32)
    assert got == stream_of([good])[: len(got)]
    assert loader.stats["undecodable"] == 1 and loader.stats["empty"] == 1


def test_a_stray_replacement_character_does_not_drop_a_whole_text_file(tmp_path):
    # input.txt is one document: one U+FFFD (a bad byte, or the character itself in valid
    # UTF-8) in a big file used to skip all of it ("the corpus is empty or too small").
    text = "To be, or not to be, that is the question. " * 400
    (tmp_path / "input.txt").write_bytes(
        text.encode() + b"caf\xe9 Fe\xef\xbf\xbdski " + text.encode()
    )
    cfg = small(files=str(tmp_path / "input.txt"))
    loader = build_dataloader(cfg, TOK, split="train", batch_size=2)
    take(loader, 3)
    assert loader.stats == {"documents": 1, "empty": 0, "undecodable": 0, "heldout": 0}
    (tmp_path / "input.txt").write_bytes("Grüße aus Köln. ".encode("latin-1") * 400)
    loader = build_dataloader(cfg, TOK, split="train", batch_size=2)
    with pytest.raises(DataError, match="not UTF-8 text .* save it as UTF-8"):
        take(loader, 1)


def test_jsonl_rows_are_documents_and_empty_rows_counted(tmp_path):
    rows = ["first document here", "", "second document", None]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    cfg = small(files=str(tmp_path / "c.jsonl"), val_docs=1, seq_len=4)
    loader = build_dataloader(cfg, TOK, split="train", batch_size=1)
    got = unwindow(take(loader, 2), 4)
    assert got == stream_of(["second document"] * 4)[: len(got)]
    assert loader.stats["empty"] >= 2 and loader.stats["heldout"] >= 1


def test_a_held_out_validation_shorter_than_a_window_says_so(tmp_path):
    """It said "the corpus is empty or too small" of a corpus of long documents."""
    (tmp_path / "a.txt").write_text("A one-line story.")
    (tmp_path / "b.txt").write_text("A long document. " * 400)
    (tmp_path / "c.txt").write_text("Another long one. " * 400)
    cfg = small(files=str(tmp_path / "*.txt"), val_docs=1)
    with pytest.raises(DataError, match=r"validation is the first data\.val_docs=1 training"):
        list(build_dataloader(cfg, TOK, split="val", batch_size=1))


def test_a_rank_whose_files_are_all_held_out_this_epoch_reads_others_next_epoch(tmp_path):
    """Four one-document files, the first held out for validation, four ranks: each shuffled
    epoch deals every rank one file, so some epoch hands a rank the held-out one. That rank
    moves on to the next epoch (it used to stop for good: its training stream ended and the
    loop waited on it forever)."""
    texts = docs_of(list((SAMPLE_DIR / "data" / "validation").glob("*.parquet")))[:4]
    for i, t in enumerate(texts):
        (tmp_path / f"doc{i}.txt").write_text(f"[doc{i}] {t[:300]}")
    cfg = small(files=str(tmp_path / "*.txt"), val_split=None, val_docs=1, seq_len=16)
    for rank in range(4):
        loader = build_dataloader(cfg, TOK, split="train", batch_size=2, rank=rank,
                                  world_size=4, seed=0)  # fmt: skip
        text = "".join(TOK.decode(x.flatten().tolist()) for x, _ in take(loader, 60))
        assert "[doc0]" not in text  # held out
        assert all(f"[doc{i}]" in text for i in (1, 2, 3)), rank
        assert loader.stats["heldout"] > 0  # this rank did draw the held-out file


def test_a_training_stream_that_ends_is_an_error_not_an_endless_wait():
    """train.batches() restarts the loader whenever it ends; a training loader that ended
    without an error would make that loop spin forever."""
    from llmtrain.data import TokenLoader
    from llmtrain.metrics import Throughput
    from llmtrain.train import batches

    class OneBatchThenDone:  # a source in PackedDocuments' item protocol
        resume: list = []

        def __iter__(self):
            stats = {"documents": 1, "empty": 0, "undecodable": 0, "heldout": 0}
            yield 0, np.arange(2 * 17).reshape(2, 17), {}, stats
            yield 0, None, {}, stats

    loader = TokenLoader(OneBatchThenDone(), small(seq_len=16), batch_size=2, train=True,
                         rank=1, world_size=2, kind="hf")  # fmt: skip
    stream = batches(loader, Throughput())
    next(stream)
    with pytest.raises(DataError, match="training stream of rank 1 ended after 1 batches"):
        next(stream)


@pytest.mark.parametrize(
    "key, value, name",
    [
        ("tokenize_batch", 1, "data.tokenize_batch"),
        ("stride", 8, "data.stride"),
        ("shuffle", False, "data.shuffle"),
        ("seed", 2, "trainer.seed"),
    ],
)
def test_resume_refuses_a_change_that_moves_the_position(key, value, name):
    """A position counts tokens into one batch of documents (data.tokenize_batch), windows of
    one stride, in one epoch's shard order (shuffled by the seed): changed, the resumed run
    would skip or repeat tokens without a word (a new seed mid-epoch read 137 of 275 documents
    twice). Checkpoints older than these fields still load."""
    cfg = small(num_workers=0, tokenize_batch=4)
    loader = build_dataloader(cfg, TOK, split="train", batch_size=2, seed=1)
    take(loader, 3)
    state = loader.state_dict()
    cfg_b, seed_b = (cfg, value) if key == "seed" else (replace(cfg, **{key: value}), 1)
    other = build_dataloader(cfg_b, TOK, split="train", batch_size=2, seed=seed_b)
    with pytest.raises(DataError, match=f"{name}=.* exact resume needs the same value"):
        other.load_state_dict(state)
    old = {
        k: v for k, v in state.items() if k not in ("tokenize_batch", "stride", "shuffle", "seed")
    }
    build_dataloader(cfg, TOK, split="train", batch_size=2, seed=1).load_state_dict(old)


def test_resume_refuses_as_many_other_held_out_documents(tmp_path):
    """A corpus whose first documents differ (here the sample with its first file's rows
    reversed) holds out as many, other documents: the position would go on in another
    stream."""
    shutil.copytree(SAMPLE_DIR / "data" / "train", tmp_path / "data" / "train")
    first = sorted((tmp_path / "data" / "train").glob("*.parquet"))[0]
    table = pq.read_table(first)
    pq.write_table(table.take(list(range(table.num_rows))[::-1]), first)
    cfg = small(num_workers=0, val_split=None, val_docs=3)
    loader = build_dataloader(cfg, TOK, split="train", batch_size=2, seed=1)
    take(loader, 3)
    other = build_dataloader(replace(cfg, path=str(tmp_path)), TOK, split="train", batch_size=2,
                             seed=1)  # fmt: skip
    with pytest.raises(DataError, match=r"held-out validation .* exact resume needs"):
        other.load_state_dict(loader.state_dict())


@pytest.mark.parametrize("change", [{"val_docs": 10}, {"text_column": "url"}])
def test_resume_refuses_other_documents_in_the_stream(change):
    """Saved with 3 held-out documents, resumed with 10: the position went on in a stream
    without documents 3-9 (768 tokens of document 10 on were never trained, 3-9 had been)."""
    cfg = small(num_workers=0, val_split=None, val_docs=3)
    loader = build_dataloader(cfg, TOK, split="train", batch_size=2, seed=1)
    take(loader, 3)
    other = build_dataloader(replace(cfg, **change), TOK, split="train", batch_size=2, seed=1)
    with pytest.raises(DataError, match="exact resume needs the same value"):
        other.load_state_dict(loader.state_dict())


def test_resume_refuses_other_local_files_and_goes_on_in_a_corpus_that_moved(tmp_path):
    """A position counts documents in the files data.files matched: with a file added, the
    resumed run skipped or repeated documents without a word."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(8):
        (corpus / f"{i}.txt").write_text(f"Document number {i}. " * 30)
    cfg = replace(DataConfig(), source="hf", path=None, config_name=None, val_docs=1,
                  files=str(corpus / "*.txt"), seq_len=16, num_workers=0)  # fmt: skip
    loader = build_dataloader(cfg, TOK, split="train", batch_size=2, seed=1)
    take(loader, 3)
    state = loader.state_dict()
    moved = tmp_path / "moved"
    corpus.rename(moved)
    build_dataloader(replace(cfg, files=str(moved / "*.txt")), TOK, split="train", batch_size=2,
                     seed=1).load_state_dict(state)  # fmt: skip
    (moved / "3b.txt").write_text("A document added later. " * 30)
    other = build_dataloader(replace(cfg, files=str(moved / "*.txt")), TOK, split="train",
                             batch_size=2, seed=1)  # fmt: skip
    with pytest.raises(DataError, match="the files data.files matches=8 files .* has 9 files"):
        other.load_state_dict(state)


def test_without_shuffling_the_seed_may_change_at_a_resume():
    cfg = small(num_workers=0, shuffle=False)
    loader = build_dataloader(cfg, TOK, split="train", batch_size=2, seed=1)
    take(loader, 3)
    build_dataloader(cfg, TOK, split="train", batch_size=2, seed=2).load_state_dict(
        loader.state_dict()
    )


def test_the_data_position_counts_windows_of_every_batch_size():
    """A resume with another trainer.micro_batch_size: the tokens recorded count each batch at
    its own size (they were batches x the current size)."""
    cfg = small(num_workers=0)
    loader = build_dataloader(cfg, TOK, split="train", batch_size=4, seed=1)
    take(loader, 3)
    smaller = build_dataloader(cfg, TOK, split="train", batch_size=2, seed=1)
    smaller.load_state_dict(loader.state_dict())
    take(smaller, 2)
    state = smaller.state_dict()
    assert (state["windows"], state["global_tokens"]) == (3 * 4 + 2 * 2, 16 * cfg.seq_len)


def test_a_stream_that_drops_is_reopened_at_the_same_document(monkeypatch):
    """A network failure mid-stream (after datasets' own retries) reopens the stream where
    the batch of documents began: the tokens equal an uninterrupted run's. One that never comes
    back is a StreamError (requeued), and a corrupt file is not retried at all."""
    import llmtrain.data as data
    import llmtrain.packing as packing

    monkeypatch.setattr(packing, "STREAM_RETRY_WAITS", (0, 0))
    cfg = small(tokenize_batch=2)  # a document is ~25 windows of the sample: 80 batches, ~7
    reference = take(build_dataloader(cfg, TOK, split="train", batch_size=4, seed=2), 80)
    real_iter = datasets.IterableDataset.__iter__
    failures = {"left": 1, "rows": 0}

    def flaky(self):
        for row in real_iter(self):
            failures["rows"] += 1
            if failures["rows"] >= 4 and failures["left"]:  # from the 2nd document of batch 2
                failures["left"] -= 1
                raise ConnectionError("Server Disconnected")
            yield row

    monkeypatch.setattr(datasets.IterableDataset, "__iter__", flaky)
    got = take(build_dataloader(cfg, TOK, split="train", batch_size=4, seed=2), 80)
    assert failures["left"] == 0
    assert all(torch.equal(a[0], b[0]) for a, b in zip(got, reference, strict=True))

    failures.update(left=10, rows=0)
    with pytest.raises(data.StreamError, match="after 2 retries"):
        take(build_dataloader(cfg, TOK, split="train", batch_size=4, seed=2), 80)

    def corrupt(self):
        raise pa.ArrowInvalid("Parquet magic bytes not found")
        yield

    monkeypatch.setattr(datasets.IterableDataset, "__iter__", corrupt)
    with pytest.raises(DataError, match="reading failed: ArrowInvalid") as e:
        take(build_dataloader(cfg, TOK, split="train", batch_size=4, seed=2), 1)
    assert not isinstance(e.value, data.StreamError)


def test_a_hub_config_name_on_a_local_copy_names_the_key():
    """conf/data/fineweb.yaml names the Hub's config (sample-10BT); a local copy laid out as
    data/<split>/*.parquet has only the default one."""
    cfg = small(path=str(SAMPLE_DIR), config_name="sample-10BT")
    with pytest.raises(DataError, match="data.config_name='sample-10BT' .* data.config_name=null"):
        build_dataloader(cfg, TOK, split="train", batch_size=2)


def test_a_process_that_exits_with_its_workers_running_does_not_hang(tmp_path):
    """The workers ignore a SIGTERM from outside (the training process saves first), but not
    the one their own process sends at exit: ignoring that, Python's exit waited forever."""
    import subprocess
    import sys

    script = tmp_path / "exit.py"
    script.write_text(
        "import sys\n"
        "from llmtrain.config import load_config\n"
        "from llmtrain.data import build_dataloader\n"
        "from llmtrain.tokenizer import get_tokenizer\n"
        "cfg = load_config(['experiment=smoke', 'data.num_workers=2'])\n"
        "loader = build_dataloader(cfg.data, get_tokenizer('gpt2'), split='train', batch_size=2)\n"
        "it = iter(loader)\n"
        "next(it)\n"
        "sys.exit(3)\n"
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, timeout=120)
    assert out.returncode == 3, out.stderr[-2000:]
