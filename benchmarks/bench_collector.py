"""Collector: projected per-example gradients of one 1000x1000 Linear, 64 examples x 128 tokens, p = 16
(issue 6, "factored projection ... at least 3x faster than bergson's collector path").

Two operations, each side by side with bergson 2.5.1 driven through its own collector code:

* ``factored proj (hook work)``: what the hooks do for one batch once the layer input ``a`` and
  output gradient ``g`` (64 x 128 x 1000 each, fp32) exist.
  - gradkit: ``gradkit.projection.factored_project(a, g, 16)`` (its p x O / p x I matrices come
    from the counter-based generator and are cached per (p, size, seed), like bergson's);
  - gradkit collector: the same through ``GradientCollector``'s hook (``_project``);
  - bergson: ``StreamingGradientCollector.forward_hook(a)`` + ``backward_hook(g)`` (projects ``a``
    by the right matrix in the forward hook, ``g`` by the left one, forms ``g^T a`` per example,
    flattens + clamps), projection matrices cached in its ``GradientProcessor`` (steady state);
  - bergson cold: the same with a fresh processor, i.e. the first batch (matrix generation included).
  - the same interleaved comparison on a 1024x1024 (64 x 128 tokens) and a 4096x4096 Linear (16 x 128
    tokens): the power-of-two widths of real transformers, whose rows lie a multiple of 4 KiB apart; and on
    the 1000x1000 Linear with 8192 one-token examples (a layer without a token axis: MLPs, CNN heads).
  - ``..., interleaved``: gradkit and bergson alternated in rounds of 10 calls (order rotating), and
    the quantiles of the per-round ratio bergson / gradkit, the figure least moved by the shared host's
    load drift (``harness.time_interleaved``).
* ``factored proj (hook work, bf16 a/g)``: the same hook work on a bfloat16 model's activations and
  gradients (``a``, ``g`` rounded to bf16).
  - gradkit: ``factored_project(a_bf16, g_bf16, 16)``: read as bf16, widened exactly, fp32 arithmetic;
  - gradkit (a.float()): the same call after converting a and g to float32 (what the API did before);
  - bergson: its hooks on a bf16 Linear (bf16 projection matrices, bf16 matmuls, bf16 result).
  Each row's note gives its relative error against the float64 L G R^T of its own matrices.
* ``collector step (fwd+bwd)``: the whole step from the input ``x``: forward of the Linear with
  the hooks attached, backward of ``sum(y * w)`` (so ``g = w``), projected gradients out.
  - gradkit (the collector): ``col.backward(loss)`` (autograd to the hooked outputs only: no weight
    gradient, no ``.grad``);
  - gradkit collector + loss.backward(): a plain ``loss.backward()``;
  - bergson: its collector context (``register_forward_hook`` + ``register_full_backward_hook``),
    ``loss.backward()`` -- what ``CollectorComputer`` does per batch;
  - torch fwd+bwd: the same forward/backward with no collection (the floor for the last two).
  - ``collector step (fwd+bwd), interleaved``: the like-for-like gradkit row, bergson and the floor alternated,
    one step each per round (order rotating), with the per-round ratios to gradkit: the figure to quote (the
    rows above get 2-3 samples each, one provider after the other, and move with the shared host's load).
  The last three run the Linear as bergson's ``build()`` sets a model up: weight frozen, input requiring
  grad (the backward computes the input gradient, not the weight gradient); they are the like-for-like
  comparison. The first row needs neither gradient in a one-Linear model, so it is not a bergson comparison.

Run alone: ``python benchmarks/bench_collector.py [--quick]`` (2 threads).
"""
from __future__ import annotations

import functools
import os
import sys
import warnings

import torch
from torch import nn

FAMILY = "projection"
B, T, D, P = 64, 128, 1000, 16


class _Wrap(nn.Module):
    """bergson's collectors want a model with ``.device``; wrap the single Linear."""

    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.lin = lin

    @property
    def device(self) -> torch.device:
        return self.lin.weight.device

    def forward(self, x):
        return self.lin(x)


def _bergson(model, cold: bool = False, p: int = P):
    try:
        from bergson.collector.gradient_collectors import StreamingGradientCollector
        from bergson.gradients import GradientProcessor
    except Exception as e:  # pragma: no cover - peer not installed
        print(f"  bergson unavailable: {e}")
        return None
    proc = GradientProcessor(projection_dim=p, projection_type="rademacher")
    return StreamingGradientCollector(model=model, processor=proc, dtype=torch.float32)


def _tag(lin: nn.Linear) -> None:
    """What bergson's collector sets on a hooked module before its hooks run."""
    lin._name = "lin"
    lin._collect_bias = False


def _untag(lin: nn.Linear) -> None:
    for attr in ("_name", "_collect_bias", "_inputs"):
        if hasattr(lin, attr):
            delattr(lin, attr)


def _bergson_hooks(c, lin: nn.Linear, a, g):
    """bergson's hook work for one batch: forward hook on a, backward hook on g; its (B, p*p) result."""
    c.forward_hook(lin, a)
    c.backward_hook(lin, g)
    return c.mod_grads["lin"]


def _lgr(L, R, a, g):
    """float64 vec(L G_b R^T) of every example b, G_b = g_b^T a_b."""
    return torch.stack([(L @ (g[b].double().T @ a[b].double()) @ R.T).reshape(-1) for b in range(a.shape[0])])


def has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " amx_bf16" in flags and " amx_tile" in flags


AB_SHAPES = ((1000, 64, 128), (1024, 64, 128), (4096, 16, 128), (1000, 8192, 1))  # width, examples, tokens


def ab_layers(dtype, gen, p: int = P, shapes=AB_SHAPES):
    """The A/B scripts' layers (sign_ab.py, amx_ab.py): per (width, examples, tokens) of ``shapes``, (width,
    examples, tokens, a, g, lt, rt, op): Rademacher lt / rt at ``p``, a / g drawn from ``gen`` in ``dtype``, op
    the fused call on them."""
    from gradkit.projection import projection_matrix

    for width, nb, T in shapes:
        lt = projection_matrix(p, width, seed=1).T.contiguous()
        rt = projection_matrix(p, width, seed=2).T.contiguous()
        a = torch.randn(nb * T, width, generator=gen).to(dtype)
        g = torch.randn(nb * T, width, generator=gen).to(dtype)
        yield width, nb, T, a, g, lt, rt, functools.partial(torch.ops.gradkit.factored_project, a, g, lt, rt, None,
                                                            None, T)


def bergson_hooks_ab(variants, rounds: int, dtype=torch.float32, seed: int = 5, p: int = P) -> None:
    """The A/B scripts' bergson comparison (sign_ab.py, amx_ab.py): bergson 2.5.1's hooks on a 1000 x 1000 Linear
    in ``dtype`` (64 x 128 tokens) against each of ``variants`` (name -> fn(a, g) -> gradkit's whole call),
    interleaved in 2 * rounds rounds, both at projection size ``p``; prints the medians and per-round bergson /
    gradkit ratios."""
    from harness import time_interleaved

    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(1000, 1000).to(dtype)
    a = torch.randn(64, 128, 1000, generator=gen).to(dtype)
    g = torch.randn(64, 128, 1000, generator=gen).to(dtype)
    bcol = _bergson(_Wrap(lin), p=p)
    if bcol is None:
        print("bergson is not installed: scripts/install-peers.sh")
        return
    _tag(lin)
    fns = {k: (lambda f=f: f(a, g)) for k, f in variants.items()}
    fns["bergson"] = lambda: _bergson_hooks(bcol, lin, a, g)
    st = time_interleaved(fns, rounds=2 * rounds, calls=10, baseline="bergson")
    _untag(lin)
    print(f"bergson hooks ({dtype}) 1000x1000, 64x128 tokens, p={p}: {st['bergson']['p50'] * 1e3:.2f} ms")
    for k in variants:  # ratio_pXX is gradkit / bergson: invert for bergson / gradkit
        print(f"  {k:7s} {st[k]['p50'] * 1e3:.2f} ms, bergson / gradkit per round p20 / p50 / p80 "
              f"{1 / st[k]['ratio_p80']:.2f} {1 / st[k]['ratio_p50']:.2f} {1 / st[k]['ratio_p20']:.2f}")


def _hook_work_wide(rec, dev, width: int, nb: int, quick: bool, tokens: int = T) -> None:
    """gradkit's factored_project and bergson's hooks on a width x width Linear, nb x tokens, interleaved."""
    from harness import time_interleaved
    from gradkit.projection import factored_project

    gen = torch.Generator().manual_seed(6)
    lin = nn.Linear(width, width).to(dev)
    a = torch.randn(nb, tokens, width, generator=gen).to(dev)
    g = torch.randn(nb, tokens, width, generator=gen).to(dev)
    wl = f"Linear {width}x{width}, {nb}x{tokens} tokens, p={P}"
    op = "factored proj (hook work), interleaved"
    bcol = _bergson(_Wrap(lin))
    if bcol is None:
        rec.add(FAMILY, op, "gradkit", wl, "float32", rec.time(lambda: factored_project(a, g, P, seed=0, name="lin")))
        return
    _tag(lin)
    st = time_interleaved({"gradkit": lambda: factored_project(a, g, P, seed=0, name="lin"),
                           "bergson": lambda: _bergson_hooks(bcol, lin, a, g)},
                          rounds=10 if quick else 30, calls=10, baseline="gradkit")
    _untag(lin)
    _add_interleaved(rec, op, wl, "float32", st, "factored_project(a, g, 16)",
                     "bergson 2.5.1 forward_hook + backward_hook")


def _add_interleaved(rec, op, wl, dt, st, gk_note: str, bergson_note: str) -> None:
    """The rows of one time_interleaved gradkit-vs-bergson run: each side's times and the per-round ratio."""
    rec.add(FAMILY, op, "gradkit", wl, dt, st["gradkit"], note=gk_note)
    rec.add(FAMILY, op, "bergson", wl, dt, st["bergson"], note=bergson_note)
    rec.add(FAMILY, op, "bergson / gradkit, same round", wl, dt,
            {"p20": st["bergson"]["ratio_p20"], "p50": st["bergson"]["ratio_p50"],
             "p80": st["bergson"]["ratio_p80"], "n": st["bergson"]["n"]}, metric="ratio (x)")


def run(rec, quick: bool = False) -> None:
    from harness import time_interleaved
    from gradkit.projection import (GradientCollector, clear_matrix_cache, derive_seed, factored_project,
                                    projection_matrix)

    dev = torch.device(rec.device)
    gen = torch.Generator().manual_seed(5)
    lin = nn.Linear(D, D)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(D, D, generator=gen) / D ** 0.5)
    lin = lin.to(dev)
    model = _Wrap(lin)
    a = torch.randn(B, T, D, generator=gen).to(dev)
    g = torch.randn(B, T, D, generator=gen).to(dev)
    wl = f"Linear {D}x{D}, {B}x{T} tokens, p={P}"
    dt = "float32"
    print(f"[{FAMILY}] {wl}", flush=True)

    # agreement first: gradkit's vectors are L G_b R^T of the explicit per-example gradients
    out = factored_project(a, g, P, seed=0, name="lin")
    L = projection_matrix(P, D, seed=derive_seed(0, "lin", "left"), device=dev).double()
    R = projection_matrix(P, D, seed=derive_seed(0, "lin", "right"), device=dev).double()
    for b in (0, B - 1):
        G = g[b].double().T @ a[b].double()
        ref = (L @ G @ R.T).reshape(-1)
        err = (out[b].double() - ref).abs().max().item()
        assert err <= 1e-3 * ref.abs().max().item(), f"factored_project differs from L G R^T by {err}"

    # ---- hook work only
    op = "factored proj (hook work)"
    rec.add(FAMILY, op, "gradkit", wl, dt, rec.time(lambda: factored_project(a, g, P, seed=0, name="lin")),
            note="factored_project(a, g, 16): per-example p x p, matrices cached")
    col = GradientCollector(model, p=P)
    rec.add(FAMILY, op, "gradkit collector", wl, dt, rec.time(lambda: col._project("lin", a, g, None)),
            note="GradientCollector hook body (_project -> factored_project)")
    bcol = _bergson(model)
    if bcol is not None:
        _tag(lin)

        def bergson_hooks(c=bcol):
            return _bergson_hooks(c, lin, a, g)

        got = bergson_hooks()
        assert got.shape == (B, P * P)
        # and its values: L G_b R^T with bergson's own (cached) matrices, first and last example, as gradkit's above
        Lb = bcol.projection("lin", P, D, "left", a.device, torch.float32).double()
        Rb = bcol.projection("lin", P, D, "right", a.device, torch.float32).double()
        for b in (0, B - 1):
            want = _lgr(Lb, Rb, a[b:b + 1], g[b:b + 1])[0]
            err = (got[b].double() - want).abs().max().item()
            assert err <= 1e-3 * want.abs().max().item(), f"bergson's hook work differs from L G R^T by {err}"
        rec.add(FAMILY, op, "bergson", wl, dt, rec.time(bergson_hooks),
                note="bergson 2.5.1 StreamingGradientCollector forward_hook + backward_hook, cached matrices")
        # interleaved: the same two calls alternated in rounds (order rotating), so host-load drift hits
        # both alike; the per-round ratio is the figure least moved by the shared machine's noise
        op_i = op + ", interleaved"
        st = time_interleaved({"gradkit": lambda: factored_project(a, g, P, seed=0, name="lin"),
                               "bergson": bergson_hooks}, rounds=10 if quick else 40, calls=10, baseline="gradkit")
        _add_interleaved(rec, op_i, wl, dt, st,
                         "factored_project(a, g, 16), alternated with bergson's hooks in rounds of 10 calls",
                         f"per-round ratio bergson / gradkit: p20 {st['bergson']['ratio_p20']:.2f}, "
                         f"p50 {st['bergson']['ratio_p50']:.2f}, p80 {st['bergson']['ratio_p80']:.2f}")
        if not quick:
            def bergson_cold():
                c = _bergson(model)
                return bergson_hooks(c)

            rec.add(FAMILY, op, "bergson cold", wl, dt, rec.time(bergson_cold, slow_reps=3),
                    note="fresh GradientProcessor: first batch, projection matrices generated")

            def gradkit_cold():
                clear_matrix_cache()
                return factored_project(a, g, P, seed=0, name="lin")

            rec.add(FAMILY, op, "gradkit cold", wl, dt, rec.time(gradkit_cold, slow_reps=3),
                    note="matrix cache cleared before each call: matrices generated, the pair of 'bergson cold' "
                         "(compare the two cold rows, not cold against the warm 'gradkit')")
        _untag(lin)

    # ---- hook work at the power-of-two widths of real transformers (rows a multiple of 4 KiB apart)
    for width, nb in ((1024, B), (4096, B // 4)):
        _hook_work_wide(rec, dev, width, nb, quick)
    _hook_work_wide(rec, dev, D, B * T, quick, tokens=1)  # the same tokens as one-token examples (no token axis)

    # ---- hook work on a bfloat16 model's activations / gradients
    op = "factored proj (hook work, bf16 a/g)"
    ab, gb = a.bfloat16(), g.bfloat16()
    dtb = "bfloat16"
    outb = factored_project(ab, gb, P, seed=0, name="lin")
    truth = _lgr(L, R, ab, gb)
    rel = lambda x: ((x.double() - truth).norm() / truth.norm()).item()  # noqa: E731
    amx = dev.type == "cpu" and has_amx()  # the default there: AMX tiles (its own bits; benchmarks/amx_ab.py)
    rec.add(FAMILY, op, "gradkit", wl, dtb, rec.time(lambda: factored_project(ab, gb, P, seed=0, name="lin")),
            note=("AMX tiles (the default on this CPU), fp32 sums in TDPBF16PS's order" if amx else
                  "native bf16 input, fp32 arithmetic") + f"; rel. error vs float64 {rel(outb):.1e}")
    rec.add(FAMILY, op, "gradkit (a.float())", wl, dtb,
            rec.time(lambda: factored_project(ab.float(), gb.float(), P, seed=0, name="lin")),
            note="the same after converting a and g to float32 first (the old path; on AMX CPUs float32 takes the "
                 "split AMX path since session 30)")
    if amx:
        from harness import with_env

        gk_fma = with_env("GRADKIT_FACTORED_AMX", "0", lambda: factored_project(ab, gb, P, seed=0, name="lin"))
        rec.add(FAMILY, op, "gradkit (GRADKIT_FACTORED_AMX=0)", wl, dtb, rec.time(gk_fma),
                note=f"the FMA kernel, the bits of the a.float() call under the same setting; rel. error vs float64 "
                     f"{rel(gk_fma()):.1e}")
    linb = nn.Linear(D, D).to(dev, torch.bfloat16)
    bcolb = _bergson(_Wrap(linb))
    if bcolb is not None:
        _tag(linb)

        def bergson_bf16():
            return _bergson_hooks(bcolb, linb, ab, gb)

        # bergson's own matrices differ from gradkit's: its error against its own L G R^T
        got = bergson_bf16()
        Lb = bcolb.projection("lin", P, D, "left", dev, torch.bfloat16).double()
        Rb = bcolb.projection("lin", P, D, "right", dev, torch.bfloat16).double()
        tb = _lgr(Lb, Rb, ab, gb)
        err_b = ((got.double() - tb).norm() / tb.norm()).item()
        rec.add(FAMILY, op, "bergson", wl, dtb, rec.time(bergson_bf16),
                note=f"bergson 2.5.1 on a bf16 model (bf16 matmuls, bf16 output); rel. error vs float64 {err_b:.1e}")
        _untag(linb)

    # ---- the whole collector step
    op = "collector step (fwd+bwd)"
    x = torch.randn(B, T, D, generator=gen).to(dev)
    w = g  # loss = sum(y * w) -> output gradient w

    def gk_step():
        with col:
            col.backward((model(x) * w).sum())
            return col.collect()

    # The loss.backward() rows run the Linear as bergson's build() configures a model (setup_model_and_peft:
    # weights frozen, the input embeddings trainable, so every Linear's input requires grad): the backward
    # computes the input gradient, not the weight gradient. Until session 22 the weight was left trainable
    # there, which made bergson's row compute a weight gradient its own pipeline never does (90 vs 179 ms was
    # reported as 2.0x); the like-for-like pair is "gradkit collector + loss.backward()" against "bergson".
    xg = x.detach().requires_grad_(True)

    def frozen(fn):
        def run():
            model.requires_grad_(False)
            try:
                return fn()
            finally:
                model.requires_grad_(True)
                xg.grad = None
        return run

    @frozen
    def gk_step_full():
        with col:
            (model(xg) * w).sum().backward()
            return col.collect()

    r = gk_step()["lin"]
    torch.testing.assert_close(r, factored_project(x, w, P, seed=0, name="lin"), atol=1e-3, rtol=1e-4)
    reps = 3 if quick else 5
    torch.testing.assert_close(gk_step_full()["lin"], r)
    # "gradkit" (the ratio column's baseline) is the like-for-like row: bergson's build() setup, the input requiring
    # grad, so both sides form the input gradient (until session 34 the baseline was the col.backward row, which
    # skips it: half the backward, 2.2x where the like-for-like ratio was 1.09x)
    rec.add(FAMILY, op, "gradkit", wl, dt, rec.time(gk_step_full, slow_reps=reps),
            note="hooks + plain loss.backward(), weight frozen and input requiring grad (bergson's build() setup)")
    rec.add(FAMILY, op, "gradkit col.backward (hooked outputs only)", wl, dt, rec.time(gk_step, slow_reps=reps),
            note="hooks + col.backward(loss): autograd to the hooked outputs only (no weight or input grad): what "
                 "per_example_grads runs; not bergson's work")
    if bcol is not None:
        @frozen
        def bergson_step():
            with bcol:
                (model(xg) * w).sum().backward()
            return bcol.mod_grads["lin"]

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "full backward hook is firing ... no inputs require gradients"
            assert bergson_step().shape == (B, P * P)
            rec.add(FAMILY, op, "bergson", wl, dt, rec.time(bergson_step, slow_reps=reps),
                    note="bergson 2.5.1 collector context: forward + full backward hooks, loss.backward(), weight "
                         "frozen and input requiring grad (its build() setup)")

    @frozen
    def plain():
        (model(xg) * w).sum().backward()

    rec.add(FAMILY, op, "torch fwd+bwd (no collection)", wl, dt, rec.time(plain, slow_reps=reps),
            note="forward + backward of the Linear alone, as the loss.backward() rows: their floor")
    if bcol is not None:
        # The rows above get 2-3 samples each, one provider after the other: on the shared 2-core host their order
        # swung with the load (session 35's quick runs: gradkit 257 / 240 ms against bergson 211 / 215 ms and the
        # floor 208 / 367 ms, while an alternating A/B gave 214 / 214 / 208). Alternated, one step each per round
        # (order rotating), with the per-round ratios: the figure to quote.
        op_i = op + ", interleaved"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            st = time_interleaved({"gradkit": gk_step_full, "bergson": bergson_step, "torch fwd+bwd": plain},
                                  rounds=8 if quick else 20, calls=1, baseline="gradkit")
        _add_interleaved(rec, op_i, wl, dt, st, "hooks + loss.backward() (bergson's build() setup), alternated with "
                         "bergson and the floor, one step each per round",
                         "bergson 2.5.1 collector context, loss.backward(), the same setup")
        rec.add(FAMILY, op_i, "torch fwd+bwd (no collection)", wl, dt, st["torch fwd+bwd"],
                note="the floor, in the same rounds")
        rec.add(FAMILY, op_i, "torch fwd+bwd / gradkit, same round", wl, dt,
                {"p20": st["torch fwd+bwd"]["ratio_p20"], "p50": st["torch fwd+bwd"]["ratio_p50"],
                 "p80": st["torch fwd+bwd"]["ratio_p80"], "n": st["torch fwd+bwd"]["n"]}, metric="ratio (x)")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from harness import Recorder, ratio_table

    torch.set_num_threads(2)
    quick = "--quick" in sys.argv
    rec = Recorder("cpu", min_run_time=0.3 if quick else 1.0)
    run(rec, quick=quick)
    print("\n" + ratio_table(rec.rows))
