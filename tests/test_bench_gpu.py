"""benchmarks/bench_gpu.py (issue 6's GPU targets, run by scripts/gpu-issue6.sh on a lent GPU) is tested here
on tiny sizes so that a short GPU lease is not spent on a broken script: every section runs (the C++ CPU kernels
stand in for CUDA C++, Triton runs under the interpreter), every row checks its result first, and a wrong
result is reported as a failure (exit status 1) and not timed."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def test_smoke_run_writes_every_section(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", GRADKIT_BACKEND="native")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_gpu.py"), "--smoke", "--device",
                           "cpu", "--out", str(tmp_path)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "failures: none" in proc.stdout
    rows = [json.loads(line) for line in open(tmp_path / "gpu-issue6-smoke.jsonl")]
    got = {(r["op"], r["provider"], r["metric"]) for r in rows}
    for want in [("copy (read + write)", "torch", "GB/s"), ("mm bf16 (ceiling)", "torch", "TFLOP/s"),
                 ("flat rademacher B=8 bfloat16", "torch x @ R^T (R stored, bf16)", "seconds"),
                 ("flat rademacher B=8 float32", "gradkit C++ (CPU)", "seconds"),
                 ("flat rademacher B=8 float32", "gradkit Triton", "% of bf16 mm 8192^3"),
                 ("flat rademacher B=8 bfloat16", "gradkit Triton", "% of same-shape bf16 mm"),
                 ("factored (hook work)", "torch composite (bergson's math)", "seconds"),
                 ("factored (hook work)", "gradkit C++ (CPU)", "TFLOP/s"),
                 ("factored (hook work)", "gradkit Triton", "seconds"),
                 ("search top-10", "torch mm + topk", "seconds"), ("search top-10", "gradkit Triton", "seconds"),
                 ("flat tiles B=8 bfloat16", "gradkit Triton b128 k128 d64 w8 s3", "TFLOP/s")]:
        assert want in got, want
    assert all(r["p50"] > 0 for r in rows)
    assert (tmp_path / "gpu-issue6-smoke.md").read_text().count("| gpu-issue6 |") == len(rows)


def test_a_wrong_result_is_a_failure_and_is_not_timed(tmp_path, monkeypatch):
    import bench_gpu
    from gradkit import projection

    monkeypatch.setenv("GRADKIT_BACKEND", "native")
    real = projection.project

    def off_by_one_column(x, k, seed=0, **kw):  # one output column of one row wrong
        y = real(x, k, seed=seed, **kw)
        y[0, 3] += 1.0
        return y

    monkeypatch.setattr(projection, "project", off_by_one_column)
    rc = bench_gpu.main(["--smoke", "--device", "cpu", "--only", "flat", "--out", str(tmp_path)])
    assert rc == 1
    rows = [json.loads(line) for line in open(tmp_path / "gpu-issue6-smoke.jsonl")]
    assert not [r for r in rows if r["provider"].startswith("gradkit")]
    md = (tmp_path / "gpu-issue6-smoke.md").read_text()
    assert "Failures:" in md and "flat rademacher B=8 float32 gradkit C++ (CPU)" in md
