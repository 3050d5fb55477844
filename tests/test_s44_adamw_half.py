"""Session 44: masked_adamw_'s float16 / bfloat16 CPU path on AVX2 + F16C (csrc/cpu/adamw.cpp step_half_avx2:
8 entries widened at once, the generic loop's float lane math, narrowed as c10 narrows), checked bit for bit
against a float32 emulation of that lane math in torch (each operation correctly rounded, in the kernel's order),
over every class of 16-bit input (random bit patterns: NaN, +-inf, subnormals, +-0 included), masks with frozen
rates, AMSGrad, maximize, and lengths around the 8-entry blocks (the tail runs the generic loop). NaN results carry
c10's canonical bits (bfloat16 0x7FC0; float16 sign | 0x7E00), as the generic loop and the CUDA kernel store them.

Measured (benchmarks/micro/s44_cliffs.py's MaskedAdamW cases; one step of 4 x 1024^2 masked entries, 2 threads,
Zen 4, a loaded host): bf16 21.0 -> 5.1 ms, fp16 41.0 -> 4.9 ms (float32 4.2 ms; torch AdamW foreach 7.5 / 5.8 ms,
fused 3.6 / 2.6 ms).
"""
import itertools

import pytest
import torch

from gradkit import _ext, ops

pytestmark = pytest.mark.skipif(not _ext.LOADED, reason="compiled extension not built")

F32 = torch.float32


def _emulate(p, g, m, v, vmax, keep_bits, masked_lr, unmasked_lr, beta1, beta2, eps, weight_decay, bc1, bc2s,
             maximize):
    """The kernel's lane math in float32 torch ops (one rounding per operation, the kernel's order)."""
    dt = p.dtype
    f = lambda x: torch.tensor(x, dtype=torch.float64).to(F32)  # noqa: E731  (the kernel's acc_t constants)
    w1, b2, w2, ep, bc2 = f(1.0 - beta1), f(beta2), f(1.0 - beta2), f(eps), f(bc2s)
    one_m_w1 = f(1.0) - w1
    gi = g.to(F32)
    if maximize:
        gi = -gi
    mi = m.to(F32)
    mi = (gi - (gi - mi) * one_m_w1) if bool(w1 >= 0.5) else (mi + w1 * (gi - mi))
    vi = v.to(F32) * b2 + (w2 * gi) * gi
    vd = vi
    if vmax is not None:
        x = vmax.to(F32)
        vd = torch.where((x > vi) | torch.isnan(x), x, vi)
    # sqrt and / in float64, rounded once to float32: the correctly rounded float32 results (53 >= 2 * 24 + 2 bits),
    # which torch's float32 kernels are not always (a vectorised sqrt within 0.5001 ulp; a 0-d divisor as x * (1/b))
    div = lambda a, b: (a.double() / b.double()).to(F32)  # noqa: E731
    denom = div(vd.double().sqrt().to(F32), bc2) + ep
    d = torch.where(keep_bits, f(1.0 - masked_lr * weight_decay), f(1.0 - unmasked_lr * weight_decay))
    s = torch.where(keep_bits, f(-(masked_lr / bc1)), f(-(unmasked_lr / bc1)))
    pn = p.to(F32) * d + div(s * mi, denom)
    frozen = torch.where(keep_bits, torch.tensor(masked_lr == 0.0), torch.tensor(unmasked_lr == 0.0))
    return (torch.where(frozen, p, pn.to(dt)), mi.to(dt), vi.to(dt), None if vmax is None else vd.to(dt)), frozen


def _same_up_to_nan(got, want, dt, exact=None):
    """Non-NaN results bit for bit, NaN results in the same places with c10's canonical bits; ``exact`` entries
    (frozen parameters: the old value, a NaN payload included) bit for bit whatever they hold."""
    gi, wi = got.view(torch.int16), want.view(torch.int16)
    if exact is not None:
        assert torch.equal(gi[exact], wi[exact])
        gi, wi, got, want = gi[~exact], wi[~exact], got[~exact], want[~exact]
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(gi[~nan], wi[~nan])
    canon = (gi[nan] == 0x7FC0) if dt == torch.bfloat16 else ((gi[nan] & 0x7FFF) == 0x7E00)
    assert bool(canon.all()), gi[nan][~canon][:8]


@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("ams", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("rates", [(1e-3, 1e-4), (0.0, 0.05), (0.1, 0.0)])
def test_half_step_matches_the_float32_lane_math_bit_for_bit(dt, ams, maximize, rates):
    case = 1000 * (dt == torch.float16) + 100 * ams + 10 * maximize + int(rates[0] * 1e4)
    for n, rep in itertools.product((7, 8, 9, 64, 1000, 4099), range(3)):
        gen = torch.Generator().manual_seed(rep * 7919 + case * 13 + n)
        def rnd(special):
            x = torch.randn(n, generator=gen).to(dt)
            if special:  # every 16-bit class: random patterns in a quarter of the entries
                pat = torch.randint(-2**15, 2**15, (n,), generator=gen, dtype=torch.int32).to(torch.int16).view(dt)
                x = torch.where(torch.rand(n, generator=gen) < 0.25, pat, x)
            return x
        p, g, m = rnd(True), rnd(True), rnd(True) * 0.1
        v = (torch.rand(n, generator=gen) * 0.01).to(dt)
        v = torch.where(torch.rand(n, generator=gen) < 0.1, rnd(True), v)
        vmax = (torch.rand(n, generator=gen) * 0.01).to(dt) if ams else None
        keep = torch.rand(n, generator=gen) < 0.5
        kw = dict(masked_lr=rates[0], unmasked_lr=rates[1], beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
                  bias_correction1=[1 - 0.9 ** 3], bias_correction2_sqrt=[(1 - 0.999 ** 3) ** 0.5], maximize=maximize)
        want, frozen = _emulate(p, g, m, v, vmax, keep, kw["masked_lr"], kw["unmasked_lr"], kw["beta1"], kw["beta2"],
                        kw["eps"], kw["weight_decay"], kw["bias_correction1"][0], kw["bias_correction2_sqrt"][0],
                        maximize)
        P, M, V = p.clone(), m.clone(), v.clone()
        VM = None if vmax is None else [vmax.clone()]
        ops.masked_adamw_([P], [g], [M], [V], [ops.pack_bitmask(keep)], max_exp_avg_sqs=VM, **kw)
        for j, (got, w) in enumerate(zip((P, M, V) + ((VM[0],) if ams else ()), want)):
            _same_up_to_nan(got, w, dt, frozen if j == 0 else None)
