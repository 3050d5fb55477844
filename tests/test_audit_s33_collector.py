"""Audit (s33) of gradkit.projection.GradientCollector in realistic situations.

Every value test compares the collector's rows with L G_b R^T of the REAL per-example weight gradient, obtained by
running each example alone (same padding) and reading ``weight.grad`` (a copy with an untied weight where the weight
is shared), projected with the explicit matrices of ``projection_matrix(derive_seed(seed, name, side))``.

Tests for correct behaviour pass. Tests marked ``# DEFECT:`` fail on the current code: they assert the behaviour the
collector should have (the right rows, or a clear error instead of silently wrong rows / a misleading message).
"""
import copy
import re
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint as checkpoint
from torch import nn

from gradkit.projection import (AdafactorNormalizer, AdamNormalizer, GradientCollector, derive_seed,
                                projection_matrix)

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

P, SEED = 3, 5


# ----------------------------------------------------------------------------- references
def lgr(G, name, p=P, seed=SEED, kind="rademacher"):
    L = projection_matrix(p, G.shape[0], seed=derive_seed(seed, name, "left"), kind=kind).double()
    R = projection_matrix(p, G.shape[1], seed=derive_seed(seed, name, "right"), kind=kind).double()
    return (L @ G.double() @ R.T).reshape(-1)


def weight_grad(mod, bias=False):
    g = mod.weight.grad
    if type(mod).__name__ == "Conv1D":
        g = g.T
    if bias:
        g = torch.cat([g, mod.bias.grad[:, None]], 1)
    return g.detach().clone()


def reference(model, names, n, loss_of_example, p=P, seed=SEED, bias=False):
    """{name: (n, p*p)} float64: each example's own backward, its real weight gradient, projected."""
    mods = dict(model.named_modules())
    out = {k: [] for k in names}
    for b in range(n):
        model.zero_grad(set_to_none=True)
        loss_of_example(b).backward()
        for k in names:
            out[k].append(lgr(weight_grad(mods[k], bias and mods[k].bias is not None), k, p, seed))
    model.zero_grad(set_to_none=True)
    return {k: torch.stack(v) for k, v in out.items()}


def assert_rows(got, want, rtol=1e-5):
    assert set(want) <= set(got)
    for k in want:
        assert tuple(got[k].shape) == tuple(want[k].shape), k
        scale = max(float(want[k].abs().max()), 1e-3)
        err = float((got[k].double() - want[k]).abs().max())
        assert err <= rtol * scale + 1e-7, f"{k}: max error {err:.3g} (max |want| {scale:.3g})"


class MLP(nn.Module):
    def __init__(self, i=5, h=7, o=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(i, h)
        self.fc2 = nn.Linear(h, o)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def sin_loss(model, x):
    return model(x).sin().sum()


def lm_losses(model, ids, mask, vocab):
    """Per-example next-token loss over pairs whose input AND target are real tokens (left padding safe)."""
    logits = model(input_ids=ids, attention_mask=mask).logits
    tgt = ids[:, 1:].masked_fill((mask[:, 1:] == 0) | (mask[:, :-1] == 0), -100)
    tok = F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), tgt.reshape(-1), ignore_index=-100,
                          reduction="none")
    return tok.view(ids.shape[0], -1).sum(1)


def tiny_hf_gpt2(seed=0, vocab=50):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def left_padded(B=3, T=8, vocab=50, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, :5] = 0
    return ids.masked_fill(mask == 0, 0), mask


# ============================================================================= correct behaviour
@pytest.mark.parametrize("use_col_backward", [True, False])
def test_hf_gpt2_conv1d_left_padding_bias_and_per_token(use_col_backward):
    model = tiny_hf_gpt2()
    ids, mask = left_padded()
    names = ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_fc"]
    col = GradientCollector(model, modules=names, p=P, seed=SEED, bias=True)
    with col:
        col.set_mask(mask)
        loss = lm_losses(model, ids, mask, 50).sum()
        col.backward(loss) if use_col_backward else loss.backward()
        got = col.collect(missing="error")
    want = reference(model, names, 3, lambda b: lm_losses(model, ids[b:b + 1], mask[b:b + 1], 50).sum(), bias=True)
    assert_rows(got, want)
    colt = GradientCollector(model, modules=names, p=P, seed=SEED, bias=True, per_token=True)
    with colt:
        colt.set_mask(mask)
        colt.backward(lm_losses(model, ids, mask, 50).sum())
        tok = colt.collect()
    for n in names:
        assert tok[n].shape == (3, 8, P * P)
        assert float(tok[n][mask == 0].abs().max()) == 0.0
    assert_rows({n: tok[n].sum(1) for n in names}, want)


def test_hf_gpt2_tied_lm_head_gives_the_linear_share():
    model = tiny_hf_gpt2(seed=2)
    assert model.lm_head.weight is model.transformer.wte.weight
    ids, mask = left_padded(seed=3)
    col = GradientCollector(model, modules="lm_head", p=P, seed=SEED)
    with col:
        col.set_mask(mask)
        col.backward(lm_losses(model, ids, mask, 50).sum())
        got = col.collect()
    untied = copy.deepcopy(model)
    untied.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    want = reference(untied, ["lm_head"], 3,
                     lambda b: lm_losses(untied, ids[b:b + 1], mask[b:b + 1], 50).sum())
    assert_rows(got, want)


def test_hf_llama_tiny_left_padding_every_linear():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                      tie_word_embeddings=True, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    ids, mask = left_padded(vocab=40, seed=4)
    col = GradientCollector(model, p=P, seed=SEED)
    assert list(col.module_dims)[-1] == "lm_head" and len(col.module_dims) == 8
    with col:
        col.set_mask(mask)
        col.backward(lm_losses(model, ids, mask, 40).sum())
        got = col.collect(missing="error")
    names = [n for n in col.module_dims if n != "lm_head"]  # lm_head is tied: its weight.grad has the embedding's too
    want = reference(model, names, 3, lambda b: lm_losses(model, ids[b:b + 1], mask[b:b + 1], 40).sum())
    assert_rows(got, want, rtol=1e-4)


def test_hf_bert_tiny_with_pooler_and_right_padding():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=12, max_position_embeddings=16, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    model = BertModel(cfg).eval()
    ids = torch.randint(1, 30, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    w = torch.randn(8)

    def losses(ids, mask):
        out = model(input_ids=ids, attention_mask=mask)
        return ((out.last_hidden_state @ w).tanh() * mask).sum(1) + out.pooler_output.sin().sum(-1)

    col = GradientCollector(model, p=P, seed=SEED, bias=True)
    assert "pooler.dense" in col.module_dims  # a 2-D (B, I) input beside (B, T, I) ones: the mask skips it
    with col:
        col.set_mask(mask)
        col.backward(losses(ids, mask).sum())
        got = col.collect(missing="error")
    want = reference(model, list(col.module_dims), 3, lambda b: losses(ids[b:b + 1], mask[b:b + 1]).sum(), bias=True)
    assert_rows(got, want)


def test_autocast_bfloat16_is_close_to_the_fp32_reference():
    model = tiny_hf_gpt2(seed=5)
    ids, mask = left_padded(seed=6)
    names = ["transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_fc", "lm_head"]
    col = GradientCollector(model, modules=names[:2], p=P, seed=SEED)
    with col, torch.autocast("cpu", dtype=torch.bfloat16):
        col.set_mask(mask)
        col.backward(lm_losses(model, ids, mask, 50).sum())
        got = col.collect()
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in got.values())
    want = reference(model, names[:2], 3, lambda b: lm_losses(model, ids[b:b + 1], mask[b:b + 1], 50).sum())
    assert_rows(got, want, rtol=3e-2)  # bfloat16 forward


@pytest.mark.parametrize("reentrant", [None, False, True])
def test_hf_gradient_checkpointing(reentrant):
    model = tiny_hf_gpt2(seed=7).train()
    ids, mask = left_padded(seed=8)
    names = ["transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj"]
    want = reference(model, names, 3, lambda b: lm_losses(model, ids[b:b + 1], mask[b:b + 1], 50).sum())
    kw = None if reentrant is None else {"use_reentrant": reentrant}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    col = GradientCollector(model, modules=names, p=P, seed=SEED)
    with col:
        col.set_mask(mask)
        loss = lm_losses(model, ids, mask, 50).sum()
        if reentrant:
            with pytest.raises(RuntimeError, match="use_reentrant=True"):
                col.backward(loss)
        loss.backward()
        got = col.collect(missing="error")
    assert_rows(got, want)


def test_torch_compile_whole_model_first_called_while_attached():
    torch._dynamo.reset()
    model = MLP(seed=1)
    x = torch.randn(3, 4, 5)
    want = reference(model, ["fc1", "fc2"], 3, lambda b: sin_loss(model, x[b:b + 1]))
    compiled = torch.compile(model, backend="eager")
    col = GradientCollector(model, p=P, seed=SEED)
    with col, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        col.backward(sin_loss(compiled, x))
        got = col.collect(missing="error")
    assert_rows(got, want)


def test_two_collectors_attached_at_once():
    model = MLP(seed=2)
    x = torch.randn(4, 6, 5)
    want = reference(model, ["fc1", "fc2"], 4, lambda b: sin_loss(model, x[b:b + 1]))
    a = GradientCollector(model, p=P, seed=SEED)
    b = GradientCollector(model, p=P, seed=SEED, per_token=True)
    with a, b:
        sin_loss(model, x).backward()
        ga, gb = a.collect(missing="error"), b.collect(missing="error")
    model.zero_grad(set_to_none=True)
    assert_rows(ga, want)
    assert_rows({k: v.sum(1) for k, v in gb.items()}, want)
    # different modules, each backpropagating for its own
    c1, c2 = GradientCollector(model, modules="fc2", p=P, seed=SEED), GradientCollector(model, modules="fc1", p=P,
                                                                                          seed=SEED)
    with c1, c2:
        loss = sin_loss(model, x)
        c1.backward(loss, retain_graph=True)
        g1 = c1.collect()
        c2.backward(loss)
        g2 = c2.collect()
    assert_rows(g1, {"fc2": want["fc2"]})
    assert_rows(g2, {"fc1": want["fc1"]})


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_batch_of_one_and_an_example_with_every_token_masked(per_token, bias):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 10))
    ids = torch.randint(0, 10, (3, 5))
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[1] = 0
    mask[2, 3:] = 0

    def losses(ids, mask):
        return (model(ids).log_softmax(-1)[..., 0] * mask).sum(1)

    col = GradientCollector(model, p=P, seed=SEED, per_token=per_token, bias=bias)
    want = reference(model, ["1", "3"], 3, lambda b: losses(ids[b:b + 1], mask[b:b + 1]).sum(), bias=bias)
    for n in (3, 1):
        with col:
            col.set_mask(mask[:n])
            col.backward(losses(ids[:n], mask[:n]).sum())
            got = col.collect()
        if per_token:
            assert got["1"].shape == (n, 5, P * P)
            got = {k: v.sum(1) for k, v in got.items()}
        assert_rows(got, {k: v[:n] for k, v in want.items()})
    assert float(want["1"][1].abs().max()) == 0.0


def test_float64_model_and_output():
    model = MLP(seed=4).double()
    x = torch.randn(3, 2, 5, dtype=torch.float64)
    col = GradientCollector(model, p=P, seed=SEED, bias=True, dtype=torch.float64)
    with col:
        col.backward(sin_loss(model, x))
        got = col.collect()
    assert all(v.dtype == torch.float64 for v in got.values())
    assert_rows(got, reference(model, ["fc1", "fc2"], 3, lambda b: sin_loss(model, x[b:b + 1]), bias=True))


def test_meta_device_model_gives_meta_rows_of_the_right_shape():
    with torch.device("meta"):
        model = MLP()
    col = GradientCollector(model, p=P, seed=SEED)
    with col:
        col.backward(sin_loss(model, torch.randn(2, 3, 5, device="meta")))
        got = col.collect()
    assert {k: (tuple(v.shape), v.device.type) for k, v in got.items()} == {"fc1": ((2, 9), "meta"),
                                                                             "fc2": ((2, 9), "meta")}


def test_module_selection_patterns():
    model = tiny_hf_gpt2()
    with pytest.raises(ValueError, match="matches no module"):
        GradientCollector(model, modules=["transformer.h.*.nothing"])
    with pytest.raises(ValueError, match="match no nn.Linear"):
        GradientCollector(model, modules="*.ln_*")
    with pytest.raises(TypeError, match="only nn.Linear"):
        GradientCollector(model, modules="transformer.h.0")
    everything = GradientCollector(model, modules="*")
    assert list(everything.module_dims) == list(GradientCollector(model).module_dims)
    assert len(everything.module_dims) == 2 * 4 + 1


def test_same_shape_forward_after_an_exception_in_forward():
    class Fails(MLP):
        def forward(self, x, fail=False):
            h = torch.tanh(self.fc1(x))
            if fail:
                raise MemoryError("simulated")
            return self.fc2(h)

    model = Fails(seed=5)
    x = torch.randn(4, 6, 5)
    col = GradientCollector(model, p=P, seed=SEED)
    with col:
        with pytest.raises(MemoryError):
            model(x, fail=True)
        col.backward(sin_loss(model, x))
        got = col.collect()
    assert_rows(got, reference(model, ["fc1", "fc2"], 4, lambda b: sin_loss(model, x[b:b + 1])))


def test_keyword_input_and_other_hooks_on_the_module():
    model = MLP(seed=6)
    x = torch.randn(3, 4, 5)

    class Kw(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner.fc2(input=torch.tanh(self.inner.fc1(input=x)))

    kw = Kw(model)
    want = reference(kw, ["inner.fc1", "inner.fc2"], 3, lambda b: sin_loss(kw, x[b:b + 1]))
    col = GradientCollector(kw, p=P, seed=SEED)
    with col:
        col.backward(sin_loss(kw, x))
        assert_rows(col.collect(), want)
    # a full backward hook (Captum-style) and an input-modifying pre-hook are seen as autograd sees them
    hb = model.fc1.register_full_backward_hook(lambda m, gi, go: None)
    hp = model.fc1.register_forward_pre_hook(lambda m, a: (a[0] * 2.0,))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = reference(model, ["fc1", "fc2"], 3, lambda b: sin_loss(model, x[b:b + 1]))
            col = GradientCollector(model, p=P, seed=SEED)
            with col:
                col.backward(sin_loss(model, x))
                assert_rows(col.collect(), want)
    finally:
        hb.remove()
        hp.remove()


@pytest.mark.parametrize("per_token", [False, True])
def test_normalizers_with_mask_bias_and_per_token(per_token):
    torch.manual_seed(7)
    model = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 10))
    ids = torch.randint(0, 10, (3, 5))
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[1, 2:] = 0
    mask[2, 3:] = 0
    v, bv = torch.rand(5, 6) + 0.1, torch.rand(5) + 0.1

    def losses(ids, mask):
        return (model(ids).log_softmax(-1)[..., 0] * mask).sum(1)

    adam = AdamNormalizer(v, bias_avg_sq=bv, eps=1e-3)
    ada = AdafactorNormalizer(v.mean(1), v.mean(0), bias_avg_sq=bv)
    for nz in (adam, ada):
        col = GradientCollector(model, modules="1", p=P, seed=SEED, bias=True, per_token=per_token,
                                normalizers={"1": nz}, memory_budget=200)
        with col:
            col.set_mask(mask)
            col.backward(losses(ids, mask).sum())
            got = col.collect()["1"]
        rows = []
        for b in range(3):
            model.zero_grad(set_to_none=True)
            losses(ids[b:b + 1], mask[b:b + 1]).sum().backward()
            G, gb = model[1].weight.grad.double(), model[1].bias.grad.double()
            if nz is adam:
                Gn, gbn = G / (v.double().sqrt() + 1e-3), gb / (bv.double().sqrt() + 1e-3)
            else:
                r, c = v.mean(1).double() + nz.eps, v.mean(0).double() + nz.eps
                Gn = G / (torch.outer(r, c) / r.mean()).sqrt()
                gbn = gb / (bv.double() + nz.bias_eps).sqrt()
            rows.append(lgr(torch.cat([Gn, gbn[:, None]], 1), "1"))
        model.zero_grad(set_to_none=True)
        assert_rows({"1": got.sum(1) if per_token else got}, {"1": torch.stack(rows)})


def test_falcon_linear_subclass_with_its_own_matmul():
    from transformers.models.falcon.modeling_falcon import FalconLinear

    torch.manual_seed(8)
    model = nn.Sequential(FalconLinear(5, 4))
    x = torch.randn(3, 7, 5)
    col = GradientCollector(model, p=P, seed=SEED, bias=True)
    with col:
        col.backward(model(x).sin().sum())
        got = col.collect()
    assert_rows(got, reference(model, ["0"], 3, lambda b: model(x[b:b + 1]).sin().sum(), bias=True))


class SharedDepth(nn.Module):
    """ALBERT-style: one block applied three times, each application checkpointed (or not)."""

    def __init__(self, reentrant):
        super().__init__()
        torch.manual_seed(9)
        self.fc = nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)
        self.reentrant = reentrant

    def block(self, h):
        return h + torch.tanh(self.fc(h))

    def forward(self, x):
        h = x
        for _ in range(3):
            h = self.block(h) if self.reentrant is None else checkpoint.checkpoint(
                self.block, h, use_reentrant=self.reentrant)
        return self.head(h).sin().sum()


@pytest.mark.parametrize("reentrant", [None, False])
def test_weight_shared_layer_without_or_with_non_reentrant_checkpoint(reentrant):
    model = SharedDepth(reentrant)
    x = torch.randn(3, 4, 6)
    want = reference(model, ["fc", "head"], 3, lambda b: model(x[b:b + 1]))
    col = GradientCollector(model, p=P, seed=SEED)
    with col:
        col.backward(model(x))
        assert_rows(col.collect(), want)


# ============================================================================= defects
def collected_or_refused(col, loss_fn, want, match):
    """The collector's rows for one backward of loss_fn() equal want, or it refuses with an error matching match
    (a refusal for another reason would hide the defect)."""
    try:
        with col:
            col.backward(loss_fn())
            got = col.collect()
    except (TypeError, ValueError, RuntimeError) as e:
        assert re.search(match, str(e)), f"refused for another reason: {e}"
        return
    assert_rows(got, want)


class FailsMidForward(MLP):
    """Raises (a simulated out-of-memory error) after fc1 ran, when asked to."""

    def forward(self, x, fail=False):
        h = torch.tanh(self.fc1(x))
        if fail:
            raise MemoryError("simulated out of memory")
        return self.fc2(h)


def test_retry_with_a_smaller_batch_after_an_exception_in_forward():
    # DEFECT: an exception raised by the MODEL in the middle of a forward (e.g. an out-of-memory error, caught
    # to retry with a smaller batch, inside `with col:`) leaves the hooked modules' pending calls and forward
    # shapes behind (only exceptions raised by the collector's own hooks drop the batch). The next, smaller
    # batch is then refused with "module 'fc1' was called with inputs of shapes (B, T) = (4, 6) and (2, 6) in one
    # batch" -- which it never was. Correct: the new forward pass is collected (the module docstring: "the next
    # batch must work without reset()").
    model = FailsMidForward(seed=10)
    x = torch.randn(4, 6, 5)
    small = x[:2]
    col = GradientCollector(model, p=P, seed=SEED)
    with col:
        with pytest.raises(MemoryError):
            model(x, fail=True)
        col.backward(sin_loss(model, small))  # raises RuntimeError "... in one batch"
        got = col.collect()
    assert_rows(got, reference(model, ["fc1", "fc2"], 2, lambda b: sin_loss(model, small[b:b + 1])))


def test_collect_after_an_interrupted_col_backward_is_not_partial():
    # DEFECT: when col.backward() is interrupted midway by an exception raised outside the collector's hooks (a
    # custom autograd Function, anomaly mode, an out-of-memory error), the modules whose gradients had already
    # arrived stay collected; a later collect() then returns their rows and ZEROS for the modules the backward
    # never reached (missing="zeros" is the default), with no error. Correct: col.backward drops the half-built
    # batch when it raises (as the gradient hook does for its own errors), so collect() refuses.
    class Boom(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            raise MemoryError("simulated out of memory in backward")

    model = MLP(seed=11)
    x = torch.randn(4, 6, 5)
    col = GradientCollector(model, p=P, seed=SEED)
    with col:
        loss = model.fc2(Boom.apply(torch.tanh(model.fc1(x)))).sin().sum()
        with pytest.raises(MemoryError):
            col.backward(loss)
        got = None
        try:
            got = col.collect()
        except RuntimeError:
            pass
    assert got is None, (f"collect() returned a half-built batch: max |row| fc1 {float(got['fc1'].abs().max())}, "
                         f"fc2 {float(got['fc2'].abs().max()):.3g}")


def test_linear_subclass_returning_a_tuple_is_not_silently_zero():
    # DEFECT: transformers' Llama4Router (and PhimoeTopKRouter) subclass nn.Linear, so modules=None hooks them,
    # but their forward returns a tuple (router_scores, router_logits). The forward hook returns early for a
    # non-tensor output, so no gradient is ever collected and collect() gives all-zero rows for the router,
    # silently. Correct: the router's real per-example gradient, or an error naming the module.
    from transformers.models.llama4.modeling_llama4 import Llama4Router

    cfg = types.SimpleNamespace(hidden_size=6, num_local_experts=4, num_experts_per_tok=2)

    class MoE(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(12)
            self.fc = nn.Linear(5, 6)
            self.router = Llama4Router(cfg)

        def forward(self, x):
            scores, logits = self.router(torch.tanh(self.fc(x)))
            return scores.sin().sum() + logits.cos().sum()

    model = MoE()
    x = torch.randn(3, 5)
    col = GradientCollector(model, p=P, seed=SEED)
    assert "router" in col.module_dims
    want = reference(model, ["fc", "router"], 3, lambda b: model(x[b:b + 1]))
    assert float(want["router"].abs().max()) > 0.1
    try:
        with col:
            col.backward(model(x))
            got = col.collect()
    except (TypeError, ValueError, RuntimeError) as e:
        assert "router" in str(e)
        return
    assert_rows(got, want)  # currently got["router"] is all zeros


def test_grouped_linear_subclass_is_not_silently_wrong():
    # DEFECT: transformers' DeepseekV4GroupedLinear subclasses nn.Linear (weight (out, in_per_group)) but applies
    # group k of the weight's rows to group k of its input (B, T, groups, in_per_group) -> (B, T, groups, d_g).
    # The collector takes (B, T, groups, in) as tokens x in and the output's last axis d_g as O, so it returns
    # sum over groups of g a^T (d_g x in) projected with a (p x d_g) L: wrong rows of the right shape, no error
    # (module_shapes says (6, 4)). Correct: the real gradient's projection, or a refusal (the output's width d_g
    # differs from the weight's O = 6).
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4GroupedLinear

    torch.manual_seed(13)
    model = nn.Sequential(DeepseekV4GroupedLinear(4, 6, 2))
    x = torch.randn(3, 5, 2, 4)
    col = GradientCollector(model, p=P, seed=SEED)
    assert col.module_shapes["0"] == (6, 4)
    want = reference(model, ["0"], 3, lambda b: model(x[b:b + 1]).sin().sum())
    collected_or_refused(col, lambda: model(x).sin().sum(), want, r"'0'.*does not apply its weight as a Linear")


def test_linear_subclass_with_extra_output_columns_is_not_silently_wrong():
    # DEFECT: transformers' IdeficsDecoupledLinear (out_additional_features > 0) returns cat(F.linear(x, W, b),
    # additional_fc(x)): O + 2 output columns for a weight of O rows. The collector never checks the output
    # gradient's width against module_shapes (O, I) = (4, 5); it builds L with O + 2 columns and returns
    # L' [G; G_extra] R^T instead of L G R^T. Correct: the real weight gradient's projection, or a refusal.
    from transformers.models.idefics.modeling_idefics import IdeficsDecoupledLinear

    torch.manual_seed(14)
    model = nn.Sequential(nn.Linear(3, 5), IdeficsDecoupledLinear(5, 4, 2, partially_freeze=False))
    x = torch.randn(3, 7, 3)
    col = GradientCollector(model, modules="1", p=P, seed=SEED)
    assert col.module_shapes["1"] == (4, 5)
    want = reference(model, ["1"], 3, lambda b: model(x[b:b + 1]).sin().sum())
    collected_or_refused(col, lambda: model(x).sin().sum(), want, r"'1'.*does not apply its weight as a Linear")


def test_output_modifying_forward_hook_registered_before_attach():
    # DEFECT: the collector's forward hook is appended after the module's existing forward hooks, so when an
    # earlier hook returns a new output (gating / ablation / scaling hooks: `out * s`), the collector takes the
    # gradient w.r.t. the hook's result instead of the Linear's own output: rows off by the factor s (3 here),
    # silently. Correct: the weight gradient autograd computes (e.g. register the hook with prepend=True, so it
    # sees the module's own output).
    model = MLP(seed=15)
    x = torch.randn(3, 4, 5)
    h = model.fc1.register_forward_hook(lambda mod, args, out: out * 3.0)
    try:
        want = reference(model, ["fc1", "fc2"], 3, lambda b: sin_loss(model, x[b:b + 1]))
        col = GradientCollector(model, p=P, seed=SEED)
        with col:
            col.backward(sin_loss(model, x))
            got = col.collect()
    finally:
        h.remove()
    assert_rows(got, want)


def test_reentrant_checkpoint_of_a_weight_shared_layer():
    # DEFECT: the docstring says that with use_reentrant=True checkpointing `loss.backward()` works, and a module
    # called several times per forward has its calls summed. Together they fail: the backward recomputes the
    # shared layer once per checkpointed segment; after the last segment's recomputed call got its gradient, the
    # next segment's recomputation is refused with "module 'fc' ran forward again after its gradient was
    # collected; call collect() ..." (nothing was collected) and the batch is dropped. Correct: the sum over the
    # three applications, as without checkpointing.
    model = SharedDepth(True)
    x = torch.randn(3, 4, 6)
    want = reference(model, ["fc", "head"], 3, lambda b: model(x[b:b + 1].requires_grad_()))
    col = GradientCollector(model, p=P, seed=SEED)
    with col:
        model(x.clone().requires_grad_()).backward()
        got = col.collect()
    assert_rows(got, want)


class Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(16)
        self.blocks = nn.ModuleList([MLP(5, 7, 5, seed=16), MLP(5, 7, 5, seed=17)])
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return self.head(x)


def test_blocks_compiled_and_run_before_attach_are_not_silently_zero():
    # DEFECT: compiling each block in place (`block.compile()`, the usual per-layer compile) and running one step
    # before attaching (warm-up / an earlier training step) -- torch.compile does not re-trace for forward hooks
    # added later (torch._dynamo.config.skip_nnmodule_hook_guards), so the hooks inside the blocks never run. The
    # eager head is collected, and every block Linear comes back as ZERO rows with the default missing="zeros",
    # silently. Correct: the real rows, or an error naming the modules that ran without their hooks.
    torch._dynamo.reset()  # no compiled code from other tests (traced with hooks present) may serve this one
    model = Blocks()
    x = torch.randn(3, 4, 5)
    names = ["blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2", "head"]
    want = reference(model, names, 3, lambda b: sin_loss(model, x[b:b + 1]))
    for blk in model.blocks:
        blk.compile(backend="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sin_loss(model, x).backward()  # an earlier step, before collecting
        model.zero_grad(set_to_none=True)
        col = GradientCollector(model, p=P, seed=SEED)
        try:
            with col:
                col.backward(sin_loss(model, x))
                got = col.collect()
        except RuntimeError as e:
            assert "compile" in str(e)
            return
    assert_rows(got, want)  # currently the four block modules are all zeros


def test_whole_model_compiled_before_attach_gives_a_clear_error():
    # DEFECT (unclear error): the same with the whole model compiled and called once before `with col:`. No hook
    # runs, and col.backward says "no hooked module ran forward with grad enabled since the last collect(); is the
    # collector attached (`with col:`)?" although it is attached. Correct: collect the rows, or say that the
    # compiled model ignores hooks added after it was compiled.
    torch._dynamo.reset()  # no compiled code from other tests (traced with hooks present) may serve this one
    model = MLP(seed=18)
    x = torch.randn(3, 4, 5)
    compiled = torch.compile(model, backend="eager")
    want = reference(model, ["fc1", "fc2"], 3, lambda b: sin_loss(model, x[b:b + 1]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sin_loss(compiled, x).backward()
        model.zero_grad(set_to_none=True)
        col = GradientCollector(model, p=P, seed=SEED)
        try:
            with col:
                col.backward(sin_loss(compiled, x))
                got = col.collect()
        except (RuntimeError, ValueError) as e:  # ValueError: the model hook's check of unseen weights (s39)
            assert "compile" in str(e), str(e)
            return
    assert_rows(got, want)


def test_seq2seq_per_example_grads_does_not_apply_the_encoder_mask_to_decoder_modules():
    # DEFECT: per_example_grads takes batch["attention_mask"] as THE padding mask of every hooked module. In an
    # encoder-decoder batch that is the ENCODER's mask; a decoder module's (B, T_dec) positions are other tokens.
    # When T_dec != T_enc the forward is refused (shape check), but with equal lengths (padding="max_length", the
    # common seq2seq setup) the encoder's padding pattern silently zeroes real decoder positions: every decoder
    # module's rows are wrong (30-100 % off here). Correct: the per-example gradients (this loss ignores padded
    # labels, so no mask is needed at all), or a refusal to apply one (B, T) mask to two different sequences.
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(19)
    cfg = T5Config(vocab_size=30, d_model=8, d_kv=4, d_ff=12, num_layers=1, num_decoder_layers=1, num_heads=2,
                   dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, tie_word_embeddings=False)
    model = T5ForConditionalGeneration(cfg).eval()
    B, T = 3, 6
    am = torch.ones(B, T, dtype=torch.long)
    am[1, 3:] = 0
    am[2, 2:] = 0
    ids = torch.randint(1, 30, (B, T)).masked_fill(am == 0, 0)
    labels = torch.randint(1, 30, (B, T))
    labels[0, 4:] = -100
    labels[2, 5:] = -100
    batch = dict(input_ids=ids, attention_mask=am, labels=labels)

    def losses(model, batch):
        logits = model(**batch).logits
        tok = F.cross_entropy(logits.reshape(-1, 30), batch["labels"].reshape(-1), ignore_index=-100,
                              reduction="none")
        return tok.view(logits.shape[0], -1).sum(1)

    col = GradientCollector(model, p=P, seed=SEED)
    # session 33: the encoder's mask is refused for an encoder-decoder (it names mask_key=None) ...
    with pytest.raises(ValueError, match="encoder-decoder.*mask_key=None"):
        next(col.per_example_grads([batch], losses))
    # ... and without it every module's rows are the per-example gradients (padded positions get none)
    got = next(col.per_example_grads([batch], losses, mask_key=None))
    # lm_head's weight is the shared embedding here (transformers ties it whatever the config says), so its
    # weight.grad holds the embedding's share too: left out of this reference
    assert model.lm_head.weight is model.shared.weight
    names = [n for n in col.module_dims if n != "lm_head"]
    want = reference(model, names, B, lambda b: losses(model, {k: v[b:b + 1] for k, v in batch.items()}).sum())
    assert_rows(got, want, rtol=1e-4)


def test_sequence_first_inputs_are_not_silently_taken_as_the_batch():
    # DEFECT: nn.TransformerEncoderLayer(batch_first=False) feeds its Linears (T, B, I). The collector takes the
    # first axis as the batch and returns T = 5 "examples" for enc.linear1 / enc.linear2 next to B = 3 for the
    # batch-first head, in one collect() and with no error or warning (only flatten() notices; with T == B not
    # even that). Correct: rows per example, or an error when the modules of one batch disagree on its size.
    # Session 39: torch's layers built batch_first=False (and transformers' XLNet, FSMT, Longformer / LED
    # self-attention) are read with the batch on their input's second axis: per-example rows, T == B included.
    torch.manual_seed(20)
    enc = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=12, dropout=0.0, batch_first=False)
    model = nn.ModuleDict(dict(enc=enc, head=nn.Linear(8, 2)))

    def loss(x):  # x: (T, B, 8)
        return model["head"](enc(x).mean(0)).sin().sum()

    for T, B in ((5, 3), (4, 4)):
        x = torch.randn(T, B, 8)
        col = GradientCollector(model, p=P, seed=SEED)
        want = reference(model, list(col.module_dims), B, lambda b: loss(x[:, b:b + 1]))
        with col:
            col.backward(loss(x))
            assert_rows(col.collect(), want)
            mask = torch.ones(B, T, dtype=torch.bool)  # a (B, T) mask reads as for a batch-first module
            mask[0, -1] = False
            col.set_mask(mask)
            col.backward(loss(x))
            got = col.collect()
        assert got["enc.linear1"].shape == (B, P * P) and not torch.equal(got["enc.linear1"], want["enc.linear1"].float())

    # a hand-written sequence-first block (nothing marks it): the batch-size check refuses the batch
    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)

        def forward(self, x):  # (T, B, 8)
            return self.proj(x).tanh()

    model = nn.ModuleDict(dict(enc=SeqFirst(), head=nn.Linear(8, 2)))

    def loss2(x):
        return model["head"](model["enc"](x).mean(0)).sin().sum()

    T, B = 5, 3
    x = torch.randn(T, B, 8)
    col = GradientCollector(model, p=P, seed=SEED)
    want = reference(model, list(col.module_dims), B, lambda b: loss2(x[:, b:b + 1]))
    collected_or_refused(col, lambda: loss2(x), want, r"first axis of every hooked module's input must be the batch")


@pytest.mark.parametrize("batch_first", [False, True])
def test_torch_transformer_layers_give_per_example_rows_either_way(batch_first):
    torch.manual_seed(21)
    kw = dict(dropout=0.0, batch_first=batch_first)
    T, B = 4, 4  # T == B: nothing in the shapes tells the axes apart

    class Enc(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 12, **kw), 2)

        def forward(self, x):
            return self.enc(x)

    class Full(nn.Module):
        def __init__(self):
            super().__init__()
            self.t = nn.Transformer(8, 2, 1, 1, 12, **kw)

        def forward(self, x):
            return self.t(x, x.flip(1 if batch_first else 0))

    for model in (Enc(), Full()):
        x = torch.randn((B, T, 8) if batch_first else (T, B, 8))

        def one(b):
            return model(x[b:b + 1] if batch_first else x[:, b:b + 1]).pow(2).sum()

        col = GradientCollector(model, p=P, seed=SEED)
        assert bool(col._seq_first) != batch_first
        want = reference(model, list(col.module_dims), B, one)
        with col:
            col.backward(model(x).pow(2).sum())
            assert_rows(col.collect(), want)


def test_bool_mask_edited_in_place_after_the_forward_pass():
    # DEFECT: set_mask keeps a bool mask by reference (an integer mask is converted, i.e. copied), and the hooks
    # read it only when the gradients arrive. Editing that tensor between forward and backward (a loader that
    # refills its pinned buffer for the next batch, or `mask[:, 0] = False` to build the next loss mask) changes
    # which tokens count for the batch already run: here token 0 of every example is silently dropped. The same
    # with an int64 mask is correct. Correct: the mask the forward pass ran under (copy it in set_mask).
    torch.manual_seed(21)
    model = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 10))
    ids = torch.randint(0, 10, (3, 5))

    def losses(ids, mask):
        return (model(ids).log_softmax(-1)[..., 0] * mask).sum(1)

    for dtype in (torch.long, torch.bool):
        mask = torch.ones(3, 5, dtype=dtype)
        mask[2, 3:] = 0
        used = mask.clone()
        col = GradientCollector(model, p=P, seed=SEED)
        with col:
            col.set_mask(mask)
            loss = losses(ids, used).sum()
            mask[:, 0] = 0  # the caller's buffer changes after the forward pass
            col.backward(loss)
            got = col.collect()
        want = reference(model, ["1", "3"], 3, lambda b: losses(ids[b:b + 1], used[b:b + 1]).sum())
        assert_rows(got, want)  # passes for int64, fails for bool


def test_collect_after_a_failed_forward_says_the_batch_was_dropped():
    # session 33: a forward that raises drops the batch's pending calls (earlier forwards of the batch included);
    # collect() then says so instead of "no hooked module ran forward".
    model = FailsMidForward(seed=10)
    x = torch.randn(4, 6, 5)
    col = GradientCollector(model, p=P, seed=SEED)
    with col:
        loss = model(x).sin().sum()
        with pytest.raises(MemoryError):
            model(x, fail=True)
        loss.backward()
        with pytest.raises(RuntimeError, match="forward raised an exception, which dropped the batch"):
            col.collect()
        col.backward(model(x).sin().sum())  # the batch run again is collected
        assert set(col.collect()) == {"fc1", "fc2"}


def test_collector_bool_flags_are_validated():
    # session 33: bias / per_token went through bool(), so bias="False" hooked the bias column (factored_project's
    # twin check, gradkit.ops._flag, refuses it by name)
    model = MLP(seed=3)
    for nm in ("bias", "per_token"):
        with pytest.raises(TypeError, match=f"{nm}: expected a bool, got str 'False'"):
            GradientCollector(model, p=P, **{nm: "False"})
    import numpy as np
    assert GradientCollector(model, p=P, bias=np.bool_(True)).bias is True
