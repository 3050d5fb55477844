"""obs_select (obs family): the native kernel against the plain-PyTorch reference (hypothesis,
integer-valued weights so that equal costs are common and the tie rule decides, NaN / inf / zero and
negative d, strided views), large multi-task cases over every selection path (AVX2 tiles with
in-register and padded transposes, nth_element for gs > 32), the portable scalar path
(GRADKIT_OBS_SCALAR=1, in a subprocess), the reference against an independent python oracle,
backend routing, validation and opcheck."""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, strategies as st

from conftest import DEVICES, use_backend
from gradkit import _ext, ops
from gradkit.kernels.reference import obs as ref

pytestmark = pytest.mark.skipif(not _ext.LOADED, reason="compiled extension not built")

NAN, INF = float("nan"), float("inf")


def _oracle(w, d, gs, bk, num_prune, eps):
    """Independent oracle: python float32 arithmetic per element, sorted() on (cost, block) tuples."""
    import numpy as np

    n, nb = w.shape
    nq = nb // (gs * bk)
    W, D = w.numpy().astype(np.float32), d.numpy().astype(np.float32)
    e32 = np.float32(eps)
    out = []
    with np.errstate(all="ignore"):
        for r in range(n):
            row = []
            for q in range(nq):
                costs = []
                for b in range(gs):
                    c = None
                    for j in range(bk):
                        e = (q * gs + b) * bk + j
                        t = np.float32(W[r, e] * W[r, e]) / np.float32(D[r, e] + e32)
                        c = t if c is None else np.float32(c + t)
                    c = float(c)
                    costs.append((INF if math.isnan(c) else c, b))
                chosen = sorted(b for _, b in sorted(costs)[:num_prune])
                row += [(q * gs + b) * bk + j for b in chosen for j in range(bk)]
            out.append(row)
    return torch.tensor(out, dtype=torch.int64).reshape(n, nq * num_prune * bk)


@st.composite
def problems(draw, max_n=40, max_nq=20, max_gs=8, max_bk=4):
    n = draw(st.integers(1, max_n))
    nq = draw(st.integers(1, max_nq))
    gs = draw(st.integers(1, max_gs))
    bk = draw(st.integers(1, max_bk))
    num_prune = draw(st.integers(0, gs))
    nb = nq * gs * bk
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    spread = draw(st.sampled_from([1, 2, 3]))
    w = torch.randint(-spread, spread + 1, (n, nb), generator=g).float()
    d = torch.randint(1, 3, (n, nb), generator=g).float()
    if draw(st.booleans()):  # NaN / inf weights (NaN costs rank as +inf, inf / inf is NaN)
        r = torch.rand(n, nb, generator=g)
        w[r < 0.05] = NAN
        w[(r >= 0.05) & (r < 0.08)] = INF
    if draw(st.booleans()):  # d not positive: zero (w^2 / eps, or inf / NaN with eps = 0) and negative
        r = torch.rand(n, nb, generator=g)
        d[r < 0.1] = 0.0
        d[(r >= 0.1) & (r < 0.15)] = -1.0
    if draw(st.booleans()):  # strided views: a column window of a wider array, a transposed buffer
        w = torch.cat([w, torch.zeros(n, 3)], 1)[:, :nb]
        d = d.t().contiguous().t()
    eps = draw(st.sampled_from([0.0, 1e-8, 0.25]))
    return w, d, gs, bk, num_prune, eps


@given(problems())
def test_matches_reference(p):
    w, d, gs, bk, num_prune, eps = p
    w0, d0 = w.clone(), d.clone()
    got = ops.obs_select(w, d, gs, bk, num_prune, eps)
    want = ref.obs_select(w, d, gs, bk, num_prune, eps)
    assert got.dtype == torch.int64 and got.shape == want.shape
    assert torch.equal(got, want)
    torch.testing.assert_close(w, w0, rtol=0, atol=0, equal_nan=True)  # inputs untouched
    torch.testing.assert_close(d, d0, rtol=0, atol=0, equal_nan=True)


@given(problems(max_n=4, max_nq=4, max_gs=6, max_bk=3))
def test_reference_matches_independent_oracle(p):
    w, d, gs, bk, num_prune, eps = p
    assert torch.equal(ref.obs_select(w, d, gs, bk, num_prune, eps), _oracle(w, d, gs, bk, num_prune, eps))


def _mixed(n, nb, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.where(torch.rand(n, nb, generator=g) < 0.5, torch.randint(-2, 3, (n, nb), generator=g).float(),
                    torch.randn(n, nb, generator=g))
    d = torch.where(torch.rand(n, nb, generator=g) < 0.5, torch.ones(n, nb), torch.rand(n, nb, generator=g) + 0.1)
    w[torch.rand(n, nb, generator=g) < 0.01] = NAN
    return w, d


@pytest.mark.parametrize("gs,bk", [(2, 1), (4, 1), (8, 1), (3, 1), (16, 1), (12, 2), (32, 1), (20, 3), (40, 1),
                                   (64, 2), (4, 4)])
def test_large_multitask(gs, bk):
    """Many parallel tasks and batches; every selection path: AVX2 in-register transposes (gs 2, 4,
    8), padded tiles (3, 12, 16, 20, 32), nth_element (40, 64); ties and NaN; rows not a whole
    number of tiles."""
    nq = max(1, 3072 // (gs * bk))
    w, d = _mixed(101, nq * gs * bk, gs * 10 + bk)
    for num_prune in sorted({1, gs // 2, gs - 1, gs} - {0}):
        got = ops.obs_select(w, d, gs, bk, num_prune, 1e-8)
        assert torch.equal(got, ref.obs_select(w, d, gs, bk, num_prune, 1e-8)), num_prune


def test_portable_scalar_path():
    """GRADKIT_OBS_SCALAR=1 (read once per process) selects the portable path that CPUs without AVX2 run."""
    code = textwrap.dedent("""
        import torch
        from gradkit import ops
        from gradkit.kernels.reference import obs as ref
        g = torch.Generator().manual_seed(3)
        for gs, bk in [(1, 1), (2, 1), (3, 2), (4, 1), (5, 1), (8, 3), (16, 1), (17, 2), (33, 1)]:
            nb = 40 * gs * bk
            for n in (1, 7, 90):
                w = torch.randint(-2, 3, (n, nb), generator=g).float()
                w[torch.rand(n, nb, generator=g) < 0.03] = float("nan")
                d = torch.randint(0, 3, (n, nb), generator=g).float()
                for num_prune in sorted({1, gs // 2, gs}):
                    got = ops.obs_select(w, d, gs, bk, num_prune, 0.5)
                    assert torch.equal(got, ref.obs_select(w, d, gs, bk, num_prune, 0.5)), (gs, bk, n, num_prune)
        print("scalar-path-ok")
    """)
    env = dict(os.environ, GRADKIT_OBS_SCALAR="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "scalar-path-ok" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]


def test_ties_nan_and_order():
    w = torch.tensor([[1.0, -1.0, 0.0, 2.0, NAN, 3.0, INF, 0.0],
                      [2.0, 2.0, 2.0, 2.0, NAN, NAN, 1.0, INF]])
    d = torch.ones(2, 8)
    # scopes of 4 single-element blocks: costs [1, 1, 0, 4], [inf(NaN), 9, inf, 0]; [4, 4, 4, 4], [inf, inf, 1, inf]
    assert ops.obs_select(w, d, 4, 1, 2, 0.0).tolist() == [[0, 2, 5, 7], [0, 1, 4, 6]]
    assert ops.obs_select(w, d, 4, 1, 3, 0.0).tolist() == [[0, 1, 2, 4, 5, 7], [0, 1, 2, 4, 5, 6]]
    # blocks of 2: costs per row [1+1, 0+4, inf(NaN), inf+0]; [8, 8, inf(NaN), 1+inf]
    assert ops.obs_select(w, d, 4, 2, 1, 0.0).tolist() == [[0, 1], [0, 1]]
    assert ops.obs_select(w, d, 4, 2, 2, 0.0).tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]
    # flipped: [inf, inf(NaN), 4, 2]; [inf, inf(NaN), 8, 8]: the two +inf blocks tie, block 0 first
    assert ops.obs_select(w.flip(1), d, 4, 2, 3, 0.0).tolist() == [[0, 1, 4, 5, 6, 7], [0, 1, 4, 5, 6, 7]]
    assert ops.obs_select(w, d, 4, 2, 3, 0.0).tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]]
    assert ops.obs_select(w, d, 4, 2, 4, 0.0).tolist() == [list(range(8))] * 2
    for num_prune in range(5):
        assert torch.equal(ops.obs_select(w, d, 4, 1, num_prune, 0.0), ref.obs_select(w, d, 4, 1, num_prune, 0.0))


def test_empty_and_degenerate_shapes():
    assert ops.obs_select(torch.ones(3, 8), torch.ones(3, 8), 4, 1, 0, 0.0).shape == (3, 0)
    assert ops.obs_select(torch.ones(0, 8), torch.ones(0, 8), 4, 2, 3, 0.0).shape == (0, 0 + 3 * 2)
    assert ops.obs_select(torch.ones(5, 0), torch.ones(5, 0), 4, 2, 3, 0.0).shape == (5, 0)
    assert torch.ops.gradkit.obs_select(torch.ones(3, 8), torch.ones(3, 8), 4, 1, 0, 0.0).shape == (3, 0)
    # num_prune == gs: every position; gs == 1
    w, d = _mixed(6, 12, 0)
    assert torch.equal(ops.obs_select(w, d, 3, 2, 3, 0.0), torch.arange(12).expand(6, 12))
    assert torch.equal(ops.obs_select(w, d, 1, 3, 1, 0.0), torch.arange(12).expand(6, 12))


def test_backend_routing():
    w, d = _mixed(9, 48, 1)
    want = ref.obs_select(w, d, 4, 3, 2, 1e-8)
    for b in ("native", "reference"):
        with use_backend(b):
            assert torch.equal(ops.obs_select(w, d, 4, 3, 2, 1e-8), want), b


BAD = [
    (lambda w, d: (w.double(), d, 4, 1, 2, 0.0), TypeError, "w:"),
    (lambda w, d: (w, d.half(), 4, 1, 2, 0.0), TypeError, "d:"),
    (lambda w, d: ([[1.0]], d, 4, 1, 2, 0.0), TypeError, "w:"),
    (lambda w, d: (w[0], d[0], 4, 1, 2, 0.0), ValueError, "w:"),
    (lambda w, d: (w, d[:, :4], 4, 1, 2, 0.0), ValueError, "d:"),
    (lambda w, d: (w, d, 0, 1, 0, 0.0), ValueError, "gs:"),
    (lambda w, d: (w, d, 4, 0, 2, 0.0), ValueError, "bk:"),
    (lambda w, d: (w, d, 4, 1, 5, 0.0), ValueError, "num_prune:"),
    (lambda w, d: (w, d, 4, 1, -1, 0.0), ValueError, "num_prune:"),
    (lambda w, d: (w, d, 3, 1, 1, 0.0), ValueError, "w:"),
    (lambda w, d: (w, d, 4, 3, 1, 0.0), ValueError, "w:"),
    (lambda w, d: (w, d, 4, 1, 2, -1e-3), ValueError, "eps:"),
    (lambda w, d: (w, d, 4, 1, 2, INF), ValueError, "eps:"),
    (lambda w, d: (w, d, 4, 1, 2, NAN), ValueError, "eps:"),
    (lambda w, d: (w, d, 4.0, 1, 2, 0.0), TypeError, "gs:"),
    (lambda w, d: (w, d, 4, True, 2, 0.0), TypeError, "bk:"),
    (lambda w, d: (w, d, 4, 1, 2.0, 0.0), TypeError, "num_prune:"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_inputs(case):
    make, exc, word = BAD[case]
    w, d = torch.ones(2, 8), torch.ones(2, 8)
    with pytest.raises(exc, match=word):
        ops.obs_select(*make(w, d))


@pytest.mark.parametrize("args,word", [
    ((torch.ones(2, 8).double(), torch.ones(2, 8), 4, 1, 2, 0.0), "w:"),
    ((torch.ones(2, 8), torch.ones(2, 4), 4, 1, 2, 0.0), "d:"),
    ((torch.ones(2, 8), torch.ones(2, 8), 4, 1, 5, 0.0), "num_prune:"),
    ((torch.ones(2, 8), torch.ones(2, 8), 3, 1, 1, 0.0), "w:"),
    ((torch.ones(2, 8), torch.ones(2, 8), 4, 1, 2, -1.0), "eps:"),
])
def test_bad_inputs_direct_dispatch(args, word):
    """The C++ kernel checks the schema's preconditions itself (dispatcher calls bypass the wrapper)."""
    with pytest.raises((ValueError, TypeError), match=word):
        torch.ops.gradkit.obs_select(*args)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    w, d = _mixed(7, 48, 2)
    w, d = w.to(device), d.to(device)
    for args in ((w, d, 4, 2, 2, 1e-8), (w, d, 3, 1, 0, 0.0), (w, d, 48, 1, 20, 0.5), (w, d, 1, 4, 1, 0.0)):
        torch.library.opcheck(torch.ops.gradkit.obs_select, args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@given(problems())
def test_cuda_matches_reference(p):
    w, d, gs, bk, num_prune, eps = p
    got = ops.obs_select(w.cuda(), d.cuda(), gs, bk, num_prune, eps)
    assert torch.equal(got.cpu(), ref.obs_select(w, d, gs, bk, num_prune, eps))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("gs,bk", [(4, 1), (13, 2), (32, 1), (40, 1), (300, 1), (9000, 1)])
def test_cuda_large(gs, bk):
    nq = max(1, 9000 // (gs * bk))
    w, d = _mixed(33, nq * gs * bk, gs)
    for num_prune in sorted({1, gs // 2, gs}):
        got = ops.obs_select(w.cuda(), d.cuda(), gs, bk, num_prune, 1e-8)
        assert torch.equal(got.cpu(), ref.obs_select(w, d, gs, bk, num_prune, 1e-8)), num_prune
