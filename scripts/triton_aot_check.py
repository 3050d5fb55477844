"""Compile every Triton kernel launch gradkit makes for a real GPU target, on a machine without one.

The interpreter (TRITON_INTERPRET=1) runs kernels as Python and accepts code the GPU compiler
rejects, so CPU tests alone cannot show that the Triton backend compiles. This check:

1. ``record`` (run with TRITON_INTERPRET=1): runs representative calls of every Triton op
   (all float dtypes, int32/int64 indices, accumulate, scale, masks, bitmasks, top-k over one tensor
   and over segments), and records each launch's kernel, argument types and constexpr values;
2. ``compile`` (run without the interpreter): compiles each recorded signature with
   ``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` (H100) through ptxas shipped with the
   triton wheel, down to cubin.

    python scripts/triton_aot_check.py     # both phases, each in its own process; exit 1 on any failure
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

_TYPES = {"torch.float32": "fp32", "torch.float64": "fp64", "torch.float16": "fp16", "torch.bfloat16": "bf16",
          "torch.int64": "i64", "torch.int32": "i32", "torch.int16": "i16", "torch.int8": "i8", "torch.uint8": "u8",
          "torch.bool": "i1", "torch.uint16": "u16", "torch.uint32": "u32", "torch.uint64": "u64"}


def _record(path: str) -> None:
    import inspect

    import torch
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    seen = {}
    orig_run = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        params = inspect.signature(self.fn).parameters
        names = list(params)
        bound = dict(zip(names, args))
        options = {}
        for k, v in kwargs.items():
            if k in params:
                bound[k] = v
            else:
                options[k] = v
        sig, const = {}, {}
        for name in names:
            v = bound.get(name, params[name].default)
            if params[name].annotation is tl.constexpr or params[name].annotation == "tl.constexpr":
                sig[name], const[name] = "constexpr", {"tl.dtype": str(v)} if isinstance(v, tl.dtype) else v
            elif isinstance(v, torch.Tensor):
                sig[name] = "*" + _TYPES[str(v.dtype)]
            elif isinstance(v, bool):
                sig[name] = "i1"
            elif isinstance(v, int):
                sig[name] = "i32" if -2**31 <= v < 2**31 else "i64"
            elif isinstance(v, float):
                sig[name] = "fp32"
            else:
                raise TypeError(f"{self.fn.__name__}: cannot type argument {name}={v!r}")
        key = json.dumps([self.fn.__name__, sig, const, options], sort_keys=True, default=str)
        seen[key] = {"kernel": self.fn.__name__, "signature": sig, "constexprs": const, "options": options}
        return orig_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    from gradkit.kernels.triton import parammap as T

    g = torch.Generator().manual_seed(0)
    floats = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
    for sdt in floats:
        for odt in floats:
            src = [torch.randn(5, 7, generator=g).to(sdt), torch.randn(3, 4, generator=g).to(sdt).t()]
            for idt in (torch.int32, torch.int64):
                index = [torch.tensor([3, 1, 30], dtype=idt), None]
                flat = T.gather_segments(src, index, odt)
                out = torch.zeros_like(flat)
                T.gather_segments_out(src, index, out, True)
                T.scatter_segments(flat, index, [35, 12], 0.5)
                dst = [torch.zeros(5, 7, dtype=sdt), torch.zeros(4, 3, dtype=sdt).t()]
                T.scatter_segments_(flat, index, dst, 2.0, True)
                T.scatter_segments_(flat, index, dst, 1.0, False)
    mask = torch.rand(1000, generator=g) < 0.3
    for idt in (torch.int32, torch.int64):
        T.mask_to_indices(mask, idt)
        T.bitmask_to_indices(T.pack_bitmask(mask), 1000, idt)
    for dt in floats:
        s = torch.randn(300, generator=g).to(dt)
        T.topk_select(s, None, 17)
        T.topk_select(s, torch.rand(300, generator=g) < 0.5, 5)
        segs = [torch.randn(4, 50, generator=g).to(dt).t(), torch.randn(0).to(dt), torch.randn(120, generator=g).to(dt)]
        T.topk_select_segments(segs, [None, None, torch.rand(120, generator=g) < 0.5], 30)
        T.topk_select_segments(segs, [torch.rand(4, 50, generator=g) < 0.5, None, None], 9)
        T.topk_select_segments(segs, [None, None, None], 320)  # k == n_active: no radix passes
    with open(path, "w") as f:
        json.dump(list(seen.values()), f)
    print(f"recorded {len(seen)} distinct kernel launches")


def _compile(path: str) -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from gradkit.kernels.triton import parammap as T

    target = GPUTarget("cuda", 90, 32)
    with open(path) as f:
        launches = json.load(f)
    failures = 0
    for rec in launches:
        fn = getattr(T, rec["kernel"])
        const = {k: (triton.language.dtype(v["tl.dtype"]) if isinstance(v, dict) else v)
                 for k, v in rec["constexprs"].items()}
        opts = {k: v for k, v in rec["options"].items() if k in ("num_warps", "num_stages", "enable_fp_fusion")}
        try:
            c = triton.compile(ASTSource(fn=fn, signature=rec["signature"], constexprs=const), target=target,
                               options=opts or None)
            assert "cubin" in c.asm
        except Exception as exc:  # report every failure, then fail
            failures += 1
            print(f"FAIL {rec['kernel']} {rec['signature']} {const}: {type(exc).__name__}: {exc}"[:2000])
    print(f"compiled {len(launches) - failures}/{len(launches)} launches for sm_90")
    return 1 if failures else 0


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "record":
        _record(sys.argv[2])
        return 0
    if len(sys.argv) == 3 and sys.argv[1] == "compile":
        return _compile(sys.argv[2])
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "launches.json")
        env = dict(os.environ, TRITON_INTERPRET="1")
        r = subprocess.run([sys.executable, __file__, "record", path], env=env)
        if r.returncode:
            return r.returncode
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        return subprocess.run([sys.executable, __file__, "compile", path], env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
