"""Compile every Triton kernel launch gradkit makes for a real GPU target, on a machine without one.

The interpreter (TRITON_INTERPRET=1) runs kernels as Python and accepts code the GPU compiler
rejects, so CPU tests alone cannot show that the Triton backend compiles. This check:

1. ``record`` (run with TRITON_INTERPRET=1): runs representative calls of every Triton op
   (all float dtypes, int32/int64 indices, accumulate, scale, masks, bitmasks, top-k over one tensor
   and over segments; for the scope family: every op with all float dtypes, p in {1, 2, inf, 3,
   2.5}, raw, keep_ties, expand on/off, values, conditioner, strided views, small and large scopes,
   int32 and int64 offsets), and records each launch's kernel, argument types and constexpr values;
2. ``compile`` (run without the interpreter): compiles each recorded signature with
   ``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` (H100) through ptxas shipped with the
   triton wheel, down to cubin. The launches are dealt round-robin to one process per CPU
   (``AOT_JOBS`` overrides the count): compiling is single-threaded, and this check was the
   suite's longest test (286 s of 783 s on 2 cores, serial).

    python scripts/triton_aot_check.py     # both phases, each in its own process; exit 1 on any failure
    AOT_COVER=pairs python scripts/triton_aot_check.py   # compile an all-pairs cover of the launches (the
                                           # test suite's `ci` profile; _pairwise_cover), not every one
"""
from __future__ import annotations

import json
import os
import re
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
        sig, const, ints = {}, {}, {}
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
                ints[name] = v
            elif isinstance(v, float):
                sig[name] = "fp32"
            else:
                raise TypeError(f"{self.fn.__name__}: cannot type argument {name}={v!r}")
        # the runtime's specialisation of int arguments (triton's native_specialize_impl): 1 becomes a
        # constexpr, a multiple of 16 gets the divisibility hint; the key keeps which applies, not the value
        # (the first launch of each signature keeps its pattern; the every-1 pass below covers the constexprs)
        spec = {n: (1 if v == 1 else 16 if v % 16 == 0 else 0) for n, v in ints.items()}
        key = json.dumps([self.fn.__module__, self.fn.__name__, sig, const, options], sort_keys=True, default=str)
        seen.setdefault(key, {"module": self.fn.__module__, "kernel": self.fn.__name__, "signature": sig,
                              "constexprs": const, "options": options, "ints": spec})
        return orig_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    from gradkit.kernels.triton._interp import fast_nested_calls

    fast_nested_calls()  # nested @triton.jit helpers skip re-patching triton.language (~40% of this phase)
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
    _record_scope(g, floats)
    # families 3 and 4 keep their representative calls beside their kernels (record_aot_cases)
    import importlib

    for fam in ("golden", "adamw", "obs", "projection", "search"):
        try:
            mod = importlib.import_module(f"gradkit.kernels.triton.{fam}")
        except ModuleNotFoundError:
            continue
        mod.record_aot_cases()
    with open(path, "w") as f:
        json.dump(list(seen.values()), f)
    print(f"recorded {len(seen)} distinct kernel launches")


def _record_scope(g, floats) -> None:
    """Representative calls of every scope-family Triton op (gradkit.kernels.triton.scope): each
    kernel mode with every float dtype, every score kind (p = 1, 2, inf, 3 and a general p), raw,
    keep_ties, expand on/off, values / thresholds / conditioner of other dtypes, strided views,
    small scopes (the fused kernel) and large ones (scores + radix select), int32 and int64 offsets.
    Tensors stay tiny (and large scopes few): this runs under the interpreter."""
    import torch

    from gradkit.kernels.triton import scope as S

    def data(shape, dt):
        return torch.randint(-8, 9, shape, generator=g).to(dt)

    def view(dt):  # a strided, permuted view: (4, 6, 4) out of a (6, 10, 8) base
        return data((6, 10, 8), dt).permute(2, 0, 1)[1:9:2, :, 1:9:2]

    SMALL = ([1, 1, 2], [2, 3, 1])  # block, scope: 6 blocks per scope
    LARGE = ([1, 1, 2], [4, 1, 2])  # 8 blocks per scope (the large path, with small_nb=6 below), 6 scopes
    RAW_LARGE = [4, 1, 4]  # 16 single-element blocks per scope
    inf = float("inf")

    def calls(dt, full):
        x = view(dt)
        for b, s in (SMALL, LARGE):
            for p in ((1.0, 2.0, inf, 3.0, 2.5) if full else (2.0,)):
                S.scope_kth(x, b, s, 2, p, False, 0.5, False)
                S.scope_mask(x, b, s, 2, p, False, False, False)
            S.scope_kth(x, b, s, 1, 2.0, False, 0.25, True)
            for ties in (False, True):
                for expand in (False, True):
                    S.scope_mask(x, b, s, 3, 2.0, False, ties, expand)
                S.scope_hard_threshold_(x.clone(), None, b, s, 2, 2.0, ties)
            if full:
                rs = s if s is SMALL[1] else RAW_LARGE
                S.scope_kth(x, [1, 1, 1], rs, 2, 2.0, True, 0.5, True)  # raw
                S.scope_kth(x, [1, 1, 1], rs, 2, 2.0, False, 0.5, False)  # single-element blocks
                for ties in (False, True):
                    for expand in (False, True):
                        S.scope_mask(x, [1, 1, 1], rs, 2, 2.0, True, ties, expand)
        for p in ((1.0, 2.0, inf, 3.0, 2.5) if full else (2.0,)):
            S.block_norms(x, SMALL[0], p)
        S.block_apply_mask_(x.clone(), SMALL[0], (torch.rand(2, 6, 4, generator=g) < 0.5).permute(2, 1, 0))
        t = torch.rand(4, 6, 2, generator=g).to(dt)
        h = (torch.rand(4, 6, 4, generator=g) + 0.5).to(dt)
        S.block_soft_threshold_(x.clone(), SMALL[0], t, None, 20, 1e-8, 1e-6)
        S.block_soft_threshold_(x.clone(), SMALL[0], t, h, 20, 1e-8, 1e-6)
        S.block_soft_threshold_(x.clone(), [1, 1, 1], torch.rand(4, 6, 4, generator=g).to(dt), h, 20, 1e-8, 1e-6)
        S.TUNING.update(soft_chunk=2)  # blocks of several chunks (re-read per bisection step)
        S.block_soft_threshold_(x.clone(), [1, 3, 4], t[:, :2, :1], None, 5, 1e-8, 1e-6)
        S.block_soft_threshold_(x.clone(), [1, 3, 4], t[:, :2, :1], h, 5, 1e-8, 1e-6)

    tuning = dict(S.TUNING)
    try:
        for force64 in (False, True):
            S.FORCE_INT64 = force64
            for dt in floats:
                S.TUNING.update(small_nb=6)  # SMALL (6 blocks) fused, LARGE (8 / 16 blocks) through the select
                calls(dt, full=not force64 or dt in (torch.float32, torch.float64))
                S.TUNING.clear()
                S.TUNING.update(tuning)
                x = view(dt)
                for vdt in floats:  # scores from a companion of another dtype; companions of other dtypes
                    v = data((4, 6, 4), vdt)
                    S.scope_hard_threshold_(x.clone(), v, *SMALL, 2, 2.0, False)
                    S.block_soft_threshold_(x.clone(), SMALL[0], torch.rand(4, 6, 2, generator=g).to(vdt),
                                            (torch.rand(4, 6, 4, generator=g) + 0.5).to(vdt), 20, 1e-8, 1e-6)
                if force64:
                    break
    finally:
        S.FORCE_INT64 = False
        S.TUNING.clear()
        S.TUNING.update(tuning)
    # four unmergeable dims in each level: (4, 4, 4, 4) with reversed strides, blocks / scopes across every dim
    for dt in (torch.float32, torch.bfloat16):
        x = data((4, 4, 4, 4), dt).permute(3, 2, 1, 0)
        b4 = [2, 2, 2, 2]
        S.block_norms(x, b4, 2.0)
        for s4 in ([2, 2, 2, 2], [1, 2, 1, 2], [1, 1, 1, 1]):  # 4 dims in level 1 / levels 0+1 / level 0
            for small_nb in (32, 0):
                S.TUNING.update(small_nb=small_nb)
                S.scope_kth(x, b4, s4, 1, 2.0, False, 0.5, False)
                S.scope_mask(x, b4, s4, 1, 2.0, False, False, True)
                S.scope_hard_threshold_(x.clone(), None, b4, s4, 1, 1.0, False)
        S.TUNING.clear()
        S.TUNING.update(tuning)
        S.block_apply_mask_(x.clone(), b4, torch.rand(2, 2, 2, 2, generator=g).permute(3, 2, 1, 0) < 0.5)
        t4 = torch.rand(2, 2, 2, 2, generator=g).to(dt)
        S.block_soft_threshold_(x.clone(), b4, t4, None, 20, 1e-8, 1e-6)
        S.block_soft_threshold_(x.clone(), b4, t4, (torch.rand(4, 4, 4, 4, generator=g) + 0.5).to(dt), 20, 1e-8, 1e-6)
    # default tiles at realistic sizes: 2:4 over rows, row-wise top-k over 4096 columns, a whole tensor as one scope
    x = torch.randn(64, 64, generator=g)
    S.scope_mask(x, [1, 1], [1, 4], 2, 2.0, False, False, True)
    S.scope_hard_threshold_(x.clone(), None, [1, 1], [1, 4], 2, 1.0, False)
    x = torch.randn(2, 4096, generator=g)
    S.scope_mask(x, [1, 1], [1, 4096], 100, 2.0, False, False, True)
    S.scope_kth(x, [1, 1], [1, 4096], 100, 1.0, False, 1.0, False)
    S.scope_hard_threshold_(x.clone(), None, [1, 64], [2, 16], 5, 2.0, True)
    S.block_norms(x, [1, 512], 2.0)
    S.block_soft_threshold_(x.clone(), [1, 4096], torch.rand(2, 1, generator=g), torch.rand(2, 4096) + 0.5,
                            20, 1e-8, 1e-6)


def _features(job) -> set:
    """What one compile job exercises, per kernel: each of its settings (an argument's type, a constexpr's value,
    a launch option, an int argument's specialisation) and each pair of them."""
    rec, spec, _ = job
    kern = (rec.get("module"), rec["kernel"])
    items = sorted([("arg", k, v) for k, v in rec["signature"].items()]
                   + [("constexpr", k, json.dumps(v, sort_keys=True)) for k, v in rec["constexprs"].items()]
                   + [("option", k, str(v)) for k, v in rec["options"].items()]
                   + [("int", k, v) for k, v in spec.items()], key=str)
    out = {(kern, a) for a in items}
    out.update((kern, a, b) for i, a in enumerate(items) for b in items[i + 1:])
    return out


def _pairwise_cover(jobs: list) -> list:
    """AOT_COVER=pairs (the test suite's default; scripts/triton_aot_check.py alone compiles every launch): a
    subset of the jobs, chosen greedily, in which every setting of every kernel and every pair of settings that
    some recorded launch holds is compiled at least once (all-pairs coverage, the usual way to cut a
    combinatorial test matrix). 557 launches become ~300: each compile is ~1 s of one core, and the check ran
    beside a 2-core suite that was over its time budget. Every kernel keeps at least one launch; what can slip
    is a failure that needs three particular settings at once."""
    import heapq

    feats = [_features(j) for j in jobs]
    heap = [(-len(f), i) for i, f in enumerate(feats)]  # lazy greedy: a job's gain only shrinks as others are taken
    heapq.heapify(heap)
    chosen, covered = [], set()
    while heap:
        _, i = heapq.heappop(heap)
        gain = len(feats[i] - covered)
        if gain == 0:
            continue
        if heap and (-gain, i) > heap[0]:
            heapq.heappush(heap, (-gain, i))  # stale: another job may now cover more
            continue
        chosen.append(i)
        covered |= feats[i]
    return [jobs[i] for i in sorted(chosen)]


def _compile(path: str, shard: int = 0, nshards: int = 1) -> int:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
    with open(path) as f:
        launches = json.load(f)
    # every recorded launch as the runtime specialises it, then, once per kernel, the same launch with every
    # int argument equal to 1 (a batch of one, a seed or offset whose 16-bit piece is 1, a unit stride): the
    # runtime passes each such argument as a constexpr int, which has no .to() and no tensor semantics
    jobs = [(rec, rec.get("ints", {}), "") for rec in launches]
    firsts = {}
    for rec in launches:
        if rec.get("ints"):
            firsts.setdefault((rec.get("module"), rec["kernel"]), rec)
    jobs += [(rec, {n: 1 for n in rec["ints"]}, " (every int argument 1)") for rec in firsts.values()]
    if os.environ.get("AOT_COVER", "all") == "pairs":
        jobs = _pairwise_cover(jobs)
    total = len(jobs)
    jobs = jobs[shard::nshards]  # this process's share (every shard builds the same list)
    failures = 0
    for rec, spec, what in jobs:
        fn = getattr(importlib.import_module(rec.get("module", "gradkit.kernels.triton.parammap")), rec["kernel"])
        const = {k: (triton.language.dtype(v["tl.dtype"]) if isinstance(v, dict) else v)
                 for k, v in rec["constexprs"].items()}
        sig = dict(rec["signature"])
        names = list(sig)
        attrs = {}
        for n, how in spec.items():
            if how == 1:
                sig[n], const[n] = "constexpr", 1
            elif how == 16:
                attrs[(names.index(n),)] = [["tt.divisibility", 16]]
        opts = {k: v for k, v in rec["options"].items() if k in ("num_warps", "num_stages", "enable_fp_fusion")}
        try:
            c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs), target=target,
                               options=opts or None)
            assert "cubin" in c.asm
        except Exception as exc:  # report every failure, then fail
            failures += 1
            print(f"FAIL{what} {rec['kernel']} {sig} {const}: {type(exc).__name__}: {exc}"[:2000])
    print(f"shard {shard}/{nshards}: compiled {len(jobs) - failures}/{len(jobs)} of {total} launches "
          f"({len(firsts)} with every int argument 1 in all; AOT_COVER={os.environ.get('AOT_COVER', 'all')})")
    return 1 if failures else 0


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "record":
        _record(sys.argv[2])
        return 0
    if len(sys.argv) == 5 and sys.argv[1] == "compile":
        return _compile(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "launches.json")
        env = dict(os.environ, TRITON_INTERPRET="1")
        r = subprocess.run([sys.executable, __file__, "record", path], env=env)
        if r.returncode:
            return r.returncode
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        n = max(1, int(os.environ.get("AOT_JOBS", 0)) or len(os.sched_getaffinity(0)))
        procs = [subprocess.Popen([sys.executable, __file__, "compile", path, str(i), str(n)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(n)]
        outs = [p.communicate()[0] for p in procs]
        done = total = 0
        for out in outs:
            sys.stdout.write(out)
            m = re.search(r"compiled (\d+)/\d+ of (\d+) launches", out)
            if m:
                done, total = done + int(m.group(1)), int(m.group(2))
        bad = [i for i, p in enumerate(procs) if p.returncode]
        print(f"compiled {done}/{total} launches for sm_90 in {n} processes"
              + (f"; shard(s) {bad} failed" if bad else ""))
        return 1 if bad or done != total or total == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
