"""Test configuration: hypothesis profiles and the Triton interpreter on GPU-less machines.

HYPOTHESIS_PROFILE=ci (default: bounded, derandomised) or deep (run by hand:
`HYPOTHESIS_PROFILE=deep python -m pytest tests`).
"""
import contextlib
import os

import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors under the interpreter (must be set before triton.jit runs).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", max_examples=40, derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("deep", max_examples=600, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

import gradkit  # noqa: E402,F401  (GRADKIT_REQUIRE_EXT=1 makes a broken build fail here)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@contextlib.contextmanager
def use_backend(name):
    """Run API calls through one backend (Triton under the interpreter on a CPU machine)."""
    old = os.environ.get("GRADKIT_BACKEND")
    os.environ["GRADKIT_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            del os.environ["GRADKIT_BACKEND"]
        else:
            os.environ["GRADKIT_BACKEND"] = old
