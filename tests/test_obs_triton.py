"""The Triton obs_select kernel against the plain-PyTorch reference (the oracle).

Runs on CPU tensors through the Triton interpreter on small shapes. Weights are integer-valued (many
equal costs: the tie rule decides), with NaN / inf weights and zero / negative d, so NaN costs
(ranked as +inf) and +-inf costs occur; every result is compared exactly. Each case runs with the
default tile and with tiny tiles (many programs, a partial last tile).
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the first triton import

import contextlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402

from conftest import use_backend  # noqa: E402
from gradkit import ops  # noqa: E402
from gradkit.kernels.reference import obs as R  # noqa: E402
from gradkit.kernels.triton import obs as T  # noqa: E402

# The interpreter evaluates with numpy, which warns on the NaN / inf these tests feed on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                                        "ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:divide by zero encountered:RuntimeWarning")

_EX = settings.default.max_examples  # ci: 40, deep: 600
MORE = settings(deadline=None, max_examples=_EX)
TILES = {"default": {}, "tiny": {"max_scopes": 2, "tile_elems": 2}}
NAN, INF = float("nan"), float("inf")


@contextlib.contextmanager
def _patched(blocks, update):
    """A kernel module's tile table with ``update`` applied, restored afterwards."""
    saved = dict(blocks)
    blocks.update(update)
    try:
        yield
    finally:
        blocks.clear()
        blocks.update(saved)


def tiles(kind):
    return _patched(T.BLOCKS, TILES[kind])


def data(n, nb, seed, special=True, spread=2):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-spread, spread + 1, (n, nb), generator=g).float()
    d = torch.randint(1, 3, (n, nb), generator=g).float()
    if special:
        r = torch.rand(n, nb, generator=g)
        w[r < 0.06] = NAN
        w[(r >= 0.06) & (r < 0.09)] = INF
        r = torch.rand(n, nb, generator=g)
        d[r < 0.08] = 0.0
        d[(r >= 0.08) & (r < 0.12)] = -1.0
    return w, d


def both(w, d, gs, bk, num_prune, eps):
    got = T.obs_select(w, d, gs, bk, num_prune, eps)
    want = R.obs_select(w, d, gs, bk, num_prune, eps)
    assert got.dtype == torch.int64 and got.shape == want.shape, (got.shape, want.shape)
    assert torch.equal(got, want), (gs, bk, num_prune, eps, got, want)


@MORE
@given(n=st.integers(1, 8), nq=st.integers(1, 5), gs=st.integers(1, 8), bk=st.integers(1, 3), data_=st.data(),
       seed=st.integers(0, 2**31), special=st.booleans(), eps=st.sampled_from([0.0, 1e-8, 0.25]),
       tile=st.sampled_from(["default", "tiny"]), strided=st.booleans())
def test_matches_reference(n, nq, gs, bk, data_, seed, special, eps, tile, strided):
    num_prune = data_.draw(st.integers(0, gs))
    nb = nq * gs * bk
    w, d = data(n, nb, seed, special)
    if strided:
        w = torch.cat([w, torch.zeros(n, 2)], 1)[:, :nb]
        d = d.t().contiguous().t()
    with tiles(tile):
        both(w, d, gs, bk, num_prune, eps)


@pytest.mark.parametrize("gs,bk", [(13, 1), (33, 2), (64, 1)])
def test_wider_scopes(gs, bk):
    """Padding up to GS_P (13 -> 16, 33 -> 64) and a full 64-block tile."""
    w, d = data(3, 2 * gs * bk, gs)
    for num_prune in (1, gs // 2, gs):
        both(w, d, gs, bk, num_prune, 1e-8)


def test_composite_path_for_huge_scopes():
    gs = T.MAX_FUSED_GS + 5
    w, d = data(2, 2 * gs, 7)
    both(w, d, gs, 1, gs // 3, 0.0)


def test_ties_and_nan():
    w = torch.tensor([[2.0, 2.0, NAN, 2.0, INF, 2.0, 1.0, NAN]])
    d = torch.ones(1, 8)
    with tiles("tiny"):
        assert T.obs_select(w, d, 8, 1, 3, 0.0).tolist() == [[0, 1, 6]]
        assert T.obs_select(w, d, 8, 1, 6, 0.0).tolist() == [[0, 1, 2, 3, 5, 6]]  # NaN (+inf) before inf by index
        assert T.obs_select(w, d, 4, 1, 2, 0.0).tolist() == [[0, 1, 5, 6]]
    for num_prune in range(9):
        both(w, d, 8, 1, num_prune, 0.0)


def test_empty_shapes():
    assert T.obs_select(torch.ones(0, 8), torch.ones(0, 8), 4, 2, 1, 0.0).shape == (0, 2)
    assert T.obs_select(torch.ones(3, 8), torch.ones(3, 8), 4, 2, 0, 0.0).shape == (3, 0)
    assert T.obs_select(torch.ones(3, 0), torch.ones(3, 0), 4, 2, 1, 0.0).shape == (3, 0)


def test_through_the_api():
    w, d = data(5, 24, 3)
    with use_backend("triton"):
        got = ops.obs_select(w, d, 4, 2, 2, 1e-8)
    assert torch.equal(got, R.obs_select(w, d, 4, 2, 2, 1e-8))


def test_launcher_checks():
    """The kernel register_triton_for_cuda registers: the op's checks, then the launcher."""
    from gradkit.kernels.triton import cuda_kernel

    select = cuda_kernel("obs", "obs_select")
    with pytest.raises(ValueError, match="num_prune"):
        select(torch.ones(2, 8), torch.ones(2, 8), 4, 1, 5, 0.0)
    with pytest.raises(TypeError, match="float32"):
        select(torch.ones(2, 8).double(), torch.ones(2, 8), 4, 1, 2, 0.0)


# ---------------------------------------------------------------- obs_shared_prune

def shared_rows(rows):
    return _patched(T.SHARED_BLOCKS, {"rows": rows})


@MORE
@given(n=st.integers(0, 7), nq=st.integers(1, 3), E=st.integers(1, 6), data_=st.data(),
       seed=st.integers(0, 2**31 - 1), nan=st.booleans(), local=st.booleans(), rows=st.sampled_from([2, 64]))
def test_shared_prune_matches_reference(n, nq, E, data_, seed, nan, local, rows):
    from itertools import combinations

    p = data_.draw(st.integers(1, min(E, 3)))
    subsets = list(combinations(range(E), p))
    ns = data_.draw(st.integers(1, min(len(subsets), 6)))
    g = torch.Generator().manual_seed(seed)
    K = nq * E
    w = torch.randn(n, K, generator=g)
    if nan and n:
        w[0, 0] = NAN
    c = torch.randn(K, K, generator=g)
    cinv = torch.randn(nq, ns, p, p, generator=g)
    pick = torch.randperm(len(subsets), generator=g)[:ns].sort().values
    pidx = torch.tensor([subsets[i] for i in pick.tolist()], dtype=torch.int64).reshape(ns, p)
    with shared_rows(rows):
        got_w, got_s = T.obs_shared_prune(w, c, cinv, pidx, E, local)
    exp_w, exp_s = R.obs_shared_prune(w, c, cinv, pidx, E, local)
    assert torch.equal(got_s, exp_s)
    torch.testing.assert_close(got_w, exp_w, rtol=0, atol=0, equal_nan=True)


def test_shared_prune_through_the_api():
    from itertools import combinations

    g = torch.Generator().manual_seed(4)
    w = torch.randn(9, 8, generator=g)
    c = torch.randn(8, 8, generator=g)
    pidx = torch.tensor(list(combinations(range(4), 2)))
    cinv = torch.randn(2, 6, 2, 2, generator=g)
    with use_backend("triton"), shared_rows(4):
        got = ops.obs_shared_prune(w, c, cinv, pidx, 4, True)
    exp = R.obs_shared_prune(w, c, cinv, pidx, 4, True)
    assert torch.equal(got[1], exp[1]) and torch.equal(got[0], exp[0])


# ------------------------------------------------------------------------------------- obs_schur_extend
from test_obs_schur_ops import schur_check, schur_make  # noqa: E402

SCHUR_TILES = {"default": {}, "tiny": {"bk": 16, "tile": 256, "bf_max": 16, "bm_elems": 256}}


def schur_tiles(kind):
    return _patched(T.SCHUR_BLOCKS, SCHUR_TILES[kind])


@MORE
@given(shape=st.tuples(st.integers(0, 3), st.integers(0, 40), st.integers(0, 70), st.integers(0, 70)),
       dt=st.sampled_from((torch.float32, torch.bfloat16, torch.float16)), seed=st.integers(0, 2 ** 16),
       strided=st.booleans(), tile=st.sampled_from(sorted(SCHUR_TILES)))
def test_triton_schur_extend_within_fp32_bound(shape, dt, seed, strided, tile):
    """Several row blocks, partial column tiles, cnt = 0 and cnt not a multiple of BK, strided factor
    windows; up as true OBS passes it (read from the factor: representable in its dtype); nothing of
    ut outside the written window changes."""
    n, m, c, F = shape
    with schur_tiles(tile):
        schur_check(T.obs_schur_extend_, schur_make(n, m, c, F, dt, seed, strided), trunc=True)


@pytest.mark.parametrize("m,dt", [(128, torch.bfloat16), (256, torch.float16), (200, torch.float32),
                                  (300, torch.bfloat16)])
def test_triton_schur_extend_true_obs_sizes(m, dt):
    """m = 128 / 256 (2:4 and 4:8 with 64 scopes per batch; 256 is the largest fused tile), and m = 300
    (the composite path)."""
    schur_check(T.obs_schur_extend_, schur_make(1, m, 48, 40, dt, m), trunc=True)


def test_triton_schur_extend_through_ops():
    with use_backend("triton"):
        schur_check(ops.obs_schur_extend_, schur_make(2, 9, 17, 33, torch.bfloat16, 4), trunc=True)


@pytest.mark.parametrize("c_dtype", [torch.float32, torch.bfloat16])
def test_true_obs_end_to_end_on_triton(c_dtype):
    """prune_true_obs with every op on the Triton kernels (obs_select, obs_schur_extend_) gives the
    native backend's mask and weights to fp32 accuracy (bf16 factor: to its rounding)."""
    import gradkit.scope as gk
    from gradkit.obs import StructuredOBS

    g = torch.Generator().manual_seed(3)
    W0 = torch.randn(8, 64, generator=g)
    X = torch.randn(256, 64, generator=g)
    H = X.T @ X
    outs = []
    nt = torch.get_num_threads()
    torch.set_num_threads(1)  # CPU chunks run on Python threads when nt > 1; the interpreter is not thread-safe
    try:
        for backend in ("native", "triton"):
            W = W0.clone()
            with use_backend(backend):
                keep = StructuredOBS(gk.ScopeSpec(gk.BlockSpec(W, (1, 1)), (1, 4)), H, damp=0.01).prune_true_obs(
                    2, ng=4, chunk_size=4, c_dtype=c_dtype, return_mask=True)
            outs.append((keep, W))
    finally:
        torch.set_num_threads(nt)
    assert torch.equal(outs[0][0], outs[1][0])
    tol = 1e-4 if c_dtype == torch.float32 else 2e-2
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=tol, atol=tol)
