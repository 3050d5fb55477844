"""Loads the compiled extension gradkit._C (which registers torch.ops.gradkit.*).

With ``GRADKIT_REQUIRE_EXT=1`` (CI sets it) a missing or broken extension is an
ImportError; otherwise gradkit warns once and runs the plain-PyTorch references.
"""
from __future__ import annotations

import os
import warnings

LOADED = False
ERROR: Exception | None = None

import torch  # noqa: F401  (libc10/libtorch must be loaded before _C)

try:
    from gradkit import _C  # noqa: F401  (import registers the ops)

    LOADED = True
except ImportError as exc:  # pragma: no cover - exercised only without a build
    ERROR = exc
    if os.environ.get("GRADKIT_REQUIRE_EXT", "0") == "1":
        raise ImportError(
            "gradkit: the compiled extension gradkit._C failed to load and GRADKIT_REQUIRE_EXT=1 is set; "
            "build it with `pip install --no-build-isolation -e .` after `pip install torch==2.13.0`"
        ) from exc
    warnings.warn(
        f"gradkit: compiled extension not available ({exc}); falling back to the slow plain-PyTorch "
        "references. Build with `pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=2,
    )


def has_kernel(op: str, dispatch_key: str) -> bool:
    """True when ``gradkit::<op>`` has a kernel registered for ``dispatch_key`` (e.g. "CUDA")."""
    if not LOADED:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"gradkit::{op}", dispatch_key)


def register_triton_for_cuda(family: str, names) -> None:
    """Register ``gradkit.kernels.triton.<family>.<name>`` as the CUDA kernel of ``gradkit::<name>`` for
    each name whose schema the extension declares but that has no CUDA kernel (an extension built without
    CUDA C++): Triton is then the GPU kernel. Needs a CUDA device; without triton (or the launcher) the op
    keeps no CUDA kernel and CUDA tensors get the dispatcher's error."""
    if not LOADED or not torch.cuda.is_available():
        return
    try:
        import importlib

        mod = importlib.import_module(f"gradkit.kernels.triton.{family}")
    except Exception:  # pragma: no cover - triton (or this family's launchers) missing
        return
    from gradkit.kernels.triton import cuda_kernel

    for name in names:
        if has_op(name) and not has_kernel(name, "CUDA") and hasattr(mod, name):
            # the op's checks first (as the C++ kernels'), then the launcher on the tensors' GPU, not the current
            # one (Triton launches on the current device)
            torch.library.impl(f"gradkit::{name}", "CUDA")(cuda_kernel(family, name))


def has_op(op: str) -> bool:
    """True when the loaded extension declares the schema ``gradkit::<op>``."""
    if not LOADED:
        return False
    try:
        torch._C._dispatch_find_schema_or_throw(f"gradkit::{op}", "")
        return True
    except RuntimeError:
        return False


def ops_package_stacklevel() -> int:
    """The ``_stacklevel`` that attributes a fake-impl registration to ``gradkit.ops``.

    csrc/ops.cpp declares gradkit.ops (``m.set_python_module``) as the home of every fake impl and
    torch checks the registering module; family modules (gradkit/ops/<family>.py) are imported by
    gradkit/ops/__init__.py, so the nearest ``gradkit.ops`` frame on the stack is the one to name."""
    import sys

    f, level = sys._getframe(1), 1
    while f is not None:
        if f.f_globals.get("__name__") == "gradkit.ops":
            return level
        f, level = f.f_back, level + 1
    return 1
