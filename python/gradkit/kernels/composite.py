"""GPU paths built from library matrix products (cuBLAS on CUDA), for ops where the first H200 run
(benchmarks/results/h200/gpu-issue6.md, 2026-12-04) measured them faster than gradkit's own CUDA C++ and
Triton kernels. ``gradkit.ops`` routes CUDA tensors here under the default backend (``auto``);
``GRADKIT_BACKEND=native`` / ``triton`` still reach the hand-written kernels. Semantics are the ops':
same argument meaning, the same result as ``gradkit.kernels.reference`` up to fp32 rounding, and for
``score_topk`` the same selection rules (ties lowest index first, NaN worst, empty slots).

* ``factored_project``: the factored per-example projection as two products and a batched product in
  float32 (half inputs widened exactly). H200: 0.07 ms against the CUDA C++ kernel's 0.91 ms and Triton's
  0.10 ms (1000 x 1000 Linear, 64 x 128 tokens, p = 16). The CUDA C++ kernel keeps the CPU's bits; this
  path rounds like any cuBLAS product (relative error about 5e-7 against float64 there).
* ``score_topk``: key blocks of ``block`` rows scored by one product each, a ``torch.topk`` of k + 8 per
  block (a NaN-free block whose ties at the k-th best fit; otherwise every entry tied with the k-th is
  gathered through the reference's key), then the reference's exact selection over the small candidate
  set. Memory: one (Q, block) score block. H200 (1,000 queries over 1,000,000 x 256 fp32, top-10): 48.0 ms
  for the first version (NaN mapping, a compare pass and a second topk over every block) against the CUDA
  C++ kernel's 72.0 ms; blocks with plain topk merges took 25.0 ms in the same session. This version does
  one topk and one NaN test per block; it has not been timed on a GPU yet.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from gradkit.kernels.reference.search import select_topk

# keys per score block: (Q, BLOCK) fp32 scores, 0.5 GB at Q = 1000
BLOCK = 131_072
# a block whose ties at the k-th best score add more than this many candidates goes to the exact
# selection whole (correct, slower): only degenerate data (many equal scores) gets there
_TIE_SLACK = 256
# extra entries the first topk of a block takes, so that ties at the k-th best usually fit in one pass
_MARGIN = 8


def factored_project(a: torch.Tensor, g: torch.Tensor, lt: torch.Tensor, rt: torch.Tensor,
                     rb: Optional[torch.Tensor], mask: Optional[torch.Tensor], T: int) -> torch.Tensor:
    N = a.shape[0]
    p = lt.shape[1]
    u = g.float() @ lt
    v = a.float() @ rt
    if rb is not None:
        v = v + rb
    if mask is not None:  # where, not a product: NaN in masked tokens must not reach the sums
        keep = mask[:, None]
        u = torch.where(keep, u, 0.0)
        v = torch.where(keep, v, 0.0)
    B = N // T
    return torch.bmm(u.view(B, T, p).transpose(1, 2), v.view(B, T, p))


def _candidates(s: torch.Tensor, k: int, largest: bool, off: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every entry of the score block s (Q, M) that can be among the k best of any union containing the
    block: the k best by the reference's key and all entries tied with the k-th. (scores, global indices)."""
    Q, M = s.shape

    def whole():
        return s, torch.arange(off, off + M, dtype=torch.int64, device=s.device).expand(Q, M)

    kk = min(k, M)
    if kk == 0 or Q == 0 or M <= kk + _TIE_SLACK:
        return whole()
    m = min(kk + _MARGIN, M)
    if not bool(torch.isnan(s).any()):
        # one topk on the scores: complete when each row's m-th best is strictly worse than its k-th (every
        # entry tied with the k-th is then among the m); no NaN, so topk's order is the reference's key order
        vals, pos = torch.topk(s, m, dim=1, largest=largest)
        if m == M or bool((vals[:, kk - 1] != vals[:, m - 1]).all()):
            return vals, pos + off
    pad = float("-inf") if largest else float("inf")
    key = torch.nan_to_num(s, nan=pad, posinf=float("inf"), neginf=float("-inf"))
    if not largest:
        key = -key
    thr = torch.topk(key, kk, dim=1).values[:, -1:]
    # an entry below the row's k-th best key has kk entries (valid indices) ahead of it in this block
    # alone, so it is never selected; the ones at the threshold are kept for the index tie-break
    cnt = int((key >= thr).sum(1).max())
    if cnt > kk + _TIE_SLACK:
        return whole()
    pos = torch.topk(key, cnt, dim=1).indices  # the cnt largest keys hold every entry >= the row's thr
    return s.gather(1, pos), pos + off


def score_topk(queries: torch.Tensor, keys: torch.Tensor, k: int, largest: bool, key_scale: Optional[torch.Tensor],
               scores_in: Optional[torch.Tensor], idx_in: Optional[torch.Tensor], base: int,
               block: int = BLOCK) -> Tuple[torch.Tensor, torch.Tensor]:
    q = queries.float()
    run_s = None if scores_in is None else scores_in.float()
    run_i = None if idx_in is None else idx_in.to(torch.int64)
    N = keys.shape[0]
    if N == 0:
        empty = torch.empty(queries.shape[0], 0, device=queries.device)
        s = empty if run_s is None else run_s
        i = empty.long() if run_i is None else run_i
        return select_topk(s, i, int(k), bool(largest))
    for s0 in range(0, N, block):
        kb = keys[s0:s0 + block]
        s = q @ kb.float().T
        if key_scale is not None:
            s = s * key_scale[s0:s0 + block].float()[None, :]
        cs, ci = _candidates(s, k, largest, base + s0)
        if run_s is not None:
            cs = torch.cat([run_s, cs], 1)
            ci = torch.cat([run_i, ci], 1)
        run_s, run_i = select_topk(cs, ci, int(k), bool(largest))
    return run_s, run_i
