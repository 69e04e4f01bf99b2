"""What the loop reports: validation loss, and a generated sample."""

import contextlib
import dataclasses

import pytest
import torch

from llmtrain.config import load_config


def test_validation_loss_is_per_token_and_reads_only_the_batches_it_uses():
    """A finite pass ends with a smaller batch: its loss counts for its tokens. Batches past
    trainer.eval_batches are not even fetched."""
    from types import SimpleNamespace

    from llmtrain.report import evaluate

    class MeanOfTargets(torch.nn.Module):  # the "loss" of a batch: the mean of its targets
        def forward(self, x, y, return_logits=True):
            return None, y.float().mean()

    fetched = []

    def val_loader():
        for rows, value in ((4, 1.0), (1, 6.0), (4, 100.0)):
            fetched.append(rows)
            y = torch.full((rows, 8), value)
            yield y.long(), y.long()

    accelerator = SimpleNamespace(
        device=torch.device("cpu"), process_index=0, num_processes=1, reduce=lambda t, reduction: t
    )
    loss = evaluate(MeanOfTargets(), accelerator, val_loader(), n_batches=2)
    assert loss == pytest.approx((4 * 1.0 + 1 * 6.0) / 5)  # a mean of batch means: 3.5
    assert fetched == [4, 1]


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("n_batches", [1, 2, 5, 6, None])
def test_processes_share_the_validation_batches(world, n_batches):
    """Each process runs every world-th batch, so each batch counts once and the loss is one
    process's; all run the same number of forward passes (under ZeRO-3 or FSDP2 each gathers
    the weights with the others'), one a batch short running an uncounted pass."""
    import threading
    from types import SimpleNamespace

    from llmtrain.report import evaluate

    class MeanOfTargets(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.seen = []

        def forward(self, x, y, return_logits=True):
            self.seen.append(int(y[0, 0]))
            return None, y.float().mean()

    def val_loader():  # batch i: rows of value i; the last of six has 1 row, not 4
        for i in range(6):
            yield torch.full((1 if i == 5 else 4, 8), i), torch.full((1 if i == 5 else 4, 8), i)

    barrier, shares = threading.Barrier(world), [None] * world

    def reduce(tensor, reduction):  # every rank's sum, as a collective
        shares[rank_of[threading.get_ident()]] = tensor.clone()
        barrier.wait()
        return sum(shares)

    rank_of, models, losses = {}, [MeanOfTargets() for _ in range(world)], [None] * world

    def rank(r):
        rank_of[threading.get_ident()] = r
        acc = SimpleNamespace(device=torch.device("cpu"), process_index=r, num_processes=world,
                              reduce=reduce)  # fmt: skip
        losses[r] = evaluate(models[r], acc, val_loader(), n_batches)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    one = SimpleNamespace(device=torch.device("cpu"), process_index=0, num_processes=1,
                          reduce=lambda t, reduction: t)  # fmt: skip
    expected = evaluate(MeanOfTargets(), one, val_loader(), n_batches)
    assert losses == [pytest.approx(expected, rel=1e-6)] * world
    n = n_batches or 6
    passes = -(-n // world)
    assert [len(m.seen) for m in models] == [passes] * world
    counted = [i for r, m in enumerate(models) for i in m.seen[: len(range(r, n, world))]]
    assert sorted(counted) == list(range(n))  # each batch run by one process
    for r, m in enumerate(models):
        assert m.seen[: len(range(r, n, world))] == list(range(r, n, world))


def test_sampling_and_evaluation_leave_training_randomness_alone():
    """With dropout, samples were drawn in train mode (dropout on, from training's RNG), and
    every DataLoader pass with workers drew a seed from the global RNG: sample_every,
    eval_every and a resume then changed the training losses."""
    from types import SimpleNamespace

    from llmtrain.config import ModelConfig
    from llmtrain.data import build_dataloader
    from llmtrain.model import GPT
    from llmtrain.report import sample_text
    from llmtrain.tokenizer import get_tokenizer

    cfg = load_config(["experiment=smoke", "model.dropout=0.1"])
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, context_length=128, dropout=0.1))
    accelerator = SimpleNamespace(
        device=torch.device("cpu"), unwrap_model=lambda m: m, autocast=contextlib.nullcontext
    )
    tokenizer = get_tokenizer("gpt2")
    val = build_dataloader(
        dataclasses.replace(cfg.data, num_workers=1, pin_memory=False), tokenizer, split="val",
        batch_size=2,
    )  # fmt: skip
    before = torch.get_rng_state()
    sample_text(model, accelerator, tokenizer, cfg, seed=1)
    next(iter(val))
    assert torch.equal(torch.get_rng_state(), before) and model.training


def test_a_sample_longer_than_the_training_window_slides_at_it():
    """The sample past data.seq_len (it once had to fit the context) slides at the training
    window: its tokens are predicted from at most data.seq_len tokens, the positions trained."""
    from types import SimpleNamespace

    from llmtrain.config import ModelConfig
    from llmtrain.model import GPT
    from llmtrain.report import sample_text
    from llmtrain.tokenizer import get_tokenizer

    cfg = load_config(["experiment=smoke", "data.seq_len=16", "trainer.sample_tokens=40"])
    cfg.trainer.temperature = 0
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, context_length=32, init_std=0.5))
    accelerator = SimpleNamespace(
        device=torch.device("cpu"), unwrap_model=lambda m: m, autocast=contextlib.nullcontext
    )
    tokenizer = get_tokenizer("gpt2")
    text = sample_text(model, accelerator, tokenizer, cfg, seed=1)
    prompt = torch.tensor([tokenizer.encode_prompt("The")])
    with torch.no_grad():
        ids = model.eval().generate(prompt, 40, temperature=0, window=16)[0, 1:].tolist()
    assert text == "The" + tokenizer.decode(ids)


def test_a_compiled_run_samples_in_the_training_precision():
    """With trainer.compile and bf16, Accelerate's autocast wraps the compiled model's forward;
    generate runs on the eager model under it, which sampled in fp32."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState, PartialState

    from llmtrain.config import ModelConfig
    from llmtrain.model import GPT
    from llmtrain.report import sample_text
    from llmtrain.tokenizer import get_tokenizer

    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, context_length=128))
    precision = []

    def generate(prompt, *args, **kwargs):
        precision.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"))
        return prompt

    model.generate = generate
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    try:
        prepared = accelerator.prepare(torch.compile(model))  # as trainer.compile=true has it
        sample_text(prepared, accelerator, get_tokenizer("gpt2"), load_config(["experiment=smoke"]),
                    seed=1)  # fmt: skip
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        PartialState._reset_state()
        GradientState._reset_state()
    assert precision == [torch.bfloat16]


def test_shards_report_no_document_counts():
    """Shards hold tokens: the loader counts no documents, and docs_used was a constant 0."""
    from types import SimpleNamespace

    from llmtrain.report import document_counts

    run = SimpleNamespace(cfg=load_config(["experiment=smoke", "data=shards", "data.path=x"]))
    assert document_counts(run) == {}
