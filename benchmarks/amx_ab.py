"""One-process A/B of factored_project's AMX path (issue 6; the default on AMX CPUs since session 27) on bfloat16
activations and gradients: ``GRADKIT_FACTORED_AMX=1`` against the FMA kernel (``=0``), on the layer shapes of bench_collector.py, in rounds with
the order rotating (harness.time_interleaved). The two differ in bits (TDPBF16PS rounds its sums its own way), so
each pair is checked against float64 instead: both must be within 1e-5 of it, relative to the largest entry.

    python benchmarks/amx_ab.py [--rounds 15] [--bergson] [--p 16] [--dtype bfloat16]
    python benchmarks/amx_ab.py --prefetch [--rounds 21] [--p 64] [--widths 768,1000,1024,2048,4096]
    python benchmarks/amx_ab.py --tile [--bergson] [--rounds 15] [--p 64]

Prints, per shape, both medians and the per-round ratio AMX / FMA (p20, p50, p80: below 1 is faster). With
--bergson, also bergson 2.5.1's hooks on a bfloat16 1000 x 1000 Linear (bf16 matmuls, bf16 out) against gradkit's
whole ``factored_project`` call, both paths. 2 threads. On a CPU without AMX-BF16 both columns time the same
kernel (the script says so). --p: the projection size (16, 32 or 64: the sizes the AMX path takes; at 32 the
tiles hold the signs and the sums are scaled by 1/sqrt(32) once). --dtype float32: the float32 AMX path (p = 32,
64 from session 29, 16 from session 30: each value split into three bfloat16 parts), against the FMA kernel and
bergson's float32 hooks; --dtype float16 likewise (p = 16, 32, 64 from session 30, two parts).

--prefetch: instead, the AMX path with and without its prefetch of the next tile's rows
(``GRADKIT_AMX_PREFETCH=1`` against ``=0``; the default picks one per side by width, p and tile size, see
amx_prefetch in csrc/cpu/projection.cpp), bfloat16 width x width layers, 8192 tokens in examples of 128 (fewer
examples at 2048 and above: 16 x 128 at 4096), printing the per-round ratio on / off (below 1: the prefetch is
faster) and which one the default takes.

--tile: instead, the bfloat16 AMX path's 32-token tiles (``GRADKIT_AMX_TILE=32``, skinny_amx2: the default at p = 16
and 32 from session 30) against its 16-token ones (``=16``, the default at p = 64) on bench_collector's A/B shapes
(--dtype float16: the float16 path at p = 16, skinny_amx_split2; other float16 / float32 p keep 16 either way):
the same bits (asserted), per-round ratio 32 / 16; with --bergson, both against bergson's hooks in that dtype.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import time_interleaved, with_env  # noqa: E402

import bench_collector as bc  # noqa: E402
from gradkit.projection import factored_project  # noqa: E402

AMX = "GRADKIT_FACTORED_AMX"  # the switch this script times
PF = "GRADKIT_AMX_PREFETCH"  # --prefetch's switch
TILE = "GRADKIT_AMX_TILE"  # --tile's switch


def env_ab(var: str, off: str, on: str, shapes, p: int, rounds: int, default, dtype=torch.bfloat16) -> None:
    """``var=on`` against ``var=off`` on the AMX path (``dtype`` layers of ``shapes``): the same bits (asserted),
    and the per-round ratio on / off; ``default(width)`` names the setting taken when ``var`` is unset."""
    name = str(dtype).removeprefix("torch.")
    for width, nb, T, _, _, _, _, op in bc.ab_layers(dtype, torch.Generator().manual_seed(5), p, shapes):
        r_on, r_off = with_env(var, on, op)(), with_env(var, off, op)()
        assert torch.equal(r_on.view(torch.int32), r_off.view(torch.int32)), width  # the same bits either way
        res = time_interleaved({"off": with_env(var, off, op), "on": with_env(var, on, op)}, rounds=rounds,
                               calls=10, baseline="off")
        st = res["on"]
        print(f"{name} {width}x{width}, {nb}x{T} tokens, p={p}: {var}={off} {res['off']['p50'] * 1e3:.2f} ms, "
              f"={on} {st['p50'] * 1e3:.2f} ms, {on} / {off} per round {st['ratio_p20']:.3f} {st['ratio_p50']:.3f} "
              f"{st['ratio_p80']:.3f}; default: {default(width)}", flush=True)


def prefetch_ab(p: int, widths, rounds: int) -> None:
    shapes = [(width, max(1, min(64, 64 * 1024 // width)), 128) for width in widths]
    # amx_prefetch's rule: only with 16-token tiles (at p = 64 by default; 32-token tiles at p = 16 / 32)
    env_ab(PF, "0", "1", shapes, p, rounds, lambda width: "1" if p == 64 and width < 2048 else "0")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--bergson", action="store_true")
    ap.add_argument("--p", type=int, default=16, choices=(16, 32, 64))
    ap.add_argument("--prefetch", action="store_true")
    ap.add_argument("--tile", action="store_true")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    ap.add_argument("--widths", default="768,1000,1024,2048,4096")
    args = ap.parse_args()
    p = args.p
    torch.set_num_threads(2)
    if not bc.has_amx():
        print("this CPU has no AMX-BF16: both columns run the same kernel")
    if args.prefetch:
        prefetch_ab(p, [int(w) for w in args.widths.split(",")], args.rounds)
        return
    if args.tile:
        dt = getattr(torch, args.dtype)
        tile32 = p == 16 if dt == torch.float16 else p <= 32 and dt == torch.bfloat16  # the defaults
        env_ab(TILE, "16", "32", bc.AB_SHAPES, p, args.rounds, lambda width: "32" if tile32 else "16", dt)
        if args.bergson:
            def gk_b(a, g):
                return factored_project(a, g, p, seed=0, name="lin")

            bc.bergson_hooks_ab({"tile32": with_env(TILE, "32", gk_b), "tile16": with_env(TILE, "16", gk_b)},
                                args.rounds, dtype=dt, p=p)
        return
    dt = getattr(torch, args.dtype)
    for width, nb, T, a, g, lt, rt, op in bc.ab_layers(dt, torch.Generator().manual_seed(5), p):
        fns = {"fma": with_env(AMX, "0", op), "amx": with_env(AMX, "1", op)}
        exact = torch.einsum("btp,btq->bpq", (g.double() @ lt.double()).view(nb, T, p),
                             (a.double() @ rt.double()).view(nb, T, p))
        rels = {}
        for k, f in fns.items():
            rels[k] = float((f().double() - exact).abs().max() / exact.abs().max())
            assert rels[k] < 1e-5, (k, rels[k])  # float32 sums of up to 4096 products (the FMA kernel: 2e-6 at p = 32)
        res = time_interleaved(fns, rounds=args.rounds, calls=10, baseline="fma")
        st = res["amx"]
        print(f"{args.dtype} {width}x{width}, {nb}x{T} tokens, p={p}: FMA {res['fma']['p50'] * 1e3:.2f} ms, "
              f"AMX {st['p50'] * 1e3:.2f} ms, AMX / FMA per round "
              f"{st['ratio_p20']:.3f} {st['ratio_p50']:.3f} {st['ratio_p80']:.3f}; largest error / largest entry "
              f"against float64: FMA {rels['fma']:.1e}, AMX {rels['amx']:.1e}", flush=True)
    if args.bergson:
        def gk(a, g):
            return factored_project(a, g, p, seed=0, name="lin")

        bc.bergson_hooks_ab({"amx": with_env(AMX, "1", gk), "fma": with_env(AMX, "0", gk)}, args.rounds,
                            dtype=dt, p=p)

if __name__ == "__main__":
    main()
