"""The Triton score_topk kernel against the plain-PyTorch reference (the oracle), on CPU tensors
through the Triton interpreter (small grids). Integer-valued data makes every product exact so
the tie rule (lowest index first) decides; runs with tiny tiles (many tiles per query, ties
spread over tiles) and through the composite path (k above the fused limit)."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the first triton import

import contextlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402

from conftest import use_backend  # noqa: E402
from gradkit import ops  # noqa: E402
from gradkit.kernels.reference import search as R  # noqa: E402
from gradkit.kernels.triton import search as T  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:overflow encountered:RuntimeWarning")

_EX = max(8, settings.default.max_examples // 4)
MORE = settings(deadline=None, max_examples=_EX)

PATHS = {"default": {}, "tiny": {"q": 16, "n": 16, "d": 16, "composite_rows": 7}}


@contextlib.contextmanager
def path(kind):
    saved = dict(T.BLOCKS)
    T.BLOCKS.update(PATHS[kind])
    try:
        yield
    finally:
        T.BLOCKS.clear()
        T.BLOCKS.update(saved)


@st.composite
def problems(draw):
    Q = draw(st.integers(0, 20))
    N = draw(st.integers(0, 90))
    D = draw(st.integers(1, 20))
    k = draw(st.sampled_from([0, 1, 3, 10, 17, 70]))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    q = torch.randint(-2, 3, (Q, D), generator=g).float()
    keys = torch.randint(-2, 3, (N, D + 2), generator=g).to(dtype)[:, :D]  # row stride D + 2
    scale = torch.randint(0, 3, (N,), generator=g).float() if draw(st.booleans()) else None
    if draw(st.booleans()):
        kin = draw(st.integers(0, 4))
        s_in = torch.randint(-5, 6, (Q, kin), generator=g).float()
        i_in = torch.randint(-1, N + 30, (Q, kin), generator=g)
    else:
        s_in = i_in = None
    return q, keys, k, draw(st.booleans()), scale, s_in, i_in, draw(st.integers(0, 9))


@MORE
@given(problems(), st.sampled_from(sorted(PATHS)))
def test_triton_matches_reference(p, kind):
    q, keys, k, largest, scale, s_in, i_in, base = p
    with path(kind):
        got = T.score_topk(q, keys, k, largest, scale, s_in, i_in, base)
    want = R.score_topk(q, keys, k, largest, scale, s_in, i_in, base)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_triton_float_data_and_nan():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(9, 40, generator=g)
    keys = torch.randn(200, 40, generator=g)
    keys[7, 3] = float("nan")
    with path("tiny"):
        s, i = T.score_topk(q, keys, 6, True, None, None, None, 0)
    rs, ri = R.score_topk(q, keys, 6, True, None, None, None, 0)
    torch.testing.assert_close(s, rs, rtol=1e-5, atol=1e-5)
    assert torch.equal(i, ri)
    assert not (i == 7).any()  # the NaN row ranks last


def test_triton_backend_through_ops():
    q = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    keys = torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, 0.0], [-1.0, 3.0]])
    with use_backend("triton"):
        s, i = ops.score_topk(q, keys, 3)
    want = R.score_topk(q, keys, 3, True, None, None, None, 0)
    assert torch.equal(s, want[0]) and torch.equal(i, want[1])


def test_smallest_zero_scores_are_positive_zero():
    # smallest runs as largest on -q and negates back: -(+0) would report -0.0 where q . k gives +0.0 (session 40:
    # every backend now negates as 0 - s); also through a running top-k holding a +0.0 score
    q = torch.tensor([[1.0, -2.0]])
    keys = torch.tensor([[0.0, 0.0], [2.0, 1.0], [3.0, 1.0]])
    s_in, i_in = torch.tensor([[0.0]]), torch.tensor([[9]])
    for args in ((None, None), (s_in, i_in)):
        want = R.score_topk(q, keys, 2, False, None, *args, 0)
        with path("tiny"):
            got = T.score_topk(q, keys, 2, False, None, *args, 0)
        with use_backend("native"):
            nat = ops.score_topk(q, keys, 2, largest=False, scores_in=args[0], idx_in=args[1])
        for s, i in (got, nat):
            assert torch.equal(s, want[0]) and torch.equal(i, want[1])
            assert not torch.signbit(s[s == 0]).any()
        assert not torch.signbit(want[0][want[0] == 0]).any()
