"""Audit (session 40) of gradkit.projection: project / factored_project / projection_matrix / derive_seed /
the matrix cache, against a plain-PyTorch float64 computation (materialise G_b = sum_t g_bt [a_bt, 1]^T,
normalise it as bergson's AdafactorNormalizer / AdamNormalizer do, apply the documented L and R).

Odd shapes (p = 1, O or I = 1, T = 1, B = 1, p > min(O, I)), dtypes (fp16 / bf16 / fp64, mixed), strided and
zero-stride inputs and normalisers, the Adam memory budget, seeds across cache eviction, two threads, and the
"refused before any work" contract. Two defects found here are fixed in projection.py (see the tests named
``*_fixed_*``)."""
import hashlib
import itertools
import random
import threading

import numpy as np
import pytest
import torch

from gradkit import projection as P

from _factored_ref import factored_ref  # noqa: E402  (tests/_factored_ref.py)


_ref = factored_ref


def _close(got, want, tol=1e-4):
    assert got.dtype == torch.float32, got.dtype
    assert got.shape == want.shape, (got.shape, want.shape)
    if want.numel():
        scale = 1.0 + want.abs().max().item()
        err = (got.double() - want).abs().max().item()
        assert err <= tol * scale, (err, scale)


def _norms(O, I, gen):
    return {
        "none": None,
        "adam": P.AdamNormalizer(torch.rand(O, I, generator=gen) + 0.1, torch.rand(O, generator=gen) + 0.1),
        "adam_nobias": P.AdamNormalizer(torch.rand(O, I, generator=gen)),
        "adam_zero": P.AdamNormalizer(torch.zeros(O, I), torch.zeros(O)),
        "adafactor": P.AdafactorNormalizer(torch.rand(O, generator=gen) + 0.1, torch.rand(I, generator=gen) + 0.1,
                                           torch.rand(O, generator=gen)),
        "adafactor_nobias": P.AdafactorNormalizer(torch.rand(O, generator=gen), torch.rand(I, generator=gen)),
        "adafactor_zero": P.AdafactorNormalizer(torch.zeros(O), torch.zeros(I), torch.zeros(O)),
    }


# =========================================================================== factored_project: values


@pytest.mark.parametrize("B,T,I,O,p", [(1, 1, 1, 1, 1), (1, 1, 5, 1, 3), (2, 1, 1, 6, 4), (2, 3, 4, 5, 9),
                                       (3, 2, 7, 3, 1), (1, 5, 2, 2, 8)])
def test_factored_odd_shapes_every_path(B, T, I, O, p):
    gen = torch.Generator().manual_seed(B * 1000 + T * 100 + I * 10 + O + p)
    a, g = torch.randn(B, T, I, generator=gen), torch.randn(B, T, O, generator=gen)
    mask = torch.rand(B, T, generator=gen) > 0.4
    for (nk, nz), bias, pt, m in itertools.product(_norms(O, I, gen).items(), (False, True), (False, True),
                                                   (None, mask)):
        kind = "gaussian" if (bias ^ pt) else "rademacher"
        got = P.factored_project(a, g, p, seed=3, name="x", kind=kind, mask=m, bias=bias, per_token=pt, normalizer=nz)
        _close(got, _ref(a, g, p, 3, "x", kind, m, bias, pt, nz))
    # 2-D inputs: T = 1 (per_token gives (B, 1, p*p)); a (B,) mask
    a2, g2, m1 = a[:, 0], g[:, 0], mask[:, 0]
    for bias, pt in itertools.product((False, True), (False, True)):
        got = P.factored_project(a2, g2, p, bias=bias, per_token=pt, mask=m1)
        _close(got, _ref(a2[:, None], g2[:, None], p, mask=m1[:, None], bias=bias, per_token=pt))


def test_adam_tiny_budget_equals_large_budget():
    """A budget forcing blocks of one example x one row x one column gives the large budget's answer."""
    gen = torch.Generator().manual_seed(40)
    B, T, I, O, p = 3, 4, 6, 5, 4
    a, g = torch.randn(B, T, I, generator=gen), torch.randn(B, T, O, generator=gen)
    mask = torch.tensor([True, False, True, True]).expand(B, T)  # expanded (zero-stride) mask
    nz = P.AdamNormalizer(torch.rand(O, I, generator=gen) + 0.05, torch.rand(O, generator=gen) + 0.05)
    for bias, pt, m in itertools.product((False, True), (False, True), (None, mask)):
        want = _ref(a, g, p, 2, "adam", mask=m, bias=bias, per_token=pt, norm=nz)
        big = P.factored_project(a, g, p, seed=2, name="adam", mask=m, bias=bias, per_token=pt, normalizer=nz)
        _close(big, want)
        for budget in (4 * (p + 2), 4 * (p + 2) + 4, 4 * (2 * I + p), 4 * (O * (2 * I + p)) + 4):
            got = P.factored_project(a, g, p, seed=2, name="adam", mask=m, bias=bias, per_token=pt, normalizer=nz,
                                     memory_budget=budget)
            torch.testing.assert_close(got, big, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"^memory_budget: .* at least 24 bytes"):
        P.factored_project(a, g, p, normalizer=nz, memory_budget=4 * (p + 2) - 1)


def test_adam_plan_fits_the_budget():
    """Every block the plan gives keeps D + G + Z (and the bias step's temporaries) within the budget."""
    rnd = random.Random(0)
    for _ in range(3000):
        n, O, I, p = rnd.randint(1, 40), rnd.randint(1, 40), rnd.randint(1, 40), rnd.randint(1, 40)
        dw = rnd.choice([1, 3, 5])
        budget = rnd.randint(4 * (dw + 1 + p), 4 * (dw + 1 + p) * rnd.randint(1, 300))
        c, o, i = P._adam_plan(n, O, I, p, budget, dw)
        words = budget // 4
        assert 1 <= c <= n and 1 <= o <= O and 1 <= i <= I
        assert dw * o * i + c * o * (i + p) <= words
        assert dw * o + c * o + c * p <= words
        assert i == I or o == 1  # columns split only when one row does not fit


def test_strided_and_low_precision_normalisers():
    gen = torch.Generator().manual_seed(41)
    B, T, I, O, p = 3, 4, 5, 6, 4
    a, g = torch.randn(B, T, I, generator=gen), torch.randn(B, T, O, generator=gen)
    mask = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 1], [1, 1, 1, 1]], dtype=torch.bool)
    norms = [P.AdamNormalizer(torch.rand(1, I, generator=gen).expand(O, I), torch.tensor(0.3).expand(O)),
             P.AdamNormalizer(torch.rand(I, O, generator=gen).T, torch.rand(2 * O, generator=gen)[::2]),
             P.AdamNormalizer(torch.rand(O, I, generator=gen).half(), torch.rand(O, generator=gen).bfloat16()),
             P.AdafactorNormalizer(torch.tensor(0.5).expand(O), torch.rand(2 * I, generator=gen)[::2],
                                   torch.tensor(2.0).expand(O)),
             P.AdafactorNormalizer(torch.rand(O, generator=gen).half(), torch.rand(I, generator=gen).bfloat16(),
                                   torch.rand(O, generator=gen, dtype=torch.float64))]
    for nz, bias, pt in itertools.product(norms, (False, True), (False, True)):
        for budget in (4 * (p + 2), 256 << 20):
            got = P.factored_project(a, g, p, seed=1, name="n", mask=mask, bias=bias, per_token=pt, normalizer=nz,
                                     memory_budget=budget)
            _close(got, _ref(a, g, p, 1, "n", mask=mask, bias=bias, per_token=pt, norm=nz))


def test_mixed_input_dtypes_every_path():
    gen = torch.Generator().manual_seed(42)
    B, T, I, O, p = 2, 3, 5, 4, 3
    a, g = torch.randn(B, T, I, generator=gen), torch.randn(B, T, O, generator=gen)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    dts = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    norms = (None, P.AdamNormalizer(torch.rand(O, I, generator=gen) + 0.5),
             P.AdafactorNormalizer(torch.rand(O, generator=gen) + .5, torch.rand(I, generator=gen) + .5))
    for da, dg in itertools.product(dts, repeat=2):
        for nz, pt in itertools.product(norms, (False, True)):
            aa, gg = a.to(da), g.to(dg)
            got = P.factored_project(aa, gg, p, mask=mask, bias=True, per_token=pt, normalizer=nz)
            _close(got, _ref(aa, gg, p, mask=mask, bias=True, per_token=pt, norm=nz))


@pytest.mark.parametrize("da,dg", [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
                                   (torch.float64, torch.float64), (torch.float16, torch.float32),
                                   (torch.float64, torch.float32)])
def test_gradients_keep_each_input_dtype(da, dg):
    gen = torch.Generator().manual_seed(43)
    B, T, I, O, p = 2, 3, 5, 4, 3
    a0, g0 = torch.randn(B, T, I, generator=gen), torch.randn(B, T, O, generator=gen)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    for nz in (None, P.AdamNormalizer(torch.rand(O, I, generator=gen) + .5),
               P.AdafactorNormalizer(torch.rand(O, generator=gen) + .5, torch.rand(I, generator=gen) + .5,
                                     torch.rand(O, generator=gen) + .5)):
        for bias, pt in itertools.product((False, True), (False, True)):
            a, g = a0.clone().to(da).requires_grad_(), g0.clone().to(dg).requires_grad_()
            res = P.factored_project(a, g, p, mask=mask, bias=bias, per_token=pt, normalizer=nz)
            w = torch.randn(res.shape, generator=gen)
            (res * w).sum().backward()
            ad = a0.clone().to(da).double().requires_grad_()
            gd = g0.clone().to(dg).double().requires_grad_()
            (_ref(ad, gd, p, mask=mask, bias=bias, per_token=pt, norm=nz) * w.double()).sum().backward()
            for x, xr in ((a, ad), (g, gd)):
                assert x.grad.dtype == x.dtype and x.grad.shape == x.shape
                tol = 1e-4 if x.dtype in (torch.float32, torch.float64) else 2e-2
                torch.testing.assert_close(x.grad.double(), xr.grad, rtol=tol, atol=tol * (1 + xr.grad.abs().max()))


def test_fixed_float64_inputs_beyond_float32_range_factored():
    """DEFECT (fixed): float64 a / g were cast to float32 before projecting: a = 1e39, g = 1e-39 (G = 1 per token)
    gave NaN everywhere. Now float64 inputs are projected in float64 and rounded once (except with Adam)."""
    d = torch.float64
    a = torch.full((2, 3, 5), 1e39, dtype=d)
    g = torch.full((2, 3, 4), 1e-39, dtype=d)
    g[0, 1] = -3e-39
    mask = torch.tensor([[True, True, False], [True, False, True]])
    nzs = (None, P.AdafactorNormalizer(torch.ones(4), torch.ones(5), torch.ones(4)),
           P.AdafactorNormalizer(torch.ones(4), torch.ones(5)))
    for nz, bias, pt, m in itertools.product(nzs, (False, True), (False, True), (None, mask)):
        got = P.factored_project(a, g, 3, seed=5, bias=bias, per_token=pt, normalizer=nz, mask=m)
        want = _ref(a, g, 3, 5, mask=m, bias=bias, per_token=pt, norm=nz)
        assert torch.isfinite(got).all()
        _close(got, want, tol=1e-5)
    # tiny values: 1e-44 is a float32 subnormal (9.8e-45 there: 2% off), times 1e38 gives G = 1e-6
    a, g = torch.full((1, 2, 3), 1e-44, dtype=d), torch.full((1, 2, 2), 1e38, dtype=d)
    _close(P.factored_project(a, g, 2) * 1e6, _ref(a, g, 2) * 1e6, tol=1e-5)
    # mixed: only one side float64 (past float32's range) is enough to take the float64 path
    a64 = torch.full((1, 1, 3), 1e40, dtype=d)  # odd sizes: L 1 and R 1 have no zero entry
    g32 = torch.full((1, 1, 3), 1e-20)
    got = P.factored_project(a64, g32, 2)
    _close(got, _ref(a64, g32, 2), tol=1e-5)
    assert got.abs().max() > 1e19


def test_adam_float64_is_rounded_to_float32_first_as_documented():
    """With AdamNormalizer the blocks are float32 (the budget counts float32 words): documented, in range it
    matches the float64 reference."""
    assert "AdamNormalizer" in P.factored_project.__doc__ and "float64" in P.factored_project.__doc__
    gen = torch.Generator().manual_seed(44)
    a = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)
    g = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64)
    nz = P.AdamNormalizer(torch.rand(5, 4, generator=gen, dtype=torch.float64) + .1)
    _close(P.factored_project(a, g, 3, normalizer=nz, bias=True), _ref(a, g, 3, norm=nz, bias=True))


def test_zero_stride_and_transposed_inputs_on_the_wide_path():
    d = torch.float64
    gen = torch.Generator().manual_seed(45)
    B, T, I, O, p = 3, 4, 6, 5, 7
    a = torch.randn(B, I, T, generator=gen, dtype=d).transpose(1, 2)
    g = torch.randn(1, 1, O, generator=gen, dtype=d).expand(B, T, O)
    m = torch.tensor([True, True, False, True]).expand(B, T)
    for bias, pt in itertools.product((False, True), (False, True)):
        _close(P.factored_project(a, g, p, bias=bias, per_token=pt, mask=m),
               _ref(a, g, p, mask=m, bias=bias, per_token=pt), tol=1e-6)


# =========================================================================== project


def test_fixed_float64_stream_with_an_empty_chunk():
    """DEFECT (fixed): a float64 column chunk with no columns in a stream raised IndexError from aminmax (a float32
    one was fine): project([ones(2, 3, float64), zeros(2, 0, float64)], 3)."""
    d = torch.float64
    x = torch.randn(2, 7, dtype=d, generator=torch.Generator().manual_seed(46))
    want = x @ P.projection_matrix(3, 7, seed=4, dtype=d).T
    for pieces in ([x[:, :3], x[:, 3:3], x[:, 3:]], [x[:, :0], x], [x, x[:, 7:]]):
        _close(P.project(pieces, 3, seed=4), want, tol=1e-6)
        _close(P.project(lambda: iter(pieces), 3, seed=4), want, tol=1e-6)
        _close(P.project([np.asarray(t) for t in pieces], 3, seed=4), want, tol=1e-6)
    assert not P.project([torch.zeros(2, 0, dtype=d)], 3).any()
    assert P.project([torch.zeros(0, 0, dtype=d)], 3).shape == (0, 3)


@pytest.mark.parametrize("dt", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_project_inputs_forms_agree(dt):
    gen = torch.Generator().manual_seed(47)
    for B, D, k in [(1, 2, 1), (1, 7, 1), (3, 2, 5), (2, 130, 70)]:
        x = torch.randn(B, D, generator=gen).to(dt)
        want = x.double() @ P.projection_matrix(k, D, 5, "gaussian", dtype=torch.float64).T
        steps = (1, 3) if D < 10 else (40,)  # few chunks: each float64 one costs a reduction
        outs = [P.project(x, k, 5, "gaussian")] + [P.project(x, k, 5, "gaussian", chunk=c) for c in steps] + [
                P.project([x[:, :1], x[:, 1:]], k, 5, "gaussian"),
                P.project(lambda: iter([x[:, :D // 2], x[:, D // 2:]]), k, 5, "gaussian"),
                P.project(x.T.contiguous().T, k, 5, "gaussian")]
        if dt != torch.bfloat16:
            outs += [P.project(x.numpy(), k, 5, "gaussian"),
                     P.project(np.asfortranarray(x.numpy()), k, 5, "gaussian", chunk=steps[-1] - 1)]
        for o in outs:
            _close(o, want, tol=1e-5)
        xe = x[:1].expand(B, D)
        _close(P.project(xe, k, 5, "gaussian"), xe.double() @ P.projection_matrix(k, D, 5, "gaussian",
                                                                                   dtype=torch.float64).T, tol=1e-5)


def test_project_out_untouched_when_a_stream_fails_midway():
    out = torch.full((2, 3), 7.0)

    def stream():
        yield torch.randn(2, 4)
        yield torch.randn(3, 4)  # wrong row count

    with pytest.raises(ValueError, match=r"^x chunk at column 4: 3 rows, expected 2"):
        P.project(stream, 3, out=out)
    assert (out == 7).all()

    def stream2():
        yield torch.randn(2, 4)
        yield torch.randn(2, 4).to(torch.int32)

    with pytest.raises(TypeError, match=r"^x chunk: expected float32"):
        P.project(stream2, 3, out=out)
    assert (out == 7).all()
    with pytest.raises(ValueError, match=r"^out: expected shape \(2, 3\)"):
        P.project([torch.randn(2, 4)], 3, out=torch.zeros(5, 3))


# =========================================================================== seeds, cache, threads, validation


def test_derive_seed_is_the_documented_blake2b():
    for seed, name, side in [(0, "", ""), (-5, "layer.0/attn", "left"), (2 ** 80, "\u00e9", "right")]:
        msg = f"gradkit.projection/{seed}/{len(name)}:{name}/{side}".encode()
        want = int.from_bytes(hashlib.blake2b(msg, digest_size=8).digest(), "little") & ((1 << 63) - 1)
        assert P.derive_seed(seed, name, side) == want
    assert P.derive_seed(np.int64(7), "m", "left") == P.derive_seed(7, "m", "left")
    assert P.derive_seed(1, "a/b", "") != P.derive_seed(1, "a", "b/")


def test_results_survive_cache_eviction_and_size_changes(monkeypatch):
    gen = torch.Generator().manual_seed(48)
    a, g = torch.randn(2, 3, 9, generator=gen), torch.randn(2, 3, 7, generator=gen)
    P.clear_matrix_cache()
    first = P.factored_project(a, g, 5, seed=11, name="m", bias=True)
    _close(first, _ref(a, g, 5, 11, "m", bias=True))
    monkeypatch.setattr(P, "MATRIX_CACHE_BYTES", 1)  # every insertion evicts the others
    for s in range(5):
        P.factored_project(a, g, 5, seed=s, name="other")
    assert len(P._MATRICES) == 1
    assert torch.equal(P.factored_project(a, g, 5, seed=11, name="m", bias=True), first)
    P.clear_matrix_cache()
    assert torch.equal(P.factored_project(a, g, 5, seed=11, name="m", bias=True), first)
    P.clear_matrix_cache()


def test_two_threads_different_shapes_with_concurrent_clears():
    gen = torch.Generator().manual_seed(49)
    cases = []
    for t in range(2):
        B, T, I, O, p = 2 + t, 3, 4 + 5 * t, 6 - t, 3 + 4 * t
        a, g = torch.randn(B, T, I, generator=gen), torch.randn(B, T, O, generator=gen)
        cases.append((a, g, p, t))
    want = [P.factored_project(a, g, p, seed=t, name=f"t{t}", bias=bool(t)) for a, g, p, t in cases]
    flat_x = [torch.randn(3, 50 + 30 * t, generator=gen) for t in range(2)]
    flat_want = [P.project(x, 9 + t, seed=t) for t, x in enumerate(flat_x)]
    errors = []
    stop = threading.Event()

    def worker(t):
        a, g, p, _ = cases[t]
        try:
            for _ in range(60):
                if not torch.equal(P.factored_project(a, g, p, seed=t, name=f"t{t}", bias=bool(t)), want[t]):
                    errors.append(("factored", t))
                if not torch.equal(P.project(flat_x[t], 9 + t, seed=t), flat_want[t]):
                    errors.append(("flat", t))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(repr(e))

    def clearer():
        while not stop.is_set():
            P.clear_matrix_cache()

    th = [threading.Thread(target=worker, args=(t,)) for t in range(2)]
    cl = threading.Thread(target=clearer)
    cl.start()
    for t in th:
        t.start()
    for t in th:
        t.join()
    stop.set()
    cl.join()
    assert errors == []
    assert P._MATRICES.nbytes == sum(t.numel() * 4 for t in P._MATRICES._table.values())


def test_bad_input_refused_before_any_matrix_is_made():
    a, g = torch.randn(2, 3, 5), torch.randn(2, 3, 4)
    cases = [
        (dict(mask=torch.ones(2, 3, dtype=torch.uint8)), ValueError, r"^mask: expected a bool tensor of shape \(2, 3\)"),
        (dict(mask=torch.ones(3, 2, dtype=torch.bool)), ValueError, r"^mask:"),
        (dict(normalizer=P.AdamNormalizer(torch.ones(5, 4))), ValueError, r"^normalizer: v must have shape \(4, 5\)"),
        (dict(normalizer=P.AdafactorNormalizer(torch.ones(5), torch.ones(4))), ValueError, r"^normalizer: row/col"),
        (dict(bias=True, normalizer=P.AdamNormalizer(torch.ones(4, 5), torch.ones(5))), ValueError,
         r"^normalizer: bias_avg_sq must have 4"),
        (dict(normalizer=P.AdamNormalizer(torch.ones(4, 5)), memory_budget=8), ValueError, r"^memory_budget:"),
        (dict(memory_budget=0), ValueError, r"^memory_budget:"),
        (dict(memory_budget=True), TypeError, r"^memory_budget:"),
        (dict(per_token=1), TypeError, r"^per_token:"),
        (dict(kind="normal"), ValueError, r"^kind:"),
        (dict(name=3), TypeError, r"^name:"),
        (dict(normalizer=(1, 2)), TypeError, r"^normalizer:"),
    ]
    for kw, exc, msg in cases:
        P.clear_matrix_cache()
        with pytest.raises(exc, match=msg):
            P.factored_project(a, g, 3, **kw)
        assert len(P._MATRICES) == 0, kw
    for bad_a, bad_g, msg in [(a.int(), g, r"^a:"), (a, g.to(torch.complex64), r"^g:"), (a[0, 0], g, r"^a:"),
                              (a, g[:1], r"^g:"), (a, g[:, :2], r"^g:")]:
        with pytest.raises((TypeError, ValueError), match=msg):
            P.factored_project(bad_a, bad_g, 3)
        assert len(P._MATRICES) == 0
    for bad in (0, -1, 2 ** 63, 1.0, True):
        with pytest.raises((TypeError, ValueError), match=r"^p:"):
            P.factored_project(a, g, bad)
    # normalisers: negative / NaN / inf second moments, or a bad eps, refused at construction, naming the field
    for field, ctor in [("row", lambda b: P.AdafactorNormalizer(torch.tensor([1.0, b]), torch.ones(2))),
                        ("col", lambda b: P.AdafactorNormalizer(torch.ones(2), torch.tensor([b, 1.0]))),
                        ("bias_avg_sq", lambda b: P.AdafactorNormalizer(torch.ones(2), torch.ones(2),
                                                                        torch.tensor([b, 1.0]))),
                        ("v", lambda b: P.AdamNormalizer(torch.tensor([[1.0, b]]))),
                        ("bias_avg_sq", lambda b: P.AdamNormalizer(torch.ones(1, 2), torch.tensor([b])))]:
        for b in (-1e-3, float("nan"), float("inf")):
            with pytest.raises(ValueError, match=rf"^{field}: second-moment"):
                ctor(b)
    for eps in (0, -1.0, float("nan"), True, "1e-8"):
        with pytest.raises(ValueError, match=r"^eps:"):
            P.AdamNormalizer(torch.ones(1, 2), eps=eps)
