// Session 28: would float32 a / g gain from AMX on Intel (the 3x against bergson is out of reach there with
// the FMA kernel: 1.17-1.23x)? TDPBF16PS takes bfloat16 only, so each float32 x is split exactly into three
// bfloat16 parts, x = hi + mid + lo (hi = x with its low 16 bits cleared, mid likewise of x - hi, lo the rest:
// 8 + 8 + 8 significant bits, every subtraction exact); W = +-1/4 is exact in bfloat16. One side of the
// projection, Y[t, n] = sum_k x[t, k] W[k, n], x float32 (NTOK tokens x 1024 features), 16 tokens per tile group,
// each block of 32 features split into a scratch (two alternating buffers) and multiplied by three TDPBF16PS.
// Not built by setup.py (needs an AMX CPU and Linux >= 5.16):
//   g++ -O2 -march=sapphirerapids [-DTERN] [-DACC3] [-DPF=_MM_HINT_T2] benchmarks/micro/amx_f32.cpp -o /tmp/amx_f32
//   /tmp/amx_f32 [NTOK]
// Modes: full; conv (the split alone, no tiles); tiles (tiles alone on stale scratch, x's lines still read);
// 1buf (one scratch buffer). TERN: the parts packed with shifts and VPTERNLOGD (pair j = features j, j + 16; W
// packed to match) instead of VCVTNE2PS2BF16; ACC3: lo accumulates in its own tile (mid and lo shared one);
// PF: the next 16 rows prefetched, 2 KiB per block.
// Results on the session-28 VM (Intel Xeon, Emerald Rapids, family 6 model 207), one thread, best of 15:
//   NTOK = 256 (1 MiB, in L2):    cvt + 2 accumulators 0.074 ms (conv 0.051, tiles 0.037); TERN 0.058; TERN + ACC3
//                                 0.044 (conv 0.024, tiles 0.020: mid and lo into one tile waited on its latency)
//   NTOK = 8192 (33.6 MiB):       TERN + ACC3 1.74-1.90 ms (conv 1.38, tiles 1.31: the line reads alone);
//                                 PF T0 2.26-2.55, T1 2.12-3.21, T2 1.97-2.13 (every prefetch made it slower)
// The conversion and the tile work add up instead of overlapping, and together (0.17 ns per element in L2) they
// are no cheaper than reading float32 from DRAM on one core (0.16 ns), so the best variant built into the
// extension (TERN + ACC3) timed 0.84-1.03x the FMA kernel for the whole op at two threads (benchmarks/amx_ab.py
// shapes, 9 interleaved rounds), 1.27x with a next-tile prefetch: not kept. It was more accurate (largest error
// against float64, relative to the largest entry, 3.4e-7 against the FMA chain's 8.4e-7 at 1000 x 1000).
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>
struct TileConfig { uint8_t palette, start_row; uint8_t reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; };
constexpr int K = 1024;
int NTOK = 8192;
alignas(64) uint16_t buf[2][3][16 * 32];
alignas(64) uint16_t Wp[K * 16];
static inline __m512 top(__m512 v, __m512i keep) { return _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), keep)); }
template <int MODE>  // 0 full, 1 conversion only, 2 tiles only (no conversion), 3 conversion + tiles but single buffer
void run(const float* x, float* Y) {
  const __m512i keep = _mm512_set1_epi32(0xFFFF0000u);
  for (int t0 = 0; t0 < NTOK; t0 += 16) {
    _tile_zero(0); _tile_zero(1); _tile_zero(6);
    int cur = 0;
    for (int k = 0; k < K; k += 32, cur ^= (MODE == 3 ? 0 : 1)) {
      uint16_t* hi = buf[cur][0]; uint16_t* mid = buf[cur][1]; uint16_t* lo = buf[cur][2];
#ifdef PF
      if (t0 + 16 < NTOK) { const char* nx = (const char*)(x + (size_t)(t0 + 16) * K) + (k / 32) * 2048; for (int q = 0; q < 2048; q += 64) _mm_prefetch(nx + q, PF); }
#endif
      if (MODE != 2) {
        for (int r = 0; r < 16; ++r) {
          const float* xr = x + (size_t)(t0 + r) * K + k;
          __m512 x0 = _mm512_loadu_ps(xr), x1 = _mm512_loadu_ps(xr + 16);
          __m512 h0 = top(x0, keep), h1 = top(x1, keep);
          __m512 r0 = _mm512_sub_ps(x0, h0), r1 = _mm512_sub_ps(x1, h1);
          __m512 d0 = top(r0, keep), d1 = top(r1, keep);
          __m512 l0 = _mm512_sub_ps(r0, d0), l1 = _mm512_sub_ps(r1, d1);
#ifdef TERN
          _mm512_store_si512(hi + r * 32, _mm512_ternarylogic_epi32(_mm512_castps_si512(x1), keep, _mm512_srli_epi32(_mm512_castps_si512(x0), 16), 0xEA));
          _mm512_store_si512(mid + r * 32, _mm512_ternarylogic_epi32(_mm512_castps_si512(r1), keep, _mm512_srli_epi32(_mm512_castps_si512(r0), 16), 0xEA));
          _mm512_store_si512(lo + r * 32, _mm512_or_si512(_mm512_castps_si512(l1), _mm512_srli_epi32(_mm512_castps_si512(l0), 16)));
#else
          _mm512_store_si512(hi + r * 32, (__m512i)_mm512_cvtne2ps_pbh(h1, h0));
          _mm512_store_si512(mid + r * 32, (__m512i)_mm512_cvtne2ps_pbh(d1, d0));
          _mm512_store_si512(lo + r * 32, (__m512i)_mm512_cvtne2ps_pbh(l1, l0));
#endif
        }
      } else {
        // read x to keep memory traffic (touch lines)
        for (int r = 0; r < 16; ++r) { const float* xr = x + (size_t)(t0 + r) * K + k; asm volatile("" :: "r"(*(volatile const float*)xr), "r"(*(volatile const float*)(xr+16))); }
      }
      if (MODE != 1) {
        _tile_loadd(2, Wp + k * 16, 64);
        _tile_loadd(3, hi, 64); _tile_loadd(4, mid, 64); _tile_loadd(5, lo, 64);
        _tile_dpbf16ps(0, 3, 2); _tile_dpbf16ps(1, 4, 2); 
#ifdef ACC3
 _tile_dpbf16ps(6, 5, 2);
#else
_tile_dpbf16ps(1, 5, 2);
#endif

      }
    }
    if (MODE != 1) { _tile_stored(0, Y, 64); _tile_stored(1, Y + 256, 64); }
  }
}
template <int M> double tm(const float* x, float* Y) {
  double best = 1e9;
  for (int i = 0; i < 15; ++i) { auto t = std::chrono::steady_clock::now(); run<M>(x, Y); double d = std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count(); if (d < best) best = d; }
  return best * 1e3;
}
int main(int argc, char** argv) {
  if (argc > 1) NTOK = atoi(argv[1]);
  syscall(SYS_arch_prctl, 0x1023, 18);
  TileConfig cfg; memset(&cfg, 0, sizeof cfg); cfg.palette = 1;
  for (int t = 0; t < 7; ++t) { cfg.colsb[t] = 64; cfg.rows[t] = 16; }
  _tile_loadconfig(&cfg);
  std::vector<float> x((size_t)NTOK * K); std::mt19937 g(1); std::normal_distribution<float> nd;
  for (auto& v : x) v = nd(g);
  for (int i = 0; i < K * 16; ++i) Wp[i] = (g() & 1) ? 0x3e80 : 0xbe80;
  alignas(64) static float Y[512];
  printf("NTOK %d (%.1f MB)\n", NTOK, NTOK * K * 4 / 1e6);
  printf("full  %.3f ms\n", tm<0>(x.data(), Y));
  printf("conv  %.3f ms\n", tm<1>(x.data(), Y));
  printf("tiles %.3f ms\n", tm<2>(x.data(), Y));
  printf("1buf  %.3f ms\n", tm<3>(x.data(), Y));
  printf("full  %.3f ms\n", tm<0>(x.data(), Y));
}
