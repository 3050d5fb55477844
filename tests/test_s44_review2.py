"""Second review of session 44's late commits: b630cb5 (masked_adamw_ on CPU for float16 / bfloat16 through AVX2 +
F16C, csrc/cpu/adamw.cpp step_half_avx2), 4e8cc91 (block_norms' flat loop for one-entry blocks of a contiguous
tensor, csrc/cpu/scope.cpp) and 1fb3744 (score_topk's bf16 screen only where N >= 1500 k, csrc/cpu/search.cpp;
GRADKIT_SEARCH_SCREEN=1 set by tests/conftest.py).

Checked and found right (tests below, where the session's tests could not see a mistake):

* step_half_avx2 gives the bits of the CUDA C++ kernel run under tests/cuda_emu (c10's scalar conversions, an
  independent oracle) for random 16-bit patterns (NaN, inf, subnormals), several tensors in one call (lengths
  not a multiple of 8 next to one another, 1 entry, past kChunk = 32768 so a second work item starts at mask byte
  4096, masks and no masks, a view one element into its storage), frozen rates, AMSGrad (specials in the running
  maximum too), maximize, both lerp forms, weight decay 0 and a decay factor of exactly 0, all-subnormal halves,
  gradients whose square overflows; and through MaskedAdamW with float32, bfloat16 and float16 parameters (one
  fused call per dtype group, a non-contiguous parameter written back). The session's own test runs one tensor of
  at most 4099 entries (one work item), always with a mask, and no specials in the AMSGrad maximum.
* block_norms' flat path: the general walk's bits for random bit patterns of 4 dtypes (NaN payloads) over more
  than one parallel grain, contiguous views with a storage offset or size-1 dims of any stride, 8 dims; zero-size
  dims give the grid shape and dtype; a 0-d x is refused (ValueError naming x) before any work.
* score_topk's gate: 1500 * k cannot overflow (the (Q, k) output is allocated before the gate, and Q = 0 or k = 0
  return first); calls at, below and above N = 1500 k and with k > N give the same bits with the screen forced,
  left to the gate, or off (on this CI host, which has no AVX512-BF16, all three are the exact path: the test
  can fail only on an AVX512-BF16 host); conftest keeps GRADKIT_SEARCH_SCREEN=1 so the EXACT comparisons still
  compare two paths.

Defect found (strict xfail; csrc is not this review's to edit):

* float16 results whose float value is a NaN made from two NaN operands of opposite signs (v*beta2 + w2*g*g with
  v = +NaN and g = -NaN; m + w1*(g - m) with m, g NaNs of opposite signs; p*decay + step with both NaN) take
  the sign of whichever operand the compiler put first: step_half_avx2's lane loop (csrc/cpu/adamw.cpp:181-198, v
  at :187) and the tail it hands to the generic loop (:209, step_range's v at :100) order them differently, so one
  call gives the same input entry 0xFE00 in an 8-entry block and 0x7E00 in the tail; the emulated CUDA kernel and
  the generic loop give 0x7E00 for both. bfloat16 hides it (c10 narrows every NaN to 0x7FC0). The old AVX2 clone of the
  generic loop differed from the baseline loop more often (364 against 100 entries in a private harness).
"""
import contextlib
import os

import pytest
import torch

from gradkit import _ext, ops
from gradkit.optim import MaskedAdamW

from _bits import bits, same
from conftest import CPU_FLAGS, env_set

pytestmark = pytest.mark.skipif(not _ext.LOADED, reason="compiled extension not built")

HALF = [torch.bfloat16, torch.float16]


F16C = {"avx2", "f16c"} <= CPU_FLAGS


def _emu_adamw():
    from test_cuda_emulated import emu

    return emu("adamw")


def _specials(n, dt, gen, frac=0.25, scale=1.0):
    """randn * scale with a fraction of the entries replaced by random 16-bit patterns (every class)."""
    x = (torch.randn(n, generator=gen) * scale).to(dt)
    pat = torch.randint(-2 ** 15, 2 ** 15, (n,), generator=gen, dtype=torch.int32).to(torch.int16).view(dt)
    return torch.where(torch.rand(n, generator=gen) < frac, pat, x)


def _check_equal(got, want, dt, what):
    """Bit for bit; for float16 a NaN may differ from the oracle's in its sign bit only (the xfail below)."""
    gi, wi = bits(got), bits(want)
    diff = gi != wi
    if dt == torch.float16:
        diff &= ~(torch.isnan(got) & torch.isnan(want) & ((gi ^ wi) == -0x8000))
    idx = diff.nonzero().flatten()[:4].tolist()
    assert not idx, (what, [(i, hex(int(gi[i]) & 0xFFFF), hex(int(wi[i]) & 0xFFFF)) for i in idx])


def _run_both(ps, gs, ms, vs, vms, bitsl, kw):
    cpu = [[t.clone() for t in L] for L in (ps, ms, vs)] + [None if vms is None else [t.clone() for t in vms]]
    ops.masked_adamw_(cpu[0], gs, cpu[1], cpu[2], bitsl, max_exp_avg_sqs=cpu[3], **kw)
    em = [[t.clone() for t in L] for L in (ps, ms, vs)] + [None if vms is None else [t.clone() for t in vms]]
    _emu_adamw().masked_adamw_(em[0], gs, em[1], em[2], bitsl, kw["masked_lr"], kw["unmasked_lr"], kw["beta1"],
                               kw["beta2"], kw["eps"], kw["weight_decay"], kw["bias_correction1"],
                               kw["bias_correction2_sqrt"], kw["maximize"], em[3])
    return cpu, em


def _kw(n, masked_lr, unmasked_lr, beta1=0.9, weight_decay=0.1, maximize=False):
    return dict(masked_lr=masked_lr, unmasked_lr=unmasked_lr, beta1=beta1, beta2=0.999, eps=1e-8,
                weight_decay=weight_decay, bias_correction1=[1 - beta1 ** (3 + i) for i in range(n)],
                bias_correction2_sqrt=[(1 - 0.999 ** (3 + i)) ** 0.5 for i in range(n)], maximize=maximize)


# ------------------------------------------------------------------ 1. masked_adamw_ half path vs emulated CUDA


SIZES = [7, 8, 9, 32768 + 13, 1, 40003]  # tails, one block, a second work item (mask byte 4096) after a tail


@pytest.mark.cuda_emu
@pytest.mark.parametrize("dt", HALF, ids=str)
@pytest.mark.parametrize("ams", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
def test_half_step_equals_emulated_cuda_kernel_over_many_tensors(dt, ams, maximize):
    for ci, (rates, beta1) in enumerate([((1e-3, 1e-4), 0.9), ((0.0, 0.05), 0.3), ((0.1, 0.0), 0.9),
                                         ((0.05, 0.0), 0.3)]):
        gen = torch.Generator().manual_seed(100 * ci + 10 * ams + maximize + (dt == torch.float16) * 1000)
        # the fifth tensor a view one element into its storage (unaligned loads)
        ps = [_specials(n, dt, gen) for n in SIZES]
        ps[4] = _specials(SIZES[4] + 1, dt, gen)[1:]
        gs = [_specials(n, dt, gen) for n in SIZES]
        ms = [_specials(n, dt, gen, scale=0.1) for n in SIZES]
        vs = [torch.where(torch.rand(n, generator=gen) < 0.15, _specials(n, dt, gen, frac=1.0),
                          (torch.rand(n, generator=gen) * 0.01).to(dt)) for n in SIZES]
        vms = None
        if ams:  # specials in the running maximum too (NaN propagates through torch.maximum)
            vms = [torch.where(torch.rand(n, generator=gen) < 0.15, _specials(n, dt, gen, frac=1.0),
                               (torch.rand(n, generator=gen) * 0.01).to(dt)) for n in SIZES]
        bitsl = [ops.pack_bitmask(torch.rand(n, generator=gen) < 0.5) if i % 3 != 1 else None
                 for i, n in enumerate(SIZES)]
        kw = _kw(len(SIZES), *rates, beta1=beta1, maximize=maximize)
        g_before = [g.clone() for g in gs]
        cpu, em = _run_both(ps, gs, ms, vs, vms, bitsl, kw)
        for name, a_, b_ in zip("pmvx", cpu, em):
            if a_ is None:
                continue
            for t, (a, b) in enumerate(zip(a_, b_)):
                _check_equal(a, b, dt, (ci, name, t))
        assert all(same(a, b) for a, b in zip(gs, g_before))


@pytest.mark.cuda_emu
@pytest.mark.parametrize("dt", HALF, ids=str)
def test_half_step_extremes_equal_emulated_cuda_kernel(dt):
    """All-subnormal halves; gradients at the dtype's maximum (g*g overflows float32 for bfloat16: v = inf, the
    update 0); a decay factor of exactly 0 (lr * weight_decay = 1) and no decay; AMSGrad."""
    fi = torch.finfo(dt)
    n = 8 * 37 + 5
    gen = torch.Generator().manual_seed(7 + (dt == torch.float16))
    sub_bits = torch.randint(1, 0x80 if dt == torch.bfloat16 else 0x400, (4, n), generator=gen, dtype=torch.int32)
    sign = torch.where(torch.rand(4, n, generator=gen) < 0.5, -0x8000, 0)
    sub = (sub_bits + sign).to(torch.int16).view(dt)  # every entry subnormal, both signs
    assert bool((sub.float().abs() < fi.tiny).all())
    big = (torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0) * fi.max).to(dt)
    mask = ops.pack_bitmask(torch.rand(n, generator=gen) < 0.5)
    cases = [  # (p, g, m, v, vmax, masked_lr, unmasked_lr, weight_decay)
        (sub[0], sub[1], sub[2], sub[3].abs(), None, 1e-3, 1e-4, 0.1),
        (sub[0], big, sub[2], sub[3].abs(), sub[1].abs(), 0.5, 1e-3, 2.0),  # masked decay factor exactly 0
        (big, big, big, torch.full((n,), fi.max, dtype=dt), None, 1e-2, 0.0, 0.0),
        (sub[1], sub[0], big, sub[2].abs(), torch.full((n,), float("inf"), dtype=dt), 1e-3, 1e-3, 0.0),
    ]
    for ci, (p, g, m, v, vm, mlr, ulr, wd) in enumerate(cases):
        kw = _kw(1, mlr, ulr, weight_decay=wd)
        cpu, em = _run_both([p], [g], [m], [v], None if vm is None else [vm], [mask], kw)
        for name, a_, b_ in zip("pmvx", cpu, em):
            if a_ is not None:
                assert same(a_[0], b_[0]), (ci, name)


@pytest.mark.cuda_emu
def test_masked_adamw_mixed_dtype_groups_equal_emulated_cuda_kernel():
    """MaskedAdamW with float32, bfloat16 and float16 parameters (one fused call per dtype group; a float16
    parameter that is a non-contiguous view, stepped on a copy and written back), AMSGrad, two steps: every
    parameter and state tensor the emulated CUDA kernel's bits, driven with the optimizer's rates and bias
    corrections."""
    gen = torch.Generator().manual_seed(44)
    shapes = {"a": ((13,), torch.float32), "b": ((3, 10923), torch.bfloat16), "c": ((41, 9), torch.float16),
              "d": ((32771,), torch.bfloat16), "e": ((977,), torch.float16)}
    params = {k: torch.nn.Parameter(torch.randn(s, generator=gen).to(dt)) for k, (s, dt) in shapes.items()}
    params["c"] = torch.nn.Parameter(torch.randn(9, 41, generator=gen).to(torch.float16).t())  # non-contiguous
    masks = {k: torch.rand(p.shape, generator=gen) < 0.3 for k, p in params.items() if k != "e"}
    opt = MaskedAdamW(params.items(), masks, masked_lr=1e-2, unmasked_lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                      weight_decay=0.05, amsgrad=True)
    ref = {k: p.detach().clone().contiguous() for k, p in params.items()}
    st = {k: [torch.zeros_like(ref[k]) for _ in range(3)] for k in params}
    for step in (1, 2):
        grads = {k: torch.randn(p.shape, generator=gen).to(p.dtype) for k, p in params.items()}
        for k, p in params.items():
            p.grad = grads[k]
        opt.step()
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            names = [k for k in params if params[k].dtype == dt]
            _emu_adamw().masked_adamw_(
                [ref[k] for k in names], [grads[k].contiguous() for k in names], [st[k][0] for k in names],
                [st[k][1] for k in names], [ops.pack_bitmask(masks[k]) if k in masks else None for k in names],
                1e-2, 1e-3, 0.9, 0.999, 1e-8, 0.05, [1 - 0.9 ** step] * len(names),
                [(1 - 0.999 ** step) ** 0.5] * len(names), False, [st[k][2] for k in names])
        for k, p in params.items():
            s = opt.state[p]
            for got, want in ((p.detach(), ref[k]), (s["exp_avg"], st[k][0]), (s["exp_avg_sq"], st[k][1]),
                              (s["max_exp_avg_sq"], st[k][2])):
                assert same(got.contiguous(), want), (step, k)


@pytest.mark.skipif(not F16C, reason="step_half_avx2 runs on AVX2 + F16C CPUs only")
@pytest.mark.xfail(strict=True, reason=(
    "csrc/cpu/adamw.cpp:187 (step_half_avx2 lane loop) vs its tail (:209 -> step_range :100): float16, "
    "v = +NaN (0x7E00), g = -NaN (0xFE00), m = 0, 9 entries: v*beta2 + w2*g*g keeps the sign of the operand "
    "the compiler put first, so the new exp_avg_sq is 0xFE00 at entries 0-7 (the 8-entry block) and 0x7E00 at "
    "entry 8 (the tail); the generic loop and the emulated CUDA kernel give 0x7E00 everywhere"))
def test_float16_nan_sign_does_not_depend_on_the_entrys_position():
    h = lambda b, n: torch.full((n,), b, dtype=torch.int16).view(torch.float16)  # noqa: E731
    n = 9
    p, g, m, v = h(0x3C00, n), h(-0x200, n), h(0, n), h(0x7E00, n)
    ops.masked_adamw_([p], [g], [m], [v], [None], **_kw(1, 1e-3, 1e-3, weight_decay=0.0))
    assert bool(torch.isnan(v).all())
    assert bits(v).tolist() == [0x7E00] * n, [hex(int(b) & 0xFFFF) for b in bits(v)]


# --------------------------------------------------------------------------- 2. block_norms' one-entry-block path


def _general(x, p):
    """The general block walk on the same values: a non-contiguous (transposed storage) copy of x."""
    if x.dim() == 1:
        t = torch.empty(x.shape[0], 2, dtype=x.dtype)[:, 0]
    else:
        t = torch.empty(x.shape[::-1], dtype=x.dtype).permute(*reversed(range(x.dim())))
        if t.is_contiguous():
            t = torch.empty(x.shape + (2,), dtype=x.dtype)[..., 0]
    t.copy_(x)
    assert not t.is_contiguous() or x.numel() <= 1
    return ops.block_norms(t, (1,) * x.dim(), p)


@pytest.mark.parametrize("dt", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_one_entry_blocks_random_bit_patterns_over_several_grains(dt):
    """Every bit pattern class (NaN payloads and signs, inf, subnormals, -0) over 257 x 301 entries (more than
    one 2**14-entry grain of the flat loop): the general walk's bits, out shape, dtype and strides."""
    gen = torch.Generator().manual_seed(5)
    w = torch.empty([], dtype=dt).element_size() * 8
    iv = {16: torch.int16, 32: torch.int32, 64: torch.int64}[w]
    lo, hi = (-2 ** 62, 2 ** 62) if w == 64 else (-2 ** (w - 1), 2 ** (w - 1))
    x = torch.randint(lo, hi, (257, 301), generator=gen, dtype=torch.int64).to(iv).view(dt)
    for p in (2.0, 0.5):
        got = ops.block_norms(x, (1, 1), p)
        want = _general(x, p)
        assert got.shape == want.shape == x.shape and got.dtype == dt and got.is_contiguous()
        assert same(got, want.contiguous())


@pytest.mark.parametrize("make", [
    lambda: torch.randn(11)[3:],                                  # storage offset
    lambda: torch.randn(4, 7)[2:3],                               # a row slice, offset 14
    lambda: torch.randn(4, 9).as_strided((4, 1), (1, 5)),         # size-1 dim of any stride: contiguous
    lambda: torch.randn(20).as_strided((3, 1, 5), (5, 99, 1), 2),
    lambda: torch.randn(2, 1, 3, 1, 2, 1, 2, 2),                  # 8 dims
    lambda: torch.randn(6).to(torch.bfloat16).unsqueeze(0),
], ids=["offset", "row", "size1-stride", "size1-stride-3d", "8d", "bf16-unsqueeze"])
def test_one_entry_blocks_of_contiguous_views(make):
    x = make()
    assert x.is_contiguous()
    x.view(-1)[0] = float("nan")
    got = ops.block_norms(x, (1,) * x.dim(), 3.0)
    want = _general(x, 3.0)
    assert got.shape == x.shape and got.dtype == x.dtype
    assert same(got, want.contiguous())
    fin = ~torch.isnan(x)
    assert torch.equal(got[fin], x.abs()[fin]) and bool(torch.isnan(got.view(-1)[0]))


@pytest.mark.parametrize("shape", [(0,), (0, 5), (3, 0, 2), (1, 0)])
@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16], ids=str)
def test_one_entry_blocks_zero_size(shape, dt):
    x = torch.empty(shape, dtype=dt)
    got = ops.block_norms(x, (1,) * len(shape), 2.0)
    assert got.shape == x.shape and got.dtype == dt
    assert torch.ops.gradkit.block_norms(x, [1] * len(shape), 2.0).shape == x.shape


def test_zero_dim_x_refused_naming_x():
    for call in (lambda: ops.block_norms(torch.tensor(2.0), (), 2.0),
                 lambda: torch.ops.gradkit.block_norms(torch.tensor(2.0), [], 2.0)):
        with pytest.raises(ValueError, match=r"x: expected 1 to \d+ dims, got 0"):
            call()


# --------------------------------------------------------------------------- 3. score_topk's screen gate


@contextlib.contextmanager
def _env_unset(name):
    old = os.environ.pop(name, None)
    try:
        yield
    finally:
        if old is not None:
            os.environ[name] = old


def test_conftest_forces_the_screen_for_the_suites_small_calls():
    """tests/conftest.py sets GRADKIT_SEARCH_SCREEN=1 unless the run set it: the tests that set
    GRADKIT_SEARCH_EXACT=1 then compare the exact path against the screened one (their calls are far below
    N = 1500 k, where the gate alone would run the exact path on both sides)."""
    assert os.environ.get("GRADKIT_SEARCH_SCREEN") == "1"


@pytest.mark.parametrize("N,k", [(3000, 2), (2999, 2), (3001, 2), (1500, 1), (40, 64), (200, 1)])
def test_screen_gate_keeps_the_bits(N, k):
    """At, just below and above N = 1500 k, and k > N (padding): the bits with the screen forced, left to the
    gate, and off; largest and smallest, bf16 and fp32 keys, D = 40 (past the screen's D >= 16)."""
    gen = torch.Generator().manual_seed(N + 7 * k)
    q = torch.randn(5, 40, generator=gen)
    for kdt in (torch.float32, torch.bfloat16):
        keys = torch.randn(N, 40, generator=gen).to(kdt)
        keys[N // 2] = keys[N // 3]  # a tie
        for largest in (True, False):
            outs = []
            for env in ("screen", "gate", "exact"):
                with contextlib.ExitStack() as es:
                    if env == "screen":
                        es.enter_context(env_set("GRADKIT_SEARCH_SCREEN", "1"))
                    else:
                        es.enter_context(_env_unset("GRADKIT_SEARCH_SCREEN"))
                    if env == "exact":
                        es.enter_context(env_set("GRADKIT_SEARCH_EXACT", "1"))
                    outs.append(ops.score_topk(q, keys, k, largest=largest))
            for s, i in outs[1:]:
                assert same(s, outs[0][0]) and torch.equal(i, outs[0][1]), (kdt, largest)
            assert outs[0][0].shape == (5, k)
            if k > N:
                assert bool((outs[0][1][:, N:] == -1).all())


def test_huge_k_fails_at_the_output_allocation_before_the_gate():
    """k = 2**62 (1500 k would overflow int64): the (Q, k) output cannot be sized, so the call raises before the
    gate is evaluated; with Q = 0 it returns the empty result without reaching it."""
    q, keys = torch.randn(2, 32), torch.randn(10, 32)
    with pytest.raises(RuntimeError, match="overflow"):
        ops.score_topk(q, keys, 2 ** 62)
    s, i = ops.score_topk(q[:0], keys, 2 ** 62)
    assert s.shape == (0, 2 ** 62) and i.shape == (0, 2 ** 62)
