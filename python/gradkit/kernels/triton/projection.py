"""Triton kernels for the projection family: counter-based projection matrices generated inside the
matrix-product tiles (never materialised in global memory). Semantics, entry for entry, are those
of ``gradkit.kernels.reference.projection``; public functions have the schemas' positional
signatures (csrc/ops.cpp). On machines without a GPU they run on CPU tensors under
``TRITON_INTERPRET=1``.

Design
------
* Generator (per entry ``(row, col)``): ``rowkey = mix64(seed ^ mix64(row + C))`` once per row of
  the tile, then one splitmix64 word per (row, 64 columns) for Rademacher -- the tile's columns
  start on a multiple of 64 of the *global* column index, so a [BLOCK_D, BLOCK_K] tile of R^T is
  ``BLOCK_D / 64`` words per row, expanded by broadcasting ``(word >> j) & 1`` over
  ``j = 0..63`` and a reshape (no gathers, no branches). Gaussian entries take one word per
  column pair and Box-Muller in float64, rounded to fp32.
* ``project_flat``: grid (k tiles, B tiles, D splits). Each program keeps a [BLOCK_B, BLOCK_K]
  fp32 accumulator and walks its share of the D tiles: load the x tile (masked to
  [col0, col0 + D)), generate the R^T tile in registers, ``tl.dot``. ``ALIGNED`` (col0 a multiple
  of 64, the usual case): the x tile's columns are written as ``t * BLOCK_D + i`` without the
  ``col0`` shift, so the compiler can prove them contiguous and 16-byte aligned. For sm_90 (bf16 x,
  the GPU_FLAT tiles, compiled here with runtime-like specialisation) that turns 64 scalar 2-byte
  loads, 97 byte permutes and 16 shared stores per thread and tile into 8 pipelined 16-byte
  ``cp.async``: the loop falls from 912 to 740 instructions and from 255 to 128 registers. Same
  elements, same order: the same bits. D splits write partial sums
  to a (SPLIT, B, k) buffer summed afterwards in a fixed order (deterministic).
  Dot modes (constexpr ``MODE``): 0 = fp32 operands with ``input_precision="ieee"`` (the
  interpreter, Gaussian, fp64 x); 1 = bf16/fp16 x against +-1 in the same dtype (exact products,
  fp32 accumulation, scale applied once at the end: the tensor-core path); 2 = fp32 x split into
  three bf16 parts (hi + mid + lo carry 24 significant bits) against +-1: fp32-accurate on
  tensor cores.
* ``projection_matrix_``: an elementwise [BLOCK_R, BLOCK_C] generator writing the tile to ``out``.
"""
from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from gradkit.kernels.reference.projection import GOLDEN, MIX_A, MIX_B, ROW_C, _s64, f64_row_scale, inv_sqrt_k
from gradkit.kernels.reference.scope import check_inplace
from gradkit.kernels.triton import interpreting, on_tensor_device

_MIX_A = _s64(MIX_A)
_MIX_B = _s64(MIX_B)
_GOLDEN = _s64(GOLDEN)
_ROW_C = _s64(ROW_C)

# Tile sizes; tests shrink them to exercise multi-tile paths on tiny inputs.
BLOCKS = {"k": 64, "b": 16, "d": 64, "split_target": 0}
# project_flat's tiles and launch parameters on a GPU (BLOCKS is the interpreter's). Unmeasured so far: no
# GPU has been lent to this project yet; benchmarks/bench_gpu.py times alternatives beside these ("flat
# tiles"). Each R tile is generated once per (k tile, B tile): a taller B tile generates less per MMA.
GPU_FLAT = {"k": 128, "b": 64, "d": 128, "num_warps": 4, "num_stages": 3}
# The largest grid extent on axes 1 and 2 of a CUDA launch (gridDim.y / .z; axis 0 allows 2^31 - 1): launchers
# whose axis-1 extent would pass it (project_flat's B tiles, projection_matrix_'s column tiles) run in slices
# (tests shrink it to exercise the slicing under the interpreter, which has no such limit).
_MAX_GRID_YZ = 65535
# record_aot_cases only: launch project_flat as on a GPU (its tiles, the tensor-core MODEs 1 / 2) under the
# interpreter, so that scripts/triton_aot_check.py compiles the launches a GPU makes
_AOT_GPU_LAUNCH = False


@triton.jit
def _u64(c: tl.constexpr):
    return tl.full([], c, tl.int64).to(tl.uint64, bitcast=True)


@triton.jit
def _join(h, m, l):
    """int64 from three pieces (h << 32 | m << 16 | l); see _split. tl.cast, not .to(): on a GPU the runtime
    passes a piece equal to 1 (seed 1, col0 1) as a constexpr int, which has no .to() (CompilationError)."""
    return (tl.cast(h, tl.int64) << 32) | (tl.cast(m, tl.int64) << 16) | tl.cast(l, tl.int64)


@triton.jit
def _mix64(z, MA: tl.constexpr, MB: tl.constexpr):
    z = (z ^ (z >> 30)) * _u64(MA)
    z = (z ^ (z >> 27)) * _u64(MB)
    return z ^ (z >> 31)


@triton.jit
def _row_key(seed, rows, MA: tl.constexpr, MB: tl.constexpr, RC: tl.constexpr):
    r = rows.to(tl.int64).to(tl.uint64, bitcast=True)
    s = seed.to(tl.int64).to(tl.uint64, bitcast=True)
    return _mix64(_mix64(r + _u64(RC), MA, MB) ^ s, MA, MB)


@triton.jit
def _word(rk, w, MA: tl.constexpr, MB: tl.constexpr, G: tl.constexpr):
    wu = w.to(tl.int64).to(tl.uint64, bitcast=True)
    return _mix64(rk + (wu + 1) * _u64(G), MA, MB)


@triton.jit
def _gauss(h, odd, inv):
    """fp32 Box-Muller entry from hash h (uint64): the cos branch for even columns, sin for odd."""
    a = (h >> 32).to(tl.float64)
    b = (h & 0xFFFFFFFF).to(tl.float64)
    u1 = (a + 0.5) * 2.3283064365386963e-10
    u2 = b * 2.3283064365386963e-10
    r = tl.sqrt(-2.0 * tl.log(u1))
    t = 6.283185307179586 * u2
    z = tl.where(odd, r * tl.sin(t), r * tl.cos(t))
    return (z * inv).to(tl.float32)


@triton.jit
def _rt_tile_signs(rk, wbase, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, MA: tl.constexpr, MB: tl.constexpr,
                   G: tl.constexpr):
    """R^T tile [BLOCK_D, BLOCK_K] as bits (int32 0/1): column block starting at word ``wbase``."""
    NW: tl.constexpr = BLOCK_D // 64
    w = wbase + tl.arange(0, NW)
    h = _word(rk[None, :], w[:, None], MA, MB, G)  # [NW, BLOCK_K]
    j = tl.arange(0, 64).to(tl.uint64)
    bits = (h[:, None, :] >> j[None, :, None]) & 1  # [NW, 64, BLOCK_K]
    return tl.reshape(bits, (BLOCK_D, BLOCK_K)).to(tl.int32)


@triton.jit
def _project_flat_kernel(x_ptr, part_ptr, B, D, K, sxb, sxd, seed_h, seed_m, seed_l, c0_h, c0_m, c0_l, ntiles,
                         per_split, inv_bits,
                         KIND: tl.constexpr, MODE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
                         BLOCK_D: tl.constexpr, MA: tl.constexpr, MB: tl.constexpr, RC: tl.constexpr,
                         G: tl.constexpr, ALIGNED: tl.constexpr):
    # 1/sqrt(k) in float64 (scalar args are fp32); tl.cast as in _join
    inv = tl.cast(tl.cast(inv_bits, tl.int64), tl.float64, bitcast=True)
    seed = _join(seed_h, seed_m, seed_l)
    col0 = _join(c0_h, c0_m, c0_l)
    base = col0 - (col0 & 63)
    pid_k = tl.program_id(0)
    pid_b = tl.program_id(1)
    pid_s = tl.program_id(2)
    rows = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    bidx = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    rk = _row_key(seed, rows.to(tl.int64), MA, MB, RC)
    acc = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
    t0 = pid_s * per_split
    t1 = tl.minimum(t0 + per_split, ntiles)
    for t in range(t0, t1):
        t64 = tl.cast(t, tl.int64)
        if ALIGNED:  # col0 % 64 == 0 (base == col0): x columns d = t BLOCK_D + i, provably contiguous and aligned
            d = t64 * BLOCK_D + tl.arange(0, BLOCK_D)
            c = col0 + d
            dm = d < D
        else:
            c = base + t64 * BLOCK_D + tl.arange(0, BLOCK_D)  # global columns
            d = c - col0
            dm = (d >= 0) & (d < D)
        xm = (bidx[:, None] < B) & dm[None, :]
        xt = tl.load(x_ptr + bidx[:, None].to(tl.int64) * sxb + d[None, :] * sxd, mask=xm, other=0.0)
        if KIND == 0:
            bits = _rt_tile_signs(rk, (base >> 6) + t64 * (BLOCK_D // 64), BLOCK_D, BLOCK_K, MA, MB, G)
            if MODE == 0:
                rt = tl.where(bits != 0, 1.0, -1.0).to(tl.float32)
                acc += tl.dot(xt.to(tl.float32), rt, input_precision="ieee")
            elif MODE == 1:
                rt = tl.where(bits != 0, 1.0, -1.0).to(xt.dtype)
                acc += tl.dot(xt, rt)
            else:
                rt = tl.where(bits != 0, 1.0, -1.0).to(tl.bfloat16)
                xf = xt.to(tl.float32)
                # x = hi + mid + lo in bf16. A finite |x| above bf16's largest finite value rounds hi to inf:
                # hi takes that largest value (+-0x7F7F, exact in fp32) and the rest goes to mid / lo; an
                # infinite x keeps hi = x with no remainder (x - hi would be NaN), a NaN stays NaN through hi
                xfin = tl.abs(xf) < float("inf")
                hif = xf.to(tl.bfloat16).to(tl.float32)
                hif = tl.where(xfin & (tl.abs(hif) == float("inf")),
                               tl.where(xf > 0, 3.3895313892515355e38, -3.3895313892515355e38), hif)
                hi = hif.to(tl.bfloat16)
                r1 = tl.where(xfin, xf - hif, 0.0)
                mid = r1.to(tl.bfloat16)
                lo = (r1 - mid.to(tl.float32)).to(tl.bfloat16)
                acc += tl.dot(hi, rt)
                acc += tl.dot(mid, rt)
                acc += tl.dot(lo, rt)
        else:
            h = _word(rk[None, :], (c >> 1)[:, None], MA, MB, G)  # [BLOCK_D, BLOCK_K]
            rt = _gauss(h, ((c & 1) != 0)[:, None], inv)
            acc += tl.dot(xt.to(tl.float32), rt, input_precision="ieee")
    if KIND == 0:
        acc = acc * inv.to(tl.float32)
    om = (bidx[:, None] < B) & (rows[None, :] < K)
    optr = part_ptr + pid_s.to(tl.int64) * B * K + bidx[:, None].to(tl.int64) * K + rows[None, :]
    tl.store(optr, acc, mask=om)


@triton.jit
def _matrix_kernel(out_ptr, R, C, so_r, so_c, seed_h, seed_m, seed_l, r0_h, r0_m, r0_l, c0_h, c0_m, c0_l, inv_bits,
                   KIND: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_C: tl.constexpr, MA: tl.constexpr, MB: tl.constexpr, RC: tl.constexpr, G: tl.constexpr):
    inv = tl.cast(tl.cast(inv_bits, tl.int64), tl.float64, bitcast=True)
    seed = _join(seed_h, seed_m, seed_l)
    row0 = _join(r0_h, r0_m, r0_l)
    col0 = _join(c0_h, c0_m, c0_l)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cl = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    rk = _row_key(seed, (row0 + r).to(tl.int64), MA, MB, RC)
    c = col0 + cl
    if KIND == 0:
        h = _word(rk[:, None], (c >> 6)[None, :], MA, MB, G)
        bit = (h >> (c & 63).to(tl.uint64)[None, :]) & 1
        s = inv.to(tl.float32)
        v = tl.where(bit != 0, s, -s)
    else:
        h = _word(rk[:, None], (c >> 1)[None, :], MA, MB, G)
        v = _gauss(h, ((c & 1) != 0)[None, :], inv)
    m = (r[:, None] < R) & (cl[None, :] < C)
    tl.store(out_ptr + r[:, None].to(tl.int64) * so_r + cl[None, :] * so_c, v.to(out_ptr.dtype.element_ty), mask=m)


def _split(v: int):
    """A non-negative int64 as three pieces each < 2^31, so every piece is passed as int32 (the
    interpreter mishandles uint32-specialised arguments)."""
    return v >> 32, (v >> 16) & 0xFFFF, v & 0xFFFF


def _inv_bits(k: int) -> int:
    """The bits of 1/sqrt(k) (float64) as an int64, so the kernel gets the exact float64 value."""
    return struct.unpack("<q", struct.pack("<d", inv_sqrt_k(k)))[0]


# out dtypes the kernel stores itself; any other float dtype (the float8 family) is filled through a float32
# buffer and torch's cast: Triton has no float8_e8m0fnu, and no fnuz float8 (or e4m3fn before sm_89) on NVIDIA
# GPUs (a compile error), while the op takes any floating out and defines its values as fp32 cast to out's dtype
_STORE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_STAGE_ELEMS = 1 << 24  # float32 entries of that buffer at a time (64 MiB), in column slices


@on_tensor_device
def projection_matrix_(out: torch.Tensor, seed: int, kind: int, k: int, row0: int, col0: int) -> None:
    """Launcher; arguments checked by gradkit.ops.projection.check_projection_matrix_ (op wrapper, CUDA kernel). An
    out that covers an element twice (expand()ed) is refused as the native op refuses it (programs would write one
    element with different entries, in any order)."""
    R, C = out.shape
    if R == 0 or C == 0:
        return
    check_inplace(out, "out")
    if out.dtype not in _STORE_DTYPES:
        step = max(1, _STAGE_ELEMS // R)
        for c in range(0, C, step):
            part = torch.empty(R, min(step, C - c), dtype=torch.float32, device=out.device)
            projection_matrix_(part, seed, kind, k, row0, col0 + c)
            out[:, c:c + part.shape[1]].copy_(part)
        return
    BR, BC = (16, 64) if interpreting() else (32, 128)
    if triton.cdiv(C, BC) > _MAX_GRID_YZ:  # column tiles on grid axis 1: slices of columns, each its own launch
        step = _MAX_GRID_YZ * BC
        for c in range(0, C, step):
            projection_matrix_(out[:, c:c + step], seed, kind, k, row0, col0 + c)
        return
    grid = (triton.cdiv(R, BR), triton.cdiv(C, BC))
    _matrix_kernel[grid](out, R, C, out.stride(0), out.stride(1), *_split(seed), *_split(row0), *_split(col0),
                         _inv_bits(k), KIND=kind,
                         BLOCK_R=BR, BLOCK_C=BC, MA=_MIX_A, MB=_MIX_B, RC=_ROW_C, G=_GOLDEN)


def _wide_rows(x: torch.Tensor, k: int, seed: int, kind: int, col0: int):
    """``f64_row_scale``'s rule (the kernel converts x to float32) for this launcher: None when x is not float64 or
    no row needs scaling, else the projection of the scaled rows, scaled back in float64."""
    if x.dtype != torch.float64 or x.numel() == 0:
        return None
    wide, up = f64_row_scale(x)
    if not bool(wide.any()):
        return None
    return (project_flat(x / up, k, seed, kind, col0).double() * up).float()


@on_tensor_device
def project_flat(x: torch.Tensor, k: int, seed: int, kind: int, col0: int) -> torch.Tensor:
    """Launcher; arguments checked by gradkit.ops.projection.check_project_flat (op wrapper, CUDA kernel)."""
    B, D = x.shape
    out = torch.zeros(B, k, dtype=torch.float32, device=x.device)
    if B == 0 or D == 0:
        return out
    wide = _wide_rows(x, k, seed, kind, col0)
    if wide is not None:
        return wide
    interp = interpreting() and not _AOT_GPU_LAUNCH
    if interp or kind == 1 or x.dtype == torch.float64:
        mode = 0
    elif x.dtype in (torch.bfloat16, torch.float16):
        mode = 1
    else:
        mode = 2
    BK, BB, BD = BLOCKS["k"], BLOCKS["b"], BLOCKS["d"]
    launch = {"num_warps": GPU_FLAT["num_warps"], "num_stages": GPU_FLAT["num_stages"]}
    if not interp:
        BK, BD = GPU_FLAT["k"], GPU_FLAT["d"]
        BB = GPU_FLAT["b"] if B >= GPU_FLAT["b"] else max(16, triton.next_power_of_2(B))
    assert BD % 64 == 0
    if triton.cdiv(B, BB) > _MAX_GRID_YZ:  # B tiles on grid axis 1: slices of rows (each row's sums are its own)
        step = _MAX_GRID_YZ * BB
        for b in range(0, B, step):
            out[b:b + step] = project_flat(x[b:b + step], k, seed, kind, col0)
        return out
    if x.dtype == torch.float64 and not interp:
        x = x.float()  # fp64 operands are not a tensor-core type; the values are fp32-accurate anyway
    base = col0 - col0 % 64
    ntiles = triton.cdiv(col0 + D - base, BD)
    gk, gb = triton.cdiv(k, BK), triton.cdiv(B, BB)
    split, per = d_splits(ntiles, gk * gb, BLOCKS["split_target"] or (1 if interp else 4 * _sm_count(x.device)))
    part = out if split == 1 else torch.empty(split, B, k, dtype=torch.float32, device=x.device)
    _project_flat_kernel[(gk, gb, split)](x, part, B, D, k, x.stride(0), x.stride(1), *_split(seed), *_split(col0),
                                          ntiles, per,
                                          _inv_bits(k), KIND=kind, MODE=mode, BLOCK_B=BB, BLOCK_K=BK, BLOCK_D=BD,
                                          MA=_MIX_A, MB=_MIX_B, RC=_ROW_C, G=_GOLDEN, ALIGNED=col0 % 64 == 0,
                                          **launch)
    if split > 1:
        torch.sum(part, dim=0, out=out)
    return out


def d_splits(ntiles: int, programs: int, target: int):
    """project_flat's D splits: (split, tiles per split) so that programs x split reaches about target
    programs (enough to fill the device when the (k, B) grid is small), no split empty."""
    split = max(1, min(ntiles, target // max(1, programs)))
    per = triton.cdiv(ntiles, split)
    return triton.cdiv(ntiles, per), per


def _sm_count(device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


# Tokens per tile and contraction chunk of factored_project (powers of two >= 16: tl.dot); tests shrink them.
FACTORED_BLOCKS = {"t": 64, "k": 64}


@triton.jit
def _tile_project(x_ptr, w_ptr, rows, tm, K, sx, p, offs_k, offs_j, jm, BT: tl.constexpr, BKD: tl.constexpr,
                  P_P: tl.constexpr):
    """(BT, P_P) = x[rows, :K] @ w[:K, :p] (fp32, ieee dots); rows where tm is False read as zeros."""
    acc = tl.zeros((BT, P_P), dtype=tl.float32)
    for k0 in range(0, K, BKD):
        km = (k0 + offs_k) < K
        x = tl.load(x_ptr + rows[:, None] * sx + (k0 + offs_k)[None, :], mask=tm[:, None] & km[None, :],
                    other=0.0).to(tl.float32)  # half-precision a / g widened exactly
        w = tl.load(w_ptr + (k0 + offs_k)[:, None] * p + offs_j[None, :], mask=km[:, None] & jm[None, :], other=0.0)
        acc += tl.dot(x, w, input_precision="ieee")
    return acc


@triton.jit
def _tile_uv(a_ptr, g_ptr, lt_ptr, rt_ptr, rb_ptr, m_ptr, rows, tm, I, O, p, sa, sg, offs_k, offs_j, jm,
             HAS_RB: tl.constexpr, HAS_M: tl.constexpr, BT: tl.constexpr, BKD: tl.constexpr, P_P: tl.constexpr):
    """One tile of tokens: U = g_tile lt and V = a_tile rt (+ rb), rows outside tm or masked as zeros."""
    if HAS_M:
        tm = tm & (tl.load(m_ptr + rows, mask=tm, other=0) != 0)
    u = _tile_project(g_ptr, lt_ptr, rows, tm, O, sg, p, offs_k, offs_j, jm, BT, BKD, P_P)
    v = _tile_project(a_ptr, rt_ptr, rows, tm, I, sa, p, offs_k, offs_j, jm, BT, BKD, P_P)
    if HAS_RB:
        v += tl.load(rb_ptr + offs_j, mask=jm, other=0.0)[None, :]
    # both sides zeroed outside the tile's live, unmasked rows: a NaN / inf of lt, rt or another row must not
    # reach a sum through 0 * NaN
    return tl.where(tm[:, None], u, 0.0), tl.where(tm[:, None], v, 0.0)


@triton.jit
def _factored_kernel(a_ptr, g_ptr, lt_ptr, rt_ptr, rb_ptr, m_ptr, out_ptr, T, I, O, p, sa, sg,
                     HAS_RB: tl.constexpr, HAS_M: tl.constexpr, BT: tl.constexpr, BKD: tl.constexpr,
                     P_P: tl.constexpr):
    """One program per example b: for each tile of BT tokens, U = g_tile lt and V = a_tile rt (+ rb)
    (fp32 dots, IEEE precision), masked tokens zeroed, then acc += U^T V; out[b] = acc[:p, :p]."""
    b = tl.program_id(0).to(tl.int64)
    offs_t = tl.arange(0, BT)
    offs_k = tl.arange(0, BKD)
    offs_j = tl.arange(0, P_P)
    jm = offs_j < p
    acc = tl.zeros((P_P, P_P), dtype=tl.float32)
    for t0 in range(0, T, BT):
        rows = b * T + t0 + offs_t
        u, v = _tile_uv(a_ptr, g_ptr, lt_ptr, rt_ptr, rb_ptr, m_ptr, rows, (t0 + offs_t) < T, I, O, p, sa, sg,
                        offs_k, offs_j, jm, HAS_RB, HAS_M, BT, BKD, P_P)
        acc += tl.dot(tl.trans(u), v, input_precision="ieee")
    om = jm[:, None] & jm[None, :]
    tl.store(out_ptr + b * p * p + offs_j[:, None] * p + offs_j[None, :], acc, mask=om)


@triton.jit
def _factored_short_kernel(a_ptr, g_ptr, lt_ptr, rt_ptr, rb_ptr, m_ptr, out_ptr, B, T, E, I, O, p, sa, sg,
                           HAS_RB: tl.constexpr, HAS_M: tl.constexpr, BT: tl.constexpr, BKD: tl.constexpr,
                           P_P: tl.constexpr):
    """Short sequences (T < BT): one program per E = BT // T consecutive examples, whose E * T tokens
    share one tile (one pass over lt / rt for all of them); then out[b0 + e] = U^T V over example e's
    rows of the tile."""
    b0 = tl.program_id(0).to(tl.int64) * E
    offs_t = tl.arange(0, BT)
    offs_k = tl.arange(0, BKD)
    offs_j = tl.arange(0, P_P)
    jm = offs_j < p
    ne = tl.minimum(E, B - b0)
    u, v = _tile_uv(a_ptr, g_ptr, lt_ptr, rt_ptr, rb_ptr, m_ptr, b0 * T + offs_t, offs_t < ne * T, I, O, p, sa, sg,
                    offs_k, offs_j, jm, HAS_RB, HAS_M, BT, BKD, P_P)
    ex = offs_t // T
    om = jm[:, None] & jm[None, :]
    for e in range(0, ne):
        # both factors restricted to example e's rows: zeroing V alone let another example's NaN / inf in U
        # through as NaN * 0
        ue = tl.where((ex == e)[:, None], u, 0.0)
        ve = tl.where((ex == e)[:, None], v, 0.0)
        acc = tl.dot(tl.trans(ue), ve, input_precision="ieee")
        tl.store(out_ptr + (b0 + e) * p * p + offs_j[:, None] * p + offs_j[None, :], acc, mask=om)


def _rows_layout(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself where the kernels can address it as ``row * stride0 + col`` with disjoint rows (unit
    column stride, row stride at least the row length, or a single row), else a contiguous copy: an
    expanded (stride-0) or overlapping row layout would otherwise be read wrongly."""
    if t.stride(1) == 1 and (t.shape[0] <= 1 or t.stride(0) >= t.shape[1]):
        return t
    return t.contiguous()


@on_tensor_device
def factored_project(a, g, lt, rt, rb, mask, T: int) -> torch.Tensor:
    """Launcher: see ``gradkit.kernels.reference.projection.factored_project``; (B, p, p) float32. Arguments
    checked by gradkit.ops.projection.check_factored_project (op wrapper, CUDA kernel)."""
    N, I = a.shape
    O, p = lt.shape
    B = N // T
    out = torch.empty((B, p, p), dtype=torch.float32, device=a.device)
    if B == 0:
        return out
    a, g = _rows_layout(a), _rows_layout(g)
    lt, rt = lt.contiguous(), rt.contiguous()
    rb_t = rb.contiguous() if rb is not None else lt
    m_t = mask.contiguous().view(torch.uint8) if mask is not None else lt
    BKD = FACTORED_BLOCKS["k"]
    P_P = max(16, triton.next_power_of_2(p))
    if 2 * T <= FACTORED_BLOCKS["t"]:  # short sequences: several examples share a tile
        BT = FACTORED_BLOCKS["t"]
        E = BT // T
        _factored_short_kernel[(triton.cdiv(B, E),)](
            a, g, lt, rt, rb_t, m_t, out, B, T, E, I, O, p, max(a.stride(0), 1), max(g.stride(0), 1),
            HAS_RB=rb is not None, HAS_M=mask is not None, BT=BT, BKD=BKD, P_P=P_P)
        return out
    BT = max(16, min(FACTORED_BLOCKS["t"], triton.next_power_of_2(T)))
    _factored_kernel[(B,)](a, g, lt, rt, rb_t, m_t, out, T, I, O, p, max(a.stride(0), 1), max(g.stride(0), 1),
                           HAS_RB=rb is not None, HAS_M=mask is not None, BT=BT, BKD=BKD, P_P=P_P)
    return out


def record_aot_cases() -> None:
    """Representative calls on tiny CPU tensors for scripts/triton_aot_check.py (every kind, x dtype and
    constexpr variant of the three kernels)."""
    g = torch.Generator().manual_seed(0)
    for kind in (0, 1):
        out = torch.empty(5, 70)
        projection_matrix_(out, 3, kind, 16, 2, 5)
        for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            project_flat(torch.randn(3, 130, generator=g).to(dt), 20, 7, kind, 3)
    global _AOT_GPU_LAUNCH
    _AOT_GPU_LAUNCH = True
    try:  # GPU_FLAT's tiles and launch options, MODE 2 (fp32 as three bf16 parts) and 1 (bf16 / fp16 x)
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            project_flat(torch.randn(GPU_FLAT["b"], 70, generator=g).to(dt), GPU_FLAT["k"], 7, 0, 3)
    finally:
        _AOT_GPU_LAUNCH = False
    for rb, mask in ((None, None), (torch.randn(4, generator=g), torch.rand(6, generator=g) < 0.5)):
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            for T, m in ((3, mask), (40, None if mask is None else torch.rand(80, generator=g) < 0.5)):
                n = 6 if T == 3 else 80  # T = 3: the short-sequence kernel; T = 40: the per-example one
                factored_project(torch.randn(n, 20, generator=g).to(dt), torch.randn(n, 18, generator=g).to(dt),
                                 torch.randn(18, 4, generator=g), torch.randn(20, 4, generator=g), rb, m, T)
