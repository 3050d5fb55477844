"""benchmarks/pair_ab.py (paired A/B of factored_project between two builds): its timing child and its argument
checks. The paired run itself builds a git worktree (minutes), so it is run by hand, not here."""
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "pair_ab.py")


def run(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_child_prints_one_positive_time(dtype):
    r = run("--child", "--shape", "40,3,5", "--dtype", dtype)
    assert r.returncode == 0, r.stderr
    t = float(r.stdout.split()[-1])
    assert 0.0 < t < 1.0  # seconds per call of a 15-token, 40-wide projection


@pytest.mark.parametrize("args, msg", [
    ((), "--base is required"),
    (("--base", "HEAD", "--pairs", "0"), "--pairs must be at least 1"),
    (("--base", "HEAD", "--env", "NOEQUALS"), "--env takes K=V"),
])
def test_bad_arguments_are_named(args, msg):
    r = run(*args)
    assert r.returncode == 2
    assert msg in r.stderr
