"""Audit (s43): a dtype / memory-layout matrix over gradkit's parameter-selection side (gradkit.golden,
gradkit.golden_reverse, gradkit.ParamMap, gradkit.scope, gradkit.optim.MaskedAdamW, gradkit.compat.*).

Each entry point is driven with float16 / bfloat16 / float32 / float64 inputs, refused dtypes (integer, bool, complex,
float8 where the kernels take none), non-contiguous layouts (transposes, slices with a step, stride-0 expansions,
storage offsets, channels_last conv weights), zero-size and size-1 tensors, tensors sharing storage, inference-mode
and requires_grad tensors. Oracles: the plain-PyTorch references in ``gradkit/kernels/reference/`` or a direct torch
computation, bitwise where the documented semantics make the result exact (selections, gathers, scatters, half
precision AdamW against the reference), to a stated number of ulps otherwise. Every read-only call is checked not to
modify the user's tensors (clone before, compare after, bit for bit).

Tests marked ``# DEFECT (fixed):`` failed before this session's fixes; ``xfail(strict=True)`` ones name a defect left
in a file this audit does not own."""
from __future__ import annotations

import math
import warnings
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings, strategies as st

import gradkit.golden as G
from gradkit import ParamMap, ops
from gradkit import golden_reverse as gr
from gradkit.compat import sparsekit as sk
from gradkit.kernels.reference import adamw as RA
from gradkit.kernels.reference import parammap as RP
from gradkit.kernels.reference import scope as RS
from gradkit.optim import MaskedAdamW
from gradkit.scope import BlockCoupling, BlockSpec, ScopeSpec

pytestmark = pytest.mark.usefixtures("one_thread_module")  # conftest.py

FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
BAD = [torch.int32, torch.int64, torch.bool, torch.complex64, torch.uint8]
from _bits import bits, same  # noqa: E402  (tests/_bits.py)


def snap(d):
    return {n: t.detach().clone() for n, t in d.items()}


def unchanged(d, before) -> bool:
    return all(same(d[n], before[n]) for n in before)


def ints(shape, dtype, seed, lo=-3, hi=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi + 1, shape, generator=g).to(dtype)


def layouts(dtype, seed=0):
    """Same-valued gradients in every memory layout the selection side must read as their logical (row-major)
    values: {name: tensor}. Small integers: many ties at every cut-off."""
    s = seed
    return {
        "cl": ints((2, 3, 4, 5), dtype, s).contiguous(memory_format=torch.channels_last),
        "T": ints((7, 6), dtype, s + 1).t(),
        "step": ints((9, 12), dtype, s + 2)[::2, 1::3],
        "off": ints((50,), dtype, s + 3)[7:27].view(4, 5),
        "exp": ints((1, 5), dtype, s + 4).expand(4, 5),
        "zero_stride": torch.tensor(2.0, dtype=dtype).expand(3, 4),
        "size1": torch.tensor([[3.0]], dtype=dtype),
        "scalar": torch.tensor(-1.5, dtype=dtype),
        "empty": torch.empty(5, 0, dtype=dtype).t(),
    }


def plain_top(g: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest |g| in row-major order, ties lowest position first (stable sort), NaN never; g's shape."""
    a = g.detach().double().abs().reshape(-1)
    a = torch.where(torch.isnan(a), torch.full_like(a, -1.0), a)
    m = torch.zeros(a.numel(), dtype=torch.bool)
    m[torch.sort(a, descending=True, stable=True).indices[:k]] = True
    return (m & (a >= 0)).reshape(g.shape)


def ref_k(numel: int, percent) -> int:
    return 0 if numel == 0 else max(1, min(numel, math.ceil(numel * Fraction(str(percent)) / 100)))


# ============================================================================ refused dtypes, named, before any work


def _refusal_cases():
    """(id, make(bad dtype) -> (call, tensors the call must leave untouched), exception, message regex)."""
    def topk(dt):
        t = torch.ones(4, 3).to(dt)
        return lambda: G.topk_mask(t, 50), {"t": t}

    def golden(scope, sample):
        def make(dt):
            ok = {"w": torch.randn(4, 3), "v": torch.randn(5).half()}
            bad = {"w": torch.ones(4, 3).to(dt), "v": torch.randn(5).half()}
            samples = [bad] if sample == 0 else [ok, bad]
            return lambda: G.golden_masks(samples, 50, scope=scope), {**ok, "bw": bad["w"]}
        return make

    def acc_add(dt):
        acc = G.SparseGradientAccumulator({"a": torch.ones(3, dtype=torch.bool), "w": torch.ones(4, 3, dtype=torch.bool)})

        def call():
            try:
                acc.add({"a": torch.ones(3), "w": torch.ones(4, 3).to(dt)})
            finally:  # nothing accumulated, not even the good gradient listed first
                assert acc.steps == 0 and not acc._flat.any()
        return call, {}

    def acc_dtype(dt):
        return lambda: G.SparseGradientAccumulator({"w": torch.ones(3, dtype=torch.bool)}, dtype=dt), {}

    def pm_gather(dt):
        src = {"a": torch.randn(4), "w": torch.ones(4, 3).to(dt)}
        pm = ParamMap({"a": {"shape": (4,), "repr": "all"}, "w": {"shape": (4, 3), "repr": "all"}})
        out = torch.zeros(16)
        return lambda: pm.gather(src, out=out), {**src, "out": out}

    def pm_gather_dtype(dt):
        src = {"w": torch.randn(4, 3)}
        return lambda: ParamMap({"w": {"shape": (4, 3), "repr": "all"}}).gather(src, dtype=dt), src

    def pm_scatter_flat(dt):
        dst = {"w": torch.randn(4, 3)}
        flat = torch.ones(12).to(dt)
        return lambda: ParamMap({"w": {"shape": (4, 3), "repr": "all"}}).scatter(flat, out=dst, mode="add"), \
            {**dst, "flat": flat}

    def pm_scatter_out(dt):
        dst = {"a": torch.randn(4), "w": torch.ones(4, 3).to(dt)}
        pm = ParamMap({"a": {"shape": (4,), "repr": "all"}, "w": {"shape": (4, 3), "repr": "all"}})
        return lambda: pm.scatter(torch.ones(16), out=dst), dst  # "a" is not written before "w" is refused

    def adamw_param(dt):
        return lambda: MaskedAdamW({"p": torch.zeros(3).to(dt)}, None, 1e-3, 1e-3), {}

    def scope_call(method):
        def make(dt):
            w = torch.ones(4, 8).to(dt)
            s = ScopeSpec(BlockSpec(w, (1, 2)), (1, 4))
            calls = {"get_masks": lambda: s.get_masks(2), "block_norms": lambda: s.block_norms(),
                     "kth_largest": lambda: s.kth_largest(nnz=1), "hard_threshold": lambda: s.hard_threshold(nnz=1),
                     "soft_threshold": lambda: s.soft_threshold(torch.full((4, 1), 0.1)),
                     "keep_blocks": lambda: s.block.keep_blocks(torch.ones(4, 4, dtype=torch.bool)),
                     "BlockSpec.hard_threshold": lambda: s.block.hard_threshold(torch.ones(4, 4), values=torch.ones(4, 8))}
            return calls[method], {"w": w}
        return make

    def scope_values(dt):
        w = torch.randn(4, 8)
        v = torch.ones(4, 8).to(dt)
        s = ScopeSpec(BlockSpec(w, (1, 2)), (1, 4))
        return lambda: s.hard_threshold(nnz=1, values=v), {"w": w, "v": v}

    def sk_kth(dt):
        x = torch.ones(3, 4).to(dt)
        return lambda: sk.kth_largest(x, 1, dim=1), {"x": x}

    def zeroed(dt):
        m = torch.nn.Linear(3, 2)
        w = m.weight.detach().clone()

        def call():
            with gr.zeroed_params(m, {"weight": torch.ones(2, 3).to(dt)}):
                pass
        return call, {"w": w, "weight": m.weight}

    yield "topk_mask", topk, TypeError, r"^t: expected a floating tensor"
    for scope in ("tensor", "global"):
        for sample in (0, 1):
            yield f"golden_masks-{scope}-sample{sample}", golden(scope, sample), TypeError, \
                rf"^grad_iter: sample {sample}, 'w': expected a floating tensor"
    yield "accumulator.add", acc_add, TypeError, r"^grads\['w'\]: expected a dense floating tensor"
    yield "accumulator(dtype=)", acc_dtype, TypeError, r"^dtype: expected float16, bfloat16, float32 or float64"
    yield "ParamMap.gather", pm_gather, TypeError, r"^source\['w'\]: expected float32/float64/float16/bfloat16"
    yield "ParamMap.gather(dtype=)", pm_gather_dtype, TypeError, r"^dtype: expected float32/float64/float16/bfloat16"
    yield "ParamMap.scatter(flat)", pm_scatter_flat, TypeError, r"^flat: expected float32/float64/float16/bfloat16"
    yield "ParamMap.scatter(out=)", pm_scatter_out, TypeError, r"^out\['w'\]: expected float32/float64/float16/bfloat16"
    yield "MaskedAdamW(param)", adamw_param, TypeError, r"^named_params\['p'\]: expected a float32/float64/float16/bfloat16"
    for method in ("get_masks", "block_norms", "kth_largest", "hard_threshold", "soft_threshold", "keep_blocks",
                   "BlockSpec.hard_threshold"):
        yield f"scope.{method}", scope_call(method), TypeError, r"^BlockSpec weights: expected a floating tensor"
    yield "scope(values=)", scope_values, TypeError, r"^values: expected a floating tensor"
    yield "zeroed_params(mask)", zeroed, ValueError, r"^masks: 'weight' needs a bool tensor"


_CASES = list(_refusal_cases())
_WIDENED = ("golden_masks", "topk_mask", "accumulator.add")  # float8 gradients: widened to float32 (documented)
_PAIRS = [(c, dt) for c in _CASES for dt in BAD + [torch.float8_e4m3fn]
          if not (dt == torch.float8_e4m3fn and c[0].startswith(_WIDENED))
          and not (dt == torch.bool and c[0] == "zeroed_params(mask)")]  # a bool mask is the valid input there


@pytest.mark.parametrize("case,dtype", _PAIRS, ids=[f"{c[0]}-{str(dt)[6:]}" for c, dt in _PAIRS])
def test_refused_dtypes_are_named_before_any_work(case, dtype):
    name, make, exc, msg = case
    call, keep = make(dtype)
    before = snap(keep)
    with pytest.raises(exc, match=msg):
        call()
    assert unchanged(keep, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64, torch.complex64, torch.float16, torch.int32], ids=str)
def test_masked_adamw_refuses_non_bool_masks_by_name(dtype):
    p = torch.nn.Parameter(torch.zeros(3, 4))
    with pytest.raises(TypeError, match=r"^masks\['p'\]: expected a bool tensor of shape \(3, 4\) or a packed uint8"):
        MaskedAdamW({"p": p}, {"p": torch.ones(3, 4).to(dtype)}, 1e-3, 1e-3)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.complex64, torch.float32], ids=str)
def test_bitmask_and_maskset_refuse_non_bool_dense_masks(dtype):
    m = torch.ones(4, 3).to(dtype)
    with pytest.raises(TypeError, match=r"^mask: expected a bool tensor"):
        G.Bitmask.from_bool(m)
    with pytest.raises(TypeError, match=r"^masks\['w'\]: expected a bool tensor, a Bitmask"):
        G.MaskSet({"w": m})


def test_prune_importance_bool_and_complex_refused_integers_taken():
    pm = ParamMap({"w": {"shape": (4, 3), "repr": "all"}})
    for dt in (torch.bool, torch.complex64):
        with pytest.raises(TypeError, match=r"^importance: expected a floating or integer dtype"):
            pm.prune(topk=3, importance=torch.arange(12).to(dt))
    for dt in (torch.uint8, torch.int32, torch.int64, torch.float16, torch.bfloat16):
        assert pm.prune(topk=3, importance=torch.arange(12).to(dt))[1].tolist() == [9, 10, 11]


def test_compat_kth_refuses_bool_and_complex_by_name():
    for dt in (torch.bool, torch.complex64):
        with pytest.raises(TypeError, match=r"^x: expected a floating tensor"):
            sk.kth_largest(torch.ones(3, 4).to(dt), 1, dim=1)


def test_from_model_integer_mask_errors_name_the_mask_fixed():
    # DEFECT (fixed): parammap.py from_model passed an integer mask on as spec[n]['indices'], so a 2-D, out-of-range
    # or repeated index tensor was refused naming spec['weight']['indices'], an argument the caller never passed
    m = torch.nn.Linear(3, 4)
    for bad, exc, msg in ((torch.ones(4, 3, dtype=torch.int32), ValueError, r"^masks\['weight'\]: expected a 1-D tensor"),
                          (torch.tensor([0, 12]), ValueError, r"^masks\['weight'\]: positions must lie in \[0, 12\)"),
                          (torch.tensor([3, 1, 3]), ValueError,
                           r"^masks\['weight'\]: position 3 is selected more than once"),
                          (torch.ones(4, 3), TypeError, r"^masks\['weight'\]: expected a bool mask or an integer")):
        with pytest.raises(exc, match=msg):
            ParamMap.from_model(m, ["weight"], masks={"weight": bad})
    # the spec form keeps its own name
    with pytest.raises(ValueError, match=r"^spec\['weight'\]\['indices'\]: expected a 1-D tensor"):
        ParamMap({"weight": {"shape": (4, 3), "repr": "indices", "indices": torch.ones(4, 3, dtype=torch.int32)}})


# ============================================================================ golden: layouts, dtypes, ties


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_golden_selection_reads_every_layout_as_its_contiguous_copy(dtype):
    L = layouts(dtype)
    before = snap(L)
    contig = {n: t.contiguous() for n, t in L.items()}
    with torch.inference_mode():  # inference tensors are read as any tensor outside inference mode
        inf = {n: t.clone() for n, t in L.items()}
    req = {n: (t.float().requires_grad_() * 1).to(dtype) if t.numel() else t for n, t in contig.items()}
    for pct in (1, 1.1, 20, 50, 100):
        for n, t in L.items():
            want = plain_top(t, ref_k(t.numel(), pct))
            got = G.topk_mask(t, pct)
            assert got.dtype == torch.bool and got.device == t.device and torch.equal(got, want), (n, pct)
            assert torch.equal(G.topk_mask(inf[n], pct), want) and torch.equal(G.topk_mask(req[n], pct), want)
        for scope in ("tensor", "global"):
            runs = [G.golden_masks(s, pct, scope=scope, return_counts=True)
                    for s in ([L, L], [contig, contig], [inf, inf], [req, L])]
            for r in runs[1:]:
                assert r.history == runs[0].history
                for n in L:
                    assert r.masks[n] == runs[0].masks[n] and torch.equal(r.counts[n], runs[0].counts[n]), (scope, n)
            r = runs[0]
            for n, t in L.items():
                c = r.counts[n]
                assert c.dtype == torch.int32 and c.shape == t.shape and c.is_contiguous() and c.device == t.device
                assert r.masks[n].shape == tuple(t.shape) and r.masks[n].bits.dtype == torch.uint8
            if scope == "tensor":
                for n, t in L.items():
                    assert torch.equal(r.masks[n].to_bool(), plain_top(t, ref_k(t.numel(), pct))), (n, pct)
            else:  # one ranking over every tensor, ties in dict order then row-major
                flat = torch.cat([t.double().reshape(-1) for t in L.values()])
                sel, off = plain_top(flat, ref_k(flat.numel(), pct)), 0
                for n, t in L.items():
                    assert torch.equal(r.masks[n].to_bool().reshape(-1), sel[off:off + t.numel()]), (n, pct)
                    off += t.numel()
    assert unchanged(L, before)


@settings(max_examples=25)
@given(dtype=st.sampled_from([torch.float16, torch.bfloat16]), rows=st.integers(1, 9), cols=st.integers(1, 9),
       percent=st.sampled_from([0.5, 1.1, 10, 12.5, 33.3, 50, 99.9, 100]), seed=st.integers(0, 2 ** 16),
       view=st.sampled_from(["contig", "T", "step"]))
def test_half_precision_ties_and_exact_percent_cut_offs(dtype, rows, cols, percent, seed, view):
    # scores that tie in the half dtype (distinct float32 values rounded together, and many equal integers): the
    # count is GoldenParams' exact ceil, ties go to the lowest row-major position, whatever the layout
    g = torch.Generator().manual_seed(seed)
    base = (torch.randint(-2, 3, (rows, cols), generator=g).float() * (1 + torch.rand(rows, cols, generator=g) / 2048))
    t = base.to(dtype)
    if view == "T":
        t = t.t().contiguous().t()
    elif view == "step":
        t = torch.zeros(rows, 2 * cols, dtype=dtype)[:, ::2].copy_(t)
    k = ref_k(t.numel(), percent)
    want = plain_top(t, k)
    assert torch.equal(G.topk_mask(t, percent), want)
    r = G.golden_masks([{"a": t, "b": t.float()}], percent, scope="global")
    flat = torch.cat([t.reshape(-1).float(), t.reshape(-1).float()])  # ties across tensors: params order
    fw = plain_top(flat, ref_k(flat.numel(), percent))
    assert torch.equal(r.masks["a"].to_bool().reshape(-1), fw[:t.numel()])
    assert torch.equal(r.masks["b"].to_bool().reshape(-1), fw[t.numel():])


@pytest.mark.parametrize("adt", FLOATS, ids=str)
def test_accumulator_is_torch_add_in_its_dtype_for_every_gradient_dtype_and_layout(adt):
    # the sums are rounded to the accumulator's dtype before each add (documented): acc.add_(g[mask].to(adt)), bit
    # for bit, for gradients of any float dtype and layout; outputs in the accumulator's dtype, grads untouched
    g = torch.Generator().manual_seed(3)
    shapes = {"cl": (2, 3, 4, 5), "T": (6, 7), "one": (1, 1), "scalar": (), "empty": (0, 3)}
    masks = {n: torch.rand(s, generator=g) < 0.5 for n, s in shapes.items()}
    acc = G.SparseGradientAccumulator(masks, dtype=adt)
    ref = {n: torch.zeros(int(m.sum()), dtype=adt) for n, m in masks.items()}
    for i, gdt in enumerate(FLOATS):
        grads = {"cl": (torch.randn(2, 3, 4, 5, generator=g) * 100).to(gdt).contiguous(memory_format=torch.channels_last),
                 "T": (torch.randn(7, 6, generator=g) * 100).to(gdt).t(),
                 "one": torch.randn(3, generator=g).to(gdt)[1:2].view(1, 1),
                 "scalar": torch.tensor(0.1, dtype=gdt),
                 "empty": torch.empty(3, 0, dtype=gdt).t()}
        before = snap(grads)
        acc.add(grads)
        assert unchanged(grads, before)
        for n in shapes:
            ref[n].add_(grads[n][masks[n]].to(adt))
    assert acc.steps == 4
    vals, mean, dense = acc.values(), acc.mean(), acc.to_dense()
    for n in shapes:
        assert same(vals[n], ref[n]), n
        assert same(mean[n], ref[n] / 4), n
        want = torch.zeros(shapes[n], dtype=adt)
        want[masks[n]] = ref[n]
        assert same(dense[n], want), n


def test_accumulator_built_in_inference_mode_keeps_working_outside_fixed():
    # DEFECT (fixed): golden.py SparseGradientAccumulator.__init__ allocated its sums in the caller's mode; built under
    # torch.inference_mode() (an eval loop), every later add() outside it raised RuntimeError naming an internal "out"
    m = torch.tensor([True, False, True])
    with torch.inference_mode():
        acc = G.SparseGradientAccumulator({"w": m})
        acc.add({"w": torch.tensor([1.0, 2.0, 3.0])})
    acc.add({"w": torch.tensor([10.0, 20.0, 30.0])})
    with torch.inference_mode():
        acc.add({"w": torch.tensor([100.0, 200.0, 300.0])})
    assert acc.values()["w"].tolist() == [111.0, 333.0] and acc.steps == 3
    acc.reset()
    assert acc.steps == 0 and acc.values()["w"].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_masks_from_any_layout_agree_across_conversions(dtype):
    # a channels_last / transposed / expanded bool mask is its logical (row-major) mask in every conversion; the
    # MaskSet's ParamMap gathers exactly torch's boolean indexing from gradients of any layout and dtype
    g = torch.Generator().manual_seed(5)
    logical = {"cl": torch.rand(2, 3, 4, 5, generator=g) < 0.4, "T": torch.rand(6, 7, generator=g) < 0.4,
               "exp": (torch.rand(1, 5, generator=g) < 0.5).expand(4, 5), "one": torch.tensor([[True]]),
               "empty": torch.zeros(0, 3, dtype=torch.bool)}
    stored = {**logical, "cl": logical["cl"].contiguous(memory_format=torch.channels_last),
              "T": logical["T"].t().contiguous().t()}
    ms = G.MaskSet(stored)
    for n, m in logical.items():
        assert torch.equal(ms[n].to_bool(), m) and torch.equal(ms[n].to_indices(), m.reshape(-1).nonzero().reshape(-1))
        assert torch.equal(ms[n].to_coo().to_dense(), m) and G.Bitmask.from_coo(ms[n].to_coo()) == ms[n]
        assert ms[n].to_indices(torch.int32).dtype == torch.int32
    grads = {n: (torch.randn(m.shape, generator=g) * 10).to(dtype) for n, m in logical.items()}
    grads["cl"] = grads["cl"].contiguous(memory_format=torch.channels_last)
    grads["T"] = grads["T"].t().contiguous().t()
    before = snap(grads)
    flat = ms.to_parammap().gather(grads)
    assert flat.dtype == dtype and torch.equal(flat, torch.cat([grads[n][logical[n]] for n in logical]))
    assert unchanged(grads, before)


def test_load_goldenparams_reads_half_and_strided_masks_as_non_zero(tmp_path):
    g = torch.Generator().manual_seed(6)
    vals = {dt: (torch.randint(-1, 2, (6, 5), generator=g).to(dt) * 0.5) for dt in FLOATS}
    masks = {f"m{i}": (v.t().contiguous().t() if i % 2 else v) for i, v in enumerate(vals.values())}
    masks["cl"] = (torch.rand(2, 3, 2, 2, generator=g) < 0.5).contiguous(memory_format=torch.channels_last)
    masks["negzero"] = torch.tensor([-0.0, 0.0, 1e-30, -2.0], dtype=torch.float16)
    torch.save({"masks": masks}, tmp_path / "r.pt")
    got = G.load_goldenparams(str(tmp_path / "r.pt"))
    for n, m in masks.items():
        assert torch.equal(got[n].to_bool(), m != 0), n
    assert got["negzero"].to_bool().tolist() == [False, False, False, True]  # 1e-30 is 0 in float16


# ============================================================================ ParamMap: bitwise against the references


_PM_MASK = torch.rand(40, 30, generator=torch.Generator().manual_seed(0)) < 0.4
_PM = ParamMap({"a": {"shape": (40, 30), "repr": "mask", "mask": _PM_MASK},
                "b": {"shape": (2, 3, 4, 5), "repr": "all"},
                "c": {"shape": (50,), "repr": "indices", "indices": torch.tensor([49, 0, 17, 3, 22, 8])},
                "z": {"shape": (0, 4), "repr": "all"}, "s": {"shape": (), "repr": "all"}})
_PLAN = [_PM_MASK.reshape(-1).nonzero().reshape(-1), None, torch.tensor([49, 0, 17, 3, 22, 8]), None, None]


def _pm_tensors(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return {"a": (torch.randn(30, 40, generator=g) * 5).to(dtype).t(),
            "b": torch.randn(2, 3, 4, 5, generator=g).to(dtype).contiguous(memory_format=torch.channels_last),
            "c": torch.randn(100, generator=g).to(dtype)[::2], "z": torch.empty(4, 0, dtype=dtype).t(),
            "s": torch.randn(3, generator=g).to(dtype)[2]}


@pytest.mark.parametrize("sdt", FLOATS, ids=str)
def test_parammap_gather_and_scatter_equal_the_reference_bit_for_bit(sdt):
    src = _pm_tensors(sdt, 1)
    before = snap(src)
    order = list(src)
    want = RP.gather_segments([src[n] for n in order], _PLAN)
    got = _PM.gather(src)
    assert same(got, want) and same(got, torch.cat([src["a"][_PM_MASK], src["b"].reshape(-1), src["c"][_PLAN[2]],
                                                    src["s"].reshape(-1)]))
    with torch.inference_mode():
        inf = {n: t.clone() for n, t in src.items()}
    assert same(_PM.gather(inf), want)
    for odt in FLOATS:
        assert same(_PM.gather(src, dtype=odt), want.to(odt))
        o1 = torch.randn(_PM.input_dim, generator=torch.Generator().manual_seed(2)).to(odt)
        o2 = o1.clone()
        _PM.gather(src, out=o1, accumulate=True)
        RP.gather_segments_out([src[n] for n in order], _PLAN, o2, accumulate=True)
        assert same(o1, o2), odt
        # scatter of a strided flat into strided / channels_last destinations of another dtype, every mode / scale
        flat = (torch.randn(2 * _PM.input_dim, generator=torch.Generator().manual_seed(3)) * 3).to(sdt)[1::2]
        fb = flat.clone()
        for mode in ("write", "add"):
            for scale in (1.0, -1e-3, 7.0):
                d1, d2 = _pm_tensors(odt, 4), _pm_tensors(odt, 4)
                _PM.scatter(flat, out=d1, mode=mode, scale=scale)
                RP.scatter_segments_(flat, _PLAN, [d2[n] for n in order], scale=scale, accumulate=(mode == "add"))
                for n in order:
                    assert same(d1[n], d2[n]), (odt, mode, scale, n)
                assert d1["b"].is_contiguous(memory_format=torch.channels_last) and d1["a"].stride() == (1, 40)
        assert same(flat, fb)
        full = _PM.scatter(flat.to(odt))
        assert all(full[n].dtype == odt and full[n].shape == src[n].shape for n in order)
    assert unchanged(src, before)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_parammap_on_a_model_with_strided_parameters(dtype):
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.conv = torch.nn.Conv2d(3, 4, 2).to(dtype).to(memory_format=torch.channels_last)
    model.t = torch.nn.Parameter(torch.randn(6, 4).to(dtype).t())
    model.one = torch.nn.Parameter(torch.ones(1, dtype=dtype))
    model.empty = torch.nn.Parameter(torch.zeros(0, 2, dtype=dtype))
    x = torch.randn(2, 3, 3, 3).to(dtype).to(memory_format=torch.channels_last)
    (model.conv(x).sum() + (model.t * 2).sum() + model.one.sum() * 3 + model.empty.sum()).backward()
    assert model.conv.weight.grad.is_contiguous(memory_format=torch.channels_last)
    masks = {"conv.weight": (torch.rand(4, 3, 2, 2) < 0.5).contiguous(memory_format=torch.channels_last),
             "t": torch.rand(4, 6) < 0.5}
    pm = ParamMap.from_model(model, masks=masks)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    want = torch.cat([grads[n][masks[n]] if n in masks else grads[n].reshape(-1) for n in pm.names])
    assert same(pm.gather(model), want)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    pm.scatter(pm.gather(model), out=model, mode="add", scale=-0.5, target="param")
    for n, p in model.named_parameters():
        sel = masks.get(n, torch.ones(p.shape, dtype=torch.bool))
        upd = (params[n].double() - 0.5 * grads[n].double()).to(dtype)
        assert same(p.detach(), torch.where(sel, upd, params[n])), n
    assert model.conv.weight.is_contiguous(memory_format=torch.channels_last) and model.t.stride() == (1, 4)


def test_parammap_scatter_into_partly_overlapping_destinations_applies_entries_in_order():
    pm = ParamMap({"a": {"shape": (6,), "repr": "all"}, "b": {"shape": (6,), "repr": "all"}})
    f = torch.arange(1.0, 13.0)
    for mode in ("write", "add"):
        base, ref = torch.ones(9), torch.ones(9)
        pm.scatter(f, out={"a": base[0:6], "b": base[3:9]}, mode=mode)
        if mode == "write":
            ref[0:6] = f[:6]
            ref[3:9] = f[6:]
        else:
            ref[0:6] += f[:6]
            ref[3:9] += f[6:]
        assert torch.equal(base, ref), mode


# ============================================================================ scope


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_scope_values_in_any_layout_rank_as_their_contiguous_copy(dtype):
    w = ints((8, 16), dtype, 0)
    w0 = w.clone()
    s = ScopeSpec(BlockSpec(w, (1, 2)), (1, 4))
    vals = {"T": ints((16, 8), dtype, 1).t(), "step": ints((16, 32), dtype, 2)[::2, ::2],
            "exp": ints((1, 16), dtype, 3).expand(8, 16), "off": ints((200,), dtype, 4)[5:133].view(8, 16),
            "f32": torch.randn(16, 8).t(), "weights": None}
    for n, v in vals.items():
        v0 = None if v is None else v.clone()
        vc = None if v is None else v.contiguous()
        src = w if v is None else vc
        for ties in ("exact", "keep"):
            got = s.get_masks(2, values=v, ties=ties)[s.block]
            want = RS.scope_mask(src, [1, 2], [1, 4], 2, 2.0, False, ties == "keep", True)
            assert got.dtype == torch.bool and torch.equal(got, want), (n, ties)
            assert torch.equal(got, s.get_masks(2, values=vc, ties=ties)[s.block])
        kth = s.kth_largest(v, 2)
        assert kth.dtype == (torch.float64 if src.dtype == torch.float64 else torch.float32)
        assert torch.equal(kth, s.kth_largest(vc, 2))
        norms = s.block_norms(v)
        assert norms.dtype == src.dtype and torch.equal(norms, s.block_norms(vc))
        if v is not None:
            assert same(v, v0)
    assert same(w, w0)  # read-only calls
    # inference-mode and requires_grad weights: read as values outside inference mode
    with torch.inference_mode():
        wi = w.clone()
    wr = w.clone().requires_grad_()
    want = s.get_masks(2)[s.block]
    for t in (wi, wr):
        st_ = ScopeSpec(BlockSpec(t, (1, 2)), (1, 4))
        assert torch.equal(st_.get_masks(2)[st_.block], want) and torch.equal(st_.kth_largest(nnz=2), s.kth_largest(nnz=2))
    with pytest.raises(RuntimeError, match=r"^BlockSpec weights: is an inference tensor"):
        ScopeSpec(BlockSpec(wi, (1, 2)), (1, 4)).hard_threshold(nnz=2)
    assert same(wi, w0)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_scope_hard_threshold_through_views_with_storage_offsets(dtype):
    big = ints((10, 8), dtype, 7)
    ref = big.clone()
    P = big[2:6]  # contiguous, storage offset 16
    s = ScopeSpec(BlockSpec(P, (1, 2)), (1, -1))
    keep = s.hard_threshold(nnz=2)
    want = RS.scope_mask(ref[2:6], [1, 2], [1, 4], 2, 2.0, False, False, False)
    assert torch.equal(keep, want)
    assert same(P, torch.where(RS.expand_blocks(want, [1, 2]), ref[2:6], torch.zeros((), dtype=dtype)))
    assert same(big[:2], ref[:2]) and same(big[6:], ref[6:])  # nothing outside the view written


def test_scope_block_coupling_of_one_tensor_twice_ranks_as_the_tensor():
    # two BlockSpecs over the same (tied) weight: summed squared norms rank as the weight's own
    w = ints((6, 8), torch.float32, 9)
    c = ScopeSpec(BlockCoupling([BlockSpec(w, (1, 2)), BlockSpec(w, (1, 2))]), (1, 4))
    one = ScopeSpec(BlockSpec(w, (1, 2)), (1, 4))
    assert torch.equal(c.block_keep(2), one.block_keep(2))


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_compat_kth_largest_in_every_layout_is_torch_kthvalue(dtype):
    xs = {"cl": ints((2, 3, 4, 5), dtype, 0, -5, 5).contiguous(memory_format=torch.channels_last),
          "exp": ints((1, 5), dtype, 1, -5, 5).expand(4, 5), "off": ints((100,), dtype, 2, -5, 5)[3:43].view(8, 5),
          "step": ints((8, 10), dtype, 3, -5, 5)[::2, ::3], "size1": torch.tensor([[2.0]], dtype=dtype)}
    for n, x in xs.items():
        x0 = x.clone()
        for dim in (None, 0, -1):
            xx, d = (x.reshape(-1), 0) if dim is None else (x, dim)
            for k in range(1, min(3, xx.shape[d]) + 1):
                got = sk.kth_largest(x, k, dim=dim)
                want = torch.kthvalue(xx, xx.shape[d] - k + 1, dim=d).values
                assert got.dtype == dtype and torch.equal(got, want), (n, dim, k)
        assert same(x, x0)


# ============================================================================ MaskedAdamW


def _ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    if not a.numel():
        return 0.0
    d = (a.double() - b.double()).abs()
    return float((d / (torch.finfo(a.dtype).eps * b.double().abs().clamp_min(torch.finfo(a.dtype).tiny))).max())


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_masked_adamw_layouts_and_schedule_factor_match_the_reference(dtype):
    # channels_last / transposed / offset views / size-1 / 0-dim / empty parameters, two rates, a LambdaLR schedule
    # on the group's 'lr' factor: each step equals the reference kernel on contiguous copies at rates lr * masked_lr
    # and lr * unmasked_lr (half types: the same bits; float32 / float64: within 4 ulp), layouts kept
    g = torch.Generator().manual_seed(11)
    shapes = {"cl": (4, 3, 3, 3), "T": (5, 6), "off": (4, 5), "one": (1, 1), "s": (), "e": (0, 3)}
    init = {n: torch.randn(sh, generator=g).to(dtype) for n, sh in shapes.items()}
    buf = torch.zeros(40, dtype=dtype)
    ps = {"cl": torch.nn.Parameter(init["cl"].contiguous(memory_format=torch.channels_last)),
          "T": torch.nn.Parameter(init["T"].t().contiguous().t()),
          "off": torch.nn.Parameter(buf[7:27].view(4, 5).copy_(init["off"])),
          "one": torch.nn.Parameter(init["one"].clone()), "s": torch.nn.Parameter(init["s"].clone()),
          "e": torch.nn.Parameter(init["e"].clone())}
    layout = {n: (p.stride(), p.storage_offset()) for n, p in ps.items()}
    masks = {n: torch.rand(sh, generator=g) < 0.5 for n, sh in shapes.items()}
    masks["cl"] = masks["cl"].contiguous(memory_format=torch.channels_last)
    opt = MaskedAdamW(ps, masks, masked_lr=3e-2, unmasked_lr=1e-2, weight_decay=0.1, betas=(0.8, 0.99))
    assert opt.param_groups[0]["lr"] == 1.0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: [1.0, 0.5, 0.25, 2.0][e % 4])
    rp = {n: init[n].clone() for n in shapes}
    rm = {n: torch.zeros_like(rp[n]) for n in shapes}
    rv = {n: torch.zeros_like(rp[n]) for n in shapes}
    tol = 0.0 if dtype in (torch.float16, torch.bfloat16) else 4.0
    for it in range(4):
        lr = opt.param_groups[0]["lr"]
        grads = {n: (torch.randn(sh, generator=g) * 2).to(dtype) for n, sh in shapes.items()}
        for n in shapes:
            ps[n].grad = grads[n].t().contiguous().t() if n == "T" else grads[n].clone()
        opt.step()
        sched.step()
        step = it + 1
        for n in shapes:
            RA.masked_adamw_([rp[n]], [grads[n]], [rm[n]], [rv[n]], [ops.pack_bitmask(masks[n].contiguous())],
                             masked_lr=3e-2 * lr, unmasked_lr=1e-2 * lr, beta1=0.8, beta2=0.99, eps=1e-8,
                             weight_decay=0.1, bias_correction1=[1 - 0.8 ** step],
                             bias_correction2_sqrt=[(1 - 0.99 ** step) ** 0.5], maximize=False)
            assert _ulps(ps[n].detach(), rp[n]) <= tol, (n, it)
            st_ = opt.state[ps[n]]
            assert st_["exp_avg"].dtype == dtype and st_["exp_avg"].is_contiguous() and float(st_["step"]) == step
    for n, p in ps.items():
        assert (p.stride(), p.storage_offset()) == layout[n] and p.dtype == dtype, n
    assert not buf[:7].any() and not buf[27:].any()  # the offset view's neighbours untouched


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_masked_adamw_half_equal_rates_track_torch_adamw_under_a_schedule(dtype):
    # equal rates: torch.optim.AdamW on the same half parameters under the same StepLR, to that dtype's rounding
    # (torch rounds every intermediate to the half dtype, the fused step once: a few ulp apart after 3 steps)
    g = torch.Generator().manual_seed(12)
    a = torch.nn.Parameter(torch.randn(4, 3, 3, 3, generator=g).to(dtype).contiguous(memory_format=torch.channels_last))
    b = torch.nn.Parameter(a.detach().clone(memory_format=torch.channels_last))
    opt = MaskedAdamW({"a": a}, {"a": torch.ones(a.shape, dtype=torch.bool)}, masked_lr=1e-2, unmasked_lr=1e-2)
    ref = torch.optim.AdamW([b], lr=1e-2, foreach=False)
    s1, s2 = (torch.optim.lr_scheduler.StepLR(o, 1, gamma=0.5) for o in (opt, ref))
    for _ in range(3):
        gr_ = (torch.randn(a.shape, generator=g).sign() * (0.5 + torch.rand(a.shape, generator=g))).to(dtype)
        a.grad, b.grad = gr_.clone(), gr_.clone()
        opt.step(), ref.step(), s1.step(), s2.step()
    assert opt.param_groups[0]["lr"] == 0.125 and ref.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.125, rel=1e-15)
    scale = float(b.detach().double().abs().max())
    assert float((a.detach().double() - b.detach().double()).abs().max()) <= 4 * torch.finfo(dtype).eps * scale


def test_masked_adamw_state_made_under_inference_mode_steps_on_outside_it():
    # session 43 (fixed in optim.py): a first step under torch.inference_mode() made inference-tensor state, and every
    # later step outside it failed in the fused call of that parameter's bucket, after the other buckets had stepped
    a = torch.nn.Parameter(torch.ones(4))
    b = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    ra, rb = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    opt = MaskedAdamW({"a": a, "b": b}, None, 0.1, 0.1)
    ref = MaskedAdamW({"a": ra, "b": rb}, None, 0.1, 0.1)
    b.grad = rb.grad = torch.ones(4, dtype=torch.float16)
    with torch.inference_mode():
        opt.step()  # b's state is made here
    ref.step()
    assert not any(t.is_inference() for t in opt.state[b].values())
    a.grad = ra.grad = torch.ones(4)
    opt.step()
    ref.step()
    assert torch.equal(a.detach(), ra.detach()) and torch.equal(b.detach(), rb.detach())
    assert opt.state[b]["step"].item() == 2 and opt.state[a]["step"].item() == 1


def test_masked_adamw_inference_state_entered_by_hand_is_refused_before_any_bucket_steps():
    a = torch.nn.Parameter(torch.ones(4))
    b = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    opt = MaskedAdamW({"a": a, "b": b}, None, 0.1, 0.1)
    b.grad = torch.ones(4, dtype=torch.float16)
    opt.step()
    with torch.inference_mode():
        opt.state[b]["exp_avg"] = opt.state[b]["exp_avg"].clone()
    a.grad = torch.ones(4)
    a0, b0 = a.detach().clone(), b.detach().clone()
    with pytest.raises(ValueError, match=r"^state\['exp_avg'\] of 'b': an inference tensor"):
        opt.step()
    assert torch.equal(a.detach(), a0) and torch.equal(b.detach(), b0) and a not in opt.state
    with torch.inference_mode():  # inside inference mode it may be updated in place
        opt.step()
    assert not torch.equal(a.detach(), a0) and opt.state[b]["step"].item() == 2


# ============================================================================ golden_reverse


class _Strided(torch.nn.Module):
    def __init__(self, dtype):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.conv = torch.nn.Parameter(torch.randn(4, 3, 2, 2, generator=g).to(dtype)
                                       .contiguous(memory_format=torch.channels_last))
        self.t = torch.nn.Parameter(torch.randn(6, 5, generator=g).to(dtype).t())
        self.step = torch.nn.Parameter(torch.randn(10, 8, generator=g).to(dtype)[::2, 1::2])
        buf = torch.randn(30, generator=g).to(dtype)
        self.v1 = torch.nn.Parameter(buf[0:12].view(3, 4))
        self.v2 = torch.nn.Parameter(buf[8:20].view(4, 3))  # shares buf[8:12] with v1
        self.one = torch.nn.Parameter(torch.tensor([[2.5]], dtype=dtype))
        self.empty = torch.nn.Parameter(torch.empty(0, 3, dtype=dtype))


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_zeroed_params_on_strided_and_storage_sharing_parameters(dtype):
    m = _Strided(dtype)
    with torch.no_grad():
        m.t[0, 0], m.t[1, 1] = -0.0, float("nan")
    before = snap(dict(m.named_parameters()))
    layout = {n: (p.stride(), p.storage_offset(), p.data_ptr()) for n, p in m.named_parameters()}
    g = torch.Generator().manual_seed(2)
    masks = {n: torch.rand(p.shape, generator=g) < 0.5 for n, p in m.named_parameters()}
    masks["t"] = (torch.rand(6, 5, generator=g) < 0.5).t()  # a non-contiguous mask
    masks["t"][0, 0] = masks["t"][1, 1] = True
    masks["conv"] = masks["conv"].contiguous(memory_format=torch.channels_last)
    shared = torch.cat([before["v1"].reshape(-1), before["v2"].reshape(-1)[4:]])  # buf[0:20]
    for form in ("bool", "maskset"):
        ms = masks if form == "bool" else G.MaskSet({n: k.contiguous() for n, k in masks.items()})
        with gr.zeroed_params(m, ms):
            for n, p in m.named_parameters():
                if n not in ("v1", "v2"):
                    assert same(p.detach(), before[n].masked_fill(masks[n], 0)), (form, n)
            # entries applied in order on the one buffer: v1's mask, then v2's, both zeroed
            want = shared.clone()
            want[0:12].masked_fill_(masks["v1"].reshape(-1), 0)
            want[8:20].masked_fill_(masks["v2"].reshape(-1), 0)
            got = torch.cat([m.v1.detach().reshape(-1), m.v2.detach().reshape(-1)[4:]])
            assert same(got, want), form
        for n, p in m.named_parameters():
            assert (p.stride(), p.storage_offset(), p.data_ptr()) == layout[n] and same(p.detach(), before[n]), n


class _Tiny(torch.nn.Module):
    """Logits from small dyadic weights: exact in every dtype and layout, so layout cannot move a result bit."""

    def __init__(self, dtype, strided):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        emb = (torch.randint(-4, 5, (11, 4), generator=g) / 4).to(dtype)
        head = (torch.randint(-4, 5, (4, 11), generator=g) / 4).to(dtype)
        conv = (torch.randint(-4, 5, (2, 1, 1, 1), generator=g) / 4).to(dtype)
        if strided:
            emb = emb.t().contiguous().t()
            head = torch.zeros(4, 22, dtype=dtype)[:, ::2].copy_(head)
            conv = conv.contiguous(memory_format=torch.channels_last)
        self.emb, self.head, self.conv = (torch.nn.Parameter(t) for t in (emb, head, conv))
        self.scale = torch.nn.Parameter(torch.ones((), dtype=dtype))
        self.empty = torch.nn.Parameter(torch.zeros(0, 3, dtype=dtype))

    def forward(self, input_ids, attention_mask=None):
        return (self.emb[input_ids] * self.scale * self.conv.sum()) @ self.head + self.empty.sum()


def _elementwise_loss(model, batch):
    # |grad| is constant within each tensor: every entry ties, so the masks are the first k row-major positions
    c = (batch["input_ids"].sum() % 5 + 1).to(model.emb.dtype)
    return sum((p * c * (i + 1)).sum() for i, p in enumerate(model.parameters()))


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_reverse_golden_masks_ignore_parameter_layout_and_cut_ties_at_exact_k(dtype):
    g = torch.Generator().manual_seed(3)
    batches = [{"input_ids": torch.randint(0, 11, (2, 5), generator=g)} for _ in range(4)]
    out = {}
    for strided in (False, True):
        m = _Tiny(dtype, strided)
        before = {n: (p.detach().clone(), p.stride(), p.data_ptr()) for n, p in m.named_parameters()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = gr.reverse_golden_masks(m, batches, 30.0, chunk_size=2, progress=False, loss_fn=_elementwise_loss)
        for n, p in m.named_parameters():
            assert same(p.detach(), before[n][0]) and p.stride() == before[n][1] and p.data_ptr() == before[n][2]
        for n, p in m.named_parameters():
            k = ref_k(p.numel(), 30.0)
            want = torch.zeros(p.numel(), dtype=torch.bool)
            want[:k] = True
            mk = r.masks[n]
            assert mk.dtype == torch.bool and mk.shape == p.shape and mk.device == p.device
            assert torch.equal(mk.reshape(-1), want), (strided, n)
            assert r.summary[n]["active"] == k
        assert not r.no_grad and isinstance(r.kl, float) and math.isfinite(r.kl)
        out[strided] = r
    a, b = out[False], out[True]
    assert a.kl == b.kl and a.history == b.history


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_kl_and_logprobs_dtypes_and_layouts(dtype):
    g = torch.Generator().manual_seed(4)
    ref = torch.log_softmax(torch.randn(2, 5, 7, generator=g), -1).to(dtype)
    other = torch.log_softmax(torch.randn(2, 7, 5, generator=g), 1).to(dtype).transpose(1, 2)  # non-contiguous
    out_dt = torch.float64 if dtype == torch.float64 else torch.float32
    kl = gr.kl_divergence(ref, other)
    assert kl.dtype == out_dt
    assert torch.equal(kl, gr.kl_divergence(ref.contiguous(), other.contiguous()))
    exp_ref = ref[:1, :1].expand(2, 5, 7)  # stride-0 reference
    assert torch.equal(gr.kl_divergence(exp_ref, other), gr.kl_divergence(exp_ref.contiguous(), other))
    r64, o64 = ref.double(), other.double()
    want = (r64.exp() * (r64 - o64)).sum(-1).clamp_min(0)  # per position, clamped at 0 (documented)
    per = gr.kl_divergence(ref, other, reduction="none")
    assert per.dtype == out_dt and per.shape == (2, 5)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(per.double(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(kl.double(), want.mean(), rtol=tol, atol=tol)
    m = _Tiny(dtype, True)
    ids = torch.randint(0, 11, (2, 5), generator=g)
    lp = gr.logprobs_for_fixed_ids(m, ids)
    assert lp.dtype == out_dt and lp.shape == (2, 4)
    full = gr.full_logprobs(m, ids)
    assert full.dtype == out_dt and full.shape == (2, 5, 11)
    tol = 1e-12 if dtype == torch.float64 else 1e-6  # logit - logsumexp against log_softmax: rounding apart
    torch.testing.assert_close(lp, full[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1), rtol=tol, atol=tol)


# ============================================================================ compat.gradiend


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_accelerated_gradiend_flattens_strided_gradients_as_gradiend(dtype):
    from gradiend.model.param_mapped import ParamMappedGradiendModel
    from gradkit.compat.gradiend import accelerate

    g = torch.Generator().manual_seed(5)
    mask = torch.rand(4, 3, 2, 2, generator=g) < 0.5
    spec = {"conv": {"shape": (4, 3, 2, 2), "repr": "mask", "mask": mask},
            "t": {"shape": (5, 6), "repr": "indices", "indices": torch.tensor([29, 0, 7, 13])},
            "b": {"shape": (3,), "repr": "all"}}
    n = int(mask.sum()) + 4 + 3
    cpu = torch.device("cpu")
    ref = ParamMappedGradiendModel(n, 1, spec, device=cpu)
    fast = accelerate(ParamMappedGradiendModel(n, 1, spec, device=cpu))
    grads = {"conv": torch.randn(4, 3, 2, 2, generator=g).to(dtype).contiguous(memory_format=torch.channels_last),
             "t": torch.randn(6, 5, generator=g).to(dtype).t(), "b": torch.randn(6, generator=g).to(dtype)[::2]}
    before = snap(grads)
    want = ref.flatten_gradient_dict(grads)
    got = fast.flatten_gradient_dict(grads)
    assert same(got, want)
    assert unchanged(grads, before)
