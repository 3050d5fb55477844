"""gradkit's SparseGPT against SparseKit 0.1.5's, interleaved in one process (harness.time_interleaved, rounds with
the order rotating), at the obs family's layer (512 x 1024, 2048 calibration rows) and two larger ones, 2:4:

    python benchmarks/sparsegpt_ab.py [--rounds 9] [--no-sparsekit]

Prints, per shape, both medians, the per-round ratio SparseKit / gradkit (p20, p50, p80: above 1 gradkit is
faster), both output errors and the fraction of weights whose pruned / kept status differs (U is computed
differently, so near-tied saliencies can fall either way; the errors agree). 2 threads.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import time_interleaved  # noqa: E402

from bench_obs import _layer  # noqa: E402
from gradkit import scope as gk  # noqa: E402
from gradkit.obs import output_error, sparsegpt  # noqa: E402

SHAPES = ((512, 1024), (4096, 1024), (1024, 4096))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--no-sparsekit", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    sk = None
    if not args.no_sparsekit:
        try:
            from sparsekit.pruners.sparsegpt import sparsegpt as sk
        except ImportError:
            print("sparsekit not installed: gradkit alone")
    for M, K in SHAPES:
        W0, X = _layer(M, K, 2 * K)
        H = X.T @ X
        out = {}

        def gk_fn():
            out["gradkit"] = sparsegpt(gk.ScopeSpec(gk.BlockSpec(W0.clone(), (1, 1)), (1, 4)), H, 2, damp=0.01)

        fns = {"gradkit": gk_fn}
        if sk is not None:
            def sk_fn():
                out["sparsekit"] = sk(W0.clone(), H, block_size=1, scope_size=4, damp=0.01)

            fns["sparsekit"] = sk_fn
        res = time_interleaved(fns, rounds=args.rounds, calls=1, baseline="gradkit")
        line = f"{M}x{K}, 2:4: gradkit {res['gradkit']['p50'] * 1e3:.1f} ms (error {output_error(W0, out['gradkit'], X=X):.6f})"
        if sk is not None:
            st = res["sparsekit"]
            line += (f", SparseKit {st['p50'] * 1e3:.1f} ms (error {output_error(W0, out['sparsekit'], X=X):.6f}), "
                     f"SparseKit / gradkit per round {st['ratio_p20']:.2f} {st['ratio_p50']:.2f} {st['ratio_p80']:.2f}, "
                     f"masks differ at {float(((out['gradkit'] == 0) != (out['sparsekit'] == 0)).float().mean()):.2e} "
                     "of the weights")
        print(line, flush=True)


if __name__ == "__main__":
    main()
