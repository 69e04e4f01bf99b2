"""llmtrain.export: a trained smoke checkpoint -> a transformers directory that AutoModel and
AutoTokenizer load, checked against our own model and against tiktoken itself."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmtrain.checkpoint import resolve_checkpoint
from llmtrain.config import load_config
from llmtrain.export import export, hf_tokenizer, main
from llmtrain.sample import load_gpt
from llmtrain.tokenizer import get_tokenizer

transformers = pytest.importorskip("transformers")

SMOKE = [
    "experiment=smoke",
    "logger=none",
    "trainer.max_steps=2",
    "trainer.ckpt_every=2",
    "trainer.eval_every=1000",
    "trainer.eval_batches=1",
    "trainer.sample_every=0",
    "model.n_layer=2",
    "model.n_embd=64",
    "data.seq_len=64",
    "trainer.micro_batch_size=4",
    "trainer.batch_tokens=256",
]
FAMILIES = {  # GPT-2 (tied head) and a grouped-query Llama (untied head)
    "gpt2": [],
    "llama": ["model=llama-style", "model.n_head=4", "model.n_kv_head=2", "model.ffn_hidden=96"],
}
HF_CLASS = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}
V = 50257  # gpt2's true vocabulary; the model pads it to 50304


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls gain nothing from a second thread; on a busy two-core machine its
    synchronisation made these tests ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def smoke_run(tmp_path_factory, family: str) -> Path:
    """A 2-step smoke run, trained once per test session (test_sample.py shares it)."""
    from llmtrain.train import train

    run = tmp_path_factory.getbasetemp() / f"smoke-{family}"
    if not (run / "checkpoints" / "latest").is_file():
        train(load_config(SMOKE + FAMILIES[family]), run)
    return run


def exported(tmp_path_factory, family: str) -> Path:
    """``smoke_run`` exported (fp32), once per test session."""
    out = tmp_path_factory.getbasetemp() / f"hf-{family}"
    if not (out / "model.safetensors").is_file():
        export(smoke_run(tmp_path_factory, family), out)
    return out


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request) -> str:
    return request.param


def test_export_writes_a_transformers_directory(tmp_path_factory, family):
    out = exported(tmp_path_factory, family)
    assert {p.name for p in out.iterdir()} == {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [HF_CLASS[family]] and config["vocab_size"] == V
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast"  # loads in 4.x and 5.x
    assert config["eos_token_id"] == config["bos_token_id"] == 50256
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == generation["pad_token_id"] == 50256


def test_logits_equal_ours(tmp_path_factory, family):
    run, out = smoke_run(tmp_path_factory, family), exported(tmp_path_factory, family)
    theirs, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(theirs).__name__ == HF_CLASS[family]
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    ours, _, _ = load_gpt(run)
    idx = torch.randint(0, V, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = theirs.eval()(idx).logits
        logits, _ = ours(idx)
    assert expected.shape == (2, 48, V)  # the vocabulary padding is cut off
    assert (expected - expected.mean(-1, keepdim=True)).abs().max() > 1e-2  # not a vacuous check
    torch.testing.assert_close(logits[..., :V], expected, atol=1e-5, rtol=1e-5)


def test_large_weights_are_sharded_with_an_index(tmp_path_factory, tmp_path, family):
    """Past --max-shard-size the weights go to several files and an index, which transformers
    loads as one model (llama-8b in fp32 is 30 GB; the Hub takes files up to 50 GB)."""
    run, out = smoke_run(tmp_path_factory, family), tmp_path / "hf"
    main([str(run), str(out), "--max-shard-size", "8MB"])
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    in_bytes = tmp_path / "hf-bytes"  # a byte count, as save_pretrained takes one
    main([str(run), str(in_bytes), "--max-shard-size", "8000000"])
    assert sorted(p.name for p in in_bytes.glob("model-*.safetensors")) == shards
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    sharded = transformers.AutoModelForCausalLM.from_pretrained(out)
    whole = transformers.AutoModelForCausalLM.from_pretrained(exported(tmp_path_factory, family))
    for (name, a), (_, b) in zip(
        sharded.state_dict().items(), whole.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


TEXTS = [
    "Hello, world! The quick brown fox.",
    "  leading spaces\n\n\ttabs and\r\nCRLF   trailing  ",
    "naïve café — 日本語のテキスト, 한국어, Ελληνικά, emoji 🤖👍🏽 and zalgo Z̸̢͉a̶l̷g̵o",
    "<|endoftext|>a new document<|endoftext|><|endoftext|>",
    "it's I'LL we've they'd 1234567890 3.14159 $5,000.00 ...!?",
    "def f(x):\n    return {'a': [1, 2]}  # code\n",
    "",
    " ",
    "\n\n\n",
    "a" * 500,
]


def test_tokenizer_ids_equal_tiktoken(tmp_path_factory):
    from llmtrain.data import SAMPLE_DIR

    tok = transformers.AutoTokenizer.from_pretrained(exported(tmp_path_factory, "gpt2"))
    enc = get_tokenizer("gpt2").encoding
    assert len(tok) == tok.vocab_size == V and tok.eos_token_id == tok.bos_token_id == 50256
    import pyarrow.parquet as pq

    files = sorted(SAMPLE_DIR.glob("data/validation/*.parquet"))
    texts = TEXTS + pq.read_table(files[0]).column("text").to_pylist()[:20]  # real web text
    for text in texts:
        ids = tok(text)["input_ids"]
        assert ids == enc.encode(text, allowed_special="all"), text[:60]
        assert tok.decode(ids) == text


def test_converting_the_tokenizer_leaves_nothing_in_tiktoken_s_cache(tmp_path, monkeypatch):
    """tiktoken.load cached each export's temporary ranks file under a name of its path: a new
    copy of the vocabulary in the cache dir at every export."""
    from llmtrain.export import _converted

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    _converted.__wrapped__(get_tokenizer("gpt2"))
    assert list(tmp_path.iterdir()) == [] and os.environ["TIKTOKEN_CACHE_DIR"] == str(tmp_path)


def test_cl100k_base_exports_with_its_special_ids(monkeypatch):
    """cl100k_base leaves ids unused between its special tokens: the transformers tokenizer
    gave <|endoftext|> the id after the ranks (100256, not 100257), so export refused."""
    cache = Path(__file__).resolve().parents[2] / "shared" / "tiktoken-cache"
    if not cache.is_dir():
        pytest.skip(f"no tiktoken cache at {cache}")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    tok = get_tokenizer("cl100k_base")
    fast = hf_tokenizer(tok, 1024)
    assert len(fast) == fast.vocab_size == tok.vocab_size == 100277
    assert fast.eos_token_id == tok.eot_id == 100257
    for text in [*TEXTS, "<|fim_prefix|>def f(<|fim_suffix|>):<|fim_middle|><|endofprompt|>"]:
        ids = fast(text)["input_ids"]
        assert ids == tok.encoding.encode(text, allowed_special="all"), text[:60]
        assert fast.decode(ids) == text


def test_bf16_export_through_the_cli(tmp_path_factory, tmp_path):
    run = smoke_run(tmp_path_factory, "llama")
    out = tmp_path / "hf"
    proc = subprocess.run(
        cli("llmtrain-export", "llmtrain.export")
        + [str(run / "checkpoints"), str(out)]
        + ["--dtype", "bf16"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "LlamaForCausalLM" in proc.stdout and str(out) in proc.stdout
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    fp32 = exported(tmp_path_factory, "llama") / "model.safetensors"
    assert (out / "model.safetensors").stat().st_size < 0.6 * fp32.stat().st_size
    ours, _, _ = load_gpt(run)
    idx = torch.arange(16)[None]
    with torch.no_grad():
        close = model.float()(idx).logits
        torch.testing.assert_close(ours(idx)[0][..., :V], close, atol=2e-2, rtol=0)


def run_main(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2  # as llmtrain-eval and every bad input (it was 1, a crash's code)
    return capsys.readouterr().err


def test_consolidate_exits_2_naming_a_missing_checkpoint(tmp_path, capsys):
    from llmtrain.consolidate import main as consolidate_main

    with pytest.raises(SystemExit) as e:
        consolidate_main([str(tmp_path / "nowhere")])
    assert e.value.code == 2
    assert f"{tmp_path / 'nowhere'}: no such" in capsys.readouterr().err


def test_bad_checkpoints_fail_naming_the_path(tmp_path_factory, tmp_path, capsys):
    out = str(tmp_path / "out")
    missing = tmp_path / "nowhere"
    assert f"{missing}: no such" in run_main([str(missing), out], capsys)

    empty = tmp_path / "empty"
    empty.mkdir()
    assert f"{empty}: no complete llmtrain checkpoint" in run_main([str(empty), out], capsys)

    src = smoke_run(tmp_path_factory, "gpt2") / "checkpoints" / "step_0000002"
    crashed = tmp_path / "run" / "checkpoints" / "step_0000004.tmp"
    shutil.copytree(src, crashed)
    (crashed / "trainer_state.json").unlink()  # a save that never finished
    assert "incomplete checkpoint" in run_main([str(crashed), out], capsys)
    # the run dir skips the leftover and, holding nothing complete, says so
    assert "no complete llmtrain checkpoint" in run_main([str(tmp_path / "run"), out], capsys)

    no_weights = tmp_path / "w" / "step_0000002"
    shutil.copytree(src, no_weights)
    (no_weights / "model.safetensors").unlink()
    assert f"{no_weights}/model.safetensors is missing" in run_main([str(no_weights), out], capsys)
    assert not Path(out).exists()

    # an export inside checkpoints/ would go with the step that keep_last deletes
    inside = src / "hf"
    assert "trainer.keep_last deletes" in run_main([str(src), str(inside)], capsys)
    assert not inside.exists()

    # the `latest` pointer names the checkpoint it points at
    assert resolve_checkpoint(src.parent / "latest") == resolve_checkpoint(src.parent)

    # a damaged config.yaml is named as a damaged weight file is, not a YAML traceback
    cut = tmp_path / "c" / "step_0000002"
    shutil.copytree(src, cut)
    text = (cut / "config.yaml").read_text()
    (cut / "config.yaml").write_text(text[: len(text) // 2])
    assert f"{cut}/config.yaml has" in run_main([str(cut), out], capsys)
    (cut / "manifest.json").unlink()  # unverifiable: still a message, not a traceback
    (cut / "config.yaml").write_text("model: [unclosed\n")
    assert f"{cut}/config.yaml: " in run_main([str(cut), out], capsys)


def test_a_run_dir_s_damaged_newest_checkpoint_gives_way_to_the_one_before(
    tmp_path_factory, tmp_path, capsys
):
    """As trainer.resume=auto does; the export, consolidate and llmtrain-sample stopped at it."""
    from llmtrain.consolidate import export as consolidate

    src = smoke_run(tmp_path_factory, "gpt2") / "checkpoints" / "step_0000002"
    run = tmp_path / "run"
    for step in (2, 4):
        shutil.copytree(src, run / "checkpoints" / f"step_000000{step}")
    (run / "checkpoints" / "latest").write_text("step_0000004")
    newest = run / "checkpoints" / "step_0000004"
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated

    assert export(run, tmp_path / "hf") == run / "checkpoints" / "step_0000002"
    err = capsys.readouterr().err
    assert f"skipping damaged checkpoint {newest}: {weights} has" in err
    assert f"trying {run / 'checkpoints' / 'step_0000002'}" in err
    out = consolidate(run, tmp_path / "weights.safetensors")
    assert out.is_file() and "skipping damaged checkpoint" in capsys.readouterr().err
    assert load_gpt(run)[2] == run / "checkpoints" / "step_0000002"
    assert f"{weights} has" in run_main([str(newest), str(tmp_path / "x")], capsys)  # named


def test_refuses_to_overwrite_unless_forced(tmp_path_factory, tmp_path, capsys):
    run = smoke_run(tmp_path_factory, "gpt2")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "not empty; pass --force" in run_main([str(run), str(out)], capsys)
    assert (out / "keep.txt").read_text() == "mine"
    assert "holds the checkpoint" in run_main([str(run), str(run.parent), "--force"], capsys)
    ckpt = run / "checkpoints" / "step_0000002"
    assert "holds the checkpoint" in run_main([str(ckpt), str(ckpt), "--force"], capsys)
    other_run = tmp_path / "other-run"  # a mistyped OUT is not deleted, even with --force
    shutil.copytree(run, other_run)
    assert "not an earlier export" in run_main([str(run), str(other_run), "--force"], capsys)
    assert "not an earlier export" in run_main([str(run), str(out), "--force"], capsys)
    assert (other_run / "checkpoints").is_dir() and (out / "keep.txt").is_file()

    (out / "config.json").write_text("{}")  # an earlier export
    main([str(run), str(out), "--force"])
    assert "GPT2LMHeadModel" in capsys.readouterr().out
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert not (tmp_path / "out.tmp").exists()


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["zero3", "fsdp2"])
def test_sharded_checkpoint_exports(mode, tmp_path, monkeypatch):
    """Two forked gloo ranks write ZeRO-3 / FSDP2 shards (no model.safetensors); the export
    loads in transformers with our logits, and llmtrain-sample reads the same shards."""
    from dist_worker import run as fork_run

    # set by the in-process CPU runs above; inherited, it turns DeepSpeed into plain MULTI_CPU
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)

    shards = tmp_path / "shards"
    _write_shards(shards)
    run = tmp_path / "run"
    overrides = SMOKE + [f"dist={mode}", "data.source=shards", f"data.path={shards}"]
    fork_run(_train, 2, str(run), overrides + ["trainer.batch_tokens=512"], tmp=tmp_path)
    ckpt = run / "checkpoints" / "step_0000002"
    assert not (ckpt / "model.safetensors").exists()  # really sharded
    export(run, tmp_path / "hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    ours, _, _ = load_gpt(ckpt)
    idx = torch.arange(32)[None]
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0][..., :V], theirs(idx).logits, atol=1e-5, rtol=1e-5)


def _write_shards(out: Path) -> None:
    """The shipped sample as llm.c token shards (the layout every world size can split)."""
    import pyarrow.parquet as pq

    from llmtrain.data import SAMPLE_DIR
    from llmtrain.shards import write_shard

    tok = get_tokenizer("gpt2")
    out.mkdir()
    for split, sub in (("train", "train"), ("val", "validation")):
        files = sorted(SAMPLE_DIR.glob(f"data/{sub}/*.parquet"))
        texts = pq.read_table(files[0]).column("text").to_pylist()[:40]
        ids = [t + [tok.eot_id] for t in tok.encode_batch(texts)]
        write_shard(out / f"sample_{split}_000.bin", sum(ids, []), tok.vocab_size)


def _train(run_dir: str, overrides: list[str]) -> None:
    from llmtrain.train import train

    train(load_config(overrides), Path(run_dir))


def cli(script: str, module: str) -> list[str]:
    """The installed console script (checks the entry point), else ``python -m``."""
    path = Path(sys.executable).with_name(script)
    return [str(path)] if path.is_file() else [sys.executable, "-m", module]


def test_llama_config_states_rope_theta_at_the_top_level(tmp_path_factory):
    """transformers 5 writes the theta only inside ``rope_parameters``; 4.x and other readers of
    config.json take ``rope_theta`` from the top level, defaulting to 10000 (llama-style trains
    with 500000): their logits would be silently wrong."""
    config = json.loads((exported(tmp_path_factory, "llama") / "config.json").read_text())
    assert config["rope_theta"] == 500000.0
    assert config["rope_parameters"]["rope_theta"] == 500000.0


def test_force_through_a_symlink_replaces_its_target(tmp_path_factory, tmp_path, capsys):
    run = smoke_run(tmp_path_factory, "gpt2")
    real, link = tmp_path / "disk" / "hf", tmp_path / "hf"
    real.mkdir(parents=True)
    (real / "old.txt").write_text("old export")
    (real / "config.json").write_text("{}")
    link.symlink_to(real)
    main([str(run), str(link), "--force"])
    assert link.is_symlink() and (real / "model.safetensors").is_file()
    assert not (real / "old.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "hf"]  # no hf.tmp left
    assert sorted(p.name for p in real.parent.iterdir()) == ["hf"]


def test_max_shard_size_is_checked_when_given(capsys):
    from llmtrain.export import shard_size

    assert shard_size("1000") == 1000 and shard_size("500MB") == "500MB"
    with pytest.raises(SystemExit) as e:
        main(["run", "out", "--max-shard-size", "5GiB"])
    assert e.value.code == 2 and "give bytes, or a size such as 5GB" in capsys.readouterr().err


def test_a_padded_batch_of_prompts_generates_as_each_alone(tmp_path_factory, family):
    """The tokenizer pads (with end-of-text, on the left), so batched generation works and
    each row continues its own prompt."""
    out = exported(tmp_path_factory, family)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    prompts = ["The history of the city", "Hello"]
    batch = tok(prompts, return_tensors="pt", padding=True)
    assert batch["input_ids"][1, 0] == tok.pad_token_id == 50256  # left padding
    with torch.no_grad():
        batched = model.generate(**batch, do_sample=False, max_new_tokens=8)[:, -8:]
        for row, prompt in zip(batched, prompts, strict=True):
            alone = model.generate(
                **tok(prompt, return_tensors="pt"), do_sample=False, max_new_tokens=8
            )[0, -8:]
            assert row.tolist() == alone.tolist()
