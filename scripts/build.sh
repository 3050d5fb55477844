#!/usr/bin/env bash
# Rebuild the extension in place (.venv), serialised by a lock so parallel workers never build at once.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. .venv/bin/activate
exec flock /tmp/gradkit-build.lock env MAX_JOBS="${MAX_JOBS:-2}" pip install --no-build-isolation --no-deps -e . -q
