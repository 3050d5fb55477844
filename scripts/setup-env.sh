#!/usr/bin/env bash
# Creates/updates .venv with everything gradkit needs to build, test and benchmark:
# torch 2.13.0 first (the CPU wheel on these machines; never a bare `torch`), the build and
# test tools, the peers (scripts/install-peers.sh), then the extension itself
# (--no-build-isolation: it builds against the torch already installed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install -q torch==2.13.0
python -m pip install -q "setuptools>=64" wheel ninja==1.13.2 numpy==2.4.6 safetensors==0.8.0 tqdm==4.70.1 \
  pytest==9.2.0 hypothesis==6.170.15 expecttest matplotlib==3.11.2 triton==3.9.0
PYTHON=python bash scripts/install-peers.sh
MAX_JOBS=${MAX_JOBS:-2} python -m pip install -q --no-build-isolation --no-deps -e .
python -c "import gradkit, gradkit._ext as e; assert e.LOADED, e.ERROR; print('gradkit', gradkit.__version__, 'extension loaded')"
