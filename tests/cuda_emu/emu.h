// A CPU emulator for gradkit's CUDA C++ kernels, so that CI (no GPU) runs them, host code included, and
// checks their results against the CPU kernels: a .cu file is compiled as plain C++ with GRADKIT_CUDA_EMU
// defined and the headers in shim/ in front of the real ones (see tests/test_cuda_emulated.py).
//
// Model: blocks run one after another; a block's threads run as fibers (ucontext) on one OS thread, each
// until it reaches __syncthreads() or returns, and a barrier releases when every live thread of the block
// has reached it. __shared__ arrays are `static` here: they keep what the previous block or launch left
// (undefined on hardware too); GK_DYNAMIC_SHARED memory is filled with NaN bytes at each block's start.
// Either way a read of shared memory this block did not write yet shows up in the results.
// Every thread of a block must wait at the same __syncthreads (same source line) in each round: one
// waiting elsewhere is reported as a barrier divergence (an error on real hardware too).
//
// What it checks: the launch limits a GPU enforces (block size, grid axes x <= 2^31-1 and y, z <= 65535,
// dynamic shared memory <= 48 KiB) and that every launch is on the current stream (kCurrentStream below);
// indexing, tiling, the split of work over blocks and threads, barrier placement (a
// missing barrier that lets a thread read a tile before it is written reads NaN or stale data here only
// when the fiber order exposes it: threads run in index order, or in reverse order after
// set_reverse(true), so a test that runs both orders sees a read of data written by another thread in the
// same phase as a stale or NaN value in one of them), and the arithmetic where it is written with
// explicit intrinsics (fmaf, __fadd_rn, __dmul_rn...), and warp collectives (__shfl_sync,
// __shfl_xor_sync, __shfl_up_sync, __shfl_down_sync, __ballot_sync, __match_any_sync, __syncwarp): the lanes of the mask
// deposit their values, and the group is released when every live lane of the mask waits at a collective
// of that mask; a lane left waiting while the rest of the block waits at __syncthreads is reported as a
// deadlock. Atomics are plain read-modify-writes (fibers never run concurrently); cub's block reduce /
// scan and device scan are in shim/cub_emu.h. What it does not: the memory model,
// timing, and nvcc's default contraction of a * b + c into an FMA (this build uses -ffp-contract=off,
// so expressions that nvcc would contract round differently here), and CUDA's own libm (the host's is used).
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

// The running fiber's indices (set by the scheduler before every switch into a fiber).
inline uint3 threadIdx{0, 0, 0};
inline uint3 blockIdx{0, 0, 0};
inline dim3 blockDim;
inline dim3 gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __syncthreads() ::gk_emu::sync_threads(__LINE__)

namespace gk_emu {

enum class Wait { kReady, kBlock, kWarp, kDone };

struct Fiber {
  ucontext_t ctx;
  Wait wait = Wait::kReady;
  int line = 0;            // the __syncthreads line it waits at
  unsigned mask = 0;       // the lanes of the warp collective it waits at
  uint64_t deposit = 0;    // its value for that collective
  uint64_t snap[32] = {};  // every participant's deposit, copied at release
};

struct State {
  ucontext_t sched;
  std::vector<Fiber> fibers;
  std::vector<char> stacks;
  size_t stack_bytes = 256 * 1024;
  Fiber* cur = nullptr;
  size_t cur_t = 0;  // the running fiber's linear thread index
  const std::function<void()>* body = nullptr;
  std::vector<unsigned char> dyn;  // GK_DYNAMIC_SHARED
  int sms = 132;                   // the emulated device's streaming multiprocessors
  bool reverse = false;            // run each round's threads in descending index order
  int64_t launches = 0, blocks = 0, barriers = 0;
};
inline State& state() {
  static State s;
  return s;
}

inline int sm_count() { return state().sms; }
inline void set_sm_count(int n) { state().sms = n < 1 ? 1 : n; }
inline void set_reverse(bool r) { state().reverse = r; }

template <typename T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(state().dyn.data());
}

inline void sync_threads(int line) {
  State& s = state();
  s.cur->wait = Wait::kBlock;
  s.cur->line = line;
  swapcontext(&s.cur->ctx, &s.sched);
}

// A warp collective over the lanes in `mask` (the calling lane included): deposit v, wait until every
// live lane of the mask waits at a collective of the same mask, return the deposits (indexed by lane;
// lanes outside the mask or exited read 0).
inline const uint64_t* warp_exchange(unsigned mask, uint64_t v) {
  State& s = state();
  s.cur->mask = mask | (1u << (s.cur_t % 32));
  s.cur->deposit = v;
  s.cur->wait = Wait::kWarp;
  swapcontext(&s.cur->ctx, &s.sched);
  return s.cur->snap;
}

inline void fiber_entry() {
  State& s = state();
  (*s.body)();
  s.cur->wait = Wait::kDone;  // returns to uc_link (the scheduler)
}

// The stream c10::cuda::getCurrentCUDAStream() returns here (shim/c10/cuda/CUDAStream.h): a launch on any
// other stream (0, the legacy default stream, say) is an error, as the kernels must run on the current one.
constexpr int kCurrentStream = 0x5eed;
// A launch with no cudaFuncSetAttribute(MaxDynamicSharedMemorySize) may ask for at most 48 KiB.
constexpr size_t kMaxDynamicShared = 48 * 1024;

// Runs fn once per thread of every block of the grid (the body of a <<<grid, block, smem, stream>>> launch),
// after the checks a GPU makes at launch (block and grid limits, dynamic shared memory) and the stream's.
inline void launch(dim3 grid, dim3 block, size_t smem, int stream, const std::function<void()>& fn) {
  State& s = state();
  const size_t nt = static_cast<size_t>(block.x) * block.y * block.z;
  if (nt == 0 || nt > 1024) throw std::runtime_error("gk_emu: bad block size " + std::to_string(nt));
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) throw std::runtime_error("gk_emu: empty grid");
  if (grid.x > 2147483647u || grid.y > 65535u || grid.z > 65535u)
    throw std::runtime_error("gk_emu: grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) + ", " +
                             std::to_string(grid.z) + ") past the limits (2^31-1, 65535, 65535)");
  if (smem > kMaxDynamicShared)
    throw std::runtime_error("gk_emu: " + std::to_string(smem) + " bytes of dynamic shared memory (at most 48 KiB)");
  if (stream != kCurrentStream)
    throw std::runtime_error("gk_emu: launch on stream " + std::to_string(stream) + ", not the current stream");
  const size_t nw = (nt + 31) / 32;
  s.fibers.assign(nt, Fiber{});
  s.stacks.resize(nt * s.stack_bytes);
  s.body = &fn;
  s.dyn.assign(smem + 64, 0xFF);
  gridDim = grid;
  blockDim = block;
  ++s.launches;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        blockIdx = uint3{bx, by, bz};
        ++s.blocks;
        std::memset(s.dyn.data(), 0xFF, s.dyn.size());
        for (size_t t = 0; t < nt; ++t) {
          Fiber& f = s.fibers[t];
          f.wait = Wait::kReady;
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = s.stacks.data() + t * s.stack_bytes;
          f.ctx.uc_stack.ss_size = s.stack_bytes;
          f.ctx.uc_link = &s.sched;
          makecontext(&f.ctx, &fiber_entry, 0);
        }
        for (;;) {
          // run every ready thread to its next barrier, warp collective or end
          for (size_t i = 0; i < nt; ++i) {
            const size_t t = s.reverse ? nt - 1 - i : i;
            Fiber& f = s.fibers[t];
            if (f.wait != Wait::kReady) continue;
            threadIdx = uint3{static_cast<unsigned>(t % block.x), static_cast<unsigned>((t / block.x) % block.y),
                              static_cast<unsigned>(t / (static_cast<size_t>(block.x) * block.y))};
            s.cur = &f;
            s.cur_t = t;
            swapcontext(&s.sched, &f.ctx);
          }
          // release each group of lanes that all wait at a warp collective of the same mask, every live
          // lane of the mask present
          bool released = false;
          for (size_t w = 0; w < nw; ++w) {
            const size_t lo = w * 32, hi = std::min(nt, lo + 32);
            for (size_t t = lo; t < hi; ++t) {
              if (s.fibers[t].wait != Wait::kWarp) continue;
              const unsigned mask = s.fibers[t].mask;
              bool complete = true;
              for (size_t u = lo; u < hi && complete; ++u)
                if ((mask >> (u - lo)) & 1u)
                  complete = s.fibers[u].wait == Wait::kDone ||
                             (s.fibers[u].wait == Wait::kWarp && s.fibers[u].mask == mask);
              if (!complete) continue;
              uint64_t got[32] = {};
              for (size_t u = lo; u < hi; ++u)
                if (((mask >> (u - lo)) & 1u) && s.fibers[u].wait == Wait::kWarp) got[u - lo] = s.fibers[u].deposit;
              for (size_t u = lo; u < hi; ++u)
                if (((mask >> (u - lo)) & 1u) && s.fibers[u].wait == Wait::kWarp) {
                  std::memcpy(s.fibers[u].snap, got, sizeof got);
                  s.fibers[u].wait = Wait::kReady;
                }
              released = true;
            }
          }
          if (released) continue;
          // else a block barrier: every live thread must wait at the same __syncthreads
          int waiting = 0, line = -1;
          for (size_t t = 0; t < nt; ++t) {
            const Fiber& f = s.fibers[t];
            if (f.wait == Wait::kDone) continue;
            if (f.wait != Wait::kBlock)
              throw std::runtime_error("gk_emu: deadlock: thread " + std::to_string(t) +
                                       " waits at a warp collective its warp does not reach");
            if (waiting > 0 && f.line != line)
              throw std::runtime_error("gk_emu: barrier divergence: threads wait at __syncthreads on lines " +
                                       std::to_string(line) + " and " + std::to_string(f.line));
            line = f.line;
            ++waiting;
          }
          if (waiting == 0) break;
          for (auto& f : s.fibers)
            if (f.wait == Wait::kBlock) f.wait = Wait::kReady;
          ++s.barriers;
        }
      }
  s.cur = nullptr;
}

template <typename To, typename From>
To bit_as(From v) {  // std::bit_cast
  static_assert(sizeof(To) == sizeof(From), "gk_emu: bit_as between types of one size");
  To r;
  std::memcpy(&r, &v, sizeof r);
  return r;
}
// A warp collective's value in a 64-bit slot (zero-padded) and back.
template <typename T>
uint64_t to_slot(T v) {
  static_assert(sizeof(T) <= 8, "gk_emu: warp collectives on values of at most 8 bytes");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}
template <typename T>
T from_slot(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}
inline unsigned lane_id() { return static_cast<unsigned>(state().cur_t % 32); }

}  // namespace gk_emu

// Device intrinsics the kernels use, as host functions with the same rounding.
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __dsqrt_rn(double a) { return std::sqrt(a); }
inline float __double2float_rn(double d) { return static_cast<float>(d); }
// Reinterpretations of the bits.
inline float __uint_as_float(unsigned u) { return ::gk_emu::bit_as<float>(u); }
inline unsigned __float_as_uint(float f) { return ::gk_emu::bit_as<unsigned>(f); }
inline float __int_as_float(int i) { return ::gk_emu::bit_as<float>(i); }
inline double __longlong_as_double(long long i) { return ::gk_emu::bit_as<double>(i); }
inline long long __double_as_longlong(double d) { return ::gk_emu::bit_as<long long>(d); }
// CUDA's global-namespace math (the host's <cmath> puts these in std only)
inline bool isnan(float x) { return std::isnan(x); }
inline bool isnan(double x) { return std::isnan(x); }
inline bool isinf(float x) { return std::isinf(x); }
inline bool isinf(double x) { return std::isinf(x); }
// Warp collectives over `mask` (width 32). __match_any_sync: the lanes of the mask holding the same value.
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  const uint64_t* got = ::gk_emu::warp_exchange(mask, ::gk_emu::to_slot(v));
  return ::gk_emu::from_slot<T>(got[(::gk_emu::lane_id() ^ static_cast<unsigned>(lane_mask)) & 31u]);
}
template <typename T>
T __shfl_sync(unsigned mask, T v, int src) {
  const uint64_t* got = ::gk_emu::warp_exchange(mask, ::gk_emu::to_slot(v));
  return ::gk_emu::from_slot<T>(got[static_cast<unsigned>(src) & 31u]);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta) {
  const unsigned lane = ::gk_emu::lane_id();
  const uint64_t* got = ::gk_emu::warp_exchange(mask, ::gk_emu::to_slot(v));
  return lane >= delta ? ::gk_emu::from_slot<T>(got[lane - delta]) : v;
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta) {
  const unsigned lane = ::gk_emu::lane_id();
  const uint64_t* got = ::gk_emu::warp_exchange(mask, ::gk_emu::to_slot(v));
  return lane + delta < 32 ? ::gk_emu::from_slot<T>(got[lane + delta]) : v;
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  const uint64_t* got = ::gk_emu::warp_exchange(mask, pred != 0);
  unsigned r = 0;
  for (unsigned l = 0; l < 32; ++l) r |= got[l] ? 1u << l : 0u;  // outside the mask or exited: 0
  return r & mask;
}
template <typename T>
unsigned __match_any_sync(unsigned mask, T v) {
  const uint64_t mine = ::gk_emu::to_slot(v);
  const uint64_t* got = ::gk_emu::warp_exchange(mask, mine);
  unsigned r = 0;
  for (unsigned l = 0; l < 32; ++l) r |= ((mask >> l) & 1u) && got[l] == mine ? 1u << l : 0u;
  return r;
}
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::gk_emu::warp_exchange(mask, 0); }
// Atomics: fibers never run concurrently, so a read-modify-write is atomic here.
template <typename T>
T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}
inline unsigned atomicAdd(unsigned* p, int v) { return atomicAdd(p, static_cast<unsigned>(v)); }
template <typename T>
T atomicMax(T* p, T v) {
  const T old = *p;
  if (v > old) *p = v;
  return old;
}
template <typename T>
T atomicMin(T* p, T v) {
  const T old = *p;
  if (v < old) *p = v;
  return old;
}
template <typename T>
T atomicOr(T* p, T v) {
  const T old = *p;
  *p = old | v;
  return old;
}
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline unsigned __vcmpne4(unsigned a, unsigned b) {  // 0xff in each byte where a and b differ
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= ((a >> (8 * i)) & 0xffu) != ((b >> (8 * i)) & 0xffu) ? 0xffu << (8 * i) : 0u;
  return r;
}
