"""Issue 6, GPU: a warp-specialised Gluon kernel for the flat projection (bf16 / fp16 x), prepared in session 15
without a GPU for the next lease. It is timed by benchmarks/gpu_flat_variants.py as TRANS 6, after a check of
its output against float64 and against the shipped kernel.

Why (benchmarks/sass_census.py, GPU-NOTES.md): the shipped Triton kernel, with one warp group per program,
generates each R^T tile, stores it to shared memory, then runs the wgmma and waits for it. Nothing overlaps.
Its R^T tile also goes to shared memory as 128 two-byte stores per thread and tile, because each thread holds
one column of R^T while the swizzled layout is contiguous along the other axis. Here the roles are split:

* a loader warp copies x tiles [BLOCK_B, BLOCK_D] into a ring of NBUF shared buffers by TMA;
* GEN_WARPS generator warps write R tiles [BLOCK_K, BLOCK_D] (rows of R, D contiguous) into a second ring.
  Each thread owns one row of R and one 64-column word at a time: one hash per (row, word), as in the shipped
  kernel, and its 64 +-1 entries are 128 contiguous bytes of shared memory (eight 16-byte stores);
* the default partition (one warp group) runs ``acc += x_tile @ R_tile^T``. The transposed operand is a view
  (``permute``), which wgmma reads directly. It keeps one wgmma in flight and frees a slot of both rings
  when the wgmma that read it has completed.

The generator partition can thus fill tile t + 1 while the tensor cores work on tile t.

Same matrix, same tiles, same order of accumulation as the shipped kernel at the same BLOCK_* (entries from
the counter-based generator, ``gradkit.kernels.triton.projection``): its output should equal the shipped
kernel's bit for bit at the shipped tiles. Scope: Rademacher, bf16 / fp16 x (tensor-core MODE 1), col0 = 0,
unit column stride and 16-byte aligned rows (TMA). No interpreter exists for Gluon: on CPU it is only
compiled for sm_90 (tests/test_gpu_flat_variants.py) under the Triton this machine has.
"""
from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

# TMA global -> shared copy: async_copy_global_to_shared up to Triton 3.6 (the H200's), async_load from 3.7 on
# (the old name raises there). Same arguments (descriptor, coordinates, barrier, destination).
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
# shared_memory_descriptor's reinterpret: `_reinterpret` up to 3.6, `reinterpret` from 3.7 on
_NEW_REINTERPRET = hasattr(gl.shared_memory_descriptor, "reinterpret")


@gluon.jit
def _unshuffle(x):
    """uint32: bits 0, 2, .., 30 to bits 0..15 and bits 1, 3, .., 31 to bits 16..31 (four delta swaps)."""
    t = (x ^ (x >> 1)) & 0x22222222
    x = x ^ t ^ (t << 1)
    t = (x ^ (x >> 2)) & 0x0C0C0C0C
    x = x ^ t ^ (t << 2)
    t = (x ^ (x >> 4)) & 0x00F000F0
    x = x ^ t ^ (t << 4)
    t = (x ^ (x >> 8)) & 0x0000FF00
    return x ^ t ^ (t << 8)


@gluon.jit
def _mix64(z, MA: gl.constexpr, MB: gl.constexpr):
    z = (z ^ (z >> 30)) * gl.full(z.shape, MA, gl.int64, z.type.layout).to(gl.uint64, bitcast=True)
    z = (z ^ (z >> 27)) * gl.full(z.shape, MB, gl.int64, z.type.layout).to(gl.uint64, bitcast=True)
    return z ^ (z >> 31)


@gluon.jit
def _gen_partition(x_desc, x_bufs, r_bufs, x_ready, r_ready, empty, seed, pid_k, b0, t0, n,
                   BLOCK_K: gl.constexpr, BLOCK_D: gl.constexpr, NBUF: gl.constexpr, GEN_WARPS: gl.constexpr,
                   MA: gl.constexpr, MB: gl.constexpr, RC: gl.constexpr, G: gl.constexpr, PACKED: gl.constexpr,
                   NEG2: gl.constexpr, NEW_REINTERPRET: gl.constexpr):
    """R tiles [BLOCK_K, BLOCK_D] into r_bufs: row k of the tile is row pid_k * BLOCK_K + k of R, its columns
    are t * BLOCK_D + [0, BLOCK_D); entry = +1 where bit (c & 63) of word (row, c >> 6) is set, else -1.
    PACKED: two entries per 32-bit register. Each 32-bit half of a word is unshuffled once (even bits low,
    odd bits high), then pair p of the half is ((u << (15 - p)) & 0x80008000) ^ NEG2, two 16-bit +-1 (NEG2 =
    the pair of -1's bits: bf16 0xBF80BF80, fp16 0xBC00BC00) with the sign bits cleared where the bits are
    set. That is a shift and a logic op per pair plus ~20 ops per 32 entries, instead of ~3 ops per entry.
    The pairs go to the same bytes through an int32 view of the tile."""
    if PACKED:
        _gen_packed(r_bufs, r_ready, empty, seed, pid_k, t0, n, BLOCK_K, BLOCK_D, NBUF, GEN_WARPS, MA, MB, RC, G,
                    NEG2, NEW_REINTERPRET)
    else:
        _gen_plain(r_bufs, r_ready, empty, seed, pid_k, t0, n, BLOCK_K, BLOCK_D, NBUF, GEN_WARPS, MA, MB, RC, G)


@gluon.jit
def _row_keys(seed, pid_k, BLOCK_K: gl.constexpr, layout: gl.constexpr, MA: gl.constexpr, MB: gl.constexpr,
              RC: gl.constexpr):
    rows = pid_k * BLOCK_K + gl.arange(0, BLOCK_K, layout=layout)
    r = rows.to(gl.int64).to(gl.uint64, bitcast=True)
    s64 = gl.full(r.shape, 0, gl.int64, r.type.layout) + seed
    return _mix64(_mix64(r + gl.full(r.shape, RC, gl.int64, r.type.layout).to(gl.uint64, bitcast=True), MA, MB)
                  ^ s64.to(gl.uint64, bitcast=True), MA, MB)


@gluon.jit
def _gen_packed(r_bufs, r_ready, empty, seed, pid_k, t0, n, BLOCK_K: gl.constexpr, BLOCK_D: gl.constexpr,
                NBUF: gl.constexpr, GEN_WARPS: gl.constexpr, MA: gl.constexpr, MB: gl.constexpr, RC: gl.constexpr,
                G: gl.constexpr, NEG2: gl.constexpr, NEW_REINTERPRET: gl.constexpr):
    gen: gl.constexpr = gl.BlockedLayout([1, 32], [32, 1], [GEN_WARPS, 1], [1, 0])
    rk = _row_keys(seed, pid_k, BLOCK_K, gl.SliceLayout(1, gen), MA, MB, RC)
    golden = gl.full(rk.shape, G, gl.int64, rk.type.layout).to(gl.uint64, bitcast=True)
    q = gl.arange(0, 32, layout=gl.SliceLayout(0, gen))
    low = gl.expand_dims(q < 16, 0)
    sh = gl.expand_dims((15 - (q % 16)).to(gl.uint32), 0)
    NW: gl.constexpr = BLOCK_D // 64
    v_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=32, rank=2)
    for i in range(n):
        s = i % NBUF
        mbarrier.wait(empty.index(s), ((i // NBUF) & 1) ^ 1)
        if NEW_REINTERPRET:
            buf = r_bufs.index(s).reinterpret(gl.int32, [BLOCK_K, BLOCK_D // 2], v_layout)
        else:
            buf = r_bufs.index(s)._reinterpret(gl.int32, [BLOCK_K, BLOCK_D // 2], v_layout)
        for w in gl.static_range(NW):
            wi = ((t0 + i).to(gl.int64) * NW + w + 1).to(gl.uint64, bitcast=True)
            h = _mix64(rk + wi * golden, MA, MB)
            ulo = _unshuffle((h & 0xFFFFFFFF).to(gl.uint32))
            uhi = _unshuffle((h >> 32).to(gl.uint32))
            u = gl.where(low, gl.expand_dims(ulo, 1), gl.expand_dims(uhi, 1))
            v = ((u << sh) & 0x80008000) ^ NEG2
            buf.slice(w * 32, 32, dim=1).store(v.to(gl.int32, bitcast=True))
        fence_async_shared()
        mbarrier.arrive(r_ready.index(s), count=1)


@gluon.jit
def _gen_plain(r_bufs, r_ready, empty, seed, pid_k, t0, n, BLOCK_K: gl.constexpr, BLOCK_D: gl.constexpr,
               NBUF: gl.constexpr, GEN_WARPS: gl.constexpr, MA: gl.constexpr, MB: gl.constexpr, RC: gl.constexpr,
               G: gl.constexpr):
    gen: gl.constexpr = gl.BlockedLayout([1, 64], [32, 1], [GEN_WARPS, 1], [1, 0])
    rk = _row_keys(seed, pid_k, BLOCK_K, gl.SliceLayout(1, gen), MA, MB, RC)
    j = gl.arange(0, 64, layout=gl.SliceLayout(0, gen)).to(gl.uint64)
    golden = gl.full(rk.shape, G, gl.int64, rk.type.layout).to(gl.uint64, bitcast=True)
    NW: gl.constexpr = BLOCK_D // 64
    dt: gl.constexpr = r_bufs.dtype
    for i in range(n):
        s = i % NBUF
        mbarrier.wait(empty.index(s), ((i // NBUF) & 1) ^ 1)
        buf = r_bufs.index(s)
        for w in gl.static_range(NW):
            wi = ((t0 + i).to(gl.int64) * NW + w + 1).to(gl.uint64, bitcast=True)
            h = _mix64(rk + wi * golden, MA, MB)
            bits = (gl.expand_dims(h, 1) >> gl.expand_dims(j, 0)) & 1
            buf.slice(w * 64, 64, dim=1).store(gl.where(bits != 0, 1.0, -1.0).to(dt))
        fence_async_shared()
        mbarrier.arrive(r_ready.index(s), count=1)


@gluon.jit
def _load_partition(x_desc, x_bufs, r_bufs, x_ready, r_ready, empty, seed, pid_k, b0, t0, n,
                    BLOCK_K: gl.constexpr, BLOCK_D: gl.constexpr, NBUF: gl.constexpr, GEN_WARPS: gl.constexpr,
                    MA: gl.constexpr, MB: gl.constexpr, RC: gl.constexpr, G: gl.constexpr, PACKED: gl.constexpr,
                    NEG2: gl.constexpr, NEW_REINTERPRET: gl.constexpr):
    """x tiles [BLOCK_B, BLOCK_D] at (b0, t * BLOCK_D) into x_bufs by TMA (zeros past B and D)."""
    for i in range(n):
        s = i % NBUF
        mbarrier.wait(empty.index(s), ((i // NBUF) & 1) ^ 1)
        mbarrier.expect(x_ready.index(s), x_desc.block_type.nbytes)
        _tma_load(x_desc, [b0, (t0 + i) * BLOCK_D], x_ready.index(s), x_bufs.index(s))


@gluon.jit
def _wait_operands(x_ready, r_ready, i, NBUF: gl.constexpr):
    """Ring slot of tile i, once both its x tile (TMA) and its R tile (generator) have landed."""
    s = i % NBUF
    ph = (i // NBUF) & 1
    mbarrier.wait(x_ready.index(s), ph)
    mbarrier.wait(r_ready.index(s), ph)
    return s


@gluon.jit
def _mma_partition(x_bufs, r_bufs, x_ready, r_ready, empty, n, BLOCK_B: gl.constexpr, BLOCK_K: gl.constexpr,
                   NBUF: gl.constexpr, num_warps: gl.constexpr):
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                   instr_shape=[16, BLOCK_K, 16])
    acc = gl.zeros([BLOCK_B, BLOCK_K], gl.float32, layout=mma)
    for i in range(n):
        s = _wait_operands(x_ready, r_ready, i, NBUF)
        acc = warpgroup_mma(x_bufs.index(s), r_bufs.index(s).permute((1, 0)), acc, is_async=True)
        # the previous tile's wgmma has completed: its slot may be refilled
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
        mbarrier.arrive(empty.index((i + NBUF - 1) % NBUF), count=1, pred=i > 0)
    return (warpgroup_mma_wait(num_outstanding=0, deps=(acc, )), )  # the default partition returns a tuple


@gluon.jit
def _mma_split_partition(x_bufs, r_bufs, x_ready, r_ready, empty, n, BLOCK_B: gl.constexpr, BLOCK_K: gl.constexpr,
                         NBUF: gl.constexpr, num_warps: gl.constexpr):
    """fp32 x (SPLIT): each x tile is read from shared memory 64 columns at a time into registers, split into
    three bf16 parts (hi + mid + lo hold its 24 significant bits, as the shipped MODE 2), and multiplied by the
    bf16 R^T half-tile: wgmma takes A from registers. Each tile's products go to a fresh accumulator that is
    added to the running sum in IEEE fp32 once the tile's wgmmas are done. That is session 14's ACC idea for
    the fp32 error that grows with the in-place MMA chain (GPU-NOTES.md). So the sums differ in order from
    the shipped kernel, and the check against it allows the shipped chain's own error."""
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                   instr_shape=[16, BLOCK_K, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    BLOCK_D: gl.constexpr = x_bufs.type.shape[2]
    acc = gl.zeros([BLOCK_B, BLOCK_K], gl.float32, layout=mma)
    for i in range(n):
        s = _wait_operands(x_ready, r_ready, i, NBUF)
        xs = x_bufs.index(s)
        rt = r_bufs.index(s).permute((1, 0))
        part = gl.zeros([BLOCK_B, BLOCK_K], gl.float32, layout=mma)
        for h in gl.static_range(BLOCK_D // 64):
            xf = xs.slice(h * 64, 64, dim=1).load(a_layout)
            hi = xf.to(gl.bfloat16)
            r1 = xf - hi.to(gl.float32)
            mid = r1.to(gl.bfloat16)
            lo = (r1 - mid.to(gl.float32)).to(gl.bfloat16)
            rth = rt.slice(h * 64, 64, dim=0)
            part = warpgroup_mma(hi, rth, part, is_async=True)
            part = warpgroup_mma(mid, rth, part, is_async=True)
            part = warpgroup_mma(lo, rth, part, is_async=True)
        part = warpgroup_mma_wait(num_outstanding=0, deps=(part, ))
        mbarrier.arrive(empty.index(s), count=1)
        acc = acc + part
    return (acc, )


@gluon.jit
def _mma_any_partition(x_bufs, r_bufs, x_ready, r_ready, empty, n, BLOCK_B: gl.constexpr, BLOCK_K: gl.constexpr,
                       NBUF: gl.constexpr, SPLIT: gl.constexpr, num_warps: gl.constexpr):
    """The default partition: the fp32 split (SPLIT) or the bf16 / fp16 one (a function held in a constexpr is
    not callable in warp_specialize's list, Triton 3.6)."""
    if SPLIT:
        return _mma_split_partition(x_bufs, r_bufs, x_ready, r_ready, empty, n, BLOCK_B, BLOCK_K, NBUF, num_warps)
    else:
        return _mma_partition(x_bufs, r_bufs, x_ready, r_ready, empty, n, BLOCK_B, BLOCK_K, NBUF, num_warps)


@gluon.jit
def flat_gluon_kernel(x_desc, part_ptr, B, K, seed_h, seed_m, seed_l, ntiles, per_split, inv_bits,
                      BLOCK_B: gl.constexpr, BLOCK_K: gl.constexpr, BLOCK_D: gl.constexpr, NBUF: gl.constexpr,
                      GEN_WARPS: gl.constexpr, GEN_REGS: gl.constexpr, MA: gl.constexpr, MB: gl.constexpr,
                      RC: gl.constexpr, G: gl.constexpr, PACKED: gl.constexpr, NEG2: gl.constexpr,
                      NEW_REINTERPRET: gl.constexpr, SPLIT: gl.constexpr, num_warps: gl.constexpr):
    pid_k = gl.program_id(0)
    pid_b = gl.program_id(1)
    pid_s = gl.program_id(2)
    b0 = pid_b * BLOCK_B
    seed = (gl.to_tensor(seed_h).to(gl.int64) << 32) | (gl.to_tensor(seed_m).to(gl.int64) << 16) \
        | gl.to_tensor(seed_l).to(gl.int64)
    t0 = pid_s * per_split
    n = gl.minimum(t0 + per_split, ntiles) - t0

    x_bufs = gl.allocate_shared_memory(x_desc.dtype, [NBUF] + x_desc.block_type.shape, x_desc.layout)
    if SPLIT:  # fp32 x: R in bf16 for the three parts
        r_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_K, BLOCK_D], gl.bfloat16)
        r_bufs = gl.allocate_shared_memory(gl.bfloat16, [NBUF, BLOCK_K, BLOCK_D], r_layout)
    else:
        r_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_K, BLOCK_D], x_desc.dtype)
        r_bufs = gl.allocate_shared_memory(x_desc.dtype, [NBUF, BLOCK_K, BLOCK_D], r_layout)
    x_ready = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
    r_ready = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NBUF):
        mbarrier.init(x_ready.index(i), count=1)
        mbarrier.init(r_ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)

    # (the worker argument tuples are written out in the call: a tuple bound to a variable first turns its
    # constexprs into values, Triton 3.6)
    res = gl.warp_specialize([
        (_mma_any_partition, (x_bufs, r_bufs, x_ready, r_ready, empty, n, BLOCK_B, BLOCK_K, NBUF, SPLIT,
                              num_warps)),
        (_gen_partition, (x_desc, x_bufs, r_bufs, x_ready, r_ready, empty, seed, pid_k, b0, t0, n, BLOCK_K,
                          BLOCK_D, NBUF, GEN_WARPS, MA, MB, RC, G, PACKED, NEG2, NEW_REINTERPRET)),
        (_load_partition, (x_desc, x_bufs, r_bufs, x_ready, r_ready, empty, seed, pid_k, b0, t0, n, BLOCK_K,
                           BLOCK_D, NBUF, GEN_WARPS, MA, MB, RC, G, PACKED, NEG2, NEW_REINTERPRET)),
    ], [GEN_WARPS, 1], [GEN_REGS, 24])
    acc = res[0]

    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                   instr_shape=[16, BLOCK_K, 16])
    inv = gl.to_tensor(inv_bits).to(gl.int64).to(gl.float64, bitcast=True).to(gl.float32)
    acc = acc * inv
    rows = pid_k * BLOCK_K + gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, mma))
    bidx = b0 + gl.arange(0, BLOCK_B, layout=gl.SliceLayout(1, mma))
    om = (gl.expand_dims(bidx, 1) < B) & (gl.expand_dims(rows, 0) < K)
    optr = part_ptr + pid_s.to(gl.int64) * B * K + gl.expand_dims(bidx.to(gl.int64) * K, 1) + gl.expand_dims(rows, 0)
    gl.store(optr, acc, mask=om)


def x_descriptor(x: torch.Tensor, block_b: int, block_d: int) -> TensorDescriptor:
    dt = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, torch.float32: gl.float32}[x.dtype]
    layout = gl.NVMMASharedLayout.get_default_for([block_b, block_d], dt)
    return TensorDescriptor(x, list(x.shape), list(x.stride()), [block_b, block_d], layout)


def _neg2(dtype) -> int:
    """Two -1 entries of the tile dtype in one 32-bit word (PACKED generation)."""
    return 0xBC00BC00 if dtype in (torch.float16, gl.float16) else 0xBF80BF80  # fp32 x: bf16 R


def flat_gluon(x, k, seed, bk, bb, bd, nbuf=3, gen_warps=4, gen_regs=152, sms=132, num_warps=4, packed=False):
    """project_flat(x, k, seed, Rademacher, col0=0) on sm_90 for bf16 / fp16 x, and fp32 x split into three
    bf16 parts (SPLIT), launched like the shipped kernel (grid (k tiles, B tiles, D splits), T.d_splits,
    partial sums added in split order)."""
    from gradkit.kernels.triton import projection as T

    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError("flat_gluon: bf16 / fp16 / fp32 x only")
    if x.stride(1) != 1 or (x.stride(0) * x.element_size()) % 16:
        raise ValueError("flat_gluon: x needs unit column stride and 16-byte aligned rows (TMA)")
    from gpu_flat_variants import split_launch

    desc = x_descriptor(x, bb, bd)

    def launch(grid, part, ntiles, per):
        flat_gluon_kernel[grid](desc, part, x.shape[0], k, *T._split(seed), ntiles, per, T._inv_bits(k),
                                BLOCK_B=bb, BLOCK_K=bk, BLOCK_D=bd, NBUF=nbuf, GEN_WARPS=gen_warps, GEN_REGS=gen_regs,
                                MA=T._MIX_A, MB=T._MIX_B, RC=T._ROW_C, G=T._GOLDEN, PACKED=packed,
                                NEG2=_neg2(x.dtype), NEW_REINTERPRET=_NEW_REINTERPRET, SPLIT=x.dtype == torch.float32,
                                num_warps=num_warps)

    return split_launch(launch, x, k, bk, bb, bd, sms)


def compile_sm90(bk=128, bb=64, bd=128, nbuf=3, gen_warps=4, gen_regs=152, B=64, D=1 << 20, k=2048, packed=False,
                 dtype=torch.bfloat16):
    """The kernel compiled for sm_90 as the runtime would launch it at (B, D, k), on a machine without a GPU
    (tests/test_gpu_flat_variants.py), through benchmarks/sass_census.py's compile_sm90."""
    from triton.backends.nvidia.compiler import CUDABackend
    from triton._C.libtriton import native_specialize_impl
    from triton.experimental.gluon._runtime import GluonASTSource

    import sass_census
    from gradkit.kernels.triton import projection as T

    desc = x_descriptor(torch.empty(0, dtype=dtype).new_empty((B, D)), bb, bd)
    ntiles = triton.cdiv(D, bd)
    _, per = T.d_splits(ntiles, triton.cdiv(k, bk) * triton.cdiv(B, bb), 4 * 132)
    args = {"x_desc": (native_specialize_impl(CUDABackend, desc, False, True, True)[0], None),
            "part_ptr": ("*fp32", 0), "B": ("i32", B), "K": ("i32", k),
            **{n: ("i32", v) for n, v in zip(("seed_h", "seed_m", "seed_l"), T._split(0))},
            "ntiles": ("i32", ntiles), "per_split": ("i32", per), "inv_bits": ("i64", T._inv_bits(k))}
    const = dict(BLOCK_B=bb, BLOCK_K=bk, BLOCK_D=bd, NBUF=nbuf, GEN_WARPS=gen_warps, GEN_REGS=gen_regs, MA=T._MIX_A,
                 MB=T._MIX_B, RC=T._ROW_C, G=T._GOLDEN, PACKED=packed, NEG2=_neg2(dtype),
                 NEW_REINTERPRET=_NEW_REINTERPRET, SPLIT=dtype == torch.float32, num_warps=4)
    return sass_census.compile_sm90(flat_gluon_kernel, args, const, num_warps=4, num_stages=None,
                                    source=GluonASTSource)
