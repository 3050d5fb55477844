"""Search family: the native score_topk kernel against the plain-PyTorch reference (hypothesis,
integer-valued data so every product is exact and the tie rule decides), a large multi-block
multi-thread case, streaming merges, float data, validation and opcheck."""
import re

import pytest
import torch
from hypothesis import given, strategies as st

from conftest import CPU_ISAS, DEVICES, env_set
from gradkit import _ext, ops
from gradkit.kernels.reference import search as ref

pytestmark = pytest.mark.skipif(not _ext.LOADED, reason="compiled extension not built")

KEY_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# The CPU scoring levels (GRADKIT_SEARCH_ISA): the register-blocked kernels this CPU has, then BLAS blocks.
PACKED_ISAS = [isa for isa in CPU_ISAS if isa != "portable"]
SEARCH_ISAS = PACKED_ISAS + ["blas"]


def search_isa(isa):
    return env_set("GRADKIT_SEARCH_ISA", isa)


def _round_to_f32(s, err):
    """fp32 rounding of the exact value s + err (s the float64 sum, err its TwoSum error): rounding the float64 sum
    to odd before rounding it to fp32 gives the correctly rounded result (53 >= 24 + 2 bits)."""
    bits = s.view(torch.int64)
    fix = (err != 0) & ((bits & 1) == 0)
    step = torch.where((err > 0) == (s > 0), 1, -1)
    return torch.where(fix, bits + step, bits).view(torch.float64).float().double()


def _two_sum(a, b):
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


CHAIN = 128  # features per FMA chain (csrc/cpu/search.cpp kChain)


def fma_chain(q, keys):
    """(Q, N) fp32 scores in the kernels' summation order, computed exactly: the features in chunks of CHAIN, each
    chunk the fp32 chain acc = fma(q[d], key[d], acc) over d ascending from 0 (the product exact in float64, each
    step one rounding), the chunk sums added in order in fp32 (tot = c_0, then tot = tot + c_j)."""
    qd, kd = q.double(), keys.double()
    tot = None
    for d0 in range(0, q.shape[1], CHAIN):
        acc = torch.zeros(q.shape[0], keys.shape[0], dtype=torch.float64)
        for d in range(d0, min(q.shape[1], d0 + CHAIN)):
            acc = _round_to_f32(*_two_sum(qd[:, d, None] * kd[None, :, d], acc))
        tot = acc if tot is None else _round_to_f32(*_two_sum(tot, acc))
    if tot is None:
        tot = torch.zeros(q.shape[0], keys.shape[0], dtype=torch.float64)
    return tot.float()


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


@pytest.mark.parametrize("isa", SEARCH_ISAS)
@given(p=problems())
def test_every_scoring_level_matches_reference(isa, p):
    """The register-blocked AVX-512 / AVX2 kernels and the BLAS blocks, each forced with GRADKIT_SEARCH_ISA:
    integer data (exact products), so all of them return the reference's bits, ties included."""
    q, keys, k, largest, scale, s_in, i_in, base = p
    with search_isa(isa):
        got = ops.score_topk(q, keys, k, largest=largest, key_scale=scale, scores_in=s_in, idx_in=i_in, base=base)
    want = ref.score_topk(q, keys, k, largest, scale, s_in, i_in, base)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def _dense(s, i, n):
    return torch.full((s.shape[0], n), float("nan")).scatter_(1, i, s)


@pytest.mark.skipif(not PACKED_ISAS, reason="no register-blocked scoring kernel for this CPU (not x86-64)")
@pytest.mark.parametrize("dtype", KEY_DTYPES)
def test_packed_scores_are_the_fp32_fma_chain(dtype):
    """Float data: every score of the register-blocked kernels (AVX-512 with or without its bf16 screen, AVX2) is
    the kernels' chunked fp32 FMA chains (D = 300 spans three chains of 128 / 128 / 44 features), bit for bit, whatever the
    query batch (1-5 queries take the unpacked path), key window, panel or thread it lands in; so every level
    returns the same bits."""
    g = torch.Generator().manual_seed(7)
    Q, N, D = 29, 1100, 300
    q = torch.randn(Q, D, generator=g)
    keys = torch.randn(N, D, generator=g).to(dtype)
    want = fma_chain(q, keys.float())
    scale = torch.rand(N, generator=g) + 0.5
    for isa in PACKED_ISAS:
        with search_isa(isa):
            s, i = ops.score_topk(q, keys, N)
            assert torch.equal(_dense(s, i, N), want), isa
            assert torch.equal(i, torch.sort(want, dim=1, descending=True, stable=True).indices), isa
            # a sub-batch of queries against a key window at an odd offset: the same bits for the same pairs
            s2, i2 = ops.score_topk(q[3:10], keys[77:1001], 924, base=77)
            assert torch.equal(_dense(s2, i2 - 77, 924), want[3:10, 77:1001]), isa
            for nq in (1, 2, 5):  # fewer queries than a micro-tile: keys transposed in registers, not packed
                s4, i4 = ops.score_topk(q[nq:2 * nq], keys[5:], N - 5, base=5)
                assert torch.equal(_dense(s4, i4 - 5, N - 5), want[nq:2 * nq, 5:]), (isa, nq)
            s3, i3 = ops.score_topk(q, keys, 10, largest=False, key_scale=scale)
            low = torch.sort(want * scale, dim=1, stable=True)
            assert torch.equal(s3, low.values[:, :10]) and torch.equal(i3, low.indices[:, :10]), isa
    with search_isa("blas"):  # BLAS blocks: another summation order, the same scores to rounding
        s, i = ops.score_topk(q, keys, N)
    torch.testing.assert_close(_dense(s, i, N), want, rtol=0, atol=2e-4)


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
    (dict(scores_in=torch.zeros(2, 2)), ValueError, "scores_in, idx_in"),
    (dict(scores_in=torch.zeros(3, 2), idx_in=torch.zeros(3, 2, dtype=torch.int64)), ValueError, "scores_in"),
    (dict(scores_in=torch.zeros(2, 2), idx_in=torch.zeros(2, 2, dtype=torch.int32)), TypeError, "idx_in"),
])
def test_validation_names_the_argument(bad, err, name):
    args = dict(queries=torch.zeros(2, 3), keys=torch.zeros(4, 3), k=2)
    args.update(bad)
    # every message opens with "<argument>: " (re.search on a bare name would also hit "k" in "keys")
    with pytest.raises(err, match=rf"^{re.escape(name)}: "):
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
@pytest.mark.parametrize("backend", ["native", "triton"])
@given(p=problems(max_n=700))
def test_cuda_matches_reference(backend, p):
    q, keys, k, largest, scale, s_in, i_in, base = p
    mv = lambda t: None if t is None else t.cuda()  # noqa: E731
    with env_set("GRADKIT_BACKEND", backend):
        got = ops.score_topk(q.cuda(), keys.cuda(), k, largest=largest, key_scale=mv(scale), scores_in=mv(s_in),
                             idx_in=mv(i_in), base=base)
    want = ref.score_topk(q, keys, k, largest, scale, s_in, i_in, base)
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])
