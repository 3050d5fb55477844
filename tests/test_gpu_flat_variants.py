"""benchmarks/gpu_flat_variants.py (the flat kernel's GPU experiments, scripts/gpu-issue6-variants.sh) on tiny
sizes under the Triton interpreter, so that a lease is not spent on a broken script: every generation variant
(GEN 0/1, TRANS 0/1) agrees with float64, the cheaper sign expansion is bit-identical to the shipped one, and
the fp32-x accumulation variants (ACC 0-3, whole and partial groups) agree with a full-D float64 product."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_flat_variants.py")


def _run(tmp_path, *args):
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, SCRIPT, "--smoke", "--out", str(tmp_path), *args], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc.stdout


def test_generation_variants_agree(tmp_path):
    _run(tmp_path)
    rows = [json.loads(line) for line in open(tmp_path / "gpu-flat-variants-smoke.jsonl")][1:]
    assert len(rows) == 28 and all(r["ok"] for r in rows)
    assert max(r["err_f64"] for r in rows) < 1e-6
    # GEN 1 draws the same matrix, and TRANS 3 / 4 only read x differently (a tensor descriptor): with the
    # shipped tiles their outputs are the shipped one's bits
    same = [r for r in rows if (r["gen"], r["trans"]) in ((1, 0), (0, 3), (0, 4)) and r["tile"] == rows[0]["tile"]]
    assert {(r["gen"], r["trans"]) for r in rows} == {(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (0, 4)}
    assert len(same) == 6 and all(r["rel_vs_shipped"] == 0.0 for r in same)


def test_accumulation_variants_agree(tmp_path):
    out = _run(tmp_path, "--accuracy")
    rows = [json.loads(line) for line in open(tmp_path / "gpu-flat-accuracy-smoke.jsonl")]
    assert len(rows) == 14 and all(r["ok"] for r in rows), out[-2000:]
    assert {r["variant"].split(" k")[0] for r in rows} == {"acc0 group1", "acc1 group8", "acc1 group32",
                                                           "acc2 group1", "acc3 group1", "acc1 group3",
                                                           "library project_flat"}


_COMPILE = """
import json, os, sys
sys.path[:0] = [os.path.join(ROOT, "benchmarks"), os.path.join(ROOT, "python")]
import gpu_flat_variants as V
import sass_census as S
from gradkit.kernels.triton import projection as T
got = {}
for ws in (False, True):
    const = dict(MODE=1, WS=ws, STAGES=3, BLOCK_B=128, BLOCK_K=128, BLOCK_D=64, MA=T._MIX_A, MB=T._MIX_B,
                 RC=T._ROW_C, G=T._GOLDEN)
    c = S.compile_sm90(V._flat_tma, S.flat_args(), const, num_warps=4, num_stages=3)
    ttgir = c.asm["ttgir"]
    got[str(ws)] = ["cubin" in c.asm, "async_tma_copy_global_to_local" in ttgir, c.metadata.num_warps,
                    sum(1 for ln in ttgir.splitlines() if ln.strip().startswith("partition"))]
print("RESULT " + json.dumps(got))
"""


def test_descriptor_variant_compiles_for_sm90_and_is_warp_specialised():
    """TRANS 3 / 4 compile for sm_90 on this machine (the Triton of torch's pin, through the ptxas in its
    wheel; specialised as the runtime would at the issue's shape), and with 4 warps and a 128-row B tile the
    Hopper pass splits TRANS 4 into a producer and two consumer warp groups: the layout the next GPU lease
    times (GPU-NOTES.md). TRANS 3 stays one warp group.
    In a subprocess without TRITON_INTERPRET (under it, kernels are not compilable objects)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", f"ROOT = {ROOT!r}\n" + _COMPILE], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    got = json.loads(proc.stdout.split("RESULT ")[1])
    assert got == {"False": [True, True, 4, 0], "True": [True, True, 12, 2]}, got


_GLUON = """
import json, os, sys
sys.path[:0] = [os.path.join(ROOT, "benchmarks"), os.path.join(ROOT, "python")]
import gpu_flat_gluon as G
import sass_census as S
import torch
got = {}
for packed in (False, True):
    c = G.compile_sm90(packed=packed)
    got[str(packed)] = {"warps": c.metadata.num_warps, "ops": S.kernel_opcodes(c)}
c = G.compile_sm90(packed=True, dtype=torch.float32)  # TRANS 7 on fp32 x: SPLIT
got["split"] = {"warps": c.metadata.num_warps, "ops": S.kernel_opcodes(c)}
print("RESULT " + json.dumps(got))
"""


def test_gluon_kernel_compiles_for_sm90():
    """TRANS 6 / 7 (benchmarks/gpu_flat_gluon.py) at the shipped tiles compiles for sm_90 with this machine's Triton:
    12 warps (one wgmma warp group, four generator warps, one TMA loader, rounded to warp groups); each generator
    thread writes its R row as 16-byte stores (16 per tile of 128 x 128, where the shipped kernel issues 128
    two-byte stores); x arrives by TMA; 8 wgmma per tile; nothing spilled to local memory. Whether it is right
    and fast can only be seen on a GPU (the next lease, GPU-NOTES.md)."""
    pytest.importorskip("triton.experimental.gluon")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", f"ROOT = {ROOT!r}\n" + _GLUON], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    both = json.loads(proc.stdout.split("RESULT ")[1].splitlines()[0])
    split = both.pop("split")["ops"]  # fp32 x: three bf16 parts per half-tile, 3 x 8 wgmma, R rows as before
    assert split.get("HGMMA.64") == 24 and split.get("STS.128") == 16 and split.get("UTMALDG.2D", 0) >= 1, split
    for packed, got in both.items():  # TRANS 6 and TRANS 7 (PACKED generation)
        ops = got["ops"]
        assert got["warps"] == 12, (packed, got)
        assert ops.get("STS.128") == 16 and ops.get("HGMMA.64") == 8, (packed, ops)
        assert ops.get("UTMALDG.2D", 0) >= 1, (packed, ops)
        assert not any(op.split(".")[0] in ("LDL", "STL", "STS") and op not in ("STS.128", "STS.64") for op in ops), \
            (packed, ops)
    # PACKED moves the +-1 expansion off SEL / PRMT (two entries per register)
    assert both["True"]["ops"].get("SEL", 0) < both["False"]["ops"].get("SEL", 0), both


def test_packed_generation_formula_is_the_generator():
    """TRANS 7's arithmetic (gpu_flat_gluon._gen_packed), emulated on the reference generator's words: each 32-bit
    half unshuffled, pair p = ((u << (15 - p)) & 0x80008000) ^ NEG2, gives the bf16 / fp16 bits of the +-1
    entries of columns 2p, 2p + 1 (little-endian halves), for every bit pattern the words produce."""
    import torch

    from gradkit.kernels.reference import projection as R

    def unshuffle(x):  # the four delta swaps of gpu_flat_gluon._unshuffle, on int64 holding uint32
        for mask, s in ((0x22222222, 1), (0x0C0C0C0C, 2), (0x00F000F0, 4), (0x0000FF00, 8)):
            t = (x ^ (x >> s)) & mask
            x = x ^ t ^ (t << s)
        return x & 0xFFFFFFFF

    rows, words, seed = 96, 40, 12345
    rk = R.row_key(seed, torch.arange(rows, dtype=torch.int64))
    h = R.word_hash(rk[:, None], torch.arange(words, dtype=torch.int64)[None, :])  # int64 holding uint64
    halves = torch.stack([h & 0xFFFFFFFF, (h >> 32) & 0xFFFFFFFF], -1)  # [rows, words, 2]
    u = unshuffle(halves)
    p = torch.arange(16)
    for dtype, neg2 in ((torch.bfloat16, 0xBF80BF80), (torch.float16, 0xBC00BC00)):
        v = (((u[..., None] << (15 - p)) & 0x80008000) ^ neg2)  # [rows, words, 2, 16] pairs
        lo, hi = v & 0xFFFF, v >> 16
        bits16 = torch.stack([lo, hi], -1).reshape(rows, words * 64)  # column order: word, half, pair, element
        got = bits16.to(torch.int16).view(dtype).float()
        want = torch.sign(R.matrix_values(rows, words * 64, seed, 0, 16))
        assert torch.equal(got, want), dtype
