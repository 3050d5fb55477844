"""gradkit.optim.MaskedAdamW and the fused op masked_adamw_ on the native kernels and the reference.

Oracles: torch.optim.AdamW itself (single-tensor and foreach paths) for equal rates, and, since
AdamW acts entry by entry, the entrywise combination of two torch AdamW runs (one per rate) for
the masked case; the plain-PyTorch reference for the op on arbitrary lists.
"""
import copy
import io
import math

import pytest
import torch
from hypothesis import given, strategies as st

from gradkit import ops
from gradkit.kernels.reference import adamw as ref
from gradkit.optim import MaskedAdamW

from conftest import DEVICES, use_backend

BACKENDS = ["native", "reference"]
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# (atol, rtol) against torch.optim.AdamW after a few steps. float32 / float64: rounding only (the
# fused step keeps m and v in registers where torch stores and reloads them: same values in
# float32). Half types: torch rounds every intermediate tensor to the half type, the fused
# step does not, so a step can differ by one unit of the half type's last place.
TOL = {torch.float32: (1e-7, 1e-6), torch.float64: (1e-14, 1e-12), torch.float16: (2e-3, 4e-3),
       torch.bfloat16: (1.6e-2, 3.2e-2)}
_INT_VIEW = {8: torch.int64, 4: torch.int32, 2: torch.int16}


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (tells -0.0 from 0.0, and NaN payloads apart)."""
    v = _INT_VIEW[a.element_size()]
    return a.dtype == b.dtype and torch.equal(a.contiguous().view(v), b.contiguous().view(v))


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol, equal_nan=True)


@st.composite
def problems(draw, dtypes=FLOATS):
    """(dtype, shapes, seed, steps): a few tensors of odd / size-0 / size-1 shapes."""
    dtype = draw(st.sampled_from(dtypes))
    shapes = draw(st.lists(st.lists(st.integers(0, 13), min_size=1, max_size=3).map(tuple), min_size=1,
                           max_size=4))
    return dtype, shapes, draw(st.integers(0, 2**31 - 1)), draw(st.integers(1, 4))


def _grad(shape, g, dtype):
    if dtype != torch.float16:
        return torch.randn(shape, generator=g).to(dtype)
    # |g| in [0.5, 2]: torch's own float16 AdamW underflows (1 - beta2) g^2 and eps = 1e-8 to 0
    # for small gradients (then divides by 0); the fused step computes in float32 and does not.
    return (torch.randn(shape, generator=g).sign() * (0.5 + 1.5 * torch.rand(shape, generator=g))).to(dtype)


def _data(shapes, dtype, device, seed, steps):
    g = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=g).to(dtype).to(device) for s in shapes]
    grads = [[_grad(s, g, dtype).to(device) for s in shapes] for _ in range(steps)]
    masks = [(torch.rand(s, generator=g) < 0.4).to(device) for s in shapes]
    return init, grads, masks


def _params(init):
    return {f"p{i}": torch.nn.Parameter(t.clone()) for i, t in enumerate(init)}


def _run(opt, params, grads):
    for gs in grads:
        for p, gr in zip(params, gs):
            p.grad = gr.clone()
        opt.step()


def _torch_run(init, grads, lr, betas, wd, maximize, foreach):
    ps = list(_params(init).values())
    opt = torch.optim.AdamW(ps, lr=lr, betas=betas, weight_decay=wd, maximize=maximize, foreach=foreach)
    _run(opt, ps, grads)
    return ps, opt


def _masked_run(init, grads, masks, masked_lr, unmasked_lr, betas, wd, maximize):
    named = _params(init)
    opt = MaskedAdamW(named.items(), dict(zip(named, masks)), masked_lr=masked_lr, unmasked_lr=unmasked_lr,
                      betas=betas, weight_decay=wd, maximize=maximize)
    _run(opt, list(named.values()), grads)
    return list(named.values()), opt


GOOD = {"masked_lr": 1e-2, "unmasked_lr": 1e-3}
HYPER = st.tuples(st.sampled_from([1e-3, 1e-2, 0.1]), st.sampled_from([(0.9, 0.999), (0.3, 0.99), (0.0, 0.5)]),
                  st.sampled_from([0.0, 1e-2, 0.5]), st.booleans())


# --------------------------------------------------------------------------- (a) equal rates: torch.optim.AdamW


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("foreach", [False, True])
@given(problems(), HYPER)
def test_equal_rates_match_torch_adamw(backend, device, foreach, prob, hyper):
    dtype, shapes, seed, steps = prob
    lr, betas, wd, maximize = hyper
    init, grads, masks = _data(shapes, dtype, device, seed, steps)
    want, topt = _torch_run(init, grads, lr, betas, wd, maximize, foreach)
    with use_backend(backend):
        got, opt = _masked_run(init, grads, masks, lr, lr, betas, wd, maximize)
    for p, q in zip(got, want):
        _close(p.detach(), q.detach(), dtype)
        _close(opt.state[p]["exp_avg"], topt.state[q]["exp_avg"], dtype)
        _close(opt.state[p]["exp_avg_sq"], topt.state[q]["exp_avg_sq"], dtype)
        assert opt.state[p]["step"].item() == topt.state[q]["step"].item() == steps


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_tolerance_can_fail(backend):
    """The float32 tolerance of the torch comparison is tight enough to see a step done twice."""
    init, grads, masks = _data([(40,)], torch.float32, "cpu", 0, 1)
    want, _ = _torch_run(init, grads + grads, 1e-3, (0.9, 0.999), 1e-2, False, False)
    with use_backend(backend):
        got, _ = _masked_run(init, grads, masks, 1e-3, 1e-3, (0.9, 0.999), 1e-2, False)
    with pytest.raises(AssertionError):
        _close(got[0].detach(), want[0].detach(), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.3, 0.99)])
def test_float32_many_entries_match_torch_adamw(backend, betas):
    """Deterministic float32 case with enough entries to catch a one-rounding difference
    (beta1 <= 0.5 takes torch.lerp's other formula, g - (g - m) * (1 - w))."""
    init, grads, masks = _data([(64, 50)], torch.float32, "cpu", 11, 4)
    want, topt = _torch_run(init, grads, 1e-2, betas, 1e-2, False, False)
    with use_backend(backend):
        got, opt = _masked_run(init, grads, masks, 1e-2, 1e-2, betas, 1e-2, False)
    _close(opt.state[got[0]]["exp_avg"], topt.state[want[0]]["exp_avg"], torch.float32)
    _close(got[0].detach(), want[0].detach(), torch.float32)


# --------------------------------------------------------------------------- (b) unmasked_lr = 0 freezes exactly


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@given(problems(), HYPER)
def test_zero_unmasked_rate_freezes_bit_exactly(backend, device, prob, hyper):
    dtype, shapes, seed, steps = prob
    lr, betas, wd, maximize = hyper
    init, grads, masks = _data(shapes, dtype, device, seed, steps)
    for t in init:  # signed zeros and NaN must survive untouched too
        flat = t.view(-1)
        flat[::5] = -0.0
        flat[1::7] = float("nan")
    want, _ = _torch_run(init, grads, lr, betas, wd, maximize, False)
    with use_backend(backend):
        got, _ = _masked_run(init, grads, masks, lr, 0.0, betas, wd, maximize)
    for p, q, t, m in zip(got, want, init, masks):
        assert _bits_equal(p.detach()[~m], t[~m])
        _close(p.detach()[m], q.detach()[m], dtype)


# --------------------------------------------------------------------------- (c) the general masked case


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@given(problems(), HYPER, st.sampled_from([1e-4, 3e-2, 0.0]))
def test_masked_equals_entrywise_torch_adamw(backend, device, prob, hyper, unmasked_lr):
    """AdamW acts entry by entry: masked entries follow an AdamW run at masked_lr, the others one
    at unmasked_lr, and the moments (independent of the rate) follow both."""
    dtype, shapes, seed, steps = prob
    lr, betas, wd, maximize = hyper
    init, grads, masks = _data(shapes, dtype, device, seed, steps)
    hi, hopt = _torch_run(init, grads, lr, betas, wd, maximize, False)
    lo, _ = _torch_run(init, grads, unmasked_lr, betas, wd, maximize, False)
    with use_backend(backend):
        got, opt = _masked_run(init, grads, masks, lr, unmasked_lr, betas, wd, maximize)
    for p, a, b, m in zip(got, hi, lo, masks):
        _close(p.detach(), torch.where(m, a.detach(), b.detach()), dtype)
        _close(opt.state[p]["exp_avg"], hopt.state[a]["exp_avg"], dtype)
        _close(opt.state[p]["exp_avg_sq"], hopt.state[a]["exp_avg_sq"], dtype)


def _op_case(data, device):
    n = data.draw(st.integers(1, 4))
    dtype = data.draw(st.sampled_from(FLOATS))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    shapes = [tuple(data.draw(st.lists(st.integers(0, 40), min_size=1, max_size=2))) for _ in range(n)]
    lists = [[(torch.randn(s, generator=g) * k).to(dtype).to(device) for s in shapes] for k in (1, 1, 0.1)]
    lists.insert(3, [(torch.rand(s, generator=g) * 0.01).to(dtype).to(device) for s in shapes])
    bits = [ops.pack_bitmask((torch.rand(s, generator=g) < 0.5).to(device)) if data.draw(st.booleans()) else None
            for s in shapes]
    steps = [data.draw(st.integers(1, 50)) for _ in shapes]
    b1, b2 = data.draw(st.sampled_from([(0.9, 0.999), (0.3, 0.99), (0.0, 0.0)]))
    kw = dict(masked_lr=data.draw(st.sampled_from([0.0, 1e-3, 0.1])),
              unmasked_lr=data.draw(st.sampled_from([0.0, 1e-4, 0.05])), beta1=b1, beta2=b2,
              eps=data.draw(st.sampled_from([1e-8, 1e-3])), weight_decay=data.draw(st.sampled_from([0.0, 0.1])),
              bias_correction1=[1 - b1 ** s for s in steps],
              bias_correction2_sqrt=[(1 - b2 ** s) ** 0.5 for s in steps], maximize=data.draw(st.booleans()))
    return dtype, lists, bits, kw


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@given(st.data())
def test_op_matches_reference(backend, device, data):
    dtype, (p, g, m, v), bits, kw = _op_case(data, device)
    want = [[t.clone() for t in x] for x in (p, m, v)]
    ref.masked_adamw_(want[0], g, want[1], want[2], bits, kw["masked_lr"], kw["unmasked_lr"], kw["beta1"],
                      kw["beta2"], kw["eps"], kw["weight_decay"], kw["bias_correction1"],
                      kw["bias_correction2_sqrt"], kw["maximize"])
    g_before = [t.clone() for t in g]
    with use_backend(backend):
        ops.masked_adamw_(p, g, m, v, bits, **kw)
    # one unit in the last place of the stored dtype: the reference's lerp / sqrt may round differently
    ulp = {torch.float32: 2e-7, torch.float64: 1e-15, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    for got, exp in zip((p, m, v), want):
        for a, b in zip(got, exp):
            torch.testing.assert_close(a, b, atol=ulp, rtol=2 * ulp)
    for a, b, bb in zip(p, want[0], bits):  # frozen entries: bit for bit
        sel = ref.unpack_bits(bb, a.numel(), a.device).reshape(a.shape)
        frozen = torch.where(sel, kw["masked_lr"] == 0, kw["unmasked_lr"] == 0)
        assert _bits_equal(a[frozen], b[frozen])
    assert all(torch.equal(a, b) for a, b in zip(g, g_before))


# --------------------------------------------------------------------------- (d) one step per call, decay once


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOATS)
def test_one_step_and_one_decay_per_call(backend, dtype):
    """With zero gradients the Adam update is 0, so k calls must scale an entry by exactly
    (1 - lr * wd) k times (rate of its own mask bit), and advance the step count k times."""
    lrs, wd, k = (0.1, 0.02), 0.5, 3
    init, _, masks = _data([(9, 5), (17,)], dtype, "cpu", 1, 0)
    named = _params(init)
    frozen = torch.nn.Parameter(torch.randn(4).to(dtype))
    named["no_grad"] = frozen
    before = frozen.detach().clone()
    with use_backend(backend):
        opt = MaskedAdamW(named, dict(zip(["p0", "p1"], masks)), masked_lr=lrs[0], unmasked_lr=lrs[1],
                          weight_decay=wd)
        for _ in range(k):
            for name in ("p0", "p1"):
                named[name].grad = torch.zeros_like(named[name])
            opt.step()
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    for name, m in zip(("p0", "p1"), masks):
        want = init[int(name[1])].to(wide)
        decay = torch.where(m, torch.tensor(1 - lrs[0] * wd, dtype=wide), torch.tensor(1 - lrs[1] * wd, dtype=wide))
        for _ in range(k):
            want = (want * decay).to(dtype).to(wide)
        assert torch.equal(named[name].detach(), want.to(dtype))
        assert opt.state[named[name]]["step"].item() == k
    assert frozen not in opt.state and torch.equal(frozen.detach(), before)


# --------------------------------------------------------------------------- (e) state_dict round trip


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_round_trip_continues_identically(backend):
    init, grads, masks = _data([(6, 7), (5,), (1,)], torch.float32, "cpu", 3, 6)
    with use_backend(backend):
        p1, opt1 = _masked_run(init, grads[:3], masks, 0.05, 1e-3, (0.8, 0.99), 0.1, False)
        buf = io.BytesIO()
        torch.save(opt1.state_dict(), buf)
        buf.seek(0)
        named2 = {f"p{i}": torch.nn.Parameter(p.detach().clone()) for i, p in enumerate(p1)}
        opt2 = MaskedAdamW(named2, None, masked_lr=1.0, unmasked_lr=1.0, weight_decay=0.0)  # all replaced on load
        opt2.load_state_dict(torch.load(buf, weights_only=True))
        p2 = list(named2.values())
        _run(opt1, p1, grads[3:])
        _run(opt2, p2, grads[3:])
    assert opt2.param_groups[0]["masked_lr"] == 0.05 and set(opt2.masks) == {"p0", "p1", "p2"}
    for a, b in zip(p1, p2):
        assert torch.equal(a, b)
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt1.state[a][key], opt2.state[b][key])


def test_state_dict_mismatch_raises_before_any_change():
    init, grads, masks = _data([(6, 7), (5,)], torch.float32, "cpu", 4, 2)
    _, opt1 = _masked_run(init, grads, masks, 0.05, 1e-3, (0.9, 0.999), 0.1, False)
    sd = opt1.state_dict()
    _, opt2 = _masked_run(init, grads[:1], masks[:1] + [None], 0.5, 0.5, (0.9, 0.999), 0.0, False)
    snap = copy.deepcopy(opt2.state_dict())

    renamed = copy.deepcopy(sd)
    renamed["param_groups"][0]["param_names"] = ["p0", "other"]
    reshaped = copy.deepcopy(sd)
    reshaped["param_shapes"]["p1"] = [5, 1]
    bad_bits = copy.deepcopy(sd)
    bad_bits["masks"]["p0"] = torch.zeros(3, dtype=torch.uint8)
    unknown_mask = copy.deepcopy(sd)
    unknown_mask["masks"]["ghost"] = torch.zeros(1, dtype=torch.uint8)
    bad_state = copy.deepcopy(sd)
    bad_state["state"][1]["exp_avg"] = torch.zeros(4)
    plain = torch.optim.AdamW([torch.nn.Parameter(t.clone()) for t in init]).state_dict()
    for bad, match in ((renamed, "names differ"), (reshaped, "'p1' has shape"), (bad_bits, r"masks\['p0'\]"),
                       (unknown_mask, "ghost"), (bad_state, "exp_avg"), (plain, "MaskedAdamW")):
        with pytest.raises(ValueError, match=match):
            opt2.load_state_dict(bad)
        now = opt2.state_dict()
        assert now["param_groups"] == snap["param_groups"] and now["masks"].keys() == snap["masks"].keys()
        for i, st_ in snap["state"].items():
            assert all(torch.equal(st_[k], now["state"][i][k]) for k in st_)


def test_deepcopy_keeps_masks():
    init, grads, masks = _data([(6, 7)], torch.float32, "cpu", 5, 2)
    _, opt1 = _masked_run(init, grads[:1], masks, 0.05, 0.0, (0.9, 0.999), 0.1, False)
    opt2 = copy.deepcopy(opt1)
    assert torch.equal(opt2.masks["p0"], opt1.masks["p0"])


# --------------------------------------------------------------------------- (f) named parameters of a module


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(11, 6)
        self.lin = torch.nn.Linear(6, 5)
        self.norm = torch.nn.LayerNorm(5)
        self.head = torch.nn.Linear(5, 3, bias=False)

    def forward(self, x):
        return self.head(self.norm(torch.relu(self.lin(self.emb(x)))))


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_named_parameters(backend):
    torch.manual_seed(0)
    model = _Tiny()
    model.head.weight.requires_grad_(False)  # no grad: skipped, never stepped
    twin, torch_twin = copy.deepcopy(model), copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    masks = {"emb.weight": torch.rand(11, 6, generator=g) < 0.2,
             "lin.weight": ops.pack_bitmask(torch.rand(5, 6, generator=g) < 0.5)}
    with use_backend(backend):
        opt = MaskedAdamW(model.named_parameters(), masks, masked_lr=1e-2, unmasked_lr=1e-3)
        opt_dict = MaskedAdamW(dict(twin.named_parameters()), masks, masked_lr=1e-2, unmasked_lr=1e-3)
        x = torch.randint(0, 11, (4, 7), generator=g)
        for mod, o in ((model, opt), (twin, opt_dict)):
            for _ in range(3):
                o.zero_grad()
                mod(x).square().mean().backward()
                o.step()
    for (name, a), b, c in zip(model.named_parameters(), twin.parameters(), torch_twin.parameters()):
        assert torch.equal(a, b), name
        moved = not torch.equal(a, c)
        assert moved == (name != "head.weight"), name
    assert model.head.weight not in opt.state
    assert opt.param_groups[0]["param_names"] == [n for n, _ in model.named_parameters()]


def test_mask_formats_agree():
    """A dense bool mask, its sparse COO form (GoldenParams' format) and its packed bitmask: one stored mask."""
    named = {"w": torch.nn.Parameter(torch.randn(7, 3))}
    mask = torch.rand(7, 3) < 0.5
    for m in (mask, mask.to_sparse(), ops.pack_bitmask(mask)):
        opt = MaskedAdamW(named, {"w": m}, **GOOD)
        assert torch.equal(opt.masks["w"], ops.pack_bitmask(mask))


# --------------------------------------------------------------------------- (g) bad input, before any change


def _named(dtype=torch.float32):
    g = torch.Generator().manual_seed(7)
    return {"a.weight": torch.nn.Parameter(torch.randn(4, 6, generator=g).to(dtype)),
            "a.bias": torch.nn.Parameter(torch.randn(5, generator=g).to(dtype))}



@pytest.mark.parametrize("kwargs,exc,match", [
    ({"masks": {"a.weight": torch.ones(6, 4, dtype=torch.bool)}}, ValueError, r"masks\['a.weight'\]: shape \(6, 4\)"),
    ({"masks": {"a.weight": torch.ones(24, dtype=torch.bool)}}, ValueError, r"masks\['a.weight'\]: shape"),
    ({"masks": {"a.wieght": torch.ones(4, 6, dtype=torch.bool)}}, ValueError, "no parameter named 'a.wieght'"),
    ({"masks": {"a.weight": torch.ones(4, 6)}}, TypeError, r"masks\['a.weight'\].*torch.float32"),
    ({"masks": {"a.weight": torch.ones(4, 6, dtype=torch.int64)}}, TypeError, r"masks\['a.weight'\].*int64"),
    ({"masks": {"a.weight": torch.ones(4, 6, dtype=torch.uint8)}}, ValueError, "packed bitmask of parameter 'a.w"),
    ({"masks": {"a.bias": torch.tensor([0xFF], dtype=torch.uint8)}}, ValueError, r"masks\['a.bias'\]: bits past"),
    ({"masks": {"a.bias": [1, 0, 1, 0, 1]}}, TypeError, r"masks\['a.bias'\]"),
    ({"masks": [torch.ones(5, dtype=torch.bool)]}, TypeError, "masks: expected"),
    ({"masked_lr": -1e-3}, ValueError, "masked_lr"),
    ({"unmasked_lr": float("nan")}, ValueError, "unmasked_lr"),
    ({"masked_lr": float("inf")}, ValueError, "masked_lr"),
    ({"masked_lr": True}, ValueError, "masked_lr"),
    ({"betas": (1.0, 0.999)}, ValueError, r"betas\[0\]"),
    ({"betas": (0.9, -0.1)}, ValueError, r"betas\[1\]"),
    ({"betas": (0.9,)}, ValueError, "betas"),
    ({"eps": -1e-8}, ValueError, "eps"),
    ({"weight_decay": -0.1}, ValueError, "weight_decay"),
    ({"maximize": "yes"}, TypeError, "maximize"),
])
def test_bad_constructor_arguments(kwargs, exc, match):
    named = _named()
    before = {n: p.detach().clone() for n, p in named.items()}
    args = {"masks": {}, **GOOD, **kwargs}
    with pytest.raises(exc, match=match):
        MaskedAdamW(named, **args)
    assert all(torch.equal(named[n], before[n]) for n in named)


def test_bad_named_params():
    named = _named()
    w = named["a.weight"]
    with pytest.raises(ValueError, match="duplicate name 'a.weight'"):
        MaskedAdamW([("a.weight", w), ("a.weight", named["a.bias"])], {}, **GOOD)
    with pytest.raises(ValueError, match="'tied' is the same tensor as 'a.weight'"):
        MaskedAdamW([("a.weight", w), ("tied", w)], {}, **GOOD)
    with pytest.raises(TypeError, match="named_params: expected"):
        MaskedAdamW(list(named.values()), {}, **GOOD)  # model.parameters() instead of named_parameters()
    with pytest.raises(TypeError, match="named_params: expected"):
        MaskedAdamW(w, {}, **GOOD)
    with pytest.raises(TypeError, match=r"named_params\['i'\]"):
        MaskedAdamW({"i": torch.zeros(3, dtype=torch.int64)}, {}, **GOOD)
    with pytest.raises(ValueError, match="no parameters"):
        MaskedAdamW({}, {}, **GOOD)
    opt = MaskedAdamW(named, {}, **GOOD)
    with pytest.raises(ValueError, match="param_group"):
        opt.add_param_group({"params": [("c", torch.nn.Parameter(torch.zeros(2)))]})


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_grad_raises_before_any_change(backend):
    named = _named()
    with use_backend(backend):
        opt = MaskedAdamW(named, {"a.weight": torch.rand(4, 6) < 0.5}, **GOOD)
        named["a.weight"].grad = torch.randn(4, 6)
        named["a.bias"].grad = torch.randn(5)
        opt.step()
        snap = {n: (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}) for n, p in named.items()}
        named["a.weight"].grad = torch.randn(4, 6)
        named["a.bias"].grad = torch.randn(5).to_sparse()
        with pytest.raises(TypeError, match="grad of 'a.bias'"):
            opt.step()
    for n, p in named.items():
        assert torch.equal(p.detach(), snap[n][0])
        assert all(torch.equal(opt.state[p][k], v) for k, v in snap[n][1].items())


def test_op_bad_input_raises_before_any_change():
    p, g, m, v = ([torch.randn(9)] for _ in range(4))
    before = [t[0].clone() for t in (p, m, v)]
    bc = dict(bias_correction1=[0.1], bias_correction2_sqrt=[0.03])
    kw = dict(masked_lr=1e-2, unmasked_lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, **bc)
    # (9 entries need 2 bytes)
    for bits, extra, exc, arg in (([torch.zeros(1, dtype=torch.uint8)], {}, ValueError, r"bits\[0\]"),
                                  ([torch.zeros(2)], {}, TypeError, r"bits\[0\]"),
                                  ([None], {"beta1": 1.0}, ValueError, "beta1"),
                                  ([None], {"bias_correction1": [0.0]}, ValueError, r"bias_correction1\[0\]")):
        with pytest.raises(exc, match=rf"^{arg}: "):
            ops.masked_adamw_(p, g, m, v, bits, **{**kw, **extra})
        assert all(torch.equal(t[0], b) for t, b in zip((p, m, v), before))


# --------------------------------------------------------------------------- (h) opcheck


def test_opcheck():
    g = torch.Generator().manual_seed(0)
    shapes = [(5, 4), (9,), (1,)]
    p, gr, m = ([torch.randn(s, generator=g) for s in shapes] for _ in range(3))
    v = [torch.rand(s, generator=g) for s in shapes]
    bits = [ops.pack_bitmask(torch.rand(5, 4, generator=g) < 0.5), None, torch.ones(1, dtype=torch.uint8)]
    args = (p, gr, m, v, bits, 1e-2, 1e-3, 0.9, 0.999, 1e-8, 0.1, [0.1, 0.19, 0.271],
            [math.sqrt(1 - 0.999 ** k) for k in (1, 2, 3)], False)
    torch.library.opcheck(torch.ops.gradkit.masked_adamw_, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
