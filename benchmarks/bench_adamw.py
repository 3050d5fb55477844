"""Masked AdamW family: one optimizer step over GoldenParams' training workload.

Workload (issue 7): the 52 parameter tensors of a GPT-2 config with 4 layers and width 512
(vocab 50257, 1024 positions), float32, random gradients, one random mask of 1% density per
tensor (masked_lr 1e-3, unmasked_lr 1e-5, weight decay 1e-2).

Providers (each times ``step()`` on its own copy of the parameters, gradients shared):
* gradkit: ``gradkit.optim.MaskedAdamW`` (one fused pass per step), and the same without masks;
* torch.AdamW foreach / fused: plain AdamW with a single rate, the speed a masked step should match;
* goldenparams-style (emulated): GoldenParams' scheme written out here from its description — per
  parameter two torch AdamW sub-steps on the same state, one at each rate, combined by the mask.
  It is not GoldenParams' code; it does what that optimizer's step does per call (state advanced
  twice, weight decay twice), so it times the approach, not the package.
Before timing, gradkit with equal rates is checked against torch.optim.AdamW.
"""
from __future__ import annotations

from typing import Dict, List

import torch

from bench_parammap import gpt2_shapes
from gradkit.optim import MaskedAdamW

FAMILY = "adamw"
MASKED_LR, UNMASKED_LR, WD, BETAS, EPS = 1e-3, 1e-5, 1e-2, (0.9, 0.999), 1e-8


def _params(shapes: Dict[str, tuple], grads: Dict[str, torch.Tensor], dev: torch.device,
            seed: int = 0) -> Dict[str, torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        p = torch.nn.Parameter((torch.randn(shape, generator=g) * 0.02).to(dev))
        p.grad = grads[name]  # shared: no provider writes into the gradients
        out[name] = p
    return out


class GoldenStyleAdamW:
    """Emulation of GoldenParams' masked AdamW step: per parameter, two AdamW sub-steps on one
    shared state (each advances the step count and applies weight decay), the masked rate's result
    kept where the mask is set and the unmasked rate's elsewhere."""

    def __init__(self, params: Dict[str, torch.nn.Parameter], masks: Dict[str, torch.Tensor]):
        self.items = [(p, masks[n]) for n, p in params.items()]
        self.state = [{"step": 0, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
                      for p, _ in self.items]

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = BETAS
        for (p, mask), st in zip(self.items, self.state):
            g = p.grad
            results = []
            for lr in (MASKED_LR, UNMASKED_LR):
                st["step"] += 1
                q = p.mul(1 - lr * WD)
                st["exp_avg"].lerp_(g, 1 - beta1)
                st["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                bc1 = 1 - beta1 ** st["step"]
                bc2_sqrt = (1 - beta2 ** st["step"]) ** 0.5
                denom = (st["exp_avg_sq"].sqrt() / bc2_sqrt).add_(EPS)
                q.addcdiv_(st["exp_avg"], denom, value=-lr / bc1)
                results.append(q)
            p.copy_(torch.where(mask, results[0], results[1]))


def _check_equal_rates(shapes, grads, dev) -> None:
    """gradkit with masked_lr == unmasked_lr is torch.optim.AdamW (to float32 rounding)."""
    a, b = _params(shapes, grads, dev), _params(shapes, grads, dev)
    masks = {n: torch.rand(s, generator=torch.Generator().manual_seed(9)) < 0.01 for n, s in shapes.items()}
    gk = MaskedAdamW(a, masks, masked_lr=MASKED_LR, unmasked_lr=MASKED_LR, betas=BETAS, eps=EPS, weight_decay=WD)
    ref = torch.optim.AdamW(list(b.values()), lr=MASKED_LR, betas=BETAS, eps=EPS, weight_decay=WD, foreach=True)
    for _ in range(2):
        gk.step()
        ref.step()
    for n in shapes:
        torch.testing.assert_close(a[n], b[n], rtol=1e-6, atol=1e-7, msg=f"{n}: gradkit differs from torch AdamW")


def run(rec, quick: bool = False) -> None:
    dev = torch.device(rec.device)
    shapes = gpt2_shapes()
    g = torch.Generator().manual_seed(1)
    grads = {n: torch.randn(s, generator=g).to(dev) for n, s in shapes.items()}
    masks = {n: (torch.rand(s, generator=g) < 0.01).to(dev) for n, s in shapes.items()}
    n_params = sum(t.numel() for t in grads.values())
    wl = f"gpt2-4x512 {n_params / 1e6:.1f}M/{len(shapes)}t mask1%"
    dt = "float32"
    print(f"[{FAMILY}] workload: {wl}", flush=True)
    _check_equal_rates(shapes, grads, dev)

    def time_step(provider: str, step, **extra) -> Dict[str, float]:
        t = rec.time(step)
        rec.add(FAMILY, "step", provider, wl, dt, t, **extra)
        return t

    t_gk = time_step("gradkit", MaskedAdamW(_params(shapes, grads, dev), masks, masked_lr=MASKED_LR,
                                            unmasked_lr=UNMASKED_LR, betas=BETAS, eps=EPS, weight_decay=WD).step)
    # param, grad, exp_avg, exp_avg_sq read (16 B), param, exp_avg, exp_avg_sq written (12 B), 1 bit of mask
    gbs = n_params * (28 + 1 / 8) / t_gk["p50"] / 1e9
    rec.add(FAMILY, "step bandwidth", "gradkit", wl, dt, {"p20": gbs, "p50": gbs, "p80": gbs, "n": 1},
            metric="GB/s", note="28.125 B moved per entry")
    time_step("gradkit (no masks)", MaskedAdamW(_params(shapes, grads, dev), None, masked_lr=MASKED_LR,
                                                unmasked_lr=UNMASKED_LR, betas=BETAS, eps=EPS,
                                                weight_decay=WD).step, note="every entry at unmasked_lr")
    providers: List[tuple] = [("torch.AdamW foreach", {"foreach": True}), ("torch.AdamW fused", {"fused": True})]
    for name, kw in providers:
        try:
            opt = torch.optim.AdamW(list(_params(shapes, grads, dev).values()), lr=MASKED_LR, betas=BETAS, eps=EPS,
                                    weight_decay=WD, **kw)
            opt.step()
        except (RuntimeError, ValueError) as exc:  # e.g. no fused kernel for this device
            print(f"  ({name} unavailable on {dev}: {exc})")
            continue
        time_step(name, opt.step, note="single rate, no mask")
    time_step("goldenparams-style (emulated)", GoldenStyleAdamW(_params(shapes, grads, dev), masks).step,
              note="two torch AdamW sub-steps per parameter combined by the mask (written from its description)")
