"""llmtrain-eval: a checkpoint's validation loss equals what its training run logged for that
step; a run dir, ``--batches all``, data overrides; refusals and a missing checkpoint exit 2."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import TINY

from llmtrain.config import load_config
from llmtrain.data import build_dataloader
from llmtrain.eval import evaluate_checkpoint, main
from llmtrain.metrics import format_ppl
from llmtrain.tokenizer import get_tokenizer

ROOT = Path(__file__).resolve().parents[1]

RUN = [
    *TINY,
    "trainer.batch_tokens=256",  # 4 x 64: one micro-batch a step
    "trainer.max_steps=2",
    "trainer.eval_every=1",
    "trainer.eval_batches=2",
    "trainer.ckpt_every=1",
    "trainer.sample_every=0",
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """Two steps, an evaluation and a checkpoint after each (~5 s)."""
    from llmtrain.train import train

    run = tmp_path_factory.mktemp("eval-run")
    train(load_config(RUN), run)
    return run


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    """One .txt file: data=local validates on its last 10% (~9 windows of 64 tokens)."""
    path = tmp_path_factory.mktemp("eval-text") / "corpus.txt"
    words = ["the", "river", "ran", "past", "a", "mill", "where", "bread", "was", "made"]
    path.write_text(" ".join(f"{words[i % 10]} {words[(i * 7) % 10]}." for i in range(2500)))
    return path


def cli(script: str, module: str) -> list[str]:
    """The installed console script (checks the entry point), else ``python -m``."""
    path = Path(sys.executable).with_name(script)
    return [str(path)] if path.is_file() else [sys.executable, "-m", module]


def logged(run: Path) -> dict[int, float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["val_loss"] for r in map(json.loads, lines) if "val_loss" in r}


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_val_loss_equals_the_one_the_training_run_logged(run):
    expected = logged(run)
    assert set(expected) == {1, 2}
    for step in (1, 2):
        got = evaluate_checkpoint(run / "checkpoints" / f"step_{step:07d}")
        assert got["step"] == step
        assert got["val_loss"] == expected[step]  # exactly: the same batches, the same sums
        assert got["tokens"] == 2 * 4 * 64 and got["batches"] == 2


def test_a_run_dir_gives_its_newest_checkpoint_as_json(run, capsys):
    code, out, _ = run_main([str(run), "--json"], capsys)
    assert code == 0
    result = json.loads(out)
    assert result["step"] == 2 and result["val_loss"] == logged(run)[2]
    assert result["val_ppl"] == pytest.approx(torch.tensor(result["val_loss"]).exp().item())
    assert result["tokens"] == 512 and result["data"]["name"] == "sample"
    # other amounts: --batches / --batch-size, or the same through trainer.* overrides
    one = evaluate_checkpoint(run, batches=1, batch_size=2)
    assert (one["tokens"], one["batches"]) == (128, 1)
    same = evaluate_checkpoint(run, ["trainer.eval_batches=1", "trainer.micro_batch_size=2"])
    assert same["val_loss"] == one["val_loss"]


def test_json_stays_json_when_the_perplexity_overflows(run, capsys, monkeypatch):
    monkeypatch.setattr("llmtrain.eval.evaluate", lambda *args: 800.0)  # exp(800) overflows
    code, out, _ = run_main([str(run), "--json"], capsys)
    assert code == 0
    result = json.loads(out)
    assert result["val_loss"] == 800.0 and result["val_ppl"] is None and "Infinity" not in out


def test_batches_all_reads_the_whole_validation_split(run, text_file, capsys):
    data = ["data=local", f"data.files={text_file}", "data.seq_len=64"]
    cfg = load_config(TINY + data)
    loader = build_dataloader(cfg.data, get_tokenizer("gpt2"), split="val", batch_size=4)
    windows = sum(len(y) for _, y in loader)
    assert windows > 4  # more than one batch, the last one partial
    whole = evaluate_checkpoint(run, data, batches=0)
    assert whole["all"] and whole["tokens"] == windows * 64
    code, out, _ = run_main([str(run), *data, "--batches", "all"], capsys)
    assert code == 0
    assert f"{windows * 64:,} tokens (the whole validation split of 4 x 64 tokens)" in out
    assert evaluate_checkpoint(run, data, batches=1)["tokens"] == 4 * 64
    n = -(-windows // 4)  # the batches, the last one partial: not n x 4 x 64 tokens
    code, out, _ = run_main([str(run), *data, "--batches", str(n)], capsys)
    assert f"{windows * 64:,} tokens ({n} batches of up to 4 x 64 tokens)" in out


def test_data_overrides_compose_like_training(run, text_file):
    local = evaluate_checkpoint(run, ["data=local", f"data.files={text_file}", "data.seq_len=32"])
    assert local["data"]["name"] == "local" and local["seq_len"] == 32
    assert "the last 10% of" in local["data"]["description"]
    assert local["tokens"] == 2 * 4 * 32  # the run's eval_batches and micro_batch_size
    # a group keeps the run's windows (local.yaml's seq_len is 256)
    assert evaluate_checkpoint(run, ["data=local", f"data.files={text_file}"])["seq_len"] == 64
    # a key alone changes the run's own data section (the shipped sample, not data=sample's
    # seq_len of 128)
    own = evaluate_checkpoint(run, ["data.seq_len=32"])
    assert own["data"]["name"] == "sample" and own["tokens"] == 2 * 4 * 32
    assert own["val_loss"] != local["val_loss"]
    # a training split may be evaluated here (training refuses it as its validation)
    train = evaluate_checkpoint(run, ["data.val_split=train", "data.seq_len=32"])
    assert train["data"]["val_split"] == "train" and train["val_loss"] != own["val_loss"]


@pytest.mark.parametrize(
    "override, says",
    [
        ("model.n_layer=2", "model.n_layer=2: llmtrain-eval evaluates the checkpoint's own model"),
        ("optim.lr=1", "only data=NAME, data.KEY=VALUE, trainer.eval_batches and"),
        ("data.seq_len=512", "data.seq_len=512 exceeds the checkpoint's model.context_length=256"),
        ("data.tokenizer=cl100k_base", "the checkpoint was trained with data.tokenizer=gpt2"),
        ("data.seq_len=abc", "data.seq_len"),
        ("data.nope=1", "data.nope"),
    ],
)
def test_refused_overrides_exit_2_naming_the_key(run, capsys, override, says):
    code, out, err = run_main([str(run), override], capsys)
    assert code == 2 and not out
    assert err.startswith("llmtrain-eval: error: ") and says in err


def test_a_train_split_that_files_or_shards_ignore_exits_2(run, text_file, capsys):
    """Local files and shards take validation from val_files / val shards: data.val_split=train
    evaluated the validation text while the result said 'train'."""
    local = [f"data.files={text_file}", "data.val_split=train"]
    code, out, err = run_main([str(run), "data=local", *local], capsys)
    assert code == 2 and not out
    assert "data.val_split: is 'train', but data=local has no splits" in err
    code, out, err = run_main([str(run), "data=shards", "data.val_split=train"], capsys)
    assert code == 2 and not out and "but token shards have no splits" in err


def test_a_missing_checkpoint_exits_2_in_one_line(tmp_path, capsys):
    code, out, err = run_main([str(tmp_path / "nope")], capsys)
    assert code == 2 and not out
    missing = f"{tmp_path / 'nope'}: no such checkpoint or run directory"
    assert err == f"llmtrain-eval: error: {missing}\n"  # one line


def test_cli_prints_loss_and_perplexity(run):
    proc = subprocess.run(
        cli("llmtrain-eval", "llmtrain.eval") + [str(run), "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "step_0000002 (step 2) on cpu/fp32: sample: data.path=sample" in proc.stderr
    loss = logged(run)[2]
    assert proc.stdout.startswith(f"step 2: val_loss {loss:.4f} | val_ppl ")
    assert "512 tokens (2 batches of 4 x 64 tokens)" in proc.stdout


def _train_two_ranks(run_dir: str) -> None:
    from llmtrain.train import train

    train(load_config([*RUN, "dist=ddp", "trainer.batch_tokens=512"], world_size=2), Path(run_dir))


@pytest.mark.distributed
def test_a_two_process_runs_val_loss_is_the_one_process_one(tmp_path):
    """The ranks share the same batches: the logged val_loss does not depend on the process
    count, and one process gives it again."""
    from dist_worker import run

    run(_train_two_ranks, 2, str(tmp_path / "run"), tmp=tmp_path)
    result = evaluate_checkpoint(tmp_path / "run")
    assert result["step"] == 2 and result["val_loss"] == logged(tmp_path / "run")[2]


def _evaluate_counting(run_dir: str, hellaswag: bool) -> tuple[float, int]:
    """In each forked rank: llmtrain-eval's loss (or HellaSwag acc_norm) and this rank's
    forward passes."""
    from llmtrain.eval import Processes
    from llmtrain.hellaswag import hellaswag_checkpoint
    from llmtrain.model import GPT

    passes, forward, launched = [], GPT.forward, Processes("cpu")
    GPT.forward = lambda self, *a, **k: passes.append(1) or forward(self, *a, **k)
    if hellaswag:
        asset = Path(__file__).parent / "assets" / "hellaswag_sample.jsonl"
        result = hellaswag_checkpoint(run_dir, str(asset), batch_size=3, processes=launched)
        return result["acc_norm"], len(passes)
    return evaluate_checkpoint(run_dir, batches=3, processes=launched)["val_loss"], len(passes)


@pytest.mark.distributed
@pytest.mark.parametrize("hellaswag", [False, True], ids=["val_loss", "hellaswag"])
def test_launched_processes_share_the_evaluation(run, hellaswag, tmp_path):
    """Under a launcher each process evaluates a share (3 batches: 2 passes each, one of them
    uncounted on rank 1; 8 HellaSwag examples in batches of 3: 2 each) and the result is one
    process's."""
    from dist_worker import run as fork_run

    from llmtrain.hellaswag import hellaswag_checkpoint

    results = fork_run(_evaluate_counting, 2, str(run), hellaswag, tmp=tmp_path)
    asset = Path(__file__).parent / "assets" / "hellaswag_sample.jsonl"
    one = (hellaswag_checkpoint(str(run), str(asset), batch_size=3)["acc_norm"] if hellaswag
           else evaluate_checkpoint(run, batches=3)["val_loss"])  # fmt: skip
    assert [value for value, _ in results] == [pytest.approx(one, rel=1e-6)] * 2
    assert [passes for _, passes in results] == [2, 2]


@pytest.mark.slow
@pytest.mark.distributed
def test_accelerate_launch_of_llmtrain_eval_prints_once(run):
    launch = ["accelerate", "launch", "--config_file", str(ROOT / "launch" / "cpu.yaml")]
    proc = subprocess.run(
        [*launch, "-m", "llmtrain.eval", str(run), "--device", "cpu", "--batches", "3"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    loss = evaluate_checkpoint(run, batches=3)["val_loss"]
    ppl = format_ppl(math.exp(loss)).strip()
    tokens = "768 tokens (3 batches of 4 x 64 tokens)"
    assert proc.stdout == f"step 2: val_loss {loss:.4f} | val_ppl {ppl} | {tokens}\n"  # rank 0
    assert "on cpu/fp32 x 2 processes: sample" in proc.stderr


def test_json_stdout_is_the_object_alone_when_loading_prints(run, capfd, monkeypatch):
    """Consolidating a ZeRO checkpoint prints to stdout (DeepSpeed's logger, zero_to_fp32):
    with --json that goes to stderr, and stdout parses as one JSON object."""
    import llmtrain.eval as eval_module

    real = eval_module.evaluate_checkpoint

    def noisy(*args, **kwargs):
        print("Processing zero checkpoint ...")  # zero_to_fp32's print()
        os.write(1, b"[WARNING] [real_accelerator.py] Setting accelerator to CPU\n")  # a handler
        return real(*args, **kwargs)

    monkeypatch.setattr(eval_module, "evaluate_checkpoint", noisy)
    main([str(run), "--json"])
    out, err = capfd.readouterr()
    assert json.loads(out)["step"] == 2
    assert "Processing zero checkpoint" in err and "Setting accelerator" in err
