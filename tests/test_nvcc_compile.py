"""Compile-only check of the CUDA C++ kernels (csrc/cuda/*.cu) with nvcc.

Runs scripts/nvcc_check.sh, which needs nvcc and torch's headers but no GPU and no CUDA
build of torch. Skipped only when nvcc is not on PATH (CI machines have it). The script also fails a file
whose header list (nvcc -MD) holds ATen/Functions.h or an umbrella header that includes it: the slim
includes keep this, the suite's slowest test, about 85 s shorter on 2 cores.
"""
import glob
import os
import shutil

import pytest

from conftest import background_result

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH; cannot compile-check csrc/cuda/*.cu")
def test_cuda_sources_compile_with_nvcc():
    # scripts/nvcc_check.sh with PYTHON = this interpreter (its torch gives the headers); started at collection
    # beside the rest of the suite (conftest.py, BACKGROUND_TESTS)
    rc, out = background_result("nvcc", timeout=1800)
    assert rc == 0, f"scripts/nvcc_check.sh failed (rc={rc}):\n{out[-20000:]}"
    assert "nvcc_check: all" in out, out[-5000:]
    assert out.count("nvcc_check: OK ") == len(SOURCES), out[-5000:]
