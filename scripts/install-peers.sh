#!/usr/bin/env bash
# Installs the peer libraries gradkit is measured and tested against, into the active
# environment, WITHOUT replacing torch: their own dependency lists would pull another torch
# (or torchvision/torchaudio/bitsandbytes), so they go in with --no-deps plus what they import.
# Run after `pip install torch==2.13.0`.
set -euo pipefail
PY=${PYTHON:-python}
$PY -c "import torch" || { echo "install-peers: install torch==2.13.0 first" >&2; exit 1; }
# (pip then reports that bergson lacks torchvision/torchaudio/bitsandbytes: intentional, they are not needed)
$PY -m pip install -q --no-deps gradiend==0.2.3 sparsekit==0.1.5 bergson==2.5.1 traker==0.3.2
$PY -m pip install -q faiss-cpu==1.15.1 transformers==5.23.0 pandas==3.1.1 datasets==5.2.0 simple-parsing \
  natsort accelerate==1.15.0 peft==0.21.2 pyarrow==26.0.1 jinja2 torchopt ml_dtypes petname jaxtyping scipy==1.17.1
$PY - <<'PY'
import torch
assert torch.__version__.startswith("2.13.0"), f"a peer replaced torch: {torch.__version__}"
import gradiend, sparsekit, bergson, trak, faiss  # noqa: F401
print("install-peers: gradiend, sparsekit, bergson, trak, faiss importable; torch", torch.__version__)
PY
