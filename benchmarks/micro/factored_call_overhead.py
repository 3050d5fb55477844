# Per-call time of gradkit.projection.factored_project on tiny inputs ((4, 2, 16) activations and gradients,
# p = 16): the Python wrapper, the matrix cache lookup and the op dispatch, not the kernel. Best of 3 rounds of
# 20,000 calls, 2 threads. Session 32: 38.7 us (lru_cache of L and L^T keyed on str(device)) -> 34.6 us (one
# dict lookup in the byte-bounded cache), same host, alternating builds. Usage: python factored_call_overhead.py
import time

import torch

from gradkit import projection as P

torch.set_num_threads(2)
a, g = torch.randn(4, 2, 16), torch.randn(4, 2, 16)


def best_us(f, n=20000):
    for _ in range(200):
        f()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


print(f"factored_project call: {best_us(lambda: P.factored_project(a, g, 16, name='x')):.1f} us")
