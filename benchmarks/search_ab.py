"""One-process A/B of exact top-10 search: faiss IndexFlatIP against gradkit's score_topk at each CPU scoring
level (GRADKIT_SEARCH_ISA), one call of each per round, so all of them see the same machine load (the
project's shared VMs vary by up to 30% between runs minutes apart).

    python benchmarks/search_ab.py [--rounds 5] [--n 1000000] [--d 256] [--q 1000] [--levels avx2,blas]

Prints each round's times, the medians and minima, and the per-round faiss / gradkit ratios for the
first level. 2 threads for both, as in the rest of the benchmarks.
"""
import argparse
import os
import time

import numpy as np
import torch

from gradkit import ops


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--q", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--levels", default="avx2,blas", help="GRADKIT_SEARCH_ISA values to time (avx512, avx2, blas)")
    args = ap.parse_args()
    import faiss  # a peer: installed by scripts/install-peers.sh

    torch.set_num_threads(2)
    faiss.omp_set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(args.n, args.d, generator=g)
    q = torch.randn(args.q, args.d, generator=g)
    index = faiss.IndexFlatIP(args.d)
    index.add(keys.numpy())
    qn = q.numpy()
    levels = [lv for lv in args.levels.split(",") if lv]

    def run(name):
        t0 = time.perf_counter()
        if name == "faiss":
            index.search(qn, args.k)
        else:
            os.environ["GRADKIT_SEARCH_ISA"] = name
            ops.score_topk(q, keys, args.k)
        return time.perf_counter() - t0

    names = ["faiss"] + levels
    fs, fi = index.search(qn, args.k)
    os.environ["GRADKIT_SEARCH_ISA"] = levels[0]
    gs, gi = ops.score_topk(q, keys, args.k)
    agree = np.mean([len(set(a) & set(b)) / args.k for a, b in zip(fi.tolist(), gi.tolist())])
    print(f"{args.q} queries x {args.n} x {args.d}, top-{args.k}; faiss / gradkit top-k agreement {100 * agree:.3f}%")
    res = {n: [] for n in names}
    for _ in range(args.rounds):
        for n in names:
            res[n].append(run(n))
        print("  round", {n: round(v[-1], 3) for n, v in res.items()}, flush=True)
    for n, v in res.items():
        print(f"{n:6s} median {np.median(v):.3f} s  min {min(v):.3f} s")
    print("faiss / gradkit[%s] per round:" % levels[0], [round(a / b, 2) for a, b in zip(res["faiss"], res[levels[0]])])


if __name__ == "__main__":
    main()
