"""HellaSwag scoring: each ending's loss is the one its own forward pass gives, batching changes
no answer, acc is the summed loss and acc_norm the mean, a row past the window keeps its
ending; llmtrain-eval --hellaswag reads a URL (downloaded once) or a file."""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from tiny import TINY

import llmtrain.hellaswag as hs
from llmtrain.config import ModelConfig, load_config
from llmtrain.documents import StreamError
from llmtrain.eval import main
from llmtrain.hellaswag import Example, ending_losses, hellaswag, load_examples
from llmtrain.model import GPT
from llmtrain.tokenizer import get_tokenizer

ASSETS = Path(__file__).parent / "assets"
SAMPLE = ASSETS / "hellaswag_sample.jsonl"
TOK = get_tokenizer("gpt2")


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)  # a larger init: each ending's loss depends on its context
    cfg = ModelConfig(name="t", n_layer=2, n_head=2, n_embd=32, context_length=64, init_std=0.5)
    return GPT(cfg).eval()


@torch.no_grad()
def own_forward(model: GPT, tokens: list[int], start: int) -> tuple[float, int]:
    """Summed loss of tokens[start:] given what precedes each, from a forward pass of its own."""
    logits, _ = model(torch.tensor([tokens]))
    loss = F.cross_entropy(
        logits[0, :-1, : model.vocab_size], torch.tensor(tokens[1:]), reduction="none"
    )
    return loss[start - 1 :].sum().item(), len(tokens) - start


def test_each_ending_s_loss_is_its_own_forward_pass_s(model):
    """Three examples' twelve rows in one padded batch, each as if alone."""
    examples = load_examples(str(SAMPLE))[:3]
    total, count = ending_losses(model, TOK, examples, window=64)
    assert total.shape == count.shape == (3, 4)
    for i, example in enumerate(examples):
        ctx = TOK.encode(example.ctx)
        for j, ending in enumerate(example.endings):
            want, n = own_forward(model, ctx + TOK.encode(" " + ending), len(ctx))
            assert count[i, j] == n
            assert total[i, j].item() == pytest.approx(want, rel=1e-4)


def test_a_row_past_the_window_loses_the_start_of_its_context(model):
    example = load_examples(str(SAMPLE))[3]
    ctx, ending = TOK.encode(example.ctx), TOK.encode(" " + example.endings[1])
    window = len(ending) + 4  # four context tokens left
    total, count = ending_losses(model, TOK, [example], window=window)
    want, n = own_forward(model, (ctx + ending)[-window:], 4)
    assert count[0, 1] == n == len(ending)
    assert total[0, 1].item() == pytest.approx(want, rel=1e-4)


def test_batching_changes_no_answer(model):
    examples = load_examples(str(SAMPLE))
    scores = {size: hellaswag(model, TOK, examples, 64, batch_size=size) for size in (1, 3, 8)}
    assert scores[1] == scores[3] == scores[8]
    total, count = ending_losses(model, TOK, examples, window=64)
    labels = torch.tensor([ex.label for ex in examples])
    assert scores[1]["acc_norm"] == ((total / count).argmin(1) == labels).float().mean().item()
    assert scores[1]["acc"] == (total.argmin(1) == labels).float().mean().item()
    assert scores[1]["examples"] == 8


def test_acc_sums_the_loss_and_acc_norm_takes_its_mean_per_token(model, monkeypatch):
    """Ending 1 has the least loss in all (one token), ending 0 the least per token."""
    losses = torch.tensor([[4.0, 3.0, 18.0, 18.0]]), torch.tensor([[4, 1, 9, 9]])
    monkeypatch.setattr(hs, "ending_losses", lambda *args: losses)
    example = Example("ctx", ("a", "b", "c", "d"), label=0)
    assert hellaswag(model, TOK, [example], 64) == {"acc": 0.0, "acc_norm": 1.0, "examples": 1}


def test_ranks_share_the_examples_and_take_the_same_number_of_passes(model, monkeypatch):
    """8 examples on 3 ranks: 3, 3 and 2, in batches of 2. Every rank makes 2 forward passes
    (a sharded model's are collective); rank 2's second scores an example it does not count."""
    examples = load_examples(str(SAMPLE))
    whole = hellaswag(model, TOK, examples, 64, batch_size=2)
    passes = []
    real = hs.ending_losses
    monkeypatch.setattr(hs, "ending_losses", lambda *args: passes.append(1) or real(*args))
    shares = []
    for rank in range(3):
        passes.clear()
        accelerator = SimpleNamespace(  # reduce: this rank's own counts
            process_index=rank, num_processes=3, device=torch.device("cpu"),
            reduce=lambda counts, reduction: counts,
        )  # fmt: skip
        shares.append(hellaswag(model, TOK, examples, 64, 2, accelerator))
        assert len(passes) == 2
    assert [share["examples"] for share in shares] == [3, 3, 2]
    for key in ("acc", "acc_norm"):
        right = sum(share[key] * share["examples"] for share in shares)
        assert round(right) == round(whole[key] * 8)


@pytest.mark.parametrize(
    "line, says",
    [
        ('{"ctx": "a", "endings": ["b", "c", "d"], "label": 0}', "line 2 has 3 endings"),
        ('{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 4}', "and label 4; HellaSwag"),
        ('{"ctx": "a", "label": 0}', "line 2 is not a HellaSwag example (KeyError: 'endings')"),
        ("not json", "line 2 is not a HellaSwag example (JSONDecodeError"),
    ],
)
def test_a_row_that_is_not_hellaswag_is_named(tmp_path, line, says):
    path = tmp_path / "h.jsonl"
    path.write_text(SAMPLE.read_text().splitlines()[0] + "\n" + line + "\n")
    with pytest.raises(ValueError, match=f"--hellaswag-data {path}: " + ".*" + says[:20]):
        load_examples(str(path))
    assert len(load_examples(str(path), limit=1)) == 1  # the first N are read, no more


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """Two steps and a checkpoint (~5 s)."""
    from llmtrain.train import train

    run = tmp_path_factory.mktemp("hellaswag-run")
    cfg = [*TINY, "trainer.batch_tokens=256", "trainer.max_steps=2", "trainer.ckpt_every=2"]
    train(load_config([*cfg, "trainer.eval_every=2", "trainer.sample_every=0"]), run)
    return run


def logged(run: Path) -> dict[int, tuple[float, float]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: (r["hellaswag_acc_norm"], r["hellaswag_acc"])
            for r in map(json.loads, lines) if "hellaswag_acc" in r}  # fmt: skip


IN_TRAINING = [
    *TINY,
    "trainer.batch_tokens=256",
    "trainer.max_steps=4",
    "trainer.ckpt_every=4",
    "trainer.sample_every=0",
    "trainer.eval_at_start=true",
    "trainer.hellaswag_every=2",
    f"trainer.hellaswag_data={SAMPLE}",
]


def test_training_logs_hellaswag_and_llmtrain_eval_gives_it_again(tmp_path, capsys):
    from llmtrain.hellaswag import hellaswag_checkpoint
    from llmtrain.train import train

    train(load_config(IN_TRAINING), tmp_path)
    assert "  hellaswag  every 2 steps: 8 examples" in capsys.readouterr().out
    scores = logged(tmp_path)
    assert sorted(scores) == [0, 2, 4]
    again = hellaswag_checkpoint(str(tmp_path), str(SAMPLE))
    assert again["step"] == 4 and scores[4] == (again["acc_norm"], again["acc"])


def test_training_scores_the_model_without_torch_compile(model, monkeypatch):
    """Rows' lengths vary by batch: a compiled model would recompile for each new shape."""
    from accelerate import Accelerator

    import llmtrain.report as report

    scored = []
    monkeypatch.setattr(report, "hellaswag", lambda m, *a, **k: scored.append(m) or
                        {"acc": 0.0, "acc_norm": 0.0, "examples": 1})  # fmt: skip
    run = SimpleNamespace(
        model=torch.compile(model),  # as trainer.compile=true prepares it (compiled lazily)
        accelerator=SimpleNamespace(
            unwrap_model=functools.partial(Accelerator.unwrap_model, None),
            autocast=contextlib.nullcontext,
        ),
        tokenizer=TOK, hellaswag=[], cfg=load_config(["experiment=smoke"]),
        state=SimpleNamespace(step=0, tokens=0), log=lambda *a: None,
    )  # fmt: skip
    report.log_hellaswag(run)
    assert scored == [model] and model.training  # back in training mode for the loop
    model.eval()  # as the fixture's other users expect it


def test_training_scores_hellaswag_in_the_training_precision(model, monkeypatch):
    """With trainer.compile and bf16, Accelerate's autocast wraps the compiled model's forward:
    the eager model it unwraps to scored in fp32, not as llmtrain-eval --dtype bf16 does."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState, PartialState

    import llmtrain.report as report

    precision = []
    monkeypatch.setattr(report, "hellaswag", lambda *a, **k: precision.append(
        torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu")) or
        {"acc": 0.0, "acc_norm": 0.0, "examples": 1})  # fmt: skip
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    try:
        run = SimpleNamespace(
            model=accelerator.prepare(torch.compile(model)),  # as trainer.compile=true has it
            accelerator=accelerator, tokenizer=TOK, hellaswag=[],
            cfg=load_config(["experiment=smoke"]), state=SimpleNamespace(step=0, tokens=0),
            log=lambda *a: None,
        )  # fmt: skip
        report.log_hellaswag(run)
    finally:
        model.eval()
        AcceleratorState._reset_state(reset_partial_state=True)
        PartialState._reset_state()
        GradientState._reset_state()
    assert precision == [torch.bfloat16]


def _train_two_ranks(run_dir: str) -> None:
    from llmtrain.train import train

    cfg = [*IN_TRAINING, "dist=zero3", "trainer.batch_tokens=512", "trainer.max_steps=2"]
    cfg += ["trainer.eval_batches=3"]  # the validation batches too: rank 1 runs one uncounted
    train(load_config(cfg, world_size=2), Path(run_dir))


@pytest.mark.distributed
def test_two_ranks_share_the_examples_under_zero3(tmp_path):
    """Each rank scores half of the examples, and runs half of the validation batches, its
    weights gathered in each forward pass."""
    from dist_worker import run as fork_run

    from llmtrain.eval import evaluate_checkpoint
    from llmtrain.hellaswag import hellaswag_checkpoint

    fork_run(_train_two_ranks, 2, str(tmp_path / "run"), tmp=tmp_path)
    again = hellaswag_checkpoint(str(tmp_path / "run"), str(SAMPLE))
    assert logged(tmp_path / "run")[2] == (again["acc_norm"], again["acc"])
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    val = [r["val_loss"] for r in map(json.loads, lines) if "val_loss" in r and r["step"] == 2]
    assert val == [pytest.approx(evaluate_checkpoint(tmp_path / "run")["val_loss"], rel=1e-6)]


def eval_json(argv: list[str], capsys) -> dict:
    main([*argv, "--json"])
    return json.loads(capsys.readouterr().out)


def test_cli_reads_a_url_once_and_then_its_cached_copy(run, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LLMTRAIN_CACHE", str(tmp_path / "cache"))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(ASSETS))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/{SAMPLE.name}"
    try:
        from_url = eval_json([str(run), "--hellaswag-data", url], capsys)
    finally:
        server.shutdown()
        server.server_close()
    cached = tmp_path / "cache" / "hellaswag" / SAMPLE.name
    assert cached.read_bytes() == SAMPLE.read_bytes()
    assert eval_json([str(run), "--hellaswag-data", url], capsys) == from_url  # server gone: cache
    from_file = eval_json([str(run), "--hellaswag-data", str(SAMPLE)], capsys)
    assert {**from_url, "source": None} == {**from_file, "source": None}
    assert from_url["examples"] == 8 and from_url["step"] == 2
    two = eval_json([str(run), "--hellaswag-data", str(SAMPLE), "--examples", "2"], capsys)
    assert two["examples"] == 2


class _CutShort(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 -- http.server's name
        self.send_response(200)
        self.send_header("Content-Length", "100000")
        self.end_headers()
        self.wfile.write(b'{"ctx": "a download that stops')  # and the connection closes

    def log_message(self, *args):
        pass


def test_a_download_cut_short_is_a_stream_error_and_leaves_no_file(tmp_path, monkeypatch):
    """A connection closed early ended the read as the file's end does: the first part of the
    file was cached, as the file, for every later evaluation."""
    from llmtrain.hellaswag import cached_download

    monkeypatch.setenv("LLMTRAIN_CACHE", str(tmp_path / "cache"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _CutShort)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cut = r"cannot download it \(the connection closed after 30 of 100,000 bytes\)"
        with pytest.raises(StreamError, match=cut):
            cached_download(f"http://127.0.0.1:{server.server_port}/hellaswag_val.jsonl")
    finally:
        server.shutdown()
        server.server_close()
    assert list((tmp_path / "cache" / "hellaswag").iterdir()) == []


def test_cli_takes_the_flag_before_the_checkpoint(run, capsys):
    """--hellaswag took a path once: `llmtrain-eval --hellaswag RUN` read RUN as the file."""
    before = eval_json(["--hellaswag", str(run), "--hellaswag-data", str(SAMPLE)], capsys)
    assert before == eval_json([str(run), "--hellaswag-data", str(SAMPLE)], capsys)


def test_cli_prints_the_accuracy(run, capsys):
    main([str(run), "--hellaswag-data", str(SAMPLE), "--batch-size", "3"])
    out = capsys.readouterr().out
    assert out.startswith("step 2: hellaswag acc_norm 0.") and "/8) | acc 0." in out


def test_more_examples_than_the_file_has_are_named(run, capsys, tmp_path):
    """--examples 100 of an 8-example file scored 8 without a word; so did training's."""
    from llmtrain.train import train

    main([str(run), "--hellaswag-data", str(SAMPLE), "--examples", "100"])
    assert "--examples 100: the file has 8; all of them scored" in capsys.readouterr().err
    cfg = [*IN_TRAINING, "trainer.max_steps=1", "trainer.hellaswag_every=1"]
    train(
        load_config([*cfg, "trainer.hellaswag_examples=20", "trainer.eval_at_start=false"]),
        tmp_path,
    )
    out = capsys.readouterr().out
    assert "  hellaswag  every step: 8 examples (all the file has, of 20 asked), rows cut" in out


@pytest.mark.parametrize(
    "args, says",
    [
        (["--examples", "3"], "--examples 3: a count >= 1, with --hellaswag"),
        (["--hellaswag-data", str(SAMPLE), "--examples", "0"], "--examples 0: a count >= 1"),
        (["--hellaswag-data", str(SAMPLE), "data=sample"], "no data overrides or --batches"),
        (["--hellaswag-data", "missing.jsonl"], "--hellaswag-data missing.jsonl: no such file"),
    ],
)
def test_cli_refusals_exit_2(run, capsys, args, says):
    with pytest.raises(SystemExit) as e:
        main([str(run), *args])
    assert e.value.code == 2
    assert says in capsys.readouterr().err
