"""factored_project (projection family): the fused per-example projection of a Linear layer's gradient.

Native CPU kernel and Triton (interpreter) against the float64 reference on hypothesis-drawn shapes
(one token, odd feature counts, p from 1 past one vector width, bias column, masks, strided rows),
masked tokens holding NaN never leak, empty batches, bit-reproducibility across thread counts and
token chunking, validation naming the argument, opcheck, and the API (gradkit.projection) against
the explicitly formed per-example gradient L G R^T.
"""
import os

import pytest
import torch
from hypothesis import given, settings, strategies as st

from conftest import CPU_ISAS, DEVICES, env_set, use_backend
from gradkit import _ext, ops
from gradkit.kernels.reference import projection as ref

pytestmark = pytest.mark.skipif(not _ext.has_op("factored_project"), reason="compiled extension not built")


HALF = (torch.bfloat16, torch.float16)
DTYPES = (torch.float32,) + HALF


def make(B, T, I, O, p, seed, rb=False, mask=False, strided=False, dtype=torch.float32):
    """a, g in ``dtype`` (a model's activations / output gradients); lt, rt, rb float32."""
    g_ = torch.Generator().manual_seed(seed)
    a = torch.randn(B * T, I + (3 if strided else 0), generator=g_).to(dtype)[:, :I]
    g = torch.randn(B * T, O, generator=g_).to(dtype)
    lt = torch.randn(O, p, generator=g_)
    rt = torch.randn(I, p, generator=g_)
    rbt = torch.randn(p, generator=g_) if rb else None
    m = (torch.rand(B * T, generator=g_) < 0.7) if mask else None
    if m is not None and m.numel():
        a[~m] = float("nan")  # masked tokens must contribute nothing, NaN included
        g[~m] = float("nan")
    return a, g, lt, rt, rbt, m


def close(got, want):
    scale = want.abs().max().item() if want.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * max(1.0, scale))


# small problems of every shape class: the arguments of make(); tests/test_composite_ops.py draws them too
CASES = dict(B=st.integers(0, 5), T=st.integers(1, 9), I=st.integers(1, 40), O=st.integers(1, 40),
             p=st.sampled_from([1, 3, 16, 17, 33]), seed=st.integers(0, 2**31 - 1), rb=st.booleans(),
             mask=st.booleans(), strided=st.booleans(), dtype=st.sampled_from(DTYPES))


@given(**CASES)
def test_native_matches_reference(B, T, I, O, p, seed, rb, mask, strided, dtype):
    args = make(B, T, I, O, p, seed, rb, mask, strided, dtype)
    got = ops.factored_project(*args, T)
    want = ref.factored_project(*args, T)
    assert got.shape == (B, p, p) and got.dtype == torch.float32
    assert not bool(torch.isnan(got).any())
    close(got, want)


@pytest.mark.parametrize("p,dtype", [(16, torch.float32), (32, torch.float32), (64, torch.float32),
                                     (64, torch.bfloat16)])
def test_long_sequences_chunked_and_thread_count_independent(p, dtype):
    """T past the 256-token chunk: partials added in chunk order; the same bits at 1 and 2 threads (p = 32 / 64 and
    bfloat16: the AMX paths on AMX CPUs, whose tiles follow the same token order; Rademacher matrices, which those
    paths take)."""
    args = rademacher_args(3, 700, 50, 30, p, 1, dtype, rb=True, mask=True)
    want = ref.factored_project(*args, 700)
    nt = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.factored_project(*args, 700)
        torch.set_num_threads(2)
        two = ops.factored_project(*args, 700)
    finally:
        torch.set_num_threads(nt)
    assert torch.equal(one, two)
    close(one, want)


def bits(t):
    return t.view(torch.int32)


def same_bits_at_every_level(monkeypatch, *args):
    """factored_project(*args) at every instruction-set level this CPU has (GRADKIT_FACTORED_ISA), best first;
    asserts they agree bit for bit (NaN payloads and signs, and the sign of zero, included) and returns them by
    level."""
    out = {}
    for isa in CPU_ISAS:
        monkeypatch.setenv("GRADKIT_FACTORED_ISA", isa)
        out[isa] = ops.factored_project(*args)
    monkeypatch.delenv("GRADKIT_FACTORED_ISA")
    for isa in CPU_ISAS[1:]:
        assert torch.equal(bits(out[isa]), bits(out[CPU_ISAS[0]])), isa
    return out


def test_isa_levels_detected():
    """The levels the tests compare: the portable loops always, AVX2 and AVX-512 where the CPU has them (an
    x86-64 CPU without AVX2 is older than 2013)."""
    assert CPU_ISAS[-1] == "portable"
    if os.uname().machine == "x86_64":
        assert "avx2" in CPU_ISAS, CPU_ISAS


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [5, 16, 33])
def test_isa_levels_same_bits(monkeypatch, dtype, p):
    """AVX-512 (16 outputs per zmm, 8-token passes), AVX2 (8 per ymm, 6-token passes) and the portable loops
    do the same arithmetic in the same order: the same bits at every level this CPU has, tiles spanning
    short examples and chunked long ones included, and the reference's values."""
    for B, T in ((40, 1), (3, 37), (2, 300)):
        a, g, lt, rt, rb, m = make(B, T, 70, 53, p, 3, rb=True, mask=True, dtype=dtype)
        got = same_bits_at_every_level(monkeypatch, a, g, lt, rt, rb, m, T)
        close(got[CPU_ISAS[0]], ref.factored_project(a, g, lt, rt, rb, m, T))


def test_portable_switch_is_the_portable_level(monkeypatch):
    """GRADKIT_FACTORED_PORTABLE=1 (the older switch) selects the portable loops, as GRADKIT_FACTORED_ISA=portable:
    on a p of 17 (a masked 16 + 1 column block at AVX-512, 8 + 8 + 1 at AVX2) the bits agree with every level."""
    a, g, lt, rt, rb, m = make(2, 40, 90, 61, 17, 9, rb=True, mask=True)
    got = same_bits_at_every_level(monkeypatch, a, g, lt, rt, rb, m, 40)
    monkeypatch.setenv("GRADKIT_FACTORED_PORTABLE", "1")
    old = ops.factored_project(a, g, lt, rt, rb, m, 40)
    assert torch.equal(old, got["portable"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [16, 5])
def test_overlapping_rows_read_as_given(monkeypatch, dtype, p):
    """a / g whose rows share memory (an expand()ed token, row stride 0; an as_strided view whose rows
    overlap) give the bits of their contiguous copies at every instruction-set level: the kernels once
    stepped a zero row stride as 1, reading token r from feature r."""
    B, T, I, O = 3, 20, 70, 40
    a, g, lt, rt, rb, m = make(B, T, I, O, p, 4, rb=True, mask=True, dtype=dtype)
    n = B * T
    r0 = int(m.nonzero()[0])  # an unmasked token (masked ones hold NaN, which expand() would spread)
    ea = a[r0:r0 + 1].expand(n, I)
    og = torch.randn(n * O // 2 + O, generator=torch.Generator().manual_seed(5)).to(dtype).as_strided((n, O), (O // 2, 1))
    for a_, g_ in ((ea, g), (a, og), (ea, og)):
        assert a_.stride(0) < I or g_.stride(0) < O
        got = same_bits_at_every_level(monkeypatch, a_, g_, lt, rt, rb, m, T)
        want = ops.factored_project(a_.contiguous(), g_.contiguous(), lt, rt, rb, m, T)
        assert torch.equal(bits(got[CPU_ISAS[0]]), bits(want))
        close(want, ref.factored_project(a_.contiguous(), g_.contiguous(), lt, rt, rb, m, T))


@pytest.mark.parametrize("p", [16, 20])
def test_power_of_two_widths_same_bits_at_every_level(monkeypatch, p):
    """1024 features (rows exactly 4 KiB apart, the width the 8-token AVX-512 passes exist for; 1024 a's vs 512
    g's): tiles of 16 unmasked tokens split into passes, a 5-token tail tile, and masked holes that make tiles
    gather rows from across the batch: the same bits at every level, and the reference's values."""
    a, g, lt, rt, rb, m = make(3, 21, 1024, 512, p, 11, rb=True, mask=True)
    got = same_bits_at_every_level(monkeypatch, a, g, lt, rt, rb, m, 21)
    close(got[CPU_ISAS[0]], ref.factored_project(a, g, lt, rt, rb, m, 21))


@pytest.mark.parametrize("T", [1, 3, 16, 100])
@pytest.mark.parametrize("dtype", DTYPES)
def test_short_sequences_share_tiles_across_examples_same_bits(T, dtype):
    """Examples shorter than a tile share 16-token tiles (and items of ~256 tokens): each example's result
    is, bit for bit, the one it gets alone, the batch's partials are never mixed (masks leave some examples
    empty: exact zeros), and all match the reference."""
    B = 700 // T + 3
    a, g, lt, rt, rb, m = make(B, T, 45, 38, 16, 7, rb=True, mask=True, dtype=dtype)
    m[:T] = False  # the first example fully masked
    nt = torch.get_num_threads()
    try:  # the examples-per-item grouping follows the thread count; the bits do not
        torch.set_num_threads(1)
        one = ops.factored_project(a, g, lt, rt, rb, m, T)
        torch.set_num_threads(2)
        got = ops.factored_project(a, g, lt, rt, rb, m, T)
    finally:
        torch.set_num_threads(nt)
    assert torch.equal(one, got)
    assert torch.equal(got[0], torch.zeros(16, 16))
    for b in (0, 1, B // 2, B - 1):
        sl = slice(b * T, (b + 1) * T)
        alone = ops.factored_project(a[sl], g[sl], lt, rt, rb, m[sl], T)
        assert torch.equal(got[b:b + 1], alone)
    close(got, ref.factored_project(a, g, lt, rt, rb, m, T))


@pytest.mark.parametrize("p", [16, 32, 64])
@pytest.mark.parametrize("mask", [False, True])
def test_fixed_width_kernels_same_bits_as_generic_kernel(p, mask):
    """p = 16, 32, 64 run kernels compiled for that width; p + 1 with the same first p columns runs the
    generic one, whose first p / 16 column blocks do the same multiply-adds in the same order: the p x p
    blocks agree bit for bit (tokens past one 16-row tile, features past one 16-wide k step plus a
    remainder)."""
    a, g, lt, rt, rb, m = make(3, 37, 1003, 517, p + 1, 4, rb=True, mask=mask)
    full = ops.factored_project(a, g, lt, rt, rb, m, 37)
    args = (a, g, lt[:, :p].contiguous(), rt[:, :p].contiguous(), rb[:p].clone(), m)
    fixed = ops.factored_project(*args, 37)
    assert torch.equal(full[:, :p, :p], fixed)
    close(fixed, ref.factored_project(*args, 37))


@settings(max_examples=15, deadline=None)
@given(B=st.integers(0, 3), T=st.integers(1, 20), I=st.integers(1, 24), O=st.integers(1, 24),
       p=st.sampled_from([1, 5, 16, 20]), seed=st.integers(0, 2**31 - 1), rb=st.booleans(), mask=st.booleans(),
       small=st.booleans(), dtype=st.sampled_from(DTYPES))
def test_triton_matches_reference(B, T, I, O, p, seed, rb, mask, small, dtype):
    from gradkit.kernels.triton import projection as tri

    args = make(B, T, I, O, p, seed, rb, mask, dtype=dtype)
    saved = dict(tri.FACTORED_BLOCKS)
    if small:
        tri.FACTORED_BLOCKS.update({"t": 16, "k": 16})
    try:
        got = tri.factored_project(*args, T)
    finally:
        tri.FACTORED_BLOCKS.update(saved)
    close(got, ref.factored_project(*args, T))


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("mask", [False, True])
def test_half_inputs_are_widened_exactly(dtype, mask):
    """bfloat16 / float16 a and g give the bits of the float32 kernel on a.float(), g.float() (the widening
    is exact; no rounding of the inputs beyond what the caller's dtype already did): native CPU kernel at
    the fixed widths and the generic one, features past a 16-wide vector and a remainder, and Triton."""
    from gradkit.kernels.triton import projection as tri

    for p in (16, 17):
        a, g, lt, rt, rb, m = make(3, 37, 1003, 517, p, 5, rb=True, mask=mask, dtype=dtype)
        assert a.dtype == g.dtype == dtype
        wide = (a.float(), g.float(), lt, rt, rb, m)
        got = ops.factored_project(a, g, lt, rt, rb, m, 37)
        assert got.dtype == torch.float32
        assert torch.equal(got, ops.factored_project(*wide, 37))
        close(got, ref.factored_project(*wide, 37))
    small = make(2, 5, 20, 18, 4, 6, rb=True, mask=mask, dtype=dtype)
    assert torch.equal(tri.factored_project(*small, 5), tri.factored_project(small[0].float(), small[1].float(),
                                                                             *small[2:], 5))


def test_half_subnormals_and_extremes_widened_exactly():
    """float16 subnormals and the largest finite values, bfloat16 tiny values: the exact float32 values go
    in (a scalar-tail and a vector-body column each)."""
    for dtype, vals in ((torch.float16, [2.0**-24, -(2.0**-20), 65504.0, -65504.0]),
                        (torch.bfloat16, [2.0**-130, -(2.0**-126), 3.0e38, 1.0 + 2.0**-7])):
        a = torch.zeros(4, 33, dtype=dtype)
        g = torch.zeros(4, 33, dtype=dtype)
        for i, v in enumerate(vals):
            a[i, 3], a[i, 32], g[i, i] = v, v, 1.0
        lt = torch.eye(33)[:, :4].contiguous()
        rt = torch.zeros(33, 4)
        rt[3, 0] = 1.0
        rt[32, 1] = 1.0
        out = ops.factored_project(a, g, lt, rt, None, None, 1)
        want = torch.tensor(vals, dtype=dtype).float()
        assert torch.equal(out[:, :, 0].diagonal(), want) and torch.equal(out[:, :, 1].diagonal(), want)


def rademacher_args(B, T, I, O, p, seed, dtype, rb=True, mask=True):
    """make()'s a, g, rb, mask in ``dtype`` with lt / rt the Rademacher matrices the collector uses (entries
    +-1/sqrt(p)): at p = 4, 16, 64 a power of two, the AVX-512 sign path's condition."""
    from gradkit.projection import projection_matrix

    a, g, _, _, rbt, m = make(B, T, I, O, p, seed, rb, mask, dtype=dtype)
    lt = projection_matrix(p, O, seed=seed + 1).T.contiguous()
    rt = projection_matrix(p, I, seed=seed + 2).T.contiguous()
    return a, g, lt, rt, rbt, m


def sign_path_agrees(monkeypatch, a, g, lt, rt, rb, m, T):
    """The sign path (GRADKIT_FACTORED_SIGN=1: on, whatever the CPU's vendor) against GRADKIT_FACTORED_SIGN=0
    (the FMA kernel) and the host's default, every instruction-set level and (half-precision a / g) the float32
    kernel on a.float(), g.float(): the same bits, NaN payloads and signs included. Returns the result. The AMX
    path (bfloat16, p = 16, the default on AMX CPUs; its own bits) is off here: it has its own tests below."""
    monkeypatch.setenv("GRADKIT_FACTORED_AMX", "0")
    monkeypatch.setenv("GRADKIT_FACTORED_SIGN", "1")
    got = same_bits_at_every_level(monkeypatch, a, g, lt, rt, rb, m, T)[CPU_ISAS[0]]
    monkeypatch.setenv("GRADKIT_FACTORED_SIGN", "0")
    off = ops.factored_project(a, g, lt, rt, rb, m, T)
    monkeypatch.delenv("GRADKIT_FACTORED_SIGN")
    assert torch.equal(bits(got), bits(off))
    assert torch.equal(bits(got), bits(ops.factored_project(a, g, lt, rt, rb, m, T)))
    wide = ops.factored_project(a.float(), g.float(), lt, rt, rb, m, T)
    assert torch.equal(bits(wide), bits(got))
    return got


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [4, 16, 32, 64])
def test_sign_path_same_bits(monkeypatch, dtype, p):
    """Rademacher matrices, float32 or half-precision a / g: on AVX-512 CPUs each 12-token tile runs 8 rows by FMA and
    4 by xor + add (p = 4, 16, 64; p = 32 has no power-of-two scale and stays on the FMA kernel). The same bits as
    the FMA kernel, every level and the float32 kernel: one-token examples, tail tiles of 9-11 tokens, features
    past one 256-value chunk with a remainder, fewer than 16 features, masked holes, the bias column; and the
    reference's values."""
    for B, T, I, O in ((40, 1, 70, 53), (3, 37, 1003, 517), (2, 300, 256, 33), (6, 11, 5, 17)):
        args = rademacher_args(B, T, I, O, p, 3, dtype)
        got = sign_path_agrees(monkeypatch, *args, T)
        close(got, ref.factored_project(*args, T))


@pytest.mark.parametrize("dtype", DTYPES)
def test_sign_path_non_finite_and_zero_rows(monkeypatch, dtype):
    """NaN, +-inf, -0 and all-zero rows in the xor + add rows (tokens 8-11 and 20-23 of the 12-token tiles) and in
    the FMA rows: a chunk holding a NaN or an inf is run by FMA (by xor + add a NaN's sign would differ), so the
    bits, NaN signs included, are the FMA kernel's at every level."""
    a, g, lt, rt, _, _ = rademacher_args(2, 12, 300, 40, 16, 5, dtype, rb=False, mask=False)
    a[9, 3] = float("nan")
    a[10, 299] = float("inf")  # the 300 % 16 tail
    a[21, 200] = -float("inf")
    a[22] = 0.0
    a[23, 7] = -0.0
    g[8, 1] = float("nan")
    g[11] = -0.0
    g[20, 39] = float("inf")
    a[2, 5] = float("nan")  # an FMA row
    got = sign_path_agrees(monkeypatch, a, g, lt, rt, None, None, 12)
    assert bool(torch.isnan(got).any())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_sign_path_one_side(monkeypatch, dtype, side):
    """Only one side qualifies (the other matrix is not +-s: a user's own, here a Gaussian one): that side
    takes the sign path, the other runs its 12-token tiles as 8 + 4-token FMA passes; the same bits."""
    from gradkit.projection import projection_matrix

    a, g, lt, rt, rbt, m = rademacher_args(5, 29, 300, 270, 16, 11, dtype)
    gauss = projection_matrix(16, 270 if side == "left" else 300, seed=4, kind="gaussian").T.contiguous()
    if side == "left":
        lt = gauss
    else:
        rt = gauss
    got = sign_path_agrees(monkeypatch, a, g, lt, rt, rbt, m, 29)
    close(got, ref.factored_project(a, g, lt, rt, rbt, m, 29))


def test_sign_path_tiny_float32(monkeypatch):
    """float32 subnormals in an xor + add row (token 8 of a 12-token tile): s x0 = 2^-149 and s x1 = 2.5 * 2^-149
    (s = 1/4). Rounding s x1 first (to 2 * 2^-149, ties to even) and then adding gives 3 * 2^-149 or 1 * 2^-149,
    where the FMA chain rounds once (4 or 2); so such a chunk must be run by FMA. Example 0 holds only that token,
    so the difference reaches its projected gradient; example 1 has tiny values beside normal ones."""
    a, g, lt, rt, _, _ = rademacher_args(2, 12, 600, 40, 16, 7, torch.float32, rb=False, mask=False)
    a[:12] = 0.0
    a[8, 0] = 2.0**-147
    a[8, 1] = 10 * 2.0**-149
    a[8, 300] = 2.0**-147  # the same in a later 256-feature chunk (the first two are in chunk 0)
    a[8, 301] = -10 * 2.0**-149
    a[20, 4] = (1 + 2.0**-23) * 2.0**-126
    g[21, 5] = -(1 + 2.0**-22) * 2.0**-125
    got = sign_path_agrees(monkeypatch, a, g, lt, rt, None, None, 12)
    assert bool((got[0] != 0).any())


@given(B=st.integers(0, 4), T=st.integers(1, 30), I=st.integers(1, 300), O=st.integers(1, 60),
       p=st.sampled_from([4, 16, 64]), seed=st.integers(0, 2**20), rb=st.booleans(), mask=st.booleans(),
       dtype=st.sampled_from(DTYPES))
def test_sign_path_property(B, T, I, O, p, seed, rb, mask, dtype):
    """Hypothesis-drawn shapes, Rademacher matrices, float32 or half-precision a / g: the sign path gives the FMA
    kernel's bits at every level, and the reference's values."""
    args = rademacher_args(B, T, I, O, p, seed, dtype, rb, mask)
    with pytest.MonkeyPatch.context() as mp:
        got = sign_path_agrees(mp, *args, T)
    close(got, ref.factored_project(*args, T))


@pytest.mark.parametrize("B,T", [(70, 1), (9, 7), (5, 32), (3, 33)])
def test_triton_short_sequences_several_programs(B, T):
    """Triton: T <= 32 takes the kernel where several examples share one tile (70 one-token examples:
    two programs, the second partial); T = 33 the per-example one. Masked tokens hold NaN."""
    from gradkit.kernels.triton import projection as tri

    args = make(B, T, 30, 20, 5, 12, rb=True, mask=True)
    got = tri.factored_project(*args, T)
    assert not bool(torch.isnan(got).any())
    close(got, ref.factored_project(*args, T))


BAD = [
    (lambda a, g, lt, rt: (a.double(), g, lt, rt, None, None, 2), TypeError, "a:"),
    (lambda a, g, lt, rt: (a.bfloat16(), g, lt, rt, None, None, 2), TypeError, "g:"),
    (lambda a, g, lt, rt: (a, g, lt.bfloat16(), rt, None, None, 2), TypeError, "lt:"),
    (lambda a, g, lt, rt: (a, g[:-2], lt, rt, None, None, 2), ValueError, "g:"),
    (lambda a, g, lt, rt: (a, g, lt[:-1], rt, None, None, 2), ValueError, "lt:"),
    (lambda a, g, lt, rt: (a, g, lt, rt[:, :-1], None, None, 2), ValueError, "rt:"),
    (lambda a, g, lt, rt: (a, g, lt, rt, None, None, 3), ValueError, "T:"),
    (lambda a, g, lt, rt: (a, g, lt, rt, torch.zeros(5), None, 2), ValueError, "rb:"),
    (lambda a, g, lt, rt: (a, g, lt, rt, None, torch.ones(8), 2), TypeError, "mask:"),
    (lambda a, g, lt, rt: (a, g, lt, rt, None, torch.ones(7, dtype=torch.bool), 2), ValueError, "mask:"),
    (lambda a, g, lt, rt: (a, g, lt, rt, torch.zeros(4, dtype=torch.float64), None, 2), TypeError, "rb:"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
@pytest.mark.parametrize("direct", [False, True])
def test_bad_inputs_name_the_argument(case, direct):
    a, g, lt, rt, _, _ = make(4, 2, 6, 5, 4, 0)
    fn, exc, word = BAD[case]
    call = torch.ops.gradkit.factored_project if direct else ops.factored_project
    with pytest.raises((TypeError, ValueError, RuntimeError) if direct else exc, match="^" + word + " "):
        call(*fn(a, g, lt, rt))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(device, dtype):
    a, g, lt, rt, rb, m = make(3, 4, 7, 6, 5, 2, rb=True, mask=True, dtype=dtype)
    a = torch.nan_to_num(a)
    g = torch.nan_to_num(g)
    args = tuple(t.to(device) for t in (a, g, lt, rt, rb, m)) + (4,)
    torch.library.opcheck(torch.ops.gradkit.factored_project, args)


@pytest.mark.parametrize("backend", ["native", "triton", "reference"])
@pytest.mark.parametrize("bias", [False, True])
def test_api_equals_explicit_per_example_gradient(backend, bias):
    from gradkit.projection import derive_seed, factored_project, projection_matrix

    gen = torch.Generator().manual_seed(9)
    B, T, I, O, p = 3, 5, 11, 7, 4
    a = torch.randn(B, T, I, generator=gen)
    g = torch.randn(B, T, O, generator=gen)
    mask = torch.rand(B, T, generator=gen) < 0.8
    with use_backend(backend):
        got = factored_project(a, g, p, seed=3, name="fc", bias=bias, mask=mask)
    L = projection_matrix(p, O, seed=derive_seed(3, "fc", "left")).double()
    R = projection_matrix(p, I + int(bias), seed=derive_seed(3, "fc", "right")).double()
    for b in range(B):
        ab = a[b].double()
        if bias:
            ab = torch.cat([ab, torch.ones(T, 1, dtype=torch.float64)], 1)
        G = (g[b].double() * mask[b, :, None]).T @ ab
        torch.testing.assert_close(got[b].double(), (L @ G @ R.T).reshape(-1), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@settings(deadline=None)
@given(B=st.integers(0, 4), T=st.sampled_from([1, 7, 33, 256, 300]), I=st.integers(1, 130), O=st.integers(1, 130),
       p=st.sampled_from([1, 16, 17, 64, 65]), seed=st.integers(0, 2**31 - 1), rb=st.booleans(), mask=st.booleans(),
       strided=st.booleans(), dtype=st.sampled_from(DTYPES))
def test_cuda_bitwise_equals_cpu(B, T, I, O, p, seed, rb, mask, strided, dtype):
    """The CUDA kernel runs the CPU kernel's fused multiply-adds in the CPU kernel's order (features
    ascending, tokens in order, 256-token chunk partials added in chunk order), half-precision inputs
    widened exactly on both: the same bits. p = 65 takes the composite path (cuBLAS), checked against the
    reference."""
    args = make(B, T, I, O, p, seed, rb, mask, strided, dtype)
    cpu = ops.factored_project(*args, T)
    gpu = ops.factored_project(*[None if t is None else t.cuda() for t in args], T).cpu()
    if p <= 64:
        assert torch.equal(gpu, cpu)
    else:
        close(gpu, ref.factored_project(*args, T))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_blocks_of_several_examples_bitwise_equal_cpu():
    """Short sequences: CUDA blocks of several whole examples, tiles spanning examples, each thread
    flushing its entries when the example changes (a fully masked example included): the CPU's bits."""
    for dtype in DTYPES:
        for B, T in ((100, 1), (50, 7), (9, 100), (3, 700)):
            a, g, lt, rt, rb, m = make(B, T, 90, 70, 16, 13, rb=True, mask=True, dtype=dtype)
            m[T:2 * T] = False
            cpu = ops.factored_project(a, g, lt, rt, rb, m, T)
            gpu = ops.factored_project(*[t.cuda() for t in (a, g, lt, rt, rb, m)], T).cpu()
            assert torch.equal(gpu, cpu), (dtype, B, T)
            assert torch.equal(gpu[1], torch.zeros(16, 16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_triton_matches_reference(dtype):
    """The Triton kernels compiled for the GPU (the interpreter runs them in CI): per-example tiles, the
    short-sequence kernel (several examples per tile), p past a power of two, bias, masked NaN tokens."""
    from gradkit.kernels.triton import projection as tri

    for B, T, I, O, p in ((3, 37, 1003, 517, 16), (40, 3, 90, 70, 17), (2, 300, 64, 64, 64), (0, 5, 8, 8, 4)):
        args = make(B, T, I, O, p, 5, rb=True, mask=True, dtype=dtype)
        got = tri.factored_project(*[None if t is None else t.cuda() for t in args], T).cpu()
        assert not bool(torch.isnan(got).any())
        close(got, ref.factored_project(*args, T))


@pytest.mark.parametrize("backend", ["native", "triton", "reference"])
def test_api_half_precision_activations(backend):
    """gradkit.projection.factored_project on a bfloat16 / float16 model's activations and gradients: the
    result of the same call on their float32 values, bit for bit (the fused op widens as it reads); a and g
    of different dtypes are both converted to float32 first. On an AMX CPU the native backend's default for
    bfloat16 at p = 16 is the AMX path (its own bits: within float32 summation error); GRADKIT_FACTORED_AMX=0
    gives the bits above."""
    from gradkit.projection import factored_project

    gen = torch.Generator().manual_seed(11)
    a = torch.randn(3, 6, 40, generator=gen)
    g = torch.randn(3, 6, 24, generator=gen)
    mask = torch.rand(3, 6, generator=gen) < 0.8
    with use_backend(backend), env_set("GRADKIT_FACTORED_AMX", "0"):
        for dt in HALF:
            ah, gh = a.to(dt), g.to(dt)
            want = factored_project(ah.float(), gh.float(), 16, seed=1, name="fc", bias=True, mask=mask)
            assert torch.equal(factored_project(ah, gh, 16, seed=1, name="fc", bias=True, mask=mask), want)
        mixed = factored_project(a.bfloat16(), g, 16, seed=1, name="fc")
        assert torch.equal(mixed, factored_project(a.bfloat16().float(), g, 16, seed=1, name="fc"))
    with use_backend(backend):  # the default (AMX where the CPU has it)
        ah, gh = a.bfloat16(), g.bfloat16()
        close(factored_project(ah, gh, 16, seed=1, name="fc", bias=True, mask=mask),
              factored_project(ah.float(), gh.float(), 16, seed=1, name="fc", bias=True, mask=mask))


def under_env(var, values, call):
    """call() under each of ``values`` of the environment variable ``var`` in turn (None: unset); the results."""
    outs = []
    with pytest.MonkeyPatch.context() as mp:
        for v in values:
            if v is None:
                mp.delenv(var, raising=False)
            else:
                mp.setenv(var, v)
            outs.append(call())
    return outs


def one_hot_amx_pair(a, T, O, p, amx=None):
    """For the AMX tests whose sums must be exact: g one-hot per token (token n's output n % O, so g's projection is
    exact on every path and each output's bits are those of a's projections), Rademacher lt / rt (seeds 1, 2), and
    factored_project under GRADKIT_FACTORED_AMX=0 and under ``amx`` (None: unset, the default): (g, lt, rt, off,
    on)."""
    from gradkit.projection import projection_matrix

    N = a.shape[0]
    g = torch.zeros(N, O)
    g[torch.arange(N), torch.arange(N) % O] = 1.0
    g = g.to(a.dtype)
    lt = projection_matrix(p, O, seed=1).T.contiguous()
    rt = projection_matrix(p, a.shape[1], seed=2).T.contiguous()
    off, on = under_env("GRADKIT_FACTORED_AMX", ("0", amx), lambda: ops.factored_project(a, g, lt, rt, None, None, T))
    return g, lt, rt, off, on


def _has_amx():
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " amx_bf16" in flags and " amx_tile" in flags and " avx512f" in flags


@settings(max_examples=40)
@given(B=st.integers(0, 4), T=st.integers(1, 40), I=st.integers(1, 300), O=st.integers(1, 70),
       p=st.sampled_from([16, 32, 64]), seed=st.integers(0, 2**20), rb=st.booleans(), mask=st.booleans(),
       left_gauss=st.booleans(), dtype=st.sampled_from([torch.bfloat16, torch.float32, torch.float16]))
def test_amx_matches_reference(B, T, I, O, p, seed, rb, mask, left_gauss, dtype):
    """The AMX path (the default on AMX CPUs; GRADKIT_FACTORED_AMX=1 asks for it, =0 turns it off): bfloat16 a / g
    at p = 16, 32, 64, float32 ones (each value split into three bfloat16 parts, skinny_amx_split; p = 32, 64 from
    session 29, 16 from session 30) and float16 ones (two parts) likewise run TDPBF16PS for each side whose matrix
    is +-s (the signs in the tiles, s applied to the sums; a Gaussian side stays on the FMA kernel). Its own bits,
    so: the reference's values within float32 summation error, whatever the tails (16- and 32-token tiles,
    features rounded up to 32, p / 16 blocks of outputs), masks and bias column. Elsewhere (no AMX) the setting
    changes nothing, bit for bit; unset, the result is that of =1 (the default), bit for bit."""
    from gradkit.projection import projection_matrix

    a, g, lt, rt, rbt, m = rademacher_args(B, T, I, O, p, seed, dtype, rb, mask)
    if left_gauss:
        lt = projection_matrix(p, O, seed=4, kind="gaussian").T.contiguous()
    off, on, default = under_env("GRADKIT_FACTORED_AMX", ("0", "1", None),
                                 lambda: ops.factored_project(a, g, lt, rt, rbt, m, T))
    close(on, ref.factored_project(a, g, lt, rt, rbt, m, T))
    assert torch.equal(bits(default), bits(on))
    if not _has_amx():
        assert torch.equal(bits(on), bits(off))


@pytest.mark.parametrize("dtype,p", [(torch.bfloat16, 16), (torch.bfloat16, 32), (torch.bfloat16, 64),
                                     (torch.float32, 16), (torch.float32, 32), (torch.float32, 64),
                                     (torch.float16, 16), (torch.float16, 32), (torch.float16, 64)])
def test_amx_taken_and_exact_products(dtype, p):
    """On an AMX CPU the path is taken (some sums round differently from the FMA chain: 8192 tokens x 1000
    features gave ~27% of entries an ulp apart) and stays as close to float64 as the FMA kernel (relative 1e-6);
    values in every binade of +-2^-60 .. 2^60 (bfloat16: products exact, no denormals; float32: split into three
    bfloat16 parts; float16: its binades 2^-24 .. 2^11, subnormals included, in two parts). Not on AMX: the same
    bits. Non-finite entries: the same NaN / inf positions as the reference. p = 32: +-1/sqrt(32) is not a
    bfloat16 value; the tiles take the signs and the sums are scaled once."""
    from gradkit.projection import projection_matrix

    gen = torch.Generator().manual_seed(3)
    B, T, I, O = 8, 64, 1000, 520
    lo, hi = (-24, 12) if dtype == torch.float16 else (-60, 61)
    a = (torch.randn(B * T, I, generator=gen) * torch.exp2(torch.randint(lo, hi, (B * T, I), generator=gen))).to(dtype)
    g = torch.randn(B * T, O, generator=gen).to(dtype)
    lt = projection_matrix(p, O, seed=1).T.contiguous()
    rt = projection_matrix(p, I, seed=2).T.contiguous()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRADKIT_FACTORED_AMX", "0")
        off = ops.factored_project(a, g, lt, rt, None, None, T)
        mp.setenv("GRADKIT_FACTORED_AMX", "1")
        on = ops.factored_project(a, g, lt, rt, None, None, T)
        exact = torch.einsum("btp,btq->bpq", (g.double() @ lt.double()).view(B, T, p),
                             (a.double() @ rt.double()).view(B, T, p))
        rel = lambda r: float((r.double() - exact).abs().max() / exact.abs().max())  # noqa: E731
        assert rel(off) < 1e-6 and rel(on) < 1e-6, (rel(off), rel(on))
        if _has_amx():
            assert not torch.equal(bits(on), bits(off))
        else:
            assert torch.equal(bits(on), bits(off))
        a[5, 7] = float("nan")
        a[70, 999] = float("inf")
        g[200, 3] = -float("inf")
        on = ops.factored_project(a, g, lt, rt, None, None, T)
    want = ref.factored_project(a, g, lt, rt, None, None, T)
    assert torch.equal(torch.isnan(on), torch.isnan(want))
    assert torch.equal(torch.isinf(on), torch.isinf(want))


@pytest.mark.parametrize("dtype,p", [(torch.bfloat16, 16), (torch.float32, 16), (torch.float32, 32)])
def test_amx_suspect_rows_take_fma_bits(dtype, p):
    """Rows the AMX path cannot stand for are recomputed with the FMA kernel (csrc/cpu/projection.cpp
    amx_scale_rows): a side's row whose projection is below 2^-60 everywhere (TDPBF16PS reads denormal bfloat16
    inputs, and float32 values' parts below 2^-126, as zero and flushes denormal sums) or not finite. g is one-hot
    per token (its projection exact on every path), so an example's output bits are those of its a rows'
    projections: examples of denormal, tiny (bfloat16 2^-80, float32 2^-100), zero-and-denormal and non-finite
    rows (float32: also a NaN whose payload lies in the low 16 bits, so that its hi part is an inf) must match
    GRADKIT_FACTORED_AMX=0 bit for bit (NaN payloads included); the example of ordinary rows stays within float32
    summation error of the reference. Without the recomputation the denormal example's output would be all zeros
    on an AMX CPU, against nonzero values here."""
    f32 = dtype == torch.float32
    gen = torch.Generator().manual_seed(11)
    B, T, I, O = 5, 20, 300, 40
    a = torch.randn(B, T, I, generator=gen)
    a[0] *= 2.0 ** (-140 if f32 else -133)  # denormals
    a[1] *= 2.0 ** (-100 if f32 else -80)
    a[2] *= 2.0 ** -128
    a[2, ::3] = 0.0
    a[3, 2, 5], a[3, 2, 9], a[3, 7, 1], a[3, 11, 0] = float("inf"), -float("inf"), float("nan"), float("inf")
    if f32:
        a[3, 12, 4] = torch.tensor(0x7F800001, dtype=torch.int32).view(torch.float32)  # NaN, payload in the low bits
    a = a.reshape(B * T, I).to(dtype)
    g, lt, rt, off, on = one_hot_amx_pair(a, T, O, p)
    assert bool((off[0] != 0).any()), "the denormal example's projection is zero: the test would not see a flush"
    for b in range(4):
        assert torch.equal(bits(on[b]), bits(off[b])), b
    close(on[4], ref.factored_project(a[4 * T:], g[4 * T:], lt, rt, None, None, T)[0])


@pytest.mark.parametrize("p", [16, 32, 64])
def test_amx_prefetch_changes_no_bits(p):
    """The AMX path's prefetch of the next tile's rows (csrc/cpu/projection.cpp amx_prefetch: on for rows under
    4 KiB at p = 64 or with a stride not a multiple of 64 bytes; GRADKIT_AMX_PREFETCH=0 / 1 forces it) only moves
    data into cache: off, on and the default give the same bits, on rows of 1000 (two cache lines per tile row) and
    768 features, whole and masked tiles, and examples that end mid-tile (T = 37)."""
    from gradkit.projection import projection_matrix

    gen = torch.Generator().manual_seed(29)
    B, T = 6, 37
    for I, O in ((1000, 768), (768, 1000)):
        a = torch.randn(B * T, I, generator=gen).bfloat16()
        g = torch.randn(B * T, O, generator=gen).bfloat16()
        lt = projection_matrix(p, O, seed=6).T.contiguous()
        rt = projection_matrix(p, I, seed=7).T.contiguous()
        m = torch.rand(B * T, generator=gen) > 0.2
        for mask in (None, m):
            outs = under_env("GRADKIT_AMX_PREFETCH", ("0", "1", None),
                             lambda: bits(ops.factored_project(a, g, lt, rt, None, mask, T)))
            assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2]), (I, O, mask is None)
            close(outs[0].view(torch.float32), ref.factored_project(a, g, lt, rt, None, mask, T))


@pytest.mark.parametrize("dtype,p", [(torch.bfloat16, 16), (torch.bfloat16, 32), (torch.bfloat16, 64),
                                     (torch.float16, 16)])
def test_amx_two_tiles_change_no_bits(dtype, p):
    """Where the bfloat16 AMX path runs, tiles are 32 tokens at p = 16, 32 (csrc/cpu/projection.cpp skinny_amx2: two
    16-token tiles share each sign tile load) and 16 at p = 64; GRADKIT_AMX_TILE=16 / 32 forces either; float16 at
    p = 16 likewise (skinny_amx_split2, two parts per token tile). TDPBF16PS computes each row alone, so both (and
    the default) must give the same bits: feature counts with no tail (1024), an even and an odd tail
    (1000, 37), fewer than 32 features (20), rows spaced wider than their length (a slice of wider tensors),
    masked tokens (tiles copied first), examples ending mid-tile (T = 37, 5) and one-token examples (partial last
    tiles of 17 to 31 rows). A copy of the wrong rows, a skipped tail or a tile stored to the wrong rows changes
    the bits (checked by breaking each on purpose). Without AMX both settings run the FMA kernel."""
    from gradkit.projection import projection_matrix

    gen = torch.Generator().manual_seed(31)
    cases = [(1024, 20, 5, 37), (1000, 37, 3, 37), (37, 1000, 4, 5), (20, 64, 49, 1)]
    for I, O, B, T in cases:
        for sliced in (False, True):
            if sliced:  # rows 8 features longer than the slice read
                a = torch.randn(B * T, I + 8, generator=gen).to(dtype)[:, :I]
                g = torch.randn(B * T, O + 8, generator=gen).to(dtype)[:, 3:O + 3]
            else:
                a = torch.randn(B * T, I, generator=gen).to(dtype)
                g = torch.randn(B * T, O, generator=gen).to(dtype)
            lt = projection_matrix(p, O, seed=8).T.contiguous()
            rt = projection_matrix(p, I, seed=9).T.contiguous()
            m = torch.rand(B * T, generator=gen) > 0.3
            for mask in (None, m):
                one, two, default = under_env("GRADKIT_AMX_TILE", ("16", "32", None),
                                              lambda: ops.factored_project(a, g, lt, rt, None, mask, T))
                assert torch.equal(bits(one), bits(two)), (I, O, B, T, sliced, mask is None)
                assert torch.equal(bits(one), bits(default)), (I, O, B, T, sliced, mask is None)
                close(two, ref.factored_project(a, g, lt, rt, None, mask, T))


def test_large_output_reused_buffer_fully_written():
    """Outputs of 4 MiB or more come from a cache of freed buffers (csrc/cpu/out_pool.h, on huge pages): a call
    that reuses the buffer of an earlier, nonzero result must still write every entry, examples whose tokens are
    all masked out included (+0.0, the reference's value), and must not hand out a buffer still in use."""
    gen = torch.Generator().manual_seed(41)
    B, I, O, p = 4096, 24, 20, 16  # 4096 one-token examples: 4096 x 16 x 16 float32 = 4 MiB
    a = torch.randn(B, I, generator=gen)
    g = torch.randn(B, O, generator=gen)
    lt = torch.randn(O, p, generator=gen)
    rt = torch.randn(I, p, generator=gen)
    first = ops.factored_project(a, g, lt, rt, None, None, 1)
    assert bool((first != 0).all())
    kept = first.clone()
    held = ops.factored_project(a, g, lt, rt, None, None, 1)  # `first` is alive: a different buffer
    assert held.data_ptr() != first.data_ptr() and torch.equal(first, kept)
    ptrs = (first.data_ptr(), held.data_ptr())
    del first, held
    m = torch.rand(B, generator=gen) < 0.5
    out = ops.factored_project(a, g, lt, rt, None, m, 1)
    want = ref.factored_project(a, g, lt, rt, None, m, 1)
    assert bool((out[~m] == 0).all()) and not bool(torch.signbit(out[~m]).any())
    close(out, want)
    assert out.data_ptr() in ptrs  # a freed buffer was reused: the values above were written over a result


def test_output_cache_switch():
    """GRADKIT_OUT_POOL_MB caps the cache of large freed outputs (csrc/cpu/out_pool.h; default 256 MiB): 0 turns it
    off, and large outputs are then ordinary tensors (resizable storage, like at::empty's; the cache's are not); the
    values are the same either way. A value that is not a whole number of MiB is refused, naming the variable,
    before any work."""
    gen = torch.Generator().manual_seed(43)
    B, I, O, p = 4096, 24, 20, 16  # 4 MiB out: large enough for the cache
    a = torch.randn(B, I, generator=gen)
    g = torch.randn(B, O, generator=gen)
    lt = torch.randn(O, p, generator=gen)
    rt = torch.randn(I, p, generator=gen)
    pooled = ops.factored_project(a, g, lt, rt, None, None, 1)
    assert not pooled.untyped_storage().resizable()  # from the cache
    small = ops.factored_project(a[:8], g[:8], lt, rt, None, None, 1)
    assert small.untyped_storage().resizable()  # under 4 MiB: never from the cache
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRADKIT_OUT_POOL_MB", "0")
        plain = ops.factored_project(a, g, lt, rt, None, None, 1)
        assert plain.untyped_storage().resizable()
        assert torch.equal(bits(plain), bits(pooled))
        for bad in ("lots", "-1", "12MB"):
            mp.setenv("GRADKIT_OUT_POOL_MB", bad)
            with pytest.raises(RuntimeError, match="GRADKIT_OUT_POOL_MB"):
                ops.factored_project(a, g, lt, rt, None, None, 1)


@pytest.mark.parametrize("dtype,p", [(torch.float32, 16), (torch.float32, 32), (torch.float32, 64),
                                     (torch.float16, 16), (torch.float16, 32), (torch.float16, 64)])
def test_amx_split_keeps_every_bit(dtype, p):
    """The split into bfloat16 parts loses nothing: with one nonzero feature per token and one-hot g, every sum is
    a single term, and the AMX path must give the FMA kernel's bits exactly (both round x s once, then share the
    outer products). float32: values 1 + j 2^-23 (j random) in binades 2^-20 .. 2^20, so hi, mid and lo are all
    nonzero, three parts; float16: 1 + j 2^-10 in binades 2^-14 .. 2^15, two parts (hi 8 significant bits, lo the
    other 3). The same values with their last part cleared (float32's lowest 8 significand bits, float16's lowest
    3) give other bits, so a lost part would show. Without AMX both are the FMA kernel."""
    f16 = dtype == torch.float16
    gen = torch.Generator().manual_seed(17)
    B, T, I, O = 6, 16, 40, 24
    mbits, (e0, e1) = (10, (-14, 16)) if f16 else (23, (-20, 21))
    j = torch.randint(1, 2**mbits, (B * T, I), generator=gen).double()
    a = ((1 + j * 2.0 ** -mbits) * torch.exp2(torch.randint(e0, e1, (B * T, I), generator=gen).double())).to(dtype)
    a = a * (torch.arange(I)[None, :] == (torch.arange(B * T)[:, None] % I)).to(dtype)  # one feature per token
    if f16:
        cut = (a.view(torch.int16) & ~0x7).view(torch.float16)
    else:
        cut = (a.view(torch.int32) & ~0xFF).view(torch.float32)
    assert bool((cut != a).any())
    g, lt, rt, off, on = one_hot_amx_pair(a, T, O, p, amx="1")
    (off_cut,) = under_env("GRADKIT_FACTORED_AMX", ("0",), lambda: ops.factored_project(cut, g, lt, rt, None, None, T))
    assert torch.equal(bits(on), bits(off))
    assert not torch.equal(bits(off_cut), bits(off))


def test_amx_float16_nonfinite_and_zero_rows_take_fma_bits():
    """float16 rows on the AMX path (two bfloat16 parts): an inf splits into hi = inf and lo = NaN, and a NaN whose
    payload lies in its lowest 3 bits truncates to an inf in hi, so such rows come out non-finite and are
    recomputed by the FMA kernel (amx_scale_rows), as are all-zero rows: those examples have exactly the
    GRADKIT_FACTORED_AMX=0 bits (NaN payloads and signs included); an example of ordinary rows stays within
    float32 summation error of the reference. Subnormal float16 inputs need no recomputation (each part is a
    normal bfloat16): that example matches the reference too."""
    gen = torch.Generator().manual_seed(12)
    B, T, I, O, p = 5, 20, 300, 40, 16
    a = torch.randn(B, T, I, generator=gen).half()
    a[0] = 0.0
    a[1, 2, 5], a[1, 2, 9], a[1, 7, 1] = float("inf"), -float("inf"), float("nan")
    a[1, 12, 4] = torch.tensor(0x7C01, dtype=torch.int16).view(torch.float16)  # NaN, payload in the low bits
    a[1, 13, 7] = torch.tensor(0xFC03 - 0x10000, dtype=torch.int16).view(torch.float16)  # negative NaN, likewise
    a[2] = (torch.randn(T, I, generator=gen) * 2.0 ** -20).half()  # float16 subnormals
    assert bool((a[2] != 0).any()) and bool((a[2].abs() < 2.0 ** -14).all())
    a = a.reshape(B * T, I)
    g, lt, rt, off, on = one_hot_amx_pair(a, T, O, p)
    assert bool(torch.isnan(off[1]).any()), "the non-finite example has no NaN: the test would not see a split inf"
    for b in range(2):
        assert torch.equal(bits(on[b]), bits(off[b])), b
    for b in (2, 3, 4):
        close(on[b], ref.factored_project(a[b * T:(b + 1) * T], g[b * T:(b + 1) * T], lt, rt, None, None, T)[0])
