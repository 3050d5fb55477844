"""Static census of the Triton flat projection kernel's main loop for sm_90 (H100 / H200), on a machine without
a GPU: compile with the specialisation the runtime would apply at the issue's shape, disassemble with the
nvdisasm shipped in the triton wheel, and count the instructions of the loop that holds the HGMMAs.

    python benchmarks/sass_census.py [--json]

For each case: loop instructions per thread and tile, the opcode counts (loads / stores with their widths),
registers per thread (cuobjdump -res-usage) and shared memory. What it showed (session 15, Triton 3.9 here;
the H200 of session 14 ran 3.6):
* the shipped kernel before ``ALIGNED``: bf16 x read with 64 scalar 2-byte loads per thread and tile, and
  255 registers; with ``ALIGNED`` (col0 % 64 == 0) 8 pipelined 16-byte cp.async, 740 instead of 912 loop
  instructions and 128 registers;
* in both, the generated R^T tile goes to shared memory as 128 2-byte stores per thread and tile (each
  thread holds one column of R^T, while the swizzled layout is contiguous along the other axis), and the
  +-1 expansion is ~3 instructions per entry (SEL + LOP3 + SHF): together most of the loop. The GEN 1
  variant, meant as a cheaper expansion, compiles to as many instructions (921), which fits its measured 6%
  slowdown.
Static counts are not time; they say where the issue slots go, and that a change did what it meant to.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))
sys.path.insert(0, HERE)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
KEEP = ("LDG", "STS", "LDS", "LDGSTS", "HGMMA", "UTMALDG", "LDL", "STL")  # opcodes kept with their widths


def compile_sm90(fn, args, constexprs, num_warps=4, num_stages=3, source=ASTSource):
    """Compile fn for sm_90 as the runtime would for these argument values: ints equal to 1 become
    constexprs, pointers and ints divisible by 16 get the divisibility hint; other types (a tensor
    descriptor's) as given. args: name -> (type, value). source: GluonASTSource for Gluon kernels;
    num_stages=None leaves it out of the options."""
    sig, attrs, const = {}, {}, dict(constexprs)
    names = list(fn.arg_names)
    for name, (ty, val) in args.items():
        if ty.startswith("i") and val == 1:
            sig[name], const[name] = "constexpr", 1
            continue
        sig[name] = ty
        if ty.startswith("*") or (ty.startswith("i") and val % 16 == 0):
            attrs[(names.index(name),)] = [["tt.divisibility", 16]]
    for k in constexprs:
        sig[k] = "constexpr"
    options = {"num_warps": num_warps} if num_stages is None else {"num_warps": num_warps, "num_stages": num_stages}
    return triton.compile(source(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options=options)


def _tool(name, cubin):
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        args = ["-c", path] if name == "nvdisasm" else ["-res-usage", path]
        return subprocess.run([os.path.join(BIN, name), *args], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)


def opcodes(lines) -> collections.Counter:
    """Opcode counts of SASS lines: loads, stores, HGMMA and TMA with their widths / shapes (KEEP), the rest
    by base name."""
    ops = collections.Counter()
    for ln in lines:
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", ln)
        if m:
            op = m.group(2)
            ops[op if op.split(".")[0] in KEEP else op.split(".")[0]] += 1
    return ops


def kernel_opcodes(c) -> collections.Counter:
    """opcodes() of the whole compiled kernel."""
    return opcodes(_tool("nvdisasm", c.asm["cubin"]).splitlines())


def census(c) -> dict:
    """The loop holding the last HGMMA: from the label its backward branch targets to that branch."""
    sass = _tool("nvdisasm", c.asm["cubin"]).splitlines()
    mma = [i for i, ln in enumerate(sass) if "HGMMA" in ln]
    if not mma:
        raise RuntimeError("no HGMMA in the kernel")
    br = next(i for i in range(mma[-1], len(sass)) if re.search(r"\bBRA\b", sass[i]))
    label = re.search(r"\(\.(L_x_\d+)\)", sass[br]).group(1)
    start = next(i for i, ln in enumerate(sass) if ln.strip().startswith("." + label + ":"))
    ops = opcodes(sass[start:br + 1])
    res = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", _tool("cuobjdump", c.asm["cubin"]))
    return {"loop_instructions": sum(ops.values()), "registers": int(res.group(1)), "stack": int(res.group(2)),
            "shared_bytes": c.metadata.shared, "ops": dict(ops.most_common())}


def flat_args(x_type="*bf16", B=64, D=1 << 20, k=2048, col0=0, per_split=64):
    """project_flat's launch at the issue's shape (64 x 1,048,576 -> 2048)."""
    from gradkit.kernels.triton import projection as T

    a = {"x_ptr": (x_type, 0), "part_ptr": ("*fp32", 0)}
    vals = (("B", B), ("D", D), ("K", k), ("sxb", D), ("sxd", 1), *zip(("seed_h", "seed_m", "seed_l"), T._split(0)),
            *zip(("c0_h", "c0_m", "c0_l"), T._split(col0)), ("ntiles", D // 128), ("per_split", per_split))
    for n, v in vals:
        a[n] = ("i32", v)
    a["inv_bits"] = ("i64", T._inv_bits(k))
    return a


def cases():
    from gradkit.kernels.triton import projection as T

    g = dict(MA=T._MIX_A, MB=T._MIX_B, RC=T._ROW_C, G=T._GOLDEN)
    tiles = dict(BLOCK_K=T.GPU_FLAT["k"], BLOCK_B=T.GPU_FLAT["b"], BLOCK_D=T.GPU_FLAT["d"])
    launch = dict(num_warps=T.GPU_FLAT["num_warps"], num_stages=T.GPU_FLAT["num_stages"])
    for dt, mode in (("bf16", 1), ("fp32", 2)):
        for aligned in (True, False):
            name = f"shipped {dt} x, {'aligned' if aligned else 'unaligned'} col0"
            yield name, T._project_flat_kernel, flat_args("*" + dt, col0=0 if aligned else 1), \
                dict(KIND=0, MODE=mode, ALIGNED=aligned, **tiles, **g), launch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="one JSON object per case on stdout")
    a = ap.parse_args(argv)
    for name, fn, args, const, launch in cases():
        row = {"case": name, **census(compile_sm90(fn, args, const, **launch))}
        if a.json:
            print(json.dumps(row))
        else:
            top = ", ".join(f"{k} {v}" for k, v in list(row["ops"].items())[:14])
            print(f"{name}: {row['loop_instructions']} loop instructions, {row['registers']} registers, "
                  f"{row['shared_bytes']} B shared\n    {top}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
