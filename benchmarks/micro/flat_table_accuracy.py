"""Accuracy and time of the CPU flat Rademacher projection's sign-table path (B >= 4, k >= 32) against its GEMM path
(GRADKIT_PROJECT_GEMM=1) and a float64 reference built chunk by chunk from the generator.

    python benchmarks/micro/flat_table_accuracy.py [--time]

Error: max over outputs of |y - y64| / ||x_row||_2 (the scale of a float32 projection's rounding). Session 34 moved
the table path from one float32 running sum per output to float32 sums of 64 words plus a float64 total; run this
with PYTHONPATH pointing at a build before and after to compare (the script prints the gradkit it imported).
"""
import argparse
import os
import subprocess
import sys
import time

import torch

import gradkit
from gradkit.ops import projection as P


def reference(x: torch.Tensor, k: int, seed: int, step: int = 1 << 20) -> torch.Tensor:
    out = torch.zeros(x.shape[0], k, dtype=torch.float64)
    for c0 in range(0, x.shape[1], step):
        c1 = min(x.shape[1], c0 + step)
        r = P.projection_matrix(k, c1 - c0, seed, 0, k, 0, c0, dtype=torch.float64)
        out += x[:, c0:c1].double() @ r.T
    return out


def err(y: torch.Tensor, y64: torch.Tensor, x: torch.Tensor) -> float:
    return float(((y.double() - y64).abs().amax(1) / x.double().norm(dim=1)).max())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--time", action="store_true", help="also time 64 x 1,048,576 -> 2048 (table path)")
    ap.add_argument("--gemm", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    torch.set_num_threads(2)
    print("gradkit:", os.path.dirname(gradkit.__file__), "threads", torch.get_num_threads())
    if a.gemm:  # the child: GEMM-path errors (the env var is read per call, but keep it in its own process)
        for D in (1 << 16, 1 << 20, 1 << 24):
            x = torch.randn(4, D, generator=torch.Generator().manual_seed(D))
            print(f"gemm  D=2^{D.bit_length() - 1}: {err(P.project_flat(x, 32, 11, 0, 0), reference(x, 32, 11), x):.3g}")
        return
    for D in (1 << 16, 1 << 20, 1 << 24):
        x = torch.randn(4, D, generator=torch.Generator().manual_seed(D))
        print(f"table D=2^{D.bit_length() - 1}: {err(P.project_flat(x, 32, 11, 0, 0), reference(x, 32, 11), x):.3g}")
    subprocess.run([sys.executable, __file__, "--gemm"], env={**os.environ, "GRADKIT_PROJECT_GEMM": "1"}, check=True)
    if a.time:
        x = torch.randn(64, 1 << 20)
        P.project_flat(x, 2048, 0, 0, 0)
        ts = []
        for _ in range(7):
            t0 = time.perf_counter()
            P.project_flat(x, 2048, 0, 0, 0)
            ts.append(time.perf_counter() - t0)
        ts.sort()
        print(f"time 64 x 2^20 -> 2048 (table path): min {ts[0] * 1e3:.1f} ms, median {ts[3] * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
