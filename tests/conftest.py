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


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


_FLAGS = _cpu_flags()
# The instruction-set levels of the CPU kernels this CPU can run, best first (x86: read from /proc/cpuinfo,
# as the kernels' __builtin_cpu_supports reads cpuid). "portable" always: the loops other CPUs run.
CPU_ISAS = (["avx512"] if "avx512f" in _FLAGS else []) + \
    (["avx2"] if {"avx2", "fma", "f16c"} <= _FLAGS else []) + ["portable"]


@contextlib.contextmanager
def env_set(name, value):
    """os.environ[name] = value inside the block, then what it was (usable inside hypothesis tests, where
    pytest's function-scoped monkeypatch is not)."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def use_backend(name):
    """Run API calls through one backend (Triton under the interpreter on a CPU machine)."""
    return env_set("GRADKIT_BACKEND", name)
