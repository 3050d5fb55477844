"""Selection family: exact global top-k over many tensors (issue 4's global top-1% target).

Workload: the 148 parameter tensors of GPT-2 small (12 layers, width 768: 124.4M fp32
elements), random scores; k = 1% of all elements. Providers: gradkit's topk_select_segments
(no concatenated copy); plain torch as a user would write it: torch.topk / torch.kthvalue on
torch.cat of the flattened tensors (the cat is part of the cost, and of the memory).
"""
from __future__ import annotations

import torch

from bench_parammap import gpt2_shapes
from gradkit import ops

FAMILY = "select"


def run(rec, quick: bool = False) -> None:
    dev = torch.device(rec.device)
    shapes = gpt2_shapes(n_layer=12, d=768)
    g = torch.Generator().manual_seed(5)
    scores = [torch.rand(s, generator=g).to(dev) for s in shapes.values()]
    n = sum(t.numel() for t in scores)
    k = n // 100
    wl = f"gpt2-small {n / 1e6:.1f}M/{len(scores)}t top1%"
    print(f"[{FAMILY}] workload: {wl} (k={k})", flush=True)
    dt = "float32"
    got = ops.topk_select_segments(scores, k)
    cat = torch.cat([t.reshape(-1) for t in scores])
    kth = torch.topk(cat, k).values.min()
    assert got.numel() == k and bool((cat[got] >= kth).all()), "topk_select_segments disagrees with torch.topk"
    del cat
    rec.add(FAMILY, "global top-1%", "gradkit", wl, dt, rec.time(lambda: ops.topk_select_segments(scores, k)),
            note="positions of the k largest, ascending; no concatenated copy")
    reps = 2 if quick else 3
    rec.add(FAMILY, "global top-1%", "torch.topk(cat)", wl, dt,
            rec.time(lambda: torch.topk(torch.cat([t.reshape(-1) for t in scores]), k, sorted=False),
                     slow_reps=reps), note="torch.topk on torch.cat of the flattened tensors")
    rec.add(FAMILY, "global top-1%", "torch.kthvalue(cat)", wl, dt,
            rec.time(lambda: torch.kthvalue(torch.cat([t.reshape(-1) for t in scores]), n - k + 1),
                     slow_reps=reps), note="the threshold only (no positions)")
