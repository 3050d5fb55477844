#!/usr/bin/env bash
# Issue 6 on a lent GPU, the default backend: build (sm_90), the GPU tests of the auto routes
# (tests/test_composite_ops.py) and of the signature fix, then benchmarks/bench_gpu_auto.py. About 3 minutes:
#   run(command="bash scripts/gpu-issue6-auto.sh", timeout_s=200)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gradkit-gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-16}
T0=$SECONDS
if ! timeout 130 $PY -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.txt" 2>&1; then
  tail -30 "$OUT/build.txt"; echo "BUILD FAILED ($((SECONDS - T0)) s)"; exit 1
fi
echo "== built ($((SECONDS - T0)) s)"
GRADKIT_REQUIRE_EXT=1 timeout 45 $PY -m pytest -q -p no:cacheprovider -rA tests/test_composite_ops.py \
  tests/test_cuda_signatures.py 2>&1 | tee "$OUT/pytest-auto.txt" | grep -E "PASSED|FAILED|ERROR|passed|failed" | tail -25
echo "== bench ($((SECONDS - T0)) s)"
GRADKIT_REQUIRE_EXT=1 timeout 40 $PY benchmarks/bench_gpu_auto.py --out "$OUT"
echo "== done ($((SECONDS - T0)) s)"
