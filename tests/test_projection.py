"""gradkit.projection API: seeds, explicit matrices, flat projection (tensor / memmap / chunk
callable), factored per-example projection against the explicitly formed per-example gradient
(per example, per token, mask, bias, Adafactor, Adam), statistical quality (moments, JL), bad input."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

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
    with pytest.raises(ValueError, match="k"):
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
    with pytest.raises(ValueError, match="k"):
        P.project(x, 0)
    with pytest.raises(ValueError, match="kind"):
        P.project(x, 4, kind="uniform")
    with pytest.raises(ValueError, match="seed"):
        P.project(x, 4, seed=-1)
    with pytest.raises(ValueError, match="x"):
        P.project(torch.randn(10), 4)
    with pytest.raises(TypeError, match="x"):
        P.project(torch.ones(2, 10, dtype=torch.int64), 4)
    with pytest.raises(TypeError, match="x"):
        P.project(42, 4)
    with pytest.raises(ValueError, match="out"):
        P.project(x, 4, out=torch.empty(2, 5))
    with pytest.raises(ValueError, match="chunk"):
        P.project(x, 4, chunk=0)
    with pytest.raises(ValueError, match="x chunk"):
        P.project([torch.randn(2, 3), torch.randn(3, 3)], 4)


# --------------------------------------------------------------------------- factored projection


def _explicit(a, g, p, seed, name, kind, mask, bias, per_token, nz):
    """Form every per-example (or per-token) gradient, normalise it, project with L and R."""
    a, g = a.double(), g.double()
    B, T, I = a.shape
    O = g.shape[-1]
    L = P.projection_matrix(p, O, P.derive_seed(seed, name, "left"), kind).double()
    R = P.projection_matrix(p, I + bias, P.derive_seed(seed, name, "right"), kind).double()
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


@pytest.mark.parametrize("kw,exc,arg", [
    (dict(p=0), ValueError, "p"),
    (dict(a=torch.randn(2, 3)), ValueError, "g"),
    (dict(g=torch.randn(2, 4, 5)), ValueError, "g"),
    (dict(a=torch.ones(2, 3, 4, dtype=torch.int64)), TypeError, "a"),
    (dict(mask=torch.ones(2, 4)), ValueError, "mask"),
    (dict(mask=torch.ones(3, 3, dtype=torch.bool)), ValueError, "mask"),
    (dict(normalizer=P.AdafactorNormalizer(torch.ones(6), torch.ones(4))), ValueError, "normalizer"),
    (dict(normalizer=P.AdamNormalizer(torch.ones(5, 5))), ValueError, "normalizer"),
    (dict(normalizer="adam"), TypeError, "normalizer"),
    (dict(kind="x"), ValueError, "kind"),
    (dict(memory_budget=0), ValueError, "memory_budget"),
])
def test_factored_bad_inputs(kw, exc, arg):
    args = dict(a=torch.randn(2, 3, 4), g=torch.randn(2, 3, 5), p=4)
    args.update(kw)
    with pytest.raises(exc, match=arg):
        P.factored_project(**args)
