"""The Triton masked AdamW kernel against the plain-PyTorch reference, on CPU tensors through the
Triton interpreter, with tiny blocks (many programs per tensor, partial last bytes)."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the first triton import

import contextlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402

from gradkit.kernels.reference import adamw as R  # noqa: E402
from gradkit.kernels.reference.parammap import pack_bitmask  # noqa: E402
from gradkit.kernels.triton import adamw as T  # noqa: E402

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# One unit in the last place of the stored dtype: the reference's torch.lerp (an FMA on the CPU's
# vector path) and torch's CPU sqrt may round differently from the kernel's separate, correctly
# rounded operations.
ULP = {torch.float32: 2.4e-7, torch.float64: 4.5e-16, torch.float16: 9.8e-4, torch.bfloat16: 7.9e-3}
_INT_VIEW = {8: torch.int64, 4: torch.int32, 2: torch.int16}
# The interpreter is slow: a quarter of the profile's examples.
FEW = settings(deadline=None, max_examples=max(6, settings.default.max_examples // 4))


@contextlib.contextmanager
def bytes_per_program(n):
    saved = T.BYTES
    T.BYTES = n
    try:
        yield
    finally:
        T.BYTES = saved


def _case(data):
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    # one dtype per call, as every backend of the op requires (check_masked_adamw_)
    dtypes = [data.draw(st.sampled_from(FLOATS))] * data.draw(st.integers(1, 3))
    shapes = [tuple(data.draw(st.lists(st.integers(0, 21), min_size=1, max_size=2))) for _ in dtypes]
    off = data.draw(st.sampled_from([0, 1]))  # 1: storage one entry off 16-byte alignment (no vector hint)

    def make(s, d, x):
        n = torch.Size(s).numel()
        return x(n + off).to(d)[off:].view(s)

    p, gr = ([make(s, d, lambda n: torch.randn(n, generator=g)) for s, d in zip(shapes, dtypes)] for _ in range(2))
    m = [make(s, d, lambda n: torch.randn(n, generator=g) * 0.1) for s, d in zip(shapes, dtypes)]
    v = [make(s, d, lambda n: torch.rand(n, generator=g) * 0.01) for s, d in zip(shapes, dtypes)]
    for t in p:  # signed zeros and NaN must stay bit for bit where the rate is 0
        t.view(-1)[::6] = -0.0
        t.view(-1)[2::9] = float("nan")
    bits = [pack_bitmask(torch.rand(s, generator=g) < 0.5) if data.draw(st.booleans()) else None for s in shapes]
    steps = [data.draw(st.integers(1, 30)) for _ in shapes]
    b1, b2 = data.draw(st.sampled_from([(0.9, 0.999), (0.3, 0.99), (0.0, 0.0)]))
    args = (data.draw(st.sampled_from([0.0, 1e-3, 0.1])), data.draw(st.sampled_from([0.0, 1e-4, 0.05])), b1, b2,
            data.draw(st.sampled_from([1e-8, 1e-3])), data.draw(st.sampled_from([0.0, 0.1])),
            [1 - b1 ** s for s in steps], [(1 - b2 ** s) ** 0.5 for s in steps], data.draw(st.booleans()))
    return p, gr, m, v, bits, args


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@FEW
@given(st.data(), st.sampled_from([1, 2, 256]))
def test_triton_matches_reference(data, nbytes):
    p, g, m, v, bits, args = _case(data)
    want = [[t.clone() for t in x] for x in (p, m, v)]
    R.masked_adamw_(want[0], g, want[1], want[2], bits, *args)
    g_before = [t.clone() for t in g]
    with bytes_per_program(nbytes):
        T.masked_adamw_(p, g, m, v, bits, *args)
    for got, exp in zip((p, m, v), want):
        for a, b in zip(got, exp):
            u = ULP[a.dtype]
            torch.testing.assert_close(a, b, atol=u, rtol=2 * u, equal_nan=True)
    masked_lr, unmasked_lr = args[:2]
    for a, b, bb in zip(p, want[0], bits):
        sel = R.unpack_bits(bb, a.numel(), a.device).reshape(a.shape)
        frozen = torch.where(sel, masked_lr == 0, unmasked_lr == 0)
        iv = _INT_VIEW[a.element_size()]
        assert torch.equal(a[frozen].view(iv), b[frozen].view(iv))  # bit for bit (-0.0, NaN)
    assert all(torch.equal(a, b) for a, b in zip(g, g_before))


def test_triton_equal_rates_float32_matches_reference_closely():
    """Many steps at equal rates on float32: the kernel tracks the reference (= torch.optim.AdamW)."""
    gen = torch.Generator().manual_seed(3)
    p = [torch.randn(300, generator=gen)]
    m, v = [torch.zeros(300)], [torch.zeros(300)]
    q, mq, vq = [p[0].clone()], [m[0].clone()], [v[0].clone()]
    bits = [pack_bitmask(torch.rand(300, generator=gen) < 0.5)]
    for k in range(1, 11):
        g = [torch.randn(300, generator=gen)]
        args = (1e-2, 1e-2, 0.9, 0.999, 1e-8, 0.1, [1 - 0.9 ** k], [(1 - 0.999 ** k) ** 0.5], k % 2 == 0)
        with bytes_per_program(4):
            T.masked_adamw_(p, g, m, v, bits, *args)
        R.masked_adamw_(q, g, mq, vq, bits, *args)
    torch.testing.assert_close(p[0], q[0], atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(m[0], mq[0], atol=1e-7, rtol=1e-6)
