"""llm.c .bin shards: format compatibility both ways, rank/worker split, exact resume."""

from __future__ import annotations

import json
from dataclasses import replace
from itertools import islice
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from llmtrain.config import DataConfig
from llmtrain.data import DataError, build_dataloader
from llmtrain.shards import read_shard, shard_files, write_shard
from llmtrain.tokenizer import get_tokenizer

TOK = get_tokenizer("gpt2")


def llmc_write(path: Path, toks: np.ndarray) -> None:
    """llm.c dev/data/data_common.py write_datafile (GPT-2, version 1)."""
    header = np.zeros(256, dtype=np.int32)
    header[0], header[1], header[2] = 20240520, 1, len(toks)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(toks.astype(np.uint16).tobytes())


def nanogpt_read(path: Path) -> torch.Tensor:
    """modded-nanogpt train_gpt.py _load_data_shard."""
    header = torch.from_file(str(path), False, 256, dtype=torch.int32)
    assert header[0] == 20240520 and header[1] == 1
    num_tokens = int(header[2])
    with path.open("rb", buffering=0) as f:
        tokens = torch.empty(num_tokens, dtype=torch.uint16)
        f.seek(256 * 4)
        assert f.readinto(tokens.numpy()) == 2 * num_tokens
    return tokens


def test_llmc_files_load_and_ours_load_there(tmp_path):
    toks = np.random.default_rng(0).integers(0, 50257, 5000)
    llmc_write(tmp_path / "a.bin", toks)
    assert np.array_equal(read_shard(tmp_path / "a.bin"), toks)
    write_shard(tmp_path / "b.bin", toks, vocab_size=50257)
    assert torch.equal(nanogpt_read(tmp_path / "b.bin").long(), torch.from_numpy(toks))


def test_large_vocab_uses_uint32_version_2(tmp_path):
    toks = np.array([0, 70000, 100276, 5], dtype=np.int64)
    write_shard(tmp_path / "c.bin", toks, vocab_size=100277)
    assert np.fromfile(tmp_path / "c.bin", np.int32, 3).tolist() == [20240520, 2, 4]
    assert read_shard(tmp_path / "c.bin").tolist() == toks.tolist()
    write_shard(tmp_path / "d.bin", np.array([65535]), vocab_size=2**16)  # ids fit 16 bits
    assert np.fromfile(tmp_path / "d.bin", np.int32, 3).tolist() == [20240520, 1, 1]


def test_a_shard_past_the_int32_header_count_is_refused_before_writing(tmp_path):
    huge = np.broadcast_to(np.uint16(1), (2**31,))  # a view: no 4 GB allocated
    with pytest.raises(DataError, match="fewer than 2\\*\\*31"):
        write_shard(tmp_path / "big.bin", huge, 50257)
    assert not list(tmp_path.iterdir())


def test_truncated_or_foreign_file_is_a_clear_error(tmp_path):
    write_shard(tmp_path / "d.bin", np.arange(100), 50257)
    data = (tmp_path / "d.bin").read_bytes()
    (tmp_path / "d.bin").write_bytes(data[:-10])
    with pytest.raises(DataError, match="truncated"):
        read_shard(tmp_path / "d.bin")
    (tmp_path / "d.bin").write_bytes(data + b"\0\0")  # more than the header counts
    with pytest.raises(DataError, match="header says"):
        read_shard(tmp_path / "d.bin")
    (tmp_path / "e.bin").write_bytes(b"x" * 2000)
    with pytest.raises(DataError, match="magic"):
        read_shard(tmp_path / "e.bin")


@pytest.fixture
def shard_dir(tmp_path) -> Path:
    # Token ids that encode their own position make coverage checks exact.
    stream = np.arange(7 * 997) % 50000
    for i, part in enumerate(np.array_split(stream, 7)):
        write_shard(tmp_path / f"x_train_{i:06d}.bin", part, 50257)
    write_shard(tmp_path / "x_val_000000.bin", stream[:700], 50257)
    return tmp_path


def cfg_for(root: Path, **kw) -> DataConfig:
    return replace(
        DataConfig(),
        **{"source": "shards", "path": str(root), "seq_len": 32, "pin_memory": False, **kw},
    )


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_and_workers_are_disjoint_and_cover(shard_dir, world_size):
    starts = []
    for rank in range(world_size):
        loader = build_dataloader(
            cfg_for(shard_dir, num_workers=2, shuffle=False),
            TOK,
            split="train",
            batch_size=4,
            rank=rank,
            world_size=world_size,
        )
        loader.train = loader.source.train = False  # one pass
        starts += [int(x[i, 0]) for x, _ in loader for i in range(len(x))]
    assert len(starts) == len(set(starts))
    assert sorted(starts) == list(range(0, 7 * 997 - 32, 32))  # every window, once


def test_tokens_and_val(shard_dir):
    x, y = next(iter(build_dataloader(cfg_for(shard_dir), TOK, split="val", batch_size=2)))
    assert x[0].tolist() == list(range(32)) and y[1].tolist() == list(range(33, 65))


def test_the_validation_batches_are_the_same_for_any_number_of_workers(shard_dir):
    """Each worker took every num_workers-th window, so val_loss changed with data.num_workers
    and runs that differed only in it could not be compared."""
    passes = {}
    for workers in (0, 1, 2, 3, 4):
        loader = build_dataloader(
            cfg_for(shard_dir, num_workers=workers), TOK, split="val", batch_size=4
        )
        passes[workers] = [x[:, 0].tolist() for x, _ in loader]
    windows = list(range(0, 700 - 32, 32))  # 21: five batches of 4, then one of 1
    assert passes[0] == [windows[i : i + 4] for i in range(0, 21, 4)]
    assert all(p == passes[0] for p in passes.values()), passes


@pytest.mark.parametrize("vocab", [50257, 100277])  # uint16 and uint32 shards
@pytest.mark.parametrize("workers", [0, 1])
def test_batches_are_int64_token_ids_across_file_boundaries(tmp_path, vocab, workers):
    # Windows leave the shards in the files' dtype; the loader widens them to int64 once.
    stream = (np.arange(3 * 100) * 997 + 60000) % vocab  # ids past 65535 for the uint32 case
    for i, part in enumerate(np.array_split(stream, 3)):  # 100 tokens a file: windows span two
        write_shard(tmp_path / f"w_val_{i:06d}.bin", part, vocab)
    cfg = cfg_for(tmp_path, seq_len=40, num_workers=workers)
    tok = TOK
    if vocab > 2**16:  # ids past 65535 are read with a tokenizer that has them (no download)
        cfg, tok = replace(cfg, tokenizer="cl100k_base"), SimpleNamespace(vocab_size=vocab)
    batches = list(build_dataloader(cfg, tok, split="val", batch_size=3))
    assert sum(len(x) for x, _ in batches) == (300 - 41) // 40 + 1
    for b, (x, y) in enumerate(batches):
        assert x.dtype == y.dtype == torch.long and x.is_contiguous() and y.is_contiguous()
        for i in range(len(x)):
            start = 40 * (3 * b + i)
            assert x[i].tolist() == stream[start : start + 40].tolist()
            assert y[i].tolist() == stream[start + 1 : start + 41].tolist()


@pytest.mark.parametrize("world_size,workers", [(1, 0), (2, 0), (1, 2)])
def test_shuffle_visits_every_window_once_per_epoch_in_a_new_order(tmp_path, world_size, workers):
    # One file of 100 windows: shuffling the file order alone would read it the same way every
    # epoch (DataLoader(GPTDatasetV1, shuffle=True) draws a new order of the windows each epoch).
    write_shard(tmp_path / "one_train.bin", np.arange(100 * 16 + 1), 50257)
    cfg = cfg_for(tmp_path, seq_len=16, num_workers=workers)
    epochs: list[list[int]] = [[], []]
    for rank in range(world_size):
        loader = build_dataloader(cfg, TOK, split="train", batch_size=5, rank=rank,
                                  world_size=world_size, seed=3)  # fmt: skip
        assert loader.reshuffles
        starts = [int(x[i, 0]) // 16 for x, _ in islice(loader, 40 // world_size) for i in range(5)]
        epochs[0] += starts[: 100 // world_size]
        epochs[1] += starts[100 // world_size :]
    for epoch in epochs:
        assert sorted(epoch) == list(range(100))  # every window once, at its place in the stream
    assert epochs[0] != sorted(epochs[0]) and epochs[1] != epochs[0]


def test_each_epoch_reads_the_files_in_another_order(shard_dir):
    """The file order is drawn per epoch too: the windows that cross a file boundary differ
    from one epoch to the next (7 files of 6,979 tokens: 218 windows of 33)."""
    loader = build_dataloader(cfg_for(shard_dir), TOK, split="train", batch_size=2, seed=5)
    windows = [tuple(row) for x, _ in islice(loader, 218) for row in x.tolist()]
    first, second = set(windows[:218]), set(windows[218:])
    assert len(first) == 218 and first != second


def test_a_position_saved_before_windows_were_shuffled_is_refused(shard_dir):
    build = lambda: build_dataloader(cfg_for(shard_dir), TOK, split="train", batch_size=2)
    loader = build()
    next(iter(loader))
    state = loader.state_dict()
    del state["order"]  # as llmtrain wrote it when data.shuffle ordered the files only
    with pytest.raises(DataError, match="trainer.resume_data=false"):
        build().load_state_dict(state)
    del state["shuffle"]  # before f68bc3d, when shuffle was on and not recorded
    with pytest.raises(DataError, match="trainer.resume_data=false"):
        build().load_state_dict(state)
    unshuffled = build_dataloader(cfg_for(shard_dir, shuffle=False), TOK, split="train",
                                  batch_size=2)  # fmt: skip
    next(iter(unshuffled))
    state = unshuffled.state_dict()
    assert "order" not in state  # unshuffled, both read the windows in order: it resumes
    build_dataloader(cfg_for(shard_dir, shuffle=False), TOK, split="train",
                     batch_size=2).load_state_dict(state)  # fmt: skip


def test_a_resume_on_changed_shards_is_refused_unless_files_were_added_after_them(shard_dir):
    # The shuffled order is drawn over all windows: one more file moves every later window.
    # In order, only files added after the saved ones keep the position's place.
    build = lambda **kw: build_dataloader(cfg_for(shard_dir, **kw), TOK, split="train",
                                          batch_size=2)  # fmt: skip
    states = {}
    for shuffle in (True, False):
        loader = build(shuffle=shuffle)
        next(iter(loader))
        states[shuffle] = loader.state_dict()
    build().load_state_dict(states[True])  # the same files: fine
    write_shard(shard_dir / "x_train_000007.bin", np.arange(500), 50257)
    with pytest.raises(DataError, match=r"the shards in data.path=7 files, 6,979 tokens \("):
        build().load_state_dict(states[True])
    build(shuffle=False).load_state_dict(states[False])  # in order, a file added at the end
    older = {k: v for k, v in states[False].items() if k != "files_read"}
    # in order, a file put before the last one moves every window after it
    write_shard(shard_dir / "x_train_0000035.bin", np.arange(500), 50257)
    with pytest.raises(DataError, match=r"file 5 was x_train_000004.bin \(997 tokens\), now "
                       r"x_train_0000035.bin \(500 tokens\)"):  # fmt: skip
        build(shuffle=False).load_state_dict(states[False])
    build(shuffle=False).load_state_dict(older)  # saved by an llmtrain that did not record them
    for name in ("x_train_0000035.bin", "x_train_000007.bin", "x_train_000006.bin"):
        (shard_dir / name).unlink()
    with pytest.raises(
        DataError, match=r"file 7 was x_train_000006.bin \(997 tokens\), now missing"
    ):
        build(shuffle=False).load_state_dict(states[False])


def test_shards_of_another_tokenizer_are_refused_before_training(tmp_path):
    for split in ("train", "val"):
        write_shard(tmp_path / f"c_{split}_000000.bin", np.arange(0, 100_000, 7), 100_277)
    with pytest.raises(DataError, match="32-bit token ids .* data.tokenizer=gpt2 has 50,257"):
        build_dataloader(cfg_for(tmp_path), TOK, split="train", batch_size=2)
    (tmp_path / "manifest.json").write_text('{"source": {"tokenizer": "cl100k_base"}}')
    with pytest.raises(DataError, match="written with data.tokenizer=cl100k_base .* set data"):
        build_dataloader(cfg_for(tmp_path), TOK, split="val", batch_size=2)
    # llm.c's gpt2 shards (16-bit ids, no manifest) read with a 100,277-token tokenizer
    narrow = tmp_path / "narrow"
    narrow.mkdir()
    for split in ("train", "val"):
        write_shard(narrow / f"g_{split}_000000.bin", np.arange(0, 50_000, 7), 50_257)
    wide = SimpleNamespace(vocab_size=100_277, eot_id=100_257, name="cl100k_base")
    with pytest.raises(DataError, match="16-bit token ids .* data.tokenizer=cl100k_base has"):
        build_dataloader(replace(cfg_for(narrow), tokenizer="cl100k_base"), wide, split="train",
                         batch_size=2)  # fmt: skip


def test_validation_windows_do_not_overlap_whatever_the_stride(shard_dir):
    """Each validation token is scored once: val_loss compares across training strides."""
    cfg = cfg_for(shard_dir, stride=8)
    x = torch.cat([x for x, _ in build_dataloader(cfg, TOK, split="val", batch_size=4)])
    assert x.shape == ((700 - 33) // 32 + 1, 32)  # windows of 33 tokens, every 32, in 700
    assert x.flatten().tolist() == list(range(x.numel()))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_exact_across_epochs(shard_dir, workers):
    cfg = cfg_for(shard_dir, num_workers=workers, stride=24)
    build = lambda: build_dataloader(cfg, TOK, split="train", batch_size=8, world_size=1, seed=5)
    loader = build()
    it = iter(loader)
    for _ in range(40):  # one epoch is ~36 batches
        next(it)
    state = loader.state_dict()
    expected = [next(it) for _ in range(5)]
    resumed = build()
    resumed.load_state_dict(state)
    it2 = iter(resumed)
    for ex, ey in expected:
        x, y = next(it2)
        assert torch.equal(x, ex) and torch.equal(y, ey)
    assert max(w["epoch"] for w in state["workers"]) >= 1


def test_missing_dir_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="llmtrain-prepare"):
        build_dataloader(cfg_for(tmp_path / "none"), TOK, split="train", batch_size=2)


def test_the_split_is_a_word_of_the_file_name_not_any_substring(tmp_path):
    """llm.c and llmtrain-prepare name shards NAME_SPLIT_N.bin; a data name that contains
    "train" or "val", even as a word (pre-train, my-val), must not move files between splits."""
    names = ["pretrain_train_000001.bin", "pretrain_val_000000.bin", "retrieval_train_000001.bin",
             "tiny_shakespeare_val.bin", "fineweb-edu-train-000002.bin", "notes.txt",
             "pre-train_val_000000.bin", "my-val_train_000000.bin"]  # fmt: skip
    for name in names:
        write_shard(tmp_path / name, np.arange(40), 50257)
    cfg = cfg_for(tmp_path)
    found = {split: [Path(f).name for f in shard_files(cfg, split)] for split in ("train", "val")}
    assert found == {
        "train": ["fineweb-edu-train-000002.bin", "my-val_train_000000.bin",
                  "pretrain_train_000001.bin", "retrieval_train_000001.bin"],
        "val": ["pre-train_val_000000.bin", "pretrain_val_000000.bin", "tiny_shakespeare_val.bin"],
    }  # fmt: skip
    (tmp_path / "only-train").mkdir()
    write_shard(tmp_path / "only-train" / "x_train_000000.bin", np.arange(40), 50257)
    with pytest.raises(DataError, match="no val shards"):
        shard_files(cfg_for(tmp_path / "only-train"), "val")


def test_a_run_on_shards_still_being_prepared_says_so(shard_dir):
    from llmtrain.config import load_config
    from llmtrain.startup import shard_notes

    cfg = load_config(
        ["data=shards", f"data.path={shard_dir}", "data.seq_len=32", "trainer.max_steps=1"]
    )
    assert shard_notes(cfg) == []  # no manifest (llm.c's shards)
    manifest = {"source": {}, "splits": {"val": {"done": True}, "train": {"done": False}}}
    (shard_dir / "manifest.json").write_text(json.dumps(manifest))
    assert shard_notes(cfg) == [
        f"  data       {shard_dir}: llmtrain-prepare has not finished its train split "
        "(manifest.json); training reads the shards written so far"
    ]
    (shard_dir / "manifest.json").write_text("[1, 2]")  # not ours: nothing to say
    assert shard_notes(cfg) == []


def test_the_startup_says_how_many_times_the_horizon_reads_the_shards(shard_dir, capsys):
    """7 x 997 tokens of training shards: 218 windows of 32 tokens a pass. nanoGPT's Shakespeare
    runs read their 300k tokens hundreds of times; nothing said so before the epoch lines."""
    from llmtrain.config import load_config
    from llmtrain.data import build_dataloader
    from llmtrain.startup import Plan, passes_notes
    from llmtrain.tokenizer import get_tokenizer

    cfg = load_config([f"data.path={shard_dir}", "data=shards", "data.seq_len=32",
                       "model.context_length=64", "trainer.micro_batch_size=4",
                       "trainer.batch_tokens=128", "trainer.max_steps=1000"])  # fmt: skip
    loader = build_dataloader(cfg.data, get_tokenizer("gpt2"), split="train", batch_size=4)
    assert loader.source.windows == 218
    plan = Plan.from_config(cfg, 1)
    assert passes_notes(plan, loader.source.windows) == [
        "  epochs     the horizon reads the training shards 18.3 times (218 windows of 32 "
        "tokens a pass); a model memorises text it sees this often"
    ]
    assert passes_notes(plan.resumed(cfg, 990, 990 * 128), 218) == []  # 10 steps: under 1
    assert passes_notes(plan, None) == []  # a stream: its size is not known


@pytest.mark.timeout(30)
def test_fewer_windows_than_ranks_is_a_clear_error_on_every_rank(tmp_path):
    """With 2 windows and 4 ranks, ranks 2 and 3 would get none (their readers used to loop over
    empty epochs forever without yielding); every rank now says the corpus is too small."""
    write_shard(tmp_path / "x_train_000000.bin", np.arange(2 * 32 + 1), 50257)
    write_shard(tmp_path / "x_val_000000.bin", np.arange(100), 50257)
    for rank in range(4):
        loader = build_dataloader(cfg_for(tmp_path), TOK, split="train", batch_size=1,
                                  rank=rank, world_size=4)  # fmt: skip
        with pytest.raises(DataError, match="no training window") as e:
            next(iter(loader))
        if rank >= 2:  # 2 windows, 4 readers
            assert "the shards hold 2 windows of data.seq_len+1=33 tokens, fewer than the 4" in (
                str(e.value)
            )


def test_a_checkpoint_from_a_later_epoch_moves_to_another_world_size(shard_dir):
    """shard_dir holds 218 windows of 32 tokens, which 3 ranks do not divide. Every rank takes
    72 per epoch (the last 2 are left over), so 3 ranks are in step in epoch 1 and their states
    redistribute over 2 ranks; the 2 continue epoch 1 with no window repeated or skipped,
    against one rank reading the same epoch."""
    from llmtrain.consolidate import redistribute_data_state

    def first_tokens(loader, n):
        return [int(t) for x, _ in islice(loader, n) for t in x[:, 0]]

    cfg = cfg_for(shard_dir)
    one = build_dataloader(cfg, TOK, split="train", batch_size=2, world_size=1, seed=5)
    epoch1 = first_tokens(one, 218)[218:]  # 218 windows per epoch at world size 1
    old = [build_dataloader(cfg, TOK, split="train", batch_size=4, rank=r, world_size=3,
                            seed=5) for r in range(3)]  # fmt: skip
    before = [first_tokens(loader, 20) for loader in old]  # 18 batches of epoch 0, 2 of epoch 1
    states = [loader.state_dict() for loader in old]
    assert {s["workers"][0]["epoch"] for s in states} == {1}
    seen = [t for b in before for t in b[72:]]  # epoch 1: windows 0..23
    for rank in range(2):
        new = build_dataloader(cfg, TOK, split="train", batch_size=4, rank=rank,
                               world_size=2, seed=5)  # fmt: skip
        new.load_state_dict(redistribute_data_state(states, rank, 2))
        seen += first_tokens(new, 24)  # windows 24 + rank, 26 + rank, ... up to 215 + rank
    assert len(seen) == len(set(seen)) == 216 and set(seen) <= set(epoch1)
