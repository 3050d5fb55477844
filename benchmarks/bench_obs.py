"""OBS family: pruning one layer to 2:4 with second-order compensation (issue 5).

Workload: a 512 x 1024 weight (out x in), 2048 calibration rows with a decaying spectrum
(X = Z A diag(logspace(0, -2))), H = X^T X, damp 0.01 (relative), pattern 2:4.
Each timed call builds the pruner (inverse Hessian included) and prunes a fresh copy.
Providers:
* gradkit: ``gradkit.obs.StructuredOBS`` / ``gradkit.obs.sparsegpt``;
* sparsekit: SparseKit 0.1.5's ``StructuredOBS`` / ``sparsekit.pruners.sparsegpt.sparsegpt``
  (its Triton kth kernels need a GPU, so on CPU its own torch.kthvalue path is used, as a CPU
  user gets it; gradkit needs no such patch).
Errors (metric "error") are ||(W - W')X^T||^2 / ||W X^T||^2 from the same run.
"""
from __future__ import annotations

import torch

from bench_scope import _sparsekit
from gradkit import scope as gk
from gradkit.obs import StructuredOBS, output_error, sparsegpt

FAMILY = "obs"


def _layer(M: int, K: int, N: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, K, generator=g) @ (torch.randn(K, K, generator=g) * torch.logspace(0, -2, K).sqrt()[None, :])
    return torch.randn(M, K, generator=g), X


def run(rec, quick: bool = False) -> None:
    M, K, N = (128, 512, 1024) if quick else (512, 1024, 2048)
    W0, X = _layer(M, K, N)
    H = X.T @ X
    wl = f"{M}x{K} layer, {N} calibration rows, 2:4"
    sk = _sparsekit()
    SK = None
    if sk is not None:
        from sparsekit.pruners.obs import StructuredOBS as SK
        from sparsekit.pruners.sparsegpt import sparsegpt as sk_sparsegpt
    out = {}

    def gk_run(kind, **kw):
        def fn():
            W = W0.clone()
            o = StructuredOBS(gk.ScopeSpec(gk.BlockSpec(W, (1, 1)), (1, 4)), H, damp=0.01)
            if kind == "true":
                o.prune_true_obs(2, **kw)
            else:
                o.prune(2, compensate=kind)
            out["W"] = W
        return fn

    def sk_run(kind, **kw):
        def fn():
            W = W0.clone()
            o = SK(sk.ScopeSpec(sk.BlockSpec(W, (1, 1)), (1, 4)), H, damp=0.01)
            if kind == "true":
                o.prune_true_obs(2, **kw)
            else:
                o.prune(2, compensate=kind)
            out["W"] = W
        return fn

    cases = [("prune_true_obs fp32", "true", dict(c_dtype=torch.float32)),
             ("prune_true_obs bf16 C", "true", dict(c_dtype=torch.bfloat16)),
             ("prune local", "local", {}), ("prune full", "full", {})]
    for op, kind, kw in cases:
        print(f"[{FAMILY}] {op} on {wl}", flush=True)
        rec.add(FAMILY, op, "gradkit", wl, "fp32", rec.time(gk_run(kind, **kw), slow_reps=3))
        rec.add(FAMILY, op, "gradkit", wl, "fp32", {"p50": output_error(W0, out["W"], X=X)}, metric="error")
        if SK is not None and "bf16" not in op:
            rec.add(FAMILY, op, "sparsekit", wl, "fp32", rec.time(sk_run(kind, **kw), slow_reps=2 if quick else 3),
                    note="SparseKit 0.1.5 (CPU: its torch.kthvalue path)")
            rec.add(FAMILY, op, "sparsekit", wl, "fp32", {"p50": output_error(W0, out["W"], X=X)}, metric="error")
    # the fast mode: SparseGPT's mask, then the exact re-solve of every row
    print(f"[{FAMILY}] prune_true_obs mode=resolve", flush=True)
    rec.add(FAMILY, "prune_true_obs mode=resolve", "gradkit", wl, "fp32", rec.time(gk_run("true", mode="resolve")))
    rec.add(FAMILY, "prune_true_obs mode=resolve", "gradkit", wl, "fp32",
            {"p50": output_error(W0, out["W"], X=X)}, metric="error")
    # SparseGPT, the baseline every paper compares against
    print(f"[{FAMILY}] sparsegpt", flush=True)

    def gk_sg():
        out["W"] = sparsegpt(gk.ScopeSpec(gk.BlockSpec(W0.clone(), (1, 1)), (1, 4)), H, 2, damp=0.01)
    rec.add(FAMILY, "sparsegpt", "gradkit", wl, "fp32", rec.time(gk_sg))
    rec.add(FAMILY, "sparsegpt", "gradkit", wl, "fp32", {"p50": output_error(W0, out["W"], X=X)}, metric="error")
    if SK is not None:
        def sk_sg():
            out["W"] = sk_sparsegpt(W0.clone(), H, block_size=1, scope_size=4, damp=0.01)
        rec.add(FAMILY, "sparsegpt", "sparsekit", wl, "fp32", rec.time(sk_sg))
        rec.add(FAMILY, "sparsegpt", "sparsekit", wl, "fp32", {"p50": output_error(W0, out["W"], X=X)},
                metric="error")
