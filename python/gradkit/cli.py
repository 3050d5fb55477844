"""`gradkit` command line: `gradkit bench [...]` runs the benchmark harness of a source checkout;
`gradkit info` prints what was built and which backend is active."""
from __future__ import annotations

import argparse
import os
import runpy
import sys


def _bench(rest) -> int:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = os.path.join(root, "benchmarks", "run.py")
    if not os.path.isfile(script):
        print("gradkit bench: needs a source checkout (benchmarks/run.py not found next to the package)",
              file=sys.stderr)
        return 2
    sys.argv = [script] + list(rest)
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def _info() -> int:
    import torch

    from gradkit import _ext, ops

    print(f"gradkit extension loaded: {_ext.LOADED}" + (f" ({_ext.ERROR})" if _ext.ERROR else ""))
    print(f"CUDA kernels compiled: {_ext.has_kernel('gather_segments', 'CUDA')}")
    b = ops.backend()
    if ops._requested() == "auto" and b == "native":  # what CUDA tensors get differs: say so
        dense = ("gradkit's own factored_project / score_topk kernels (torch allows TF32 float32 matmuls now, "
                 "which the cuBLAS composites would follow)" if ops.cublas_fp32_reduced()
                 else "cuBLAS factored_project / score_topk")
        b = f"auto (native; on CUDA tensors Triton project_flat, {dense})"
    print(f"active backend: {b}; torch {torch.__version__}; cuda available: {torch.cuda.is_available()}")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="gradkit")
    ap.add_argument("command", choices=["bench", "info"])
    args, rest = ap.parse_known_args(argv)
    return _bench(rest) if args.command == "bench" else _info()


if __name__ == "__main__":
    sys.exit(main())
