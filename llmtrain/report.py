"""What the training loop reports: each log interval's record (loss, perplexity, tokens/s,
MFU, data wait), and at each eval the validation loss and perplexity and a generated sample."""

from __future__ import annotations

from itertools import islice

import torch

from llmtrain.config import TrainConfig
from llmtrain.documents import STATS
from llmtrain.hellaswag import hellaswag
from llmtrain.metrics import (
    Throughput,
    console_line,
    flops_per_token,
    format_loss,
    format_ppl,
    mfu,
    peak_memory_gb,
    perplexity,
)
from llmtrain.run import Run


@torch.no_grad()
def evaluate(model, accelerator, val_loader, n_batches: int | None) -> float:
    """Mean validation loss per token over the first ``n_batches`` batches (None: the whole
    split; a pass's last batch may be smaller: it counts for its tokens, not as a whole batch).

    Every process reads the same batches and runs every world_size-th of them, and the sums
    are added: one process's loss, in a world_size-th of the time. All run the same number of
    forward passes (a ZeRO-3 or FSDP2 forward gathers the weights together): one whose share
    is a batch short runs the first batch again and does not count it."""
    rank, world = accelerator.process_index, accelerator.num_processes
    device = accelerator.device

    def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _, loss = model(x.to(device), y.to(device), return_logits=False)
        return loss.float()

    model.eval()
    total = torch.zeros(2, device=device)  # (loss x tokens, tokens)
    first, read = None, 0
    for x, y in islice(val_loader, n_batches):
        if read % world == rank:
            total[0] += loss_of(x, y) * y.numel()
            total[1] += y.numel()
        first, read = first or (x, y), read + 1
    if first is not None and (read - 1) % world < rank:  # a pass short of the others
        loss_of(*first)
    total = accelerator.reduce(total, reduction="sum")
    model.train()
    if total[1] == 0:
        raise RuntimeError("data.val_split: the validation split produced no batches")
    return (total[0] / total[1]).item()


def sample_text(model, accelerator, tokenizer, cfg: TrainConfig, seed: int) -> str:
    """The prompt and a few generated tokens, so a user sees the model learn; its own RNG,
    never training's, and no dropout (which would also draw from training's RNG). An empty
    prompt starts from end-of-text, as llmtrain-sample does."""
    t = cfg.trainer
    generator = torch.Generator(device=accelerator.device).manual_seed(seed)
    prompt = torch.tensor([tokenizer.encode_prompt(t.sample_prompt)], device=accelerator.device)
    model.eval()
    try:  # autocast: a compiled model's wraps the compiled forward, not the eager generate's
        with accelerator.autocast():
            out = accelerator.unwrap_model(model).generate(
                prompt,
                t.sample_tokens,
                temperature=t.temperature,
                top_k=t.top_k,
                generator=generator,
                window=cfg.data.seq_len,  # the training window: past it, untrained positions
            )
    finally:
        model.train()
    return t.sample_prompt + tokenizer.decode(out[0, prompt.size(1) :].tolist())


def log_train(
    run: Run, loss_sum: torch.Tensor, steps: int, lr: float, grad_norm, throughput: Throughput
) -> None:
    """The log interval's mean training loss (averaged over ranks: the interval's one extra
    host sync), perplexity, throughput and MFU."""
    plan, state = run.plan, run.state
    loss = run.accelerator.reduce(loss_sum, reduction="mean").item() / steps
    tok_s, wait = throughput.read()
    fpt = flops_per_token(run.cfg.model, plan.seq_len)
    record = {
        "step": state.step,
        "tokens": state.tokens,
        "loss": loss,
        "ppl": perplexity(loss),
        "lr": lr,
        "grad_norm": float(grad_norm),
        "tokens_per_s": tok_s,
        "mfu": mfu(tok_s / plan.world_size, fpt, run.peak_tflops),
        "peak_mem_gb": peak_memory_gb(run.accelerator.device),
        "data_wait": wait,
        "skipped_steps": state.skipped_steps,
        "epoch": run.train_loader.epoch,  # rank 0's: the ranks read shares of about one size
    }
    if record["epoch"] > run.epoch:
        again = "again, reshuffled" if run.train_loader.reshuffles else "again, in the same order"
        if not run.train_loader.reshuffles and run.cfg.data.shuffle:  # one file, streamed
            again += " (llmtrain-prepare it into shards, and each epoch shuffles its windows)"
        run.say(
            f"data: epoch {record['epoch']} by step {state.step:,}: the training data ran out "
            f"(rank 0's share) and is read {again}"
        )
        run.epoch = record["epoch"]
    eta = run.pace.eta(state.step, plan.max_steps)
    run.log(record, console_line(record, plan.max_steps, eta))


def document_counts(run: Run) -> dict[str, int]:
    """Training documents read so far by every rank: used, and skipped as empty, undecodable
    or held out for validation. Empty for data=shards, which holds tokens (llmtrain-prepare
    counted its documents, in the shards' manifest.json)."""
    if run.cfg.data.source == "shards":
        return {}
    stats = run.train_loader.stats
    counts = torch.tensor([stats[k] for k in STATS], device=run.accelerator.device)
    return dict(zip(STATS, run.accelerator.reduce(counts, reduction="sum").tolist(), strict=True))


def log_eval(run: Run) -> None:
    """Validation loss and perplexity on trainer.eval_batches micro-batches."""
    t, state = run.cfg.trainer, run.state
    val_loss = evaluate(run.model, run.accelerator, run.val_loader, t.eval_batches)
    val_ppl = perplexity(val_loss)
    docs = document_counts(run)
    run.log(
        {"step": state.step, "tokens": state.tokens, "val_loss": val_loss, "val_ppl": val_ppl}
        | ({"docs_used": docs["documents"]} if docs else {})
        | {f"docs_{k}": docs[k] for k in ("empty", "undecodable", "heldout") if docs},
        f"eval step {state.step}: val_loss {format_loss(val_loss)} | "
        f"val_ppl {format_ppl(val_ppl).strip()}",
    )
    if docs and docs["empty"] + docs["undecodable"]:
        run.say(
            f"data: training documents skipped so far: {docs['empty']:,} empty, "
            f"{docs['undecodable']:,} undecodable ({docs['documents']:,} used)"
        )


def log_hellaswag(run: Run) -> None:
    """HellaSwag accuracy (llmtrain/hellaswag.py), each rank scoring a share of the examples,
    on the model without torch.compile: its rows' lengths vary from batch to batch. In the
    training precision: with trainer.compile, Accelerate's autocast wraps the compiled model's
    forward, which the eager model's leaves out (it scored in fp32)."""
    model = run.accelerator.unwrap_model(run.model, keep_torch_compile=False)
    model.eval()
    try:
        with run.accelerator.autocast():
            scores = hellaswag(
                model,
                run.tokenizer,
                run.hellaswag,
                run.cfg.data.seq_len,
                accelerator=run.accelerator,
            )
    finally:
        model.train()
    right, n = round(scores["acc_norm"] * scores["examples"]), scores["examples"]
    run.log(
        {"step": run.state.step, "tokens": run.state.tokens,
         "hellaswag_acc_norm": scores["acc_norm"], "hellaswag_acc": scores["acc"]},
        f"hellaswag step {run.state.step}: acc_norm {scores['acc_norm']:.4f} ({right:,}/{n:,}) "
        f"| acc {scores['acc']:.4f}",
    )  # fmt: skip


def log_sample(run: Run) -> None:
    """A generated continuation of trainer.sample_prompt (every rank takes part: a ZeRO-3 or
    FSDP2 model gathers its weights for it)."""
    text = sample_text(run.model, run.accelerator, run.tokenizer, run.cfg, run.cfg.trainer.seed)
    run.say(f"sample step {run.state.step}: {text!r}")
