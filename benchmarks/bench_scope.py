"""Scope family: structured masks and hard thresholds through the ScopeSpec API (issue 4).

Workloads on a 4096x4096 fp32 weight:
* 2:4 mask (``get_masks(2)``) and 2:4 hard threshold (``hard_threshold(nnz=2)``);
* 16-column blocks with 8-row coupling (rows p and p+8 of every 16-row chunk compete for each
  16-column block; ``View`` + ``BlockSpec((1,1,1,16))`` + ``ScopeSpec((1,1,2,1))``, nnz=1);
* coupled 2:4 through a View (columns j and j+8 of each 16-column tile share a bit);
* row-wise top-10% (scopes of one row).
Providers: gradkit (the same call as SparseKit's, via gradkit.compat.sparsekit), SparseKit
0.1.5 (its kth_largest routed to its own torch path, since on a CPU-only machine its Triton path
fails), and plain torch as a user would write the pattern (abs / reshape / topk / scatter).
"""
from __future__ import annotations

import torch

import gradkit.compat.sparsekit as gk

FAMILY = "scope"


def _sparsekit():
    try:
        import sparsekit as sk
        import sparsekit.tensor_ops as sk_ops
    except Exception:  # pragma: no cover - peer not installed
        return None

    def kth(x, k, dim=-1, **kw):
        return torch.kthvalue(x, x.shape[dim] - k + 1, dim=dim).values

    def mid(x, k, dim=-1, k_weight=1.0, **kw):
        n = x.shape[dim]
        a, b = torch.kthvalue(x, n - k + 1, dim=dim).values, torch.kthvalue(x, n - k, dim=dim).values
        return (a + k_weight * b) / (1.0 + k_weight)

    if not torch.cuda.is_available():  # its Triton kth kernels need a GPU; use its torch path
        sk_ops._kth_largest_impl = kth
        sk_ops._mid_kth_largest_impl = mid
    return sk


def _patterns(n):
    return {
        "2:4": (lambda L, W: L.ScopeSpec(L.BlockSpec(W, (1, 1)), (1, 4)), 2),
        "16-col blocks, 8-row coupling": (lambda L, W: L.ScopeSpec(
            L.BlockSpec(L.View(W, (n // 16, 8, 2, n), (16 * n, n, 8 * n, 1)), (1, 1, 1, 16)), (1, 1, 2, 1)), 1),
        "coupled 2:4 (View)": (lambda L, W: L.ScopeSpec(
            L.BlockSpec(L.View(W, (n, n // 16, 8, 2), (n, 16, 1, 8)), (1, 1, 1, 2)), (1, 1, 4, 1)), 2),
        "row-wise top-10%": (lambda L, W: L.ScopeSpec(L.BlockSpec(W, (1, 1)), (1, -1)), n // 10),
    }


def _torch_mask(name, W, nnz):
    """Plain torch, as a user writes each pattern."""
    n = W.shape[0]
    if name == "2:4":
        a = W.abs().reshape(-1, 4)
        return torch.zeros_like(a, dtype=torch.bool).scatter_(1, a.topk(2, dim=1).indices, True).reshape(W.shape)
    if name == "16-col blocks, 8-row coupling":
        nb = W.reshape(n // 16, 2, 8, n // 16, 16).norm(dim=-1)  # (chunk, half, p, colblock)
        keep0 = nb[:, 0] >= nb[:, 1]
        return torch.stack([keep0, ~keep0], 1).unsqueeze(-1).expand(n // 16, 2, 8, n // 16, 16).reshape(W.shape)
    if name == "coupled 2:4 (View)":
        t = W.reshape(n, n // 16, 2, 2, 4)
        sc = (t * t).sum(2)
        keep = torch.zeros_like(sc, dtype=torch.bool).scatter_(-1, sc.topk(2, dim=-1).indices, True)
        return keep.unsqueeze(2).expand(n, n // 16, 2, 2, 4).reshape(W.shape)
    a = W.abs()
    return torch.zeros_like(a, dtype=torch.bool).scatter_(1, a.topk(nnz, dim=1).indices, True)


def run(rec, quick: bool = False) -> None:
    dev = torch.device(rec.device)
    n = 2048 if quick else 4096
    W0 = torch.randn(n, n, generator=torch.Generator().manual_seed(0)).to(dev)
    wl = f"{n}x{n}"
    dt = "float32"
    sk = _sparsekit()
    for name, (make, nnz) in _patterns(n).items():
        print(f"[{FAMILY}] {name} on {wl}", flush=True)
        Wg = W0.clone()
        sg = make(gk, Wg)
        mg = next(iter(sg.get_masks(nnz).values()))
        mt = _torch_mask(name, W0, nnz)
        pm = mg if mg.shape == W0.shape else sg.blocks()[0].view.to_param(mg)
        assert torch.equal(pm, mt), f"{name}: gradkit's mask differs from plain torch"
        rec.add(FAMILY, f"{name} mask", "gradkit", wl, dt, rec.time(lambda: sg.get_masks(nnz)),
                note="ScopeSpec.get_masks: one fused pass")
        rec.add(FAMILY, f"{name} mask", "torch", wl, dt, rec.time(lambda: _torch_mask(name, W0, nnz), slow_reps=3),
                note="abs/reshape/topk/scatter as a user writes it")
        if sk is not None:
            Ws = W0.clone()
            ss = make(sk, Ws)
            try:
                ms = next(iter(ss.get_masks(nnz).values()))
                assert torch.equal(ms, mg), f"{name}: SparseKit's mask differs from gradkit's"
                rec.add(FAMILY, f"{name} mask", "sparsekit", wl, dt, rec.time(lambda: ss.get_masks(nnz), slow_reps=3),
                        note="SparseKit 0.1.5 ScopeSpec.get_masks (torch kthvalue path on CPU)")
            except AssertionError:
                raise
            except Exception as e:  # pragma: no cover - report, don't hide
                print(f"[{FAMILY}] sparsekit {name} mask failed: {type(e).__name__}: {e}", flush=True)
        # hard threshold (in place; repeated calls re-prune an already pruned weight: same work)
        rec.add(FAMILY, f"{name} hard threshold", "gradkit", wl, dt,
                rec.time(lambda: sg.hard_threshold(nnz=nnz)), note="fused score/select/zero, in place")
        if sk is not None:
            Ws = W0.clone()
            ss = make(sk, Ws)
            ss.hard_threshold(nnz=nnz)
            Wg2 = W0.clone()
            make(gk, Wg2).hard_threshold(nnz=nnz)
            assert torch.equal(Ws, Wg2), f"{name}: SparseKit's thresholded weight differs from gradkit's"
            rec.add(FAMILY, f"{name} hard threshold", "sparsekit", wl, dt,
                    rec.time(lambda: ss.hard_threshold(nnz=nnz), slow_reps=3), note="SparseKit 0.1.5")
