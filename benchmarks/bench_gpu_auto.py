"""Issue 6 on a GPU: the default backend (``auto``) at the issue's shapes, each result checked against the
CUDA C++ kernel's (GRADKIT_BACKEND=native) before it is timed. Rows to $OUT/gpu-auto.jsonl.
    python benchmarks/bench_gpu_auto.py --out $OUT
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton

from gradkit import ops


def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def _native(f):
    os.environ["GRADKIT_BACKEND"] = "native"
    try:
        return f()
    finally:
        os.environ.pop("GRADKIT_BACKEND", None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    a = ap.parse_args(argv)
    os.environ.pop("GRADKIT_BACKEND", None)
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    rows, bad = [], 0
    cases = []
    x32 = torch.randn(64, 1_048_576, device=dev, generator=g)
    for x, dt in ((x32.to(torch.bfloat16), "bfloat16"), (x32, "float32")):
        cases.append((f"project_flat 64x1048576->2048 {dt}", lambda x=x: ops.project_flat(x, 2048, 0), 1e-4,
                      2 * 64 * 1_048_576 * 2048))
    W, B, T, p = 1000, 64, 128, 16
    aa = torch.randn(B * T, W, device=dev, generator=g)
    gg = torch.randn(B * T, W, device=dev, generator=g)
    lt = torch.randn(W, p, device=dev, generator=g)
    rt = torch.randn(W, p, device=dev, generator=g)
    cases.append(("factored_project 1000^2 64x128 p16", lambda: ops.factored_project(aa, gg, lt, rt, None, None, T),
                  1e-5, 4 * B * T * W * p))
    q = torch.randn(1000, 256, device=dev, generator=g)
    keys = torch.randn(1_000_000, 256, device=dev, generator=g)
    cases.append(("score_topk 1000 x 1M x 256 top-10", lambda: ops.score_topk(q, keys, 10), None, 2 * 1000 * 1e6 * 256))
    with open(os.path.join(a.out, "gpu-auto.jsonl"), "w") as fh:
        for name, f, tol, flops in cases:
            got, want = f(), _native(f)
            if tol is None:  # search: the same indices as the CUDA C++ kernel
                err = 1.0 - float((got[1] == want[1]).float().mean())
                ok = err <= 1e-3
            else:
                err = _rel(got, want)
                ok = err <= tol
            row = {"op": name, "check_vs_native": err, "ok": ok, "torch": torch.__version__,
                   "device": torch.cuda.get_device_name()}
            if ok:
                row["auto_ms"] = triton.testing.do_bench(f, warmup=20, rep=100, return_mode="median")
                row["native_ms"] = _native(lambda: triton.testing.do_bench(f, warmup=20, rep=100,
                                                                           return_mode="median"))
                row["auto_tflops"] = flops / row["auto_ms"] / 1e9
            else:
                bad += 1
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            print(row, flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
