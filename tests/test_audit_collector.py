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


def test_mask_with_tokens_flattened_into_the_batch_axis_is_refused():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)
            self.pool = nn.Linear(4, 3)

        def forward(self, x):
            B, T, I = x.shape
            return self.fc(x.reshape(B * T, I)).reshape(B, T, 3).sum(1) + self.pool(x.mean(1))

    model = Flat()
    x = torch.randn(2, 5, 4)
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0
    col = GradientCollector(model, p=2)
    with col:
        col.set_mask(mask)
        # the old code ignored the mask and returned (B*T) = 10 rows for 'fc'
        with pytest.raises(ValueError, match=r"^mask: has 2 rows \(examples\), but module 'fc' got a 2-D input "
                                             r"\(10, 4\)"):
            model(x)
        assert not col._grads and not col._edges and not col._forward_shapes
    col = GradientCollector(model, modules="pool", p=2)  # a pooled (B, I) input with the mask: fine
    with col:
        col.set_mask(mask)
        col.backward(model(x).sum())
        assert col.collect()["pool"].shape == (2, 4)
