"""benchmarks/gpu_flat_variants.py (the flat kernel's GPU experiments, scripts/gpu-issue6-variants.sh) on tiny
sizes under the Triton interpreter, so that a lease is not spent on a broken script: every generation variant
(GEN 0/1, TRANS 0/1) agrees with float64, the cheaper sign expansion is bit-identical to the shipped one, and
the fp32-x accumulation variants (ACC 0-3, whole and partial groups) agree with a full-D float64 product."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_flat_variants.py")


def _run(tmp_path, *args):
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, SCRIPT, "--smoke", "--out", str(tmp_path), *args], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc.stdout


def test_generation_variants_agree(tmp_path):
    _run(tmp_path)
    rows = [json.loads(line) for line in open(tmp_path / "gpu-flat-variants-smoke.jsonl")][1:]
    assert len(rows) == 20 and all(r["ok"] for r in rows)
    assert max(r["err_f64"] for r in rows) < 1e-6
    # GEN 1 draws the same matrix: with the shipped tiles and orientation its output is the shipped one's bits
    same = [r for r in rows if r["gen"] == 1 and r["trans"] == 0 and r["tile"] == rows[0]["tile"]]
    assert {(r["gen"], r["trans"]) for r in rows} == {(0, 0), (0, 1), (1, 0), (1, 1), (0, 2)}
    assert same and all(r["rel_vs_shipped"] == 0.0 for r in same)


def test_accumulation_variants_agree(tmp_path):
    out = _run(tmp_path, "--accuracy")
    rows = [json.loads(line) for line in open(tmp_path / "gpu-flat-accuracy-smoke.jsonl")]
    assert len(rows) == 12 and all(r["ok"] for r in rows), out[-2000:]
    assert {r["variant"].split(" k")[0] for r in rows} == {"acc0 group1", "acc1 group8", "acc1 group32",
                                                           "acc2 group1", "acc3 group1", "acc1 group3"}
