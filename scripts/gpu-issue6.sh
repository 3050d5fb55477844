#!/usr/bin/env bash
# Issue 6 on a lent GPU in ONE call of about 6-8 minutes (a session's device time is 15 minutes, the machine's
# start included, so there is room for one rerun at most). Prepare here first:
#   bash scripts/fetch-gpu-peers.sh          # TRAK's CUDA projector as files (the GPU machine has no network)
#   run(command="bash scripts/gpu-issue6.sh", carry=[".gpu-peers"], timeout_s=540)
# Order (each step time-boxed, every log under $OUT, which comes back even when the call is cut off):
#   1. build gradkit with its CUDA kernels for sm_90 only, and fast_jl beside it in the background;
#   2. benchmarks/bench_gpu.py: ceilings, generator agreement, flat / factored / search (each row checks its
#      result on the device first);
#   3. the GPU tests of the projection / factored / search ops (tests/test_*_ops.py, their CUDA cases).
# Then commit $OUT's gpu-issue6.{jsonl,md} under benchmarks/results/h200/, give the machine back, and compare
# with the predictions in benchmarks/GPU-NOTES.md ("What the results decide").
# DRY=1 checks the script itself on a CPU machine: no build (the installed extension), bench_gpu.py --smoke.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gradkit-gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-14}
T0=$SECONDS
{ $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', \
triton.__version__, torch.cuda.get_device_name())"; nvidia-smi --query-gpu=name,driver_version,clocks.sm,\
clocks.max.sm,memory.total --format=csv; nproc; } 2>&1 | tee "$OUT/env.txt"
PEERS=/tmp/gpu-peers
if ls .gpu-peers/fast_jl-*.tar.gz >/dev/null 2>&1; then
  bash scripts/build-gpu-peers.sh "$PEERS" 300 > "$OUT/peers-build.txt" 2>&1 &
  PEERS_PID=$!
else
  echo "no .gpu-peers/: TRAK's fast_jl rows are skipped (bash scripts/fetch-gpu-peers.sh here first)"
  PEERS_PID=
fi
DRY=${DRY:-0}
BENCH_ARGS=()
[ "$DRY" = 1 ] && BENCH_ARGS=(--smoke --device cpu) && export TRITON_INTERPRET=1
echo "== build ($((SECONDS - T0)) s)"
if [ "$DRY" = 1 ]; then
  echo "DRY=1: no build"
elif ! timeout 300 $PY -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.txt" 2>&1; then
  tail -40 "$OUT/build.txt"; echo "BUILD FAILED ($((SECONDS - T0)) s)"; exit 1
fi
[ "$DRY" = 1 ] || $PY -c "import gradkit._ext as e; assert e.LOADED and e.has_kernel('project_flat', 'CUDA'), \
'no CUDA kernels'" || exit 1
if [ -n "$PEERS_PID" ]; then
  wait "$PEERS_PID" && echo "fast_jl built" || { echo "fast_jl build failed:"; tail -15 "$OUT/peers-build.txt"; }
fi
export PYTHONPATH="$PEERS${PYTHONPATH:+:$PYTHONPATH}"
echo "== bench ($((SECONDS - T0)) s)"
timeout 240 $PY benchmarks/bench_gpu.py --out "$OUT" "${BENCH_ARGS[@]}" 2>&1 | tee "$OUT/bench.txt" | grep -v "^  " || true
echo "== tests ($((SECONDS - T0)) s)"
# -rA names every passed test: a run cut off by its time limit still says which ran (the first H200 run got
# through 55 GPU cases, all passing, in 150 s)
GRADKIT_REQUIRE_EXT=1 timeout 240 $PY -m pytest -q -rA -p no:cacheprovider tests/test_projection_ops.py \
  tests/test_factored_ops.py tests/test_search_ops.py tests/test_composite_ops.py -k "gpu or cuda" 2>&1 | \
  tee "$OUT/pytest.txt" | tail -12
echo "== done ($((SECONDS - T0)) s)"
