#!/usr/bin/env bash
# Longer than one lease (15 minutes of device time a session): for issue 6's GPU targets run
# scripts/gpu-issue6.sh instead. For a session that is lent a GPU (the device tool): build the extension
# WITH its CUDA kernels against the device image's own CUDA torch, run the whole test suite there (every op test is
# parametrised over "cuda" when a GPU is visible; Triton then compiles for the GPU instead of
# running under the interpreter) and the benchmark on the GPU. No network there: gradiend is
# carried as a wheel in wheels/ when present (pip download gradiend==0.2.3 --no-deps -d wheels/
# on the CPU machine first), otherwise its parity tests are skipped by --ignore.
#   run(command="bash scripts/gpu-check.sh", carry=["wheels"])
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gradkit-gpu-out}
mkdir -p "$OUT"
$PY -c "import torch; assert torch.cuda.is_available(); print('torch', torch.__version__, torch.cuda.get_device_name())"
if ls wheels/gradiend-*.whl >/dev/null 2>&1; then $PY -m pip install -q --no-deps --no-index wheels/gradiend-*.whl; fi
MAX_JOBS=${MAX_JOBS:-16} $PY -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -5
$PY -c "import gradkit._ext as e; assert e.LOADED and e.has_kernel('gather_segments', 'CUDA'), 'CUDA kernels not built'"
IGNORE=()
$PY -c "import gradiend" 2>/dev/null || IGNORE=(--ignore=tests/test_compat_gradiend.py)
# tests/test_*_triton.py run Triton on CPU tensors under the interpreter; on a GPU machine gradkit's import has
# already compiled-mode Triton kernels (TRITON_INTERPRET is read when @triton.jit runs), so they get a process
# of their own with the interpreter on from the start. The GPU's Triton kernels are tested by the ops' GPU cases.
TRITON_TESTS=(tests/test_*_triton.py)
for f in "${TRITON_TESTS[@]}"; do IGNORE+=("--ignore=$f"); done
GRADKIT_REQUIRE_EXT=1 $PY -m pytest -q tests "${IGNORE[@]}" -x 2>&1 | tee "$OUT/pytest.txt" | tail -15
TRITON_INTERPRET=1 GRADKIT_REQUIRE_EXT=1 $PY -m pytest -q "${TRITON_TESTS[@]}" -x 2>&1 | tee "$OUT/pytest-triton.txt" | tail -5
GRADKIT_BACKEND=triton GRADKIT_REQUIRE_EXT=1 $PY -m pytest -q tests/test_parammap_ops.py -x -k "not opcheck" 2>&1 | tail -3
$PY benchmarks/run.py --device cuda --out "$OUT" 2>&1 | tail -40
