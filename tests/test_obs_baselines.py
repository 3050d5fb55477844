"""gradkit.obs baselines (SparseGPT, magnitude, OBD), resolve and output_error against independent
float64 oracles written here: a textbook column-by-column OBS sweep (a fresh inverse of the
remaining Hessian at every column, no lazy blocks, no Cholesky trick), per-row least squares
(torch.linalg.lstsq on X), and the direct ||(W - W') X^T||^2. Plus exact patterns and bad inputs."""
import math

import pytest
import torch
from gradkit.obs.baselines import magnitude, obd, sparsegpt
from gradkit.obs.layout import obs_layout
from gradkit.obs.metrics import NotPositiveDefiniteError, output_error, resolve
from gradkit.scope import BlockSpec, ScopeSpec, View
from hypothesis import given, settings
from hypothesis import strategies as st

F64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _data(m, k, n, seed=0, corr=True, dtype=torch.float32):
    """Weight (m, k) and calibration inputs X (n, k) with a decaying spectrum when corr."""
    g = _gen(seed)
    W = torch.randn(m, k, generator=g, dtype=F64)
    X = torch.randn(n, k, generator=g, dtype=F64)
    if corr:
        X = X * torch.logspace(0, -1.5, k, dtype=F64) @ torch.linalg.qr(torch.randn(k, k, generator=g, dtype=F64))[0]
        X = X + 0.3 * torch.randn(n, 1, generator=g, dtype=F64)  # a shared direction: strong correlations
    return W.to(dtype), X


def _hess(X, dtype=torch.float32):
    return (X.T @ X).to(dtype)


# ----------------------------------------------------------------------------- scopes


def _nm(W, n, m):
    return ScopeSpec(BlockSpec(W, (1, 1)), (1, m)), n


def _rowwise(W, keep_frac=0.5):
    k = W.shape[1]
    return ScopeSpec(BlockSpec(W, (1, 1)), (1, -1)), int(k * keep_frac)


def _pairs(W):  # coupled 2:4: columns j and j+8 of each 16-column tile move together
    return ScopeSpec(BlockSpec(View.pairs(W), (1, 1, 1, 2)), (1, 1, 4, 1)), 2


def _row_pairs(W):  # 16-column blocks, rows p and p+8 of each 16-row chunk compete (keep 1 of 2)
    return ScopeSpec(BlockSpec(View.row_pairs(W), (1, 1, 1, 16)), (1, 1, 2, 1)), 1


def _blocks_1x4(W):  # 1x4 blocks, keep 2 of each 4 consecutive blocks along a row
    return ScopeSpec(BlockSpec(W, (1, 4)), (1, 4)), 2


PATTERNS = {
    "2:4": lambda W: _nm(W, 2, 4),
    "4:8": lambda W: _nm(W, 4, 8),
    "1:4": lambda W: _nm(W, 1, 4),
    "coupled-2:4": _pairs,
    "row-pairs-16": _row_pairs,
    "1x4-blocks-2:4": _blocks_1x4,
    "rowwise-50%": _rowwise,
}


def _block_nnz(W, scope):
    """(S, gs) bool: which blocks hold a non-zero."""
    lay = obs_layout(scope)
    return (W.reshape(-1)[lay.elems] != 0).any(-1)


# ----------------------------------------------------------------------------- oracle SparseGPT


def _ref_sparsegpt(W, H, scope, nnz, damp, blocksize):
    """Textbook sequential OBS, float64, one column at a time. At column j the inverse of the
    Hessian of the remaining columns F = {j..K-1} is recomputed from scratch: a pruned weight w
    at column j costs w^2 / Finv[0,0] and its removal updates W[r, j:] -= w / Finv[0,0] * Finv[0,:].
    Mask rule (the documented definition): a scope spanning <= blocksize columns is decided when
    the sweep reaches its first column; a wider scope prunes, in each blocksize-column window,
    round(P c_b / gs) - round(P c_{b-1} / gs) of its blocks (decided when the window starts).
    Block saliency = sum of w^2 / Finv_c[0,0] over its elements (c = the element's column)."""
    W = W.to(F64).clone()
    H = H.to(F64)
    m, k = W.shape
    diag = H.diagonal()
    lam = damp * float(diag.mean()) if damp < 1 else damp
    Hd = H.clone()
    Hd.diagonal()[diag == 0] = 1.0
    Hd = Hd + lam * torch.eye(k, dtype=F64)
    finv00 = torch.tensor([float(torch.linalg.inv(Hd[c:, c:])[0, 0]) for c in range(k)], dtype=F64)
    lay = obs_layout(scope)
    elems = lay.elems
    S, gs, _ = elems.shape
    cols = elems % k
    pruned = torch.zeros(m * k, dtype=torch.bool)
    p = gs - nnz

    def decide(s, blocks, quota):
        # stable sort descending: among equal scores the lower block index is kept
        wv = W.reshape(-1)
        sc = [float((wv[elems[s, b]] ** 2 / finv00[cols[s, b]]).sum()) for b in blocks]
        order = sorted(range(len(blocks)), key=lambda i: -sc[i])
        for i in order[len(blocks) - quota:]:
            pruned[elems[s, blocks[i]]] = True

    narrow = [int(cols[s].max() - cols[s].min()) + 1 <= blocksize for s in range(S)]
    done = [0] * S
    for j in range(k):
        if j % blocksize == 0:
            for s in range(S):
                if narrow[s]:
                    continue
                lo_b = cols[s].min(1).values
                inwin = [b for b in range(gs) if j <= int(lo_b[b]) < j + blocksize]
                cum = int((lo_b < j + blocksize).sum())
                t = (2 * p * cum + gs) // (2 * gs)
                if inwin and t - done[s] > 0:
                    decide(s, inwin, t - done[s])
                done[s] = t
        for s in range(S):
            if narrow[s] and int(cols[s].min()) == j:
                decide(s, list(range(gs)), p)
        Finv = torch.linalg.inv(Hd[j:, j:])
        for r in range(m):
            if pruned[r * k + j]:
                err = W[r, j] / Finv[0, 0]
                W[r, j:] -= err * Finv[0, :]
                W[r, j] = 0.0
    return W, ~pruned.reshape(m, k)


CASES = [  # (pattern, M, K, blocksize)
    ("2:4", 8, 32, 8),
    ("4:8", 8, 32, 16),
    ("coupled-2:4", 8, 32, 16),
    ("row-pairs-16", 16, 32, 16),
    ("1x4-blocks-2:4", 8, 32, 16),
    ("rowwise-50%", 8, 32, 8),
    ("rowwise-50%", 6, 20, 7),  # windows that do not divide K; uneven quotas
]


@pytest.mark.parametrize("pattern,m,k,bs", CASES)
def test_sparsegpt_matches_unblocked_oracle(pattern, m, k, bs):
    W, X = _data(m, k, 3 * k, seed=m + k + bs, dtype=F64)
    H = _hess(X, F64)
    scope, nnz = PATTERNS[pattern](W)
    got, keep = sparsegpt(scope, H, nnz, damp=0.01, blocksize=bs, dtype=F64, return_mask=True)
    want, want_keep = _ref_sparsegpt(W, H, scope, nnz, 0.01, bs)
    assert torch.equal(keep, want_keep)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-9)
    assert got.dtype == W.dtype and torch.equal(got == 0, ~keep)
    got32 = sparsegpt(PATTERNS[pattern](W.float())[0], H.float(), nnz, blocksize=bs)
    assert got32.dtype == torch.float32 and torch.equal(got32 == 0, ~keep)  # same mask in fp32 here


@settings(max_examples=12)
@given(m=st.sampled_from([4, 8]), kq=st.integers(2, 10), bs=st.sampled_from([4, 8, 12, 64]),
       nm=st.sampled_from([(2, 4), (1, 4), (3, 4)]), unstructured=st.booleans(), seed=st.integers(0, 2 ** 16),
       damp=st.sampled_from([0.01, 0.1, 2.0]))
def test_sparsegpt_oracle_hypothesis(m, kq, bs, nm, unstructured, seed, damp):
    k = 4 * kq
    W, X = _data(m, k, 2 * k, seed=seed, corr=seed % 2 == 0, dtype=F64)
    H = _hess(X, F64)
    if unstructured:
        scope, nnz = ScopeSpec(BlockSpec(W, (1, 1)), (1, -1)), (seed % (k - 1)) + 1
    else:
        scope, nnz = _nm(W, *nm)
    got, keep = sparsegpt(scope, H, nnz, damp=damp, blocksize=bs, dtype=F64, return_mask=True)
    want, want_keep = _ref_sparsegpt(W, H, scope, nnz, damp, bs)
    assert torch.equal(keep, want_keep)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-9)


def test_sparsegpt_fp32_close_to_fp64():
    W, X = _data(64, 128, 512, seed=3)
    H = _hess(X)
    scope, nnz = _nm(W, 2, 4)
    e32 = output_error(W, sparsegpt(scope, H, nnz), H=H)
    e64 = output_error(W, sparsegpt(scope, H, nnz, dtype=F64), H=H)
    assert abs(e32 - e64) <= 1e-3 * e64


def test_sparsegpt_scope_straddling_a_lazy_block_moves_the_boundary():
    # scopes of 6 columns with blocksize 8: the scope on columns 6..11 would straddle column 8, so
    # the lazy blocks become 0..11 and 12..23 (the result equals the unblocked sweep)
    W, X = _data(8, 24, 96, seed=5, dtype=F64)
    H = _hess(X, F64)
    scope = ScopeSpec(BlockSpec(W, (1, 1)), (1, 6))
    got, keep = sparsegpt(scope, H, 3, blocksize=8, dtype=F64, return_mask=True)
    want, want_keep = _ref_sparsegpt(W, H, scope, 3, 0.01, 8)
    assert torch.equal(keep, want_keep)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-9)


# ----------------------------------------------------------------------------- exact patterns


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
@pytest.mark.parametrize("method", ["sparsegpt", "magnitude", "obd"])
def test_pattern_exact(pattern, method):
    W, X = _data(32, 64, 256, seed=11)
    H = _hess(X)
    scope, nnz = PATTERNS[pattern](W)
    before = W.clone()
    if method == "sparsegpt":
        out = sparsegpt(scope, H, nnz, blocksize=16)
    elif method == "magnitude":
        out = magnitude(scope, nnz)
    else:
        out = obd(scope, H, nnz)
    assert torch.equal(W, before)  # not in place
    nzb = _block_nnz(out, scope)
    assert bool((nzb.sum(1) == nnz).all())  # exactly nnz non-zero blocks in every scope
    lay = obs_layout(scope)
    assert int((out.reshape(-1)[lay.elems] == 0).sum()) == lay.S * (lay.gs - nnz) * lay.bk
    if method != "sparsegpt":  # no update: kept weights unchanged
        assert torch.equal(out[out != 0], W[out != 0])


def test_row_pairs_is_joint_across_rows():
    W, X = _data(32, 32, 128, seed=2)
    scope, nnz = _row_pairs(W)
    out = sparsegpt(scope, _hess(X), nnz)
    nz = (out.reshape(2, 2, 8, 2, 16) != 0).any(-1)  # (row chunk, row half, p, col block)
    assert bool((nz.sum(1) == 1).all())  # exactly one of rows p, p+8 keeps each 16-column block


def test_magnitude_and_obd_match_scope_selection():
    W, X = _data(16, 32, 64, seed=4)
    H = _hess(X)
    for make in (_nm, _pairs, _row_pairs):
        scope, nnz = make(W) if make is not _nm else _nm(W, 2, 4)
        ref = W.clone()
        sref = type(scope)(type(scope.block)(View(ref, scope.block.view.shape, scope.block.view.stride),
                                             scope.block.shape), scope.shape)
        sref.hard_threshold(nnz=nnz)
        assert torch.equal(magnitude(scope, nnz), ref)
        # OBD == magnitude of w * sqrt(H_jj)
        scaled = (W * H.diagonal().sqrt()).contiguous()
        sscaled = type(scope)(type(scope.block)(View(scaled, scope.block.view.shape, scope.block.view.stride),
                                                scope.block.shape), scope.shape)
        keep = sscaled.get_masks(nnz, format="param")[sscaled.block]
        assert torch.equal(obd(scope, H, nnz), W * keep)


def test_sparsegpt_beats_magnitude_and_obd():
    W, X = _data(64, 128, 512, seed=7)
    H = _hess(X)
    for pattern in ("2:4", "4:8", "coupled-2:4", "rowwise-50%"):
        scope, nnz = PATTERNS[pattern](W)
        e_s = output_error(W, sparsegpt(scope, H, nnz), X=X.float())
        e_m = output_error(W, magnitude(scope, nnz), X=X.float())
        e_o = output_error(W, obd(scope, H, nnz), X=X.float())
        assert e_s < e_o and e_s < e_m, (pattern, e_s, e_o, e_m)


# ----------------------------------------------------------------------------- resolve


def _lstsq_oracle(W, X, mask, lam=0.0):
    W, X = W.to(F64), X.to(F64)
    m, k = W.shape
    out = torch.zeros(m, k, dtype=F64)
    for r in range(m):
        S = torch.nonzero(mask[r]).squeeze(1)
        if S.numel() == 0:
            continue
        A, b = X[:, S], X @ W[r]
        if lam:
            A = torch.cat([A, math.sqrt(lam) * torch.eye(S.numel(), dtype=F64)])
            b = torch.cat([b, math.sqrt(lam) * W[r, S]])
        out[r, S] = torch.linalg.lstsq(A.unsqueeze(0), b.reshape(1, -1, 1), driver="gels").solution.reshape(-1)
    return out


@settings(max_examples=15)
@given(m=st.integers(1, 9), k=st.integers(1, 40), density=st.floats(0.0, 1.0), seed=st.integers(0, 2 ** 16),
       damp=st.sampled_from([0.0, 0.05, 3.0]))
def test_resolve_matches_lstsq(m, k, density, seed, damp):
    g = _gen(seed)
    W, X = _data(m, k, 2 * k + 3, seed=seed, corr=seed % 2 == 0)
    mask = torch.rand(m, k, generator=g) < density
    H = _hess(X, F64)
    lam = 0.0 if damp == 0 else (damp * float(H.diagonal().mean()) if damp < 1 else damp)
    want = _lstsq_oracle(W, X, mask, lam)
    got = resolve(W.double(), H, mask, damp=damp, dtype=F64, max_batch_bytes=4096)  # tiny batches: many chunks
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-8)
    assert bool((got[~mask] == 0).all())
    got32 = resolve(W, H.float(), mask, damp=damp)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), want, rtol=2e-3, atol=2e-3 * (1 + float(want.abs().max())))


def test_resolve_both_sides_and_full_rows():
    # rows from empty to full support: keep-side solves (|S| <= K/2) and prune-side ones (|S| > K/2)
    W, X = _data(9, 16, 64, seed=9)
    H = _hess(X, F64)
    mask = torch.arange(16).expand(9, 16) < torch.tensor([0, 1, 4, 8, 9, 12, 15, 16, 16]).unsqueeze(1)
    got = resolve(W.double(), H, mask, dtype=F64)
    torch.testing.assert_close(got, _lstsq_oracle(W, X, mask), rtol=1e-7, atol=1e-8)
    assert torch.equal(got[-1], W[-1].double()) and bool((got[0] == 0).all())
    out = torch.full((9, 16), 7.0, dtype=F64)
    assert resolve(W.double(), H, mask, out=out, dtype=F64) is out
    torch.testing.assert_close(out, got)


def test_resolve_on_sparsegpt_mask_improves_error():
    W, X = _data(64, 128, 512, seed=8)
    H = _hess(X)
    for pattern in ("2:4", "4:8", "rowwise-50%"):
        scope, nnz = PATTERNS[pattern](W)
        sg, keep = sparsegpt(scope, H, nnz, return_mask=True)
        rs = resolve(W, H, keep)
        e_sg, e_rs = output_error(W, sg, H=H), output_error(W, rs, H=H)
        assert e_rs <= e_sg * (1 + 1e-5), (pattern, e_rs, e_sg)
        assert torch.equal(rs != 0, keep)


def test_resolve_dead_column_keeps_weight():
    W, X = _data(4, 8, 32, seed=1)
    X[:, 3] = 0
    H = _hess(X, F64)
    mask = torch.ones(4, 8, dtype=torch.bool)
    mask[:, 0] = False
    got = resolve(W.double(), H, mask, dtype=F64)
    assert torch.equal(got[:, 3], W[:, 3].double())


# ----------------------------------------------------------------------------- output_error


@settings(max_examples=15)
@given(m=st.integers(1, 12), k=st.integers(1, 12), n=st.integers(1, 30), seed=st.integers(0, 2 ** 16))
def test_output_error_matches_direct(m, k, n, seed):
    g = _gen(seed)
    W = torch.randn(m, k, generator=g)
    Wp = W * (torch.rand(m, k, generator=g) < 0.5)
    X = torch.randn(n, k, generator=g)
    Wd, Wpd, Xd = W.double(), Wp.double(), X.double()
    want = float(((Wd - Wpd) @ Xd.T).square().sum() / (Wd @ Xd.T).square().sum())
    assert output_error(W, Wp, X=X, chunk_elems=7) == pytest.approx(want, rel=1e-9)
    assert output_error(W, Wp, H=(Xd.T @ Xd), chunk_elems=5) == pytest.approx(want, rel=1e-8, abs=1e-12)


def test_output_error_degenerate():
    W = torch.zeros(3, 4)
    assert output_error(W, W, X=torch.randn(5, 4)) == 0.0
    assert output_error(W, torch.ones(3, 4), X=torch.randn(5, 4)) == math.inf


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs():
    W, X = _data(8, 16, 64, seed=0)
    H = _hess(X)
    scope, _ = _nm(W, 2, 4)
    before = W.clone()
    with pytest.raises(ValueError, match="square"):
        sparsegpt(scope, H[:, :8], 2)
    with pytest.raises(ValueError, match="K=16"):
        sparsegpt(scope, H[:8, :8], 2)
    bad = H.clone()
    bad[1, 2] = float("nan")
    for fn in (lambda: sparsegpt(scope, bad, 2), lambda: obd(scope, bad, 2), lambda: resolve(W, bad, W != 0)):
        with pytest.raises(ValueError, match="NaN"):
            fn()
    bad = H.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="Inf"):
        sparsegpt(scope, bad, 2)
    with pytest.raises(ValueError, match="nnz"):
        sparsegpt(scope, H, -1)
    with pytest.raises(ValueError, match="nnz"):
        magnitude(scope, -1)
    with pytest.raises(TypeError, match="nnz"):
        sparsegpt(scope, H, 2.0)
    with pytest.raises(ValueError, match="damp"):
        sparsegpt(scope, H, 2, damp=-1)
    with pytest.raises(ValueError, match="blocksize"):
        sparsegpt(scope, H, 2, blocksize=0)
    with pytest.raises(NotPositiveDefiniteError, match="not positive definite even after damping"):
        sparsegpt(scope, -H, 2, inplace=True)  # mean diag < 0: damping cannot help
    with pytest.raises(NotPositiveDefiniteError, match="not positive definite"):
        resolve(W, _hess(X[:4]), torch.ones(8, 16, dtype=torch.bool).tril(), damp=0.0)  # rank 4 < |S|
    assert torch.equal(W, before)  # nothing written back by a failed inplace call
    Wn = W.clone()
    Wn[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        sparsegpt(_nm(Wn, 2, 4)[0], H, 2)
    with pytest.raises(ValueError, match="NaN"):
        magnitude(_nm(Wn, 2, 4)[0], 2)
    with pytest.raises(TypeError, match="ScopeSpec"):
        sparsegpt(W, H, 2)
    with pytest.raises(TypeError, match="mask"):
        resolve(W, H, (W != 0).float())
    with pytest.raises(ValueError, match="mask"):
        resolve(W, H, (W != 0)[:, :8])
    with pytest.raises(ValueError, match="exactly one"):
        output_error(W, W, X=X.float(), H=H)
    with pytest.raises(ValueError, match="W_pruned"):
        output_error(W, W[:, :8], H=H)


def test_noop_and_inplace():
    W, X = _data(8, 16, 64, seed=0)
    H = _hess(X)
    scope, _ = _nm(W, 2, 4)
    for fn in (lambda n: sparsegpt(scope, H, n), lambda n: magnitude(scope, n), lambda n: obd(scope, H, n)):
        for n in (4, 9):
            out = fn(n)
            assert torch.equal(out, W) and out.data_ptr() != W.data_ptr()
    want = sparsegpt(scope, H, 2)
    assert torch.equal(sparsegpt(scope, H, 2, inplace=True), want)
    assert torch.equal(W, want)
    W2, _ = _data(8, 16, 64, seed=0)
    s2, _ = _nm(W2, 2, 4)
    assert torch.equal(magnitude(s2, 2, inplace=True), W2) and bool(((W2 != 0).reshape(8, 4, 4).sum(-1) == 2).all())


# ----------------------------------------------------------------------------- the N:M fast path


def _generic_only(monkeypatch):
    """Every scope through the general lazy-block plan (per-element index events), as before the N:M path."""
    import gradkit.obs.baselines as B

    monkeypatch.setattr(B, "_nm_span", lambda lay, blocksize: 0)


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4", "1x4-blocks-2:4"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("ties", [False, True])
def test_sparsegpt_nm_path_equals_the_general_plan(pattern, dtype, ties, monkeypatch):
    """N:M along the rows takes its own plan (one event per scope column, no index tensors) and, in float32, the
    native obs_select fed the blocks reversed (so equal saliencies keep the lower block): the same weights and
    mask, bit for bit, as the general plan; with ties (weights on a grid of 4 values) the tie rule decides."""
    import gradkit.obs.baselines as B

    W, X = _data(24, 64, 200, seed=7, dtype=F64)
    if ties:
        W = torch.round(W * 1.5).clamp(-2, 2)
    H = _hess(X, F64)
    W, H = W.to(dtype), H.to(dtype)
    scope, nnz = PATTERNS[pattern](W)
    assert B._nm_span(obs_layout(scope), 16) > 0  # the path is taken
    got, keep = sparsegpt(scope, H, nnz, blocksize=16, dtype=dtype, return_mask=True)
    with monkeypatch.context() as mp:
        _generic_only(mp)
        want, want_keep = sparsegpt(PATTERNS[pattern](W)[0], H, nnz, blocksize=16, dtype=dtype, return_mask=True)
    assert torch.equal(keep, want_keep)
    assert torch.equal(got, want)


def test_sparsegpt_nm_path_not_taken_for_other_layouts():
    import gradkit.obs.baselines as B

    W = torch.randn(16, 32)
    for pattern in ("coupled-2:4", "row-pairs-16", "rowwise-50%"):
        assert B._nm_span(obs_layout(PATTERNS[pattern](W)[0]), 16) == 0, pattern
    assert B._nm_span(obs_layout(_nm(W, 2, 4)[0]), 2) == 0  # a scope wider than the lazy block


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_select_nan_saliency_ranks_as_inf_on_both_paths(dtype):
    """Weights are refused with NaN / inf up front, but updates of a near-singular H can overflow mid-sweep (then
    sparsegpt raises at the end; sparsegpt_mask returns its mask): a NaN saliency ranks as +inf (kept before
    finite ones, then by block index) in the general select and in the N:M one alike."""
    import gradkit.obs.baselines as B
    from gradkit import ops

    m, gs = 6, 4
    w1 = torch.randn(8, m, generator=_gen(1), dtype=dtype)
    w1[0, 0], w1[1, 0] = float("nan"), float("inf")  # row 0's scope: NaN beside inf
    w1[2, 1], w1[3, 1] = float("nan"), float("nan")
    w1[0, 2], w1[3, 2] = 0.5, 0.5  # an exact tie
    w1[1, 2], w1[2, 2] = 0.5, 0.5
    dcol = torch.rand(8, generator=_gen(2), dtype=dtype) + 0.5
    dcol[:4] = 1.0
    fast = torch.zeros(8, m, dtype=torch.bool)
    B._select_rows(B._RowsEvent(0, gs, 1, 2), w1, dcol, fast, ops.obs_select if dtype == torch.float32 else None)
    slow = torch.zeros(8, m, dtype=torch.bool)
    c = torch.arange(gs).view(1, gs, 1).expand(m, gs, 1)
    loc = c * m + torch.arange(m).view(m, 1, 1)
    B._select(B._Event(0, loc, c, None, 2), w1, dcol, slow)
    assert torch.equal(fast, slow)
    assert fast[:gs].sum(0).eq(2).all()
    assert not fast[0, 0] and not fast[1, 0] and fast[2, 0] and fast[3, 0]  # NaN and inf kept
    assert fast[:2, 1].all() and not fast[2:4, 1].any()  # two NaN: both kept
    assert fast[:, 2].tolist()[:4] == [False, False, True, True]  # four equal: the lower two kept


@pytest.mark.parametrize("n", [1, 5, 256, 257, 600])
def test_lower_inverse(n):
    from gradkit.obs.baselines import _lower_inverse

    g = _gen(n)
    L = torch.randn(n, n, generator=g, dtype=F64).tril_()
    L.diagonal().abs_().add_(n ** 0.5)
    got = _lower_inverse(L, leaf=64)
    assert torch.equal(got, got.tril())  # exactly lower triangular
    torch.testing.assert_close(got @ L, torch.eye(n, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(got, torch.linalg.inv(L), rtol=1e-12, atol=1e-14)
