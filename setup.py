"""Builds gradkit._C: C++ CPU kernels always, CUDA kernels only against a CUDA torch with CUDA_HOME set.

    pip install torch==2.13.0 && pip install --no-build-isolation -e .
"""
import glob
import os
import platform
import sys

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover - the message is the point
    sys.exit("gradkit: install torch first (pip install torch==2.13.0), then build with --no-build-isolation")

ROOT = os.path.dirname(os.path.abspath(__file__))
MIN_TORCH = (2, 10)  # the oldest torch whose torch.library API (register_fake, opcheck) gradkit uses


def _minor_release(version: str) -> tuple:
    """(major, minor) of a torch version string ("2.13.0+cpu", "2.14.0a0+git1234" -> (2, 14))."""
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int(minor)


if _minor_release(torch.__version__) < MIN_TORCH:
    sys.exit(f"gradkit: needs torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]}, found {torch.__version__} "
             "(pip install torch==2.13.0, then build with --no-build-isolation)")


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def extensions():
    sources = _rel([os.path.join(ROOT, "csrc", "ops.cpp")] + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    # -fno-math-errno -fno-trapping-math: sqrt and selects may then vectorise (gradkit never reads errno or
    # FP exception flags); results are unchanged (no reassociation, IEEE rounding). -ffp-contract=off: GCC's
    # C++ default fuses a * b + c into one FMA wherever the target has one, so the same source would round
    # differently by ISA (the AVX-512 functions, an aarch64 build); every FMA the kernels do is written out
    # -g0: Python's CFLAGS ask for debug info (-g), which made _C 43 MB for nothing a user runs; GRADKIT_DEBUG=1
    # keeps it for a debugger session.
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off",
           "-DGRADKIT_CPU"] + ([] if os.environ.get("GRADKIT_DEBUG", "0") == "1" else ["-g0"])
    if platform.machine() in ("x86_64", "AMD64"):
        cxx.append("-march=x86-64-v2")  # POPCNT/SSE4.2 (every x86-64 CPU since ~2009): popcount is one instruction
    link = ["-fopenmp"]
    cuda_sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    want_cuda = os.environ.get("GRADKIT_NO_CUDA", "0") != "1"
    reason = None
    if not want_cuda:
        reason = "GRADKIT_NO_CUDA=1"
    elif torch.version.cuda is None:
        reason = f"torch {torch.__version__} is a CPU build (torch.version.cuda is None)"
    elif cpp_extension.CUDA_HOME is None:
        reason = "CUDA_HOME is not set and nvcc was not found"
    elif not cuda_sources:  # e.g. an sdist made without them (MANIFEST.in grafts csrc/ to prevent that)
        reason = f"no CUDA sources in {os.path.join(ROOT, 'csrc', 'cuda')}"
    if reason is None:
        print(f"gradkit: building CUDA kernels {cuda_sources} against CUDA {torch.version.cuda}")
        return [cpp_extension.CUDAExtension(
            "gradkit._C", sources + cuda_sources,
            extra_compile_args={"cxx": cxx + ["-DGRADKIT_CUDA"], "nvcc": ["-O3", "-std=c++20", "-DGRADKIT_CUDA"]},
            extra_link_args=link)]
    print(f"gradkit: skipping CUDA kernels: {reason}; building CPU kernels only")
    return [cpp_extension.CppExtension("gradkit._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)]


# Everything gradkit imports, at module level or on a code path every user reaches (pyyaml: a bergson index's
# processor_config.yaml, without which its projection reads as unknown and search(projection=) misjudges it);
# the optional imports are pyproject.toml's extras, faiss (search(backend="faiss")) and the compat layers' peers.
REQUIRES = ["numpy", "safetensors>=0.4", "tqdm", "pyyaml"]


def torch_requirement(version: str = torch.__version__) -> str:
    """torch at the minor release gradkit._C is compiled against ("2.13.0+cpu" -> "torch==2.13.*", local labels
    such as +cpu / +cu128 matching): the extension links torch's C++ API, whose ABI changes between releases."""
    major, minor = _minor_release(version)
    return f"torch=={major}.{minor}.*"


setup(install_requires=REQUIRES + [torch_requirement()], ext_modules=extensions(),
      cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)})
