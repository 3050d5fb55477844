"""`gradkit` command line: `gradkit bench [...]` runs the benchmark harness of a source checkout
(every argument after `bench`, `--help` included, goes to `benchmarks/run.py`);
`gradkit info` prints what was built and which backend is active."""
from __future__ import annotations

import argparse
import os
import runpy
import sys


def _exit_status(code) -> int:
    """The process status ``sys.exit(code)`` would give: None 0, an int itself (a bool too: ``sys.exit(False)`` is
    status 0, ``sys.exit(True)`` 1, nothing printed), anything else (a message) printed to stderr and 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return int(code)
    print(code, file=sys.stderr)
    return 1


def _bench(rest) -> int:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = os.path.join(root, "benchmarks", "run.py")
    if not os.path.isfile(script):
        # an installed (non-editable) gradkit has no benchmarks/: the harness and its peers' set-up live in the
        # source repository only
        print(f"gradkit bench: the benchmark harness is not part of an installed gradkit ({script} does not "
              "exist; it ships in the source repository's benchmarks/ folder). In a gradkit source checkout run "
              "`python benchmarks/run.py [options]` (it benchmarks whichever gradkit is installed), or install "
              "the checkout in editable mode (`pip install --no-build-isolation -e .`) so that `gradkit bench` "
              "finds it.", file=sys.stderr)
        return 2
    argv = sys.argv
    sys.argv = [script] + list(rest)  # put back below: an in-process main() leaves the caller's argv alone
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        return _exit_status(exc.code)
    finally:
        sys.argv = argv
    return 0


def _info() -> int:
    import torch

    from gradkit import _ext, ops

    print(f"gradkit extension loaded: {_ext.LOADED}" + (f" ({_ext.ERROR})" if _ext.ERROR else ""))
    print(f"CUDA kernels compiled: {_ext.has_kernel('gather_segments', 'CUDA')}")
    import importlib.util

    try:
        has_triton = importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # pragma: no cover - a broken installation
        has_triton = False
    print("triton: " + ("installed" if has_triton else "not installed (no Triton kernels: pip install triton, "
                                                           "or gradkit's [triton] extra)"))
    b = ops.backend()
    if ops._requested() == "auto" and b == "native":  # what CUDA tensors get differs: say so
        dense = ("gradkit's own factored_project / score_topk kernels (torch allows TF32 float32 matmuls now, "
                 "which the cuBLAS composites would follow)" if ops.cublas_fp32_reduced()
                 else "cuBLAS factored_project / score_topk")
        flat = "Triton project_flat" if has_triton else "CUDA C++ project_flat (triton not installed)"
        b = f"auto (native; on CUDA tensors {flat}, {dense})"
    elif b == "triton" and not has_triton:
        b = "triton (GRADKIT_BACKEND=triton), but triton is not installed: every op will refuse"
    print(f"active backend: {b}; torch {torch.__version__}; cuda available: {torch.cuda.is_available()}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":  # everything after it is the runner's, `-h` too
        return _bench(argv[1:])
    ap = argparse.ArgumentParser(prog="gradkit", description="gradkit's command line")
    sub = ap.add_subparsers(dest="command", required=True, metavar="{bench,info}")
    sub.add_parser("bench", help="run the benchmark harness (`gradkit bench --help` lists its options)")
    sub.add_parser("info", help="print what was built and which backend is active")
    args = ap.parse_args(argv)  # an unknown command or a stray argument is a usage error (status 2)
    if args.command == "bench":  # `gradkit -- bench`
        return _bench([])
    return _info()


if __name__ == "__main__":
    sys.exit(main())
