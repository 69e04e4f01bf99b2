"""llmtrain.loss: the fused, chunked head + cross-entropy against F.cross_entropy on the
full logits, and the model's switch to it (trainer.loss_chunk)."""

import pytest
import torch
import torch.nn.functional as F
from test_model import GPT2_TINY, LLAMA_TINY, TINY, build, tokens

from llmtrain import loss as loss_mod
from llmtrain.loss import chunked_lm_loss


def reference(h, weight, targets, vocab_size):
    """The plain head: all logits, padding columns cut, mean cross-entropy."""
    logits = (h @ weight.t())[..., :vocab_size]
    return F.cross_entropy(logits.reshape(-1, vocab_size), targets.reshape(-1), ignore_index=-100)


def problem(n=37, c=16, padded=64, vocab=50, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, c, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(padded, c, generator=g, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[[3, 10, 11]] = -100  # ignored positions
    return h, weight, targets


@pytest.mark.parametrize("chunk", [1, 7, 37, 1000])
def test_loss_and_gradients_equal_full_cross_entropy(chunk):
    """Every chunking (one token, uneven, exact, larger than N) gives the plain loss and the
    plain gradients, scaled by the upstream gradient (0.3 here; 1 / grad_accum in training)."""
    h, weight, targets = problem()
    want = reference(h, weight, targets, 50)
    want_h, want_w = torch.autograd.grad(0.3 * want, (h, weight))
    got = chunked_lm_loss(h, weight, targets, 50, chunk)
    got_h, got_w = torch.autograd.grad(0.3 * got, (h, weight))
    # The logits are float32 inside (as the plain bf16 path takes them), hence 1e-6.
    assert got.dtype == torch.float32  # as the plain head's loss under autocast
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_h, want_h, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got_w, want_w, rtol=1e-6, atol=1e-7)
    assert got_w[50:].abs().max() == 0  # padding rows of the vocabulary get no gradient


def test_batch_shaped_inputs_and_all_ignored_targets():
    h, weight, targets = problem(n=24)
    got = chunked_lm_loss(h.view(2, 12, -1), weight, targets.view(2, 12), 50, 5)
    want = reference(h, weight, targets, 50)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    ignored = torch.full_like(targets, -100)
    loss = chunked_lm_loss(h, weight, ignored, 50, 5)
    grad_h, grad_w = torch.autograd.grad(loss, (h, weight))
    assert loss.item() == 0 and grad_h.abs().max() == 0 and grad_w.abs().max() == 0


def test_bf16_autocast_matches_the_plain_head():
    """Under autocast the matmuls run in bf16 as nn.Linear's would; the loss is float32 and
    the float32 weight gets a float32 gradient, within bf16 rounding of the plain one."""
    h, weight, targets = problem(n=256, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = reference(h, weight, targets, 50).float()
        got = chunked_lm_loss(h, weight, targets, 50, 100)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    # the matmuls did run in bf16 (float32 ones are as close to the plain head, and slower)
    in_bf16 = chunked_lm_loss(h.bfloat16(), weight.bfloat16(), targets, 50, 100)
    assert got.item() == in_bf16.item()
    plain, fused = torch.autograd.grad(want, (h, weight)), torch.autograd.grad(got, (h, weight))
    for a, b in zip(plain, fused, strict=True):
        assert b.dtype == torch.float32
        assert (a - b).abs().max() <= 0.02 * a.abs().max()  # a few bf16 ulps of the largest


def test_the_weight_gradient_is_summed_over_chunks_in_float32():
    """256 one-token chunks: the weight's gradient is as accurate as the plain bf16 head's
    (summed in bf16, its error against float64 was 2.4 times the plain head's)."""
    h, weight, targets = problem(n=256, dtype=torch.float32)
    exact = torch.autograd.grad(reference(h.double(), weight.double(), targets, 50), weight)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = reference(h, weight, targets, 50).float()
        fused = chunked_lm_loss(h, weight, targets, 50, 1)

    def error(loss: torch.Tensor) -> float:
        grad = torch.autograd.grad(loss, weight)[0]
        return ((grad.double() - exact).abs().max() / exact.abs().max()).item()

    assert error(fused) <= 1.5 * error(plain)


@pytest.mark.parametrize("vocab", [50, 63, 64])  # padded columns, one, and none
def test_pure_and_in_place_terms_agree(vocab):
    """The compiled form (no mutation) and the eager form (reusing the logits' memory) give the
    same loss share and logit gradient, and the in-place one really overwrites its input."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(9, 64, generator=g)
    t_c = torch.randint(0, vocab, (9, 1), generator=g)
    w_c = torch.rand(9, 1, generator=g)
    pure_loss, pure_grad = loss_mod._terms_pure(logits, t_c, w_c, vocab)
    original = logits.clone()
    loss, grad = loss_mod._terms_in_place(logits, t_c, w_c, vocab)
    assert grad.data_ptr() == logits.data_ptr() and not torch.equal(logits, original)
    torch.testing.assert_close(loss, pure_loss)
    torch.testing.assert_close(grad, pure_grad)
    assert torch.count_nonzero(grad[:, vocab:]) == 0  # padding columns get no gradient


def test_compiled_loss_is_one_graph_of_pure_ops(monkeypatch):
    """Under torch.compile the loss traces whole (fullgraph: no graph break) through the pure
    form, forward and backward (aot_eager runs AOT autograd without inductor's C++ build)."""

    def in_place(*args):
        raise AssertionError("the in-place form was traced under torch.compile")

    monkeypatch.setattr(loss_mod, "_terms_in_place", in_place)
    torch._dynamo.reset()
    h, weight, targets = problem(dtype=torch.float32)
    want = reference(h, weight, targets, 50)
    want_h, want_w = torch.autograd.grad(0.3 * want, (h, weight))
    compiled = torch.compile(chunked_lm_loss, fullgraph=True, backend="aot_eager")
    got = compiled(h, weight, targets, 50, 7)
    got_h, got_w = torch.autograd.grad(0.3 * got, (h, weight))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_h, want_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def in_place_ops(gm: torch.fx.GraphModule) -> list[str]:
    """The nodes of ``gm`` and of its subgraphs (an autograd.Function's forward and backward
    are traced as subgraphs) that change a tensor in place."""
    found = []
    for module in gm.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        for node in module.graph.nodes:
            name = getattr(node.target, "__name__", str(node.target))
            operator = name in ("iadd", "isub", "imul", "itruediv", "setitem")
            method = name.endswith("_") and not name.startswith("_")  # add_, copy_, ...
            if node.op in ("call_method", "call_function") and (operator or method):
                found.append(name)
    return found


def test_compiled_loss_mutates_nothing():
    """The forward that torch.compile traces changes no tensor in place. torch 2.11 sends the
    gradient of a returned tensor that the forward mutated to the wrong output: a compiled
    gpt2-small on an H100 trained with all-zero gradients (pytorch/pytorch#180642)."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    h, weight, targets = problem(dtype=torch.float32)
    got = torch.compile(chunked_lm_loss, fullgraph=True, backend=capture)(h, weight, targets, 50, 7)
    torch.autograd.grad(got, (h, weight))
    torch._dynamo.reset()
    assert len(graphs) == 1
    assert in_place_ops(graphs[0]) == []


@TINY
def test_model_with_chunked_loss_trains_like_the_plain_head(cfg):
    """Tied (GPT-2) and untied (Llama) heads: same loss and same gradient on every parameter;
    evaluation (no grad) and logits still take the plain path."""
    idx, targets = tokens(cfg), tokens(cfg, seed=2)
    plain, fused = build(cfg).train(), build(cfg).train()
    fused.enable_chunked_loss(5)
    assert fused.lm_head.fuses_loss(return_logits=False)
    _, loss_a = plain(idx, targets, return_logits=False)
    logits, loss_b = fused(idx, targets, return_logits=False)
    assert logits is None
    loss_a.backward()
    loss_b.backward()
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-6)
    for (name, a), b in zip(plain.named_parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)
    with torch.no_grad():
        assert not fused.lm_head.fuses_loss(return_logits=False)
        torch.testing.assert_close(fused(idx, targets)[1], plain(idx, targets)[1])
    logits, _ = fused(idx, targets)  # asked for logits: the plain head
    assert logits.shape == (*idx.shape, fused.padded_vocab_size)


def test_chunked_loss_keeps_state_dict_names():
    """LMHead is an nn.Linear: checkpoints and the HF mapping see ``lm_head.weight``."""
    for cfg in (GPT2_TINY, LLAMA_TINY):
        model = build(cfg)
        model.enable_chunked_loss(8)
        assert "lm_head.weight" in model.state_dict()
        assert isinstance(model.lm_head, torch.nn.Linear)
