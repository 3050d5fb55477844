"""Large-size audit of the parammap / golden / obs / scope Triton kernels, checked at small sizes.

The sizes that matter (selects over > 2^31 elements, n near 2^31, scopes of > 2^31 scores) do not
fit this CPU-only CI, so these tests exercise the changed code paths in the Triton interpreter:
the int64 global radix histograms (a bin of an 8B-element top-k / golden select counts > 2^31 - 1
keys), golden's last-byte bound for n just below 2^31, and the int64 counter variant of scope's
large-scope select (IDX = int64). Results are compared with the plain-PyTorch references.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the first triton import

import contextlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from gradkit.kernels.reference import golden as RG  # noqa: E402
from gradkit.kernels.reference import parammap as RP  # noqa: E402
from gradkit.kernels.reference import scope as RS  # noqa: E402
from gradkit.kernels.triton import golden as G  # noqa: E402
from gradkit.kernels.triton import parammap as P  # noqa: E402
from gradkit.kernels.triton import scope as S  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                                        "ignore:invalid value encountered:RuntimeWarning")


class _Spy:
    """Wraps a jitted kernel; records the dtype of its first (histogram) argument per launch."""

    def __init__(self, kernel):
        self.kernel, self.dtypes = kernel, []

    def __getitem__(self, grid):
        def run(hist, *args, **kwargs):
            self.dtypes.append(hist.dtype)
            return self.kernel[grid](hist, *args, **kwargs)
        return run


def test_topk_select_histogram_is_int64(monkeypatch):
    spy = _Spy(P._topk_walk_kernel)
    monkeypatch.setattr(P, "_topk_walk_kernel", spy)
    x = torch.randint(-50, 50, (300,), generator=torch.Generator().manual_seed(0)).float()
    got = P.topk_select(x, None, 37)
    assert spy.dtypes and all(d == torch.int64 for d in spy.dtypes), spy.dtypes
    assert torch.equal(got, RP.topk_select(x, None, 37))


def test_golden_histogram_is_int64(monkeypatch):
    spy = _Spy(G._topk_walk_kernel)
    monkeypatch.setattr(G, "_topk_walk_kernel", spy)
    g = torch.randint(-9, 10, (7, 13), generator=torch.Generator().manual_seed(1)).float()
    bits = torch.full(((g.numel() + 7) // 8,), 255, dtype=torch.uint8)
    ref_bits = bits.clone()
    pop = G.golden_topk_and_(g, bits, None, 20, False)
    ref_pop = RG.golden_topk_and_(g, ref_bits, None, 20, False)
    assert spy.dtypes and all(d == torch.int64 for d in spy.dtypes), spy.dtypes
    assert torch.equal(bits, ref_bits) and int(pop) == int(ref_pop)


def test_histogram_counts_past_int32():
    """Bins already past 2^31 (earlier programs of a > 2^31-element select) keep counting, and the
    walk picks the digit and the remaining need in int64."""
    kt, inf = P._KEYS[torch.float32]
    g = torch.ones(10).view(torch.int32)  # key(1.0) = 0x3F800001: pass-0 digit 0x3F
    hist = torch.zeros(256, dtype=torch.int64)
    hist[0x3F] = 2**31 - 3
    hist[100] = 2**31 + 1
    state = torch.zeros(2 * 4 + 1, dtype=torch.int64)
    G._golden_hist_kernel[(1,)](g, 10, hist, state, 0, KT=kt, INF=inf, BLOCK=16, ITERS=1)
    assert int(hist[0x3F]) == 2**31 + 7 and int(hist[100]) == 2**31 + 1
    state[4] = 2**31 + 5  # need[0] = k
    P._topk_walk_kernel[(1,)](hist, state[:4], state[4:], 0)
    assert int(state[0]) == 0x3F  # bin 100 holds 2^31 + 1 < k keys; bin 0x3F completes the top k
    assert int(state[5]) == 4  # 2^31 + 5 - (2^31 + 1) keys of bin 0x3F still needed
    assert int(hist[100]) == 2**31 + 1  # the walk does not consume the histogram


def test_golden_write_last_byte_bound_near_int32_max():
    """n just below 2^31 (an int32 kernel argument): the write kernel's byte bound used to be
    (n + 7) // 8, which wraps negative in int32 for n > 2^31 - 8, so no byte was stored. One program
    over the first 4096 elements (k = n: every non-NaN element is selected)."""
    kt, inf = P._KEYS[torch.float32]
    n = 2**31 - 1
    g = torch.randn(4096, generator=torch.Generator().manual_seed(2))
    g[5] = float("nan")
    bits = torch.zeros(512, dtype=torch.uint8)
    state = torch.zeros(2 * 4 + 1, dtype=torch.int64)  # kth = 0 (NaN's key), need = 0
    eq_before = torch.zeros(1, dtype=torch.int64)
    pop = torch.zeros((), dtype=torch.int64)
    G._golden_write_kernel[(1,)](g.view(torch.int32), n, bits, bits, state, state[4:], eq_before, pop, NPASS=4,
                                 KT=kt, INF=inf, FIRST=True, HAS_COUNTS=False, BYTES=512)
    want = torch.full((512,), 255, dtype=torch.uint8)
    want[0] = 255 & ~(1 << 5)
    assert torch.equal(bits, want)
    assert int(pop) == 4095


@contextlib.contextmanager
def _scope_int64_large_path():
    saved, saved64 = dict(S.TUNING), S.FORCE_INT64
    S.TUNING.update({"small_nb": 0, "select_chunk": 4, "elem_chunk": 2, "tile": 8})
    S.FORCE_INT64 = True
    try:
        yield
    finally:
        S.TUNING.clear()
        S.TUNING.update(saved)
        S.FORCE_INT64 = saved64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ties", [False, True])
def test_scope_select_int64_counters(dtype, ties):
    """The large-scope select with int64 offsets also counts in int64 (scopes of >= 2^31 scores):
    masks, hard threshold and k-th values match the reference, with ties across select chunks."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(-3, 4, (6, 40), generator=gen).to(dtype)
    x[1, 7] = float("nan")
    block, scope = [1, 2], [3, 5]
    with _scope_int64_large_path():
        m = S.scope_mask(x, block, scope, 4, 2.0, False, ties, True)
        kth = S.scope_kth(x, block, scope, 4, 1.0, False, 0.25, True)
        xh = x.clone()
        gm = S.scope_hard_threshold_(xh, None, block, scope, 4, 2.0, ties)
    assert torch.equal(m, RS.scope_mask(x, block, scope, 4, 2.0, False, ties, True))
    torch.testing.assert_close(kth, RS.scope_kth(x, block, scope, 4, 1.0, False, 0.25, True), equal_nan=True)
    xr = x.clone()
    assert torch.equal(gm, RS.scope_hard_threshold_(xr, None, block, scope, 4, 2.0, ties))
    assert torch.equal(xh.nan_to_num(123.0), xr.nan_to_num(123.0))
