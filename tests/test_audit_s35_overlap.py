"""Audit (session 35): the memory-overlap rules of the in-place ops are the same on every backend.

The native CPU kernels (csrc/overlap.h) and the Triton launchers refused a scatter_segments_ destination listed
twice / overlapping another / expand()ed and a masked_adamw_ tensor listed twice or in two roles, and read a flat
(scatter) or a source (gather_segments(out=)) that shares memory with an output from a copy. Found:

* GRADKIT_BACKEND=reference did none of it: dst=[a, a] was accepted (accumulate added twice), a parameter listed
  twice took two AdamW steps, an expand()ed dst[1] failed in torch's copy_ after dst[0] had been written, and a
  flat that shares memory with the destinations was read after earlier segments had overwritten it. The rules
  are now op-level checks (gradkit.ops.overlap, shared with the Triton launchers), so every backend refuses the
  same arguments with the same message, naming the same pair.
* the Triton helper named another pair than the native kernels when several conflicted (it looked for an
  expand()ed tensor first, the native check walks address clusters): the shared helper walks them as
  csrc/overlap.h does.
* csrc/cuda/parammap.cu had no overlap check at all: overlapping destinations raced on a GPU and a flat / source
  sharing memory with an output was read by blocks after other blocks had written it (emulated below).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first triton import (conftest does the same)

import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from gradkit import _ext, ops  # noqa: E402
from gradkit.kernels.reference import parammap as pm_ref  # noqa: E402
from gradkit.ops.overlap import check_no_overlap  # noqa: E402

pytestmark = pytest.mark.skipif(not _ext.LOADED, reason="compiled extension not built")
G = torch.ops.gradkit


def _triton_ok() -> bool:
    try:
        from gradkit.kernels.triton import interpreting
    except Exception:  # noqa: BLE001 - no triton
        return False
    return interpreting()


BACKENDS = ["reference", "native",
            pytest.param("triton", marks=pytest.mark.skipif(not _triton_ok(), reason="needs TRITON_INTERPRET=1"))]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("GRADKIT_BACKEND", request.param)
    assert ops.backend() == request.param
    return request.param


def _direct_scatter_message(flat, dst):
    """The native kernel's own refusal (torch.ops.gradkit, no wrapper), or None."""
    try:
        G.scatter_segments_(flat, [None] * len(dst), dst, 1.0, True)
    except ValueError as e:
        return str(e)
    return None


# ============================================================================ scatter_segments_: refusals

SHARE = "; the op writes it in place and would race (clone() one of them first)"
SELF = (": more than one element of the written-to tensor refers to a single memory location (an expand()ed or "
        "overlapping view); clone() it first")


def _scatter_cases():
    """(name, buffers, dst views, expected message): fresh tensors per call."""
    def listed_twice():
        a = torch.zeros(6)
        return [a], [a, a], "dst[1]: shares memory with dst[0]" + SHARE

    def overlapping_views():
        buf = torch.zeros(6)
        return [buf], [buf[:4], buf[2:]], "dst[1]: shares memory with dst[0]" + SHARE

    def expanded_second():  # the reference wrote dst[0], then failed in copy_ with a RuntimeError
        a, e = torch.zeros(4), torch.zeros(1, 3)
        return [a, e], [a, e.expand(2, 3)], "dst[1]" + SELF

    def overlapping_columns():
        w = torch.zeros(4, 4)
        return [w], [w[:, 0:2], w[:, 1:3]], "dst[1]: shares memory with dst[0]" + SHARE

    def several_conflicts():  # the native check meets the lower-address cluster first: dst[2] vs dst[1]
        buf = torch.zeros(12)
        return [buf], [buf[10:11].expand(2), buf[0:4], buf[2:6]], "dst[2]: shares memory with dst[1]" + SHARE

    return [listed_twice, overlapping_views, expanded_second, overlapping_columns, several_conflicts]


@pytest.mark.parametrize("case", _scatter_cases(), ids=lambda f: f.__name__)
@pytest.mark.parametrize("index", ["all", "positions"])
def test_scatter_inplace_refusals_identical_on_every_backend(backend, case, index):
    """DEFECT (reference): dst=[a, a] / overlapping views were accepted, an expand()ed dst[1] was refused by copy_
    after dst[0] had been written; (triton) several conflicts named another pair than the native kernel. Now
    every backend raises the native kernel's ValueError, naming the same pair, with nothing written."""
    bufs, dst, msg = case()
    n = sum(d.numel() for d in dst)
    flat = torch.arange(1.0, 1.0 + n)
    idx = [None if index == "all" else torch.arange(d.numel()) for d in dst]
    before = [b.clone() for b in bufs]
    assert _direct_scatter_message(flat, [d for d in dst]) == msg  # the kernel's own rule
    for accumulate in (False, True):
        with pytest.raises(ValueError) as ei:
            ops.scatter_segments_(flat, idx, dst, accumulate=accumulate)
        assert str(ei.value) == msg
        assert all(torch.equal(b, w) for b, w in zip(bufs, before))


def test_scatter_refusal_names_the_pair_the_native_kernel_names():
    """The shared helper against the native kernel's check on 400 random lists of views of one buffer (slices,
    strided and transposed views, expand()ed and overlapping as_strided ones, other dtypes' views, separate
    tensors): the same verdict and the same message every time."""
    rng = random.Random(35)

    def view(buf):
        n, kind = buf.numel(), rng.randrange(6)
        if kind == 0:
            a = rng.randrange(n)
            return buf[a:rng.randrange(a, n) + 1]
        if kind == 1:
            return buf[rng.randrange(n)::rng.randrange(1, 4)]
        if kind == 2:
            r, c = rng.randrange(1, 5), rng.randrange(1, 5)
            off = rng.randrange(n - r * c + 1)
            return buf[off:off + r * c].view(r, c).t()
        if kind == 3:
            return buf[rng.randrange(n):][:1].expand(rng.randrange(1, 4))
        if kind == 4:
            size, stride = (rng.randrange(1, 4), rng.randrange(1, 4)), (rng.randrange(0, 5), rng.randrange(0, 3))
            need = (size[0] - 1) * stride[0] + (size[1] - 1) * stride[1] + 1
            return buf.as_strided(size, stride, rng.randrange(n - need + 1))
        return torch.zeros(rng.randrange(1, 4))

    refused = 0
    for _ in range(400):
        buf = torch.zeros(24, dtype=rng.choice([torch.float32, torch.float64]))
        dst = [view(buf) for _ in range(rng.randrange(1, 5))]
        if rng.random() < 0.2:  # a view of the same bytes as another dtype
            other = buf.view(torch.float32 if buf.dtype == torch.float64 else torch.float16)
            dst.append(other[rng.randrange(8)::rng.randrange(1, 5)])
        want = _direct_scatter_message(torch.ones(sum(d.numel() for d in dst)), dst)
        try:
            check_no_overlap([(f"dst[{i}]", d, True) for i, d in enumerate(dst)])
            got = None
        except ValueError as e:
            got = str(e)
        assert got == want, [(tuple(d.shape), d.stride(), d.storage_offset(), d.dtype) for d in dst]
        refused += want is not None
    assert 100 < refused < 300  # both verdicts well represented


def test_scatter_disjoint_views_accepted_on_every_backend(backend):
    """Rows, columns and strided slices of one matrix are distinct elements: accepted, the reference's values."""
    w, ref = torch.zeros(4, 6), torch.zeros(4, 6)
    views = lambda m: [m[1:, 0], m[1:, 1], m[0], m[1:, 2::2], m[1:, 3::2]]  # noqa: E731
    flat = torch.arange(1.0, 1.0 + sum(d.numel() for d in views(w)))
    ops.scatter_segments_(flat, [None] * 5, views(w), scale=2.0)
    pm_ref.scatter_segments_(flat, [None] * 5, views(ref), 2.0)
    assert torch.equal(w, ref) and bool((w != 0).all())


# ============================================================================ aliased sources: read from a copy


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("index", ["all", "positions"])
def test_scatter_flat_sharing_memory_with_dst_identical_on_every_backend(backend, dtype, accumulate, index):
    """DEFECT (reference): a flat that shares memory with the destinations was read segment by segment after
    earlier segments had written it (buf = 1..8, flat = buf, dst = [buf[4:8], buf[0:4]] gave 1 2 3 4 1 2 3 4,
    not 5 6 7 8 1 2 3 4). Now every backend reads flat as it was before the call: the same values."""
    buf = torch.arange(1.0, 9.0, dtype=dtype)
    idx = [None, None] if index == "all" else [torch.tensor([0, 1, 2, 3]), torch.tensor([3, 1, 0, 2])]
    want = buf.clone()
    pm_ref.scatter_segments_(want.clone(), idx, [want[4:8], want[0:4]], -0.5, accumulate)
    ops.scatter_segments_(buf, idx, [buf[4:8], buf[0:4]], scale=-0.5, accumulate=accumulate)
    assert torch.equal(buf, want)
    if index == "all" and not accumulate:
        assert torch.equal(buf, torch.tensor([-2.5, -3, -3.5, -4, -0.5, -1, -1.5, -2], dtype=dtype))


@pytest.mark.parametrize("accumulate", [False, True])
def test_gather_out_sharing_memory_with_sources_identical_on_every_backend(backend, accumulate):
    """gather_segments(out=) over sources that out overlaps (a strided one too): every backend reads the sources
    as they were before the call (every value gathered, then written)."""
    buf = torch.arange(1.0, 13.0)
    src = lambda b: [b[0:6].view(2, 3), b[6:12:2]]  # noqa: E731
    index = [torch.tensor([5, 0, 3]), None]
    old = buf.clone()
    vals = pm_ref.gather_segments([t.clone() for t in src(old)], index)
    want = old.clone()
    want[2:8] = (want[2:8] + vals) if accumulate else vals
    ops.gather_segments(src(buf), index, out=buf[2:8], accumulate=accumulate)
    assert torch.equal(buf, want)


# ============================================================================ masked_adamw_

_KW = dict(masked_lr=1e-2, unmasked_lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)


def _state(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mk = lambda: torch.randn(5, 3, generator=gen)  # noqa: E731
    return [mk() for _ in range(n)], [mk() for _ in range(n)], [mk() for _ in range(n)], [mk().abs() for _ in range(n)]


def _step(p, g, m, v, vmax=None, direct=False):
    n = len(p)
    if direct:
        G.masked_adamw_(p, g, m, v, [None] * n, *_KW.values(), [0.1] * n, [0.05] * n, False, vmax)
    else:
        ops.masked_adamw_(p, g, m, v, [None] * n, bias_correction1=[0.1] * n, bias_correction2_sqrt=[0.05] * n,
                          max_exp_avg_sqs=vmax, **_KW)


@pytest.mark.parametrize("case", ["param_twice", "grad_is_exp_avg", "exp_avg_is_exp_avg_sq", "vmax_is_param"])
def test_adamw_refusals_identical_on_every_backend(backend, case):
    """DEFECT (reference): a parameter listed twice took two steps, a state tensor in two roles or a gradient that
    is also a state tensor was read after being written. Now every backend raises the native kernel's ValueError,
    naming the same pair, with no tensor touched."""
    def make():
        p, g, m, v = _state(2)
        vmax = None
        if case == "param_twice":
            p[1] = p[0]
            msg = "params[1]: shares memory with params[0]"
        elif case == "grad_is_exp_avg":
            g[1] = m[0]
            msg = "exp_avgs[0]: shares memory with grads[1]"
        elif case == "exp_avg_is_exp_avg_sq":
            v[0] = m[0]
            msg = "exp_avg_sqs[0]: shares memory with exp_avgs[0]"
        else:
            vmax = [torch.zeros(5, 3), p[1]]
            msg = "max_exp_avg_sqs[1]: shares memory with params[1]"
        return p, g, m, v, vmax, msg + SHARE

    for direct in (True, False):  # the native kernel's own check, then the op on the backend under test
        p, g, m, v, vmax, msg = make()
        before = [t.clone() for t in p + g + m + v]
        with pytest.raises(ValueError) as ei:
            _step(p, g, m, v, vmax, direct=direct)
        assert str(ei.value) == msg
        assert all(torch.equal(a, b) for a, b in zip(p + g + m + v, before))


def test_adamw_views_of_one_buffer_accepted_on_every_backend(backend):
    """Disjoint views of flat buffers (and one gradient read for two parameters) stay accepted: the values of
    separate tensors on the same backend."""
    p, g, m, v = _state(3, seed=1)
    g[2] = g[0]
    flat = [torch.cat([t.reshape(-1) for t in ts]) for ts in (p, m, v)]
    views = [[f[15 * i:15 * (i + 1)].view(5, 3) for i in range(3)] for f in flat]
    _step(views[0], g, views[1], views[2])
    _step(p, g, m, v)
    for sep, vw in zip((p, m, v), views):
        assert all(torch.equal(a, b) for a, b in zip(sep, vw))


# ============================================================================ csrc/cuda/parammap.cu (emulated)


def _emu():
    from test_cuda_emulated import emu, emulated

    return emu("parammap"), emulated


@pytest.mark.parametrize("case", _scatter_cases(), ids=lambda f: f.__name__)
def test_cuda_scatter_inplace_refuses_destinations_that_share_memory(case):
    """DEFECT: the CUDA kernel wrote destinations that share an element from racing blocks. Now the CPU kernel's
    ValueError, naming the same pair, before anything is written."""
    E, _ = _emu()
    bufs, dst, msg = case()
    flat = torch.arange(1.0, 1.0 + sum(d.numel() for d in dst))
    before = [b.clone() for b in bufs]
    for accumulate in (False, True):
        with pytest.raises(ValueError) as ei:
            E.scatter_segments_(flat, [None] * len(dst), dst, 1.0, accumulate)
        assert str(ei.value) == msg
        assert all(torch.equal(b, w) for b, w in zip(bufs, before))
    # distinct elements of one matrix stay accepted
    w, ref = torch.zeros(4, 6), torch.zeros(4, 6)
    views = lambda m: [m[1:, 0], m[1:, 1], m[0], m[1:, 2::2], m[1:, 3::2]]  # noqa: E731
    f = torch.arange(1.0, 1.0 + sum(d.numel() for d in views(w)))
    E.scatter_segments_(f, [None] * 5, views(w), 1.0, False)
    pm_ref.scatter_segments_(f, [None] * 5, views(ref), 1.0, False)
    assert torch.equal(w, ref)


@pytest.mark.parametrize("sms", [1, 132])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("index", [False, True])
def test_cuda_inplace_reads_sources_sharing_memory_with_outputs_before_writing(sms, reverse, index):
    """DEFECT: scatter_segments_ with flat = buf[0:8192] into dst = buf[4096:12288] (two 4096-entry tiles), and
    gather_segments(out=buf[4096:12288]) from buf[0:8192], had blocks read a tile another block had already
    written. Now flat / that source is read from a copy, as on CPU: the reference's values, whatever the block
    order."""
    E, emulated = _emu()
    n, shift = 8192, 4096
    ix = torch.arange(n - 1, -1, -1) if index else None
    for accumulate in (False, True):
        buf = torch.arange(float(n + shift))
        want = buf.clone()
        pm_ref.scatter_segments_(want[0:n].clone(), [ix], [want[shift:]], 1.0, accumulate)
        with emulated(sms=sms, reverse=reverse):
            E.scatter_segments_(buf[0:n], [ix], [buf[shift:]], 1.0, accumulate)
        assert torch.equal(buf, want)
        buf = torch.arange(float(n + shift))
        want = buf.clone()
        pm_ref.gather_segments_out([want[0:n].clone()], [ix], want[shift:], accumulate)
        with emulated(sms=sms, reverse=reverse):
            E.gather_segments_out([buf[0:n]], [ix], buf[shift:], accumulate)
        assert torch.equal(buf, want)
