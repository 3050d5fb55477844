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


def _load_hint() -> str:
    """What to do about a gradkit._C that did not import, said for a checkout and an installed copy alike:
    a copy with no compiled extension needs a build; one whose _C is there but does not load (built against
    another torch, most often: torch's C++ ABI changes between releases) needs a rebuild against this torch."""
    import importlib.machinery

    here = os.path.dirname(os.path.abspath(__file__))
    found = [f for f in sorted(os.listdir(here))
             if f.startswith("_C.") and f.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))]
    how = ("`pip install --no-build-isolation{} .` (or `-e .`) in a gradkit source checkout, into this "
           f"environment (torch {torch.__version__})")
    if not found:
        return f"this copy of gradkit ({here}) has no compiled extension: build it with " + how.format("")
    return (f"{os.path.join(here, found[0])} is there but does not load with torch {torch.__version__} (built "
            "against another torch?): rebuild it with " + how.format(" --force-reinstall --no-deps"))


try:
    from gradkit import _C  # noqa: F401  (import registers the ops)

    LOADED = True
except ImportError as exc:  # pragma: no cover - exercised only without a build
    ERROR = exc
    if os.environ.get("GRADKIT_REQUIRE_EXT", "0") == "1":
        raise ImportError(
            f"gradkit: the compiled extension gradkit._C failed to load ({exc}) and GRADKIT_REQUIRE_EXT=1 is set; "
            + _load_hint()
        ) from exc
    warnings.warn(
        f"gradkit: compiled extension not available ({exc}); falling back to the slow plain-PyTorch "
        f"references; {_load_hint()}.",
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
