"""Search family: the native score_topk kernel against the plain-PyTorch reference (hypothesis,
integer-valued data so every product is exact and the tie rule decides), a large multi-block
multi-thread case, streaming merges, float data, validation and opcheck."""
import pytest
import torch
from hypothesis import given, strategies as st

from conftest import DEVICES
from gradkit import _ext, ops
from gradkit.kernels.reference import search as ref

pytestmark = pytest.mark.skipif(not _ext.LOADED, reason="compiled extension not built")

KEY_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _oracle(q, keys, k, largest, scale=None, s_in=None, i_in=None, base=0):
    """Independent oracle: python sort of (score, index) tuples on float64 scores."""
    s = (q.double() @ keys.double().T)
    if scale is not None:
        s = s * scale.double()[None]
    out_s, out_i = [], []
    for r in range(q.shape[0]):
        cand = [(float(s[r, j]), base + j) for j in range(keys.shape[0])]
        if s_in is not None:
            cand += [(float(a), int(b)) for a, b in zip(s_in[r], i_in[r]) if int(b) >= 0]
        inf = float("inf")
        cand = [((-inf if largest else inf) if v != v else v, i) for v, i in cand]
        cand.sort(key=lambda t: ((-t[0] if largest else t[0]), t[1]))
        cand = cand[:k] + [((-inf if largest else inf), -1)] * max(0, k - len(cand))
        out_s.append([c[0] for c in cand])
        out_i.append([c[1] for c in cand])
    return torch.tensor(out_s, dtype=torch.float32), torch.tensor(out_i, dtype=torch.int64)


@st.composite
def problems(draw, max_q=9, max_n=300, max_d=12):
    Q = draw(st.integers(0, max_q))
    N = draw(st.integers(0, max_n))
    D = draw(st.integers(1, max_d))
    k = draw(st.integers(0, 12))
    dtype = draw(st.sampled_from(KEY_DTYPES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    spread = draw(st.sampled_from([1, 2, 4]))
    q = torch.randint(-spread, spread + 1, (Q, D), generator=g).float()
    keys = torch.randint(-spread, spread + 1, (N, D), generator=g).to(dtype)
    if draw(st.booleans()) and N:  # non-contiguous rows: a column window of a wider array
        wide = torch.randint(-spread, spread + 1, (N, D + 3), generator=g).to(dtype)
        keys = wide[:, 1:D + 1]
    scale = torch.randint(0, 3, (N,), generator=g).float() if draw(st.booleans()) else None
    kin = draw(st.integers(0, 5))
    if draw(st.booleans()):
        s_in = torch.randint(-6, 7, (Q, kin), generator=g).float()
        i_in = torch.randint(-1, N + 20, (Q, kin), generator=g)
    else:
        s_in = i_in = None
    return q, keys, k, draw(st.booleans()), scale, s_in, i_in, draw(st.integers(0, 50))


@given(problems())
def test_score_topk_matches_reference_and_oracle(p):
    q, keys, k, largest, scale, s_in, i_in, base = p
    got = ops.score_topk(q, keys, k, largest=largest, key_scale=scale, scores_in=s_in, idx_in=i_in, base=base)
    want = ref.score_topk(q, keys, k, largest, scale, s_in, i_in, base)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    if q.shape[0] and s_in is None:
        o = _oracle(q, keys.float(), k, largest, scale, None, None, base)
        assert torch.equal(want[0], o[0]) and torch.equal(want[1], o[1])


def test_reference_matches_oracle_with_running_input():
    g = torch.Generator().manual_seed(3)
    q = torch.randint(-2, 3, (4, 5), generator=g).float()
    keys = torch.randint(-2, 3, (40, 5), generator=g).float()
    s_in = torch.randint(-4, 5, (4, 6), generator=g).float()
    i_in = torch.randint(-1, 80, (4, 6), generator=g)
    for largest in (True, False):
        a = ref.score_topk(q, keys, 9, largest, None, s_in, i_in, 7)
        b = _oracle(q, keys, 9, largest, None, s_in, i_in, 7)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("dtype", KEY_DTYPES)
def test_large_multiblock_many_ties(dtype):
    """Many 512-row blocks and both threads; integer scores with heavy ties across blocks."""
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-1, 2, (130, 16), generator=g).float()
    keys = torch.randint(-1, 2, (12_011, 16), generator=g).to(dtype)
    for largest in (True, False):
        got = ops.score_topk(q, keys, 17, largest=largest, base=5)
        want = ref.score_topk(q, keys, 17, largest, None, None, None, 5)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_streaming_merge_equals_one_call():
    """Scoring in blocks and feeding the running top-k back gives the one-call result."""
    g = torch.Generator().manual_seed(2)
    q = torch.randint(-2, 3, (33, 8), generator=g).float()
    keys = torch.randint(-2, 3, (3001, 8), generator=g).to(torch.float16)
    scale = torch.randint(1, 4, (3001,), generator=g).float()
    whole = ops.score_topk(q, keys, 25, largest=False, key_scale=scale)
    s = i = None
    for j0 in range(0, 3001, 437):
        s, i = ops.score_topk(q, keys[j0:j0 + 437], 25, largest=False, key_scale=scale[j0:j0 + 437], scores_in=s,
                              idx_in=i, base=j0)
    assert torch.equal(s, whole[0]) and torch.equal(i, whole[1])


def test_float_data_against_matmul_topk():
    g = torch.Generator().manual_seed(4)
    q = torch.randn(64, 48, generator=g)
    keys = torch.randn(10_000, 48, generator=g)
    s, i = ops.score_topk(q, keys, 10)
    full = q.double() @ keys.double().T
    # the returned rows' exact scores equal the reported ones to fp32 rounding
    torch.testing.assert_close(full.gather(1, i).float(), s, rtol=1e-5, atol=1e-4)
    # and no row outside the result beats the k-th score by more than rounding
    kth = full.gather(1, i)[:, -1:]
    mask = torch.ones_like(full, dtype=torch.bool).scatter_(1, i, False)
    assert ((full - kth) * mask <= 1e-4).all()
    assert (s[:, :-1] >= s[:, 1:]).all()


def test_nan_scores_rank_last_and_padding():
    q = torch.tensor([[1.0, 0.0]])
    keys = torch.tensor([[float("nan"), 0.0], [1.0, 0.0], [-1.0, 0.0]])
    s, i = ops.score_topk(q, keys, 5)
    assert i.tolist() == [[1, 2, 0, -1, -1]]
    assert s[0, :3].tolist() == [1.0, -1.0, float("-inf")] and s[0, 3:].tolist() == [float("-inf")] * 2
    s, i = ops.score_topk(q, keys, 4, largest=False)
    assert i.tolist() == [[2, 1, 0, -1]] and s[0, 2].item() == float("inf")


@pytest.mark.parametrize("bad, err, name", [
    (dict(queries=torch.zeros(2, 3, dtype=torch.float64)), TypeError, "queries"),
    (dict(keys=torch.zeros(4, 5)), ValueError, "keys"),
    (dict(keys=torch.zeros(4, 3, dtype=torch.int32)), TypeError, "keys"),
    (dict(k=-1), ValueError, "k"),
    (dict(k=2.0), TypeError, "k"),
    (dict(base=-3), ValueError, "base"),
    (dict(key_scale=torch.ones(3)), ValueError, "key_scale"),
    (dict(scores_in=torch.zeros(2, 2)), ValueError, "scores_in"),
    (dict(scores_in=torch.zeros(3, 2), idx_in=torch.zeros(3, 2, dtype=torch.int64)), ValueError, "scores_in"),
    (dict(scores_in=torch.zeros(2, 2), idx_in=torch.zeros(2, 2, dtype=torch.int32)), TypeError, "idx_in"),
])
def test_validation_names_the_argument(bad, err, name):
    args = dict(queries=torch.zeros(2, 3), keys=torch.zeros(4, 3), k=2)
    args.update(bad)
    with pytest.raises(err, match=name):
        ops.score_topk(args.pop("queries"), args.pop("keys"), args.pop("k"), **args)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    g = torch.Generator().manual_seed(5)
    q = torch.randint(-2, 3, (6, 7), generator=g).float().to(device)
    keys = torch.randint(-2, 3, (50, 7), generator=g).half().to(device)
    scale = torch.rand(50, generator=g).to(device)
    s_in = torch.randn(6, 3, generator=g).to(device)
    i_in = torch.randint(-1, 90, (6, 3), generator=g).to(device)
    torch.library.opcheck(torch.ops.gradkit.score_topk, (q, keys, 5, True, scale, s_in, i_in, 60))
    torch.library.opcheck(torch.ops.gradkit.score_topk, (q, keys, 4, False, None, None, None, 0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@given(problems(max_n=700))
def test_cuda_matches_reference(p):
    q, keys, k, largest, scale, s_in, i_in, base = p
    mv = lambda t: None if t is None else t.cuda()  # noqa: E731
    got = ops.score_topk(q.cuda(), keys.cuda(), k, largest=largest, key_scale=mv(scale), scores_in=mv(s_in),
                         idx_in=mv(i_in), base=base)
    want = ref.score_topk(q, keys, k, largest, scale, s_in, i_in, base)
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])
