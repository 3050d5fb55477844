"""Plain-PyTorch oracle for the search family: blocked scoring with a running top-k.

``score_topk(queries, keys, k, largest, key_scale, scores_in, idx_in, base)``

* ``queries``: (Q, D) float32; ``keys``: (N, D) float32/float16/bfloat16 (upcast to float32);
  ``key_scale``: (N,) float32 or None.
* Candidate scores ``score[q, j] = (queries[q] . float(keys[j])) * key_scale[j]`` with index
  ``base + j``, together with the running top-k ``(scores_in, idx_in)`` (Q, k_in) (an entry
  whose index is -1 is an empty slot and is never a candidate).
* Returns ``(scores, indices)`` (Q, k) float32 / int64: the ``k`` best candidates per query,
  best first, where best means the highest score (``largest``) or the lowest score
  (``not largest``); equal scores are ordered lowest index first. A NaN score ranks as -inf
  (largest) or +inf (smallest) and is reported as that value. When a query has fewer than
  ``k`` candidates, the remaining slots are ``(-inf, -1)`` (largest) or ``(+inf, -1)``.

Merging is associative: scoring keys in blocks and feeding each block's result back as
``scores_in``/``idx_in`` with ``base`` = the block's first index gives the same result as one
call over all keys (up to float rounding of the products, which the blocks do not change here).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def select_topk(scores: torch.Tensor, idx: torch.Tensor, k: int, largest: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The k best (score, index) pairs per row of candidates (Q, M); see the module docstring."""
    Q, M = scores.shape
    inf = float("inf")
    pad = -inf if largest else inf
    s = torch.nan_to_num(scores.float(), nan=pad, posinf=inf, neginf=-inf)
    valid = idx >= 0
    key = s if largest else -s
    big = torch.iinfo(torch.int64).max
    # lexicographic order (valid first, key desc, index asc) by stable sorts, last key first
    order = torch.sort(torch.where(valid, idx, torch.full_like(idx, big)), dim=1, stable=True).indices
    key_o = key.gather(1, order)
    order = order.gather(1, torch.sort(key_o, dim=1, descending=True, stable=True).indices)
    valid_o = valid.gather(1, order)
    order = order.gather(1, torch.sort((~valid_o).to(torch.int8), dim=1, stable=True).indices)
    m = min(k, M)
    out_s = torch.full((Q, k), pad, dtype=torch.float32, device=scores.device)
    out_i = torch.full((Q, k), -1, dtype=torch.int64, device=scores.device)
    top = order[:, :m]
    v = valid.gather(1, top)
    out_s[:, :m] = torch.where(v, s.gather(1, top), torch.full_like(s.gather(1, top), pad))
    out_i[:, :m] = torch.where(v, idx.gather(1, top), torch.full_like(top, -1))
    return out_s, out_i


def score_topk(queries: torch.Tensor, keys: torch.Tensor, k: int, largest: bool, key_scale: Optional[torch.Tensor],
               scores_in: Optional[torch.Tensor], idx_in: Optional[torch.Tensor],
               base: int) -> Tuple[torch.Tensor, torch.Tensor]:
    Q = queries.shape[0]
    N = keys.shape[0]
    s = queries.float() @ keys.float().T
    if key_scale is not None:
        s = s * key_scale.float()[None, :]
    idx = (base + torch.arange(N, dtype=torch.int64, device=queries.device)).expand(Q, N)
    if scores_in is not None:
        s = torch.cat([scores_in.float(), s], dim=1)
        idx = torch.cat([idx_in.to(torch.int64), idx], dim=1)
    return select_topk(s, idx, int(k), bool(largest))
