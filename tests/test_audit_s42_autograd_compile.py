"""Audit (session 42) of the custom-op layer for autograd, fake tensors and torch.compile.

Defects found (fixed in python/gradkit/ops/*.py and kernels/reference/obs.py unless marked xfail):

* fake impls validated nothing: under FakeTensorMode (and so while torch.compile traces a direct
  ``torch.ops.gradkit`` call) every op returned an output for arguments the real op refuses (project_flat with a
  3-D x or kind 2, factored_project with g's rows != a's, score_topk with keys of another D, scope ops whose
  block_shape does not divide x, ...) or failed on something unrelated (a negative dimension, ZeroDivisionError
  for T / gs / E = 0, IndexError). They now run the op's checks (shapes, dtypes, scalars; no data).
* every in-place wrapper (scope_hard_threshold_, block_apply_mask_, block_soft_threshold_, scatter_segments_,
  golden_topk_and_, ...) broke the graph under torch.compile: the inference-tensor check called
  torch.is_inference_mode_enabled(), which Dynamo cannot trace (fullgraph=True: an error).
* under torch.compile(dynamic=True) a float argument (a default one included: obs_select's eps, scatter_segments'
  scale) is a SymFloat, and math.isfinite on it broke the graph.
* obs_shared_prune read pidx's entries on the host while being traced: a data-dependent guard (error under
  fullgraph=True, with either dynamic setting).
* obs_sweep_ / obs_schur_extend_ broke the graph in their overlap checks (torch._debug_has_internal_overlap and
  data_ptr, which Dynamo cannot trace): kernels.reference.scope.check_inplace reads the strides instead.
* xfail (not this audit's files): gradkit.projection.factored_project breaks the graph in derive_seed (hashlib.blake2b
  cannot be traced); gradkit.golden.topk_mask in _rules._count (fractions.Fraction).
"""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

import gradkit.projection as P
from gradkit import _ext, ops

from conftest import use_backend

pytestmark = [pytest.mark.skipif(not _ext.LOADED, reason="compiled extension not built"),
              pytest.mark.usefixtures("one_thread_module")]
G = torch.ops.gradkit if _ext.LOADED else None
U8 = torch.uint8


def _r(*shape, seed=0, dtype=torch.float32, rg=False):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return t.requires_grad_() if rg else t


# =========================================================================== fake impls: bad input


def _bad_cases():
    f = torch.float32
    x = lambda *s: torch.zeros(*s)  # noqa: E731
    return [
        # (label, op, args, exception, message prefix naming the argument)
        ("project_flat/3d", "project_flat", lambda: (x(2, 3, 4), 5, 1, 0, 0), ValueError, "x: "),
        ("project_flat/int", "project_flat", lambda: (torch.zeros(2, 3, dtype=torch.int32), 5, 1, 0, 0), TypeError,
         "x: "),
        ("project_flat/k0", "project_flat", lambda: (x(2, 3), 0, 1, 0, 0), ValueError, "k: "),
        ("project_flat/k-1", "project_flat", lambda: (x(2, 3), -1, 1, 0, 0), ValueError, "k: "),
        ("project_flat/kind", "project_flat", lambda: (x(2, 3), 4, 1, 2, 0), ValueError, "kind: "),
        ("project_flat/seed", "project_flat", lambda: (x(2, 3), 4, -1, 0, 0), ValueError, "seed: "),
        ("project_flat/col0", "project_flat", lambda: (x(2, 3), 4, 1, 0, -1), ValueError, "col0: "),
        ("projection_matrix_/1d", "projection_matrix_", lambda: (x(5), 1, 0, 4, 0, 0), ValueError, "out: "),
        ("projection_matrix_/row0", "projection_matrix_", lambda: (x(2, 2), 1, 0, 4, -1, 0), ValueError, "row0: "),
        ("factored/a3d", "factored_project", lambda: (x(2, 3, 1), x(2, 2), x(2, 4), x(3, 4), None, None, 1),
         ValueError, "a: "),
        ("factored/g_rows", "factored_project", lambda: (x(4, 3), x(2, 2), x(2, 4), x(3, 4), None, None, 1),
         ValueError, "g: "),
        ("factored/T", "factored_project", lambda: (x(4, 3), x(4, 2), x(2, 4), x(3, 4), None, None, 3), ValueError,
         "T: "),
        ("factored/T0", "factored_project", lambda: (x(4, 3), x(4, 2), x(2, 4), x(3, 4), None, None, 0), ValueError,
         "T: "),
        ("factored/lt", "factored_project", lambda: (x(4, 3), x(4, 2), x(3, 4), x(3, 4), None, None, 1), ValueError,
         "lt: "),
        ("factored/rt", "factored_project", lambda: (x(4, 3), x(4, 2), x(2, 4), x(3, 5), None, None, 1), ValueError,
         "rt: "),
        ("factored/rb", "factored_project", lambda: (x(4, 3), x(4, 2), x(2, 4), x(3, 4), x(3), None, 1), ValueError,
         "rb: "),
        ("factored/mask", "factored_project", lambda: (x(4, 3), x(4, 2), x(2, 4), x(3, 4), None, x(4), 1), TypeError,
         "mask: "),
        ("factored/a_f64", "factored_project",
         lambda: (x(4, 3).double(), x(4, 2).double(), x(2, 4), x(3, 4), None, None, 1), TypeError, "a: "),
        ("score_topk/D", "score_topk", lambda: (x(2, 3), x(5, 4), 2, True, None, None, None, 0), ValueError, "keys: "),
        ("score_topk/k", "score_topk", lambda: (x(2, 3), x(5, 3), -1, True, None, None, None, 0), ValueError, "k: "),
        ("score_topk/q64", "score_topk", lambda: (x(2, 3).double(), x(5, 3), 2, True, None, None, None, 0), TypeError,
         "queries: "),
        ("score_topk/scale", "score_topk", lambda: (x(2, 3), x(5, 3), 2, True, x(4), None, None, 0), ValueError,
         "key_scale: "),
        ("score_topk/half_in", "score_topk", lambda: (x(2, 3), x(5, 3), 2, True, None, x(2, 2), None, 0), ValueError,
         "scores_in, idx_in: "),
        ("score_topk/base", "score_topk", lambda: (x(2, 3), x(5, 3), 2, True, None, None, None, -1), ValueError,
         "base: "),
        ("obs_select/d", "obs_select", lambda: (x(2, 8), x(2, 7), 4, 2, 1, 0.0), ValueError, "d: "),
        ("obs_select/nb", "obs_select", lambda: (x(2, 9), x(2, 9), 4, 2, 1, 0.0), ValueError, "w: "),
        ("obs_select/num_prune", "obs_select", lambda: (x(2, 8), x(2, 8), 4, 2, 5, 0.0), ValueError, "num_prune: "),
        ("obs_select/gs0", "obs_select", lambda: (x(2, 8), x(2, 8), 0, 2, 0, 0.0), ValueError, "gs: "),
        ("obs_shared/E0", "obs_shared_prune",
         lambda: (x(2, 4), torch.eye(4), x(2, 1, 1, 1), torch.tensor([[0]]), 0, True), ValueError, "E: "),
        ("obs_sweep/stop", "obs_sweep_",
         lambda: (x(3, 4), x(3, 4), x(3, 3), torch.ones(3, 4, dtype=torch.bool), 0, 4), ValueError, "start, stop: "),
        ("obs_schur/cnt", "obs_schur_extend_", lambda: (x(2, 4, 5), x(2, 2, 3), x(2, 2, 1), x(2, 2, 2), 3),
         ValueError, "cnt: "),
        ("topk_select/k", "topk_select", lambda: (x(5), None, 7), ValueError, "k: "),
        ("topk_select/k-1", "topk_select", lambda: (x(5), None, -1), ValueError, "k: "),
        ("topk_select_segments/k", "topk_select_segments", lambda: ([x(3)], [None], 5), ValueError, "k: "),
        ("gather/index", "gather_segments", lambda: ([x(3)], [], None), ValueError, "index: "),
        ("gather/dtype", "gather_segments", lambda: ([x(3)], [None], torch.int32), TypeError, "dtype: "),
        ("scatter/numel", "scatter_segments", lambda: (x(3), [None], [4], 1.0), ValueError, "flat: "),
        ("scatter/2d", "scatter_segments", lambda: (x(3, 1), [None], [3], 1.0), ValueError, "flat: "),
        ("pack_bitmask/float", "pack_bitmask", lambda: (x(3),), TypeError, "mask: "),
        ("mask_to_indices/dtype", "mask_to_indices", lambda: (torch.ones(3, dtype=torch.bool), f), TypeError,
         "dtype: "),
        ("bitmask_to_indices/numel", "bitmask_to_indices", lambda: (torch.ones(2, dtype=U8), 20, torch.int64),
         ValueError, "bits: "),
        ("block_norms/block", "block_norms", lambda: (x(4, 6), [3, 3], 2.0), ValueError, r"(block_norms: )?block_sh"),
        ("block_norms/p", "block_norms", lambda: (x(4, 6), [2, 3], 0.0), ValueError, r"(block_norms: )?p: "),
        ("scope_kth/scope", "scope_kth", lambda: (x(4, 6), [2, 3], [2, 3], 1, 2.0, False, 1.0, False), ValueError,
         r"(scope_kth: )?scope_shape"),
        ("scope_kth/k", "scope_kth", lambda: (x(4, 6), [2, 3], [2, 2], 5, 2.0, False, 1.0, False), ValueError,
         r"(scope_kth: )?k: "),
        ("scope_mask/nnz", "scope_mask", lambda: (x(4, 6), [2, 3], [2, 2], 5, 2.0, False, False, False), ValueError,
         r"(scope_mask: )?nnz: "),
        ("scope_mask/raw", "scope_mask", lambda: (x(4, 6), [2, 3], [2, 2], 1, 2.0, True, False, False), ValueError,
         r"(scope_mask: )?raw: "),
        ("scope_hard_threshold_/values", "scope_hard_threshold_",
         lambda: (x(4, 6), x(4, 5), [2, 3], [2, 2], 1, 2.0, False), ValueError, r"(scope_hard_threshold_: )?values: "),
        ("golden/k", "golden_topk_and_", lambda: (x(10), torch.zeros(2, dtype=U8), None, 11, True), ValueError, "k: "),
        ("golden/bits", "golden_topk_and_", lambda: (x(10), torch.zeros(1, dtype=U8), None, 1, True), ValueError,
         "bits: "),
        ("bitmask_binary/op", "bitmask_binary", lambda: ([torch.zeros(2, dtype=U8)], [torch.zeros(2, dtype=U8)], 7),
         ValueError, "op: "),
        ("bitmask_binary/b", "bitmask_binary", lambda: ([torch.zeros(2, dtype=U8)], [torch.zeros(3, dtype=U8)], 0),
         ValueError, r"b\[0\]: "),
        ("bitmask_not/numel", "bitmask_not", lambda: ([torch.zeros(2, dtype=U8)], [30]), ValueError, r"a\[0\]: "),
        ("bitmask_count/float", "bitmask_count", lambda: ([x(2)],), TypeError, r"bits\[0\]: "),
    ]


_BAD = _bad_cases()


@pytest.mark.parametrize("label,name,make,exc,prefix", _BAD, ids=[c[0] for c in _BAD])
def test_fake_impl_refuses_what_the_op_refuses(label, name, make, exc, prefix):
    """Was: the fake impl returned an output (or raised RuntimeError / ZeroDivisionError / IndexError about
    something else) where the real op raises; now the same exception type, naming the argument."""
    op = getattr(G, name)
    with pytest.raises(exc, match="^" + prefix):
        op(*make())
    with FakeTensorMode(), pytest.raises(exc, match="^" + prefix):
        op(*make())


def test_fake_impl_is_not_stricter_than_the_op():
    """The fake impls check what the ops check, not the wrappers' stricter rules: topk_select takes any shape
    (flattened) with an active mask of the same numel; block_soft_threshold_ takes atol = inf."""
    cases = [(G.topk_select, lambda: (torch.arange(10.).reshape(5, 2), (torch.arange(10) % 3 > 0).reshape(2, 5), 4)),
             (G.block_soft_threshold_, lambda: (_r(4, 6), [2, 3], torch.ones(2, 2), None, 3, float("inf"), 0.0))]
    for op, make in cases:
        real = op(*make())
        with FakeTensorMode():
            fake = op(*make())
        if real is None:
            assert fake is None
        else:
            assert (fake.shape, fake.dtype) == (real.shape, real.dtype)


def test_compiled_direct_op_names_the_argument_at_trace_time():
    """A bad argument to a direct op call is reported while tracing (was: traced with a wrong output, refused only
    when the graph ran; a 3-D x was traced as (B, k))."""
    graphs = []

    def backend(gm, example_inputs):  # records each graph Dynamo hands over: none when tracing refuses
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    f = torch.compile(lambda x: G.project_flat(x, 4, 1, 0, 0) * 2, fullgraph=True, backend=backend)
    with pytest.raises(Exception, match="x: expected a 2-D tensor"):
        f(torch.zeros(2, 3, 4))
    assert graphs == []
    assert f(torch.ones(2, 3)).shape == (2, 4) and len(graphs) == 1


# =========================================================================== fake impls: metadata over shapes


def _norm(o):
    if isinstance(o, torch.Tensor):
        return (tuple(o.shape), o.dtype, o.device.type, tuple(s for s, n in zip(o.stride(), o.shape) if n > 1))
    return [_norm(t) for t in o] if isinstance(o, (list, tuple)) else o


def _fake_matches_real(op, args):
    real = op(*args)
    mode = FakeTensorMode()
    conv = lambda a: mode.from_tensor(a) if isinstance(a, torch.Tensor) else (  # noqa: E731
        [conv(t) for t in a] if isinstance(a, list) else a)
    fargs = [conv(a) for a in args]
    with mode:
        fake = op(*fargs)
    assert _norm(fake) == _norm(real)


def _layout(t, how):
    if how == 1:
        return t.t().contiguous().t()
    if how == 2:
        return torch.cat([t, t], 1)[:, ::2]
    if how == 3 and t.shape[0]:
        return t[:1].expand_as(t)
    return t


@settings(max_examples=20)
@given(B=st.integers(0, 4), D=st.integers(0, 9), k=st.integers(1, 6), how=st.integers(0, 3), kind=st.integers(0, 1),
       dt=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
def test_fake_project_flat_matches_real(B, D, k, how, kind, dt):
    _fake_matches_real(G.project_flat, (_layout(_r(B, D, dtype=dt), how), k, 3, kind, 2))


@settings(max_examples=20)
@given(B=st.integers(0, 3), T=st.integers(1, 3), I=st.integers(0, 4), O=st.integers(1, 4), p=st.integers(1, 3),
       rb=st.booleans(), mk=st.booleans(), how=st.integers(0, 3), dt=st.sampled_from([torch.float32, torch.bfloat16]))
def test_fake_factored_project_matches_real(B, T, I, O, p, rb, mk, how, dt):
    N = B * T
    args = (_layout(_r(N, I, dtype=dt), how), _r(N, O, seed=1, dtype=dt), _r(O, p, seed=2), _r(I, p, seed=3),
            _r(p, seed=4) if rb else None, (torch.arange(N) % 3 > 0) if mk else None, T)
    _fake_matches_real(G.factored_project, args)


@settings(max_examples=20)
@given(Q=st.integers(0, 3), N=st.integers(0, 5), D=st.integers(0, 3), k=st.integers(0, 6),
       kin=st.one_of(st.none(), st.integers(0, 3)), sc=st.booleans(), largest=st.booleans())
def test_fake_score_topk_matches_real(Q, N, D, k, kin, sc, largest):
    args = (_r(Q, D), _r(N, D, seed=1), k, largest, _r(N, seed=2).abs() if sc else None,
            None if kin is None else _r(Q, kin, seed=3),
            None if kin is None else torch.arange(Q * kin).reshape(Q, kin) % 7 - 1, 3)
    _fake_matches_real(G.score_topk, args)


@settings(max_examples=20)
@given(n=st.integers(0, 3), nq=st.integers(0, 2), gs=st.integers(1, 3), bk=st.integers(1, 2), data=st.data())
def test_fake_obs_select_matches_real(n, nq, gs, bk, data):
    w = _r(n, nq * gs * bk)
    _fake_matches_real(G.obs_select, (w, w.abs() + 0.5, gs, bk, data.draw(st.integers(0, gs)), 0.0))


@settings(max_examples=20)
@given(grid=st.lists(st.integers(1, 2), min_size=1, max_size=3), data=st.data(),
       dt=st.sampled_from([torch.float32, torch.float16, torch.float64]))
def test_fake_scope_ops_match_real(grid, data, dt):
    bs = [data.draw(st.integers(1, 3)) for _ in grid]
    ss = [data.draw(st.sampled_from([d for d in (1, 2) if g % d == 0])) for g in grid]
    x = _r(*[g * b for g, b in zip(grid, bs)], dtype=dt)
    if x.dim() >= 2 and data.draw(st.booleans()):
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    nb = math.prod(ss)
    _fake_matches_real(G.block_norms, (x, bs, 2.0))
    _fake_matches_real(G.scope_mask, (x, bs, ss, data.draw(st.integers(0, nb)), 1.0, False, data.draw(st.booleans()),
                                      data.draw(st.booleans())))
    _fake_matches_real(G.scope_kth, (x, bs, ss, data.draw(st.integers(1, nb)), 2.0, False, 1.0, False))


@settings(max_examples=20)
@given(sizes=st.lists(st.integers(0, 5), min_size=1, max_size=3), data=st.data())
def test_fake_gather_scatter_topk_match_real(sizes, data):
    src = [_r(s, seed=i, dtype=data.draw(st.sampled_from([torch.float32, torch.float16, torch.float64])))
           for i, s in enumerate(sizes)]
    idx = [data.draw(st.sampled_from([None, torch.arange(s)[::2].flip(0)])) for s in sizes]
    _fake_matches_real(G.gather_segments, (src, idx, data.draw(st.sampled_from([None, torch.float32]))))
    total = sum(s if i is None else i.numel() for s, i in zip(sizes, idx))
    _fake_matches_real(G.scatter_segments, (_r(total, dtype=torch.float16), idx, sizes, 2.0))
    same = [t.float() for t in src]  # one dtype for all scores
    _fake_matches_real(G.topk_select_segments, (same, [None] * len(src), data.draw(st.integers(0, sum(sizes)))))


# =========================================================================== autograd


def _f64(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).requires_grad_()


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("kind", [0, 1])
def test_project_flat_gradgradcheck_and_edges(backend, kind):
    """float64 x, a col0 offset, both kinds: second derivatives; zero-size batches and D = 0."""
    f = lambda t: ops.project_flat(t, 4, 7, kind, 5).double()  # noqa: E731
    with use_backend(backend):
        assert torch.autograd.gradgradcheck(lambda t: f(t) ** 2, (_f64(3, 9, seed=kind),), eps=1e-3, atol=1e-3,
                                            rtol=1e-3)
        for shape in ((0, 9), (2, 0)):
            x = _f64(*shape)
            f(x).sum().backward()
            assert x.grad.shape == shape and x.grad.dtype == torch.float64


def _factored(a, g, lt, rt, rb, mask=None, T=1):
    return ops.factored_project(a.float(), g.float(), lt.float(), rt.float(), None if rb is None else rb.float(),
                                mask, T).double()


@pytest.mark.parametrize("backend", ["native", "reference", "triton"])
def test_factored_project_gradgradcheck(backend):
    """Second derivatives (the bilinear backward is itself differentiable), with bias, mask and T = 3."""
    ins = [_f64(*s, seed=i) for i, s in enumerate(((6, 4), (6, 3), (3, 2), (4, 2), (2,)))]
    mask = torch.tensor([True, False, True, True, False, True])
    with use_backend(backend):
        assert torch.autograd.gradgradcheck(lambda *z: _factored(*z, mask, 3), ins, eps=1e-2, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_factored_project_one_side_and_zero_size_grads(backend):
    ins = [_f64(*s, seed=10 + i) for i, s in enumerate(((6, 4), (6, 3), (3, 2), (4, 2), (2,)))]
    det = [t.detach() for t in ins]
    mask = torch.tensor([True, True, False, True, False, True])
    kw = dict(eps=1e-2, atol=1e-3, rtol=1e-3)
    with use_backend(backend):
        assert torch.autograd.gradcheck(lambda a: _factored(a, *det[1:], mask, 2), (ins[0],), **kw)
        assert torch.autograd.gradcheck(lambda rb: _factored(*det[:4], rb, None, 3), (ins[4],), **kw)
        assert torch.autograd.gradcheck(lambda lt, rt: _factored(det[0], det[1], lt, rt, None, mask, 1),
                                        (ins[2], ins[3]), **kw)
        # zero tokens (B = 0) and zero input features: gradients of the right shapes (zeros where defined)
        for (N, I) in ((0, 4), (4, 0)):
            z = [_f64(*s, seed=20) for s in ((N, I), (N, 3), (3, 2), (I, 2), (2,))]
            _factored(*z, None, 2).sum().backward()
            for t in z:
                assert t.grad is not None and t.grad.shape == t.shape
            assert not z[2].grad.any() if N == 0 else True


def test_factored_project_half_precision_grads_are_the_float32_ones_rounded():
    a, g = _r(4, 5, dtype=torch.bfloat16, rg=True), _r(4, 3, seed=1, dtype=torch.bfloat16, rg=True)
    lt, rt = _r(3, 2, seed=2, rg=True), _r(5, 2, seed=3, rg=True)
    w = _r(2, 2, 2, seed=4)
    (ops.factored_project(a, g, lt, rt, None, None, 2) * w).sum().backward()
    af, gf = a.detach().float().requires_grad_(), g.detach().float().requires_grad_()
    lt2, rt2 = lt.detach().clone().requires_grad_(), rt.detach().clone().requires_grad_()
    (ops.factored_project(af, gf, lt2, rt2, None, None, 2) * w).sum().backward()
    assert a.grad.dtype == torch.bfloat16 and torch.equal(a.grad, af.grad.bfloat16())
    assert torch.equal(g.grad, gf.grad.bfloat16()) and torch.equal(lt.grad, lt2.grad) and torch.equal(rt.grad, rt2.grad)


def test_gather_scatter_gradgradcheck_with_mixed_index_and_scale():
    a, b = _f64(3, 4), _f64(5, seed=1)
    idx = [torch.tensor([0, 7, 3]), None]
    assert torch.autograd.gradgradcheck(lambda x, y: ops.gather_segments([x.t(), y], idx) ** 2, (a, b))
    assert torch.autograd.gradcheck(lambda x: ops.gather_segments([x, b.detach()], idx), (a,))
    flat = _f64(8, seed=2)
    assert torch.autograd.gradgradcheck(
        lambda t: torch.cat(ops.scatter_segments(t, idx, [12, 5], scale=-2.5)) ** 2, (flat,))
    assert torch.autograd.gradcheck(lambda t: ops.scatter_segments(t, idx, [12, 5])[1], (flat,))


# =========================================================================== torch.compile


def _same(want, got):
    ws = want if isinstance(want, (tuple, list)) else (want,)
    gs = got if isinstance(got, (tuple, list)) else (got,)
    assert len(ws) == len(gs)
    for w, g in zip(ws, gs):
        assert w.dtype == g.dtype and w.shape == g.shape and torch.equal(w, g)


def _clone(args):
    return [a.clone() if isinstance(a, torch.Tensor) else a for a in args]


def _compiled_equals_eager(fn, args, combos=(("eager", False), ("eager", True), ("aot_eager", False),
                                            ("aot_eager", True)), mutated=False):
    """fullgraph=True (no graph break), bit-for-bit the eager result (and, for in-place ops, the eager writes)."""
    a0 = _clone(args)
    want = fn(*a0)
    for backend, dynamic in combos:
        torch._dynamo.reset()
        a1 = _clone(args)
        got = torch.compile(fn, fullgraph=True, backend=backend, dynamic=dynamic)(*a1)
        if want is not None:
            _same(want, got)
        if mutated:
            _same([t for t in a0 if isinstance(t, torch.Tensor)], [t for t in a1 if isinstance(t, torch.Tensor)])


def test_compile_project_and_search():
    x = _r(3, 20)
    _compiled_equals_eager(lambda t: P.project(t, 4, seed=3, kind="gaussian"), [x])
    _compiled_equals_eager(lambda t: ops.project_flat(t, t.shape[1] // 4, 3, 0, 2), [x])  # a size-derived k
    q, k = _r(4, 6), _r(9, 6, seed=1)
    _compiled_equals_eager(lambda q, k, s: ops.score_topk(q, k, 3, largest=False, key_scale=s, base=5),
                           [q, k, _r(9, seed=2).abs()])


def test_compile_factored_project_op_forward_and_backward():
    ins = [_r(*s, seed=i) for i, s in enumerate(((6, 4), (6, 3), (3, 2), (4, 2), (2,)))]
    mask = torch.tensor([True, False, True, True, False, True])
    _compiled_equals_eager(lambda *z: ops.factored_project(*z, mask, 3), ins, combos=(("aot_eager", False),))
    w = _r(2, 2, 2, seed=9)
    for dynamic in (False, True):
        torch._dynamo.reset()
        f = torch.compile(lambda *z: (ops.factored_project(*z, mask, 3) * w).sum(), fullgraph=True,
                          backend="aot_eager", dynamic=dynamic)
        a = [t.clone().requires_grad_() for t in ins]
        b = [t.clone().requires_grad_() for t in ins]
        f(*a).backward()
        (ops.factored_project(*b, mask, 3) * w).sum().backward()
        _same([t.grad for t in b], [t.grad for t in a])


@pytest.mark.xfail(strict=True, reason="gradkit.projection.factored_project breaks the graph in derive_seed: "
                   "hashlib.blake2b cannot be traced by Dynamo (projection.py: e.g. wrap derive_seed in "
                   "torch._dynamo.assume_constant_result; the rest of the function traces)")
def test_compile_public_factored_project():
    a, g = _r(2, 3, 5), _r(2, 3, 4, seed=1)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    _compiled_equals_eager(lambda x, y, m: P.factored_project(x, y, 3, seed=1, mask=m, bias=True), [a, g, mask],
                           combos=(("eager", False),))


@pytest.mark.xfail(strict=True, reason="gradkit.golden.topk_mask breaks the graph: percent_to_k -> "
                   "gradkit._rules._count computes with fractions.Fraction, which Dynamo cannot trace (golden.py / "
                   "_rules.py: e.g. torch._dynamo.assume_constant_result on the count; golden_topk_and_ itself traces)")
def test_compile_golden_topk_mask():
    import gradkit.golden as golden

    _compiled_equals_eager(lambda t: golden.topk_mask(t, 10), [_r(8, 16)], combos=(("eager", False),))


def test_compile_selection_and_pruning_ops():
    """Each was a graph break before: obs_select (default eps a SymFloat under dynamic=True), obs_shared_prune
    (pidx read on the host), the in-place wrappers (torch.is_inference_mode_enabled), scatter_segments (scale)."""
    s = _r(30)
    _compiled_equals_eager(lambda s: ops.topk_select(s, 4), [s])
    _compiled_equals_eager(lambda s: ops.topk_select_segments([s[:10], s[10:]], s.shape[0] // 3), [s],
                           combos=(("aot_eager", True),))
    w = _r(3, 16, seed=1)
    _compiled_equals_eager(lambda w, d: ops.obs_select(w, d, 4, 2, 1), [w, w.abs() + 0.5])
    pidx = torch.tensor([[0], [2], [3]])
    _compiled_equals_eager(lambda w, c, ci: ops.obs_shared_prune(w, c, ci, pidx, 4),
                           [w[:, :8], torch.eye(8) + 0.1, _r(2, 3, 1, 1, seed=2).abs() + 1],
                           combos=(("eager", False), ("aot_eager", True)))
    X = _r(8, 12, seed=3)
    _compiled_equals_eager(lambda X: ops.scope_mask(X, [2, 3], [2, 2], 2), [X])
    _compiled_equals_eager(lambda X: ops.scope_hard_threshold_(X, [2, 3], [2, 2], 2), [X], mutated=True)
    _compiled_equals_eager(lambda X, t: ops.block_soft_threshold_(X, [2, 3], t), [X, _r(4, 4, seed=4).abs()],
                           combos=(("eager", True), ("aot_eager", False)), mutated=True)
    _compiled_equals_eager(lambda g, b: ops.golden_topk_and_(g, b, 5, first=True),
                           [_r(20, seed=5), torch.zeros(3, dtype=U8)], combos=(("eager", False), ("aot_eager", True)),
                           mutated=True)
    _compiled_equals_eager(lambda f: ops.scatter_segments(f, [None, torch.tensor([0, 3])], [3, 5]), [_r(5, seed=6)],
                           combos=(("eager", True), ("aot_eager", True)))
    _compiled_equals_eager(lambda f, d: ops.scatter_segments_(f, [torch.tensor([0, 3])], [d], scale=0.5),
                           [_r(2, seed=7), torch.zeros(5)], combos=(("aot_eager", True),), mutated=True)


def test_compile_obs_inplace_ops_and_optimizer_step():
    """obs_sweep_ / obs_schur_extend_ broke the graph in their overlap checks (torch._debug_has_internal_overlap,
    data_ptr); masked_adamw_ and gather_segments(out=) in the inference-tensor check."""
    n, m = 4, 3
    u = torch.linalg.cholesky(torch.eye(n) * 2 + 0.1).T.contiguous()
    _compiled_equals_eager(lambda w, e, u, p: ops.obs_sweep_(w, e, u, p, 0, 4),
                           [_r(n, m), torch.zeros(n, m), u, torch.arange(n * m).reshape(n, m) % 3 == 0],
                           combos=(("eager", False), ("aot_eager", True)), mutated=True)
    _compiled_equals_eager(lambda ut, xf, up, li: ops.obs_schur_extend_(ut, xf, up, li, 1),
                           [_r(2, 4, 5), _r(2, 2, 3, seed=1), _r(2, 2, 1, seed=2), _r(2, 2, 2, seed=3)],
                           combos=(("eager", True), ("aot_eager", False)), mutated=True)
    _compiled_equals_eager(lambda a, o: ops.gather_segments([a], [None], out=o, accumulate=True), [_r(5), _r(5, seed=1)],
                           combos=(("aot_eager", True),), mutated=True)
    bits = ops.pack_bitmask(torch.arange(15).reshape(5, 3) % 2 == 0)

    def step(p, g, m1, m2):
        ops.masked_adamw_([p], [g], [m1], [m2], [bits], masked_lr=1e-2, unmasked_lr=1e-3, beta1=0.9, beta2=0.999,
                          eps=1e-8, weight_decay=0.1, bias_correction1=[0.1], bias_correction2_sqrt=[0.03])

    _compiled_equals_eager(step, [_r(5, 3), _r(5, 3, seed=1), torch.zeros(5, 3), torch.zeros(5, 3)],
                           combos=(("eager", False), ("aot_eager", True)), mutated=True)


def test_compiled_schur_extend_still_refuses_an_expanded_ut():
    ut = torch.zeros(1, 4, 5).expand(2, 4, 5)
    args = (_r(2, 2, 3, seed=1), _r(2, 2, 1, seed=2), _r(2, 2, 2, seed=3))
    with pytest.raises(RuntimeError, match="^ut: unsupported operation: more than one element"):
        ops.obs_schur_extend_(ut, *args, 1)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="ut: unsupported operation: more than one element"):
        torch.compile(lambda t: ops.obs_schur_extend_(t, *args, 1), fullgraph=True, backend="aot_eager")(ut)
    assert not ut.any()


def test_check_inplace_matches_torchs_internal_overlap_rule():
    """kernels.reference.scope.check_inplace now reads the strides (traceable) instead of calling
    torch._debug_has_internal_overlap: the same verdict on every small layout, empty ones included."""
    import itertools

    from gradkit.kernels.reference.scope import check_inplace

    base = torch.empty(64)
    for shape in itertools.product([0, 1, 2, 3], repeat=2):
        for strides in itertools.product([0, 1, 3], repeat=2):
            t = base.as_strided(shape, strides)
            want = torch._debug_has_internal_overlap(t) == 1
            try:
                check_inplace(t)
                got = False
            except RuntimeError:
                got = True
            assert got == want, (shape, strides)


def test_compiled_inplace_op_still_refuses_an_inference_tensor():
    """The inference-tensor check is skipped while tracing (Dynamo cannot trace it, nor do its fake inputs keep the
    flag). The compiled call is still refused: backend="eager" by the op's own ADInplaceOrView kernel, before any
    write; aot_eager when the functionalised graph copies the result back into the input, which (torch's rule for
    inference tensors, its own in-place ops included, eager or compiled) raises after writing, as torch's mul_
    does there."""
    m = torch.rand(4, 4, generator=torch.Generator().manual_seed(0)) > 0.5
    for backend in ("eager", "aot_eager"):
        written = []
        for fn in (lambda x: ops.block_apply_mask_(x, [2, 3], m), lambda x: x.mul_(0)):
            with torch.inference_mode():
                y = _r(8, 12)
            keep = y.clone()
            torch._dynamo.reset()
            with pytest.raises(RuntimeError, match="[Ii]nference"):
                torch.compile(fn, fullgraph=True, backend=backend)(y)
            written.append(not torch.equal(y, keep))
        if backend == "eager":
            assert written[0] is False  # (torch's mul_ writes first here too)
        assert written[0] <= written[1]  # never worse than torch's own in-place op


# =========================================================================== opcheck on new inputs


def _opcheck_cases():
    b = torch.tensor
    return [
        ("project_flat/expanded_rg", G.project_flat, (_r(1, 9, rg=True).expand(4, 9), 5, 3, 1, 2)),
        ("project_flat/colslice_f64_rg", G.project_flat,
         (_r(4, 20, dtype=torch.float64, rg=True)[:, ::3], 5, 3, 1, 0)),
        ("project_flat/zero_rg", G.project_flat, (_r(0, 9, rg=True), 5, 3, 1, 2)),
        ("factored/expanded_a", G.factored_project, (_r(1, 4).expand(6, 4), _r(6, 3), _r(3, 2), _r(4, 2), None, None,
                                                     2)),
        ("factored/strided_rg", G.factored_project,
         (_r(6, 8, rg=True)[:, :4], _r(12, 3)[::2].requires_grad_(), _r(2, 3).t().requires_grad_(), _r(4, 2, rg=True),
          _r(4)[::2].requires_grad_(), (torch.arange(12) % 3 != 0)[::2], 3)),
        ("factored/bf16_rg_mask", G.factored_project,
         (_r(6, 4, dtype=torch.bfloat16, rg=True), _r(6, 3, dtype=torch.bfloat16, rg=True), _r(3, 2, rg=True),
          _r(4, 2, rg=True), _r(2, rg=True), b([1, 0, 1, 1, 0, 1], dtype=torch.bool), 6)),
        ("factored/expanded_lt_rb", G.factored_project,
         (_r(6, 4), _r(6, 3), _r(3, 1).expand(3, 2), _r(4, 2), _r(1).expand(2), None, 1)),
        ("factored/zero_rg", G.factored_project,
         (_r(0, 4, rg=True), _r(0, 3, rg=True), _r(3, 2, rg=True), _r(4, 2, rg=True), _r(2, rg=True),
          torch.zeros(0, dtype=torch.bool), 3)),
        ("score_topk/expanded", G.score_topk, (_r(3, 4), _r(1, 4).expand(6, 4), 4, True, _r(1).abs().expand(6), None,
                                               None, 0)),
        ("score_topk/strided_in", G.score_topk,
         (_r(3, 8)[:, ::2], _r(6, 4, dtype=torch.bfloat16), 4, False, None, _r(5, 3).t(),
          torch.arange(15).reshape(5, 3).t(), 100)),
        ("score_topk/k_past_n", G.score_topk, (_r(3, 4), _r(2, 4), 5, True, None, _r(3, 1), b([[7], [-1], [3]]), 10)),
        ("obs_select/expanded", G.obs_select, (_r(1, 8).expand(3, 8), _r(1, 8).abs().expand(3, 8), 2, 2, 1, 1e-3)),
        ("obs_shared/expanded", G.obs_shared_prune,
         (_r(1, 8).expand(3, 8), (torch.eye(8) + 0.1).t(), (_r(1, 1, 1, 1).abs() + 1).expand(2, 3, 1, 1),
          b([[0], [2], [3]]), 4, True)),
        ("scope_kth/expanded_mid", G.scope_kth, (_r(4, 1).expand(4, 6), [1, 1], [2, 3], 2, 2.0, True, 0.5, True)),
        ("scope_mask/expanded_ties", G.scope_mask, (_r(4, 1).expand(4, 6), [2, 1], [1, 3], 2, 1.0, False, True, True)),
        ("scope_hard_threshold_/expanded_values", G.scope_hard_threshold_,
         (_r(4, 6), _r(1, 6).expand(4, 6), [2, 3], [2, 1], 1, 2.0, True)),
        ("gather/expanded_rg", G.gather_segments,
         ([_r(1, 3, rg=True).expand(4, 3), _r(6, dtype=torch.float64, rg=True)],
          [b([0, 5, 11]), b([5, 0], dtype=torch.int32)], torch.float64)),
        ("scatter/strided_rg", G.scatter_segments, (_r(10, rg=True)[::2], [b([3, 0, 1, 9, 2])[::2], None], [4, 2],
                                                    2.0)),
        ("topk_select/expanded", G.topk_select, (_r(1).expand(6), None, 3)),
        ("topk_select_segments/expanded", G.topk_select_segments,
         ([_r(1, 3).expand(2, 3), _r(4)], [None, torch.arange(4) % 2 == 0], 3)),
        ("golden/counts", G.golden_topk_and_, (_r(3, 5), torch.zeros(2, dtype=U8), torch.zeros(15, dtype=torch.int32),
                                               4, True)),
    ] if _ext.LOADED else []


_OPCHECK = _opcheck_cases()


@pytest.mark.parametrize("label,op,args", _OPCHECK, ids=[c[0] for c in _OPCHECK])
def test_opcheck_new_inputs(label, op, args):
    """Every opcheck utility (schema, autograd registration, fake tensor, aot dispatch static and dynamic) on
    expanded stride-0, strided, zero-size and requires-grad arguments and the optional ones."""
    torch.library.opcheck(op, args)
