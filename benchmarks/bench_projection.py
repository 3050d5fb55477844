"""Projection family: flat random projection of per-example gradients (issue 6).

Workload: 64 flat gradients of D = 1,048,576 fp32 entries -> k = 2048, Rademacher (quick mode:
D = 65,536). Providers:
* gradkit: ``gradkit.projection.project`` (counter-based generator, R tiles generated in cache and
  consumed at once by an fp32 GEMM; R never stored);
* bergson 2.5.1: ``bergson.collector.collector.project_global`` -- its flat ("global") projection:
  Philox-generated column blocks of R (numpy on CPU) and ``addmm_``;
* TRAK (traker 0.3.2): ``trak.projectors.BasicProjector(grad_dim=D, proj_dim=2048, seed=0,
  proj_type=rademacher, device=cpu)``, ``project(grads, model_id=0)`` (regenerates its
  D x block_size torch-RNG blocks on every call).
Peers take tens of seconds per call, so they run once after a warm-up.
Then the Gaussian flat projection (D / 16 columns) with bergson's ``normal`` projection (its default) and TRAK's
``proj_type=normal``, and (gradkit only) the explicit matrix generation rates.
Then the collector workload (bench_collector.py, the same family): the factored per-example projection
of a 1000 x 1000 Linear (64 examples x 128 tokens, p = 16) and the whole collector step, side by side
with bergson's collector. Last the whole pipeline (bench_pipeline.py): a per-example gradient index of a
random GPT-2 built by gradkit and by bergson's collect_gradients.
"""
from __future__ import annotations

import torch

from gradkit import projection as P

FAMILY = "projection"


def run(rec, quick: bool = False) -> None:
    B, k = 64, 2048
    D = 65_536 if quick else 1_048_576
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, D, generator=gen)
    wl = f"{B}x{D}->{k}"
    dt = "float32"
    print(f"[{FAMILY}] flat {wl}", flush=True)

    # agreement on a slice: project() equals x @ R^T with the explicit matrix
    xs = x[:4, :4096]
    R = P.projection_matrix(k, 4096, seed=0)
    torch.testing.assert_close(P.project(xs, k, seed=0), xs @ R.T, rtol=1e-4, atol=1e-4)
    del R
    # and the timed call itself (its tiling and thread split): three groups of output columns against the same
    # rows of R over the full width, in float64
    y = P.project(x, k, seed=0)
    for r0 in (0, k // 2, k - 8):
        Rr = P.projection_matrix(8, D, seed=0, k=k, row0=r0).double()
        want = x.double() @ Rr.T
        # fp32 sums of 2^20 terms: errors up to ~5e-6 of the largest output seen
        torch.testing.assert_close(y[:, r0:r0 + 8].double(), want, rtol=0, atol=3e-5 * float(want.abs().max()))
    del y, Rr, want

    _flat_rows(rec, "rademacher", x, k, "counter-based R tiles in cache + fp32 GEMM (MKL), never stored")
    # Gaussian on D / 16 columns (keeps the run short: the peers would take 15-40 s per full-width call)
    _flat_rows(rec, "gaussian", x[:, :D // 16].contiguous(), k,
               "Box-Muller in float64 per entry pair (4 pairs per step, own log / sin / cos, on AVX2 CPUs)")
    out = torch.empty(k, 65_536)
    st = rec.time(lambda: P.ops.projection_matrix_(out, 0, 0, k, 0, 0))
    rec.add(FAMILY, "matrix rademacher", "gradkit", f"{k}x65536", dt, st)
    rec.add(FAMILY, "matrix rademacher", "gradkit", f"{k}x65536", dt,
            {m: out.numel() / st[m] / 1e9 for m in ("p20", "p50", "p80")} | {"n": st["n"]}, metric="Gentries/s")
    gt = rec.time(lambda: P.ops.projection_matrix_(out, 0, 1, k, 0, 0))
    rec.add(FAMILY, "matrix gaussian", "gradkit", f"{k}x65536", dt, gt)
    rec.add(FAMILY, "matrix gaussian", "gradkit", f"{k}x65536", dt,
            {m: out.numel() / gt[m] / 1e9 for m in ("p20", "p50", "p80")} | {"n": gt["n"]}, metric="Gentries/s")

    del x, out
    from bench_collector import run as run_collector

    run_collector(rec, quick=quick)
    from bench_pipeline import run as run_pipeline

    run_pipeline(rec, quick=quick)


def _flat_rows(rec, kind: str, x: torch.Tensor, k: int, note: str) -> None:
    """One flat projection x (B, D) -> (B, k) of ``kind`` by gradkit, bergson's ``project_global`` and TRAK's
    ``BasicProjector`` (its ``rademacher`` / ``normal`` projection types), side by side."""
    B, D = x.shape
    wl, dt, op = f"{B}x{D}->{k}", "float32", f"flat {kind}"
    rec.add(FAMILY, op, "gradkit", wl, dt, rec.time(lambda: P.project(x, k, seed=0, kind=kind)), note=note)
    peer_kind = "rademacher" if kind == "rademacher" else "normal"
    try:
        from bergson.collector.collector import project_global

        rec.add(FAMILY, op, "bergson 2.5.1", wl, dt,
                rec.time(lambda: project_global("bench/single", x, k, peer_kind), slow_reps=1),
                note=f"bergson.collector.collector.project_global(..., '{peer_kind}'): Philox column blocks (numpy) "
                     "+ addmm_ ('normal' is its default)")
    except ImportError as e:  # pragma: no cover
        print(f"  bergson unavailable: {e}")
    try:
        from trak.projectors import BasicProjector, ProjectionType

        proj = BasicProjector(grad_dim=D, proj_dim=k, seed=0, proj_type=ProjectionType(peer_kind),
                              device=torch.device("cpu"))
        rec.add(FAMILY, op, "trak BasicProjector", wl, dt, rec.time(lambda: proj.project(x, model_id=0), slow_reps=1),
                note=f"traker 0.3.2 BasicProjector, proj_type={peer_kind} (block_size 100, torch RNG blocks "
                     "regenerated per call)")
        del proj
    except ImportError as e:  # pragma: no cover
        print(f"  trak unavailable: {e}")
