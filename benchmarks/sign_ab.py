"""One-process A/B of factored_project's sign path (issue 6): the xor + add rows against the FMA kernel
(GRADKIT_FACTORED_SIGN=0), on the layer shapes of bench_collector.py, in rounds with the order rotating
(harness.time_interleaved), so both see the same stretch of the shared host's load. Each pair is checked
bit for bit first.

    python benchmarks/sign_ab.py [--dtypes float32,bfloat16] [--rounds 15] [--bergson]

Prints, per shape, the FMA kernel's median time and the per-round ratio sign / FMA (p20, p50, p80: below 1
is faster). With --bergson, also bergson 2.5.1's hooks on the 1000 x 1000 layer (gradkit's whole
``factored_project`` call, both paths) and the per-round ratios bergson / gradkit. 2 threads. The sign path
is taken on AVX-512 CPUs only; elsewhere both columns time the same kernel. GRADKIT_FACTORED_AMX=0 throughout:
on AMX CPUs the AMX path would otherwise run both columns (every dtype at p = 16 since session 30).
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import time_interleaved, with_env  # noqa: E402

import bench_collector as bc  # noqa: E402
from gradkit.projection import factored_project  # noqa: E402

SIGN = "GRADKIT_FACTORED_SIGN"  # the switch this script times


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--bergson", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    # the AMX path (the default at p = 16 on AMX CPUs: bfloat16, and float32 / float16 since session 30) would stand
    # in for both columns there
    os.environ["GRADKIT_FACTORED_AMX"] = "0"
    gen = torch.Generator().manual_seed(5)
    for name in args.dtypes.split(","):
        for width, nb, T, a, g, lt, rt, op in bc.ab_layers(getattr(torch, name), gen):
            fns = {"fma": with_env(SIGN, "0", op), "sign": with_env(SIGN, "1", op)}
            assert torch.equal(fns["fma"]().view(torch.int32), fns["sign"]().view(torch.int32))
            res = time_interleaved(fns, rounds=args.rounds, calls=10, baseline="fma")
            st = res["sign"]
            print(f"{name:8s} {width}x{width}, {nb}x{T} tokens: FMA kernel {res['fma']['p50'] * 1e3:.2f} ms, "
                  f"sign path {st['p50'] * 1e3:.2f} ms, sign / FMA per round "
                  f"{st['ratio_p20']:.3f} {st['ratio_p50']:.3f} {st['ratio_p80']:.3f}", flush=True)
    if args.bergson:
        def gk(a, g):
            return factored_project(a, g, 16, seed=0, name="lin")

        bc.bergson_hooks_ab({"sign": with_env(SIGN, "1", gk), "fma": with_env(SIGN, "0", gk)}, args.rounds)

if __name__ == "__main__":
    main()
