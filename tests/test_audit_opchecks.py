"""Audit of op-level argument checks (the rule: bad input gets a clear error naming the argument, before any
work is done, and nothing the caller had is lost), for calls that bypass the Python wrappers or paths the
wrappers never checked:

* torch.ops.gradkit.masked_adamw_ called directly: the C++ op checks the scalars as gradkit.ops.masked_adamw_
  does (same ranges, same messages, the bias correction's index named); a NaN rate used to write NaN into
  every parameter;
* block_soft_threshold_ on every backend (C++ op, Triton launcher, reference) and through the scope API:
  NaN / negative thresholds and a conditioner that is not finite and > 0 are refused, x left untouched;
* obs_schur_extend_ (wrapper, C++ op, Triton launcher): an output ut whose elements share memory (expanded,
  stride 0) is refused;
* StructuredOBS: pruned weights that overflow an fp16 / bf16 weight raise (as prune_model's check does)
  instead of being written back as inf.

The CUDA C++ kernels' checks run under the emulator in tests/test_cuda_emulated.py (test_*_refuses_*)."""
import math

import pytest
import torch
from torch import nn

import gradkit.scope as S
from gradkit import _ext, ops
from gradkit.kernels.reference import obs as obs_ref
from gradkit.kernels.reference import scope as scope_ref
from gradkit.obs import StructuredOBS

from conftest import use_backend

needs_ext = pytest.mark.skipif(not _ext.LOADED, reason="compiled extension not built")
NAN, INF = float("nan"), float("inf")


def _rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# --------------------------------------------------------------------------- masked_adamw_ (C++ op)

GOOD_ADAMW = dict(masked_lr=1e-2, unmasked_lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
                  bias_correction1=[0.1, 0.19], bias_correction2_sqrt=[0.03, 0.05])
_ORDER = ("masked_lr", "unmasked_lr", "beta1", "beta2", "eps", "weight_decay", "bias_correction1",
          "bias_correction2_sqrt")


def _adamw_state(n=2):
    p, g, m = ([_rand(5, 3, seed=10 * k + i) for i in range(n)] for k in range(3))
    v = [_rand(5, 3, seed=30 + i).abs() for i in range(n)]
    bits = [ops.pack_bitmask(torch.arange(15).reshape(5, 3) % 2 == 0), None][:n]
    return p, g, m, v, bits


def _op_args(p, g, m, v, bits, kw):
    return (p, g, m, v, bits, *[kw[k] for k in _ORDER], False)


@needs_ext
@pytest.mark.parametrize("bad", [
    dict(masked_lr=NAN), dict(unmasked_lr=-1.0), dict(unmasked_lr=INF), dict(eps=NAN), dict(eps=-1e-8),
    dict(weight_decay=INF), dict(weight_decay=NAN), dict(beta1=1.0), dict(beta1=-0.5), dict(beta2=NAN),
    dict(beta2=1.5), dict(bias_correction1=[0.1, 0.0]), dict(bias_correction1=[NAN, 0.1]),
    dict(bias_correction2_sqrt=[0.03, 1.25]), dict(bias_correction2_sqrt=[-2.5e-7, 0.05]),
    dict(masked_lr=-1.5e-5), dict(weight_decay=-1e-300), dict(eps=-12345.678),
])
def test_masked_adamw_op_checks_scalars_like_the_wrapper(bad):
    kw = {**GOOD_ADAMW, **bad}
    p, g, m, v, bits = _adamw_state()
    before = [[t.clone() for t in ts] for ts in (p, m, v)]
    with pytest.raises(ValueError) as py:
        ops.masked_adamw_(p, g, m, v, bits, **kw)
    with pytest.raises(ValueError) as op:  # the registered op, bypassing the wrapper (the native kernel)
        torch.ops.gradkit.masked_adamw_(*_op_args(p, g, m, v, bits, kw))
    assert str(op.value).splitlines()[0] == str(py.value)  # same message, argument (and index) named
    assert str(py.value).startswith(next(iter(bad)))
    for ts, bs in zip((p, m, v), before):
        assert all(torch.equal(a, b) for a, b in zip(ts, bs))  # nothing written (NaN used to be)


@needs_ext
def test_masked_adamw_op_messages_name_the_index_and_print_reprs():
    p, g, m, v, bits = _adamw_state()
    cases = [
        (dict(bias_correction1=[0.1, 0.0]), r"bias_correction1[1]: expected a number in (0, 1], got 0.0"),
        (dict(bias_correction2_sqrt=[0.03, 1.25]), r"bias_correction2_sqrt[1]: expected a number in (0, 1], got 1.25"),
        (dict(masked_lr=NAN), "masked_lr: expected a finite number >= 0, got nan"),
        (dict(unmasked_lr=-1e-5), "unmasked_lr: expected a finite number >= 0, got -1e-05"),
        (dict(eps=-1e16), "eps: expected a finite number >= 0, got -1e+16"),
        (dict(weight_decay=-123456789012345.0), "weight_decay: expected a finite number >= 0, got -123456789012345.0"),
        (dict(beta1=1.0), "beta1: expected a number in [0, 1), got 1.0"),
        (dict(beta2=-0.1), "beta2: expected a number in [0, 1), got -0.1"),
        (dict(beta2=-0.0001), "beta2: expected a number in [0, 1), got -0.0001"),
    ]
    for bad, msg in cases:
        kw = {**GOOD_ADAMW, **bad}
        with pytest.raises(ValueError) as op:
            torch.ops.gradkit.masked_adamw_(*_op_args(p, g, m, v, bits, kw))
        assert str(op.value).splitlines()[0] == msg
        with pytest.raises(ValueError) as py:
            ops.masked_adamw_(p, g, m, v, bits, **kw)
        assert str(py.value) == msg


@needs_ext
def test_masked_adamw_op_good_input_unchanged():
    # bias corrections of exactly 1 and rates of exactly 0 stay accepted; the result is the wrapper's
    kw = {**GOOD_ADAMW, "unmasked_lr": 0.0, "bias_correction1": [1.0, 0.5], "beta1": 0.0}
    a, b = _adamw_state(), _adamw_state()
    ops.masked_adamw_(*a, **kw)
    torch.ops.gradkit.masked_adamw_(*_op_args(*b, kw))
    for x, y in zip(a, b):
        assert all((s is None and t is None) or torch.equal(s, t) for s, t in zip(x, y))


# --------------------------------------------------------------------------- block_soft_threshold_


def _impls(first, name: str, family: str):
    """[(label, fn)]: ``first``, then torch.ops.gradkit.<name> when built, then the Triton launcher as registered
    for CUDA (the op's checks, then the launcher: gradkit.kernels.triton.cuda_kernel)."""
    out = [first]
    if _ext.has_op(name):
        out.append(("native", getattr(torch.ops.gradkit, name)))
    try:
        from gradkit.kernels.triton import cuda_kernel

        out.append(("triton", cuda_kernel(family, name)))
    except Exception:  # pragma: no cover - no triton
        pass
    return out


SOFT_IMPLS = _impls(("reference", scope_ref.block_soft_threshold_), "block_soft_threshold_", "scope")
_T_GRID = (4, 2)  # x (4, 8) in (1, 4) blocks


def _bad_soft_cases():
    t = torch.full(_T_GRID, 0.3)
    h = torch.rand(4, 8, generator=torch.Generator().manual_seed(5)) + 0.5

    def with_t(i, v, base=t):
        b = base.clone()
        b.view(-1)[i] = v
        return b

    return [
        ("t_nan", with_t(5, NAN), None, r"thresholds: NaN threshold"),
        ("t_neg", with_t(2, -0.25), None, r"thresholds: expected thresholds >= 0, got a minimum of -0\.25"),
        ("t_nan_cond", with_t(0, NAN), h, r"thresholds: NaN threshold"),
        ("h_zero", t, with_t(7, 0.0, h), r"conditioner: expected finite values > 0 .*minimum of 0 "),
        ("h_neg", t, with_t(3, -1.0, h), r"conditioner: expected finite values > 0 .*minimum of -1 "),
        ("h_nan", t, with_t(9, NAN, h), r"conditioner: NaN value"),
        ("h_inf", t, with_t(31, INF, h), r"conditioner: expected finite values > 0 .*maximum of inf"),
    ]


@pytest.mark.parametrize("impl_name, impl", SOFT_IMPLS, ids=[n for n, _ in SOFT_IMPLS])
@pytest.mark.parametrize("block", [(1, 4), (1, 1)])
@pytest.mark.parametrize("case", _bad_soft_cases(), ids=lambda c: c[0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_soft_threshold_refuses_bad_values_on_every_backend(impl_name, impl, block, case, dtype):
    _, t, h, msg = case
    x = _rand(4, 8, seed=1, dtype=dtype)
    grid = (4, 8 // block[1])
    if t.shape != grid:  # single-element blocks: a grid-shaped copy with the bad value kept
        t = t.repeat_interleave(grid[1] // t.shape[1], dim=1)
    before = x.clone()
    with pytest.raises(ValueError, match=msg):
        impl(x, list(block), t, None if h is None else h.to(dtype), 20, 1e-8, 1e-7)
    assert torch.equal(x, before)


@pytest.mark.parametrize("backend", [n for n, _ in SOFT_IMPLS])
def test_block_soft_threshold_wrapper_refuses_through_every_backend(backend):
    x = _rand(4, 8, seed=1)
    before = x.clone()
    h = torch.ones(4, 8)
    h[2, 5] = 0.0
    with use_backend(backend):
        with pytest.raises(ValueError, match=r"conditioner: expected finite values > 0"):
            ops.block_soft_threshold_(x, [1, 4], torch.full(_T_GRID, 0.3), conditioner=h)
        with pytest.raises(ValueError, match=r"thresholds: expected thresholds >= 0"):
            ops.block_soft_threshold_(x, [1, 4], torch.full(_T_GRID, -0.3))
    assert torch.equal(x, before)


@pytest.mark.parametrize("impl_name, impl", SOFT_IMPLS, ids=[n for n, _ in SOFT_IMPLS])
def test_block_soft_threshold_good_edge_values_still_accepted(impl_name, impl):
    # zero and +inf thresholds (keep as is / zero the block) and tiny or huge finite conditioners are fine,
    # and the results are the reference's (checks changed nothing of the maths)
    t = torch.tensor([[0.0, INF], [0.3, 1.0], [0.0, 0.2], [5.0, 0.1]])
    h = torch.rand(4, 8, generator=torch.Generator().manual_seed(2)) + 0.5
    h[0, 0], h[3, 7] = 1e-6, 1e6
    for cond in (None, h):
        want = _rand(4, 8, seed=3)
        scope_ref.block_soft_threshold_(want, [1, 4], t, cond, 20, 1e-8, 1e-7)
        x = _rand(4, 8, seed=3)
        impl(x, [1, 4], t, cond, 20, 1e-8, 1e-7)
        assert torch.isfinite(x).all()
        torch.testing.assert_close(x, want, rtol=1e-5, atol=1e-6)
        assert torch.equal(x[0, 4:], torch.zeros(4))  # the +inf threshold zeroed its block


def _coupled_scopes():
    a, c, d = _rand(4, 8), _rand(4, 8, seed=1), _rand(4, 8, seed=2)
    s1 = S.ScopeSpec(S.BlockCoupling([S.BlockSpec(a, (1, 2)), S.BlockSpec(c, (1, 2))]), (1, 2))
    s2 = S.ScopeSpec(S.BlockSpec(d, (1, 2)), (1, 2))
    return (a, c, d), S.ScopeCoupling([s1, s2])


@pytest.mark.parametrize("backend", [n for n, _ in SOFT_IMPLS])
@pytest.mark.parametrize("bad", [0.0, -1.0, NAN, INF])
def test_scope_soft_threshold_refuses_a_bad_conditioner_before_any_write(backend, bad):
    ts, sc = _coupled_scopes()
    blocks = sc.blocks()
    h = {b: torch.rand(4, 8, generator=torch.Generator().manual_seed(i)) + 0.5 for i, b in enumerate(blocks)}
    h[blocks[-1]][1, 1] = bad  # only the last scope's (a BlockSpec) conditioner is bad
    before = [x.clone() for x in ts]
    with use_backend(backend), pytest.raises(ValueError, match=r"conditioners?: (NaN|expected finite)"):
        sc.soft_threshold(torch.full(sc.grid_shape, 0.3), conditioners=h)
    assert all(torch.equal(x, y) for x, y in zip(ts, before))  # the BlockCoupling scope was not written
    # a BlockCoupling's own (Python) step refuses it too
    h2 = dict(h)
    h2[blocks[0]] = h[blocks[-1]]
    with use_backend(backend), pytest.raises(ValueError, match=r"conditioners: (NaN|expected finite)"):
        sc.scopes[0].soft_threshold(torch.full(sc.grid_shape, 0.3), conditioners=h2)
    assert all(torch.equal(x, y) for x, y in zip(ts, before))
    # a BlockSpec's soft_threshold reaches the op, which refuses it
    with use_backend(backend), pytest.raises(ValueError, match=r"conditioner: (NaN|expected finite)"):
        sc.scopes[1].soft_threshold(torch.full(sc.grid_shape, 0.3), conditioners=h)
    assert all(torch.equal(x, y) for x, y in zip(ts, before))


# --------------------------------------------------------------------------- obs_schur_extend_


def _schur_args(ut, m=2, cnt=1, F=3, seed=0):
    n, K = ut.shape[0], ut.shape[2]
    g = torch.Generator().manual_seed(seed)
    xf = torch.randn(n, m, F, generator=g)
    up = torch.randn(n, m, cnt, generator=g)
    linv = torch.randn(n, m, m, generator=g)
    return xf, up, linv, cnt


SCHUR_IMPLS = _impls(("wrapper", ops.obs_schur_extend_), "obs_schur_extend_", "obs")


@pytest.mark.parametrize("impl_name, impl", SCHUR_IMPLS, ids=[n for n, _ in SCHUR_IMPLS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("how", ["expand_rows", "stride0_cap"])
def test_obs_schur_extend_refuses_an_internally_overlapping_ut(impl_name, impl, dtype, how):
    base = _rand(1, 4, 5, seed=7, dtype=dtype)
    if how == "expand_rows":  # 3 rows sharing one factor: each row's result overwrites the others'
        ut = base.expand(3, 4, 5)
    else:  # the cap dim a stride-0 view: rows cnt .. cnt+m all land on one memory row
        ut = base[:, :1, :].expand(1, 4, 5)
    storage_before = base.clone()
    xf, up, linv, cnt = _schur_args(ut)
    with pytest.raises(RuntimeError, match=r"^ut: unsupported operation: more than one element of the written-to "
                                           r"tensor refers to a single memory location"):
        impl(ut, xf, up, linv, cnt)
    assert torch.equal(base, storage_before)


@pytest.mark.parametrize("impl_name, impl", SCHUR_IMPLS, ids=[n for n, _ in SCHUR_IMPLS])
def test_obs_schur_extend_still_takes_strided_non_overlapping_ut(impl_name, impl):
    # any strides stay allowed: a transposed, sliced factor (torch cannot prove it free of overlap: TooHard)
    big = _rand(5, 3, 6, seed=8)
    ut = big.permute(1, 0, 2)[:, :4]  # (3, 4, 6), non-contiguous
    want = ut.clone()
    xf, up, linv, cnt = _schur_args(ut, m=2, cnt=1, F=4)
    obs_ref.obs_schur_extend_(want, xf, up, linv, cnt)
    impl(ut, xf, up, linv, cnt)
    torch.testing.assert_close(ut, want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- StructuredOBS fp16 / bf16 overflow


def _overflow_case(dtype, name=None):
    # 4 perfectly correlated inputs: pruning 2 of 4 moves their weight onto the 2 kept ones, 2 * 6e4 > 65504
    # (fp16's max: finite in float32, inf once written back); bf16 shares float32's range, so its weights of
    # 2e38 give non-finite float32 results (the first half of the rule)
    big = 6.0e4 if dtype == torch.float16 else 2.0e38
    w = torch.full((2, 4), big, dtype=dtype)
    x = torch.randn(32, 1, generator=torch.Generator().manual_seed(0)).repeat(1, 4)
    H = x.T @ x
    return w, S.ScopeSpec(S.BlockSpec(w, (1, 1), name=name), (1, 4)), H


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["true_obs", "resolve", "local", "full"])
def test_structured_obs_refuses_an_overflowing_write_back(dtype, method):
    w, scope, H = _overflow_case(dtype, name="fc1")
    before = w.clone()
    obs = StructuredOBS(scope, H, damp=1e-6)
    v0 = w._version
    msg = (r"the pruned weights of layer 'fc1' overflow the weight's dtype torch\.float16" if dtype == torch.float16
           else r"produced non-finite weights for layer 'fc1'")
    with pytest.raises(RuntimeError, match=msg):
        if method in ("true_obs", "resolve"):
            obs.prune_true_obs(2, mode="obs" if method == "true_obs" else "resolve")
        else:
            obs.prune(2, compensate=method)
    assert torch.equal(w, before) and w._version == v0  # the model untouched


def test_structured_obs_overflow_message_without_a_name_names_the_weight():
    w, scope, H = _overflow_case(torch.float16)
    with pytest.raises(RuntimeError, match=r"^prune: the pruned weights of the scope's weight \(shape \(2, 4\)\) "
                                           r"overflow the weight's dtype torch\.float16 "
                                           r"\(largest magnitude 1\.2\d*e\+05\)"):
        StructuredOBS(scope, H, damp=1e-6).prune(2)
    assert (w == 6.0e4).all()


def test_structured_obs_fp16_in_range_still_written():
    w, scope, H = _overflow_case(torch.float16)
    with torch.no_grad():
        w.fill_(1.0)
    StructuredOBS(scope, H, damp=1e-6).prune(2)
    assert torch.isfinite(w).all() and int((w != 0).sum(-1).max()) == 2
    assert math.isclose(float(w.float().sum()), 8.0, rel_tol=1e-2)  # the pruned weight moved onto the kept


@pytest.mark.parametrize("inplace", [False, True])
def test_sparsegpt_refuses_weights_that_overflow_fp16(inplace):
    """obs.baselines.sparsegpt compensated in float32 and returned (and with inplace=True wrote) inf for an fp16
    weight whose compensated entries pass 65504; now a RuntimeError, the weight untouched."""
    from gradkit.obs import baselines

    w, scope, H = _overflow_case(torch.float16)
    v0 = w._version
    with pytest.raises(RuntimeError, match=r"^sparsegpt: the pruned weights overflow the weight's dtype "
                                           r"torch\.float16 \(largest magnitude 1\.2\d*e\+05\)"):
        baselines.sparsegpt(scope, H, 2, damp=1e-6, inplace=inplace)
    assert (w == 6.0e4).all() and w._version == v0
    with torch.no_grad():
        w.fill_(1.0)
    out = baselines.sparsegpt(scope, H, 2, damp=1e-6, inplace=inplace)
    assert torch.isfinite(out).all() and int((out != 0).sum(-1).max()) == 2


def test_resolve_refuses_weights_that_overflow_fp16():
    """obs.metrics.resolve checked finiteness in float32 and then returned (or wrote into `out`) inf for an fp16
    W whose re-solved weights pass 65504: now a RuntimeError, `out` untouched."""
    from gradkit.obs import metrics

    w, _, H = _overflow_case(torch.float16)
    keep = torch.tensor([[True, True, False, False]] * 2)
    with pytest.raises(RuntimeError, match=r"^resolve: the re-solved weights overflow the result's dtype "
                                           r"torch\.float16"):
        metrics.resolve(w, H, keep, damp=1e-6)
    out = torch.full((2, 4), 7.0, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="overflow"):
        metrics.resolve(w, H, keep, damp=1e-6, out=out)
    assert (out == 7.0).all()
    wide = torch.empty(2, 4)  # a float32 `out` holds them: no error
    metrics.resolve(w, H, keep, damp=1e-6, out=wide)
    assert torch.isfinite(wide).all() and float(wide.abs().max()) > 65504


# ---- integer arguments: the scope and search wrappers refused numpy integers that projection and OBS took -------
def test_every_family_takes_numpy_integers_as_ints_and_refuses_bools():
    """The op wrappers had five copies of their int check: the scope / param-map ones (``k``, ``nnz``,
    ``block_shape`` entries) and score_topk's ``k`` raised TypeError for ``np.int64(3)`` while projection and OBS
    took it. One check now serves all: a numpy integer gives the int's result, a bool (numpy's too) is refused."""
    import numpy as np

    gen = torch.Generator().manual_seed(0)
    q, keys = torch.randn(3, 8, generator=gen), torch.randn(20, 8, generator=gen)
    want = ops.score_topk(q, keys, 4)
    got = ops.score_topk(q, keys, np.int64(4), base=np.int32(0))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    x = torch.randn(8, 16, generator=gen)
    assert torch.equal(ops.scope_kth(x, [np.int64(1), 2], [1, np.int16(8)], np.int8(3)), ops.scope_kth(x, [1, 2], [1, 8], 3))
    assert torch.equal(ops.scope_mask(x, [1, 1], [1, 4], np.uint8(2)), ops.scope_mask(x, [1, 1], [1, 4], 2))
    for bad in (True, np.bool_(True)):
        with pytest.raises(TypeError, match=r"^k: expected an int, got (bool|bool_)$"):
            ops.score_topk(q, keys, bad)
        with pytest.raises(TypeError, match=r"^nnz: expected an int, got (bool|bool_)$"):
            ops.scope_mask(x, [1, 1], [1, 4], bad)
    with pytest.raises(TypeError, match=r"^k: expected an int, got float$"):
        ops.score_topk(q, keys, 4.0)
