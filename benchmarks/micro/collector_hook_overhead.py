"""Per-step cost of GradientCollector's Python hook logic on a model where it dominates: 24 hooked 64x64 Linears,
8 examples x 16 tokens, p = 8, a padding mask. Compares the collector in this checkout with another version of
``_collector.py`` (e.g. one from git) in the same process, alternating, and checks both give the same vectors.

    git show <rev>:python/gradkit/_collector.py > /tmp/old_collector.py
    python benchmarks/micro/collector_hook_overhead.py /tmp/old_collector.py [--rounds 8]

Session 35 used it for the flattened-token support (226ed68 against its parent).
"""
import argparse
import importlib.util
import sys
import time

import torch
from torch import nn

import gradkit._collector as current


def _load(path: str):
    spec = importlib.util.spec_from_file_location("gradkit._collector_other", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _median_step(mod, model, x, mask, reps):
    col = mod.GradientCollector(model, p=8)
    times = []
    with col:
        for _ in range(reps):
            t0 = time.perf_counter()
            with col.batch(mask):
                y = model(x)
                col.backward(y.square().sum())
            out = col.collect()
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2] * 1e3, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("other", help="path of the other _collector.py to compare with")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--reps", type=int, default=60)
    args = ap.parse_args()
    other = _load(args.other)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(64, 64), nn.Tanh()) for _ in range(24)])
    x, mask = torch.randn(8, 16, 64), torch.ones(8, 16)
    for r in range(args.rounds):
        a, out_a = _median_step(other, model, x, mask, args.reps)
        b, out_b = _median_step(current, model, x, mask, args.reps)
        same = out_a.keys() == out_b.keys() and all(torch.equal(out_a[k], out_b[k]) for k in out_a)
        print(f"round {r}: other {a:.2f} ms  this checkout {b:.2f} ms  ratio {b / a:.3f}  same vectors: {same}")


if __name__ == "__main__":
    main()
