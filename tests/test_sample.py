"""llmtrain.sample: greedy output equals Hugging Face ``generate`` on the exported model; the
sampling knobs do what they say; the CLI prints readable samples and clear errors."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_export import exported, smoke_run

from llmtrain.export import export
from llmtrain.sample import load_gpt, main, sample
from llmtrain.tokenizer import get_tokenizer

transformers = pytest.importorskip("transformers")

TOK = get_tokenizer("gpt2")
EOT = TOK.eot_id
PROMPT = "The history of the city"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls gain nothing from a second thread; on a busy two-core machine its
    synchronisation made these tests ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_gpt(smoke_run(tmp_path_factory, "gpt2"))[0]


def perturbed_run(tmp_path_factory, family: str) -> Path:
    """The smoke checkpoint with every weight moved by N(0, 0.2). Two training steps leave
    near-initial weights whose greedy text is one token repeated, which would hide a broken KV
    cache or position offset; these weights give a varied continuation."""
    from safetensors.torch import load_file, save_file

    run = tmp_path_factory.getbasetemp() / f"perturbed-{family}"
    ckpt = run / "checkpoints" / "step_0000002"
    if not ckpt.is_dir():
        src = smoke_run(tmp_path_factory, family) / "checkpoints" / "step_0000002"
        shutil.copytree(src, ckpt)
        g = torch.Generator().manual_seed(0)
        state = load_file(ckpt / "model.safetensors")
        state = {k: v + 0.2 * torch.randn(v.shape, generator=g) for k, v in state.items()}
        save_file(state, ckpt / "model.safetensors")
        manifest = ckpt / "manifest.json"  # keep an integrity manifest, where saved, truthful
        if manifest.is_file():
            data = json.loads(manifest.read_text())
            blob = (ckpt / "model.safetensors").read_bytes()
            data["files"]["model.safetensors"] = {
                "size": len(blob),
                "sha256": hashlib.sha256(blob).hexdigest(),
            }
            manifest.write_text(json.dumps(data))
    return run


@pytest.mark.parametrize("weights", ["trained", "perturbed"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_equals_hf_generate(tmp_path_factory, family, weights):
    if weights == "trained":
        run, out = smoke_run(tmp_path_factory, family), exported(tmp_path_factory, family)
    else:
        run = perturbed_run(tmp_path_factory, family)
        out = run / "hf"
        export(run, out)
    ours = load_gpt(run)[0]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    prompt = TOK.encode_prompt(PROMPT)
    assert tok(PROMPT)["input_ids"] == prompt
    ids = torch.tensor([prompt])
    with torch.no_grad():  # the exported generation config: eos = pad = end-of-text
        hf = theirs.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=40
        )[0, len(prompt) :].tolist()
    if EOT in hf:
        hf = hf[: hf.index(EOT) + 1]
    got = sample(ours, prompt, 40, temperature=0, stop_id=EOT)[0]
    assert got == hf
    assert len(got) == 40 or got[-1] == EOT
    if weights == "perturbed":
        assert len(set(got)) > 10  # a varied continuation, not one repeated token


def test_seed_controls_sampling(model):
    prompt = TOK.encode_prompt(PROMPT)
    draw = lambda seed, n=1, **kw: sample(model, prompt, 8, seed=seed, num_samples=n, **kw)
    assert draw(1, temperature=1.0) == draw(1, temperature=1.0)
    assert draw(1, temperature=1.0) != draw(2, temperature=1.0)
    batch = draw(3, n=3, temperature=1.0)
    assert len(batch) == 3 and len({tuple(s) for s in batch}) == 3  # samples differ from each other
    greedy = draw(0, temperature=0)
    assert draw(5, top_k=1) == greedy  # one candidate left: greedy whatever the seed
    assert draw(6, temperature=1.5, top_p=1e-6) == greedy  # the most likely token always stays


def test_top_k_and_top_p_restrict_every_token(model):
    """Teacher-force each sample back through the model: every drawn token lies in the top-k
    (resp. the top-p nucleus) of the distribution it was drawn from."""
    prompt = TOK.encode_prompt(PROMPT)
    n = len(prompt)
    for kw in ({"top_k": 5}, {"top_p": 0.2}):
        rows = sample(model, prompt, 8, temperature=1.0, seed=0, num_samples=3, **kw)
        for row in rows:
            with torch.no_grad():
                logits = model(torch.tensor([prompt + row]))[0][0, n - 1 : -1, : TOK.vocab_size]
            for t, token in enumerate(row):
                order = logits[t].argsort(descending=True)
                rank = (order == token).nonzero().item()
                if "top_k" in kw:
                    assert rank < 5, (kw, t, rank)
                else:
                    probs = logits[t].softmax(-1)[order]
                    assert probs[:rank].sum() < 0.2, (kw, t, rank)  # mass of more likely ones
        assert len({tuple(r) for r in rows}) > 1


def test_generation_stops_at_the_stop_id(model):
    prompt = TOK.encode_prompt(PROMPT)
    greedy = sample(model, prompt, 20, temperature=0)[0]
    stop = greedy[5]
    got = sample(model, prompt, 20, temperature=0, stop_id=stop)[0]
    assert got == greedy[: greedy.index(stop) + 1]
    out = model.generate(torch.tensor([prompt]), 20, temperature=0, stop_id=stop)
    assert out.shape[1] == len(prompt) + len(got)  # generation ended there, not just the text
    assert TOK.encode_prompt("") == [EOT]  # unconditional samples start a fresh document
    assert TOK.encode_prompt("a<|endoftext|>") == [64, EOT]


def test_cli_prints_samples(tmp_path_factory, model):
    run = smoke_run(tmp_path_factory, "gpt2")
    proc = subprocess.run(
        cli("llmtrain-sample", "llmtrain.sample")
        + [str(run), "--prompt", PROMPT]
        + ["--temperature", "0", "--max-new-tokens", "12", "--num-samples", "2"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "step_0000002 (step 2" in proc.stderr and "greedy" in proc.stderr
    ids = sample(model, TOK.encode_prompt(PROMPT), 12, temperature=0, stop_id=EOT)[0]
    text = PROMPT + TOK.decode([i for i in ids if i != EOT])
    assert proc.stdout.splitlines()[:2] == ["=== sample 1/2 ===", text.splitlines()[0]]
    assert proc.stdout.count("=== sample") == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--top-p", "0"], "--top-p 0.0: must be in (0, 1]"),
        (["--temperature", "-1"], "--temperature -1.0: must be >= 0"),
        (["--num-samples", "0"], "--num-samples 0: must be >= 1"),
    ],
)
def test_cli_bad_arguments_fail_clearly(tmp_path_factory, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main([str(smoke_run(tmp_path_factory, "gpt2"))] + args)
    assert e.value.code == 2  # argparse's usage error, as for every bad argument
    assert message in capsys.readouterr().err + str(e.value.code)


def test_cli_missing_checkpoint_names_it(tmp_path, capsys):
    """Exit 2, as llmtrain-eval and every bad input (it was 1, a crash's code)."""
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "nope"), "--prompt", "x"])
    assert e.value.code == 2
    assert f"{tmp_path / 'nope'}: no such checkpoint" in capsys.readouterr().err


def cli(script: str, module: str) -> list[str]:
    """The installed console script (checks the entry point), else ``python -m``."""
    path = Path(sys.executable).with_name(script)
    return [str(path)] if path.is_file() else [sys.executable, "-m", module]


def test_tiny_temperature_is_greedy(model):
    prompt = TOK.encode_prompt(PROMPT)
    greedy = sample(model, prompt, 8, temperature=0)
    assert sample(model, prompt, 8, temperature=1e-40, seed=3) == greedy
    # below float32's range the division made 0/0 = NaN probabilities (a RuntimeError)
    assert sample(model, prompt, 8, temperature=1e-46, seed=3) == greedy


@pytest.mark.parametrize(
    "args, message",
    [
        (["--temperature", "nan"], "--temperature nan: must be >= 0"),
        (["--max-new-tokens", "0"], "--max-new-tokens 0: must be >= 1"),
        (["--context-length", "0"], "--context-length 0: must be >= 1"),
        (["--context-length", "257"], "--context-length 257: the model's model.context_length is"),
    ],
)
def test_cli_unusable_temperature_or_length_fails_clearly(tmp_path_factory, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main([str(smoke_run(tmp_path_factory, "gpt2")), "--temperature", "0"] + args)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_prefill_computes_the_last_position_s_logits_only(model):
    """Generation reads the next token's logits only: the head never sees the whole prompt
    (32 samples x 250 tokens x 50304 x 4 bytes = 1.6 GB of logits it would otherwise build)."""
    seen = []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    try:
        sample(model, TOK.encode_prompt(PROMPT), 3, temperature=0)
    finally:
        hook.remove()
    assert seen == [1, 1, 1]
    idx = torch.randint(0, 50257, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full, _ = model(idx)
        last, _ = model(idx, last_only=True)
    torch.testing.assert_close(last, full[:, -1:])


def test_cli_says_when_generation_goes_past_the_trained_positions(tmp_path_factory, capsys):
    """The smoke run trains at data.seq_len=64 with a 256-row learned position table: the
    context slides at 64 unless --context-length asks for more, and then 100 tokens go through
    40 positions whose rows never left their random init."""
    run = str(smoke_run(tmp_path_factory, "gpt2"))
    args = [run, "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", "100"]
    main(args)
    err = capsys.readouterr().err
    assert "past 64 tokens (data.seq_len, the run's training window) the context slides" in err
    assert "never trained" not in err
    main([*args, "--context-length", "256"])
    err = capsys.readouterr().err
    assert "data.seq_len=64 tokens; learned positions 64..103 were never trained" in err
    assert "--context-length 64 stays within them" in err
    assert "slides" not in err


@pytest.mark.parametrize("words", [2, 300], ids=["prompt", "prompt-past-context"])
def test_cli_generates_past_the_context_length(tmp_path_factory, capsys, words):
    """model.context_length=256: past it the context slides (nanoGPT crops it) instead of
    refusing; --context-length says how far."""
    run = smoke_run(tmp_path_factory, "gpt2")
    prompt = " hello" * words
    main([str(run), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "300",
          "--context-length", "256"])  # fmt: skip
    out, err = capsys.readouterr()
    assert "past 256 tokens (--context-length) the context slides" in err
    assert ("the prompt is 300 tokens; the model sees its last 256" in err) == (words == 300)
    model, _, _ = load_gpt(run)
    ids = sample(model, TOK.encode_prompt(prompt), 300, temperature=0, stop_id=EOT, window=256)[0]
    ended = ids[-1] == EOT
    assert len(ids) == 300 or ended
    text = prompt + TOK.decode(ids[:-1] if ended else ids) + ("\n[end of text]" if ended else "")
    assert out == f"=== sample 1/1 ===\n{text}\n"
