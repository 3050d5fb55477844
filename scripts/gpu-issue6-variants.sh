#!/usr/bin/env bash
# Issue 6 on a lent GPU, second call (after scripts/gpu-issue6.sh): no C++ build. Builds TRAK's fast_jl in the
# background (scripts/build-gpu-peers.sh), while
# benchmarks/gpu_flat_variants.py checks and times the Triton flat kernel's generation variants; then the
# fast_jl rows and the blocked-search rows. At most ~6.5 minutes (timeouts 80 + 75 + 150 + 90 s; EXTRAS_ONLY=1:
# fast_jl and search only):
#   run(command="bash scripts/gpu-issue6-variants.sh", carry=[".gpu-peers"], timeout_s=420)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gradkit-gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
T0=$SECONDS
PEERS=/tmp/gpu-peers
bash scripts/build-gpu-peers.sh "$PEERS" 240 > "$OUT/peers-build.txt" 2>&1 &
PEERS_PID=$!
export PYTHONPATH="$PEERS:$PWD/python"
# fp32 x accuracy over the full D: the shipped single MMA chain against per-group / per-part accumulators
# (benchmarks/GPU-NOTES.md, "Measured"); ACCURACY=0 skips it
[ "${ACCURACY:-1}" = 1 ] && timeout 80 $PY benchmarks/gpu_flat_variants.py --out "$OUT" --accuracy 2>&1 | \
  tee "$OUT/accuracy.txt"
# the Gluon kernels (TRANS 6 / 7, never run before session 15's lease) alone first, at the shipped tiles and beside
# the old kernel's copy: a wrong mbarrier phase would hang the process, and this timeout then costs ~1 minute
# instead of the whole variants step
[ "${EXTRAS_ONLY:-0}" = 1 ] || \
  timeout 75 $PY benchmarks/gpu_flat_variants.py --out "$OUT" --no-extras --trans 0,6,7 --max-tile 1 \
    --stem gpu-flat-gluon 2>&1 | tee "$OUT/gluon.txt"
[ "${EXTRAS_ONLY:-0}" = 1 ] || \
  timeout 150 $PY benchmarks/gpu_flat_variants.py --out "$OUT" --budget-s 110 --no-extras --skip-trans 6,7 2>&1 | \
    tee "$OUT/variants.txt"
wait "$PEERS_PID" && echo "fast_jl built ($((SECONDS - T0)) s)" || { echo "fast_jl build failed:"; grep -m5 -i "error\|fatal" "$OUT/peers-build.txt"; }
timeout 90 $PY benchmarks/gpu_flat_variants.py --out "$OUT" --extras-only 2>&1 | tee "$OUT/extras.txt"
echo "== done ($((SECONDS - T0)) s)"
