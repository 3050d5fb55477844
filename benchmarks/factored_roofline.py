"""Where the factored projection's time goes (issue 6): the fused op on cache-resident vs streamed tokens.

Times ``torch.ops.gradkit.factored_project`` (p = 16, 1000 x 1000 Linear, T = 128) on 8192 tokens
(a and g 65.5 MB: streamed from DRAM), 2048 and 512 tokens (cache-resident), each scaled to 8192
tokens, with the achieved GFLOP/s (2 sides x 2 x tokens x 1000 x 16 flops). Compare with the 2-core
fp32 FMA peak of the machine (~230 GFLOP/s on the project's AMD EPYC). Then the same 8192 tokens as
examples of T = 1 .. 512 tokens.

``python benchmarks/factored_roofline.py`` (2 threads).
"""
import time

import torch

from gradkit.projection import projection_matrix

torch.set_num_threads(2)
g = torch.Generator().manual_seed(5)
lt = projection_matrix(16, 1000, seed=1).T.contiguous()
rt = projection_matrix(16, 1000, seed=2).T.contiguous()
flop = 2 * 2 * 64 * 128 * 1000 * 16
for ntok, rep in ((64 * 128, 10), (16 * 128, 40), (4 * 128, 160)):
    a = torch.randn(ntok, 1000, generator=g)
    gg = torch.randn(ntok, 1000, generator=g)

    def f():
        return torch.ops.gradkit.factored_project(a, gg, lt, rt, None, None, 128)

    f()
    ts = []
    for _ in range(9):
        t = time.perf_counter()
        for _ in range(rep):
            f()
        ts.append((time.perf_counter() - t) / rep * 1e3 * (64 * 128 / ntok))
    ts.sort()
    print(f"{ntok:5d} tokens: per 8192 tokens min {ts[0]:.2f} ms, median {ts[4]:.2f} ms -> "
          f"{flop / ts[0] / 1e6:.0f} GFLOP/s")

# Sequence length: the same 8192 tokens as examples of T tokens (T = 1: one token per example, e.g. a
# layer whose input has no token axis). Tiles of 16 tokens span examples, so short sequences keep the
# lt / rt loads shared among 16 tokens; what remains is one p x p partial update per example.
a = torch.randn(64 * 128, 1000, generator=g)
gg = torch.randn(64 * 128, 1000, generator=g)
for T in (1, 4, 16, 128, 512):
    def f(T=T):
        return torch.ops.gradkit.factored_project(a, gg, lt, rt, None, None, T)

    f()
    ts = []
    for _ in range(9):
        t = time.perf_counter()
        for _ in range(5):
            f()
        ts.append((time.perf_counter() - t) / 5 * 1e3)
    ts.sort()
    print(f"T = {T:3d} ({64 * 128 // T} examples): min {ts[0]:.2f} ms, median {ts[4]:.2f} ms")

# The two floors of the streamed case: reading a and g once (65.5 MB; torch's sum, both threads) and the
# FMA count at the machine's peak (benchmarks/micro/rademacher_avx2_mixed.cpp prints fma6 per core).
ts = []
for _ in range(15):
    t = time.perf_counter()
    a.sum() + gg.sum()
    ts.append(time.perf_counter() - t)
ts.sort()
nbytes = 2 * a.numel() * 4
print(f"reading a and g (sum): min {ts[0] * 1e3:.2f} ms, median {ts[7] * 1e3:.2f} ms -> {nbytes / ts[0] / 1e9:.1f} GB/s; "
      f"{flop / 1e6:.0f} MFLOP at 200 GFLOP/s: {flop / 200e9 * 1e3:.2f} ms")
