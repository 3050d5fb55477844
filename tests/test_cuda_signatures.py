"""The CUDA C++ kernels' C++ signatures against the CPU kernels' for every op both register.

torch checks at load time that all kernels of an op share one C++ signature; a mismatch (a ``Tensor&``
on one side, ``const Tensor&`` on the other) aborts the import of a CUDA build, which no CPU machine
builds. The first H200 run met exactly that (golden_topk_and_, 2026-12-04). This reads the sources:
each ``m.impl("op", &fn)`` in csrc/cpu + csrc/ops.cpp and in csrc/cuda, then fn's definition."""
import glob
import os
import re

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
_IMPL = re.compile(r'm\.impl\("(\w+)",\s*&([\w:]+)\)')


def _norm(t: str) -> str:
    t = re.sub(r"\b(at|c10|std)::", "", t)
    return re.sub(r"\s+", "", t)


def _signatures(files):
    srcs = {f: open(f).read() for f in files}
    out = {}
    for text in srcs.values():
        for op, fn in _IMPL.findall(text):
            name = fn.split("::")[-1]
            pat = re.compile(r"\n([\w:<>, ]+?)\s+" + re.escape(name) + r"\s*\(([^{;]*?)\)\s*\{", re.S)
            for body in srcs.values():
                m = pat.search(body)
                if m:
                    params = [re.sub(r"\s*\w+$", "", p.strip()) for p in m.group(2).split(",") if p.strip()]
                    out[op] = (_norm(m.group(1).split()[-1]), [_norm(p) for p in params])
                    break
            else:
                out[op] = None
    return out


def test_cuda_kernels_share_the_cpu_signatures():
    cuda_files = glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))
    if not cuda_files:
        pytest.skip("no CUDA sources")
    cpu = _signatures(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")) + [os.path.join(ROOT, "csrc", "ops.cpp")])
    cuda = _signatures(cuda_files)
    assert len(cuda) >= 20  # the parse found the registrations
    missing = [op for op, sig in cuda.items() if sig is None or cpu.get(op, 0) is None]
    assert not missing, f"definitions not found for {missing}"
    bad = {op: (cpu[op], sig) for op, sig in cuda.items() if op in cpu and cpu[op] != sig}
    assert not bad, f"CPU vs CUDA C++ signatures differ: {bad}"
