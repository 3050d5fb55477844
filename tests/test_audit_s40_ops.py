"""Audit (session 40) of the low-level op layer ``gradkit.ops``: native C++ CPU kernels against the plain-PyTorch
references (``gradkit.kernels.reference``) and torch, on edge inputs the earlier audits did not cover, plus the
wrappers' handling of flag / count arguments that are not what the signature says."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from gradkit import ops

from conftest import use_backend  # noqa: E402

INF, NAN = float("inf"), float("nan")
BACKENDS = ("native", "reference")


def _run(backend, fn):
    with use_backend(backend):
        return fn()


def _same(a, b):
    if isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
        return
    assert a.dtype == b.dtype and a.shape == b.shape, (a, b)
    if a.is_floating_point():
        torch.testing.assert_close(a, b, equal_nan=True, rtol=1e-6, atol=0)
        assert torch.equal(torch.signbit(a[a == 0]), torch.signbit(b[b == 0])), (a, b)
    else:
        assert torch.equal(a, b), (a, b)


def _torch_topk_positions(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Ascending positions of the k largest values, equal values lowest position first (float64 stable sort)."""
    order = torch.sort(flat.double(), descending=True, stable=True).indices[:k]
    return torch.sort(order).values


# --------------------------------------------------------------------------- topk_select_segments


SEGS = [torch.tensor([1.0, 2.0]), torch.empty(0), torch.empty(0, 3), torch.tensor([2.0, -0.0, 0.0, INF, -INF])]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [0, 1, 3, 5, 7])
def test_topk_segments_empty_segments_signed_zero_and_inf(backend, k):
    """Zero-element segments (1-D and (0, 3)) in the middle, -0.0 tied with +0.0 (lowest position first, as
    -0.0 == 0.0), +-inf; k from 0 to n: the positions of a float64 stable sort of the concatenation."""
    got = _run(backend, lambda: ops.topk_select_segments(SEGS, k))
    want = _torch_topk_positions(torch.cat([s.reshape(-1) for s in SEGS]), k)
    assert got.dtype == torch.int64 and torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_segments_k_past_n_and_negative_are_value_errors(backend):
    for k in (8, -1):
        with pytest.raises(ValueError, match="k"):
            _run(backend, lambda: ops.topk_select_segments(SEGS, k))
    with pytest.raises(ValueError, match="k"):  # every score inactive: only k = 0 is possible
        _run(backend, lambda: ops.topk_select_segments([torch.ones(3)], 1, [torch.zeros(3, dtype=torch.bool)]))
    assert _run(backend, lambda: ops.topk_select_segments([torch.ones(3)], 0,
                                                          [torch.zeros(3, dtype=torch.bool)])).numel() == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_topk_segments_subnormals_rank_by_value_in_every_dtype(backend, dtype):
    """Subnormals are not flushed to zero: the smallest positive subnormal of each dtype outranks 0 and -0,
    and -subnormal ranks below them."""
    tiny = torch.finfo(dtype).smallest_normal / 4
    s = torch.tensor([0.0, -tiny, tiny, -0.0, 2 * tiny], dtype=dtype)
    assert _run(backend, lambda: ops.topk_select_segments([s[:2], s[2:]], 2)).tolist() == [2, 4]
    assert _run(backend, lambda: ops.topk_select_segments([s[:2], s[2:]], 4)).tolist() == [0, 2, 3, 4]


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_segments_ties_across_boundaries_with_strided_expanded_and_active(backend):
    """Equal scores in different segments, given as a transposed view, a stepped view and an expanded tensor,
    with a transposed active mask and a NaN that is inactive: lowest concatenated position first."""
    x = torch.arange(12.0).reshape(3, 4) % 3
    seg0 = x.t()  # flattened in the view's own row-major order
    seg1 = torch.tensor([2.0]).expand(3)
    seg2 = torch.tensor([2.0, NAN, 0.0, 2.0])[::1]
    act2 = torch.tensor([[True, True], [False, True]]).t()  # a transposed mask: [T, F, T, T], the NaN inactive
    flat = torch.cat([seg0.reshape(-1), seg1, seg2])
    active = torch.cat([torch.ones(15, dtype=torch.bool), act2.reshape(-1)])
    want = _torch_topk_positions(torch.where(active, flat, torch.full_like(flat, -INF)), 9)
    got = _run(backend, lambda: ops.topk_select_segments([seg0, seg1, seg2], 9, [None, None, act2]))
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="NaN"):
        _run(backend, lambda: ops.topk_select_segments([seg0, seg1, seg2], 1))


def test_topk_segments_same_result_with_one_and_two_threads():
    torch.manual_seed(0)
    big = torch.randn(30000)
    big[::5] = big[7]  # many ties spread over both segments
    segs = [big[:13001], big[13001:].reshape(1, -1)]
    old = torch.get_num_threads()
    try:
        res = []
        for nt in (1, 2):
            torch.set_num_threads(nt)
            res.append(_run("native", lambda: ops.topk_select_segments(segs, 7001)))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(res[0], res[1])
    assert torch.equal(res[0], _torch_topk_positions(big, 7001))


# --------------------------------------------------------------------------- gather / scatter


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_mixed_dtypes_empty_and_strided_segments(backend):
    x = torch.arange(6.0).reshape(2, 3)
    src = [x.t(), torch.empty(0), torch.arange(4, dtype=torch.float64)[::2], torch.tensor([2.0]).expand(2, 2).half()]
    idx = [torch.tensor([5, 0, 4, 1, 3, 2], dtype=torch.int32)[::2], None, torch.tensor([], dtype=torch.int64), None]
    got = _run(backend, lambda: ops.gather_segments(src, idx))
    want = torch.cat([x.t().reshape(-1)[[5, 4, 3]].double(), torch.full((4,), 2.0, dtype=torch.float64)])
    assert got.dtype == torch.float64 and torch.equal(got, want)
    f16 = _run(backend, lambda: ops.gather_segments([torch.tensor([1e6, -1e6, NAN, -0.0])], [None],
                                                    dtype=torch.float16))
    assert f16.tolist()[:2] == [INF, -INF] and f16[2].isnan() and f16[3].signbit()


@pytest.mark.parametrize("backend", BACKENDS)
def test_scatter_inplace_mixed_dtypes_accumulate_and_a_bad_index_writes_nothing(backend):
    def run(acc):
        d = [torch.zeros(2, 3), torch.ones(4, dtype=torch.float64)[::2], torch.zeros(0)]
        ops.scatter_segments_(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64),
                              [torch.tensor([4, 0]), None, None], d, scale=-0.5, accumulate=acc)
        return d
    d = _run(backend, lambda: run(True))
    assert d[0].reshape(-1).tolist() == [-1.0, 0, 0, 0, -0.5, 0] and d[1].tolist() == [-0.5, -1.0]
    d = _run(backend, lambda: run(False))
    assert d[1].tolist() == [-1.5, -2.0]
    dst = [torch.zeros(3), torch.zeros(3)]
    with pytest.raises(IndexError):
        _run(backend, lambda: ops.scatter_segments_(torch.ones(3), [torch.tensor([0]), torch.tensor([0, 5])], dst))
    assert not any(t.any() for t in dst)


# --------------------------------------------------------------------------- bitmasks and golden


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 17])
def test_pack_unpack_roundtrip_lengths_not_multiple_of_8_and_strided_masks(backend, n):
    torch.manual_seed(n)
    m = torch.rand(n, 2)[:, 1] > 0.5  # a stepped view
    bits = _run(backend, lambda: ops.pack_bitmask(m))
    assert bits.shape == ((n + 7) // 8,)
    want = sum(int(v) << j for j, v in enumerate(m.tolist()))
    assert int.from_bytes(bytes(bits.tolist()), "little") == want
    assert torch.equal(_run(backend, lambda: ops.bitmask_to_indices(bits, n, torch.int64)),
                       m.nonzero().reshape(-1))
    if n % 8:
        bad = bits.clone()
        bad[-1] |= 1 << 7
        with pytest.raises(ValueError, match="bits"):
            _run(backend, lambda: ops.bitmask_to_indices(bad, n))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bitmask_algebra_padding_and_popcount(backend):
    a = [torch.tensor([0xF0, 0x0F], dtype=torch.uint8), torch.empty(0, dtype=torch.uint8)]
    b = [torch.tensor([0xFF, 0x01], dtype=torch.uint8), torch.empty(0, dtype=torch.uint8)]
    want = {"and": [0xF0, 0x01], "or": [0xFF, 0x0F], "xor": [0x0F, 0x0E], "andnot": [0x00, 0x0E]}
    for op, w in want.items():
        got = _run(backend, lambda: ops.bitmask_binary(a, b, op))
        assert got[0].tolist() == w and got[1].numel() == 0
    assert [t.tolist() for t in _run(backend, lambda: ops.bitmask_not(a, [9, 0]))] == [[0x0F, 0x00], []]
    assert _run(backend, lambda: ops.bitmask_count(a + b)).tolist() == [8, 0, 9, 0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [0, 1, 3, 7, 8, 9])
def test_golden_nonfinite_signed_zero_subnormal_every_k(backend, k):
    """|g| ranking with NaN never selected, +-inf first, -0.0 tied with 0.0, a subnormal above them."""
    g = torch.tensor([1.0, -2.0, NAN, 2.0, -0.0, INF, -INF, 0.0, 1e-45])
    a = g.abs().double().nan_to_num(nan=-1.0)
    order = torch.sort(a, descending=True, stable=True).indices[:k]
    sel = torch.zeros(9, dtype=torch.bool)
    sel[order] = True
    sel &= ~g.isnan()
    for first in (True, False):
        bits = torch.tensor([0xFF, 0x01], dtype=torch.uint8)  # every bit of the 9 set
        counts = torch.full((9,), 5, dtype=torch.int32)
        n = _run(backend, lambda: ops.golden_topk_and_(g, bits, k, counts=counts, first=first))
        assert int(n) == int(sel.sum())
        assert int.from_bytes(bytes(bits.tolist()), "little") == sum(1 << j for j in range(9) if sel[j])
        assert torch.equal(counts, 5 + sel.int())


# --------------------------------------------------------------------------- score_topk


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("largest", [True, False])
def test_score_topk_nonfinite_keys_running_topk_and_int32_boundary_base(backend, largest):
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    keys = torch.tensor([[1.0, 1.0], [NAN, 0.0], [INF, 0.0], [-0.0, 0.0], [1.0, 1.0], [-INF, 2.0]])
    base = 2 ** 31 - 2  # new rows straddle the int32 limit
    s_in = torch.tensor([[1.0, NAN], [2.0, 1.0]])
    i_in = torch.tensor([[9, 8], [-1, 0]])
    got_s, got_i = _run(backend, lambda: ops.score_topk(q, keys, 7, largest=largest, scores_in=s_in, idx_in=i_in,
                                                         base=base))
    raw = q.double() @ keys.double().T
    pad = -INF if largest else INF
    for r in range(2):
        cands = [(float(s_in[r, j]), int(i_in[r, j])) for j in range(2) if i_in[r, j] >= 0]
        cands += [(float(raw[r, j]), base + j) for j in range(6)]
        cands = [(pad if v != v else v, i) for v, i in cands]
        cands.sort(key=lambda c: ((-c[0] if largest else c[0]), c[1]))
        cands = (cands + [(pad, -1)] * 7)[:7]
        assert got_i[r].tolist() == [i for _, i in cands]
        assert got_s[r].tolist() == [v for v, _ in cands]


def test_score_topk_takes_numpy_bool_largest_fixed():
    """Fixed (ops/search.py): largest=np.bool_(False) was refused with "largest: expected a bool, got bool",
    while every other flag of gradkit (ops._flag) takes numpy's bool_; a string is still refused."""
    q, keys = torch.tensor([[1.0]]), torch.tensor([[1.0], [3.0], [2.0]])
    for backend in BACKENDS:
        s, i = _run(backend, lambda: ops.score_topk(q, keys, 2, largest=np.bool_(False)))
        assert i.tolist() == [[0, 2]] and s.tolist() == [[1.0, 2.0]]
        with pytest.raises(TypeError, match="largest"):
            _run(backend, lambda: ops.score_topk(q, keys, 2, largest="False"))


# fixed in session 40 (csrc/cpu/search.cpp: 0 - s, not -s)
def test_score_topk_smallest_keeps_the_sign_of_zero_native():
    q, keys = torch.tensor([[1.0]]), torch.tensor([[0.0], [2.0]])
    s, _ = _run("native", lambda: ops.score_topk(q, keys, 1, largest=False))
    assert not torch.signbit(s).any()  # (q @ keys.T) is +0.0; the reference returns +0.0


# --------------------------------------------------------------------------- scope / block norms


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [1.0, 2.0, INF, 0.5])
def test_block_norms_nonfinite_signed_zero_and_subnormal(backend, p):
    """NaN -> NaN, an infinite element -> inf, -0.0 counts as 0, subnormals as torch's float32 norm."""
    x = torch.tensor([[1.0, -0.0, NAN, INF], [1e-45, -1e-45, 0.0, -INF]])
    got = _run(backend, lambda: ops.block_norms(x, [1, 2], p))
    assert got[0, 1].isnan() and got[1, 1] == INF and got[0, 0] == 1.0
    # subnormal block: as torch's float32 vector_norm (p = 1, inf, 0.5 keep it nonzero; p = 2 underflows to 0,
    # the documented float32 sum of |x|^p)
    want = torch.linalg.vector_norm(x[1, :2], ord=p)
    torch.testing.assert_close(got[1, 0], want, rtol=1e-6, atol=0)
    assert (got[1, 0] > 0) == (p != 2.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scope_raw_minus_inf_nan_and_signed_zero(backend):
    x = torch.tensor([[-INF, -INF, NAN, -INF]])
    assert _run(backend, lambda: ops.scope_kth(x, [1, 1], [1, 4], 3, raw=True)).item() == -INF
    assert _run(backend, lambda: ops.scope_mask(x, [1, 1], [1, 4], 3, raw=True, expand=False)).tolist() == \
        [[True, True, False, True]]
    z = torch.tensor([[0.0, -0.0, -0.0, 0.0]])
    assert _run(backend, lambda: ops.scope_mask(z, [1, 1], [1, 4], 2, raw=True, expand=False)).tolist() == \
        [[True, True, False, False]]
    assert _run(backend, lambda: ops.scope_mask(z, [1, 1], [1, 4], 1, raw=True, keep_ties=True,
                                                expand=False)).all()


def test_scope_hard_threshold_strided_x_and_values_match_reference():
    torch.manual_seed(1)
    base0, vals = torch.randn(6, 8), torch.randn(4, 3).t()
    out = {}
    for backend in BACKENDS:
        base = base0.clone()
        keep = _run(backend, lambda: ops.scope_hard_threshold_(base[::2, 1::2], [1, 2], [3, 1], 2, values=vals))
        out[backend] = (base, keep)
    _same(out["native"], out["reference"])
    untouched = torch.ones(6, 8, dtype=torch.bool)
    untouched[::2, 1::2] = False
    assert torch.equal(out["native"][0][untouched], base0[untouched])


# --------------------------------------------------------------------------- flags and counts given as other types


# fixed in session 40 (ops/__init__.py)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_out_accumulate_as_a_string_is_refused_naming_it(backend):
    """accumulate="False": the native op raises torch's schema error (RuntimeError), the reference backend
    silently adds into out (a truthy string). Both should refuse it with a TypeError naming ``accumulate``."""
    out = torch.ones(2)
    with pytest.raises(TypeError, match="accumulate"):
        _run(backend, lambda: ops.gather_segments([torch.tensor([3.0, 1.0])], [None], out=out, accumulate="False"))
    assert out.tolist() == [1.0, 1.0]


# fixed in session 40 (ops/__init__.py)
@pytest.mark.parametrize("call", ["scatter_accumulate", "golden_first", "scope_mask_keep_ties", "scope_mask_expand",
                                  "hard_threshold_keep_ties"])
def test_string_flags_are_refused_not_taken_as_true(call):
    x = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    calls = {
        "scatter_accumulate": lambda: ops.scatter_segments_(torch.ones(4), [None], [torch.ones(4)],
                                                            accumulate="False"),
        "golden_first": lambda: ops.golden_topk_and_(torch.tensor([1.0, 2.0, 3.0]),
                                                     torch.tensor([1], dtype=torch.uint8), 1, first="False"),
        "scope_mask_keep_ties": lambda: ops.scope_mask(x, [1, 1], [1, 4], 1, keep_ties="False"),
        "scope_mask_expand": lambda: ops.scope_mask(x, [1, 1], [1, 4], 1, expand="False"),
        "hard_threshold_keep_ties": lambda: ops.scope_hard_threshold_(x.clone(), [1, 1], [1, 4], 1,
                                                                      keep_ties="False"),
    }
    with pytest.raises(TypeError):
        _run("native", calls[call])


# fixed in session 40 (ops/__init__.py)
@pytest.mark.parametrize("bad", [2.5, True, "2"])
def test_non_integer_numel_is_refused(bad):
    with pytest.raises(TypeError, match="numel"):
        ops.scatter_segments(torch.ones(2), [None], [bad])
    with pytest.raises(TypeError, match="numel"):
        ops.bitmask_to_indices(torch.tensor([1], dtype=torch.uint8), bad)


# fixed in session 40 (ops/__init__.py)
def test_topk_select_takes_numpy_integer_k():
    s = torch.tensor([3.0, 1.0, 2.0])
    assert ops.topk_select(s, np.int64(2)).tolist() == [0, 2]
    assert ops.topk_select_segments([s], np.int64(2)).tolist() == [0, 2]
