#!/usr/bin/env bash
# Run HERE (the CPU machine has the network) before scripts/gpu-issue6.sh: the GPU machine reaches no
# registry, so TRAK's CUDA projector travels as files in .gpu-peers/ (git-ignored; carry it):
#   a traker 0.3.2 wheel (pure Python, built here from its sdist; numpy, torch, tqdm are on the GPU image)
#   and the fast_jl 0.1.3 source distribution (one .cu file; built there against the image's CUDA torch).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu-peers
PY=${PYTHON:-python3}
$PY -m pip wheel -q --no-deps -w .gpu-peers traker==0.3.2  # PyPI has its sdist only; the wheel is pure Python
# pip download would run fast_jl's setup.py (it needs a CUDA torch): take the sdist from PyPI's JSON API
url=$($PY - <<'PY'
import json, urllib.request
d = json.load(urllib.request.urlopen("https://pypi.org/pypi/fast_jl/json", timeout=60))
print(next(u["url"] for u in d["releases"]["0.1.3"] if u["packagetype"] == "sdist"))
PY
)
$PY -c "import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], '.gpu-peers/fast_jl-0.1.3.tar.gz')" "$url"
ls -la .gpu-peers
