"""GradientCollector in realistic training setups: in-place ops on a hooked output, a second backward through
one forward, gradient checkpointing (reentrant and not), frozen modules, tokens flattened into the batch axis.
Each case either gives L G_b R^T of the per-example gradient autograd computes, or a clear error."""
import math

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint as checkpoint
from torch import nn

from gradkit.projection import GradientCollector, derive_seed, projection_matrix


def lgr(G, name, p, seed):
    L = projection_matrix(p, G.shape[0], seed=derive_seed(seed, name, "left")).double()
    R = projection_matrix(p, G.shape[1], seed=derive_seed(seed, name, "right")).double()
    return (L @ G.double() @ R.T).reshape(-1)


def per_example(model, names, xs, loss_fn, p, seed):
    """{name: (B, p*p)} from each example's own backward (weight.grad, nn.Linear layout)."""
    mods = dict(model.named_modules())
    out = {n: [] for n in names}
    for b in range(xs.shape[0]):
        model.zero_grad(set_to_none=True)
        loss_fn(model, xs[b:b + 1]).backward()
        for n in names:
            w = mods[n].weight.grad
            out[n].append(lgr(w.T if type(mods[n]).__name__ == "Conv1D" else w, n, p, seed))
    model.zero_grad(set_to_none=True)
    return {n: torch.stack(v) for n, v in out.items()}


class InPlaceMLP(nn.Module):
    """Linear -> in-place activation / scaling, on (B, T, I) inputs (F.linear returns a view there)."""

    def __init__(self, conv1d=False):
        super().__init__()
        torch.manual_seed(0)
        if conv1d:
            from transformers.pytorch_utils import Conv1D

            self.fc1 = Conv1D(10, 4)
            nn.init.normal_(self.fc1.weight, std=0.5)
        else:
            self.fc1 = nn.Linear(4, 10)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(10, 3)

    def forward(self, x):
        h = self.fc1(x)
        h[..., :3].mul_(2.0)  # an in-place op on a view of the output
        return self.fc2(self.act(h))  # and one on the output itself


def tanh_loss(model, x):
    return model(x).tanh().sum()


@pytest.mark.parametrize("conv1d,shape", [(False, (3, 5, 4)), (False, (2, 2, 3, 4)), (False, (3, 4)),
                                          (True, (3, 5, 4))])
@pytest.mark.parametrize("use_col_backward", [True, False])
def test_inplace_op_on_hooked_output_is_collected(conv1d, shape, use_col_backward):
    model = InPlaceMLP(conv1d).double()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    col = GradientCollector(model, p=3, seed=4)
    with col:
        loss = tanh_loss(model, x)
        col.backward(loss) if use_col_backward else loss.backward()
        got = col.collect(missing="error")  # the old code got no gradient for fc1 with 3-D / 4-D inputs
    want = per_example(model, ["fc1", "fc2"], x, tanh_loss, 3, 4)
    for n in want:
        assert want[n].abs().max() > 0.1
        torch.testing.assert_close(got[n].double(), want[n], atol=1e-5, rtol=1e-5)


def test_second_backward_through_one_forward_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    x = torch.randn(3, 4)
    col = GradientCollector(model, p=3, seed=1)
    with col:
        y = model(x)
        y[:, 0].sum().backward(retain_graph=True)
        # the old code silently ignored the second loss: rows held the first loss's gradient only
        with pytest.raises(RuntimeError, match=r"^GradientCollector: module '2' received a second output gradient "
                                               r"for the same forward pass .*\(the batch has been dropped\)$"):
            (y[:, 1] ** 2).sum().backward()
        assert not col._grads and not col._edges and not col._forward_shapes
        # collect() before backpropagating again: the later backward is not collected, and no error
        y = model(x)
        col.backward(y[:, 0].sum(), retain_graph=True)
        got = col.collect()
        (y[:, 1] ** 2).sum().backward()
    want = per_example(model, ["0", "2"], x, lambda m, xb: m(xb)[:, 0].sum(), 3, 1)
    for n in want:
        torch.testing.assert_close(got[n].double(), want[n], atol=1e-5, rtol=1e-4)


class CkptNet(nn.Module):
    def __init__(self, reentrant):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(11, 6)
        self.q, self.k, self.fc = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6)
        self.head = nn.Linear(6, 11)
        self.reentrant = reentrant

    def block(self, h, mask):
        att = (self.q(h) @ self.k(h).transpose(1, 2) / math.sqrt(6)).masked_fill(~mask[:, None, :].bool(), -1e9)
        return h + torch.tanh(self.fc(att.softmax(-1) @ h))

    def forward(self, ids, mask):
        h = self.emb(ids)
        if self.reentrant is None:
            h = self.block(h, mask)
        else:
            h = checkpoint.checkpoint(self.block, h, mask, use_reentrant=self.reentrant)
        return self.head(h)


def _ckpt_batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 11, (3, 6), generator=g)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 3:] = 0
    return ids, mask


def _all_positions_loss(model, ids, mask):  # also reads padded positions: the mask matters
    return (model(ids, mask).tanh() * torch.linspace(-1, 1, 11)).sum()


def _ckpt_collect(model, ids, mask, early_stop=True):
    col = GradientCollector(model, p=3, seed=2)
    with col, checkpoint.set_checkpoint_early_stop(early_stop):
        with col.batch(mask):
            loss = _all_positions_loss(model, ids, mask)
        loss.backward()  # after the batch context ended: the recomputation must still use the mask
        assert not col._edges
        return col.collect(missing="error")


def test_reentrant_checkpoint():
    ids, mask = _ckpt_batch()
    model = CkptNet(reentrant=True)
    want = _ckpt_collect(CkptNet(reentrant=None), ids, mask)
    got = _ckpt_collect(model, ids, mask)
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-6, rtol=1e-5)
    # col.backward (autograd.grad to the hooked outputs) never runs the recomputation: refused, batch kept
    col = GradientCollector(model, p=3, seed=2)
    with col:
        col.set_mask(mask)
        loss = _all_positions_loss(model, ids, mask)
        with pytest.raises(RuntimeError, match=r"^GradientCollector.backward: hooked modules ran inside "
                                               r"torch.utils.checkpoint with use_reentrant=True"):
            col.backward(loss)
        loss.backward()
        got = col.collect(missing="error")
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("early_stop", [True, False])
def test_non_reentrant_checkpoint_recomputation_is_not_hooked(early_stop):
    ids, mask = _ckpt_batch()
    want = _ckpt_collect(CkptNet(reentrant=None), ids, mask)
    got = _ckpt_collect(CkptNet(reentrant=False), ids, mask, early_stop)  # no edges or activations left over
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-6, rtol=1e-5)


def test_frozen_module_without_gradient_path_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    model[0].requires_grad_(False)
    x = torch.randn(3, 4)
    col = GradientCollector(model, p=2, seed=0)
    with col:
        # the old code gave module '0' zero rows, silently: nothing upstream of its output requires grad
        with pytest.raises(ValueError, match=r"^modules: '0' ran forward with grad enabled, but its output does "
                                             r"not require grad"):
            model(x)
        assert not col._grads and not col._edges and not col._forward_shapes
        # a frozen weight whose input requires grad: its true gradient, as documented
        col.backward(model(x.clone().requires_grad_()).sum())
        got = col.collect(missing="error")
    model[0].requires_grad_(True)
    want = per_example(model, ["0", "2"], x, lambda m, xb: m(xb).sum(), 2, 0)
    for n in want:
        assert want[n].abs().max() > 0.1
        torch.testing.assert_close(got[n].double(), want[n], atol=1e-5, rtol=1e-4)


def test_mask_with_tokens_flattened_into_the_batch_axis():
    """Session 35: a (B * T, I) input under a (B, T) mask is the row-major flattening of (B, T, I): collected as the
    same module fed (B, T, I), the mask applied to its rows (it was refused; before that, the mask was ignored and
    B*T = 10 rows came back). Rows that are not B * T tokens (here the first 3 of 5) are still refused."""
    class Flat(nn.Module):
        def __init__(self, flat=True, keep=5):
            super().__init__()
            self.fc = nn.Linear(4, 3)
            self.pool = nn.Linear(4, 3)
            self.flat, self.keep = flat, keep

        def forward(self, x):
            x = x[:, :self.keep]
            B, T, I = x.shape
            y = self.fc(x.reshape(B * T, I)).reshape(B, T, 3) if self.flat else self.fc(x)
            return y.sin().sum(1) + self.pool(x.mean(1))

    torch.manual_seed(0)
    model, twin = Flat(), Flat(flat=False)
    twin.load_state_dict(model.state_dict())
    x = torch.randn(2, 5, 4)
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0
    for per_token in (False, True):
        got, want = [], []
        for m, out in ((model, got), (twin, want)):
            col = GradientCollector(m, p=2, per_token=per_token)
            with col:
                col.set_mask(mask)
                col.backward(m(x).sum())
                out.append(col.collect())
        assert got[0]["fc"].shape == ((2, 5, 4) if per_token else (2, 4))
        assert torch.equal(got[0]["fc"], want[0]["fc"]) and torch.equal(got[0]["pool"], want[0]["pool"])
        if per_token:
            assert not got[0]["fc"][1, 3:].any() and got[0]["fc"][1, :3].abs().sum() > 0
    model.keep = 3
    col = GradientCollector(model, p=2)
    with col:
        col.set_mask(mask)
        with pytest.raises(ValueError, match=r"^modules: 'fc' got a 2-D input of shape \(6, 4\): 6 rows, neither the "
                                             r"batch's B = 2 examples \(the mask\) nor its B \* T = 10 tokens"):
            model(x)
        assert not col._grads and not col._edges and not col._forward_shapes
    col = GradientCollector(model, modules="pool", p=2)  # a pooled (B, I) input with the mask: fine
    with col:
        col.set_mask(mask)
        col.backward(model(x).sum())
        assert col.collect()["pool"].shape == (2, 4)


# ---- session 32 audit: the projection-matrix cache, normalisers checked late, argument corners --------------------
def test_a_call_under_inference_mode_does_not_break_later_differentiable_calls():
    """The process-wide matrix cache kept the matrix a first call made under torch.inference_mode() as an inference
    tensor; every later differentiable call with the same (p, size, seed) then failed for the whole process with
    "Inference tensors cannot be saved for backward". Cached matrices are now made with inference mode off."""
    from gradkit import projection as P

    P.clear_matrix_cache()
    gen = torch.Generator().manual_seed(11)
    a, g = torch.randn(3, 5, 7, generator=gen), torch.randn(3, 5, 6, generator=gen)
    for kw in (dict(), dict(per_token=True), dict(bias=True)):
        with torch.inference_mode():
            want = P.factored_project(a, g, 4, seed=2, name="inf", **kw)
        a2 = a.clone().requires_grad_()
        got = P.factored_project(a2, g, 4, seed=2, name="inf", **kw)
        got.sum().backward()
        assert torch.equal(got.detach(), want)
        assert a2.grad is not None and a2.grad.abs().sum() > 0


def test_process_cache_is_bounded_and_a_collector_keeps_and_releases_its_own(monkeypatch):
    """The cache behind factored_project was an lru_cache of 256 matrices (both L and L^T): held for the life of
    the process, and with more than 128 hooked modules a collector regenerated every matrix every batch. Now the
    process-wide cache holds at most MATRIX_CACHE_BYTES, and a collector keeps its modules' matrices (one (n, p)
    copy each) for as long as it is attached: the second batch generates nothing, detach releases them."""
    from gradkit import ops
    from gradkit import projection as P

    made = []
    real = ops.projection_matrix

    def counting(*args, **kw):
        made.append(args[:3])
        return real(*args, **kw)

    monkeypatch.setattr(ops, "projection_matrix", counting)
    P.clear_matrix_cache()
    monkeypatch.setattr(P._MATRICES, "max_bytes", 4096)  # a small bound: every call below evicts
    gen = torch.Generator().manual_seed(3)
    a, g = torch.randn(2, 3, 40, generator=gen), torch.randn(2, 3, 30, generator=gen)
    for i in range(20):
        P.factored_project(a, g, 4, name=f"m{i}")
    assert P._MATRICES.nbytes <= 4096 and len(P._MATRICES) >= 1 and len(made) == 40
    made.clear()
    P.factored_project(a, g, 4, name="m19")  # the most recent is kept
    assert made == []

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(140)])  # more modules than the old cache's 128 pairs
    x = torch.randn(2, 8)
    col = GradientCollector(model, p=2, seed=1)
    with col:
        out = []
        for _ in range(2):
            made.clear()
            col.backward(model(x).sum())
            out.append(col.collect(flat=True))
        assert made == [], f"the second batch generated {len(made)} matrices again"
        assert torch.equal(out[0], out[1])
        assert len(col._matrices) == 280
    # kept across detach / attach (session 39: `with col:` around each batch regenerated every matrix each batch)
    assert len(col._matrices) == 280
    with col:
        made.clear()
        col.backward(model(x).sum())
        assert torch.equal(col.collect(flat=True), out[0])
        assert made == [], f"a batch after re-attaching generated {len(made)} matrices again"
    col.clear_matrices()
    assert len(col._matrices) == 0
    with col:  # made again, the same bits
        col.backward(model(x).sum())
        assert torch.equal(col.collect(flat=True), out[0]) and len(made) == 280
    P.clear_matrix_cache()
    assert P._MATRICES.nbytes == 0


def test_collector_checks_normalizers_when_built_naming_the_module():
    """Wrong normaliser types and shapes were accepted by the constructor and raised inside the backward pass,
    without the module's name. Refused at construction now; a Conv1D's message says to pass the transpose."""
    from gradkit.projection import AdafactorNormalizer, AdamNormalizer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 7), nn.ReLU(), nn.Linear(7, 10))
    with pytest.raises(TypeError, match=r"^normalizers\['0'\]: expected an AdafactorNormalizer or AdamNormalizer, "
                                        r"got str$"):
        GradientCollector(model, p=4, normalizers={"0": "adam"})
    with pytest.raises(ValueError, match=r"^normalizers\['0'\]: row/col must have 7/3 entries, got 3/7$"):
        GradientCollector(model, p=4, normalizers={"0": AdafactorNormalizer(torch.rand(3) + .1, torch.rand(7) + .1)})
    with pytest.raises(ValueError, match=r"^normalizers\['2'\]: v must have shape \(10, 7\), got \(7, 10\)$"):
        GradientCollector(model, p=4, normalizers={"2": AdamNormalizer(torch.rand(7, 10) + .1)})
    with pytest.raises(ValueError, match=r"^normalizers\['2'\]: bias_avg_sq must have 10 entries, got 7$"):
        GradientCollector(model, p=4, bias=True,
                          normalizers={"2": AdamNormalizer(torch.rand(10, 7) + .1, bias_avg_sq=torch.rand(7))})
    GradientCollector(model, p=4, normalizers={"2": AdamNormalizer(torch.rand(10, 7) + .1)})  # right: accepted
    transformers = pytest.importorskip("transformers")
    conv = nn.Sequential(transformers.pytorch_utils.Conv1D(5, 3))  # weight (3, 5): in 3, out 5
    with pytest.raises(ValueError, match=r"^normalizers\['0'\]: v must have shape \(5, 3\) \(nn.Linear layout .*"
                                         r"Conv1D.*pass the transpose\), got \(3, 5\)$"):
        GradientCollector(conv, p=2, normalizers={"0": AdamNormalizer(torch.rand(3, 5) + .1)})


def test_collector_argument_corners():
    """A Linear as the whole model said "the model has no nn.Linear"; modules=3 raised "'int' object is not
    iterable"; a numpy seed and kind="Gaussian" were refused here while gradkit.projection's functions take them."""
    import numpy as np

    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"^model: is itself a Linear, .* wrap it, e\.g\. nn\.Sequential\(model\)$"):
        GradientCollector(nn.Linear(5, 4))
    model = nn.Sequential(nn.Linear(5, 4))
    with pytest.raises(TypeError, match=r"^modules: expected None, a callable, a name pattern or a list of them, "
                                        r"got int$"):
        GradientCollector(model, modules=3)
    x = torch.randn(3, 5)
    got = {}
    for seed, kind in ((np.int64(3), "Gaussian"), (3, "gaussian")):
        with GradientCollector(model, p=2, seed=seed, kind=kind, memory_budget=np.int32(1 << 20)) as col:
            col.backward(model(x).sum())
            got[type(seed)] = col.collect(flat=True)
            assert col.projection_config == GradientCollector(model, p=2, seed=3, kind="gaussian").projection_config
    assert torch.equal(got[np.int64], got[int])
    for bad in (True, np.bool_(True), 3.0):
        with pytest.raises(ValueError, match=r"^seed: expected a non-negative int"):
            GradientCollector(model, seed=bad)
    with pytest.raises(ValueError, match=r"^seed: expected a non-negative int, got 9223372036854775808$"):
        GradientCollector(model, seed=1 << 63)


def test_half_precision_output_sums_and_scales_in_float32_and_warns_on_overflow():
    """dtype=float16 cast each call's projection before summing a module's calls (two roundings) and scaled in
    float16; values past 65504 became inf silently. Now sums and scale run in float32, cast once at collect(),
    and an overflow is a RuntimeWarning naming the module."""
    torch.manual_seed(0)
    lin = nn.Linear(6, 5)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            return self.lin(self.lin.weight.new_ones(1, 1) * x).sum() + self.lin(x * 0.5).sum()

    model = Twice()
    x = torch.randn(4, 3, 6) * 3
    got = {}
    for dt in (torch.float32, torch.float16):
        with GradientCollector(model, p=4, seed=1, dtype=dt) as col:
            col.backward(model(x))
            got[dt] = col.collect(scale=7.0)["lin"]
    assert got[torch.float16].dtype == torch.float16
    assert torch.equal(got[torch.float16], got[torch.float32].to(torch.float16))  # one rounding, at the end
    with GradientCollector(model, p=4, seed=1, dtype=torch.float16) as col:
        col.backward(model(x * 1e4))
        with pytest.warns(RuntimeWarning, match=r"modules \['lin'\] are beyond torch\.float16's range"):
            col.collect()


def test_integer_mask_values_other_than_0_and_1_are_refused():
    """set_mask checked 0/1 values for float masks only: an integer mask holding 2 (token ids passed by mistake)
    was read as True everywhere it was nonzero."""
    col = GradientCollector(nn.Sequential(nn.Linear(3, 2)), p=2)
    for bad in (torch.tensor([[1, 2, 0]]), torch.tensor([[1.0, 0.5, 0.0]])):
        with pytest.raises(ValueError, match=r"^mask: expected 0/1 values$"):
            col.set_mask(bad)
    col.set_mask(torch.tensor([[1, 1, 0]], dtype=torch.uint8))
    assert col._mask.dtype == torch.bool and col._mask.tolist() == [[True, True, False]]
