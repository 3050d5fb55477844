"""obs_shared_prune (obs family): shared-inverse OBS subset selection + local compensation.

The native CPU kernel against the plain-PyTorch reference (hypothesis: odd shapes, single-element
scopes and subsets, NaN weights, strided views; results bit-identical: both run the same fp32
arithmetic in the same order), the reference against an independent float64 oracle (subset choice
where the cost gap is clear, weights to 1e-4), the chosen subsets' cost optimality, validation naming
the argument, and opcheck. The Triton kernel is tested in test_obs_triton.py.
"""
from itertools import combinations

import pytest
import torch
from hypothesis import given, strategies as st

from conftest import DEVICES
from gradkit import _ext, ops
from gradkit.kernels.reference import obs as ref

pytestmark = pytest.mark.skipif(not _ext.has_op("obs_shared_prune"), reason="compiled extension not built")


def make(n, nq, E, ns, p, seed, nan=False, spd=True):
    g = torch.Generator().manual_seed(seed)
    K = nq * E
    w = torch.randn(n, K, generator=g)
    if nan and w.numel():
        w.view(-1)[torch.randint(0, w.numel(), (max(1, w.numel() // 17),), generator=g)] = float("nan")
    A = torch.randn(K, K, generator=g)
    c = A @ A.T / K + torch.eye(K) if spd else A
    subsets = list(combinations(range(E), p))
    pick = torch.randperm(len(subsets), generator=g)[:ns].sort().values
    pidx = torch.tensor([subsets[i] for i in pick.tolist()], dtype=torch.int64).reshape(-1, p)
    cols = torch.arange(nq)[:, None, None] * E + pidx[None]  # (nq, ns, p)
    Cs = c[cols[..., :, None], cols[..., None, :]] + 1e-8 * torch.eye(p)
    cinv = torch.cholesky_inverse(torch.linalg.cholesky(Cs.double())).float() if spd else Cs
    return w, c, cinv.contiguous(), pidx


def oracle(w, c, cinv, pidx, E, local):
    """float64, plain python loops over (row, scope)."""
    n, K = w.shape
    nq = K // E
    W, Cd, Ci = w.double(), c.double(), cinv.double()
    out = W.clone()
    subs = torch.empty(n, nq, dtype=torch.long)
    costs = torch.empty(n, nq, pidx.shape[0], dtype=torch.float64)
    for r in range(n):
        for q in range(nq):
            ws = W[r, q * E:(q + 1) * E]
            for s in range(pidx.shape[0]):
                wp = ws[pidx[s]]
                v = float(wp @ Ci[q, s] @ wp)
                costs[r, q, s] = float("inf") if v != v else v
            s = int(torch.argmin(costs[r, q]))
            subs[r, q] = s
            P = pidx[s]
            y = Ci[q, s] @ ws[P]
            kept = torch.tensor([e for e in range(E) if e not in set(P.tolist())], dtype=torch.long)
            if local and kept.numel():
                out[r, q * E + kept] = ws[kept] - Cd[q * E + kept][:, q * E + P] @ y
            out[r, q * E + P] = 0.0
    return out, subs, costs


@st.composite
def problems(draw):
    n = draw(st.integers(0, 9))
    nq = draw(st.integers(1, 5))
    E = draw(st.integers(1, 8))
    p = draw(st.integers(1, min(E, 4)))
    total = len(list(combinations(range(E), p)))
    ns = draw(st.integers(1, min(total, 8)))
    return n, nq, E, ns, p, draw(st.integers(0, 2**31 - 1)), draw(st.booleans()), draw(st.booleans())


@given(problems(), st.booleans(), st.booleans())
def test_native_matches_reference_bitwise(prob, local, strided):
    n, nq, E, ns, p, seed, nan, spd = prob
    w, c, cinv, pidx = make(n, nq, E, ns, p, seed, nan=nan, spd=spd)
    if strided:  # a column window of a wider array; C transposed-and-back (non-contiguous)
        w = torch.cat([w, torch.zeros(n, 3)], 1)[:, :w.shape[1]]
        c = c.t().contiguous().t()
    got_w, got_s = ops.obs_shared_prune(w, c, cinv, pidx, E, local)
    exp_w, exp_s = ref.obs_shared_prune(w, c, cinv, pidx, E, local)
    assert torch.equal(got_s, exp_s)
    torch.testing.assert_close(got_w, exp_w, rtol=0, atol=0, equal_nan=True)


@given(problems(), st.booleans())
def test_reference_matches_float64_oracle(prob, local):
    n, nq, E, ns, p, seed, _, _ = prob
    w, c, cinv, pidx = make(n, nq, E, ns, p, seed)
    got_w, got_s = ref.obs_shared_prune(w, c, cinv, pidx, E, local)
    exp_w, exp_s, costs = oracle(w, c, cinv, pidx, E, local)
    if n == 0:
        return
    # the chosen subset is optimal (float64 costs) up to fp32 rounding; identical where the gap is clear
    chosen = torch.gather(costs, 2, got_s[..., None]).squeeze(2)
    best = costs.min(-1).values
    assert bool(((chosen - best) <= 1e-4 * (1 + best.abs())).all())
    srt = costs.sort(-1).values
    clear = (srt[..., 1] - srt[..., 0] > 1e-3 * (1 + srt[..., 0].abs())) if ns > 1 else torch.ones_like(best).bool()
    assert torch.equal(got_s[clear], exp_s[clear])
    rows = clear.all(1)
    torch.testing.assert_close(got_w[rows].double(), exp_w[rows], rtol=1e-4, atol=1e-4)


def test_pattern_and_ties():
    # equal costs everywhere (w = 0): the lowest subset wins; NaN costs rank last
    w, c, cinv, pidx = make(3, 4, 4, 6, 2, 0)
    w.zero_()
    w[1, 0] = float("nan")  # scope 0 of row 1: every subset touching element 0 costs NaN -> +inf
    for fn in (ops.obs_shared_prune, ref.obs_shared_prune):
        out, sub = fn(w, c, cinv, pidx, 4, True)
        assert sub[0].tolist() == [0, 0, 0, 0]
        nan_subs = [s for s in range(6) if 0 in pidx[s].tolist()]
        assert int(sub[1, 0]) not in nan_subs and int(sub[1, 0]) == min(set(range(6)) - set(nan_subs))
        # exactly p zeros forced per scope at the chosen positions
        P = pidx[sub]  # (n, nq, p)
        assert bool((torch.gather(out.view(3, 4, 4), 2, P) == 0).all())


def test_matches_brute_force_local_obs_on_2_4():
    """2:4 with the true C: local OBS keeps the scope's cheapest pair and moves the rest by C_KP C_PP^-1 w_P."""
    torch.manual_seed(3)
    X = torch.randn(64, 8)
    C = torch.linalg.inv((X.T @ X + 0.1 * torch.eye(8)).double()).float()
    W = torch.randn(5, 8)
    subs = torch.tensor(list(combinations(range(4), 2)))
    cols = torch.arange(2)[:, None, None] * 4 + subs[None]
    Cs = C[cols[..., :, None], cols[..., None, :]].double()
    cinv = torch.linalg.inv(Cs + 1e-8 * torch.eye(2, dtype=torch.float64)).float()
    out, sub = ops.obs_shared_prune(W, C, cinv, subs, 4, True)
    for r in range(5):
        for q in range(2):
            best = None
            for s, P in enumerate(subs.tolist()):
                Pg = [q * 4 + e for e in P]
                wp = W[r, Pg].double()
                cost = float(wp @ torch.linalg.solve(C[Pg][:, Pg].double(), wp))
                if best is None or cost < best[0]:
                    best = (cost, s, Pg)
            assert int(sub[r, q]) == best[1]
            Pg = best[2]
            Kg = [q * 4 + e for e in range(4) if q * 4 + e not in Pg]
            y = torch.linalg.solve(C[Pg][:, Pg].double(), W[r, Pg].double())
            exp = W[r, Kg].double() - C[Kg][:, Pg].double() @ y
            torch.testing.assert_close(out[r, Kg].double(), exp, rtol=1e-4, atol=1e-5)
            assert bool((out[r, Pg] == 0).all())


BAD = [
    (lambda w, c, i, p: (w.double(), c, i, p, 4), TypeError, "w:"),
    (lambda w, c, i, p: (w, c.half(), i, p, 4), TypeError, "c:"),
    (lambda w, c, i, p: (w, c, i, p.int(), 4), TypeError, "pidx:"),
    (lambda w, c, i, p: (w, c, i, p, 3), ValueError, "E:"),
    (lambda w, c, i, p: (w, c[:-1], i, p, 4), ValueError, "c:"),
    (lambda w, c, i, p: (w, c, i[:, :-1], p, 4), ValueError, "cinv:"),
    (lambda w, c, i, p: (w, c, i, p.flip(1), 4), ValueError, "pidx:"),
    (lambda w, c, i, p: (w, c, i, p + 3, 4), ValueError, "pidx:"),
    (lambda w, c, i, p: (w[0], c, i, p, 4), ValueError, "w:"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_inputs(case):
    w, c, cinv, pidx = make(3, 2, 4, 6, 2, 1)
    fn, exc, word = BAD[case]
    with pytest.raises(exc, match=word):
        ops.obs_shared_prune(*fn(w, c, cinv, pidx), True)


@pytest.mark.parametrize("case", [6, 7])
def test_bad_pidx_direct_dispatch(case):
    """The kernels check pidx themselves (a direct torch.ops call skips the wrapper)."""
    w, c, cinv, pidx = make(3, 2, 4, 6, 2, 1)
    fn, _, _ = BAD[case]
    with pytest.raises(ValueError, match="pidx"):
        torch.ops.gradkit.obs_shared_prune(*fn(w, c, cinv, pidx), True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("local", [True, False])
def test_opcheck(device, local):
    w, c, cinv, pidx = make(5, 3, 4, 6, 2, 2)
    args = tuple(t.to(device) for t in (w, c, cinv, pidx)) + (4, local)
    torch.library.opcheck(torch.ops.gradkit.obs_shared_prune, args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@given(problems(), st.booleans())
def test_cuda_matches_reference(prob, local):
    n, nq, E, ns, p, seed, nan, spd = prob
    w, c, cinv, pidx = make(n, nq, E, ns, p, seed, nan=nan, spd=spd)
    got_w, got_s = ops.obs_shared_prune(w.cuda(), c.cuda(), cinv.cuda(), pidx.cuda(), E, local)
    exp_w, exp_s = ref.obs_shared_prune(w, c, cinv, pidx, E, local)
    assert torch.equal(got_s.cpu(), exp_s)
    torch.testing.assert_close(got_w.cpu(), exp_w, rtol=0, atol=0, equal_nan=True)
