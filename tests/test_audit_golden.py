"""Audit regressions for gradkit.golden / gradkit.optim.MaskedAdamW (silent wrong answers and
half-updated state after an error)."""
from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

import gradkit.golden as G
from gradkit.optim import MaskedAdamW


# --------------------------------------------------------------------------- MaskedAdamW


def _two_dtype_opt():
    a = torch.nn.Parameter(torch.randn(6))
    b = torch.nn.Parameter(torch.randn(5).half())
    opt = MaskedAdamW({"a": a, "b": b}, {"a": torch.tensor([True, False] * 3)}, masked_lr=1e-2, unmasked_lr=1e-3)
    a.grad, b.grad = torch.randn(6), torch.randn(5).half()
    opt.step()
    return a, b, opt


def _snapshot(opt):
    return {id(p): {k: v.clone() for k, v in st.items()} for p, st in opt.state.items()}


def _same_snapshot(s0, s1):
    return s0.keys() == s1.keys() and all(
        s0[i].keys() == s1[i].keys() and all(torch.equal(s0[i][k], s1[i][k]) for k in s0[i]) for i in s0)


def test_param_cast_after_first_step_raises_before_any_parameter_changes():
    # Before: the float32 bucket was stepped, then the bfloat16 bucket's kernel call raised on the
    # stale float16 state: 'a' moved but its step count did not (wrong bias correction after).
    a, b, opt = _two_dtype_opt()
    b.data = b.data.bfloat16()
    a.grad, b.grad = torch.randn(6), torch.randn(5).bfloat16()
    a0, s0 = a.detach().clone(), _snapshot(opt)
    with pytest.raises(ValueError, match=r"^state\['exp_avg'\] of 'b': "):
        opt.step()
    assert torch.equal(a.detach(), a0)
    assert _same_snapshot(s0, _snapshot(opt))


def test_bad_loaded_step_raises_before_any_parameter_changes():
    a, b, opt = _two_dtype_opt()
    sd = opt.state_dict()
    bad = {**sd, "state": {k: dict(v) for k, v in sd["state"].items()}}
    bad["state"][1]["step"] = torch.tensor(-1.0)
    with pytest.raises(ValueError, match=r"^state_dict: state\['step'\] of 'b'"):
        opt.load_state_dict(bad)
    # the same state put in place directly is caught by step, before 'a' moves
    opt.state[b]["step"] = torch.tensor(-1.0)
    a.grad, b.grad = torch.randn(6), torch.randn(5).half()
    a0 = a.detach().clone()
    with pytest.raises(ValueError, match=r"^state\['step'\] of 'b'"):
        opt.step()
    assert torch.equal(a.detach(), a0)


def test_a_scheduler_setting_lr_scales_both_rates():
    # an earlier audit (7d5f85a) refused an 'lr' added to the group (it was ignored); since session 43 the group's
    # 'lr' is the schedule's factor of both rates, so a LambdaLR setting it to 0 freezes every entry
    p = torch.nn.Parameter(torch.randn(4))
    opt = MaskedAdamW({"p": p}, {"p": torch.tensor([True, False, True, False])}, masked_lr=1e-2, unmasked_lr=1e-3)
    assert opt.param_groups[0]["lr"] == 1.0
    torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.0)
    p.grad = torch.randn(4)
    p0 = p.detach().clone()
    opt.step()
    assert torch.equal(p.detach(), p0) and opt.state[p]["step"].item() == 1.0
    opt.param_groups[0]["lr"] = -1.0
    p.grad = torch.randn(4)
    with pytest.raises(ValueError, match=r"^param_groups\[0\]\['lr'\] \(the schedule's factor"):
        opt.step()
    assert torch.equal(p.detach(), p0) and opt.state[p]["step"].item() == 1.0


def test_scheduling_masked_lr_still_works():
    # the group's keys are what a schedule edits: a rate changed there (not the constructor's) is the one used
    p = torch.nn.Parameter(torch.randn(4))
    opt = MaskedAdamW({"p": p}, {"p": torch.tensor([True, True, False, False])}, masked_lr=1e-2, unmasked_lr=1e-2)
    opt.param_groups[0]["unmasked_lr"] = 0.0
    p.grad = torch.randn(4)
    p0 = p.detach().clone()
    opt.step()
    assert torch.equal(p.detach()[2:], p0[2:])  # scheduled to 0: frozen exactly
    assert (p.detach()[:2] != p0[:2]).all()  # masked entries still move at masked_lr
    opt.param_groups[0]["masked_lr"] = 0.0
    opt.param_groups[0]["unmasked_lr"] = 1e-2
    p1 = p.detach().clone()
    opt.step()
    assert torch.equal(p.detach()[:2], p1[:2]) and (p.detach()[2:] != p1[2:]).all()


# --------------------------------------------------------------------------- golden masks


@pytest.mark.parametrize("numel,percent,k", [(10000, 0.57, 57), (10000, 0.29, 29), (3_000_000, 1.13, 33900),
                                             (10000, 1.14, 114), (100, 7, 7), (7, 50, 4), (3, 1e-9, 1),
                                             (0, 5, 0), (10, 100, 10), (1000, 1.1, 11), (768, 5, 39), (64, 5, 4)])
def test_percent_to_k_ceils_the_decimal_percent(numel, percent, k):
    # GoldenParams' count, max(1, ceil(numel * pct / 100)) (session 39; a floor before), read on the decimal the user
    # wrote: 1.1% of 1000 is 11 (GoldenParams' float product 11.000000000000002 would ceil to 12)
    assert G.percent_to_k(numel, percent) == k


def test_percent_to_k_matches_exact_ceil_on_a_grid():
    for p100 in range(1, 10001, 7):
        for n in (100, 1000, 10000, 123457):
            assert G.percent_to_k(n, p100 / 100) == max(1, min(n, math.ceil(n * Fraction(p100, 100) / 100)))


def test_golden_masks_keep_exactly_k_for_decimal_percent():
    g = torch.arange(10000, dtype=torch.float32)
    res = G.golden_masks([{"w": g}], 0.57)
    assert res.masks["w"].count() == 57
    assert res.masks["w"].to_bool()[-57:].all()


def test_global_scope_mixed_dtypes():
    # Before: TypeError naming the internal 'scores[1]' (float16 scores next to float32 ones).
    grads = {"a": torch.tensor([1.0, 5.0, 3.0]), "b": torch.tensor([4.0, 2.0, 3.0]).half(),
             "c": torch.tensor([6.0, float("nan")]).bfloat16()}
    res = G.golden_masks([grads], 50, scope="global")
    got = {n: m.to_bool().tolist() for n, m in res.masks.items()}
    # |g| in params order: 1 5 3 | 4 2 3 | 6 nan -> top 4: 5, 4, 6 and the first 3 (ties lowest position)
    assert got == {"a": [False, True, True], "b": [True, False, False], "c": [True, False]}
    ref = G.golden_masks([{n: g.double() for n, g in grads.items()}], 50, scope="global")
    assert all(ref.masks[n] == res.masks[n] for n in grads)

