"""Session 41 audit: the native CPU kernels (csrc/cpu/*.cpp, csrc/*.h) and their wrappers (gradkit.ops) on LARGE
inputs -- positions, offsets, bit numbers and counts past 2^31 / 2^32, where 32-bit index arithmetic would wrap
silently, and the chunk / block boundaries of the kernels' work splits.

Three kinds of tests:
* real large tensors (uint8 / bool / bfloat16 / float16 of 2^31 + a few elements; up to ~4.3 GB each, guarded by
  ``big``: they need 8 GB of available memory, and CI machines have 24 GiB);
* large OFFSETS without large memory: views with a row stride of 2^20 elements over a lazily allocated 8 GiB
  buffer (only the pages of the rows used are ever touched), a stride-0 ``expand()``, or one tensor passed several
  times to a multi-tensor op, so that element offsets / global positions pass 2^31 while a few MB are resident;
* the golden kernel's heavy-tie path (the k-th largest |g| inside a bucket holding most entries), compared with the
  reference, and its memory (it copied every tied key: 16 GiB at 2^31 entries before this session's fix).
"""
import gc
import os
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch

import gradkit.ops as O
from gradkit import _ext
from gradkit.kernels.reference import golden as ref_golden
from gradkit.kernels.reference import parammap as ref_pm
from gradkit.kernels.reference import projection as ref_proj

pytestmark = pytest.mark.skipif(not _ext.LOADED or O.backend() != "native",
                                reason="audits the native (C++) CPU kernels")

T31 = 1 << 31


def _available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


big = pytest.mark.skipif(_available_bytes() < (8 << 30), reason="needs 8 GB of available memory")


@pytest.fixture(autouse=True)
def _collect():
    """Every large tensor of a test is gone before the next one allocates its own."""
    yield
    gc.collect()


# ------------------------------------------------------------------------------------------ lazily backed offsets

ROW = 1 << 20            # row stride (elements) of the lazy views
ROWS = (1 << 11) + 8     # rows 2048.. start at element 2^31 (float32: byte 2^33)


@pytest.fixture(scope="module")
def lazy():
    """An uninitialised float32 buffer of ROWS * ROW elements (8 GiB of address space; only touched pages become
    resident: ~4 KiB per row a test writes)."""
    if torch.are_deterministic_algorithms_enabled():
        pytest.skip("deterministic mode may fill uninitialised memory")
    try:
        buf = torch.empty(ROWS * ROW, dtype=torch.float32)
    except RuntimeError as e:  # an address-space limit
        pytest.skip(f"cannot reserve 8 GiB of address space: {e}")
    yield buf
    del buf
    gc.collect()


def _rows(buf, cols, col0=0, dtype=torch.float32):
    """(ROWS, cols) view of `buf` with row stride ROW float32s, starting at column col0 of row 0."""
    b = buf if dtype == torch.float32 else buf.view(dtype)
    per = 4 // b.element_size()
    return b.as_strided((ROWS, cols), (ROW * per, 1), col0 * per)


def test_lazy_views_reach_past_2_31(lazy):
    v = _rows(lazy, 4)
    assert v.stride(0) * (ROWS - 1) >= T31 and v.storage_offset() == 0


def test_scope_ops_row_offsets_past_2_31(lazy):
    torch.manual_seed(1)
    vals = torch.randn(ROWS, 16)
    x = _rows(lazy, 16)
    x.copy_(vals)
    assert torch.equal(O.block_norms(x, (1, 4)), O.block_norms(vals, (1, 4)))
    assert torch.equal(O.block_norms(x, (1, 16), p=1.0), O.block_norms(vals, (1, 16), p=1.0))
    assert torch.equal(O.scope_kth(x, (1, 4), (1, 4), 2), O.scope_kth(vals, (1, 4), (1, 4), 2))
    assert torch.equal(O.scope_mask(x, (1, 1), (1, 4), 2), O.scope_mask(vals, (1, 1), (1, 4), 2))  # 2:4
    assert torch.equal(O.scope_mask(x, (1, 16), (8, 1), 3), O.scope_mask(vals, (1, 16), (8, 1), 3))
    assert torch.equal(O.scope_mask(x, (1, 2), (1, 8), 3, p=float("inf"), expand=False),
                       O.scope_mask(vals, (1, 2), (1, 8), 3, p=float("inf"), expand=False))
    v2 = vals.clone()
    assert torch.equal(O.scope_hard_threshold_(x, (1, 2), (1, 4), 1), O.scope_hard_threshold_(v2, (1, 2), (1, 4), 1))
    assert torch.equal(x, v2)
    x.copy_(vals)
    v2 = vals.clone()
    assert torch.equal(O.scope_hard_threshold_(x, (1, 4), (1, 4), 2, p=1.0),
                       O.scope_hard_threshold_(v2, (1, 4), (1, 4), 2, p=1.0))  # fp32 runs of 16-column scopes
    assert torch.equal(x, v2)
    x.copy_(vals)
    v2 = vals.clone()
    bm = torch.rand(ROWS, 4) > 0.5
    O.block_apply_mask_(x, (1, 4), bm)
    O.block_apply_mask_(v2, (1, 4), bm)
    assert torch.equal(x, v2)
    x.copy_(vals)
    v2 = vals.clone()
    th = torch.rand(ROWS, 4)
    O.block_soft_threshold_(x, (1, 4), th)
    O.block_soft_threshold_(v2, (1, 4), th)
    assert torch.equal(x, v2)
    assert x[ROWS - 1].abs().sum() > 0  # the last rows (offsets past 2^31) were read and written


def test_gather_scatter_strided_past_2_31(lazy):
    torch.manual_seed(2)
    vals = torch.randn(ROWS, 16)
    x = _rows(lazy, 16, col0=64)
    x.copy_(vals)
    flat_vals = vals.reshape(-1)
    idx = torch.tensor([0, 5, 2047 * 16 + 15, 2048 * 16, 2048 * 16 + 1, ROWS * 16 - 1], dtype=torch.int64)
    assert torch.equal(O.gather_segments([x], [idx]), flat_vals[idx])
    assert torch.equal(O.gather_segments([x, x], [None, idx]), torch.cat([flat_vals, flat_vals[idx]]))
    f = torch.randn(idx.numel())
    O.scatter_segments_(f, [idx], [x])
    want = flat_vals.clone()
    want[idx] = f
    assert torch.equal(x.reshape(-1), want)
    O.scatter_segments_(f, [idx.flip(0)], [x], accumulate=True)  # unsorted positions: the duplicate check too
    want[idx.flip(0)] += f
    assert torch.equal(x.reshape(-1), want)


def test_factored_project_rows_past_2_31(lazy):
    torch.manual_seed(3)
    av, gv = torch.randn(ROWS, 24), torch.randn(ROWS, 20)
    a, g = _rows(lazy, 24, col0=128), _rows(lazy, 20, col0=160)
    a.copy_(av)
    g.copy_(gv)
    lt, rt, rb = torch.randn(20, 8), torch.randn(24, 8), torch.randn(8)
    mask = torch.rand(ROWS) > 0.2
    for T in (1, 4, ROWS // 8):
        assert torch.equal(O.factored_project(a, g, lt, rt, rb, mask, T=T), O.factored_project(av, gv, lt, rt, rb,
                                                                                                mask, T=T))
    ah, gh = _rows(lazy, 24, col0=192, dtype=torch.bfloat16), _rows(lazy, 20, col0=256, dtype=torch.bfloat16)
    ah.copy_(av)
    gh.copy_(gv)
    assert torch.equal(O.factored_project(ah, gh, lt, rt, T=2), O.factored_project(ah.contiguous(),
                                                                                   gh.contiguous(), lt, rt, T=2))


def test_project_flat_rows_past_2_31(lazy):
    torch.manual_seed(4)
    xv = torch.randn(ROWS, 40)
    x = _rows(lazy, 40, col0=320)
    x.copy_(xv)
    for k, kind in ((64, 0), (16, 0), (64, 1)):  # sign tables, GEMM (k < 32), Gaussian GEMM
        assert torch.equal(O.project_flat(x, k, 7, kind=kind), O.project_flat(xv, k, 7, kind=kind))


def test_score_topk_key_rows_past_2_31(lazy):
    torch.manual_seed(5)
    kv = torch.randn(ROWS, 24)
    keys = _rows(lazy, 24, col0=384)
    keys.copy_(kv)
    for nq in (3, 20):
        q = torch.randn(nq, 24)
        s1, i1 = O.score_topk(q, keys, 5)
        s2, i2 = O.score_topk(q, kv, 5)
        assert torch.equal(s1, s2) and torch.equal(i1, i2)
    kh = _rows(lazy, 24, col0=448, dtype=torch.float16)
    kh.copy_(kv)
    q = torch.randn(8, 24)
    s1, i1 = O.score_topk(q, kh, 6, largest=False)
    s2, i2 = O.score_topk(q, kh.contiguous(), 6, largest=False)
    assert torch.equal(s1, s2) and torch.equal(i1, i2)


def test_obs_rows_past_2_31(lazy):
    torch.manual_seed(6)
    n, m = ROWS, 8
    wv = torch.randn(n, m)
    w = _rows(lazy, m, col0=512)
    w.copy_(wv)
    u = torch.triu(torch.randn(n, n) * 0.01) + torch.eye(n)
    prune = torch.rand(n, m) < 0.3
    err, err2 = torch.zeros(n, m), torch.zeros(n, m)
    w2 = wv.clone()
    O.obs_sweep_(w, err, u, prune, 2000, n)  # rows 2048.. sit past element 2^31
    O.obs_sweep_(w2, err2, u, prune, 2000, n)
    assert torch.equal(w, w2) and torch.equal(err, err2)
    # the factor's rows past 2^31 (ut (n, cap, K) with the lazy row stride)
    K, cap, cnt, mm = 16, 4, 2, 2
    utv = torch.randn(ROWS // 8, cap, K)
    ut = lazy.as_strided((ROWS // 8, cap, K), (8 * ROW, K, 1), 576)
    ut.copy_(utv)
    xf, up, linv = torch.randn(ROWS // 8, mm, K), torch.randn(ROWS // 8, mm, cnt), torch.randn(ROWS // 8, mm, mm)
    O.obs_schur_extend_(ut, xf, up, linv, cnt)
    O.obs_schur_extend_(utv, xf, up, linv, cnt)
    assert torch.equal(ut, utv)


# ------------------------------------------------------------------------------------------ contiguous, lazily backed


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gather_scatter_contiguous_past_2_31(dtype):
    """2^31 + 8 elements of float16 (4 GiB of address space, a few pages touched): positions past 2^31 with int64
    indices, 2^31 - 1 with int32 ones; out-of-range and negative ones refused before any write."""
    if torch.are_deterministic_algorithms_enabled():
        pytest.skip("deterministic mode may fill uninitialised memory")
    n = T31 + 8
    src = torch.empty(n, dtype=dtype)
    pos = torch.tensor([3, T31 - 1, T31, T31 + 1, n - 1], dtype=torch.int64)
    src[pos] = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=dtype)
    assert O.gather_segments([src], [pos]).tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert O.gather_segments([src], [pos[:2].int()]).tolist() == [1.0, 2.0]
    out = torch.ones(5, dtype=torch.float32)
    O.gather_segments([src], [pos], out=out, accumulate=True)
    assert out.tolist() == [2.0, 3.0, 4.0, 5.0, 6.0]
    O.scatter_segments_(torch.tensor([7.0, 8.0, 9.0, 10.0, 11.0], dtype=dtype), [pos], [src])
    assert src[pos].tolist() == [7.0, 8.0, 9.0, 10.0, 11.0]
    O.scatter_segments_(torch.tensor([1.0, 2.0], dtype=dtype), [pos[[4, 2]]], [src], accumulate=True)
    assert src[pos].tolist() == [7.0, 8.0, 11.0, 10.0, 12.0]
    for bad in (torch.tensor([n], dtype=torch.int64), torch.tensor([-1], dtype=torch.int32)):
        with pytest.raises(IndexError):
            O.gather_segments([src], [bad])
        with pytest.raises(IndexError):
            O.scatter_segments_(torch.tensor([0.0], dtype=dtype), [bad], [src])
    assert src[pos].tolist() == [7.0, 8.0, 11.0, 10.0, 12.0]


def test_topk_select_segments_positions_past_2_31():
    """One float16 tensor of 2^29 + 24 entries passed five times: global positions up to 2.7e9 (1 GiB resident)."""
    n = (1 << 29) + 24
    x = torch.zeros(n, dtype=torch.float16)
    x[torch.tensor([5, 1000, n - 3, n - 1])] = torch.tensor([3.0, 9.0, 7.0, 8.0], dtype=torch.float16)
    off = torch.zeros(n, dtype=torch.bool)
    # active: segments 1 and 4 (bases n and 4n > 2^31); 9, 9, 8, 8 and the first 7 (ties: lowest position first)
    got = O.topk_select_segments([x] * 5, 5, active=[off, None, off, off, None])
    assert got.tolist() == [n + 1000, 2 * n - 3, 2 * n - 1, 4 * n + 1000, 5 * n - 1]


# ------------------------------------------------------------------------------------------ real large tensors


@big
def test_bitmask_algebra_past_2_31_bytes():
    """2^31 + 16 bytes (2^34 + 128 bits): byte offsets past 2^31, a popcount past 2^34, bit numbers past 2^34."""
    nb = T31 + 16
    a = torch.full((nb,), 0xFF, dtype=torch.uint8)
    a[5] = 0
    a[T31 + 3] = 0x0F
    a[nb - 1] = 0x10
    assert O.bitmask_count([a]).tolist() == [8 * nb - 8 - 4 - 7]
    numel = 8 * nb - 3  # 5 valid bits in the last byte
    (na,) = O.bitmask_not([a], [numel])
    del a
    gc.collect()
    assert na[5].item() == 0xFF and na[T31 + 3].item() == 0xF0 and na[nb - 1].item() == 0x0F
    assert O.bitmask_count([na]).tolist() == [16]  # and every other byte of the complement is 0


def test_bitmask_not_bit_numbers_past_2_31():
    """2^28 + 3 bytes over numel = 2^31 + 21 bits: the padding of the last byte (bits past numel) stays 0."""
    nb = (1 << 28) + 3
    a = torch.zeros(nb, dtype=torch.uint8)
    a[nb - 2] = 0x5A
    (na,) = O.bitmask_not([a], [8 * nb - 3])
    assert na[nb - 1].item() == 0x1F and na[nb - 2].item() == 0xA5 and na[0].item() == 0xFF
    assert O.bitmask_count([na]).tolist() == [8 * nb - 3 - 4]
    assert torch.equal(O.bitmask_to_indices(O.bitmask_not([na], [8 * nb - 3])[0], 8 * nb - 3, torch.int64),
                       torch.tensor([8 * (nb - 2) + j for j in (1, 3, 4, 6)]))


@big
def test_bool_mask_encodings_past_2_31():
    n = T31 + 16
    m = torch.zeros(n, dtype=torch.bool)
    pos = torch.tensor([5, T31 - 9, T31 - 1, T31, T31 + 1, T31 + 8, n - 1], dtype=torch.int64)
    m[pos] = True
    assert torch.equal(O.mask_to_indices(m, torch.int64), pos)
    bits = O.pack_bitmask(m)
    assert bits.numel() == n // 8
    assert torch.equal(bits.nonzero().reshape(-1), torch.unique(pos // 8))
    t8 = T31 // 8  # T31 - 9: bit 7 of byte t8 - 2; T31 - 1: bit 7 of t8 - 1; T31, T31 + 1: bits 0, 1 of t8
    assert bits[t8 - 2:].tolist() == [0x80, 0x80, 0x03, 0x81]  # T31 + 8 and n - 1 = T31 + 15 share the last byte
    assert O.bitmask_count([bits]).tolist() == [pos.numel()]
    assert torch.equal(O.bitmask_to_indices(bits, n, torch.int64), pos)
    for fn, args in ((O.mask_to_indices, (m, torch.int32)), (O.bitmask_to_indices, (bits, n, torch.int32))):
        with pytest.raises(ValueError, match="int32"):
            fn(*args)
    with pytest.raises(ValueError, match="int32"):  # the C++ kernels' own check (no wrapper)
        torch.ops.gradkit.mask_to_indices(m, torch.int32)
    with pytest.raises(ValueError, match="int32"):
        torch.ops.gradkit.bitmask_to_indices(bits, n, torch.int32)


@big
def test_golden_topk_and_past_2_31():
    """2^31 + 77 bfloat16 gradient entries (3 blocks of the kernel): positions past 2^31 in the mask, the tie share
    crossing a block boundary (zeros taken lowest position first), and the AND into old bits there."""
    n = T31 + 77
    g = torch.zeros(n, dtype=torch.bfloat16)
    nz = torch.tensor([10, (1 << 30) - 1, 1 << 30, T31 - 1, T31, T31 + 5, n - 1])
    g[nz] = torch.arange(1, 8, dtype=torch.bfloat16)
    t8, last = T31 // 8, (n - 1) // 8
    bits = torch.full(((n + 7) // 8,), 0xFF, dtype=torch.uint8)  # the old mask: all set but T31 .. T31 + 7, n - 1
    bits[t8] = 0
    bits[last] = 0x0F  # n - 1 = bit 4 of the last byte (5 valid bits)
    P = (1 << 30) + 100  # the zeros of [0, P) are taken: P - 3 of them (3 nonzeros lie below P)
    k = 7 + P - 3
    assert O.golden_topk_and_(g, bits, k, first=False).item() == k - 3  # T31, T31 + 5, n - 1 ANDed away
    assert bool((bits[: P // 8] == 0xFF).all()) and bits[P // 8].item() == 0x0F
    tail = bits[P // 8 + 1:].nonzero().reshape(-1) + (P // 8 + 1)
    assert tail.tolist() == [t8 - 1] and bits[t8 - 1].item() == 0x80


@big
def test_scope_mask_expanded_past_2_31():
    """A stride-0 x of (2^11 + 8) x 2^20 elements (8 KB resident): the element-shaped mask (2 GiB) is written at
    offsets past 2^31 (rows 2048.. of one block each, one kept per scope of 8 rows)."""
    R, C = (1 << 11) + 8, 1 << 20
    gen = torch.Generator().manual_seed(7)
    # |v| distinct powers of two within each scope: every block's sum (C copies in float32) is exact
    e = torch.stack([torch.randperm(40, generator=gen)[:8] for _ in range(R // 8)]).reshape(-1) - 20
    v = torch.ldexp(torch.where(torch.rand(R, generator=gen) < 0.5, -1.0, 1.0), e)
    x = v.view(R, 1).expand(R, C)
    m = O.scope_mask(x, (1, C), (8, 1), 1, p=1.0)
    keep = torch.zeros(R, dtype=torch.bool)
    keep.view(-1, 8)[torch.arange(R // 8), v.abs().view(-1, 8).argmax(1)] = True
    assert torch.equal(m.all(1), keep) and torch.equal(m.any(1), keep)  # every row all kept or all dropped


# ------------------------------------------------------------------------------------------ cheap large arguments


@pytest.mark.parametrize("base", [T31 - 3, (1 << 32) + 1, (1 << 62) - 10])
def test_score_topk_base_past_2_31(base):
    torch.manual_seed(8)
    q, keys = torch.randn(4, 16), torch.randn(9, 16)
    s, i = O.score_topk(q, keys, 6, base=base)
    s0, i0 = O.score_topk(q, keys, 6)
    assert torch.equal(s, s0) and torch.equal(i, i0 + base)
    keys2 = torch.randn(5, 16)
    s2, i2 = O.score_topk(q, keys2, 6, scores_in=s, idx_in=i, base=base + 9)  # the running top-k merged
    s3, i3 = O.score_topk(q, torch.cat([keys, keys2]), 6, base=base)
    assert torch.equal(s2, s3) and torch.equal(i2, i3)


@pytest.mark.parametrize("row0,col0", [(T31 - 1, (1 << 32) - 70), ((1 << 40) + 3, (1 << 33) + 5), (0, (1 << 62) + 1)])
def test_projection_generator_far_rows_and_columns(row0, col0):
    got = O.projection_matrix(3, 150, 11, 0, 64, row0=row0, col0=col0)
    assert torch.equal(got, ref_proj.matrix_values(3, 150, 11, 0, 64, row0, col0))
    gauss = O.projection_matrix(3, 151, 11, 1, 64, row0=row0, col0=col0 + 1)
    assert torch.allclose(gauss, ref_proj.matrix_values(3, 151, 11, 1, 64, row0, col0 + 1), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("gemm", ["0", "1"])  # the sign-table path (x86 with AVX2) and the GEMM path
@pytest.mark.parametrize("col0", [(1 << 32) - 100, (1 << 40) + 7])
def test_project_flat_far_columns(col0, gemm, monkeypatch):
    monkeypatch.setenv("GRADKIT_PROJECT_GEMM", gemm)
    torch.manual_seed(9)
    x = torch.randn(6, 200)
    R = ref_proj.matrix_values(64, 200, 3, 0, 64, 0, col0).double()
    want = (x.double() @ R.T).float()
    assert torch.allclose(O.project_flat(x, 64, 3, col0=col0), want, rtol=1e-5, atol=1e-5)
    assert torch.allclose(O.project_flat(x[:, 1:], 64, 3, col0=col0 + 1), (x[:, 1:].double() @ R[:, 1:].T).float(),
                          rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ golden: heavy ties


def _golden_case(dtype, kind, n, seed):
    gen = torch.Generator().manual_seed(seed)
    if kind == "zeros":  # a sparse gradient: mostly exact zeros, some NaN
        g = torch.zeros(n, dtype=torch.float64)
        nzp = torch.randperm(n, generator=gen)[: n // 10]
        g[nzp] = torch.randn(nzp.numel(), generator=gen, dtype=torch.float64)
        g[torch.randperm(n, generator=gen)[: n // 100]] = float("nan")
        g = g.to(dtype)
    elif kind == "bucket":  # most entries in one top-12-bit bucket, differing in the lower bits, with repeats
        mant = {torch.float32: 23, torch.float64: 52, torch.float16: 10, torch.bfloat16: 7}[dtype]
        span = {torch.float32: 1 << 19, torch.float64: 1 << 48, torch.float16: 1 << 6, torch.bfloat16: 1 << 3}[dtype]
        steps = torch.randint(0, min(span, 1 << 40), (n,), generator=gen, dtype=torch.int64)
        steps[torch.rand(n, generator=gen) < 0.3] = 3  # repeats of one value inside the bucket
        vals = 1.0 + steps.double() * 2.0 ** -mant
        sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).double()
        g = (vals * sign).to(dtype)
        other = torch.rand(n, generator=gen) < 0.2
        g[other] = (torch.randn(int(other.sum()), generator=gen, dtype=torch.float64) * 4).to(dtype)
    else:  # "nan": half NaN, the rest zeros
        g = torch.zeros(n, dtype=dtype)
        g[torch.rand(n, generator=gen) < 0.5] = float("nan")
    return g


def _check_golden(g, k, first, seed):
    n = g.numel()
    gen = torch.Generator().manual_seed(seed)
    old = torch.randint(0, 256, ((n + 7) // 8,), generator=gen, dtype=torch.int64).to(torch.uint8)
    if n % 8:
        old[-1] &= (1 << (n % 8)) - 1
    counts0 = torch.randint(0, 5, (n,), generator=gen, dtype=torch.int32)
    b1, c1 = old.clone(), counts0.clone()
    r1 = O.golden_topk_and_(g, b1, k, counts=c1, first=first)
    b2, c2 = old.clone(), counts0.clone()
    r2 = ref_golden.golden_topk_and_(g, b2, c2, k, first)
    assert torch.equal(b1, b2), (g.dtype, k, first)
    assert torch.equal(c1, c2), (g.dtype, k, first)
    assert int(r1) == int(r2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["zeros", "bucket", "nan"])
def test_golden_heavy_ties_match_reference(dtype, kind):
    """n = 2^18 + 37 entries (5 blocks at 2 threads): the k-th largest |g| in a bucket of more than n / 4 entries
    takes the radix passes (csrc/cpu/golden.cpp); ties lowest position first across the blocks, NaN never."""
    n = (1 << 18) + 37
    g = _golden_case(dtype, kind, n, seed=zlib.crc32(f"{dtype}{kind}".encode()))
    a = g.double().abs()
    valid = int((~torch.isnan(a)).sum())
    nz = int(((a > 0) & ~torch.isnan(a)).sum())
    vals, cnt = torch.unique(a[~torch.isnan(a)], return_counts=True)
    tie = vals[cnt.argmax()]  # the most repeated |g|: k takes half of its copies (ties lowest position first)
    mid_tie = int((a > tie).sum()) + int(cnt.max()) // 2
    ks = {0, 1, n // 3, n // 2, valid, n, mid_tie, mid_tie + 1} | \
        ({nz - 3, nz, nz + 1, nz + n // 4} if kind == "zeros" else set())
    for i, k in enumerate(sorted(k for k in ks if 0 <= k <= n)):
        _check_golden(g, k, first=i % 2 == 0, seed=i)


def test_golden_heavy_ties_block_boundaries():
    """Ties shared out over blocks of exactly 2^16 entries and a short last block, entries on either side of each
    boundary equal."""
    n = 3 * (1 << 16) + 5
    g = torch.zeros(n, dtype=torch.float32)
    g[(1 << 16) - 2: (1 << 16) + 2] = 1.0
    g[2 * (1 << 16) - 1: 2 * (1 << 16) + 1] = -1.0
    g[n - 3:] = 1.0
    for k in (1, 2, 3, 5, 9, 10, 11, (1 << 16) + 7, 2 * (1 << 16) + 1, n - 1):
        _check_golden(g, k, first=True, seed=k)


_MEM_SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    import gradkit.ops as O
    dtype = getattr(torch, sys.argv[1])
    n = 1 << 25
    g = torch.zeros(n, dtype=dtype)
    g[::97] = 1.0
    bits = torch.zeros((n + 7) // 8, dtype=torch.uint8)
    O.golden_topk_and_(g[: 1 << 20].contiguous(), bits[: 1 << 17], 1 << 19, first=True)  # warm-up
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    c = O.golden_topk_and_(g, bits, n // 2, first=True)
    assert int(c) == n // 2
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
""")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_golden_heavy_ties_memory(dtype):
    """The k-th largest |g| among 2^25 mostly-zero entries: the kernel copied every tied key twice (cand, bucket)
    -- 250 MB extra at float32, 16 GiB at 2^31 entries (an OOM kill); now a few histograms."""
    env = dict(os.environ, OMP_NUM_THREADS="2")
    r = subprocess.run([sys.executable, "-c", _MEM_SCRIPT, dtype], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    extra = int(r.stdout.strip().splitlines()[-1])
    assert extra < 24 << 20, f"golden_topk_and_ took {extra / 2**20:.0f} MiB beyond its input"


# ------------------------------------------------------------------------------------------ chunk boundaries


@pytest.mark.parametrize("n", [(1 << 16) - 1, 1 << 16, (1 << 16) + 1, 3 * (1 << 16) + 7, 8 * (1 << 14) * 2 + 3,
                               8 * (1 << 18) + 13])
def test_encodings_at_chunk_boundaries(n):
    """mask scan chunks of 2^16 entries, bitmask chunks of 2^13 bytes, pack grain 2^14 bytes, bitmask-algebra
    pieces of 2^18 bytes: entries on both sides of each boundary."""
    torch.manual_seed(n)
    m = torch.rand(n) < 0.3
    for b in (1 << 16, 2 << 16, 1 << 17, 8 * (1 << 14), 8 * (1 << 18)):
        for p in (b - 1, b):
            if p < n:
                m[p] = True
    m[n - 1] = True
    for dt in (torch.int32, torch.int64):
        assert torch.equal(O.mask_to_indices(m, dt), ref_pm.mask_to_indices(m, dt))
    bits = O.pack_bitmask(m)
    assert torch.equal(bits, ref_pm.pack_bitmask(m))
    assert torch.equal(O.bitmask_to_indices(bits, n, torch.int64), ref_pm.bitmask_to_indices(bits, n, torch.int64))
    assert O.bitmask_count([bits]).tolist() == [int(m.sum())]
    (nb,) = O.bitmask_not([bits], [n])
    assert torch.equal(nb, ref_golden.bitmask_not([bits], [n])[0])
    other = O.pack_bitmask(torch.rand(n) < 0.5)
    for op, code in O.BITMASK_OPS.items():
        want = ref_golden.bitmask_binary([bits], [other], code)[0]
        assert torch.equal(O.bitmask_binary([bits], [other], op)[0], want)


@pytest.mark.parametrize("count", [(1 << 13) - 1, 1 << 13, (1 << 13) + 1, 2 * (1 << 15) + 3])
def test_scatter_fused_zeroing_at_item_boundaries(count):
    """scatter_segments' fused path zeroes, per work item of 2^13 ascending positions, exactly the destination
    range up to the next item's first position: every entry between them must come out 0."""
    torch.manual_seed(count)
    numel = 5 * count + 11
    idx = torch.sort(torch.randperm(numel)[:count]).values
    flat = torch.randn(count + 3)
    want = ref_pm.scatter_segments(flat, [idx, None], [numel, 3])
    for dt in (torch.int32, torch.int64):
        got = O.scatter_segments(flat, [idx.to(dt), None], [numel, 3])
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(O.gather_segments([got[0]], [idx]), flat[:count])


def test_project_flat_grad_chunks_across_far_columns():
    """project_flat's backward regenerates R in column chunks of 2^22 / k entries: with D = 2 chunks + 1 and col0
    just below 2^32, the chunks straddle column 2^32 and the last one is a single column."""
    k, col0 = 64, (1 << 32) - 5
    D = 2 * ((1 << 22) // k) + 1
    torch.manual_seed(10)
    x = torch.randn(2, D, requires_grad=True)
    out = O.project_flat(x, k, 5, col0=col0)
    go = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, go)
    R = ref_proj.matrix_values(k, D, 5, 0, k, 0, col0).double()
    assert torch.allclose(gx.double(), go.double() @ R, rtol=1e-5, atol=1e-6)
    assert torch.allclose(out.double(), x.detach().double() @ R.T, rtol=1e-4, atol=1e-4)
