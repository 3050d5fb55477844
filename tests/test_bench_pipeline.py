"""benchmarks/bench_pipeline.py (the whole attribution build, gradkit against bergson's collect_gradients) in
quick mode, so that `bash scripts/bench.sh` cannot rot unnoticed: both indexes pass the benchmark's own checks
(rows, width, every example its own top-1) and the timed rows, with the per-round ratio, are recorded."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def test_pipeline_benchmark_quick():
    import bergson  # noqa: F401  (installed wherever the suite runs: scripts/install-peers.sh; never skipped)
    import bench_pipeline
    from harness import Recorder

    rec = Recorder("cpu", min_run_time=0.1)
    bench_pipeline.run(rec, quick=True)
    rows = {r["provider"]: r for r in rec.rows}
    assert set(rows) == {"gradkit", "bergson", "bergson / gradkit, same round"}, rows
    assert all(r["op"] == "index build (GPT-2, whole pipeline)" for r in rec.rows)
    assert rows["gradkit"]["p50"] > 0 and rows["bergson"]["p50"] > 0
    assert rows["bergson / gradkit, same round"]["metric"] == "ratio (x)"
