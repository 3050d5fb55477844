# Usage: python benchmarks/micro/gemm_copy_ab.py (session 43; median of 9 interleaved rounds, 2 threads)
# A/B of project()'s float32 GEMM path: x read in place (rows 16 floats apart: a (B, D+pad)[:, :D] view) against the
# same values in a contiguous (B, D) tensor with D % 16 != 0 (copied per tile since session 43). Same bits asserted.
import statistics, time, torch
from gradkit.projection import project
torch.set_num_threads(2)
def t(f, n):
    t0 = time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter() - t0) / n * 1e3
for B, D, k, kind in ((64, 1000, 16, "rademacher"), (2000, 1000, 16, "rademacher"), (64, 4100, 2048, "gaussian"),
                      (300, 3000, 100, "gaussian"), (512, 100000, 8, "rademacher"), (8, 1000000, 8, "rademacher")):
    pad = (D + 15) // 16 * 16
    base = torch.randn(B, pad)
    direct = base[:, :D]
    copied = direct.contiguous()
    assert torch.equal(project(direct, k, kind=kind), project(copied, k, kind=kind))
    n = max(1, int(0.05 / max(1e-4, t(lambda: project(copied, k, kind=kind), 1) / 1e3)))
    a, b = [], []
    for _ in range(9):
        a.append(t(lambda: project(copied, k, kind=kind), n)); b.append(t(lambda: project(direct, k, kind=kind), n))
    ma, mb = statistics.median(a), statistics.median(b)
    print(f"{B} x {D} -> {k} {kind}: copied {ma:.3f} ms, in place {mb:.3f} ms, ratio {ma / mb:.2f}")
