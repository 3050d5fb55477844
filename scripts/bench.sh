#!/usr/bin/env bash
# The main job, from a clean clone: sets up .venv (scripts/setup-env.sh), then runs the benchmark
# harness on its default workload (every family in benchmarks/run.py's FAMILIES, 2 CPU threads) side
# by side with plain torch and the peers (gradiend, sparsekit, bergson, TRAK, faiss), prints the ratio
# tables and writes benchmarks/results/<family>-<device>-<threads>t.{jsonl,md,png}. Extra arguments go
# to the runner (e.g. --family projection, --quick).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
# shellcheck disable=SC1091
. .venv/bin/activate
GRADKIT_REQUIRE_EXT=1 gradkit bench "$@"
