// Session 26: could the factored kernel run bfloat16 rows through AMX (TDPBF16PS) on Intel CPUs that have it,
// bit for bit with the FMA kernel? Not built by setup.py (needs an AMX CPU and Linux >= 5.16):
//   g++ -O2 -march=sapphirerapids -DNTOK=8192 benchmarks/micro/amx_bf16.cpp -o /tmp/amx_bf16 && /tmp/amx_bf16
// One side of the projection, Y[t, n] = sum_k x[t, k] W[k, n] with x bfloat16 (NTOK tokens x 1024 features, rows
// where they lie: the A tiles load straight from them) and W = +-1/4 (a Rademacher matrix at p = 16, exact in
// bfloat16; packed once into the VNNI pair layout), two 16 x 16 float32 accumulator tiles per 32 tokens. Then
// every output against the FMA kernel's chain (k ascending from +0, one fma per feature), and against the same
// chain with each feature pair swapped (vdpbf16ps's order: benchmarks/micro/bf16_dot.cpp).
// Result on the session-26 VM (Intel Xeon, Emerald Rapids: family 6 model 207, amx_bf16), one thread:
//   NTOK = 8192 (16 MiB of x, streamed): 0.60-0.63 ms, 426-445 GFLOP/s, reading x at 27-28 GB/s (a first run,
//   minutes after a benchmark, 0.96 ms);
//   NTOK = 512 (in L2): 640-765 GFLOP/s (the FMA kernel: about 140 per core);
//   2558 of 131072 outputs differ from the FMA chain (2563 with the pairs swapped): TDPBF16PS does not round
//   after each product as the chain does, so no pair order gives the other backends' bits.
// Built the same session as an opt-in (GRADKIT_FACTORED_AMX=1, csrc/cpu/projection.cpp skinny_amx), not as the
// default: it is a fourth summation order (the CPU ISA levels and the CUDA C++ kernel agree bit for bit). Whole op,
// bfloat16 1000 x 1000, 64 x 128 tokens, two threads: 0.89-0.96 ms against the FMA kernel's 2.0-2.6 ms and
// bergson's bfloat16 hooks' 1.2-1.3 ms (python benchmarks/amx_ab.py --bergson; benchmarks/run.py). A float32 path would need each x
// split into three bfloat16 parts and meets the float32 read floor: reading a and g takes 1.17 ms on two threads
// (python benchmarks/factored_roofline.py), against bergson's 2.45 ms, so no kernel reaches the 3x there.
// (This program builds its tile configuration on the stack and it works here; in the extension, GCC dropped some
// of such a configuration's zeroing stores and LDTILECFG faulted: the extension keeps it in a thread_local.)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#ifndef NTOK
#define NTOK 8192
#endif

namespace {
struct TileConfig {  // the 64-byte palette-1 layout LDTILECFG reads
  uint8_t palette, start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};
uint16_t to_bf16(float f) {  // exact for the values used here (normals drawn in float, rounded by truncation)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>(u >> 16);
}
float from_bf16(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
}  // namespace

int main() {
  constexpr long kReqPerm = 0x1023, kXTileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
  if (syscall(SYS_arch_prctl, kReqPerm, kXTileData) != 0) {
    std::printf("the kernel refused AMX tile data\n");
    return 1;
  }
  constexpr int K = 1024, N = NTOK, P = 16;
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  std::vector<uint16_t> x(static_cast<size_t>(N) * K);
  for (auto& v : x) v = to_bf16(normal(rng));
  std::vector<float> w(static_cast<size_t>(K) * P);
  for (auto& v : w) v = (rng() & 1) ? 0.25f : -0.25f;
  std::vector<uint16_t> wp(static_cast<size_t>(K) * P);  // [k / 2][n][k % 2]
  for (int k = 0; k < K; ++k)
    for (int n = 0; n < P; ++n) wp[(k / 2) * P * 2 + n * 2 + (k % 2)] = to_bf16(w[k * P + n]);
  std::vector<float> y(static_cast<size_t>(N) * P);
  TileConfig cfg{};
  cfg.palette = 1;
  for (int t = 0; t < 5; ++t) {  // 0, 3: accumulators; 1, 4: x tiles (16 tokens x 32 features); 2: W pairs
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
  const auto side = [&] {
    for (int t = 0; t < N; t += 32) {
      _tile_zero(0);
      _tile_zero(3);
      for (int k = 0; k < K; k += 32) {
        _tile_loadd(1, x.data() + static_cast<size_t>(t) * K + k, K * 2);
        _tile_loadd(4, x.data() + static_cast<size_t>(t + 16) * K + k, K * 2);
        _tile_loadd(2, wp.data() + static_cast<size_t>(k / 2) * P * 2, 64);
        _tile_dpbf16ps(0, 1, 2);
        _tile_dpbf16ps(3, 4, 2);
      }
      _tile_stored(0, y.data() + static_cast<size_t>(t) * P, 64);
      _tile_stored(3, y.data() + static_cast<size_t>(t + 16) * P, 64);
    }
  };
  side();
  constexpr int kReps = 20;
  const auto t0 = std::chrono::steady_clock::now();
  for (int r = 0; r < kReps; ++r) side();
  const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / kReps;
  std::printf("%d tokens x %d features -> %d: %.3f ms, %.1f GFLOP/s, reading x at %.1f GB/s\n", N, K, P,
              sec * 1e3, 2.0 * N * K * P / sec / 1e9, 2.0 * N * K / sec / 1e9);
  for (int swap = 0; swap < 2; ++swap) {
    size_t differ = 0;
    for (int t = 0; t < N; ++t)
      for (int n = 0; n < P; ++n) {
        float acc = 0.0f;
        for (int k = 0; k < K; k += 2) {
          const int k0 = k + swap, k1 = k + 1 - swap;
          acc = std::fma(from_bf16(x[static_cast<size_t>(t) * K + k0]), w[k0 * P + n], acc);
          acc = std::fma(from_bf16(x[static_cast<size_t>(t) * K + k1]), w[k1 * P + n], acc);
        }
        const float got = y[static_cast<size_t>(t) * P + n];
        differ += std::memcmp(&acc, &got, 4) != 0;
      }
    std::printf("%s: %zu of %d outputs differ from the FMA chain\n", swap ? "pairs swapped" : "in order", differ,
                N * P);
  }
  _tile_release();
  return 0;
}
