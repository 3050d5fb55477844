"""Audit (session 43): a dtype x memory-layout matrix over the attribution side -- gradkit.projection.project,
factored_project (per_token, mask, bias, Adafactor / Adam normalisers), GradientCollector on small models, and
the ops under them (gradkit.ops.project_flat / factored_project / score_topk).

Inputs are driven across float16 / bfloat16 / float32 / float64 (int, bool, complex refused by name),
non-contiguous views (transposes, stepped slices, storage offsets, expand()ed stride-0 tensors, permuted and
channels_last 4-D tensors), zero-size and size-1 dimensions, inputs that require grad and inference tensors, and
compared against explicit float64 computations with the documented generator (projection_matrix /
derive_seed), with bounds relative to the sum of the absolute terms (float32 summation error).

Defects found (fixed here):

* ``project(x, k, out=o)`` with ``o`` an inference tensor outside inference mode, or a view of a leaf tensor that
  requires grad while grad mode is on, projected everything (a stream consumed to its end) and then raised
  torch's RuntimeError from ``out.copy_``; now a ValueError naming ``out`` before any work (projection.py).
* GradientCollector on an empty batch (B = 0, e.g. a (0, T, I) input) raised torch's "cannot reshape tensor of
  0 elements" RuntimeError in the backward pass (``_collector.py`` ``_project``: ``reshape(b, -1, i)``); it now
  collects (0, p*p) rows ((0, T, p*p) per token), as factored_project gives. A (0, T) mask with a 2-D module
  input of other rows raised ZeroDivisionError; now the ValueError naming the module that other row counts get.

Fixed after the audit (session 43): project's float32 GEMM path gave layout-dependent bits (csrc/cpu/projection.cpp
now reads x in place only where its rows are aligned as its copies are); score_topk's result required grad on CPU
but its backward silently gave no gradient (ops/search.py now registers its autograd formula).
"""
import itertools
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from gradkit import _ext, ops
from gradkit import projection as P
from gradkit.kernels.reference import search as ref_search
from gradkit.projection import GradientCollector

from conftest import env_set
from _factored_ref import factored_ref  # noqa: E402  (tests/_factored_ref.py)

pytestmark = [pytest.mark.skipif(not _ext.LOADED, reason="compiled extension not built"),
              pytest.mark.usefixtures("one_thread_module")]

FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
REFUSED = [torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64]
F32_EPS = 2.0 ** -23


# =========================================================================== helpers


def _view3(t, how):
    """A view of 3-D ``t`` (B, T, F) in layout ``how`` holding the same values (``expand``: t's first token
    repeated, so compare against the view's own .contiguous())."""
    B, T, F = t.shape
    dt = t.dtype
    if how == "contig":
        return t
    if how == "transposed":
        return torch.empty(B, F, T, dtype=dt).transpose(1, 2).copy_(t)
    if how == "step":
        return torch.empty(B, T, 2 * F, dtype=dt)[..., ::2].copy_(t)
    if how == "offset":
        return torch.empty(B + 1, T + 1, F + 3, dtype=dt)[1:, 1:, 3:].copy_(t)
    if how == "perm":  # sequence-first memory
        return torch.empty(T, B, F, dtype=dt).transpose(0, 1).copy_(t)
    if how == "channels_last":  # a (B, T, 1, F) tensor in channels_last memory (strides (T F, 1, ., T)), as (B, T, F)
        return torch.empty(B, T, 1, F, dtype=dt).contiguous(memory_format=torch.channels_last)[:, :, 0].copy_(t)
    if how == "expand":
        return t[:, :1].expand(B, T, F) if T else t
    raise AssertionError(how)


LAYOUTS3 = ["contig", "transposed", "step", "offset", "perm", "channels_last", "expand"]


def _view2(x, how):
    B, D = x.shape
    dt = x.dtype
    return {
        "contig": lambda: x,
        "transposed": lambda: torch.empty(D, B, dtype=dt).T.copy_(x),
        "step": lambda: torch.empty(B, 3 * D, dtype=dt)[:, ::3].copy_(x),
        "rowstep": lambda: torch.empty(2 * B, D, dtype=dt)[::2].copy_(x),
        "offset": lambda: torch.empty(B + 1, D + 5, dtype=dt)[1:, 5:].copy_(x),
        "expand_rows": lambda: x[:1].expand(B, D) if B else x,
        "expand_cols": lambda: x[:, :1].expand(B, D) if D else x,
    }[how]()


LAYOUTS2 = ["contig", "transposed", "step", "rowstep", "offset", "expand_rows", "expand_cols"]


def _proj_ref(x, k, seed, kind):
    """(float64 x @ R^T, float64 |x| @ |R|^T): the value and its float32 summation-error scale."""
    R = P.projection_matrix(k, x.shape[1], seed=seed, kind=kind, dtype=torch.float64)
    xd = x.double()
    return xd @ R.T, xd.abs() @ R.abs().T


def _factored_ref(*args, **kw):
    """(value, scale) in float64: see tests/_factored_ref.py."""
    return factored_ref(*args, with_scale=True, **kw)


def _assert_within(got, want, scale, rel=3e-5):
    """float32 result within ``rel`` of the absolute-term sum of every entry (float32 summation error)."""
    assert got.dtype == torch.float32 and got.device == want.device
    assert tuple(got.shape) == tuple(want.shape), (got.shape, want.shape)
    if want.numel():
        err = (got.double() - want).abs()
        bound = rel * scale + 1e-37
        assert bool((err <= bound).all()), float((err - bound).max())


def _norm(kind, O, I, gen, dt=torch.float32):
    if kind == "none":
        return None
    if kind == "adafactor":
        return P.AdafactorNormalizer((torch.rand(O, generator=gen) + .2).to(dt), (torch.rand(I, generator=gen) + .2).to(dt))
    if kind == "adafactor_bias":
        return P.AdafactorNormalizer((torch.rand(O, generator=gen) + .2).to(dt), (torch.rand(I, generator=gen) + .2).to(dt),
                                     (torch.rand(O, generator=gen) + .2).to(dt))
    if kind == "adam":
        return P.AdamNormalizer((torch.rand(O, I, generator=gen) + .2).to(dt))
    if kind == "adam_bias":
        return P.AdamNormalizer((torch.rand(O, I, generator=gen) + .2).to(dt), (torch.rand(O, generator=gen) + .2).to(dt))
    raise AssertionError(kind)


NORMS = ["none", "adafactor", "adafactor_bias", "adam", "adam_bias"]


# =========================================================================== refused dtypes, by name


def _refusal_cases():
    x = torch.randn(3, 8)
    a, g = torch.randn(2, 3, 5), torch.randn(2, 3, 4)
    a2, g2 = a.reshape(6, 5), g.reshape(6, 4)
    lt, rt = torch.randn(4, 2), torch.randn(5, 2)
    q, keys = torch.randn(2, 6), torch.randn(9, 6)
    T = lambda shape, dt: torch.ones(*shape, dtype=dt)  # noqa: E731
    return {
        "project": (lambda d: P.project(T((3, 8), d), 4), TypeError, "x: "),
        "project/chunk": (lambda d: P.project(T((3, 8), d), 4, chunk=3), TypeError, "x: "),
        "project/stream": (lambda d: P.project([x[:, :4], T((3, 4), d)], 4), TypeError, "x chunk: "),
        "project_flat": (lambda d: ops.project_flat(T((3, 8), d), 4, 0, 0, 0), TypeError, "x: "),
        "projection_matrix": (lambda d: P.projection_matrix(3, 4, dtype=d), TypeError, "dtype: "),
        "factored/a": (lambda d: P.factored_project(T((2, 3, 5), d), g, 2), TypeError, "a: "),
        "factored/g": (lambda d: P.factored_project(a, T((2, 3, 4), d), 2), TypeError, "g: "),
        "factored/mask": (lambda d: P.factored_project(a, g, 2, mask=T((2, 3), torch.float32 if d == torch.bool else d)),
                          ValueError, "mask: "),
        "adafactor/row": (lambda d: P.AdafactorNormalizer(T((4,), d), torch.ones(5)), ValueError, "row: "),
        "adafactor/col": (lambda d: P.AdafactorNormalizer(torch.ones(4), T((5,), d)), ValueError, "col: "),
        "adafactor/bias": (lambda d: P.AdafactorNormalizer(torch.ones(4), torch.ones(5), T((4,), d)), ValueError,
                           "bias_avg_sq: "),
        "adam/v": (lambda d: P.AdamNormalizer(T((4, 5), d)), ValueError, "v: "),
        "adam/bias": (lambda d: P.AdamNormalizer(torch.ones(4, 5), T((4,), d)), ValueError, "bias_avg_sq: "),
        "collector/dtype": (lambda d: GradientCollector(nn.Sequential(nn.Linear(3, 2)), dtype=d), TypeError, "dtype: "),
        "ops.factored/a": (lambda d: ops.factored_project(T((6, 5), d), g2, lt, rt), TypeError, "a: "),
        "ops.factored/lt": (lambda d: ops.factored_project(a2, g2, T((4, 2), d), rt), TypeError, "lt: "),
        "ops.factored/rt": (lambda d: ops.factored_project(a2, g2, lt, T((5, 2), d)), TypeError, "rt: "),
        "ops.factored/rb": (lambda d: ops.factored_project(a2, g2, lt, rt, T((2,), d)), TypeError, "rb: "),
        "ops.factored/mask": (lambda d: ops.factored_project(a2, g2, lt, rt, None, T((6,), d))
                              if d != torch.bool else ops.factored_project(a2, g2, lt, rt, None, T((6,), d).float()),
                              TypeError, "mask: "),
        "score/queries": (lambda d: ops.score_topk(q.to(d), keys, 3), TypeError, "queries: "),
        "score/keys": (lambda d: ops.score_topk(q, keys.to(d), 3), TypeError, "keys: "),
        "score/key_scale": (lambda d: ops.score_topk(q, keys, 3, key_scale=T((9,), d)), TypeError, "key_scale: "),
        "score/scores_in": (lambda d: ops.score_topk(q, keys, 3, scores_in=T((2, 3), d),
                                                     idx_in=torch.zeros(2, 3, dtype=torch.int64)), TypeError,
                            "scores_in: "),
        "score/idx_in": (lambda d: ops.score_topk(q, keys, 3, scores_in=torch.zeros(2, 3), idx_in=T((2, 3), d))
                         if d != torch.int64 else ops.score_topk(q, keys, 3, scores_in=torch.zeros(2, 3),
                                                                 idx_in=T((2, 3), torch.int32)),
                         TypeError, "idx_in: "),
    }


@pytest.mark.parametrize("case", sorted(_refusal_cases()))
def test_refused_dtypes_name_the_argument(case):
    """int / bool / complex (and uint8) inputs to every entry point: TypeError or ValueError whose message starts
    with the argument's name. Also numpy arrays of such dtypes for project, and float64 / float16 where the op
    documents float32 only (score_topk's queries, key_scale, scores_in)."""
    fn, exc, prefix = _refusal_cases()[case]
    for dt in REFUSED:
        with pytest.raises(exc, match="^" + prefix.replace(".", r"\.")):
            fn(dt)
    if case == "project":
        for ndt in (np.int32, np.bool_, np.complex64, np.int8):
            with pytest.raises(TypeError, match=r"^x: "):
                P.project(np.ones((3, 8), ndt), 4)
    if case.startswith("score/") and case not in ("score/keys", "score/idx_in"):
        for dt in (torch.float64, torch.float16, torch.bfloat16):
            with pytest.raises(TypeError, match="^" + case.split("/")[1]):
                fn(dt)


# =========================================================================== project


@settings(max_examples=25)
@given(B=st.integers(0, 6), D=st.integers(0, 140), k=st.sampled_from([1, 5, 32, 40]),
       dt=st.sampled_from(FLOATS), how=st.sampled_from(LAYOUTS2), kind=st.sampled_from(["rademacher", "gaussian"]),
       chunk=st.sampled_from([None, 1, 37]), seed=st.integers(0, 2 ** 63 - 1))
def test_project_dtype_layout_matrix_against_float64(B, D, k, dt, how, kind, chunk, seed):
    """Every dtype x layout (incl. B / D of 0 and 1): a (B, k) float32 on x's device, within float32 summation
    error of the float64 product with the documented matrix (bounded per entry by |x| @ |R|^T), x unchanged."""
    gen = torch.Generator().manual_seed(B * 1000 + D)
    x = _view2(torch.randn(B, D, generator=gen).to(dt), how)
    before = x.clone()
    got = P.project(x, k, seed=seed, kind=kind, chunk=chunk)
    want, scale = _proj_ref(x, k, seed, kind)
    assert got.device == x.device and not got.requires_grad
    _assert_within(got, want, scale)
    assert torch.equal(x, before)


@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16, torch.float64])
def test_project_half_and_double_bits_do_not_depend_on_layout(dt):
    """float16 / bfloat16 / float64 x: every layout (transposed, stepped, offset, expand()ed) gives the bits of its
    .contiguous() copy, on both CPU paths (GEMM: k < 32; sign table: B >= 4, k >= 32) and chunked."""
    gen = torch.Generator().manual_seed(5)
    x0 = torch.randn(9, 301, generator=gen).to(dt)
    for how, k, kind, chunk in itertools.product(LAYOUTS2, (5, 48), ("rademacher", "gaussian"), (None, 64)):
        x = _view2(x0, how)
        got = P.project(x, k, seed=3, kind=kind, chunk=chunk)
        assert torch.equal(got, P.project(x.contiguous(), k, seed=3, kind=kind, chunk=chunk)), (how, k, kind, chunk)


def test_project_float32_gemm_path_bits_do_not_depend_on_layout():
    gen = torch.Generator().manual_seed(6)
    base = torch.randn(300, 340, generator=gen)
    # session 43: the GEMM path reads float32 x in place only where its rows are aligned as its own copies' are
    # (MKL rounds rows of other alignments differently); every other layout is copied, so the bits are the same
    for B, D, k in ((2, 293, 5), (8, 64, 1), (70, 293, 5), (3, 293, 31), (300, 256, 7), (1, 300, 3)):
        for x in (base[:B, :D], base[:B, 1:D + 1], base[:B, 4:D + 4], base[:B, 16:D + 16], base[:2 * B:2, :D]):
            want = P.project(x.contiguous(), k, seed=1)
            assert torch.equal(P.project(x, k, seed=1), want), (B, D, k, x.stride(), x.storage_offset())
            assert torch.equal(P.project(x, k, seed=1, kind="gaussian"),
                               P.project(x.contiguous(), k, seed=1, kind="gaussian")), (B, D, k)


def test_project_float32_layouts_within_summation_error():
    """The float32 layouts (the GEMM path's bits differ, see above): within float32 summation error."""
    gen = torch.Generator().manual_seed(7)
    x0 = torch.randn(70, 300, generator=gen)
    for how, k, B in itertools.product(LAYOUTS2 + ["slice"], (1, 5, 48), (2, 70)):
        x = x0[:B, :293] if how == "slice" else _view2(x0[:B], how)
        want, scale = _proj_ref(x, k, 1, "rademacher")
        _assert_within(P.project(x, k, seed=1), want, scale)


def test_half_precision_sums_do_not_overflow():
    """float16 x at 60000 (and bfloat16 at 1e38 / D) whose projected sums are far past float16's range (bfloat16:
    within float32's): float32 accumulation, finite, within float32 error, on the GEMM and sign-table paths and
    chunked."""
    x = torch.full((6, 5000), 60000.0, dtype=torch.float16)
    x[:, ::3] = -30000.0
    xb = torch.full((6, 4096), 1e34, dtype=torch.bfloat16)
    for xx, k, chunk in itertools.product((x, xb), (1, 5, 32, 64), (None, 777)):
        got = P.project(xx, k, chunk=chunk)
        want, scale = _proj_ref(xx, k, 0, "rademacher")
        assert torch.isfinite(got).all()
        _assert_within(got, want, scale)


def test_project_requires_grad_non_contiguous_leaves():
    """x a non-contiguous view of a leaf that requires grad (every float dtype, chunked or not): the gradient
    reaches the leaf in its dtype and shape and equals w @ R (float64 reference)."""
    gen = torch.Generator().manual_seed(8)
    for dt, how, chunk in itertools.product(FLOATS, ("transposed", "step", "offset"), (None, 13)):
        view = {"transposed": lambda t: t.T, "step": lambda t: t[:, ::3], "offset": lambda t: t[1:, 5:42]}[how]
        leaf = torch.randn(*((37, 4) if how == "transposed" else (4, 3 * 37)), generator=gen).to(dt).requires_grad_()
        x = view(leaf)
        assert not x.is_contiguous() and x.shape[1] == 37
        w = torch.randn(x.shape[0], 6, generator=gen)
        (P.project(x, 6, seed=2, kind="gaussian", chunk=chunk) * w).sum().backward()
        assert leaf.grad.dtype == dt and leaf.grad.shape == leaf.shape
        R = P.projection_matrix(6, 37, seed=2, kind="gaussian", dtype=torch.float64)
        ref = torch.zeros(leaf.shape, dtype=torch.float64)
        view(ref).copy_(w.double() @ R)
        tol = 2e-5 if dt in (torch.float32, torch.float64) else 1e-2
        torch.testing.assert_close(leaf.grad.double(), ref, rtol=tol, atol=tol)


def test_project_inference_tensors_and_float64_inputs_unmodified():
    """An inference-mode x (whole, chunked, float64 with rows past float32's range, as a stream) projects outside
    inference mode to the bits of its normal clone; the result is a normal tensor; x is unchanged."""
    gen = torch.Generator().manual_seed(9)
    with torch.inference_mode():
        xs = [torch.randn(5, 90, generator=gen).to(dt) for dt in FLOATS]
        xs[3][1] *= 1e300  # float64 rows divided by a power of two and multiplied back: x itself is not
        xs[3][2] *= 1e-300
    for x in xs:
        keep = x.clone()
        normal = x.clone()
        assert x.is_inference() and not normal.is_inference()
        for chunk in (None, 31):
            got = P.project(x, 7, seed=4, chunk=chunk)
            assert not got.is_inference()
            assert torch.equal(got, P.project(normal, 7, seed=4, chunk=chunk))
        got = P.project([x[:, :40], x[:, 40:]], 7, seed=4)
        assert torch.equal(got, P.project([normal[:, :40], normal[:, 40:]], 7, seed=4))
        assert torch.equal(x, keep)


def test_fixed_project_out_refusals_before_any_work():
    """DEFECT (fixed): out= an inference tensor outside inference mode, or a view of a leaf that requires grad (grad
    mode on), ran the whole projection (a stream consumed to its end) and then failed in out.copy_ with torch's
    RuntimeError. Now ValueError naming out, before the first chunk is read. The allowed cases still work."""
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(10))
    read = []

    def stream():
        for i in range(2):
            read.append(i)
            yield x[:, 4 * i:4 * i + 4]

    with torch.inference_mode():
        inf_out = torch.zeros(3, 4)
    leaf = torch.zeros(3, 4, requires_grad=True)
    leafT = torch.zeros(4, 3, requires_grad=True)
    for bad, msg in ((inf_out, "^out: an inference tensor"), (leaf[:, :], "^out: a view of a leaf"),
                     (leafT.T, "^out: a view of a leaf"), (leaf[1:], "^out: a view of a leaf")):
        for src in (stream, x):
            read.clear()
            with pytest.raises(ValueError, match=msg):
                P.project(src, 4, out=bad if bad.shape[0] == 3 else torch.zeros(2, 4, requires_grad=True)[:, :])
            assert read == []
    assert not inf_out.any() and not leaf.detach().any()
    want = P.project(x, 4)
    with torch.inference_mode():  # inside inference mode the inference tensor is writable
        assert P.project(x, 4, out=inf_out) is inf_out
    assert torch.equal(inf_out, want)
    with torch.no_grad():  # no grad: a view of a leaf may be written
        v = leaf[:, :]
        assert P.project(x, 4, out=v) is v
    assert torch.equal(leaf.detach(), want)
    nl = torch.zeros(3, 4, requires_grad=True) * 1.0  # a view of a non-leaf: written, the graph kept
    xg = x.clone().requires_grad_()
    y = P.project(xg, 4, out=nl[:, :])
    y.sum().backward()
    assert torch.equal(nl.detach(), want) and xg.grad is not None


# =========================================================================== factored_project


@settings(max_examples=30)
@given(B=st.integers(0, 3), T=st.integers(0, 4), I=st.integers(0, 9), O=st.integers(1, 7), p=st.integers(1, 5),
       dt=st.sampled_from(FLOATS), ha=st.sampled_from(LAYOUTS3), hg=st.sampled_from(LAYOUTS3),
       norm=st.sampled_from(NORMS), bias=st.booleans(), per_token=st.booleans(), masked=st.booleans(),
       seed=st.integers(-2 ** 70, 2 ** 70), kind=st.sampled_from(["rademacher", "gaussian"]))
def test_factored_dtype_layout_matrix_against_float64(B, T, I, O, p, dt, ha, hg, norm, bias, per_token, masked, seed,
                                                      kind):
    """Every dtype x layout of a and g x every option (zero and one sizes included): (B, p*p) or (B, T, p*p)
    float32 within float32 summation error of L G R^T formed explicitly in float64 (Adam: float32 blocks; float64
    inputs elsewhere computed in float64 and rounded once), and a, g, mask and the normaliser unchanged."""
    if I == 0 and norm != "none":
        norm = "none"  # a normaliser of 0 columns: nothing to normalise (its mean over 0 rows is NaN)
    gen = torch.Generator().manual_seed(B * 1000 + T * 100 + I * 10 + O)
    a = _view3(torch.randn(B, T, I, generator=gen).to(dt), ha)
    g = _view3(torch.randn(B, T, O, generator=gen).to(dt), hg)
    mask = (torch.rand(B, T, generator=gen) > 0.35) if masked else None
    nz = _norm(norm, O, I, gen)
    keep = [t.clone() for t in (a, g)] + ([mask.clone()] if masked else [])
    nkeep = None if nz is None else [getattr(nz, f).clone() for f in ("row", "col", "v", "bias_avg_sq")
                                     if getattr(nz, f, None) is not None]
    got = P.factored_project(a, g, p, seed=seed, name="m", kind=kind, mask=mask, bias=bias, per_token=per_token,
                             normalizer=nz)
    want, scale = _factored_ref(a, g, p, seed, "m", kind, mask, bias, per_token, nz)
    _assert_within(got, want, scale)
    assert torch.equal(a, keep[0]) and torch.equal(g, keep[1]) and (not masked or torch.equal(mask, keep[2]))
    if nz is not None:
        now = [getattr(nz, f) for f in ("row", "col", "v", "bias_avg_sq") if getattr(nz, f, None) is not None]
        assert all(torch.equal(u, w) for u, w in zip(now, nkeep))


@pytest.mark.parametrize("dt", [torch.float32, torch.float16, torch.bfloat16])
def test_factored_fused_path_bits_independent_of_layout_and_batch(dt):
    """The fused op (per example; no normaliser or Adafactor, with and without a bias column / bias factor, mask):
    every layout of a and g gives the bits of their .contiguous() copies, and every batch slice the bits of the
    whole batch's rows (README: bitwise independent of thread count and batch). AMX off (its own bits)."""
    gen = torch.Generator().manual_seed(11)
    B, T, I, O, p = 5, 6, 37, 29, 16
    a0 = torch.randn(B, T, I, generator=gen).to(dt)
    g0 = torch.randn(B, T, O, generator=gen).to(dt)
    mask = torch.rand(B, T, generator=gen) > 0.3
    norms = [None, _norm("adafactor", O, I, gen), _norm("adafactor_bias", O, I, gen)]
    with env_set("GRADKIT_FACTORED_AMX", "0"):
        for ha, hg in (("transposed", "step"), ("offset", "perm"), ("channels_last", "contig"), ("expand", "expand"),
                       ("contig", "offset")):
            a, g = _view3(a0, ha), _view3(g0, hg)
            ac, gc = a.contiguous(), g.contiguous()
            for nz, bias, m in itertools.product(norms, (False, True), (None, mask)):
                got = P.factored_project(a, g, p, seed=5, name="f", mask=m, bias=bias, normalizer=nz)
                assert torch.equal(got, P.factored_project(ac, gc, p, seed=5, name="f", mask=m, bias=bias,
                                                           normalizer=nz)), (ha, hg, nz, bias, m is not None)
                for s, e in ((0, 1), (1, 4), (4, 5)):
                    part = P.factored_project(a[s:e], g[s:e], p, seed=5, name="f", bias=bias, normalizer=nz,
                                              mask=None if m is None else m[s:e])
                    assert torch.equal(part, got[s:e]), (ha, hg, s, e)


def test_factored_half_precision_sums_do_not_overflow():
    """float16 a, g at +-60000 (every token product past float16's range, each side's projection too): every path
    (fused, per token, Adafactor, Adam, bias) accumulates in float32: finite, within float32 error."""
    a = torch.full((2, 50, 64), 60000., dtype=torch.float16)
    g = torch.full((2, 50, 48), -60000., dtype=torch.float16)
    a[:, ::2, ::3] = 30000.
    gen = torch.Generator().manual_seed(12)
    for norm, pt, bias in itertools.product(NORMS, (False, True), (False, True)):
        nz = _norm(norm, 48, 64, gen)
        got = P.factored_project(a, g, 4, normalizer=nz, per_token=pt, bias=bias)
        want, scale = _factored_ref(a, g, 4, norm=nz, per_token=pt, bias=bias)
        assert torch.isfinite(got).all(), (norm, pt, bias)
        _assert_within(got, want, scale)


def test_factored_inference_tensors_give_the_same_bits():
    """Inference tensors (a, g, mask, the normaliser's moments; NaN in a masked token) outside inference mode, and
    the same call inside inference mode: the bits of the normal-tensor call, every path, every dtype; the result is
    a normal tensor outside inference mode; nothing is modified."""
    gen = torch.Generator().manual_seed(13)
    B, T, I, O, p = 3, 4, 6, 5, 3
    for dt in FLOATS:
        with torch.inference_mode():
            a = torch.randn(B, T, I, generator=gen).to(dt)
            g = torch.randn(B, T, O, generator=gen).to(dt)
            m = torch.rand(B, T, generator=gen) > .3
            m[0, 1] = False
            a[0, 1, 2] = float("nan")
            nzs = [None, P.AdafactorNormalizer(torch.rand(O) + .1, torch.rand(I) + .1, torch.rand(O) + .1),
                   P.AdamNormalizer(torch.rand(O, I) + .1, torch.rand(O) + .1)]
        an, gn, mn = a.clone(), g.clone(), m.clone()
        for nz, bias, pt in itertools.product(nzs, (False, True), (False, True)):
            nzn = None if nz is None else type(nz)(*[t.clone() if isinstance(t, torch.Tensor) else t
                                                     for t in vars(nz).values()])
            got = P.factored_project(a, g, p, mask=m, bias=bias, per_token=pt, normalizer=nz)
            assert not got.is_inference() and torch.isfinite(got).all()
            assert torch.equal(got, P.factored_project(an, gn, p, mask=mn, bias=bias, per_token=pt, normalizer=nzn))
            with torch.inference_mode():
                assert torch.equal(got, P.factored_project(a, g, p, mask=m, bias=bias, per_token=pt, normalizer=nz))
        assert torch.equal(a.nan_to_num(), an.nan_to_num()) and torch.equal(g, gn) and torch.equal(m, mn)


def test_factored_gradients_reach_non_contiguous_leaves():
    """a, g non-contiguous views of leaves that require grad (transposed, stepped, expanded), every dtype and
    option: each leaf's gradient in its own dtype and shape, equal to the float64 reference's gradient."""
    gen = torch.Generator().manual_seed(14)
    B, T, I, O, p = 2, 3, 5, 4, 3
    mask = torch.tensor([[True, False, True], [True, True, False]])
    for dt, norm, bias, pt in itertools.product(FLOATS, ("none", "adafactor_bias", "adam_bias"), (False, True),
                                                (False, True)):
        la = torch.randn(B, I, T, generator=gen).to(dt).requires_grad_()  # a = la^T: transposed
        lg = torch.randn(B, 1, 2 * O, generator=gen).to(dt).requires_grad_()  # g: stepped, then expanded over T
        a, g = la.transpose(1, 2), lg[..., ::2].expand(B, T, O)
        nz = _norm(norm, O, I, gen)
        res = P.factored_project(a, g, p, mask=mask, bias=bias, per_token=pt, normalizer=nz)
        w = torch.randn(res.shape, generator=gen)
        (res * w).sum().backward()
        ra = la.detach().double().requires_grad_()
        rg = lg.detach().double().requires_grad_()
        (_factored_ref(ra.transpose(1, 2), rg[..., ::2].expand(B, T, O), p, mask=mask, bias=bias, per_token=pt,
                       norm=nz)[0] * w.double()).sum().backward()
        for leaf, r in ((la, ra), (lg, rg)):
            assert leaf.grad.dtype == dt and leaf.grad.shape == leaf.shape
            tol = 1e-4 if dt in (torch.float32, torch.float64) else 2e-2
            torch.testing.assert_close(leaf.grad.double(), r.grad, rtol=tol, atol=tol * (1 + float(r.grad.abs().max())))


# =========================================================================== GradientCollector


def _mlp(dt, I=6, H=5, O=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(I, H), nn.Tanh(), nn.Linear(H, O)).to(dt)


def _hooked_run(model, x, mask=None, **kw):
    """Collector rows, and each Linear's input and output gradient as the model saw them."""
    seen = {}

    def grab(name):
        def hook(mod, inp, out):
            seen[("a", name)] = inp[0].detach()
            out.register_hook(lambda gr: seen.__setitem__(("g", name), gr.detach()))
        return hook

    hooks = [model[i].register_forward_hook(grab(str(i))) for i in (0, 2)]
    try:
        with GradientCollector(model, **kw) as col:
            if mask is not None:
                col.set_mask(mask)
            (model(x) * torch.linspace(-1, 1, model[2].out_features, dtype=x.dtype)).sum().backward()
            rows = col.collect()
    finally:
        for h in hooks:
            h.remove()
    return rows, seen


@pytest.mark.parametrize("dt", FLOATS)
def test_collector_rows_are_factored_project_of_the_hooked_tensors(dt):
    """Small models in every dtype fed non-contiguous inputs (transposed, stepped, offset, expanded, a
    channels_last 4-D input, a leaf that requires grad), per example / per token, bias, mask: each module's rows
    are, bit for bit, factored_project of the input and output gradient the module saw (AMX off), float32; the
    input (and its .grad path) is unaffected."""
    gen = torch.Generator().manual_seed(15)
    B, T, I = 3, 4, 6
    with env_set("GRADKIT_FACTORED_AMX", "0"):
        for how, pt, bias in itertools.product(LAYOUTS3 + ["cl4d", "leaf"], (False, True), (False, True)):
            model = _mlp(dt, I=I)
            if how == "cl4d":  # (B, C, H, W) channels_last, the Linear on its last axis (W = I): C * H tokens
                x = torch.randn(B, 2, 2, I, generator=gen).to(dt).contiguous(memory_format=torch.channels_last)
                assert not x.is_contiguous()
                mask = None
            else:
                x = _view3(torch.randn(B, T, I, generator=gen).to(dt), how if how != "leaf" else "transposed")
                mask = torch.rand(B, T, generator=gen) > 0.3
                if how == "leaf":
                    x = x.detach().requires_grad_()
            keep = x.detach().clone()
            rows, seen = _hooked_run(model, x, mask, p=3, seed=7, per_token=pt, bias=bias)
            assert torch.equal(x.detach(), keep)
            if how == "leaf":
                assert x.grad is not None and x.grad.shape == x.shape
            for n in ("0", "2"):
                a, g = seen[("a", n)], seen[("g", n)]
                a3, g3 = a.reshape(B, -1, a.shape[-1]), g.reshape(B, -1, g.shape[-1])
                want = P.factored_project(a3, g3, 3, seed=7, name=n, bias=bias, per_token=pt, mask=mask)
                assert rows[n].dtype == torch.float32
                assert torch.equal(rows[n], want), (how, pt, bias, n)


def test_collector_float64_model_against_per_example_weight_gradients():
    """A float64 model (the wide path: projected in float64, rounded once): each example's rows equal its own
    backward's weight (and bias) gradient projected in float64 within float32 rounding, for inputs in several
    layouts; collect(dtype=float64 / bfloat16) is the float32 rows cast once."""
    gen = torch.Generator().manual_seed(16)
    B, T, I, p = 3, 4, 6, 4
    model = _mlp(torch.float64, I=I)
    for how in ("transposed", "offset", "expand"):
        x = _view3(torch.randn(B, T, I, generator=gen, dtype=torch.float64) * 1e3, how)
        with GradientCollector(model, p=p, seed=3, bias=True) as col:
            (model(x) ** 2).sum().backward()
            rows = col.collect()
        for b in range(B):
            model.zero_grad()
            (model(x[b:b + 1]) ** 2).sum().backward()
            for n in ("0", "2"):
                lin = model[int(n)]
                G = torch.cat([lin.weight.grad, lin.bias.grad[:, None]], 1)
                L = P.projection_matrix(p, G.shape[0], P.derive_seed(3, n, "left"), dtype=torch.float64)
                R = P.projection_matrix(p, G.shape[1], P.derive_seed(3, n, "right"), dtype=torch.float64)
                want = (L @ G @ R.T).reshape(-1)
                scale = (L.abs() @ G.abs() @ R.abs().T).reshape(-1)
                assert rows[n].dtype == torch.float32
                err = (rows[n][b].double() - want).abs()
                assert bool((err <= 2e-6 * scale + 1e-300).all()), (how, n, b, float(err.max()))
    x = torch.randn(B, T, I, generator=gen, dtype=torch.float64)
    out = {}
    for odt in (torch.float32, torch.float64, torch.bfloat16):
        with GradientCollector(model, p=p, seed=3, dtype=odt) as col:
            model(x).sum().backward()
            out[odt] = col.collect(flat=True)
        assert out[odt].dtype == odt
    assert torch.equal(out[torch.float64], out[torch.float32].double())
    assert torch.equal(out[torch.bfloat16], out[torch.float32].bfloat16())


@pytest.mark.parametrize("dt", [torch.float32, torch.float64, torch.float16])
def test_fixed_collector_empty_batch(dt):
    """DEFECT (fixed): an empty batch (B = 0) raised "cannot reshape tensor of 0 elements into shape [0, -1, 5]" in
    the backward pass (_collector.py _project). Now (0, p*p) rows per module ((0, T, p*p) per token; 2-D inputs:
    (0, 1, p*p), as their non-empty rows), with and without a (0, T) mask, for 3-D, 2-D and 4-D inputs. A (0, T)
    mask with a 2-D input of other rows was a ZeroDivisionError: now the ValueError naming the module."""
    for shape, pt, masked in itertools.product(((0, 4, 6), (0, 6), (0, 2, 3, 6)), (False, True), (False, True)):
        model = _mlp(dt)
        T = int(math.prod(shape[1:-1])) if len(shape) > 2 else 1
        mask = torch.ones(0, T if len(shape) > 2 else 5) if masked else None
        with GradientCollector(model, p=2, per_token=pt, bias=True) as col:
            if mask is not None:
                col.set_mask(mask)
            out = model(torch.randn(*shape, dtype=dt))
            (out.sum() + 0 * sum(q.sum() for q in model.parameters())).backward()
            rows = col.collect(scale="batch")
            flat_dim = col.dim
        for n in ("0", "2"):
            assert rows[n].dtype == torch.float32
            assert tuple(rows[n].shape) == ((0, T, 4) if pt else (0, 4)), (shape, pt, rows[n].shape)
        assert flat_dim == 8
    model = _mlp(dt)
    col = GradientCollector(model, p=2)
    with col:
        col.set_mask(torch.ones(0, 5))
        with pytest.raises(ValueError, match=r"^modules: '0' got a 2-D input of shape \(3, 6\)"):
            model(torch.randn(3, 6, dtype=dt))
        col.set_mask(None)
        model(torch.randn(3, 6, dtype=dt)).sum().backward()  # the collector still works
        assert col.collect()["0"].shape == (3, 4)


# =========================================================================== score_topk


def test_score_topk_layouts_dtypes_and_inputs_unmodified():
    """keys float32 / float16 / bfloat16; queries, keys, key_scale, scores_in, idx_in transposed / stepped / offset
    / expanded: the bits of the contiguous call, indices equal to the reference's and scores within float32 error;
    float32 / int64 results; no input modified; inference inputs give a normal result outside inference mode."""
    gen = torch.Generator().manual_seed(17)
    Q, N, D = 5, 40, 33
    q = torch.randn(Q, D, generator=gen)
    for kdt in (torch.float32, torch.float16, torch.bfloat16):
        keys = torch.randn(N, D, generator=gen).to(kdt)
        ks = torch.rand(N, generator=gen) + .5
        si = torch.randn(Q, 4, generator=gen).sort(1, descending=True).values
        ii = torch.randint(1000, 2000, (Q, 4), generator=gen)
        base = ops.score_topk(q, keys, 7, key_scale=ks, scores_in=si, idx_in=ii, base=3)
        assert base[0].dtype == torch.float32 and base[1].dtype == torch.int64
        rs, ri = ref_search.score_topk(q, keys, 7, True, ks, si, ii, 3)
        assert torch.equal(ri, base[1])
        torch.testing.assert_close(base[0], rs, rtol=1e-5, atol=1e-5)
        qv = [q, torch.empty(D, Q).T.copy_(q), torch.empty(Q, 2 * D)[:, ::2].copy_(q),
              torch.empty(Q + 1, D + 1)[1:, 1:].copy_(q)]
        kv = [keys, torch.empty(D, N, dtype=kdt).T.copy_(keys), torch.empty(N, 2 * D, dtype=kdt)[:, ::2].copy_(keys),
              torch.empty(2 * N, D, dtype=kdt)[::2].copy_(keys), torch.empty(N + 1, D + 3, dtype=kdt)[1:, 3:].copy_(keys)]
        sv = [ks, torch.empty(2 * N)[::2].copy_(ks)]
        iv = [(si, ii), (torch.empty(4, Q).T.copy_(si), torch.empty(4, Q, dtype=torch.int64).T.copy_(ii))]
        for qq, kk, ss, (s1, i1) in itertools.product(qv, kv, sv, iv):
            before = [t.clone() for t in (qq, kk, ss, s1, i1)]
            r = ops.score_topk(qq, kk, 7, key_scale=ss, scores_in=s1, idx_in=i1, base=3)
            assert torch.equal(r[0], base[0]) and torch.equal(r[1], base[1])
            assert all(torch.equal(t, c) for t, c in zip((qq, kk, ss, s1, i1), before))
        # expanded (stride-0) keys and key_scale: equal rows tie to the lowest index
        ke, se = keys[:1].expand(N, D), ks[:1].expand(N)
        r = ops.score_topk(q, ke, 5, key_scale=se)
        r2 = ops.score_topk(q, ke.contiguous(), 5, key_scale=se.contiguous())
        assert torch.equal(r[0], r2[0]) and torch.equal(r[1], r2[1])
        assert r[1].tolist() == [[0, 1, 2, 3, 4]] * Q
        with torch.inference_mode():
            qi, ki = q.clone(), keys.clone()
        r = ops.score_topk(qi, ki, 7, key_scale=ks, scores_in=si, idx_in=ii, base=3)
        assert not r[0].is_inference() and torch.equal(r[0], base[0]) and torch.equal(r[1], base[1])


@pytest.mark.parametrize("Q,N,D,k", [(0, 5, 3, 2), (2, 0, 3, 2), (2, 5, 0, 2), (2, 5, 3, 0), (0, 0, 0, 0),
                                     (1, 1, 1, 1), (1, 1, 1, 3)])
@pytest.mark.parametrize("kdt", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("largest", [True, False])
def test_score_topk_zero_and_one_sizes_match_the_reference(Q, N, D, k, kdt, largest):
    gen = torch.Generator().manual_seed(18)
    q, keys = torch.randn(Q, D, generator=gen), torch.randn(N, D, generator=gen).to(kdt)
    s, i = ops.score_topk(q, keys, k, largest=largest)
    rs, ri = ref_search.score_topk(q, keys, k, largest, None, None, None, 0)
    assert s.shape == (Q, k) and i.shape == (Q, k) and s.dtype == torch.float32 and i.dtype == torch.int64
    assert torch.equal(i, ri)
    torch.testing.assert_close(s, rs, rtol=1e-6, atol=1e-6)


def test_score_topk_queries_that_require_grad_get_a_gradient_or_a_refusal():
    gen = torch.Generator().manual_seed(19)
    q = torch.randn(3, 8, generator=gen).requires_grad_()
    keys = torch.randn(10, 8, generator=gen)
    s, i = ops.score_topk(q, keys, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "autograd kernel was not registered" warning fails the test
        s.sum().backward()
    assert q.grad is not None
    torch.testing.assert_close(q.grad, keys[i].sum(1))


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("kdtype", [torch.float32, torch.bfloat16])
def test_score_topk_gradients_match_the_composite_paths_autograd(largest, kdtype):
    # session 43: the C++ op's autograd formula (ops/search.py) against the torch composite path's autograd, for
    # every differentiable input: queries, keys, key_scale and the running scores (slots kept from scores_in)
    from gradkit.kernels import composite
    gen = torch.Generator().manual_seed(3 + largest)
    Q, N, D, k, base = 4, 13, 6, 5, 7
    leaves = [torch.randn(Q, D, generator=gen), torch.randn(N, D, generator=gen).to(kdtype),
              torch.rand(N, generator=gen), torch.randn(Q, 3, generator=gen) * 2]
    idx_in = torch.tensor([[100, 101, -1]] * Q)
    w = torch.randn(Q, k, generator=gen)
    grads, outs = [], []
    for f in (lambda *a: ops.score_topk(a[0], a[1], k, largest=largest, key_scale=a[2], scores_in=a[3],
                                        idx_in=idx_in, base=base),
              lambda *a: composite.score_topk(a[0], a[1], k, largest, a[2], a[3], idx_in, base)):
        ts = [t.clone().requires_grad_() for t in leaves]
        s, i = f(*ts)
        (torch.where(torch.isfinite(s), s, 0) * w).sum().backward()
        grads.append([t.grad for t in ts])
        outs.append(i)
    assert torch.equal(outs[0], outs[1]) and (outs[0] >= 100).any() and (outs[0] < 100).any()
    for name, a, b in zip(("queries", "keys", "key_scale", "scores_in"), *grads):
        assert a is not None and a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
