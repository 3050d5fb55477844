"""Audit regressions for gradkit.obs: silent wrong answers and state after errors."""
import pytest
import torch
from torch import nn

import gradkit.scope as S
from gradkit.kernels.reference.obs import true_obs_reference
from gradkit.obs import StructuredOBS, prune_model, resolve, sparsegpt


def _h(k, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g)
    return x.T @ x


def _nm(w, m=4):
    return S.ScopeSpec(S.BlockSpec(w, (1, 1)), (1, m))


@pytest.mark.parametrize("method", ["true_obs", "resolve", "local", "full"])
def test_write_back_bumps_autograd_version(method):
    # the pruned weight used to be written through .data: a graph that saved the dense weight then
    # back-propagated silently with the pruned one (grad = 2 * W_pruned instead of 2 * W_dense)
    g = torch.Generator().manual_seed(1)
    p = nn.Parameter(torch.randn(6, 16, generator=g))
    loss = (p * p).sum()
    obs = StructuredOBS(_nm(p), _h(16), damp=0.01)
    v0 = p._version
    if method in ("true_obs", "resolve"):
        obs.prune_true_obs(2, mode="obs" if method == "true_obs" else "resolve")
    else:
        obs.prune(2, compensate=method)
    assert p._version != v0
    assert ((p.detach().view(6, 4, 4) != 0).sum(-1) == 2).all()  # 2:4 exactly (an all-zero write passed <= 2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("shape,nnz", [((2, 2), 2), ((2, 4), 3), ((4, 2), 3)])
def test_row_coupled_ties_prune_lower_block_first(shape, nnz):
    # row-coupled independent scoring ranked blocks with topk, whose order among equal costs is
    # unspecified (it pruned the higher blocks on CPU); the documented order and the float64
    # reference prune the lower block first
    m, k = 16, 32
    w = torch.ones(m, k)
    obs = StructuredOBS(S.ScopeSpec(S.BlockSpec(w, (1, 4)), shape), torch.eye(k), damp=0.01)
    obs.prune_true_obs(nnz, ng=None)
    plan = obs.plan
    ref = true_obs_reference(torch.ones(m, k), obs.inv_hessian, plan.group_rows, plan.t_col, plan.t_lrow, 1,
                             obs.blocks_per_scope - nnz, "independent", True)
    assert torch.equal(w != 0, ref != 0)
    torch.testing.assert_close(w, ref.float(), atol=1e-5, rtol=1e-5)


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8, bias=False)
        self.b = nn.Linear(8, 8, bias=False)
        self.b.weight = self.a.weight
        self.c = nn.Linear(8, 4)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


@pytest.mark.parametrize("groups", ["layer", "block"])
def test_prune_model_refuses_tied_weights(groups):
    # two Linear modules sharing one weight: each was pruned against its own Hessian and the last
    # write silently replaced the other's result (or re-pruned an already pruned weight)
    torch.manual_seed(0)
    net = _Tied()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match=r"^modules: 'a' and 'b' share their weight"):
        prune_model(net, [torch.randn(16, 8)], "2:4", method="sparsegpt", progress=False, groups=groups)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])
    # selecting one of the tied layers is fine
    prune_model(net, [torch.randn(16, 8)], "2:4", method="sparsegpt", progress=False, modules=["a", "c"])
    assert ((net.a.weight.view(8, 2, 4) != 0).sum(-1) == 2).all()


class _Three(nn.Module):
    def __init__(self):
        super().__init__()
        self.h = nn.ModuleList([nn.Linear(8, 8, bias=False) for _ in range(3)])

    def forward(self, x):
        for i, lin in enumerate(self.h):
            # the third layer sees one feature copied 8 times: H has rank 1 (no dead input, which every OBS routine
            # decouples), so with damp=0 it is not positive definite
            x = torch.tanh(lin(x[:, :1].expand_as(x) if i == 2 else x))
        return x


def test_prune_model_error_names_layer_and_keeps_failed_group_dense():
    torch.manual_seed(0)
    net = _Three()
    dense = [lin.weight.detach().clone() for lin in net.h]
    with pytest.raises(ValueError, match="^hessian: ") as ei:
        prune_model(net, [torch.randn(16, 8)], "2:4", method="true_obs", damp=0.0, progress=False)
    assert any("'h.2'" in note for note in getattr(ei.value, "__notes__", []))
    assert torch.equal(net.h[2].weight, dense[2])  # the failing group stays dense
    assert not torch.equal(net.h[0].weight, dense[0])  # documented: finished groups stay pruned


def _asym(k):
    h = _h(k)
    h[0, 5] += 100.0
    return h


@pytest.mark.parametrize("fn", ["obs_init", "compute_inverse", "inv_h", "sparsegpt", "resolve"])
def test_asymmetric_hessian_refused(fn):
    # Cholesky reads only the lower triangle: an asymmetric H was silently replaced by it
    w = torch.randn(6, 16)
    w0 = w.clone()
    h = _asym(16)
    with pytest.raises(ValueError, match=r"^(hessian|inv_h|H): is not symmetric"):
        if fn == "obs_init":
            StructuredOBS(_nm(w), h, damp=0.01)
        elif fn == "compute_inverse":
            StructuredOBS.compute_inverse(h, 0.01)
        elif fn == "inv_h":
            StructuredOBS(_nm(w), _h(16), damp=0.01, inv_h=h)
        elif fn == "sparsegpt":
            sparsegpt(_nm(w), h, 2, inplace=True)
        else:
            resolve(w, h, torch.ones(6, 16, dtype=torch.bool))
    assert torch.equal(w, w0)


def test_symmetric_roundoff_accepted():
    # X^T X from a GEMM is symmetric only up to round-off; that must still be accepted
    x = torch.randn(257, 48, dtype=torch.float32) * 3
    h = x.T @ x
    h = h + 1e-6 * h.abs().max() * torch.randn(48, 48).triu(1)
    w = torch.randn(8, 48)
    StructuredOBS(_nm(w), h, damp=0.01).prune_true_obs(2)
    assert ((w.view(8, 12, 4) != 0).sum(-1) == 2).all()


@pytest.mark.parametrize("sparsity, kept", [("0.25", 8), ("0.75", 3), ("0.5", 5), ("0.3", 7)])
def test_unstructured_pattern_keeps_k_minus_floor(sparsity, kept):
    """"unstructured:s" keeps K - floor(s K) weights per row, gradkit.scope's sparsity_to_nnz rule: Python's
    round (half to even) kept 8 of 10 at 0.25 but 2 at 0.75 (7.5 rounded up), unlike sparsity_to_nnz."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 6))
    data = [torch.randn(8, 10) for _ in range(2)]
    prune_model(model, data, pattern=f"unstructured:{sparsity}", method="magnitude", progress=False)
    assert ((model[0].weight != 0).sum(1) == kept).all()
