"""Audit (s34) of gradkit.optim.MaskedAdamW against explicit references: torch.optim.AdamW (run twice, once per
rate, combined by the mask), a hand-written float64 AdamW step, and torch's own state_dict / closure / GradScaler /
torch.compile conventions. Tests marked ``# DEFECT:`` fail on the current code and assert what it should do."""
import io
import math

import numpy as np
import pytest
import torch

import gradkit.golden as G
from gradkit import ops
from gradkit.optim import MaskedAdamW

GOOD = dict(masked_lr=1e-2, unmasked_lr=1e-3)
_INT = {8: torch.int64, 4: torch.int32, 2: torch.int16}


def _bits_equal(a, b):
    return a.dtype == b.dtype and torch.equal(a.contiguous().view(_INT[a.element_size()]),
                                              b.contiguous().view(_INT[b.element_size()]))


def _ulp(x):
    x = x.abs()
    return torch.nextafter(x, torch.full_like(x, math.inf)) - x


def _torch_pair(init, masks, masked_lr, unmasked_lr, grads, **kw):
    """torch.optim.AdamW applied twice (one run per rate), combined entrywise by the mask."""
    out = []
    for lr in (masked_lr, unmasked_lr):
        ps = [torch.nn.Parameter(t.clone()) for t in init]
        opt = torch.optim.AdamW(ps, lr=lr, foreach=False, **kw)
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = None if g is None else g.clone()
            opt.step()
        out.append((ps, opt))
    (hi, hopt), (lo, _) = out
    return [torch.where(m, a.detach(), b.detach()) for m, a, b in zip(masks, hi, lo)], hi, hopt


def _f64_adamw(p, g, m, v, step, lr, b1, b2, eps, wd, maximize):
    """One hand-written AdamW step in float64 (per-entry lr tensor)."""
    g = -g if maximize else g
    p = p * (1 - lr * wd)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    bc1, bc2 = 1 - b1 ** step, 1 - b2 ** step
    p = p - lr / bc1 * m / (v.sqrt() / math.sqrt(bc2) + eps)
    return p, m, v


# --------------------------------------------------------------------------- equal rates vs torch.optim.AdamW


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.3, 0.99)])
def test_equal_rates_one_step_within_rounding_of_torch(dtype, betas):
    # 3 chunks of the native kernel plus a tail that is not a whole mask byte; a random mask (ignored: equal rates)
    n, lr = 3 * 32768 + 13, 1e-2
    g0 = torch.Generator().manual_seed(0)
    init, grad = torch.randn(n, generator=g0, dtype=dtype), torch.randn(n, generator=g0, dtype=dtype)
    a, b = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    ta = torch.optim.AdamW([a], lr=lr, betas=betas, weight_decay=0.1, foreach=False)
    mb = MaskedAdamW({"b": b}, {"b": torch.rand(n, generator=g0) < 0.5}, masked_lr=lr, unmasked_lr=lr, betas=betas,
                     weight_decay=0.1)
    a.grad, b.grad = grad.clone(), grad.clone()
    ta.step()
    mb.step()
    # Not bit for bit: torch 2.13's CPU sqrt is not correctly rounded (~20% of float32 entries) and its vectorised
    # lerp uses FMA, so torch's m and denominator can differ from the correctly rounded ones by an ulp; the two
    # results are then equally far from the float64 value (measured: same max error, each closer on ~half of the
    # differing entries). Bound: a few units in the last place of the largest operand of the final add (old |p|,
    # new |p| or the step ~lr); the moments within one ulp.
    scale = torch.maximum(torch.maximum(a.detach().abs(), init.abs()), torch.tensor(lr, dtype=dtype))
    assert ((a.detach() - b.detach()).abs() <= 4 * _ulp(scale)).all()
    for key in ("exp_avg", "exp_avg_sq"):
        x, y = ta.state[a][key], mb.state[b][key]
        assert ((x - y).abs() <= _ulp(x)).all(), key
    assert mb.state[b]["step"].dtype == torch.float32 and mb.state[b]["step"].item() == 1.0


# --------------------------------------------------------------------------- two rates: AdamW run twice / float64


def test_two_rates_equal_two_torch_runs_with_none_grads_and_per_param_steps():
    g0 = torch.Generator().manual_seed(1)
    shapes = [(9, 7), (33,), ()]
    init = [torch.randn(s, generator=g0) for s in shapes]
    masks = [torch.rand(s, generator=g0) < 0.4 for s in shapes]
    # parameter i gets no gradient on some steps: its step count (and bias correction) must not advance then
    grads = [[None if (k + i) % 3 == 0 else torch.randn(s, generator=g0) for i, s in enumerate(shapes)]
             for k in range(6)]
    kw = dict(betas=(0.8, 0.99), weight_decay=0.3, maximize=True)
    want, hi, hopt = _torch_pair(init, masks, 5e-2, 2e-3, grads, **kw)
    named = {f"p{i}": torch.nn.Parameter(t.clone()) for i, t in enumerate(init)}
    opt = MaskedAdamW(named, dict(zip(named, masks)), masked_lr=5e-2, unmasked_lr=2e-3, **kw)
    for gs in grads:
        for p, g in zip(named.values(), gs):
            p.grad = None if g is None else g.clone()
        opt.step()
    for p, w, h in zip(named.values(), want, hi):
        torch.testing.assert_close(p.detach(), w, atol=1e-6, rtol=1e-6)
        assert opt.state[p]["step"].item() == hopt.state[h]["step"].item()
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], hopt.state[h]["exp_avg_sq"], atol=1e-7, rtol=1e-6)


def test_float64_matches_hand_written_adamw():
    g0 = torch.Generator().manual_seed(2)
    n, b1, b2, eps, wd = 1000, 0.9, 0.999, 1e-8, 0.05
    init = torch.randn(n, generator=g0, dtype=torch.float64)
    mask = torch.rand(n, generator=g0) < 0.3
    lr = torch.where(mask, torch.tensor(3e-2, dtype=torch.float64), torch.tensor(1e-3, dtype=torch.float64))
    p = torch.nn.Parameter(init.clone())
    opt = MaskedAdamW({"p": p}, {"p": mask}, masked_lr=3e-2, unmasked_lr=1e-3, betas=(b1, b2), eps=eps,
                      weight_decay=wd)
    q, m, v = init.clone(), torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    for k in range(1, 6):
        g = torch.randn(n, generator=g0, dtype=torch.float64)
        p.grad = g.clone()
        opt.step()
        q, m, v = _f64_adamw(q, g, m, v, k, lr, b1, b2, eps, wd, False)
    torch.testing.assert_close(p.detach(), q, atol=1e-13, rtol=1e-12)
    torch.testing.assert_close(opt.state[p]["exp_avg"], m, atol=1e-14, rtol=1e-12)


@pytest.mark.parametrize("frozen", ["masked", "unmasked"])
def test_zero_rate_is_bit_exact_with_weight_decay_and_maximize(frozen):
    g0 = torch.Generator().manual_seed(3)
    n = 2 * 32768 + 5
    init = torch.randn(n, generator=g0)
    init[::11] = -0.0
    mask = torch.rand(n, generator=g0) < 0.3
    rates = dict(masked_lr=0.0, unmasked_lr=1e-2) if frozen == "masked" else dict(masked_lr=1e-2, unmasked_lr=0.0)
    keep = mask if frozen == "masked" else ~mask
    p = torch.nn.Parameter(init.clone())
    opt = MaskedAdamW({"p": p}, {"p": mask}, weight_decay=0.5, maximize=True, **rates)
    for _ in range(3):
        p.grad = torch.randn(n, generator=g0)
        opt.step()
    assert _bits_equal(p.detach()[keep], init[keep])
    assert not torch.equal(p.detach()[~keep], init[~keep])


# --------------------------------------------------------------------------- layouts, dtypes, odd shapes


def test_non_contiguous_parameter_matches_torch_and_keeps_its_storage():
    g0 = torch.Generator().manual_seed(4)
    base = torch.randn(6, 5, generator=g0)
    mask = torch.rand(6, 5, generator=g0).t() < 0.5  # a non-contiguous bool mask too
    grads = [[torch.randn(5, 6, generator=g0)] for _ in range(3)]
    want, _, _ = _torch_pair([base.t()], [mask], 2e-2, 1e-3, grads)
    b = torch.nn.Parameter(base.clone().t())  # a transposed leaf
    assert not b.is_contiguous()
    ptr, stride = b.data_ptr(), b.stride()
    opt = MaskedAdamW({"b": b}, {"b": mask}, masked_lr=2e-2, unmasked_lr=1e-3)
    for (g,) in grads:
        b.grad = g.clone()
        opt.step()
    assert b.data_ptr() == ptr and b.stride() == stride
    torch.testing.assert_close(b.detach(), want[0], atol=1e-6, rtol=1e-6)
    assert torch.equal(opt.masks["b"], ops.pack_bitmask(mask.contiguous()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_keep_state_in_param_dtype_and_are_no_worse_than_torch(dtype):
    g0 = torch.Generator().manual_seed(5)
    n = 4000
    init = torch.randn(n, generator=g0).to(dtype)
    a, b = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    c = torch.nn.Parameter(init.double())
    ta, tc = (torch.optim.AdamW([x], lr=1e-2, foreach=False) for x in (a, c))
    mb = MaskedAdamW({"b": b}, None, masked_lr=1e-2, unmasked_lr=1e-2)
    for _ in range(3):
        g = (torch.randn(n, generator=g0).sign() * (0.5 + torch.rand(n, generator=g0))).to(dtype)
        a.grad, b.grad, c.grad = g.clone(), g.clone(), g.double()
        ta.step(), mb.step(), tc.step()
    st = mb.state[b]
    assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == dtype and st["step"].dtype == torch.float32
    err_torch = (a.detach().double() - c.detach()).abs().max()
    err_gk = (b.detach().double() - c.detach()).abs().max()
    assert err_gk <= err_torch


def test_zero_dim_and_empty_parameters():
    a, e = torch.nn.Parameter(torch.tensor(1.5)), torch.nn.Parameter(torch.zeros(0, 3))
    opt = MaskedAdamW({"a": a, "e": e}, {"a": torch.tensor(True), "e": torch.zeros(0, 3, dtype=torch.bool)},
                      masked_lr=0.1, unmasked_lr=0.0, weight_decay=0.01)
    a.grad, e.grad = torch.tensor(1.0), torch.zeros(0, 3)
    opt.step()
    assert a.item() == pytest.approx(1.5 * (1 - 0.1 * 0.01) - 0.1, abs=1e-6)
    assert opt.state[e]["step"].item() == 1.0 and opt.state[a]["step"].item() == 1.0


# --------------------------------------------------------------------------- masks


def test_golden_maskset_and_bitmask_pass_as_is():
    g0 = torch.Generator().manual_seed(6)
    w, b = torch.nn.Parameter(torch.randn(6, 5, generator=g0)), torch.nn.Parameter(torch.randn(5, generator=g0))
    res = G.golden_masks([{"w": torch.randn(6, 5, generator=g0), "b": torch.randn(5, generator=g0)}], 30)
    opt = MaskedAdamW({"w": w, "b": b}, res.masks, masked_lr=1e-2, unmasked_lr=0.0)
    assert {k: v.tolist() for k, v in opt.masks.items()} == {k: v.bits.tolist() for k, v in res.masks.items()}
    with pytest.raises(ValueError, match=r"masks\['w'\]: shape \(30,\)"):
        MaskedAdamW({"w": w}, {"w": G.Bitmask(res.masks["w"].bits, (30,))}, **GOOD)


def test_index_tensor_mask_is_refused_naming_the_mask():
    p = torch.nn.Parameter(torch.randn(10))
    with pytest.raises(TypeError, match=r"^masks\['p'\]: .*int64"):
        MaskedAdamW({"p": p}, {"p": torch.tensor([1, 3])}, **GOOD)


def test_mask_is_copied_at_construction_and_changed_through_a_state_dict():
    p = torch.nn.Parameter(torch.randn(8))
    mask = torch.zeros(8, dtype=torch.bool)
    opt = MaskedAdamW({"p": p}, {"p": mask}, masked_lr=1e-2, unmasked_lr=0.0)
    mask[:] = True  # "stored once, packed": the caller's tensor is not read again
    p.grad = torch.randn(8)
    p0 = p.detach().clone()
    opt.step()
    assert torch.equal(p.detach(), p0)
    # the documented way to change a mask: edit the state dict and load it back (moments and step kept)
    sd = opt.state_dict()
    sd["masks"] = {"p": ops.pack_bitmask(torch.arange(8) < 4)}
    opt.load_state_dict(sd)
    p.grad = torch.randn(8)
    p1 = p.detach().clone()
    opt.step()
    assert (p.detach()[:4] != p1[:4]).all() and torch.equal(p.detach()[4:], p1[4:])
    assert opt.state[p]["step"].item() == 2.0


# --------------------------------------------------------------------------- state_dict


def test_state_dict_weights_only_into_fresh_optimizer_with_another_mask():
    g0 = torch.Generator().manual_seed(7)
    init = [torch.randn(4, 6, generator=g0), torch.randn(7, generator=g0)]
    named1 = {"w": torch.nn.Parameter(init[0].clone()), "b": torch.nn.Parameter(init[1].clone())}
    opt1 = MaskedAdamW(named1, {"w": torch.rand(4, 6, generator=g0) < 0.5}, masked_lr=3e-2, unmasked_lr=1e-3,
                       betas=(0.8, 0.95), weight_decay=0.2)
    grads = [[torch.randn(4, 6, generator=g0), torch.randn(7, generator=g0)] for _ in range(4)]
    for gs in grads[:2]:
        for p, g in zip(named1.values(), gs):
            p.grad = g.clone()
        opt1.step()
    buf = io.BytesIO()
    torch.save(opt1.state_dict(), buf)
    buf.seek(0)
    named2 = {k: torch.nn.Parameter(v.detach().clone()) for k, v in named1.items()}
    opt2 = MaskedAdamW(named2, {"b": torch.ones(7, dtype=torch.bool)}, masked_lr=1.0, unmasked_lr=1.0)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    assert set(opt2.masks) == {"w"} and torch.equal(opt2.masks["w"], opt1.masks["w"])  # the saved masks win
    for gs in grads[2:]:
        for named in (named1, named2):
            for p, g in zip(named.values(), gs):
                p.grad = g.clone()
        opt1.step()
        opt2.step()
    for k in named1:
        assert torch.equal(named1[k], named2[k])
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt1.state[named1[k]][key], opt2.state[named2[k]][key])


def test_state_dict_round_trip_with_an_empty_state_entry():
    # DEFECT: reading opt.state[p] for a parameter not stepped yet (torch's state is a defaultdict, so any
    # inspection such as `opt.state[p].get("exp_avg_sq")` does it) leaves an empty entry; step() treats it as
    # "no state", state_dict() saves it as {}, and load_state_dict refuses that very state_dict
    # ("state['step'] of 'b' is not a one-element tensor >= 0"). torch.optim.AdamW loads it.
    a, b = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(3))
    opt = MaskedAdamW({"a": a, "b": b}, None, **GOOD)
    a.grad = torch.randn(4)
    opt.step()
    assert opt.state[b].get("exp_avg_sq") is None
    sd = opt.state_dict()
    opt2 = MaskedAdamW({"a": torch.nn.Parameter(a.detach().clone()), "b": torch.nn.Parameter(b.detach().clone())},
                       None, **GOOD)
    opt2.load_state_dict(sd)
    b2 = opt2.param_groups[0]["params"][1]
    b.grad, b2.grad = torch.ones(3), torch.ones(3)
    opt.step()
    opt2.step()
    assert torch.equal(b.detach(), b2.detach()) and opt2.state[b2]["step"].item() == 1.0


@pytest.mark.parametrize("bad_step", [torch.tensor(True), torch.tensor(1 + 0j)])
def test_load_state_dict_refuses_a_step_count_that_step_refuses(bad_step):
    # DEFECT: load_state_dict checks state['step'] (one element, finite, >= 0) but not its dtype, so a bool or
    # complex count loads silently and every later step() raises "state['step'] of 'p': ...". It should be
    # refused on load, before anything changes, like the other bad states.
    p = torch.nn.Parameter(torch.randn(3))
    opt = MaskedAdamW({"p": p}, None, **GOOD)
    p.grad = torch.randn(3)
    opt.step()
    sd = opt.state_dict()
    bad = {**sd, "state": {0: {**sd["state"][0], "step": bad_step}}}
    with pytest.raises(ValueError, match=r"^state_dict: state\['step'\] of 'p'"):
        opt.load_state_dict(bad)
    assert opt.state[p]["step"].dtype == torch.float32


# --------------------------------------------------------------------------- hyper-parameters, kwargs


def test_numpy_scalar_hyper_parameters_are_accepted():
    # DEFECT: _nonneg / betas check `isinstance(v, (int, float))`, so numpy scalars that are not float subclasses
    # (np.float32, np.int64, e.g. a schedule read from a float32 array) are refused with the self-contradicting
    # "masked_lr: expected a finite number >= 0, got np.float32(0.001)". torch.optim.AdamW takes them.
    p = torch.nn.Parameter(torch.randn(4))
    opt = MaskedAdamW({"p": p}, None, masked_lr=np.float32(1e-3), unmasked_lr=np.int64(0),
                      weight_decay=np.float32(0.01))
    p.grad = torch.randn(4)
    opt.param_groups[0]["masked_lr"] = np.float32(5e-4)  # a schedule written from a float32 array
    opt.step()
    assert opt.state[p]["step"].item() == 1.0


@pytest.mark.parametrize("kw", ["foreach", "capturable", "fused", "differentiable"])  # amsgrad: supported (s34)
def test_torch_only_kwargs_raise_a_type_error_naming_them(kw):
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(TypeError, match=kw):
        MaskedAdamW({"p": p}, None, **GOOD, **{kw: True})


def test_scheduling_the_group_rates_matches_torch_with_the_same_schedule():
    g0 = torch.Generator().manual_seed(8)
    init = torch.randn(50, generator=g0)
    mask = torch.rand(50, generator=g0) < 0.5
    grads = [torch.randn(50, generator=g0) for _ in range(5)]
    sched = [1.0, 0.5, 0.25, 0.0, 0.5]
    runs = []
    for base in (2e-2, 1e-3):
        q = torch.nn.Parameter(init.clone())
        t = torch.optim.AdamW([q], lr=base, foreach=False)
        for g, f in zip(grads, sched):
            t.param_groups[0]["lr"] = base * f
            q.grad = g.clone()
            t.step()
        runs.append(q.detach())
    p = torch.nn.Parameter(init.clone())
    opt = MaskedAdamW({"p": p}, {"p": mask}, masked_lr=2e-2, unmasked_lr=1e-3)
    for g, f in zip(grads, sched):
        opt.param_groups[0]["masked_lr"], opt.param_groups[0]["unmasked_lr"] = 2e-2 * f, 1e-3 * f
        p.grad = g.clone()
        opt.step()
    torch.testing.assert_close(p.detach(), torch.where(mask, runs[0], runs[1]), atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------- training-loop integration


def test_closure_and_zero_grad():
    p = torch.nn.Parameter(torch.randn(5))
    opt = MaskedAdamW({"p": p}, None, **GOOD)
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = (p ** 2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert calls == [True] and torch.is_tensor(loss) and opt.state[p]["step"].item() == 1.0
    opt.zero_grad()  # set_to_none: the next step skips p
    p0 = p.detach().clone()
    assert opt.step() is None and torch.equal(p.detach(), p0) and opt.state[p]["step"].item() == 1.0
    p.grad = torch.ones(5)
    opt.zero_grad(set_to_none=False)  # zero gradient: still one AdamW step (decay, moments), as torch
    opt.step()
    assert opt.state[p]["step"].item() == 2.0


def test_grad_scaler_skips_a_step_with_inf_gradients():
    m = torch.nn.Linear(4, 2)
    opt = MaskedAdamW(m.named_parameters(), {"weight": torch.rand(2, 4) < 0.5}, **GOOD)
    scaler = torch.amp.GradScaler("cpu")
    w0 = m.weight.detach().clone()
    scaler.scale(m(torch.randn(3, 4)).sum() * math.inf).backward()
    scaler.step(opt)
    scaler.update()
    assert torch.equal(m.weight.detach(), w0) and not opt.state
    opt.zero_grad()
    scaler.scale(m(torch.randn(3, 4)).sum()).backward()
    scaler.step(opt)
    assert opt.state[m.weight]["step"].item() == 1.0


def test_torch_compile_training_step_matches_eager():
    def make():
        torch.manual_seed(0)
        lin = torch.nn.Linear(8, 4)
        return lin, MaskedAdamW(lin.named_parameters(), {"weight": torch.rand(4, 8) < 0.5}, **GOOD)

    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(9))

    def train_step(lin, opt):
        opt.zero_grad()
        loss = lin(x).square().mean()
        loss.backward()
        opt.step()
        return loss

    m1, o1 = make()
    m2, o2 = make()
    compiled = torch.compile(train_step, backend="aot_eager")
    for _ in range(3):
        train_step(m1, o1)
        compiled(m2, o2)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    assert o2.state[m2.weight]["step"].item() == 3.0
