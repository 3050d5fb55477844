#!/usr/bin/env bash
# On the GPU machine: install TRAK (traker wheel) and build its CUDA projector fast_jl from the files that
# scripts/fetch-gpu-peers.sh put in .gpu-peers/, into the folder $1 (put it on PYTHONPATH); $2: the build's
# time limit in seconds (default 300). Used by scripts/gpu-issue6.sh and scripts/gpu-issue6-variants.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PEERS=$1
LIMIT=${2:-300}
PY=${PYTHON:-python3}
$PY -m pip install -q --no-deps --no-index --target "$PEERS" .gpu-peers/traker-*.whl
rm -rf /tmp/fast_jl-src && mkdir -p /tmp/fast_jl-src && tar xzf .gpu-peers/fast_jl-*.tar.gz -C /tmp/fast_jl-src
# fast_jl's setup.py asks for compute_70, which CUDA 13 dropped (the H200 image's nvcc, 2026-12-04)
cd /tmp/fast_jl-src/fast_jl-* && touch README.rst && sed -i 's/7.0+PTX/9.0/' setup.py
MAX_JOBS=8 timeout "$LIMIT" $PY -m pip install -q --no-deps --no-build-isolation --no-index --target "$PEERS" .
