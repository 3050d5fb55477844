"""The Triton backend compiles for a real GPU (sm_90, to cubin) on a machine without one.

The interpreter accepts code the GPU compiler rejects; scripts/triton_aot_check.py records every
kernel launch of representative calls under the interpreter, then compiles each recorded signature
with triton.compile for GPUTarget("cuda", 90, 32) through the ptxas shipped in the triton wheel."""
import json
import os
import subprocess
import sys

import pytest

from conftest import background_result

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_triton_launch_compiles_for_sm90():
    pytest.importorskip("triton")
    # scripts/triton_aot_check.py, started at collection beside the rest of the suite (conftest.py,
    # BACKGROUND_TESTS)
    rc, out = background_result("triton_aot", timeout=900)
    assert rc == 0, out[-4000:]
    assert "compiled" in out and "FAIL" not in out, out[-4000:]
    last = out.rsplit("compiled ", 1)[1]  # the summary over all compile processes
    n, total = int(last.split("/")[0]), int(last.split("/")[1].split()[0])
    assert n == total >= 40, out[-2000:]  # every op, dtype and index-width variant was recorded and compiled


def test_flat_kernel_aligned_path_vectorises_x_loads():
    """benchmarks/sass_census.py: with col0 % 64 == 0 (ALIGNED) the flat kernel's x tile arrives through
    16-byte cp.async for sm_90, with fewer loop instructions and registers than the unaligned path's scalar
    2-byte loads; both compiled as the runtime specialises the issue's launch (64 x 2^20 -> 2048)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "sass_census.py"), "--json"],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    rows = {row["case"]: row for row in map(json.loads, r.stdout.splitlines())}
    for dt in ("bf16", "fp32"):
        al, un = rows[f"shipped {dt} x, aligned col0"], rows[f"shipped {dt} x, unaligned col0"]
        assert al["ops"].get("LDGSTS.E.BYPASS.128", 0) > 0, al
        assert not any(op.startswith("LDG.E.") for op in al["ops"]), al
        assert al["loop_instructions"] < un["loop_instructions"], (al, un)
        assert al["ops"].get("HGMMA.64", 0) > 0
    assert rows["shipped bf16 x, unaligned col0"]["ops"].get("LDG.E.U16", 0) > 0
    assert rows["shipped bf16 x, aligned col0"]["registers"] < rows["shipped bf16 x, unaligned col0"]["registers"]


def _aot_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gradkit_triton_aot_check",
                                                  os.path.join(ROOT, "scripts", "triton_aot_check.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_pairwise_cover_keeps_every_setting_and_pair():
    """AOT_COVER=pairs (the suite's compile check in the `ci` profile) compiles a subset in which every kernel,
    every setting of it and every pair of settings some recorded launch holds still appears; a launch adding
    nothing is dropped; the choice does not depend on anything but the list."""
    aot = _aot_module()

    def rec(kernel, x, y, w, n=None):
        return ({"module": "m", "kernel": kernel, "signature": {"x": x, "y": y}, "constexprs": {"W": w},
                 "options": {}, "ints": {}}, {} if n is None else {"n": n}, "")

    jobs = [rec("k", x, y, w) for x in ("*fp32", "*bf16") for y in ("*fp32", "*bf16") for w in (1, 2)]
    jobs += [rec("k", "*fp32", "*fp32", 1), rec("other", "*fp32", "*fp32", 4, n=16)]  # a duplicate; another kernel
    cover = aot._pairwise_cover(jobs)
    want = set().union(*map(aot._features, jobs))
    assert set().union(*map(aot._features, cover)) == want
    assert len(cover) < len(jobs) - 1  # the duplicate and at least one of the 8 full-factorial launches go
    assert len(cover) >= 4  # 2 x 2 values of x and y: four launches at the least
    assert {j[0]["kernel"] for j in cover} == {"k", "other"}
    assert aot._pairwise_cover(list(jobs)) == cover
    # a pair held by one launch only keeps that launch
    lone = rec("k", "*fp16", "*bf16", 3)
    assert lone in aot._pairwise_cover(jobs + [lone])
