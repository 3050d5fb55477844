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
    _schur_rate(rec, quick, SK, sk)


def _schur_rate(rec, quick: bool, SK, sk) -> None:
    """The Schur update's share of the matrix rate (issue 5's GPU target; measured on CPU too).

    Every ``obs_schur_extend_`` call of one ``prune_true_obs`` run is timed (synchronised on a GPU)
    and credited with its 2 n m F (cnt + m) flops; the rate is compared with ``torch.mm`` on square
    matrices of the factor's dtype measured the same way. On CPU the chunks run one per thread,
    single-threaded, so both rates are per thread (torch.mm timed with one thread). GPU: the issue's
    4096 x 4096 layer (8192 calibration rows), bf16 factor, and SparseKit's true OBS on the same GPU;
    CPU: the 512 x 1024 layer above, fp32 factor.
    """
    import time

    from gradkit import ops as gops

    dev = torch.device(rec.device)
    cuda = dev.type == "cuda"
    if cuda:
        M, K, N, cdt = (1024, 4096, 8192, torch.bfloat16) if quick else (4096, 4096, 8192, torch.bfloat16)
    else:
        M, K, N, cdt = (128, 512, 1024, torch.float32) if quick else (512, 1024, 2048, torch.float32)
    W0, X = _layer(M, K, N, seed=1)
    W0, X = W0.to(dev), X.to(dev)
    H = X.T @ X
    wl = f"{M}x{K} layer, {N} calibration rows, 2:4"
    dt = str(cdt).replace("torch.", "")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    n = 4096 if cuda else 1024
    A = torch.randn(n, n, device=dev).to(cdt)
    B = torch.randn(n, n, device=dev).to(cdt)
    nt = torch.get_num_threads()
    if not cuda:
        torch.set_num_threads(1)
    try:
        st = rec.time(lambda: torch.mm(A, B))
    finally:
        torch.set_num_threads(nt)
    mm_rate = 2 * n ** 3 / st["p50"]
    acc = {"t": 0.0, "flop": 0.0, "calls": 0}
    real = gops.obs_schur_extend_

    def timed(ut, xf, up, linv, cnt):
        rows, m, F = xf.shape
        sync()
        t0 = time.perf_counter()
        real(ut, xf, up, linv, cnt)
        sync()
        acc["t"] += time.perf_counter() - t0
        acc["flop"] += 2.0 * rows * m * F * (cnt + m)
        acc["calls"] += 1

    out = {}

    def run():
        W = W0.clone()
        StructuredOBS(gk.ScopeSpec(gk.BlockSpec(W, (1, 1)), (1, 4)), H, damp=0.01).prune_true_obs(2, c_dtype=cdt)
        out["W"] = W

    print(f"[{FAMILY}] Schur update rate on {wl}, {dt} factor", flush=True)
    gops.obs_schur_extend_ = timed
    try:
        sync()
        t0 = time.perf_counter()
        run()
        sync()
        total = time.perf_counter() - t0
    finally:
        gops.obs_schur_extend_ = real
    rate = acc["flop"] / acc["t"]
    one = {"p20": total, "p50": total, "p80": total, "n": 1}
    rec.add(FAMILY, "prune_true_obs (Schur rate run)", "gradkit", wl, dt, one,
            note=f"{acc['calls']} obs_schur_extend_ calls, {acc['t']:.3f} s of the run")
    rec.add(FAMILY, "prune_true_obs (Schur rate run)", "gradkit", wl, dt,
            {"p50": output_error(W0, out["W"], X=X)}, metric="error")
    per = "per thread, " if not cuda else ""
    rec.add(FAMILY, "Schur update rate", "gradkit obs_schur_extend_", wl, dt, {"p50": rate / 1e12},
            metric="TFLOP/s", note=f"{per}2 n m F (cnt + m) flops / time in the calls")
    rec.add(FAMILY, "Schur update rate", f"torch.mm {n}x{n}", wl, dt, {"p50": mm_rate / 1e12}, metric="TFLOP/s",
            note="the matrix rate it is compared with" + (" (1 thread)" if not cuda else ""))
    rec.add(FAMILY, "Schur update rate", "gradkit / torch.mm", wl, dt, {"p50": rate / mm_rate}, metric="fraction")
    if cuda and SK is not None and not quick:  # one run, no warm-up: it is long
        W = W0.clone()
        sync()
        t0 = time.perf_counter()
        SK(sk.ScopeSpec(sk.BlockSpec(W, (1, 1)), (1, 4)), H, damp=0.01).prune_true_obs(2, c_dtype=torch.float16)
        sync()
        t = time.perf_counter() - t0
        out["W"] = W
        rec.add(FAMILY, "prune_true_obs (Schur rate run)", "sparsekit fp16 C", wl, dt,
                {"p20": t, "p50": t, "p80": t, "n": 1}, note="SparseKit 0.1.5 on the same GPU, one run")
        rec.add(FAMILY, "prune_true_obs (Schur rate run)", "sparsekit fp16 C", wl, dt,
                {"p50": output_error(W0, out["W"], X=X)}, metric="error")
