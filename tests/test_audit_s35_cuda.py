"""Session 35 audit of the CUDA C++ kernels (csrc/cuda): launch hygiene, grid limits, 64-bit counts.

There is no GPU in CI, so two kinds of test:

* static, over the sources (comments and strings stripped): every kernel launch goes through GK_LAUNCH (no raw
  ``<<<`` outside common.cuh's macro), is followed at once by C10_CUDA_KERNEL_LAUNCH_CHECK(), and runs on the
  current stream (a ``stream`` taken from getCurrentCUDAStream(), or the call itself); every op registered for
  CUDA sets a CUDAGuard on its tensors' device before it takes a stream, sizes a grid or launches; every grid
  dimension on axis y or z is bounded by 65535 (GK_MAX_GRID_Y) in its function.
* under the emulator of tests/cuda_emu (test_cuda_emulated.emu; one build per session): the emulator now refuses
  what a GPU refuses at launch (grid y / z past 65535, dynamic shared memory past 48 KiB) and a launch on a
  stream other than the current one, so every emulated test checks those too; the multi-CTA select of scope.cu
  (few huge scopes, >= 65536 blocks each), which no test ran, against the reference; and its 64-bit counts on
  hand-made states: a scope may hold 2^31 blocks or more (one scope over a whole model), which the CUDA C++
  kernels refused ("at most 2^31-1 blocks per scope") while the CPU and Triton kernels take it.
"""
import glob
import os
import re

import pytest
import torch

from gradkit import _ext

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CUDA = os.path.join(ROOT, "csrc", "cuda")


def _strip(text: str) -> str:
    """The source without comments and string / char literals (kept as empty quotes), lines preserved."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            out.append("\n" * text.count("\n", i, j))
            i = j + 2
        elif c in "\"'":
            j = i + 1
            while text[j] != c:
                j += 2 if text[j] == "\\" else 1
            out.append(c + c)
            i = j + 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _sources():
    files = sorted(glob.glob(os.path.join(CUDA, "*.cu")) + glob.glob(os.path.join(CUDA, "*.cuh")))
    assert len(files) >= 9, files
    return {os.path.basename(f): _strip(open(f).read()) for f in files}


def _close(text: str, open_at: int, pair="()") -> int:
    """Index of the bracket closing the one at open_at."""
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == pair[0]:
            depth += 1
        elif text[i] == pair[1]:
            depth -= 1
            if depth == 0:
                return i
    raise AssertionError("unbalanced brackets")


def _split_args(s: str):
    args, depth, cur = [], 0, []
    for ch in s:
        if ch in "([{<" and not (ch == "<" and depth == 0 and cur and cur[-1] == "<"):
            depth += ch != "<"
        if ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            args.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    args.append("".join(cur).strip())
    return args


def _launches(text: str):
    """(offset, args, text after the call's ';') of every GK_LAUNCH call (not the macro's definition)."""
    for m in re.finditer(r"\bGK_LAUNCH\s*\(", text):
        line_start = text.rfind("\n", 0, m.start()) + 1
        if text[line_start:m.start()].lstrip().startswith("#define"):
            continue
        end = _close(text, m.end() - 1)
        yield m.start(), _split_args(text[m.end():end]), text[end + 1:]


def _functions(text: str):
    """(name, body) of every top-level-looking function definition `... name(params) {body}`."""
    for m in re.finditer(r"\n[\w:<>,*& ]*?\b(\w+)\s*\(([^;{}()]|\([^()]*\))*\)\s*(const\s*)?\{", text):
        name = m.group(1)
        if name in ("if", "for", "while", "switch", "return"):
            continue
        start = m.end() - 1
        yield name, start, text[start:_close(text, start, "{}") + 1]


def test_every_launch_goes_through_gk_launch_and_is_checked_at_once():
    """A launch error (an invalid configuration, too much shared memory) surfaces only at the next CUDA call
    unless C10_CUDA_KERNEL_LAUNCH_CHECK() reads it right after the launch; and a raw <<< >>> launch would
    bypass the emulator that runs these kernels in CI."""
    n = 0
    for name, text in _sources().items():
        for line in text.splitlines():
            if "<<<" in line:
                assert name == "common.cuh" and line.lstrip().startswith("#define GK_LAUNCH"), (name, line)
        for off, args, after in _launches(text):
            n += 1
            assert len(args) >= 5, (name, args)
            assert after.lstrip().startswith(";"), (name, args[0])
            nxt = after.lstrip()[1:].lstrip()
            assert nxt.startswith("C10_CUDA_KERNEL_LAUNCH_CHECK();"), (
                f"{name}:{text.count(chr(10), 0, off) + 1}: {args[0]} is not followed at once by "
                f"C10_CUDA_KERNEL_LAUNCH_CHECK(): {nxt[:80]!r}")
    assert n >= 40  # the parse found the launches


_CURRENT = re.compile(r"^(c10|at)::cuda::getCurrentCUDAStream\(\)$")


def test_every_launch_runs_on_the_current_stream():
    """The launch's stream is `stream`, and every `stream` the files define is the current stream (a kernel on
    another stream, the legacy default stream say, races with the caller's work on the current one)."""
    for name, text in _sources().items():
        for off, args, _ in _launches(text):
            assert args[4] == "stream" or _CURRENT.match(args[4]), (name, args[0], args[4])
        for m in re.finditer(r"\b(?:cudaStream_t|auto)\s+(\w*stream\w*)\s*=\s*([^;]+);", text):
            assert _CURRENT.match(m.group(2).strip()), (name, m.group(0))
        for bad in ("cudaStreamCreate", "getStreamFromPool", "cudaStreamLegacy", "cudaStreamPerThread",
                    "getDefaultCUDAStream"):
            assert bad not in text, (name, bad)


def _calls(body: str, names):
    return {c for c in re.findall(r"\b(\w+)\s*(?:<[^;()]*>)?\s*\(", body) if c in names}


def test_every_cuda_op_sets_a_device_guard_before_its_device_work():
    """A tensor on cuda:1 while cuda:0 is current: without a CUDAGuard the stream, the SM count / occupancy
    query and the launch would all be cuda:0's (a launch on the wrong device reads invalid addresses)."""
    n = 0
    for name, text in _sources().items():
        funcs = {}
        for fname, start, body in _functions(text):
            funcs.setdefault(fname, body)
        for fn in re.findall(r"m\.impl\(\s*\"\"\s*,\s*&([\w:]+)\)", text):  # strings are stripped
            fn = fn.split("::")[-1]
            body = funcs[fn]
            n += 1
            # the guard may sit in a helper the op calls (gather_impl, scatter_impl, topk_impl): one level
            pos = body.find("CUDAGuard")
            work = [body.find(w) for w in ("getCurrentCUDAStream", "GK_LAUNCH", "sm_count(", "grid_for(",
                                           "grid_occ(")]
            work = [w for w in work if w >= 0]
            if pos >= 0:
                assert not work or pos < min(work), (name, fn, "device work before the CUDAGuard")
                continue
            helpers = [c for c in _calls(body, funcs) if c != fn and "CUDAGuard" in funcs[c]]
            assert helpers, (name, fn, "no CUDAGuard")
            first = min(body.find(h) for h in helpers)
            assert not work or first < min(work), (name, fn, "device work before the guarded helper")
    assert n >= 25


def test_every_grid_y_and_z_dimension_is_bounded():
    """gridDim.y and gridDim.z are at most 65535: a grid built from a size (rows, queries, scopes) must slice
    or fall back past it, else the launch fails on a real GPU only (CI's emulator builds with GK_MAX_GRID_Y=1
    and refuses past 65535 too)."""
    n = 0
    for name, text in _sources().items():
        for fname, start, body in _functions(text):
            for m in re.finditer(r"\bdim3\s*(\w*)\s*\(", body):
                args = _split_args(body[m.end():_close(body, m.end() - 1)])
                for a in args[1:]:
                    if re.fullmatch(r"\d+u?", a):
                        continue
                    v = re.fullmatch(r"static_cast<unsigned>\((\w+)\)", a)
                    assert v, (name, fname, a)
                    v = v.group(1)
                    n += 1
                    bounded = re.search(r"\b" + v + r"\b\s*>\s*(GK_MAX_GRID_Y|65535)\b", body) or re.search(
                        r"\b" + v + r"\s*=\s*std::min<int64_t>\(\s*" + v + r"\s*,\s*65535\s*\)", body)
                    assert bounded, f"{name}: {fname}: grid dimension {v} is not bounded by 65535"
    assert n >= 4


# ------------------------------------------------------------------------------------------ the emulator
needs_ext = pytest.mark.skipif(not _ext.has_op("factored_project"), reason="compiled extension not built")


def _emu(stem):
    from test_cuda_emulated import emu
    return emu(stem)


@pytest.mark.cuda_emu
@needs_ext
def test_emulator_refuses_what_a_gpu_refuses_at_launch():
    """The default stream, 65536 blocks on grid axis y, 48 KiB + 4 of dynamic shared memory: errors, so every
    emulated test checks its launches against them; a good launch still runs afterwards."""
    E = _emu("projection")
    for which, msg in ((3, "not the current stream"), (4, r"past the limits \(2\^31-1, 65535, 65535\)"),
                       (5, "dynamic shared memory")):
        with pytest.raises(RuntimeError, match=msg):
            E.selftest(which)
    assert E.selftest(0)[1, 0].item() == 101.0


def _hooks():
    _emu("scope")  # builds the library, which holds tests/cuda_emu/scope_emu.cpp's hooks
    return torch.ops.gradkit_cuda_emu_scope_hooks


def _key(v: float) -> int:
    """scope.cu's KeyOf<float>::enc: order-preserving uint32 key."""
    u = int(torch.tensor([v], dtype=torch.float32).view(torch.int32).item()) & 0xFFFFFFFF
    return (~u & 0xFFFFFFFF) if u & 0x80000000 else u | 0x80000000


WS_N, SELECT = 8, 0  # kWsN, kStSelect; words: valid, prefix, mask, need, cnt, status, below


@needs_ext
def test_multi_select_walk_counts_past_2_to_32():
    """One scope, need = 2^32 + 10: bin 200 holds 2^32 keys (all above the k-th), bin 100 2^33. The walk
    picks bin 100 with 10 keys still needed; it read the bins and `need` as uint32 (2^32 -> 0, need -> 10),
    so no bin qualified and the state kept prefix 0."""
    H = _hooks()
    ws = torch.zeros(WS_N, dtype=torch.int64)
    ws[3], ws[5] = 2**32 + 10, SELECT
    hist = torch.zeros(256, dtype=torch.int64)
    hist[200], hist[100] = 2**32, 2**33
    H.multi_walk(ws, hist, 24)
    assert ws[1].item() == 100 << 24 and ws[2].item() == 0xFF << 24
    assert ws[3].item() == 10 and ws[4].item() == 2**33
    assert not hist.any()  # cleared for the next pass


@needs_ext
def test_multi_select_tie_scan_and_write_count_past_2_to_32():
    """Tie counts per unit scanned per scope past 2^32, and the write pass comparing carry + rank with a need
    past 2^32 (ties at the k-th key are kept lowest index first while fewer than `need` came before)."""
    H = _hooks()
    eqc = torch.tensor([2**32 - 1, 5, 7, 3, 2**33, 1], dtype=torch.int64)
    H.multi_eqscan(eqc, 2)
    assert eqc.tolist() == [0, 2**32 - 1, 2**32 + 4, 0, 3, 2**33 + 3]
    s = torch.tensor([[5.0, 3.0, 3.0, 3.0, 1.0, 3.0, 0.0, 3.0]] * 2)
    ws = torch.zeros(2 * WS_N, dtype=torch.int64)
    for g, need in ((0, 2**32 + 5), (1, 2)):
        ws[g * WS_N + 1], ws[g * WS_N + 3], ws[g * WS_N + 5] = _key(3.0), need, SELECT
    carry = torch.tensor([3, 0], dtype=torch.int64)  # ties before the unit
    m = H.multi_write(s, ws, carry, False)
    # scope 0: 3 + r < 2^32 + 5 for every tie (as uint32, need 5: only the first two ties); scope 1: two ties
    assert m.tolist() == [[True, True, True, True, False, True, False, True],
                          [True, True, True, False, False, False, False, False]]
    assert H.multi_write(s, ws, carry, True).tolist() == [[True, True, True, True, False, True, False, True]] * 2


@pytest.mark.cuda_emu
@needs_ext
def test_multi_cta_select_matches_reference():
    """A scope of 65636 blocks (the multi-CTA select: 8192-score units, per-scope state and histograms, tie
    counts scanned per scope; the hooks above cover several scopes), which no test ran before: an exact mask
    with heavy ties across units and NaN, and k-th values with mid, against the reference."""
    from gradkit.kernels.reference import scope as R
    E = _emu("scope")
    n = 65536 + 100
    x = torch.randint(-20, 21, (1, n), generator=torch.Generator().manual_seed(0)).float()
    x[0, 100:9000:7] = float("nan")
    blk, scp = [1, 1], [1, n]
    assert torch.equal(E.scope_mask(x, blk, scp, 20000, 2.0, False, False, True),
                       R.scope_mask(x, blk, scp, 20000, 2.0, False, False, True))
    torch.testing.assert_close(E.scope_kth(x, blk, scp, 3000, 2.0, False, 0.5, True),
                               R.scope_kth(x, blk, scp, 3000, 2.0, False, 0.5, True), rtol=0, atol=0)
