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

from conftest import DEVICES, use_backend
from gradkit import _ext, ops
from gradkit.kernels.reference import projection as ref

pytestmark = pytest.mark.skipif(not _ext.has_op("factored_project"), reason="compiled extension not built")


def make(B, T, I, O, p, seed, rb=False, mask=False, strided=False):
    g_ = torch.Generator().manual_seed(seed)
    a = torch.randn(B * T, I + (3 if strided else 0), generator=g_)[:, :I]
    g = torch.randn(B * T, O, generator=g_)
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


@given(B=st.integers(0, 5), T=st.integers(1, 9), I=st.integers(1, 40), O=st.integers(1, 40),
       p=st.sampled_from([1, 3, 16, 17, 33]), seed=st.integers(0, 2**31 - 1), rb=st.booleans(), mask=st.booleans(),
       strided=st.booleans())
def test_native_matches_reference(B, T, I, O, p, seed, rb, mask, strided):
    args = make(B, T, I, O, p, seed, rb, mask, strided)
    got = ops.factored_project(*args, T)
    want = ref.factored_project(*args, T)
    assert got.shape == (B, p, p) and got.dtype == torch.float32
    assert not bool(torch.isnan(got).any())
    close(got, want)


def test_long_sequences_chunked_and_thread_count_independent():
    """T past the 256-token chunk: partials added in chunk order; the same bits at 1 and 2 threads."""
    args = make(3, 700, 50, 30, 16, 1, rb=True, mask=True)
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
       small=st.booleans())
def test_triton_matches_reference(B, T, I, O, p, seed, rb, mask, small):
    from gradkit.kernels.triton import projection as tri

    args = make(B, T, I, O, p, seed, rb, mask)
    saved = dict(tri.FACTORED_BLOCKS)
    if small:
        tri.FACTORED_BLOCKS.update({"t": 16, "k": 16})
    try:
        got = tri.factored_project(*args, T)
    finally:
        tri.FACTORED_BLOCKS.update(saved)
    close(got, ref.factored_project(*args, T))


BAD = [
    (lambda a, g, lt, rt: (a.double(), g, lt, rt, None, None, 2), TypeError, "a:"),
    (lambda a, g, lt, rt: (a, g[:-2], lt, rt, None, None, 2), ValueError, "g:"),
    (lambda a, g, lt, rt: (a, g, lt[:-1], rt, None, None, 2), ValueError, "lt:"),
    (lambda a, g, lt, rt: (a, g, lt, rt[:, :-1], None, None, 2), ValueError, "rt:"),
    (lambda a, g, lt, rt: (a, g, lt, rt, None, None, 3), ValueError, "T:"),
    (lambda a, g, lt, rt: (a, g, lt, rt, torch.zeros(5), None, 2), ValueError, "rb:"),
    (lambda a, g, lt, rt: (a, g, lt, rt, None, torch.ones(8), 2), ValueError, "mask:"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
@pytest.mark.parametrize("direct", [False, True])
def test_bad_inputs_name_the_argument(case, direct):
    a, g, lt, rt, _, _ = make(4, 2, 6, 5, 4, 0)
    fn, exc, word = BAD[case]
    call = torch.ops.gradkit.factored_project if direct else ops.factored_project
    with pytest.raises((TypeError, ValueError, RuntimeError) if direct else exc, match=word):
        call(*fn(a, g, lt, rt))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    a, g, lt, rt, rb, m = make(3, 4, 7, 6, 5, 2, rb=True, mask=True)
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
       strided=st.booleans())
def test_cuda_bitwise_equals_cpu(B, T, I, O, p, seed, rb, mask, strided):
    """The CUDA kernel runs the CPU kernel's fused multiply-adds in the CPU kernel's order (features
    ascending, tokens in order, 256-token chunk partials added in chunk order): the same bits. p = 65
    takes the composite path (cuBLAS), checked against the reference."""
    args = make(B, T, I, O, p, seed, rb, mask, strided)
    cpu = ops.factored_project(*args, T)
    gpu = ops.factored_project(*[None if t is None else t.cuda() for t in args], T).cpu()
    if p <= 64:
        assert torch.equal(gpu, cpu)
    else:
        close(gpu, ref.factored_project(*args, T))
