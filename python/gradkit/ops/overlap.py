"""Memory-overlap rules of the in-place ops, host side: the same rules, the same messages and the same argument
named first as the native kernels' (csrc/overlap.h), for the op-level checks (gradkit.ops.check_*) and the Triton
launchers (gradkit.kernels.triton.*). Only addresses are compared; no data is read.

The in-place ops write many tensors at once (threads, GPU programs): a written tensor that shares an element with
another listed tensor (the same tensor twice, overlapping views of one buffer, an expand()ed tensor) races, and a
kernel that runs its blocks in order (the CPU reference's loops, the Triton interpreter) reads what an earlier
block wrote. ``check_no_overlap`` refuses such arguments; a tensor that is only read and may share memory with an
output (``spans_meet``) is read from a copy by the caller instead.

``check_no_overlap`` walks the tensors as csrc/overlap.h does, so that every backend names the same pair when
several conflict: byte ranges sorted by address and grouped into clusters of ranges that meet (transitively); a
cluster whose written tensors are all dense is refused at the first pair of meeting ranges (address order);
otherwise its members are compared element by element in argument order and the first element found to share a
unit with an earlier element (one of the two written) names the pair. Distinct elements of one buffer (rows,
columns, strided slices of a weight) are fine. That exact comparison (clusters with a non-dense written tensor,
i.e. interleaved strided views) sorts every element address of the cluster once.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from gradkit.kernels.reference.scope import addressless, byte_span

__all__ = ["check_no_overlap", "spans_meet"]


def _skip(t) -> bool:
    """Tensors without addresses to compare: absent, empty, or :func:`addressless` (meta / fake, storage-less)."""
    return t is None or t.numel() == 0 or addressless(t)


def _byte_span(t: torch.Tensor) -> Tuple[int, int]:
    """[lo, hi): the bytes t's elements can occupy (t non-empty); kernels.reference.scope.byte_span's rule."""
    return byte_span(t)[1:]


def _elem_offsets(t: torch.Tensor) -> torch.Tensor:
    """The element offset (from t's first element) of every element of t, in row-major order (int64, CPU)."""
    o = torch.zeros((), dtype=torch.int64)
    for n, s in zip(t.shape, t.stride()):
        o = o.unsqueeze(-1) + torch.arange(n, dtype=torch.int64) * s
    return o.reshape(-1)


def _dense(t: torch.Tensor) -> bool:
    """t's elements fill its byte span exactly once (a permutation of a contiguous layout: torch's
    is_non_overlapping_and_dense)."""
    if t.is_contiguous():
        return True
    run = 1
    for s, n in sorted((s, n) for n, s in zip(t.shape, t.stride()) if n > 1):
        if s != run:
            return False
        run *= n
    return True


def _surely_self_disjoint(t: torch.Tensor) -> bool:
    """No two elements of t at one address, by a sufficient test: the dims sorted by stride, each stride exceeds
    the extent of the smaller ones (every view torch makes by slicing, transposing or selecting passes it)."""
    if _dense(t):
        return True
    extent = 0
    for s, n in sorted((s, n) for n, s in zip(t.shape, t.stride()) if n > 1):
        if s <= extent:
            return False
        extent += (n - 1) * s
    return True


def _exact_conflict(named, members) -> Optional[Tuple[int, int]]:
    """csrc/overlap.h's exact_conflict: ``members`` (indices into ``named``, argument order) of one cluster,
    compared element by element in units of g bytes (the gcd of every element's address offset and size).
    The first unit, in argument then row-major order, that an earlier element covers (one of the two written)
    names the pair (earlier member, member); (member, member) when that earlier element is the member's own."""
    spans = [_byte_span(named[i][1]) for i in members]
    lo = min(s[0] for s in spans)
    g = 0
    for i, (slo, _) in zip(members, spans):
        t = named[i][1]
        g = math.gcd(g, slo - lo, t.element_size())
        for n, s in zip(t.shape, t.stride()):
            if n > 1:
                g = math.gcd(g, s * t.element_size())
    units, owner, write = [], [], []
    for k, (i, (slo, _)) in enumerate(zip(members, spans)):
        t = named[i][1]
        per = t.element_size() // g
        u = (_elem_offsets(t) * t.element_size() + (slo - lo)) // g
        if per > 1:
            u = (u.unsqueeze(-1) + torch.arange(per, dtype=torch.int64)).reshape(-1)
        units.append(u)
        owner.append(torch.full((u.numel(),), k, dtype=torch.int64))
        write.append(torch.full((u.numel(),), bool(named[i][2])))
    u, own, w = torch.cat(units), torch.cat(owner), torch.cat(write)
    n = u.numel()
    order = torch.sort(u, stable=True).indices  # by unit, then by position (argument order, row-major)
    us, ws = u[order], w[order]
    new = torch.ones(n, dtype=torch.bool)
    new[1:] = us[1:] != us[:-1]
    gid = torch.cumsum(new.to(torch.int64), 0) - 1
    first = order[new]  # each unit's first position
    first_w = torch.full((int(gid[-1]) + 1,), n, dtype=torch.int64)
    first_w.scatter_reduce_(0, gid[ws], order[ws], "amin")  # each unit's first written position
    bad = (ws & (order > first[gid])) | (first_w[gid] < order)
    if not bool(bad.any()):
        return None
    hit = int(order[bad].min())
    cand = ((u == u[hit]) & (w | w[hit])).nonzero().reshape(-1)  # ascending positions; cand[0] < hit
    o = int(own[int(cand[0])])
    return members[o], members[int(own[hit])]


def check_no_overlap(named: Sequence) -> None:
    """``named``: ``(name, tensor, written)`` in argument order. ValueError (csrc/overlap.h's messages, naming the
    written tensor first) when an element of a written tensor is also an element of another listed tensor
    (written or read) or of itself (an expand()ed tensor). Tensors without elements never conflict; under
    tracing (torch.compile, fake tensors) there are no addresses and nothing is checked (the kernels check)."""
    if torch.compiler.is_dynamo_compiling():
        return
    es = []
    for i, (_, t, _) in enumerate(named):
        if _skip(t):
            continue
        lo, hi = _byte_span(t)
        es.append((str(t.device), lo, hi, i))
    es.sort(key=lambda e: (e[0], e[1], e[3]))

    def fail(a: int, b: int):
        if a == b:
            raise ValueError(f"{named[b][0]}: more than one element of the written-to tensor refers to a single "
                             "memory location (an expand()ed or overlapping view); clone() it first")
        if not named[b][2]:
            a, b = b, a  # name the written one first
        raise ValueError(f"{named[b][0]}: shares memory with {named[a][0]}; the op writes it in place and would "
                         "race (clone() one of them first)")

    c0 = 0
    while c0 < len(es):
        c1, end = c0 + 1, es[c0][2]
        while c1 < len(es) and es[c1][0] == es[c0][0] and es[c1][1] < end:
            end = max(end, es[c1][2])
            c1 += 1
        cl = es[c0:c1]
        c0 = c1
        writes = [e for e in cl if named[e[3]][2]]
        if not writes:
            continue  # only reads here
        if len(cl) == 1:
            if _surely_self_disjoint(named[cl[0][3]][1]):
                continue
        else:
            dense = {e[3]: _dense(named[e[3]][1]) for e in cl}
            if all(dense[e[3]] for e in writes):
                # dense tensors cover every byte of their range: two whose ranges meet (one of them written)
                # share an element
                for a in range(len(cl)):
                    for b in range(a + 1, len(cl)):
                        ia, ib = cl[a][3], cl[b][3]
                        if (named[ia][2] or named[ib][2]) and cl[b][1] < cl[a][2] and cl[a][1] < cl[b][2] \
                                and dense[ia] and dense[ib]:
                            fail(min(ia, ib), max(ia, ib))
        pair = _exact_conflict(named, sorted(e[3] for e in cl))
        if pair is not None:
            fail(*pair)


def spans_meet(t: torch.Tensor, others: Sequence[torch.Tensor]) -> bool:
    """Whether t's byte span meets that of any of ``others`` on its device (conservative: the caller then reads t
    from a copy). False under tracing (no addresses)."""
    if torch.compiler.is_dynamo_compiling() or _skip(t):
        return False
    lo, hi = _byte_span(t)
    for o in others:
        if not _skip(o) and o.device == t.device:
            lo2, hi2 = _byte_span(o)
            if lo < hi2 and lo2 < hi:
                return True
    return False
