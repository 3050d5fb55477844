"""Build the CUDA C++ kernels of csrc/cuda/<stem>.cu for the CPU emulator (tests/cuda_emu/<stem>_emu.cpp, plain
C++ with GRADKIT_CUDA_EMU) into one library, torch.ops.gradkit_cuda_emu[_<stem>].*.

Two callers share this one definition of the build (sources, flags, library name), so that they agree on what
ninja has to produce:
* tests/conftest.py starts `python tests/cuda_emu/build.py DIR` in the background at collection (with
  MAX_JOBS set to the core count at nice 19: it takes the cores the tests running meanwhile leave idle);
* tests/test_cuda_emulated.py's emu() waits for that job, then calls build(DIR) in the test process: ninja finds
  every object up to date and the library is only loaded. Without a background job (GRADKIT_TEST_FOREGROUND=1,
  or a run that selected no emulator test at collection) build(DIR) compiles it then.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
STEMS = ("projection", "obs", "search", "adamw", "golden", "parammap", "scope")
NAME = "gradkit_cuda_emu_all"


def build(build_dir):
    """Compile (or find up to date) and load the emulator library built in `build_dir`."""
    from torch.utils import cpp_extension

    cpp_extension.load(name=NAME, sources=[os.path.join(HERE, s + "_emu.cpp") for s in STEMS],
                       extra_include_paths=[os.path.join(HERE, "shim"), HERE, os.path.join(ROOT, "csrc", "cuda")],
                       extra_cflags=["-O2", "-ffp-contract=off", "-DGRADKIT_CUDA_EMU", "-DGK_MAX_GRID_Y=1"],
                       is_python_module=False, build_directory=build_dir, verbose=False)


if __name__ == "__main__":
    if len(sys.argv) != 2 or not os.path.isdir(sys.argv[1]):
        sys.exit("usage: python tests/cuda_emu/build.py BUILD_DIR (an existing directory)")
    build(sys.argv[1])
    print(f"cuda_emu: built {NAME} in {sys.argv[1]}")
