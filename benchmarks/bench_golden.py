"""Golden family: one per-sample golden update (top-k% of |g| per tensor + intersection) (issue 7).

Workload: the GPT-2-style 38.5M-parameter set (4 layers, width 512, 52 tensors), fp32 random
gradients, k = 1% and 30% of each tensor; the running intersection already holds one sample.
Providers:
* gradkit: ``gradkit.ops.golden_topk_and_`` per tensor (exact select + AND + popcount, one fused pass);
* goldenparams-style: GoldenParams' loop as its README describes it, written here in plain torch
  (per tensor: torch.topk of |g| flattened, a dense bool mask from the indices, AND with the
  running mask) -- GoldenParams itself is not on the package registry;
* torch kthvalue: a careful torch user (threshold by torch.kthvalue, mask = |g| >= threshold,
  AND); its ties are not exact (it can keep more than k).
"""
from __future__ import annotations

import math

import torch

from bench_parammap import gpt2_shapes
from gradkit import golden as G, ops

FAMILY = "golden"


def _goldenparams_style(grads, running, pct):
    for name, g in grads.items():
        flat = g.abs().reshape(-1)
        k = max(1, math.ceil(pct / 100.0 * flat.numel()))  # GoldenParams' count (get_golden_params)
        idx = torch.topk(flat, k).indices
        m = torch.zeros(flat.numel(), dtype=torch.bool)
        m[idx] = True
        running[name] = running[name] & m.reshape(g.shape)


def _kthvalue(grads, running, pct):
    for name, g in grads.items():
        a = g.abs().reshape(-1)
        k = max(1, math.ceil(pct / 100.0 * a.numel()))
        thr = torch.kthvalue(a, a.numel() - k + 1).values
        running[name] = running[name] & (a >= thr).reshape(g.shape)


def run(rec, quick: bool = False) -> None:
    dev = torch.device(rec.device)
    shapes = gpt2_shapes(n_layer=4, d=512)
    gen = torch.Generator().manual_seed(11)
    grads = {n: torch.randn(s, generator=gen).to(dev) for n, s in shapes.items()}
    prev = {n: torch.randn(s, generator=gen).to(dev) for n, s in shapes.items()}
    n = sum(t.numel() for t in grads.values())
    dt = "float32"
    for pct in (1.0, 30.0):
        wl = f"gpt2-4x512 {n / 1e6:.1f}M/{len(grads)}t top{pct:g}%"
        print(f"[{FAMILY}] {wl}", flush=True)
        base = G.golden_masks([prev], pct)  # the running intersection after one sample
        bits0 = {name: base.masks[name].bits for name in shapes}
        ks = {name: G.percent_to_k(g.numel(), pct) for name, g in grads.items()}
        # agreement first: gradkit's update equals the goldenparams-style loop on distinct-valued data
        got = G.golden_masks([prev, grads], pct).masks.to_bool()
        ref = {name: base.masks[name].to_bool() for name in shapes}
        _goldenparams_style(grads, ref, pct)
        assert all(torch.equal(got[name], ref[name]) for name in shapes), "golden update differs from topk loop"
        bits = {name: b.clone() for name, b in bits0.items()}

        def gradkit_update():
            for name, g in grads.items():
                ops.golden_topk_and_(g, bits[name], ks[name], first=False)

        rec.add(FAMILY, f"per-sample update top{pct:g}%", "gradkit", wl, dt, rec.time(gradkit_update),
                note="golden_topk_and_ per tensor: exact select + AND + popcount, packed bits")
        running = {name: base.masks[name].to_bool() for name in shapes}
        rec.add(FAMILY, f"per-sample update top{pct:g}%", "goldenparams-style", wl, dt,
                rec.time(lambda: _goldenparams_style(grads, running, pct), slow_reps=3),
                note="torch.topk of |g| per tensor -> dense bool mask -> AND (GoldenParams' loop, re-written)")
        rec.add(FAMILY, f"per-sample update top{pct:g}%", "torch kthvalue", wl, dt,
                rec.time(lambda: _kthvalue(grads, running, pct), slow_reps=3),
                note="torch.kthvalue threshold, |g| >= thr, AND (inexact ties)")
