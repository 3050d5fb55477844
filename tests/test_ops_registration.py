"""Where the extension has no CUDA C++ kernels (this CPU build), every op with a Triton launcher gets
that launcher as its CUDA kernel when a CUDA device is present (gradkit._ext.register_triton_for_cuda,
called once per family at import). Checked in a fresh interpreter that reports a CUDA device, so the
registrations do not leak into the other tests."""
import json
import os
import subprocess
import sys

import pytest

from gradkit import _ext

pytestmark = pytest.mark.skipif(not _ext.LOADED, reason="compiled extension not built")

_PROBE = r"""
import json, torch
torch.cuda.is_available = lambda: True  # what a GPU machine reports; nothing is launched
import importlib
from gradkit import _ext, ops
fams = {"projection": ops.PROJECTION_OPS, "obs": ops.OBS_OPS, "scope": ops.SCOPE_OPS, "golden": ops.GOLDEN_OPS,
        "adamw": ops.ADAMW_OPS, "search": ("score_topk",),
        "parammap": ("gather_segments", "gather_segments_out", "scatter_segments", "scatter_segments_",
                     "mask_to_indices", "bitmask_to_indices", "pack_bitmask", "topk_select",
                     "topk_select_segments")}
out = {}
for fam, names in fams.items():
    mod = importlib.import_module(f"gradkit.kernels.triton.{fam}")
    for n in names:
        if _ext.has_op(n):
            out[n] = [hasattr(mod, n), _ext.has_kernel(n, "CUDA")]
print(json.dumps(out))
"""


def test_triton_launchers_become_the_cuda_kernels():
    if _ext.has_kernel("factored_project", "CUDA"):
        pytest.skip("the extension has CUDA C++ kernels")
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    with_launcher = {n for n, (has, _) in got.items() if has}
    assert {"factored_project", "project_flat", "score_topk", "obs_schur_extend_", "gather_segments",
            "masked_adamw_"} <= with_launcher
    assert all(reg == has for n, (has, reg) in got.items()), got
    # and in this process (no CUDA device) nothing was registered
    assert not _ext.has_kernel("factored_project", "CUDA")
