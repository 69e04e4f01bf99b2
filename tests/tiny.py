"""The smallest real training config the tests share: a 2-layer, 64-wide GPT on 64-token windows
of the shipped sample, no logger. Each test file adds its batch size and intervals."""

TINY = [
    "experiment=smoke",
    "logger=none",
    "model.n_layer=2",
    "model.n_embd=64",
    "data.seq_len=64",
    "trainer.micro_batch_size=4",
    "trainer.loss_chunk=0",  # the plain head; tests of the fused loss turn it on
    "trainer.eval_at_start=false",  # metrics.jsonl starts with step 1; tests of it turn it on
]
