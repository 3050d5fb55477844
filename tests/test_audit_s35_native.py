"""Session-35 audit of the native CPU kernels' host-side checks (csrc/*.h, csrc/cpu/*.cpp), through the op
wrappers and through direct torch.ops.gradkit calls:

* in-place ops whose arguments share memory: gather_segments(out=) reading a source that out overlaps (the
  kernel read values it had already overwritten), scatter_segments_ with flat overlapping a destination (same),
  with a destination listed twice / an expand()ed or overlapping-view destination (threads raced on one
  element; the reference refuses an expanded one), masked_adamw_ with a parameter listed twice or a gradient that
  is also a state tensor (threads raced; the kernel takes its pointers as not aliasing). Disjoint views of one
  buffer (rows, columns, strided slices) stay accepted;
* direct op calls with a non-float dtype / out / flat raised NotImplementedError from inside the kernel's
  dispatch (after allocating), or named dst for a bad flat; they are TypeErrors naming the argument now.

Not testable at a small size (fixed by review): scope selection on a scope of 2^31+ blocks (int32 positions in
csrc/cpu/scope.cpp's Selector) and golden_topk_and_'s uint32 per-block histograms (blocks capped at 2^30).
"""
import pytest
import torch

from gradkit import _ext, ops
from gradkit.kernels.reference import parammap as pm_ref

pytestmark = pytest.mark.skipif(not _ext.LOADED, reason="compiled extension not built")
G = torch.ops.gradkit


# --------------------------------------------------------------------------- gather_segments(out=) over a source

def test_gather_out_overlapping_src_reads_the_old_values():
    x = torch.arange(10.0)
    idx = torch.arange(9, -1, -1)
    want = pm_ref.gather_segments([x.clone()], [idx])
    ops.gather_segments([x], [idx], out=x)
    assert torch.equal(x, want)  # was [9, 8, 7, 6, 5, 5, 6, 7, 8, 9]


def test_gather_out_overlapping_src_accumulate_and_strided():
    buf = torch.arange(12.0)
    out = buf[2:8]                  # out covers part of both sources
    a, b = buf[0:6].view(2, 3), buf[6:12:2]  # a strided source too
    ia, ib = torch.tensor([5, 0, 3]), None
    want = out.clone() + pm_ref.gather_segments([a.clone(), b.clone()], [ia, ib])
    ops.gather_segments([a, b], [ia, ib], out=out, accumulate=True)
    assert torch.equal(out, want)


# --------------------------------------------------------------------------- scatter_segments_ aliasing

def test_scatter_flat_overlapping_dst_reads_the_old_values():
    buf = torch.arange(6.0)
    ref = buf.clone()
    pm_ref.scatter_segments_(ref[0:4].clone(), [None], [ref[2:6]])
    ops.scatter_segments_(buf[0:4], [None], [buf[2:6]])
    assert torch.equal(buf, ref)  # [0, 1, 0, 1, 2, 3]; was [0, 1, 0, 1, 0, 1]


def test_scatter_refuses_a_destination_listed_twice():
    a = torch.zeros(6)
    with pytest.raises(ValueError, match=r"dst\[1\]: shares memory with dst\[0\]"):
        G.scatter_segments_(torch.ones(12), [None, None], [a, a], 1.0, True)
    assert torch.equal(a, torch.zeros(6))  # nothing written
    w = torch.zeros(4, 4)
    with pytest.raises(ValueError, match=r"dst\[1\]: shares memory with dst\[0\]"):
        ops.scatter_segments_(torch.ones(16), [None, None], [w[:, 0:2], w[:, 1:3]])  # overlapping column views
    assert torch.equal(w, torch.zeros(4, 4))


@pytest.mark.parametrize("make", [
    lambda: torch.zeros(1).expand(4),                              # stride 0
    lambda: torch.zeros(16).as_strided((3, 3), (1, 1)),           # overlapping strides, no stride 0
])
def test_scatter_refuses_a_self_overlapping_destination(make):
    d = make()
    n = d.numel()
    with pytest.raises(ValueError, match=r"dst\[0\]: more than one element"):
        G.scatter_segments_(torch.arange(float(n)), [None], [d], 1.0, True)
    assert torch.equal(d, torch.zeros_like(d))


def test_scatter_disjoint_views_of_one_buffer_are_accepted():
    w = torch.zeros(4, 6)
    # byte ranges that interleave (columns, strided slices, a row inside the columns' range), no element twice
    dst = [w[1:, 0], w[1:, 1], w[0], w[1:, 2::2], w[1:, 3::2]]
    flat = torch.arange(1.0, 1.0 + sum(d.numel() for d in dst))
    ref = w.clone()
    ref_dst = [ref[1:, 0], ref[1:, 1], ref[0], ref[1:, 2::2], ref[1:, 3::2]]
    pm_ref.scatter_segments_(flat, [None] * 5, ref_dst)
    ops.scatter_segments_(flat, [None] * 5, dst)
    assert torch.equal(w, ref)
    assert bool((w != 0).all())  # every element written exactly once


# --------------------------------------------------------------------------- masked_adamw_ aliasing

_KW = dict(masked_lr=1e-2, unmasked_lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)


def _state(n, shape=(5, 3), seed=0):
    gen = torch.Generator().manual_seed(seed)
    mk = lambda: torch.randn(*shape, generator=gen)  # noqa: E731
    return [mk() for _ in range(n)], [mk() for _ in range(n)], [mk() for _ in range(n)], \
        [mk().abs() for _ in range(n)]


def _step(p, g, m, v, **kw):
    n = len(p)
    G.masked_adamw_(p, g, m, v, [None] * n, *_KW.values(), [0.1] * n, [0.05] * n, False, kw.get("vmax"))


def test_adamw_refuses_a_parameter_listed_twice():
    p, g, m, v = _state(2)
    p[1] = p[0]
    before = [t.clone() for t in p + m + v]
    with pytest.raises(ValueError, match=r"params\[1\]: shares memory with params\[0\]"):
        _step(p, g, m, v)
    assert all(torch.equal(a, b) for a, b in zip(p + m + v, before))


@pytest.mark.parametrize("case", ["grad_is_exp_avg", "exp_avg_is_exp_avg_sq", "vmax_is_param"])
def test_adamw_refuses_state_sharing_memory(case):
    p, g, m, v = _state(2)
    vmax = None
    if case == "grad_is_exp_avg":
        g[1] = m[0]
        pat = r"exp_avgs\[0\]: shares memory with grads\[1\]"
    elif case == "exp_avg_is_exp_avg_sq":
        v[0] = m[0]
        pat = r"exp_avg_sqs\[0\]: shares memory with exp_avgs\[0\]"
    else:
        vmax = [torch.zeros(5, 3), p[1]]
        pat = r"max_exp_avg_sqs\[1\]: shares memory with params\[1\]"
    before = [t.clone() for t in p + m + v]
    with pytest.raises(ValueError, match=pat):
        _step(p, g, m, v, vmax=vmax)
    assert all(torch.equal(a, b) for a, b in zip(p + m + v, before))


def test_adamw_views_of_flat_buffers_match_separate_tensors():
    # parameters and states as disjoint views of one flat buffer each (FSDP / apex style), gradients sharing one
    # buffer too: accepted, and the same bits as separate tensors
    p, g, m, v = _state(3, shape=(4, 8), seed=1)
    flat = [torch.cat([t.reshape(-1) for t in ts]) for ts in (p, g, m, v)]
    views = [[f[32 * i:32 * (i + 1)].view(4, 8) for i in range(3)] for f in flat]
    _step(*views)
    _step(p, g, m, v)
    for sep, vw in zip((p, m, v), (views[0], views[2], views[3])):
        assert all(torch.equal(a, b) for a, b in zip(sep, vw))
    # the same gradient for two parameters is only read: fine
    p2, _, m2, v2 = _state(2, seed=2)
    gs = torch.randn(5, 3)
    _step(p2, [gs, gs], m2, v2)


# --------------------------------------------------------------------------- direct calls: dtypes named

@pytest.mark.parametrize("call,pat", [
    (lambda: G.gather_segments([torch.ones(3)], [None], torch.int32), r"^dtype: expected a floating dtype"),
    (lambda: G.gather_segments_out([torch.ones(3)], [None], torch.zeros(3, dtype=torch.int32), False),
     r"^out: expected a floating dtype"),
    (lambda: G.scatter_segments_(torch.ones(3, dtype=torch.int32), [None], [torch.zeros(3)], 1.0, False),
     r"^flat: expected a floating dtype"),
    (lambda: G.scatter_segments(torch.ones(3, dtype=torch.int64), [None], [3], 1.0),
     r"^flat: expected a floating dtype"),
])
def test_direct_calls_name_a_bad_dtype(call, pat):
    with pytest.raises(TypeError, match=pat):
        call()


def test_direct_gather_out_bad_dtype_leaves_out_untouched():
    out = torch.full((3,), 7, dtype=torch.int32)
    with pytest.raises(TypeError, match="out"):
        G.gather_segments_out([torch.ones(3)], [torch.tensor([0, 1, 2])], out, True)
    assert torch.equal(out, torch.full((3,), 7, dtype=torch.int32))
