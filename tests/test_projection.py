"""gradkit.projection API: seeds, explicit matrices, flat projection (tensor / memmap / chunk
callable), factored per-example projection against the explicitly formed per-example gradient
(per example, per token, mask, bias, Adafactor, Adam), statistical quality (moments, JL), bad input."""
import math
import weakref

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from gradkit import projection as P
from gradkit.kernels.reference import projection as ref


# --------------------------------------------------------------------------- seeds and matrices


def test_derive_seed_is_stable_and_independent():
    s = P.derive_seed(0, "model.layers.0.mlp", "left")
    assert s == P.derive_seed(0, "model.layers.0.mlp", "left")
    assert 0 <= s < 2 ** 63
    assert s == DERIVED  # pinned: blake2b, never Python's hash()
    others = {P.derive_seed(0, "model.layers.0.mlp", "right"), P.derive_seed(1, "model.layers.0.mlp", "left"),
              P.derive_seed(0, "model.layers.1.mlp", "left"), P.derive_seed(0, "", ""), P.derive_seed(-3)}
    assert s not in others and len(others) == 5
    # no ambiguity between name and side boundaries
    assert P.derive_seed(0, "a/b", "c") != P.derive_seed(0, "a", "b/c")


def _blake(seed, name, side):
    import hashlib

    msg = f"gradkit.projection/{seed}/{len(name)}:{name}/{side}".encode()
    return int.from_bytes(hashlib.blake2b(msg, digest_size=8).digest(), "little") & (2 ** 63 - 1)


DERIVED = _blake(0, "model.layers.0.mlp", "left")


def test_projection_matrix_api_matches_reference_and_scale():
    M = P.projection_matrix(16, 300, seed=5)
    assert torch.equal(M, ref.matrix_values(16, 300, 5, 0, 16))
    assert torch.all(M.abs() == torch.tensor(1 / math.sqrt(16), dtype=torch.float32))
    sub = P.projection_matrix(4, 100, seed=5, row0=3, col0=50, k=16)
    assert torch.equal(sub, M[3:7, 50:150])
    with pytest.raises(ValueError, match=r"^k: required when row0 > 0"):
        P.projection_matrix(4, 100, seed=5, row0=3)
    G = P.projection_matrix(8, 64, seed=5, kind="gaussian", dtype=torch.float64)
    assert G.dtype == torch.float64


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_moments(kind):
    """Entries have mean 0 and variance 1/k: |mean| < 5 sd of the sample mean, |k var - 1| < 5 sd."""
    k, D = 256, 4096
    M = P.projection_matrix(k, D, seed=123, kind=kind).double() * math.sqrt(k)  # unit-variance entries
    n = M.numel()
    assert abs(M.mean().item()) < 5 / math.sqrt(n)
    var = M.var().item()
    assert abs(var - 1) < 5 * math.sqrt(2 / n) + (1e-12 if kind == "rademacher" else 0)
    # every row and every column balanced (catches a stuck bit / correlated rows)
    assert M.mean(1).abs().max().item() < 5.5 / math.sqrt(D)
    assert M.mean(0).abs().max().item() < 5.5 / math.sqrt(k)
    if kind == "gaussian":  # shape: P(|z| < 1) = 0.6827, kurtosis 3
        frac = (M.abs() < 1).double().mean().item()
        assert abs(frac - 0.682689) < 5 * math.sqrt(0.6827 * 0.3173 / n)
        kurt = (M ** 4).mean().item()
        assert abs(kurt - 3) < 5 * math.sqrt(96 / n)
    else:  # each of the 64 bit positions of a word is balanced
        pos = (M > 0).double().reshape(k, D // 64, 64).mean((0, 1))
        assert (pos - 0.5).abs().max().item() < 5 * 0.5 / math.sqrt(k * D / 64)


def _jl_max_violation(R, X):
    """max over pairs |<Rx,Ry> - <x,y>| / bound(pair), bound = sqrt(2 (1 + <x,y>^2) log(2/delta) / k)
    (sub-Gaussian tail with the variance (1 + rho^2)/k of a JL inner product), delta = 1e-6 / pairs."""
    k = R.shape[0]
    Y = X @ R.T
    gram, gram_p = X @ X.T, Y @ Y.T
    n = X.shape[0]
    iu = torch.triu_indices(n, n)
    delta = 1e-6 / iu.shape[1]
    rho = gram[iu[0], iu[1]]
    bound = torch.sqrt(2 * (1 + rho ** 2) * math.log(2 / delta) / k)
    return ((gram_p - gram)[iu[0], iu[1]].abs() / bound).max().item()


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
@pytest.mark.parametrize("k", [64, 512])
def test_johnson_lindenstrauss_inner_products(kind, k):
    """Inner products of 24 random unit vectors (plus correlated pairs) are preserved within the
    JL distortion for k at failure probability 1e-6 (union bound over the pairs); a degenerate
    matrix (all rows equal) fails the same check."""
    g = torch.Generator().manual_seed(k)
    D = 3000
    X = torch.randn(24, D, generator=g, dtype=torch.float64)
    X[12:] = X[:12] + 0.5 * X[12:]  # correlated pairs
    X = X / X.norm(dim=1, keepdim=True)
    R = P.projection_matrix(k, D, seed=77, kind=kind).double()
    assert _jl_max_violation(R, X) <= 1.0
    bad = R[:1].expand(k, D)
    assert _jl_max_violation(bad, X) > 1.0
    # the projected vectors via project() are the same
    Y = P.project(X.float(), k, seed=77, kind=kind)
    torch.testing.assert_close(Y.double(), X @ R.T, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- flat projection


@given(B=st.integers(1, 6), D=st.integers(1, 900), k=st.integers(1, 200), chunk=st.one_of(st.none(), st.integers(1, 400)),
       seed=st.integers(0, 2 ** 63 - 1), kind=st.sampled_from(["rademacher", "gaussian"]))
def test_project_equals_explicit_matrix(B, D, k, chunk, seed, kind):
    g = torch.Generator().manual_seed(seed % 1009)
    x = torch.randn(B, D, generator=g)
    got = P.project(x, k, seed=seed, kind=kind, chunk=chunk)
    R = P.projection_matrix(k, D, seed=seed, kind=kind)
    want = x.double() @ R.double().T
    assert got.shape == (B, k) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=2e-6 * math.sqrt(D) * 4 / math.sqrt(k) + 1e-6)


def test_project_memmap_callable_iterable_and_out(tmp_path):
    B, D, k = 3, 5000, 48
    x = np.random.default_rng(0).standard_normal((B, D)).astype(np.float32)
    mm = np.lib.format.open_memmap(str(tmp_path / "g.npy"), mode="w+", dtype=np.float32, shape=(B, D))
    mm[:] = x
    mm.flush()
    want = P.project(torch.from_numpy(x), k, seed=4)
    ro = np.load(str(tmp_path / "g.npy"), mmap_mode="r", allow_pickle=False)
    torch.testing.assert_close(P.project(ro, k, seed=4), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(P.project(ro, k, seed=4, chunk=777), want, rtol=1e-5, atol=1e-5)
    pieces = [x[:, :1000], x[:, 1000:1001], x[:, 1001:]]
    torch.testing.assert_close(P.project(lambda: iter(pieces), k, seed=4), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(P.project((torch.from_numpy(p) for p in pieces), k, seed=4), want, rtol=1e-5,
                               atol=1e-5)
    out = torch.full((B, k), 7.0)
    res = P.project(torch.from_numpy(x), k, seed=4, out=out)
    assert res is out
    torch.testing.assert_close(out, want)
    for dt in (torch.float16, torch.bfloat16):
        xl = torch.from_numpy(x).to(dt)
        torch.testing.assert_close(P.project(xl, k, seed=4), P.project(xl.float(), k, seed=4), rtol=1e-5, atol=1e-5)


def test_project_bad_inputs():
    x = torch.randn(2, 10)
    with pytest.raises(ValueError, match=r"^k: must be positive, got 0$"):
        P.project(x, 0)
    with pytest.raises(ValueError, match=r"^kind: expected 'rademacher' or 'gaussian', got 'uniform'$"):
        P.project(x, 4, kind="uniform")
    with pytest.raises(ValueError, match=r"^seed: must be a non-negative 63-bit integer, got -1\b"):
        P.project(x, 4, seed=-1)
    with pytest.raises(ValueError, match=r"^x: expected a 2-D \(B, D\) array, got shape \(10,\)$"):
        P.project(torch.randn(10), 4)
    with pytest.raises(TypeError, match=r"^x: expected float32/float16/bfloat16/float64, got torch\.int64$"):
        P.project(torch.ones(2, 10, dtype=torch.int64), 4)
    with pytest.raises(TypeError, match=r"^x: expected a tensor, a numpy array, or a callable/iterable .* got int$"):
        P.project(42, 4)
    with pytest.raises(ValueError, match=r"^out: expected a \(B, 4\) float32 tensor$"):
        P.project(x, 4, out=torch.empty(2, 5))
    with pytest.raises(ValueError, match=r"^chunk: must be positive, got 0$"):
        P.project(x, 4, chunk=0)
    with pytest.raises(ValueError, match=r"^x chunk at column 3: 3 rows, expected 2$"):
        P.project([torch.randn(2, 3), torch.randn(3, 3)], 4)


# --------------------------------------------------------------------------- factored projection


def _explicit(a, g, p, seed, name, kind, mask, bias, per_token, nz, absolute=False):
    """Form every per-example (or per-token) gradient, normalise it, project with L and R.
    ``absolute``: the same sum over |a|, |g|, |L|, |R| (every term's magnitude: the scale of a
    rounding-error bound)."""
    a, g = a.double(), g.double()
    B, T, I = a.shape
    O = g.shape[-1]
    L = P.projection_matrix(p, O, P.derive_seed(seed, name, "left"), kind).double()
    R = P.projection_matrix(p, I + bias, P.derive_seed(seed, name, "right"), kind).double()
    if absolute:
        a, g, L, R = a.abs(), g.abs(), L.abs(), R.abs()
    if bias:
        a = torch.cat([a, torch.ones(B, T, 1, dtype=a.dtype)], -1)
    if mask is not None:
        g = g * mask[..., None]
    Gt = g[..., :, None] * a[..., None, :]
    if isinstance(nz, P.AdafactorNormalizer):
        r, c = nz.row.double() + nz.eps, nz.col.double() + nz.eps
        Gt[..., :I] /= (torch.outer(r, c) / r.mean()).sqrt()
        if bias and nz.bias_avg_sq is not None:
            Gt[..., I] /= (nz.bias_avg_sq.double() + nz.bias_eps).sqrt()
    elif isinstance(nz, P.AdamNormalizer):
        Gt[..., :I] /= nz.v.double().sqrt() + nz.eps
        if bias and nz.bias_avg_sq is not None:
            Gt[..., I] /= nz.bias_avg_sq.double().sqrt() + nz.eps
    G = Gt if per_token else Gt.sum(1)
    return (L @ G @ R.T).flatten(-2)


@given(B=st.integers(1, 4), T=st.integers(1, 6), I=st.integers(1, 9), O=st.integers(1, 9), p=st.integers(1, 6),
       bias=st.booleans(), per_token=st.booleans(), use_mask=st.booleans(),
       nz=st.sampled_from([None, "adafactor", "adafactor-bias", "adam", "adam-bias"]),
       kind=st.sampled_from(["rademacher", "gaussian"]), seed=st.integers(0, 2 ** 40), budget=st.sampled_from([64, 1 << 20]))
def test_factored_project_equals_explicit(B, T, I, O, p, bias, per_token, use_mask, nz, kind, seed, budget):
    gen = torch.Generator().manual_seed(seed % 7919)
    a = torch.randn(B, T, I, generator=gen)
    g = torch.randn(B, T, O, generator=gen)
    mask = (torch.rand(B, T, generator=gen) < 0.7) if use_mask else None
    if mask is not None:  # padding holds garbage, NaN included: it must not leak
        a = torch.where(mask[..., None], a, float("nan"))
    norm = None
    if nz and nz.startswith("adafactor"):
        norm = P.AdafactorNormalizer(torch.rand(O, generator=gen) + 0.1, torch.rand(I, generator=gen) + 0.1,
                                     (torch.rand(O, generator=gen) + 0.1) if nz.endswith("bias") else None)
    elif nz:
        norm = P.AdamNormalizer(torch.rand(O, I, generator=gen) + 0.1,
                                (torch.rand(O, generator=gen) + 0.1) if nz.endswith("bias") else None)
    got = P.factored_project(a, g, p, seed=seed, name="blk.3", kind=kind, mask=mask, bias=bias, per_token=per_token,
                             normalizer=norm, memory_budget=budget)
    want = _explicit(torch.nan_to_num(a), g, p, seed, "blk.3", kind, mask, bias, per_token, norm)
    assert got.shape == ((B, T, p * p) if per_token else (B, p * p)) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * (1 + want.abs().max().item()))


# ---- Adam: G is formed one block at a time within memory_budget

class _AllocTracker(TorchDispatchMode):
    """Every tensor storage an aten op creates inside the block (not a view or in-place result of an
    input's storage), with its size, and when it is freed (a finalizer on the storage): the peak of
    the bytes alive at once. Excluded, as factored_project's contract leaves them out of the
    budget: the masked copies of the inputs (``where`` and its scalar) and the result."""

    EXCLUDED = ("aten.where", "aten.scalar_tensor", "aten._to_copy")

    def __init__(self):
        super().__init__()
        self.events, self.live, self.serial = [], {}, 0
        self.largest = {}  # op name -> largest single output (bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            ptr, nbytes = st.data_ptr(), st.nbytes()
            if nbytes == 0 or ptr in inputs or ptr in self.live:
                continue
            self.serial += 1
            name = str(func)
            self.live[ptr] = self.serial
            self.events.append((self.serial, nbytes, name.startswith(self.EXCLUDED)))
            self.largest[name] = max(self.largest.get(name, 0), nbytes)
            weakref.finalize(st, self._free, ptr, self.serial)
        return out

    def _free(self, ptr, serial):
        if self.live.get(ptr) == serial:
            del self.live[ptr]
        self.events.append((serial, None, None))

    def peak(self, result):
        """Largest number of bytes alive at once, less the excluded allocations and ``result``'s."""
        skip = {self.live.get(result.untyped_storage().data_ptr())}
        skip |= {sr for sr, nb, ex in self.events if ex}
        size, cur, best = {}, 0, 0
        for sr, nb, _ in self.events:
            if sr in skip:
                continue
            if nb is None:
                cur -= size.pop(sr, 0)
            else:
                size[sr] = nb
                cur += nb
                best = max(best, cur)
        return best


def _fp32_bound(a, g, p, seed, name, kind, mask, bias, per_token, nz):
    """Elementwise bound on the float32 error of the Adam path: gamma_K times the sum of the terms'
    magnitudes, K = the most roundings one term goes through in any blocking: T - 1 (the token
    sum of G), I - 1 (G R^T, over column blocks), O - 1 + 2 ceil(O / o) <= 2 O (L Z within a row
    block, then the row blocks' weight and bias sums into the result), 3 products, the division
    and the denominator's sqrt and + eps (the bias factor's sqrt, + eps, reciprocal and product),
    with margin: K = T + 2 (O + I) + 12."""
    T, I, O = a.shape[1], a.shape[-1], g.shape[-1]
    K = T + 2 * (O + I) + 12
    u = 2.0 ** -24
    mag = _explicit(a, g, p, seed, name, kind, mask, bias, per_token, nz, absolute=True)
    return K * u / (1 - K * u) * mag


def _assert_within(got, want, bound):
    err = (got.double() - want).abs()
    worst = (err - bound).max().item() if err.numel() else 0.0
    assert worst <= 0, f"error exceeds the float32 bound by {worst:.3g} (max err {err.max().item():.3g})"


def _adam_case(B, T, O, I, p, bias, bias_sq, seed=0, mask=False):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(B, T, I, generator=gen)
    g = torch.randn(B, T, O, generator=gen)
    m = (torch.rand(B, T, generator=gen) < 0.7) if mask else None
    nz = P.AdamNormalizer(torch.rand(O, I, generator=gen) + 0.01,
                          (torch.rand(O, generator=gen) + 0.01) if bias_sq else None)
    return a, g, m, nz


@pytest.mark.parametrize("budget,split_columns", [(1500, False), (200, True)])
@pytest.mark.parametrize("per_token", [False, True])
def test_adam_forms_g_within_budget(budget, split_columns, per_token):
    """One example's G (4 O I = 3840 bytes) exceeds the budget: G is formed a block of rows (and,
    at 200 bytes, of columns: one row is 160 bytes, and its denominator and G R^T must fit beside
    it) at a time; no bmm output (a block of G), and no set of temporaries alive at once, exceeds
    the budget; the result is the float64 explicit one within float32 rounding."""
    B, T, O, I, p = 3, 5, 24, 40, 6
    assert 4 * O * I > budget and (4 * (2 * I + p) > budget) == split_columns
    a, g, _, nz = _adam_case(B, T, O, I, p, bias=True, bias_sq=True)
    kw = dict(seed=11, name="mlp.fc", bias=True, per_token=per_token, normalizer=nz)
    want = _explicit(a, g, p, 11, "mlp.fc", "rademacher", None, True, per_token, nz)
    bound = _fp32_bound(a, g, p, 11, "mlp.fc", "rademacher", None, True, per_token, nz)
    whole = P.factored_project(a, g, p, memory_budget=1 << 30, **kw)  # also warms the matrix cache
    _assert_within(whole, want, bound)

    with _AllocTracker() as tr:  # the tracker is not vacuous: unbounded, G of every example is alive at once
        res = P.factored_project(a, g, p, memory_budget=1 << 30, **kw)
    assert tr.peak(res) >= 4 * B * (T if per_token else 1) * O * I

    with _AllocTracker() as tr:
        got = P.factored_project(a, g, p, memory_budget=budget, **kw)
    g_block = tr.largest["aten.bmm.default"]
    assert g_block <= budget and g_block < 4 * O * I
    if split_columns:
        assert g_block < 4 * I  # not even one whole row
    assert 0 < tr.peak(got) <= budget
    _assert_within(got, want, bound)
    _assert_within(got, whole.double(), 2 * bound)


def test_adam_budgets_agree():
    """The smallest workable budget (one entry of G, its denominator and a p-row of G R^T), one
    splitting rows, one splitting examples only and an unbounded one give the same values (the
    float64 explicit ones, within float32 rounding), per example and per token, with mask and bias."""
    B, T, O, I, p = 4, 3, 9, 7, 5
    a, g, mask, nz = _adam_case(B, T, O, I, p, bias=True, bias_sq=True, seed=3, mask=True)
    a = torch.where(mask[..., None], a, float("nan"))  # padding holds garbage: it must not leak
    budgets = [4 * (p + 2), 4 * (2 * I + p) * 3, 4 * (O * I + 2 * O * (I + p)), 1 << 30]
    for per_token in (False, True):
        kw = dict(seed=5, name="attn.q", mask=mask, bias=True, per_token=per_token, normalizer=nz)
        args = (torch.nan_to_num(a), g, p, 5, "attn.q", "rademacher", mask, True, per_token, nz)
        want, bound = _explicit(*args), _fp32_bound(*args)
        results = [P.factored_project(a, g, p, memory_budget=b, **kw) for b in budgets]
        for r in results:
            assert r.shape == want.shape and r.dtype == torch.float32 and torch.isfinite(r).all()
            _assert_within(r, want, bound)
            _assert_within(r, results[-1].double(), 2 * bound)


@given(B=st.integers(1, 3), T=st.integers(1, 4), O=st.integers(1, 12), I=st.integers(1, 12), p=st.integers(1, 6),
       bias=st.booleans(), bias_sq=st.booleans(), per_token=st.booleans(), use_mask=st.booleans(),
       seed=st.integers(0, 2 ** 40), data=st.data())
def test_adam_budget_property(B, T, O, I, p, bias, bias_sq, per_token, use_mask, seed, data):
    """Any shape and any budget from the minimum up: the blocks of G and the temporaries alive at once
    stay within the budget, and the result is the float64 explicit one within float32 rounding."""
    least = 4 * (p + 2)
    budget = data.draw(st.one_of(st.integers(least, 4 * (2 * I + p) + 8),
                                 st.integers(least, 4 * (O * I + 2 * O * (I + p)) * B * T + 64)), label="budget")
    a, g, mask, nz = _adam_case(B, T, O, I, p, bias, bias_sq, seed=seed % 7919, mask=use_mask)
    kw = dict(seed=seed, name="blk.7", mask=mask, bias=bias, per_token=per_token, normalizer=nz)
    P.factored_project(a, g, p, **kw)  # warm the matrix cache (its matrices are not temporaries)
    with _AllocTracker() as tr:
        got = P.factored_project(a, g, p, memory_budget=budget, **kw)
    assert tr.largest["aten.bmm.default"] <= budget
    assert tr.peak(got) <= budget
    args = (a, g, p, seed, "blk.7", "rademacher", mask, bias, per_token, nz)
    assert got.shape == ((B, T, p * p) if per_token else (B, p * p))
    _assert_within(got, _explicit(*args), _fp32_bound(*args))


@pytest.mark.parametrize("budget,exc,pattern", [
    (0, ValueError, r"^memory_budget: must be positive, got 0$"),
    (-4096, ValueError, r"^memory_budget: must be positive, got -4096$"),
    (1024.0, TypeError, r"^memory_budget: expected an int, got float$"),
    ("1024", TypeError, r"^memory_budget: expected an int, got str$"),
    (None, TypeError, r"^memory_budget: expected an int, got NoneType$"),
    (True, TypeError, r"^memory_budget: expected an int, got bool$"),
    (4 * (4 + 2) - 1, ValueError, r"^memory_budget: 23 bytes cannot hold .* at least 24 bytes are needed$"),
])
def test_adam_bad_memory_budget(monkeypatch, budget, exc, pattern):
    """A bad budget (or, with Adam, one under the minimum 4 (p + 2) bytes) is refused before any work:
    not even the projection matrices are made."""
    def no_work(*a, **k):
        raise AssertionError("work started before memory_budget was checked")

    monkeypatch.setattr(P._MATRICES, "get", no_work)
    monkeypatch.setattr(torch, "bmm", no_work)
    a, g, _, nz = _adam_case(2, 3, 5, 4, 4, bias=True, bias_sq=False)
    with pytest.raises(exc, match=pattern):
        P.factored_project(a, g, 4, bias=True, normalizer=nz, memory_budget=budget)


def test_adam_minimum_budget_only_binds_adam():
    """The minimum is the Adam path's; without a normaliser the budget is unused (any positive int)."""
    a, g, _, nz = _adam_case(2, 3, 5, 4, 4, bias=False, bias_sq=False)
    torch.testing.assert_close(P.factored_project(a, g, 4, memory_budget=1), P.factored_project(a, g, 4))
    P.factored_project(a, g, 4, normalizer=nz, memory_budget=24)
    with pytest.raises(ValueError, match=r"^memory_budget: 23 bytes .* at least 24 bytes"):
        P.factored_project(a, g, 4, normalizer=nz, memory_budget=23)


def test_factored_project_2d_inputs_and_bf16():
    a, g = torch.randn(5, 12), torch.randn(5, 7)
    got = P.factored_project(a, g, 4, seed=1, name="x")
    torch.testing.assert_close(got.double(), _explicit(a[:, None], g[:, None], 4, 1, "x", "rademacher", None, False,
                                                       False, None), rtol=1e-5, atol=1e-5)
    ab, gb = a.bfloat16(), g.bfloat16()
    torch.testing.assert_close(P.factored_project(ab, gb, 4, seed=1, name="x"),
                               P.factored_project(ab.float(), gb.float(), 4, seed=1, name="x"))


def test_factored_modules_independent():
    """Adding a module never changes another's matrices: they depend on (seed, name, side) only."""
    a, g = torch.randn(2, 3, 8), torch.randn(2, 3, 5)
    x1 = P.factored_project(a, g, 4, seed=9, name="layer.0")
    P.factored_project(torch.randn(2, 3, 30), torch.randn(2, 3, 40), 4, seed=9, name="layer.1")
    assert torch.equal(x1, P.factored_project(a, g, 4, seed=9, name="layer.0"))
    assert not torch.allclose(x1, P.factored_project(a, g, 4, seed=9, name="layer.1"))


@pytest.mark.parametrize("kw,exc,pattern", [  # each message starts with the argument it names, then why
    (dict(p=0), ValueError, r"^p: must be positive, got 0$"),
    (dict(a=torch.randn(2, 3)), ValueError, r"^g: leading dims \(2, 3\) differ from a's \(2,\)$"),
    (dict(g=torch.randn(2, 4, 5)), ValueError, r"^g: leading dims \(2, 4\) differ from a's \(2, 3\)$"),
    (dict(a=torch.ones(2, 3, 4, dtype=torch.int64)), TypeError, r"^a: expected a floating tensor, got torch\.int64$"),
    (dict(mask=torch.ones(2, 4)), ValueError, r"^mask: expected a bool tensor of shape \(2, 3\)$"),
    (dict(mask=torch.ones(3, 3, dtype=torch.bool)), ValueError, r"^mask: expected a bool tensor of shape \(2, 3\)$"),
    (dict(normalizer=P.AdafactorNormalizer(torch.ones(6), torch.ones(4))), ValueError,
     r"^normalizer: row/col must have 5/4 entries, got 6/4$"),
    (dict(normalizer=P.AdamNormalizer(torch.ones(5, 5))), ValueError,
     r"^normalizer: v must have shape \(5, 4\), got \(5, 5\)$"),
    (dict(normalizer="adam"), TypeError,
     r"^normalizer: expected None, AdafactorNormalizer or AdamNormalizer, got str$"),
    (dict(kind="x"), ValueError, r"^kind: expected 'rademacher' or 'gaussian', got 'x'$"),
    (dict(memory_budget=0), ValueError, r"^memory_budget: must be positive, got 0$"),
])
def test_factored_bad_inputs(kw, exc, pattern):
    args = dict(a=torch.randn(2, 3, 4), g=torch.randn(2, 3, 5), p=4)
    args.update(kw)
    with pytest.raises(exc, match=pattern):
        P.factored_project(**args)


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_project_gives_gradients(kind):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 90, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    (P.project(x, 6, 5, kind).double() * w).sum().backward()
    R = P.projection_matrix(6, 90, 5, kind, dtype=torch.float64)
    torch.testing.assert_close(x.grad, w @ R)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("per_token", [False, True])
def test_factored_project_gives_gradients(bias, per_token):
    gen = torch.Generator().manual_seed(3)
    B, T, I, O, p = 2, 3, 5, 4, 3
    a = torch.randn(B, T, I, generator=gen, requires_grad=True)
    g = torch.randn(B, T, O, generator=gen, requires_grad=True)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    res = P.factored_project(a, g, p, seed=1, name="m", mask=mask, bias=bias, per_token=per_token)
    w = torch.randn(res.shape, generator=gen)
    (res * w).sum().backward()
    L = P.projection_matrix(p, O, P.derive_seed(1, "m", "left"), dtype=torch.float64)
    Rf = P.projection_matrix(p, I + int(bias), P.derive_seed(1, "m", "right"), dtype=torch.float64)
    ad, gd = a.detach().double().requires_grad_(), g.detach().double().requires_grad_()
    m = mask.double()[..., None]
    ax = torch.cat([ad, torch.ones(B, T, 1, dtype=torch.float64)], -1) if bias else ad
    if per_token:
        want = torch.einsum("po,bto,bti,qi->btpq", L, gd * m, ax * m, Rf).reshape(B, T, p * p)
    else:
        want = torch.einsum("po,bto,bti,qi->bpq", L, gd * m, ax * m, Rf).reshape(B, p * p)
    (want * w.double()).sum().backward()
    torch.testing.assert_close(a.grad.double(), ad.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g.grad.double(), gd.grad, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- out= refused before any work


def _counting_chunks(B, widths, pulled):
    gen = torch.Generator().manual_seed(0)
    for w in widths:
        pulled.append(w)
        yield torch.randn(B, w, generator=gen)


@pytest.mark.parametrize("source", ["iterable", "callable"])
def test_project_out_rows_checked_on_first_chunk(source):
    pulled = []
    src = _counting_chunks(3, [4, 5, 6], pulled)
    x = (lambda: src) if source == "callable" else src
    with pytest.raises(ValueError, match="^out:"):
        P.project(x, 7, out=torch.empty(4, 7))
    assert pulled == [4]  # refused at the first chunk, the stream not consumed


def test_project_out_device_checked_up_front():
    bad = torch.empty(3, 7, device="meta")
    with pytest.raises(ValueError, match="^out:"):
        P.project(np.ones((3, 20), np.float32), 7, out=bad)
    pulled = []
    with pytest.raises(ValueError, match="^out:"):
        P.project(_counting_chunks(3, [4, 5, 6], pulled), 7, out=bad)
    assert pulled == [4]
    with pytest.raises(ValueError, match="^out:"):
        P.project(torch.ones(3, 20), 7, chunk=5, out=bad)


def test_project_array_without_columns_gives_zeros():
    for x in (np.zeros((3, 0), np.float32), np.zeros((0, 0), np.float32)):
        r = P.project(x, 7)
        assert r.shape == (x.shape[0], 7) and r.dtype == torch.float32 and not r.any()
    assert torch.equal(P.project(np.zeros((3, 0), np.float32), 7), P.project(torch.zeros(3, 0), 7))


@pytest.mark.parametrize("field,kw", [("eps", {"eps": 0.0}), ("eps", {"eps": -1e-8}), ("bias_eps", {"bias_eps": 0.0}),
                                      ("bias_eps", {"bias_eps": -1.0}), ("row", {"row": -torch.ones(4)}),
                                      ("col", {"col": torch.tensor([1.0, -1e-3, 0.0, 2.0, 1.0])}),
                                      ("bias_avg_sq", {"bias_avg_sq": -torch.ones(4)})])
def test_adafactor_normalizer_refuses_bad_values(field, kw):
    args = {"row": torch.ones(4), "col": torch.ones(5)}
    args.update(kw)
    with pytest.raises(ValueError, match=f"^{field}:"):
        P.AdafactorNormalizer(**args)


def test_projection_matrix_refuses_rows_past_k():
    with pytest.raises(ValueError, match="^rows:"):
        P.projection_matrix(3, 5, row0=2, k=4)
    with pytest.raises(ValueError, match="^rows:"):
        P.projection_matrix(5, 5, k=4)
    full = P.projection_matrix(4, 5, 1)
    assert torch.equal(P.projection_matrix(2, 5, 1, row0=2, k=4), full[2:])
