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


def _check_jl(y: torch.Tensor, x: torch.Tensor, scale: float, who: str) -> None:
    """A peer's timed output is a projection of x (its own matrix is not at hand at full size): every row's norm is
    ``scale`` times x's within the JL spread for k, and the rows' cosines are x's within it (a no-op, a partial D,
    the wrong k or scale fails). The benchmark's x has i.i.d. Gaussian rows, nearly orthogonal."""
    k = y.shape[1]
    tol = 6.0 / k ** 0.5  # ~6 sigma of |y|^2 / |x|^2 - 1 and of the cosines, for k >= 64
    yd, xd = y.double(), x.double()
    ratio = yd.norm(dim=1) ** 2 / (xd.norm(dim=1) ** 2 * scale ** 2)
    if y.shape != (x.shape[0], k) or not torch.isfinite(yd).all() or (ratio - 1).abs().max() > tol:
        raise AssertionError(f"{who}: its output is not a projection of x (shape {tuple(y.shape)}, |y|^2 / "
                             f"(scale |x|)^2 from {float(ratio.min()):.3g} to {float(ratio.max()):.3g})")
    cy = torch.nn.functional.normalize(yd, dim=1) @ torch.nn.functional.normalize(yd, dim=1).T
    cx = torch.nn.functional.normalize(xd, dim=1) @ torch.nn.functional.normalize(xd, dim=1).T
    if (cy - cx).abs().max() > tol:
        raise AssertionError(f"{who}: its rows' cosines differ from x's by {float((cy - cx).abs().max()):.3g}")


def _flat_rows(rec, kind: str, x: torch.Tensor, k: int, note: str) -> None:
    """One flat projection x (B, D) -> (B, k) of ``kind`` by gradkit, bergson's ``project_global`` and TRAK's
    ``BasicProjector`` (its ``rademacher`` / ``normal`` projection types), side by side. Every provider gets the
    same samples (3 after a warm-up; until session 34 the peers got 1, so a single draw on a noisy host was set
    against gradkit's median), and each peer's last timed output is checked to be a projection of x."""
    B, D = x.shape
    wl, dt, op = f"{B}x{D}->{k}", "float32", f"flat {kind}"
    reps = 3
    rec.add(FAMILY, op, "gradkit", wl, dt, rec.time(lambda: P.project(x, k, seed=0, kind=kind), slow_reps=reps),
            note=note)
    peer_kind = "rademacher" if kind == "rademacher" else "normal"
    last = {}

    def keep(who, fn):
        def run():
            last[who] = fn()
            return last[who]
        return run

    try:
        from bergson.collector.collector import project_global

        rec.add(FAMILY, op, "bergson 2.5.1", wl, dt,
                rec.time(keep("bergson", lambda: project_global("bench/single", x, k, peer_kind)), slow_reps=reps),
                note=f"bergson.collector.collector.project_global(..., '{peer_kind}'): Philox column blocks (numpy) "
                     "+ addmm_ ('normal' is its default)")
        _check_jl(last.pop("bergson"), x, 1.0, "bergson project_global")  # scaled by 1/sqrt(k)
    except ImportError as e:  # pragma: no cover
        print(f"  bergson unavailable: {e}")
    try:
        from trak.projectors import BasicProjector, ProjectionType

        proj = BasicProjector(grad_dim=D, proj_dim=k, seed=0, proj_type=ProjectionType(peer_kind),
                              device=torch.device("cpu"))
        rec.add(FAMILY, op, "trak BasicProjector", wl, dt,
                rec.time(keep("trak", lambda: proj.project(x, model_id=0)), slow_reps=reps),
                note=f"traker 0.3.2 BasicProjector, proj_type={peer_kind} (block_size 100, torch RNG blocks "
                     "regenerated per call)")
        _check_jl(last.pop("trak"), x, k ** 0.5, "trak BasicProjector")  # +-1 / N(0, 1) entries, unscaled
        del proj
    except ImportError as e:  # pragma: no cover
        print(f"  trak unavailable: {e}")
