// Session 30: the bfloat16 AMX path at p = 64 stayed below bergson (0.88x); which tile blocking feeds TDPBF16PS
// best? One side, Y[t, 0..64) = sum_k x[t, k] W[k, .], x bfloat16 (N tokens x K features, rows where they lie, the
// tail K % 32 left out: timing only), W +-1 in the VNNI pair layout, one thread. Not built by setup.py:
//   g++ -O2 -march=sapphirerapids benchmarks/micro/amx_tiles64.cpp -o /tmp/amx64 && /tmp/amx64 [N] [K]
//   (IR=reps for small N, PD=steps ahead for D)
// A: skinny_amx's loop (16 tokens, 4 accumulators, x in one tile, sign tiles rotating over three: 5 tile loads per
//    4 TDPBF16PS); B: skinny_amx2's (32 tokens, two passes of 32 outputs, 2 x 2 products: 4 loads per 4);
//    D: B with an L1 prefetch of the next step's rows; E: 16 tokens, 2 accumulators, two sets of sources
//    alternating (double buffered: 3 loads per 2); F: 32 tokens x 16 outputs, likewise double buffered;
//    C (not printed): K blocks whose sign tiles fit L1, accumulators stored and reloaded per block.
// Results on the session-30 VM (Intel Xeon, Emerald Rapids, family 6 model 207), best of 15, K = 1000:
//   N = 8192: A 1.56-2.01 ms, B 1.31-1.52, D 1.25-1.33, E 1.89, F 1.86 (C 2.09 at 256-feature blocks);
//   N = 512 (x in L2): A 0.092-0.103, B 0.075-0.080, D 0.072, E 0.110, F 0.097.
// All variants give the same bits (each row is its own TDPBF16PS computation). Alone on this VM a TDPBF16PS issues
// every 6.2 ns and a tile load from L2 every 4.7 ns; mixed, the loop costs ~17 ns per tile load: the tile loads
// bound it, so blockings that load less per product win, double buffering (more loads) loses. In the whole op
// (benchmarks/amx_ab.py --tile) B gains at p = 16 and 32 and not at p = 64 (results/intel-emr-avx512/
// amx-two-tiles-session30.txt), and D's prefetch did not carry over (0.97-1.06x).
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <cstdlib>
#include <random>
#include <vector>
struct TileConfig { uint8_t palette, start_row; uint8_t reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; };
static TileConfig cfg;
int main(int argc, char** argv) {
  syscall(SYS_arch_prctl, 0x1023, 18);
  const int N = argc > 1 ? atoi(argv[1]) : 8192;
  const int K = argc > 2 ? atoi(argv[2]) : 1000;
  const int LD = K;  // row stride in elements
  const int kpad = (K + 31) / 32 * 32;
  constexpr int P = 64;
  std::mt19937 rng(1);
  std::vector<uint16_t> x(static_cast<size_t>(N) * LD + 64);
  for (auto& v : x) v = 0x3f80 ^ (rng() & 0x807f);
  std::vector<uint16_t> wp(static_cast<size_t>(kpad) * P);
  for (auto& v : wp) v = (rng() & 1) ? 0x3f80 : 0xbf80;
  std::vector<float> y(static_cast<size_t>(N) * P);
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t) { cfg.colsb[t] = 64; cfg.rows[t] = 16; }
  _tile_loadconfig(&cfg);
  const int kmain = K / 32 * 32;
  // A: current: 16 tokens, 4 acc (0,5,6,7), x in 1, W rotating 2,3,4
  auto A = [&] {
    for (int t = 0; t < N; t += 16) {
      const uint16_t* x0 = x.data() + (size_t)t * LD;
      _tile_zero(0); _tile_zero(5); _tile_zero(6); _tile_zero(7);
      for (int k = 0; k < kmain; k += 32) {
        _tile_loadd(1, x0 + k, LD * 2);
        _tile_loadd(2, wp.data() + k * 16, 64); _tile_dpbf16ps(0, 1, 2);
        _tile_loadd(3, wp.data() + kpad * 16 + k * 16, 64); _tile_dpbf16ps(5, 1, 3);
        _tile_loadd(4, wp.data() + 2 * kpad * 16 + k * 16, 64); _tile_dpbf16ps(6, 1, 4);
        _tile_loadd(2, wp.data() + 3 * kpad * 16 + k * 16, 64); _tile_dpbf16ps(7, 1, 2);
      }
      float* yy = y.data() + (size_t)t * P;
      _tile_stored(0, yy, P * 4); _tile_stored(5, yy + 16, P * 4); _tile_stored(6, yy + 32, P * 4); _tile_stored(7, yy + 48, P * 4);
    }
  };
  // B: 32 tokens x 32 outputs per pass, two passes: acc 0,1 (tile a), 2,3 (tile b); x 4,5; W 6,7
  // B (pd = 0) and D (pd = steps ahead of the L1 prefetch of the rows)
  const auto BD = [&](int pd) {
    for (int t = 0; t < N; t += 32) {
      const uint16_t* x0 = x.data() + (size_t)t * LD;
      const uint16_t* x1 = x0 + (size_t)16 * LD;
      for (int c = 0; c < 2; ++c) {
        const uint16_t* w0 = wp.data() + (2 * c) * kpad * 16;
        const uint16_t* w1 = w0 + kpad * 16;
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
        for (int k = 0; k < kmain; k += 32) {
          const int kn = k + 32 * pd;
          if (pd > 0 && kn < kmain)
            for (int r = 0; r < 16; ++r) { _mm_prefetch((const char*)(x0 + (size_t)r * LD + kn), _MM_HINT_T0); _mm_prefetch((const char*)(x1 + (size_t)r * LD + kn), _MM_HINT_T0); }
          _tile_loadd(4, x0 + k, LD * 2);
          _tile_loadd(6, w0 + k * 16, 64);
          _tile_dpbf16ps(0, 4, 6);
          _tile_loadd(7, w1 + k * 16, 64);
          _tile_dpbf16ps(1, 4, 7);
          _tile_loadd(5, x1 + k, LD * 2);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
        float* yy = y.data() + (size_t)t * P + c * 32;
        _tile_stored(0, yy, P * 4); _tile_stored(1, yy + 16, P * 4);
        _tile_stored(2, yy + 16 * P, P * 4); _tile_stored(3, yy + 16 * P + 16, P * 4);
      }
    }
  };
  const int PD = getenv("PD") ? atoi(getenv("PD")) : 1;  // steps ahead
  auto B = [&] { BD(0); };
  auto D = [&] { BD(PD); };
  // E: 16 tokens, 2 passes of 32 outputs, acc 0,1; double-buffered sources {2,3,4} / {5,6,7}
  auto E = [&] {
    for (int t = 0; t < N; t += 16) {
      const uint16_t* x0 = x.data() + (size_t)t * LD;
      for (int c = 0; c < 2; ++c) {
        const uint16_t* w0 = wp.data() + (2 * c) * kpad * 16;
        const uint16_t* w1 = w0 + kpad * 16;
        _tile_zero(0); _tile_zero(1);
        int k = 0;
        for (; k + 64 <= kmain; k += 64) {
          _tile_loadd(2, x0 + k, LD * 2);
          _tile_loadd(3, w0 + k * 16, 64);
          _tile_loadd(4, w1 + k * 16, 64);
          _tile_dpbf16ps(0, 2, 3);
          _tile_dpbf16ps(1, 2, 4);
          _tile_loadd(5, x0 + k + 32, LD * 2);
          _tile_loadd(6, w0 + (k + 32) * 16, 64);
          _tile_loadd(7, w1 + (k + 32) * 16, 64);
          _tile_dpbf16ps(0, 5, 6);
          _tile_dpbf16ps(1, 5, 7);
        }
        for (; k < kmain; k += 32) {
          _tile_loadd(2, x0 + k, LD * 2);
          _tile_loadd(3, w0 + k * 16, 64);
          _tile_loadd(4, w1 + k * 16, 64);
          _tile_dpbf16ps(0, 2, 3);
          _tile_dpbf16ps(1, 2, 4);
        }
        float* yy = y.data() + (size_t)t * P + c * 32;
        _tile_stored(0, yy, P * 4); _tile_stored(1, yy + 16, P * 4);
      }
    }
  };
  // F: 32 tokens, 4 passes of 16 outputs, acc 0,1; double-buffered {2,3,4} / {5,6,7}
  auto F = [&] {
    for (int t = 0; t < N; t += 32) {
      const uint16_t* x0 = x.data() + (size_t)t * LD;
      const uint16_t* x1 = x0 + (size_t)16 * LD;
      for (int c = 0; c < 4; ++c) {
        const uint16_t* w0 = wp.data() + c * kpad * 16;
        _tile_zero(0); _tile_zero(1);
        int k = 0;
        for (; k + 64 <= kmain; k += 64) {
          _tile_loadd(2, x0 + k, LD * 2);
          _tile_loadd(4, w0 + k * 16, 64);
          _tile_dpbf16ps(0, 2, 4);
          _tile_loadd(3, x1 + k, LD * 2);
          _tile_dpbf16ps(1, 3, 4);
          _tile_loadd(5, x0 + k + 32, LD * 2);
          _tile_loadd(7, w0 + (k + 32) * 16, 64);
          _tile_dpbf16ps(0, 5, 7);
          _tile_loadd(6, x1 + k + 32, LD * 2);
          _tile_dpbf16ps(1, 6, 7);
        }
        for (; k < kmain; k += 32) {
          _tile_loadd(2, x0 + k, LD * 2);
          _tile_loadd(4, w0 + k * 16, 64);
          _tile_dpbf16ps(0, 2, 4);
          _tile_loadd(3, x1 + k, LD * 2);
          _tile_dpbf16ps(1, 3, 4);
        }
        float* yy = y.data() + (size_t)t * P + c * 16;
        _tile_stored(0, yy, P * 4); _tile_stored(1, yy + 16 * P, P * 4);
      }
    }
  };
  // C: K-chunked (W chunk in L1): chunk KC features; per chunk, per 16-token tile: load acc from y, 4 W per step, store
  const int KC = argc > 3 ? atoi(argv[3]) : 256;
  auto C = [&] {
    for (int t0 = 0; t0 < N; t0 += 256) {  // token block
      const int t1 = std::min(N, t0 + 256);
      for (int kc = 0; kc < kmain; kc += KC) {
        const int ke = std::min(kmain, kc + KC);
        for (int t = t0; t < t1; t += 16) {
          const uint16_t* x0 = x.data() + (size_t)t * LD;
          float* yy = y.data() + (size_t)t * P;
          if (kc == 0) { _tile_zero(0); _tile_zero(5); _tile_zero(6); _tile_zero(7); }
          else { _tile_loadd(0, yy, P * 4); _tile_loadd(5, yy + 16, P * 4); _tile_loadd(6, yy + 32, P * 4); _tile_loadd(7, yy + 48, P * 4); }
          for (int k = kc; k < ke; k += 32) {
            _tile_loadd(1, x0 + k, LD * 2);
            _tile_loadd(2, wp.data() + k * 16, 64); _tile_dpbf16ps(0, 1, 2);
            _tile_loadd(3, wp.data() + kpad * 16 + k * 16, 64); _tile_dpbf16ps(5, 1, 3);
            _tile_loadd(4, wp.data() + 2 * kpad * 16 + k * 16, 64); _tile_dpbf16ps(6, 1, 4);
            _tile_loadd(2, wp.data() + 3 * kpad * 16 + k * 16, 64); _tile_dpbf16ps(7, 1, 2);
          }
          _tile_stored(0, yy, P * 4); _tile_stored(5, yy + 16, P * 4); _tile_stored(6, yy + 32, P * 4); _tile_stored(7, yy + 48, P * 4);
        }
      }
    }
  };
  auto time = [&](auto f) {
    f();
    double best = 1e9;
    for (int r = 0; r < 15; ++r) { const int IR = getenv("IR") ? atoi(getenv("IR")) : 1;
      auto t0 = std::chrono::steady_clock::now();
      for (int i = 0; i < IR; ++i) f();
      best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / IR);
    }
    return best * 1e3;
  };
  std::vector<float> ya;
  A(); ya = y; B(); size_t dB = 0; for (size_t i = 0; i < y.size(); ++i) dB += ya[i] != y[i];
  E(); size_t dC = 0; for (size_t i = 0; i < y.size(); ++i) dC += ya[i] != y[i];
  F(); for (size_t i = 0; i < y.size(); ++i) dC += ya[i] != y[i];
  for (int rep = 0; rep < 2; ++rep)
    std::printf("N=%d K=%d: A %.4f ms  B %.4f ms  D %.4f ms  E %.4f  F %.4f (diff B %zu EF %zu)\n", N, K, time(A), time(B), time(D), time(E), time(F), dB, dC);
  _tile_release();
}
