"""GradientCollector: projected per-example gradients from one backward pass equal L G_b R^T of the
per-example gradients that autograd gives when each example is run ALONE (unpadded), for nn.Linear
and Hugging Face Conv1D, with bias column, per token, padding masks, shared modules; hooks come off;
the config is JSON-able; bad input is refused."""
import functools
import json
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gradkit.projection import (AdafactorNormalizer, AdamNormalizer, GradientCollector, derive_seed,
                                factored_project, projection_matrix)
from gradkit.testing import random_batches, tiny_gpt

ATOL, RTOL = 2e-5, 2e-4  # fp32 collector vs fp64 reference on O(1) gradients


# ----------------------------------------------------------------------------- references
def lgr(G, name, p, seed, kind):
    """L G R^T (fp64) with the contract's matrices: L = M(p, O, seed(name, left)), R = M(p, I', right)."""
    L = projection_matrix(p, G.shape[0], seed=derive_seed(seed, name, "left"), kind=kind).double()
    R = projection_matrix(p, G.shape[1], seed=derive_seed(seed, name, "right"), kind=kind).double()
    return (L @ G.double() @ R.T).reshape(-1)


def weight_grad(mod, with_bias):
    """(O, I[+1]) gradient in nn.Linear layout (HF Conv1D stores W as (I, O))."""
    gw = mod.weight.grad
    if type(mod).__name__ == "Conv1D":
        gw = gw.T
    if with_bias:
        gw = torch.cat([gw, mod.bias.grad[:, None]], dim=1)
    return gw.detach().clone()


def lm_losses(model, ids, mask):
    """Per-example next-token cross-entropy summed over real target positions -> (B,)."""
    logits = model(ids, mask)
    tgt = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    tok = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                          ignore_index=-100, reduction="none")
    return tok.view(ids.shape[0], -1).sum(1)


def explicit_per_example(model, names, batch, p, seed, kind, bias, loss_fn=lm_losses):
    """{name: (B, p*p)} from autograd on each example alone, truncated to its real length."""
    mods = dict(model.named_modules())
    ids, mask = batch["input_ids"], batch["attention_mask"]
    out = {n: [] for n in names}
    for b in range(ids.shape[0]):
        n_real = int(mask[b].sum())
        model.zero_grad(set_to_none=False)
        loss_fn(model, ids[b:b + 1, :n_real], mask[b:b + 1, :n_real]).sum().backward()
        for n in names:
            wb = bias and mods[n].bias is not None
            out[n].append(lgr(weight_grad(mods[n], wb), n, p, seed, kind))
    model.zero_grad(set_to_none=True)
    return {n: torch.stack(v) for n, v in out.items()}


def assert_close(got, want):
    torch.testing.assert_close(got.double(), want.double(), atol=ATOL, rtol=RTOL)


# ----------------------------------------------------------------------------- tiny models
class ConvGPT(nn.Module):
    """Two GPT-2 ``Conv1D`` layers (weight (in, out), y = x @ W + b), a causal token mix and a Linear head."""

    def __init__(self, vocab=31, d=12, seed=0):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        g = torch.Generator().manual_seed(seed)
        self.wte = nn.Embedding(vocab, d)
        self.c_fc = Conv1D(3 * d, d)
        self.c_proj = Conv1D(d, 3 * d)
        self.head = nn.Linear(d, vocab)
        with torch.no_grad():
            for prm in self.parameters():
                prm.copy_(torch.randn(prm.shape, generator=g) * 0.3)

    def forward(self, ids, mask=None):
        x = self.wte(ids)
        x = x + torch.cumsum(x, dim=1) / torch.arange(1, ids.shape[1] + 1)[None, :, None]  # causal
        x = x + self.c_proj(torch.tanh(self.c_fc(x)))
        return self.head(x)


class SharedMLP(nn.Module):
    """The same Linear applied twice (weight sharing): its gradient sums both calls."""

    def __init__(self, vocab=23, d=8, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.wte = nn.Embedding(vocab, d)
        self.fc = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab)
        with torch.no_grad():
            for prm in self.parameters():
                prm.copy_(torch.randn(prm.shape, generator=g) * 0.5)

    def forward(self, ids, mask=None):
        x = self.wte(ids)
        x = x + torch.tanh(self.fc(x))
        x = x + torch.tanh(self.fc(x))
        return self.head(x)


def run_collector(col, model, batch, loss_fn=lm_losses, use_col_backward=True):
    with col:
        col.set_mask(batch["attention_mask"])
        losses = loss_fn(model, batch["input_ids"], batch["attention_mask"])
        if use_col_backward:
            col.backward(losses.sum())
        else:
            losses.sum().backward()
        return col.collect()


# ----------------------------------------------------------------------------- value tests
@pytest.mark.parametrize("bias,kind,modules", [
    (False, "rademacher", None),
    (True, "gaussian", ["transformer.h.1.*", "lm_head"]),
])
def test_tiny_gpt_matches_per_example_autograd(bias, kind, modules):
    model = tiny_gpt(n_layer=2, d_model=16, n_head=2, vocab=41, seed=1)
    batch = random_batches(1, batch=4, seq=10, vocab=41, seed=2)[0]
    assert (batch["attention_mask"] == 0).any()  # some rows are padded
    col = GradientCollector(model, modules=modules, p=4, seed=7, kind=kind, bias=bias)
    names = list(col.module_dims)
    if modules is None:
        assert len(names) == 2 * 4 + 1 and names[-1] == "lm_head"
    else:
        assert names == ["transformer.h.1.attn.c_attn", "transformer.h.1.attn.c_proj",
                         "transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj", "lm_head"]
    got = run_collector(col, model, batch)
    assert list(got) == names
    want = explicit_per_example(model, names, batch, 4, 7, kind, bias)
    for n in names:
        assert got[n].shape == (4, 16) and got[n].dtype == torch.float32
        assert_close(got[n], want[n])
    assert all(prm.grad is None for prm in model.parameters())  # col.backward leaves .grad alone


def test_hf_conv1d_matches_per_example_autograd():
    model = ConvGPT(seed=3)
    batch = random_batches(1, batch=3, seq=9, vocab=31, seed=4)[0]
    col = GradientCollector(model, p=3, seed=11, bias=True)
    assert list(col.module_dims) == ["c_fc", "c_proj", "head"]
    assert col.module_shapes["c_fc"] == (36, 12) and col.module_shapes["c_proj"] == (12, 36)
    got = run_collector(col, model, batch, use_col_backward=False)  # plain loss.backward() path
    want = explicit_per_example(model, list(col.module_dims), batch, 3, 11, "rademacher", True)
    for n in col.module_dims:
        assert_close(got[n], want[n])


def test_shared_module_sums_both_calls():
    model = SharedMLP(seed=5)
    batch = random_batches(1, batch=3, seq=8, vocab=23, seed=6)[0]
    col = GradientCollector(model, modules="fc", p=5, seed=2, bias=True)
    got = run_collector(col, model, batch)
    want = explicit_per_example(model, ["fc"], batch, 5, 2, "rademacher", True)
    assert_close(got["fc"], want["fc"])


def _capture(model, names, batch, loss_fn):
    """Inputs a (B,T,I) and output gradients g (B,T,O) of each named module, by separate hooks."""
    mods = dict(model.named_modules())
    store, handles = {}, []
    for n in names:
        def fwd(mod, args, out, n=n):
            store[n] = [args[0].detach()]
            out.register_hook(lambda g, n=n: store[n].append(g.detach()))
        handles.append(mods[n].register_forward_hook(fwd))
    loss_fn(model, batch["input_ids"], batch["attention_mask"]).sum().backward()
    for h in handles:
        h.remove()
    model.zero_grad(set_to_none=True)
    return store


def all_positions_loss(model, ids, mask):
    """A loss that also reads the padded positions (whose outputs are garbage) -> (B,)."""
    logits = model(ids, mask)
    return (logits.tanh() * torch.linspace(-1, 1, logits.shape[-1])).sum((1, 2))


@pytest.mark.parametrize("bias", [False, True])
def test_per_token_and_mask(bias):
    model = tiny_gpt(n_layer=1, d_model=16, n_head=2, vocab=29, seed=4)
    batch = random_batches(1, batch=3, seq=8, vocab=29, seed=5)[0]
    mask = batch["attention_mask"]
    p, seed = 3, 9
    names = ["transformer.h.0.mlp.c_fc", "lm_head"]
    col = GradientCollector(model, modules=names, p=p, seed=seed, bias=bias, per_token=True)
    got = run_collector(col, model, batch, loss_fn=all_positions_loss)
    cap = _capture(model, names, batch, all_positions_loss)
    mods = dict(model.named_modules())
    for n in names:
        a, g = cap[n]
        assert got[n].shape == (3, 8, p * p)
        # padded positions do carry gradient here, so the mask is what zeroes them
        assert g[mask == 0].abs().sum() > 0
        wb = bias and mods[n].bias is not None
        for b in range(3):
            for t in range(8):
                at = torch.cat([a[b, t], a.new_ones(1)]) if wb else a[b, t]
                want = lgr(torch.outer(g[b, t], at), n, p, seed, "rademacher") * float(mask[b, t])
                assert_close(got[n][b, t], want)
    # per-example collection with the mask = sum of the masked per-token rows; without it, differs
    col_ex = GradientCollector(model, modules=names, p=p, seed=seed, bias=bias)
    ex = run_collector(col_ex, model, batch, loss_fn=all_positions_loss)
    with col_ex:
        all_positions_loss(model, batch["input_ids"], mask).sum().backward()
        unmasked = col_ex.collect()
    model.zero_grad(set_to_none=True)
    for n in names:
        assert_close(ex[n], got[n].sum(1))
        assert (unmasked[n] - ex[n]).abs().max() > 1e-3


def test_padding_does_not_change_per_example_grads():
    """Same examples, padded to a longer T: identical vectors (the loss ignores padding)."""
    model = tiny_gpt(n_layer=2, d_model=16, n_head=2, vocab=41, seed=8)
    batch = random_batches(1, batch=3, seq=10, vocab=41, seed=9)[0]
    longer = {k: F.pad(v, (0, 5)) for k, v in batch.items()}
    col = GradientCollector(model, p=4)
    a = run_collector(col, model, batch)
    b = run_collector(col, model, longer)
    for n in a:
        assert_close(b[n], a[n])


@settings(max_examples=12)
@given(data=st.data())
def test_random_mlp_matches_reference(data):
    """Hypothesis over shapes / p / seed / bias / per_token / mask on a 2-layer MLP over tokens."""
    B = data.draw(st.integers(1, 3), "B")
    T = data.draw(st.integers(1, 5), "T")
    I = data.draw(st.integers(1, 7), "I")
    H = data.draw(st.integers(1, 6), "H")
    p = data.draw(st.integers(1, 5), "p")
    seed = data.draw(st.integers(0, 2**31), "seed")
    bias = data.draw(st.booleans(), "bias")
    per_token = data.draw(st.booleans(), "per_token")
    use_mask = data.draw(st.booleans(), "mask")
    g = torch.Generator().manual_seed(seed % 1000)
    model = nn.Sequential(nn.Linear(I, H), nn.Tanh(), nn.Linear(H, 2, bias=False))
    x = torch.randn(B, T, I, generator=g)
    w = torch.randn(B, T, 2, generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.3) if use_mask else None
    col = GradientCollector(model, p=p, seed=seed, bias=bias, per_token=per_token)
    with col:
        col.set_mask(mask)
        (model(x) * w).sum().backward()
        got = col.collect()
    for n, mod in (("0", model[0]), ("2", model[2])):
        a = x if n == "0" else torch.tanh(model[0](x)).detach()
        gout = w if n == "2" else ((w @ model[2].weight) * (1 - torch.tanh(model[0](x)) ** 2)).detach()
        if bias and mod.bias is not None:
            a = torch.cat([a, a.new_ones(B, T, 1)], -1)
        m = mask.double() if mask is not None else torch.ones(B, T, dtype=torch.float64)
        Gt = torch.einsum("bto,bti,bt->btoi", gout.double(), a.double(), m)
        if per_token:
            want = torch.stack([torch.stack([lgr(Gt[b, t], n, p, seed, "rademacher") for t in range(T)])
                                for b in range(B)])
        else:
            want = torch.stack([lgr(Gt[b].sum(0), n, p, seed, "rademacher") for b in range(B)])
        assert got[n].shape == want.shape
        assert_close(got[n], want)  # fp32 vs fp64 reference: measured 3.7e-7 (was atol=rtol=1e-4)
    model.zero_grad()


@pytest.mark.parametrize("which", ["adafactor", "adam"])
def test_normalizers_match_normalized_per_example_grads(which):
    """A module's normalizer is applied to its per-example gradient (weight and bias column) before
    the projection; modules without one are untouched."""
    g = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    x = torch.randn(4, 3, 5, generator=g)
    w = torch.randn(4, 3, 3, generator=g)
    O, I = 6, 5
    bsq = torch.rand(O, generator=g) + 0.1
    if which == "adafactor":
        nz = AdafactorNormalizer(row=torch.rand(O, generator=g) + 0.1, col=torch.rand(I, generator=g) + 0.1,
                                 bias_avg_sq=bsq)
        rf, cf = nz.factors()
        norm_w = lambda G: rf[:, None] * G * cf[None, :]  # noqa: E731
        norm_b = lambda b: b * nz.bias_factor()  # noqa: E731
    else:
        nz = AdamNormalizer(v=torch.rand(O, I, generator=g) + 0.1, bias_avg_sq=bsq)
        norm_w = lambda G: G / (nz.v.sqrt() + nz.eps)  # noqa: E731
        norm_b = lambda b: b / (bsq.sqrt() + nz.eps)  # noqa: E731
    col = GradientCollector(model, p=3, seed=4, bias=True, normalizers={"0": nz})
    assert col.projection_config["normalizers"] == {"0": type(nz).__name__}
    with col:
        (model(x) * w).sum().backward()
        got = col.collect()
    for b in range(4):
        model.zero_grad()
        (model(x[b:b + 1]) * w[b:b + 1]).sum().backward()
        G0 = torch.cat([norm_w(model[0].weight.grad), norm_b(model[0].bias.grad)[:, None]], 1)
        assert_close(got["0"][b], lgr(G0, "0", 3, 4, "rademacher"))
        assert_close(got["2"][b], lgr(weight_grad(model[2], True), "2", 3, 4, "rademacher"))


def test_memory_budget_reaches_the_adam_path(monkeypatch):
    """memory_budget is passed to factored_project for every module (the Adam path forms G in blocks within
    it: the largest bmm output stays within the budget, the values stay those of an unbounded budget), and a
    budget too small for one entry, or not a positive int, is refused at construction naming memory_budget."""
    g = torch.Generator().manual_seed(8)
    model = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 3))
    x = torch.randn(3, 4, 12, generator=g)
    w = torch.randn(3, 4, 3, generator=g)
    nz = AdamNormalizer(v=torch.rand(10, 12, generator=g) + 0.1)
    out, largest = {}, {}
    real_bmm = torch.bmm
    for budget in (256 << 20, 200):
        sizes = []

        def bmm(*args, **kw):
            r = real_bmm(*args, **kw)
            sizes.append(r.numel() * r.element_size())
            return r

        monkeypatch.setattr(torch, "bmm", bmm)
        col = GradientCollector(model, p=3, seed=2, bias=True, normalizers={"0": nz}, memory_budget=budget)
        assert col.memory_budget == budget
        with col:
            (model(x) * w).sum().backward()
            out[budget] = col.collect()
        monkeypatch.setattr(torch, "bmm", real_bmm)
        largest[budget] = max(sizes)
    assert largest[200] <= 200 < largest[256 << 20]  # the small budget did bind the G blocks
    for n in out[200]:
        torch.testing.assert_close(out[200][n], out[256 << 20][n], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"^memory_budget: 8 bytes cannot hold one entry"):
        GradientCollector(model, p=3, normalizers={"0": nz}, memory_budget=8)
    GradientCollector(model, p=3, memory_budget=8)  # no Adam module: nothing is formed, any budget works
    for bad in (0, -1, 1.5, True, "1"):
        with pytest.raises(ValueError, match=r"^memory_budget: expected a positive int \(bytes\), got "):
            GradientCollector(model, p=3, memory_budget=bad)


class _InPlaceAfter(nn.Module):
    """a -> b; after b's forward its input is scaled in place (an op plain autograd refuses at backward)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 6)
        self.b = nn.Linear(6, 3)

    def forward(self, x):
        h = self.a(x) + 1.0
        y = self.b(h)
        h.mul_(3.0)
        return y


@pytest.mark.parametrize("how", ["col", "loss"])
def test_input_modified_in_place_after_forward_is_refused(how):
    """An in-place change to a hooked module's input after its forward makes that module's gradient
    uncomputable from the saved input. Autograd refuses it in the weight-gradient node, which
    col.backward() never runs: the collector's hook refuses it too (naming the module), drops the batch,
    and the next batch (no in-place op) collects the explicit per-example gradients."""
    torch.manual_seed(0)
    model = _InPlaceAfter()
    x = torch.randn(4, 2, 5)
    col = GradientCollector(model, modules=["b"], p=3, seed=1)
    with col:
        y = model(x)
        with pytest.raises(RuntimeError, match=r"(input of module 'b' was modified by an in-place|inplace)"):
            if how == "col":
                col.backward(y.sum())
            else:
                y.sum().backward()
        assert not col._grads and not col._edges
        h = model.a(x) + 1.0
        model.b(h).sum().backward()
        got = col.collect()["b"]
    for i in range(4):
        model.zero_grad()
        model.b(model.a(x[i:i + 1]) + 1.0).sum().backward()
        assert_close(got[i], lgr(weight_grad(model.b, False), "b", 3, 1, "rademacher"))


def test_scale_batch_undoes_a_batch_mean_loss_for_every_batch_size():
    """scale='batch' multiplies each batch by its own size: with a batch-mean loss and a shorter last batch,
    every row equals the summed-loss rows; a fixed scale=B warns once that batch sizes differ (and is
    indeed wrong for the short batch); bad scales are refused naming scale."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    X = torch.randn(7, 4)
    batches = [X[0:3], X[3:6], X[6:7]]
    col = GradientCollector(model, p=2, seed=3)
    summed = torch.cat(list(col.per_example_grads(batches, lambda m, b: m(b).pow(2).sum(1), flat=True)))
    mean = lambda m, b: m(b).pow(2).sum(1).mean()  # noqa: E731
    rows = torch.cat(list(col.per_example_grads(batches, mean, flat=True, scale="batch")))
    torch.testing.assert_close(rows, summed, rtol=1e-5, atol=1e-6)
    with pytest.warns(UserWarning, match=r"scale=3 multiplies every batch alike, but batch sizes differ \(\[1, 3\]\)"):
        fixed = torch.cat(list(col.per_example_grads(batches, mean, flat=True, scale=3)))
    torch.testing.assert_close(fixed[:6], summed[:6], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fixed[6], 3 * summed[6], rtol=1e-5, atol=1e-6)  # what the warning is about
    with col:
        model(X[:2]).sum().backward()
        one = col.collect(scale="batch")
    with col:
        model(X[:2]).sum().backward()
        torch.testing.assert_close(col.collect(scale=2.0)["0"], one["0"])
    for bad in ("mean", float("nan"), True, [2]):
        with pytest.raises(ValueError, match=r"^scale: expected a finite number, 'batch' or None, got "):
            col.collect(scale=bad)
        with pytest.raises(ValueError, match=r"^scale: expected a finite number, 'batch' or None, got "):
            next(col.per_example_grads(batches, mean, scale=bad))


def test_multihead_attention_out_proj_is_not_hooked():
    """nn.MultiheadAttention passes out_proj's weight to the functional attention and never calls out_proj:
    a hook would see nothing and its rows would be zeros. The default selection leaves it out, a wildcard
    leaves it out, an exact name or a callable selecting it is refused naming it; the other Linears still
    give the explicit per-example gradients."""
    torch.manual_seed(2)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    col = GradientCollector(layer, p=2, seed=0)
    assert list(col.module_dims) == ["linear1", "linear2"]
    assert list(GradientCollector(layer, modules=["*"], p=2).module_dims) == ["linear1", "linear2"]
    with pytest.raises(ValueError, match=r"^modules: \['self_attn\.out_proj'\] never run their forward "
                                         r"\(nn\.MultiheadAttention uses its weight without calling it\)"):
        GradientCollector(layer, modules=["self_attn.out_proj", "linear1"], p=2)
    with pytest.raises(ValueError, match=r"^modules: \['self_attn\.out_proj'\] never run"):
        GradientCollector(layer, modules=lambda n, m: isinstance(m, nn.Linear), p=2)
    with pytest.raises(ValueError, match=r"^modules: patterns \['self_attn\.\*'\] match no nn\.Linear / Conv1D "
                                         r"module that can be collected \(\['self_attn\.out_proj'\] never run their forward"):
        GradientCollector(layer, modules=["self_attn.*"], p=2)
    x = torch.randn(3, 4, 8)
    with col:
        layer(x).pow(2).sum().backward()
        got = col.collect()
    for i in range(3):
        layer.zero_grad()
        layer(x[i:i + 1]).pow(2).sum().backward()
        for n in ("linear1", "linear2"):
            assert_close(got[n][i], lgr(weight_grad(getattr(layer, n), False), n, 2, 0, "rademacher"))


# ----------------------------------------------------------------------------- API behaviour
def test_col_backward_equals_loss_backward_and_collects_from_factored_project():
    model = tiny_gpt(n_layer=1, d_model=16, n_head=2, vocab=29, seed=2)
    batch = random_batches(1, batch=2, seq=6, vocab=29, seed=3)[0]
    col = GradientCollector(model, p=4, seed=5)
    a = run_collector(col, model, batch, use_col_backward=True)
    assert all(prm.grad is None for prm in model.parameters())
    b = run_collector(col, model, batch, use_col_backward=False)
    assert all(prm.grad is not None for prm in model.parameters())
    for n in a:
        torch.testing.assert_close(a[n], b[n])
    # the hook path is exactly factored_project on the module's (input, output grad)
    cap = _capture(model, ["lm_head"], batch, lm_losses)
    fa, fg = cap["lm_head"]
    direct = factored_project(fa, fg, 4, seed=5, name="lm_head", mask=batch["attention_mask"] != 0)
    torch.testing.assert_close(a["lm_head"], direct)


def test_per_example_grads_flat_scale_and_mean_loss():
    model = tiny_gpt(n_layer=1, d_model=16, n_head=2, vocab=29, seed=2)
    batches = random_batches(2, batch=3, seq=6, vocab=29, seed=3)
    col = GradientCollector(model, modules="transformer.h.0.mlp.*", p=2)
    summed = list(col.per_example_grads(batches, lambda m, bt: lm_losses(m, bt["input_ids"], bt["attention_mask"])))
    assert not col.attached and all(len(list(m._forward_hooks.values())) == 0 for m in model.modules())
    mean = list(col.per_example_grads(
        batches, lambda m, bt: lm_losses(m, bt["input_ids"], bt["attention_mask"]).mean(), flat=True, scale=3))
    assert len(summed) == len(mean) == 2
    for s, m in zip(summed, mean):
        assert m.shape == (3, col.dim) == (3, 8)
        torch.testing.assert_close(m, col.flatten(s), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(col.split(m)["transformer.h.0.mlp.c_fc"], s["transformer.h.0.mlp.c_fc"],
                                   atol=1e-6, rtol=1e-5)
    manual = run_collector(col, model, batches[0])
    for n in manual:
        torch.testing.assert_close(manual[n], summed[0][n])


def test_hooks_removed_and_state_dropped():
    model = tiny_gpt(n_layer=1, d_model=16, n_head=2, vocab=29)
    batch = random_batches(1, batch=2, seq=6, vocab=29)[0]
    hooked = [m for m in model.modules() if isinstance(m, nn.Linear)]
    col = GradientCollector(model, p=2)
    with col:
        assert col.attached and all(len(m._forward_hooks) == 1 for m in hooked)
        loss = lm_losses(model, batch["input_ids"], batch["attention_mask"]).sum()
        assert len(col._edges) == len(hooked)  # one pending output per hooked call
        loss.backward()
        assert not col._edges  # every pending call got its gradient and let go of its input
    assert not col.attached and all(len(m._forward_hooks) == 0 for m in hooked)
    with pytest.raises(RuntimeError, match=r"^GradientCollector\.collect: no gradients were collected; the "
                       r"collector was detached .*call collect\(\) inside it$"):
        col.collect()  # exit dropped the batch, and the error says so
    with pytest.raises(RuntimeError, match=r"^GradientCollector\.collect: no gradients were collected; no "
                       r"hooked module ran forward while the collector was attached"):
        col.collect()  # the previous collect() reported the drop and forgot it
    with pytest.raises(ZeroDivisionError):
        with col:
            1 / 0
    assert all(len(m._forward_hooks) == 0 for m in hooked)
    # a graph built while attached, backpropagated after exit, does not leak into the next batch
    with col:
        loss = lm_losses(model, batch["input_ids"], batch["attention_mask"]).sum()
    loss.backward()
    with col:
        with pytest.raises(RuntimeError, match=r"^GradientCollector\.collect: no gradients were collected; no "
                           r"hooked module ran forward while the collector was attached"):
            col.collect()
    # no_grad forwards are ignored, and collect() names grad being disabled as the reason
    with col:
        with torch.no_grad():
            model(batch["input_ids"])
        assert not col._edges
        with pytest.raises(RuntimeError, match=r"^GradientCollector\.collect: no gradients were collected; "
                           rf"hooked modules ran forward {len(hooked)} time\(s\) with grad disabled"):
            col.collect()
        loss = lm_losses(model, batch["input_ids"], batch["attention_mask"]).sum()
        with torch.no_grad():
            model(batch["input_ids"])  # a no_grad forward beside a real batch changes nothing
        loss.backward()
        assert col.collect()["lm_head"].abs().sum() > 0


def test_missing_module_gradients():
    model = tiny_gpt(n_layer=1, d_model=16, n_head=2, vocab=29)
    batch = random_batches(1, batch=2, seq=6, vocab=29)[0]
    col = GradientCollector(model, modules=["transformer.h.0.attn.*", "lm_head"], p=2)
    hidden = {}
    h = model.transformer.ln_f.register_forward_hook(lambda m, a, o: hidden.setdefault("x", o))
    try:
        with col:
            model(batch["input_ids"])
            hidden["x"].pow(2).sum().backward()  # lm_head ran but is not on the loss path
            got = col.collect()
            assert torch.equal(got["lm_head"], torch.zeros(2, 4))
            assert got["transformer.h.0.attn.c_attn"].abs().sum() > 0
            hidden.clear()
            model(batch["input_ids"])
            hidden["x"].pow(2).sum().backward()
            with pytest.raises(RuntimeError, match=r"^GradientCollector\.collect: no gradient reached "
                               r"modules \['lm_head'\]$"):
                col.collect(missing="error")
    finally:
        h.remove()


def test_projection_config_is_json_and_complete():
    model = tiny_gpt(n_layer=1, d_model=16, n_head=2, vocab=29)
    col = GradientCollector(model, modules=["transformer.h.0.mlp.*", "lm_head"], p=8, seed=3,
                            kind="gaussian", bias=True, per_token=True)
    cfg = col.projection_config
    assert json.loads(json.dumps(cfg)) == cfg
    assert cfg["p"] == 8 and cfg["seed"] == 3 and cfg["kind"] == "gaussian"
    assert cfg["bias"] is True and cfg["per_token"] is True and isinstance(cfg["version"], int)
    assert list(cfg["modules"]) == ["transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj", "lm_head"]
    assert all(v == 64 for v in cfg["modules"].values()) and col.dim == 192
    assert cfg["shapes"]["transformer.h.0.mlp.c_fc"] == [64, 16]
    assert cfg["bias_modules"] == ["transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]  # lm_head has none
    assert list(col.module_dims.items()) == list(cfg["modules"].items())
    other = GradientCollector(model, modules=["transformer.h.0.mlp.*", "lm_head"], p=8, seed=4,
                              kind="gaussian", bias=True, per_token=True)
    assert other.projection_config != cfg


def test_output_dtype():
    model = nn.Sequential(nn.Linear(4, 3))
    x = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(0))
    col = GradientCollector(model, p=2, dtype=torch.float16)
    with col:
        model(x).sum().backward()
        got = col.collect()
    assert got["0"].dtype == torch.float16 and got["0"].shape == (2, 4)
    with GradientCollector(model, p=2) as col32:  # the float32 rows, rounded once to float16
        model(x).sum().backward()
        want = col32.collect()["0"]
    assert want.dtype == torch.float32 and torch.equal(got["0"], want.half())
    col2 = GradientCollector(model, p=2)
    x2 = torch.randn(2, 4, generator=torch.Generator().manual_seed(1))
    with col2:  # a (B, I) input without a token axis is one token per example; a mask does not apply
        col2.set_mask(torch.zeros(2, 7))
        model(x2).sum().backward()
        got2 = col2.collect()["0"]
    assert got2.shape == (2, 4)
    for b in range(2):  # d/dW of sum(W x_b + bias) = ones(3) x_b^T
        assert_close(got2[b], lgr(torch.outer(torch.ones(3), x2[b]), "0", 2, 0, "rademacher"))


def test_bad_input():
    model = tiny_gpt(n_layer=1, d_model=16, n_head=2, vocab=29)
    for bad in (0, -1, 1.5, True, None):
        with pytest.raises(ValueError, match=rf"^p: expected a positive int, got {re.escape(repr(bad))}$"):
            GradientCollector(model, p=bad)
    with pytest.raises(ValueError, match=r"^kind: expected 'rademacher' or 'gaussian', got 'sparse'$"):
        GradientCollector(model, kind="sparse")
    with pytest.raises(ValueError, match=r"^seed: expected a non-negative int, got -3$"):
        GradientCollector(model, seed=-3)
    with pytest.raises(TypeError, match=r"^dtype: expected a floating torch\.dtype, got torch\.int32$"):
        GradientCollector(model, dtype=torch.int32)
    with pytest.raises(TypeError, match=r"^model: expected an nn\.Module, got str$"):
        GradientCollector("gpt2")
    with pytest.raises(ValueError, match=r"^modules: pattern 'transformer\.h\.9\.\*' matches no module"):
        GradientCollector(model, modules=["transformer.h.0.mlp.*", "transformer.h.9.*"])
    with pytest.raises(TypeError, match=r"^modules: 'transformer\.ln_f' is a LayerNorm; only nn\.Linear"):
        GradientCollector(model, modules="transformer.ln_f")
    with pytest.raises(TypeError, match=r"^modules: selected module 'transformer\.wte' is a Embedding; only"):
        GradientCollector(model, modules=lambda n, m: n.endswith("wte") or isinstance(m, nn.Linear))
    with pytest.raises(ValueError, match=r"^modules: the model has no nn\.Linear or transformers Conv1D module"):
        GradientCollector(nn.Sequential(nn.LayerNorm(3), nn.ReLU()))
    with pytest.raises(ValueError, match=r"^modules: patterns \['transformer\.h\.0\.ln_\*'\] match no "
                       r"nn\.Linear / Conv1D module$"):
        GradientCollector(model, modules="transformer.h.0.ln_*")
    with pytest.raises(ValueError, match=r"^normalizers: names \['transformer\.h\.0\.mlp\.c_fc'\] are not "
                       r"among the hooked modules \['lm_head'\]$"):
        GradientCollector(model, modules="lm_head", normalizers={"transformer.h.0.mlp.c_fc": object()})
    col = GradientCollector(model, p=2)
    batch = random_batches(1, batch=2, seq=6, vocab=29)[0]
    with pytest.raises(ValueError, match=r"^mask: expected a \(B, T\) tensor, got \(6,\)$"):
        col.set_mask(torch.ones(6))
    with pytest.raises(ValueError, match=r"^mask: expected 0/1 values$"):
        col.set_mask(torch.full((2, 6), 0.5))
    with pytest.raises(ValueError, match=r"^missing: expected 'zeros' or 'error', got 'ignore'$"):
        col.collect(missing="ignore")
    with col:
        with pytest.raises(RuntimeError, match=r"^GradientCollector\.backward: no hooked module ran forward"):
            col.backward(torch.ones((), requires_grad=True))
        with pytest.raises(RuntimeError, match=r"^GradientCollector\.collect: no gradients were collected; "
                           r"run loss\.backward\(\) or col\.backward\(loss\) after the forward pass$"):
            model(batch["input_ids"])
            col.collect()
        col.set_mask(torch.ones(2, 5))  # wrong T: the forward pass refuses it, before anything is kept
        with pytest.raises(ValueError, match=r"^mask: expected shape \(batch, tokens\) = \(2, 6\) to match the "
                           r"input \(2, 6, 16\) of module 'transformer\.h\.0\.attn\.c_attn', got \(2, 5\)$"):
            model(batch["input_ids"])
        assert not col._grads and not col._edges and not col._forward_shapes
        col.set_mask(batch["attention_mask"])  # no reset() needed
        lm_losses(model, batch["input_ids"], batch["attention_mask"]).sum().backward()
        assert set(col._grads) == set(col.module_dims)
        with pytest.raises(RuntimeError, match=r"^GradientCollector: module 'transformer\.h\.0\.attn\.c_attn' "
                           r"ran forward again after its gradient was collected; call collect\(\)"):
            model(batch["input_ids"])  # forward again before collect()
        assert not col._grads and not col._edges and not col._forward_shapes
    with pytest.raises(ValueError, match=rf"^flat: expected last dimension {col.dim}, got \(2, 3\)$"):
        col.split(torch.zeros(2, 3))
    model.zero_grad(set_to_none=True)


class TokensThenPooled(nn.Module):
    """Linear 'a' over tokens (B, T, d), mean over tokens, Linear 'b' on (B, h): only 'a' sees the mask."""

    def __init__(self, d=4, h=3, o=2, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = nn.Linear(d, h)
        self.b = nn.Linear(h, o)
        with torch.no_grad():
            for prm in self.parameters():
                prm.copy_(torch.randn(prm.shape, generator=g))

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)).mean(1))


class PooledThenTokens(nn.Module):
    """Linear 'a' on (B, d) (no token axis: the mask does not apply), broadcast to T tokens, Linear 'b' on
    (B, T, h): 'a' has already registered its call when 'b' checks the mask."""

    def __init__(self, d=4, h=3, o=2, T=5, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = nn.Linear(d, h)
        self.b = nn.Linear(h, o)
        self.pos = nn.Parameter(torch.randn(T, h, generator=g), requires_grad=False)
        with torch.no_grad():
            for prm in (self.a.weight, self.a.bias, self.b.weight, self.b.bias):
                prm.copy_(torch.randn(prm.shape, generator=g))

    def forward(self, x):
        return self.b(torch.tanh(self.a(x.mean(1))[:, None, :] + self.pos))


def _batch_state(col):
    return {"grads": dict(col._grads), "edges": dict(col._edges), "shapes": dict(col._forward_shapes)}


def _collect(col, model, x, w, mask):
    col.set_mask(mask)
    out = model(x)
    col.backward((out * w).sum())
    return col.collect()


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("model_cls", [TokensThenPooled, PooledThenTokens])
def test_wrong_mask_refused_by_forward_and_leaves_no_state(model_cls, per_token):
    g = torch.Generator().manual_seed(1)
    model = model_cls()
    x = torch.randn(2, 5, 4, generator=g)
    good = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    w = torch.randn(2, 5, 2, generator=g) if model_cls is PooledThenTokens else torch.randn(2, 2, generator=g)
    col = GradientCollector(model, p=2, seed=3, bias=True, per_token=per_token)
    with col:
        col.set_mask(torch.ones(2, 7))  # T = 7, the input has T = 5
        with pytest.raises(ValueError) as err:
            model(x)  # the forward pass refuses it: no backward needed
        msg = str(err.value)
        hooked = "a" if model_cls is TokensThenPooled else "b"
        assert re.match(r"^mask: expected shape \(batch, tokens\) = \(2, 5\) to match the input "
                        rf"\(2, 5, \d\) of module '{hooked}', got \(2, 7\)$", msg), msg
        assert _batch_state(col) == {"grads": {}, "edges": {}, "shapes": {}}
        # the next batch, with the right mask, works without reset() and equals a fresh collector's
        got = _collect(col, model, x, w, good)
    fresh = GradientCollector(model, p=2, seed=3, bias=True, per_token=per_token)
    with fresh:
        want = _collect(fresh, model, x, w, good)
    assert list(got) == list(want) == ["a", "b"]
    for n in want:
        assert want[n].abs().sum() > 0
        assert torch.equal(got[n], want[n])
    if per_token and model_cls is TokensThenPooled:
        assert got["a"].shape == (2, 5, 4) and torch.equal(got["a"][0, 3:], torch.zeros(2, 4))


def test_wrong_mask_refused_for_conv1d():
    model = ConvGPT(seed=3)
    batch = random_batches(1, batch=3, seq=9, vocab=31, seed=4)[0]
    col = GradientCollector(model, p=3, seed=11)
    with col:
        col.set_mask(batch["attention_mask"][:, :8])
        with pytest.raises(ValueError, match=r"^mask: expected shape \(batch, tokens\) = \(3, 9\) to match the "
                           r"input \(3, 9, 12\) of module 'c_fc', got \(3, 8\)$"):
            model(batch["input_ids"])
        assert _batch_state(col) == {"grads": {}, "edges": {}, "shapes": {}}
    got = run_collector(col, model, batch)
    want = run_collector(GradientCollector(model, p=3, seed=11), model, batch)
    for n in want:
        assert torch.equal(got[n], want[n])


@pytest.mark.parametrize("use_col_backward", [True, False])
def test_error_in_gradient_hook_leaves_no_partial_state(monkeypatch, use_col_backward):
    """The projection of 'a' fails after 'b' (whose gradient arrives first) was stored: the batch is
    dropped whole, and the next batch works without reset()."""
    import gradkit.projection as projection

    g = torch.Generator().manual_seed(2)
    model = TokensThenPooled(seed=4)
    x = torch.randn(3, 5, 4, generator=g)
    w = torch.randn(3, 2, generator=g)
    mask = torch.rand(3, 5, generator=g) > 0.3
    real = projection._factored_project  # what the hooks call (with the collector's own matrix cache)
    seen = []

    def failing(a, gr, p, seed, name, *args):
        seen.append(name)
        if name == "a":
            raise FloatingPointError("forced failure while projecting 'a'")
        return real(a, gr, p, seed, name, *args)

    col = GradientCollector(model, p=2, seed=5)
    with col:
        monkeypatch.setattr(projection, "_factored_project", failing)
        col.set_mask(mask)
        loss = (model(x) * w).sum()
        with pytest.raises(FloatingPointError, match=r"^forced failure while projecting 'a'$"):
            if use_col_backward:
                col.backward(loss)
            else:
                loss.backward()
        assert seen == ["b", "a"]  # 'b' had been projected and stored before 'a' failed
        assert _batch_state(col) == {"grads": {}, "edges": {}, "shapes": {}}
        monkeypatch.setattr(projection, "_factored_project", real)
        model.zero_grad(set_to_none=True)
        got = _collect(col, model, x, w, mask)
    fresh = GradientCollector(model, p=2, seed=5)
    with fresh:
        want = _collect(fresh, model, x, w, mask)
    for n in ("a", "b"):
        assert want[n].abs().sum() > 0
        assert torch.equal(got[n], want[n])
    model.zero_grad(set_to_none=True)


def test_inconsistent_shapes_in_one_batch_leave_no_state():
    """The same module called with two token counts in one per-token batch: refused by the second forward,
    and the first call's pending state is dropped with it."""
    lin = nn.Linear(3, 2)
    col = GradientCollector(nn.Sequential(lin), p=2, per_token=True)
    g = torch.Generator().manual_seed(0)
    x5, x4 = torch.randn(2, 5, 3, generator=g), torch.randn(2, 4, 3, generator=g)
    with col:
        y = lin(x5)
        assert len(col._edges) == 1
        with pytest.raises(RuntimeError, match=r"^GradientCollector: module '0' was called with inputs of shapes "
                           r"\(B, T\) = \(2, 5\) and \(2, 4\) in one batch$"):
            lin(x4)
        assert _batch_state(col) == {"grads": {}, "edges": {}, "shapes": {}}
        y.sum().backward()  # the dropped call's hook is a no-op now
        assert not col._grads
        lin(x4).sum().backward()
        got = col.collect()["0"]
    assert got.shape == (2, 4, 4)
    want = factored_project(x4, torch.ones(2, 4, 2), 2, seed=0, name="0", per_token=True)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model(dtype):
    """A bf16 / fp16 model: the hooks hand the fused op the model-dtype activations and output gradients
    as they are; the collected vectors are, bit for bit, factored_project of those tensors widened to
    float32 (so nothing is rounded beyond the model's own dtype), with and without a padding mask. The AMX
    path, the default at p = 16 on AMX CPUs (bf16, fp16 and fp32 alike), has its own bits (within float32
    summation error of these): GRADKIT_FACTORED_AMX=0 here and for the widened call, and the default checked
    against the same values with a tolerance."""
    from conftest import env_set
    from gradkit.projection import factored_project
    from test_factored_ops import close

    g = torch.Generator().manual_seed(8)
    model = nn.Sequential(nn.Linear(40, 24), nn.Tanh(), nn.Linear(24, 6)).to(dtype)
    x = torch.randn(3, 9, 40, generator=g).to(dtype)
    w = torch.randn(3, 9, 6, generator=g).to(dtype)
    mask = torch.rand(3, 9, generator=g) > 0.25
    seen = {}

    def grab(mod, inp, out, n):
        seen[("a", n)] = inp[0].detach()
        out.register_hook(lambda grad: seen.__setitem__(("g", n), grad.detach()))

    hooks = [m.register_forward_hook(functools.partial(grab, n=n)) for n, m in (("0", model[0]), ("2", model[2]))]
    def collect():
        col = GradientCollector(model, p=16, seed=2, bias=True)
        with col:
            col.set_mask(mask)
            (model(x) * w).sum().backward()
            return col.collect()

    with env_set("GRADKIT_FACTORED_AMX", "0"):
        got = collect()
    default = collect()
    for h in hooks:
        h.remove()
    for n in ("0", "2"):
        a, gr = seen[("a", n)], seen[("g", n)]
        assert a.dtype == gr.dtype == dtype
        with env_set("GRADKIT_FACTORED_AMX", "0"):
            want = factored_project(a.float(), gr.float(), 16, seed=2, name=n, bias=True, mask=mask)
        assert got[n].dtype == torch.float32
        assert torch.equal(got[n], want)
        close(default[n], want)
