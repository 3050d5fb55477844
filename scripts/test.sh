#!/usr/bin/env bash
# The test suite, from a clean clone: sets up .venv (scripts/setup-env.sh), then runs pytest with
# the compiled extension required (GRADKIT_REQUIRE_EXT=1) and the bounded `ci` hypothesis profile.
# HYPOTHESIS_PROFILE=deep bash scripts/test.sh   runs the long property search by hand. The 30 slowest tests are
# listed at the end, to keep the suite inside its 20-minute CI budget.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export GRADKIT_REQUIRE_EXT=1 HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-ci}"
python -m pytest -q --durations=30 tests "$@"
