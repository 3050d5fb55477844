// Microbenchmarks behind issue 6's CPU factored-projection decision (session 8), not built by setup.py:
//   g++ -O3 -mavx512f -mavx512bw -mavx512dq -mfma benchmarks/micro/rademacher.cpp -o /tmp/rademacher && /tmp/rademacher
// Each section times today's kernel shape (varA: 16 tokens x K = 1000 features, one broadcast FMA per feature
// and token into 16 outputs, a Rademacher W of +-0.25) against one Rademacher formulation, in GFLOP-equivalents
// per second on one core (the same multiply-adds counted for both).
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

constexpr int K = 1000;

template <int MR>
__attribute__((noinline)) void varA(const float* x, const float* W, float* Y) {
  __m512 acc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = _mm512_setzero_ps();
  for (int k = 0; k < K; ++k) {
    __m512 w = _mm512_loadu_ps(W + k * 16);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * K + k]), w, acc[r]);
  }
  for (int r = 0; r < MR; ++r) _mm512_storeu_ps(Y + r * 16, acc[r]);
}

// ---- pair
// Rademacher pair trick, lanes = the p outputs: v = blend(sign(k) == sign(k+1), x_k + x_{k+1}, x_k - x_{k+1}), one FMA per pair of k
// instead of two (plus the pair sums per token). Result on the Zen 4 VM: A (today's broadcast FMA) 104-117, B / C (blend /
// masked broadcast) 73-80 GFLOP-equivalent/s per core: the blend costs as much as the FMA it saves.
namespace pair {
constexpr int MR=16;
__attribute__((noinline)) void prep(const float* x, float* yz){
  const __m512i ev=_mm512_setr_epi32(0,2,4,6,8,10,12,14,16,18,20,22,24,26,28,30);
  const __m512i od=_mm512_setr_epi32(1,3,5,7,9,11,13,15,17,19,21,23,25,27,29,31);
  for(int r=0;r<MR;++r){ const float* xr=x+r*K; float* y=yz+r*K; float* z=y+K/2;
    int j=0; for(;j+16<=K/2;j+=16){ __m512 a=_mm512_loadu_ps(xr+2*j), b=_mm512_loadu_ps(xr+2*j+16);
      __m512 e=_mm512_permutex2var_ps(a,ev,b), o=_mm512_permutex2var_ps(a,od,b);
      _mm512_storeu_ps(y+j,_mm512_add_ps(e,o)); _mm512_storeu_ps(z+j,_mm512_sub_ps(e,o));}
    for(;j<K/2;++j){y[j]=xr[2*j]+xr[2*j+1]; z[j]=xr[2*j]-xr[2*j+1];}
  }
}
__attribute__((noinline)) void varB(const float* yz, const float* W2, const __mmask16* M, float* Y){
  __m512 acc[MR]; for(int r=0;r<MR;++r) acc[r]=_mm512_setzero_ps();
  for(int j=0;j<K/2;++j){ __m512 w=_mm512_loadu_ps(W2+j*16); __mmask16 m=M[j];
#pragma GCC unroll 16
    for(int r=0;r<MR;++r){ __m512 v=_mm512_mask_blend_ps(m,_mm512_set1_ps(yz[r*K+j]),_mm512_set1_ps(yz[r*K+K/2+j]));
      acc[r]=_mm512_fmadd_ps(v,w,acc[r]);}}
  for(int r=0;r<MR;++r) _mm512_storeu_ps(Y+r*16,acc[r]);
}
__attribute__((noinline)) void varC(const float* yz, const float* W2, const __mmask16* M, float* Y){
  __m512 acc[MR]; for(int r=0;r<MR;++r) acc[r]=_mm512_setzero_ps();
  for(int j=0;j<K/2;++j){ __m512 w=_mm512_loadu_ps(W2+j*16); __mmask16 m=M[j];
#pragma GCC unroll 16
    for(int r=0;r<MR;++r){ __m512 v=_mm512_set1_ps(yz[r*K+j]); v=_mm512_mask_broadcastss_ps(v,m,_mm_load_ss(yz+r*K+K/2+j));
      acc[r]=_mm512_fmadd_ps(v,w,acc[r]);}}
  for(int r=0;r<MR;++r) _mm512_storeu_ps(Y+r*16,acc[r]);
}
void run(){
  std::vector<float> x(MR*K), W(K*16), W2(K/2*16), yz(MR*K), Y(MR*16);
  std::vector<__mmask16> M(K/2);
  for(auto& v:x) v=rand()/(float)RAND_MAX-0.5f;
  for(int k=0;k<K;++k) for(int l=0;l<16;++l) W[k*16+l]=(rand()&1)?0.25f:-0.25f;
  for(int j=0;j<K/2;++j){ unsigned m=0; for(int l=0;l<16;++l){W2[j*16+l]=W[2*j*16+l]; if(W[2*j*16+l]!=W[(2*j+1)*16+l]) m|=1u<<l;} M[j]=m;}
  const int it=20000; double fl=2.0*MR*K*16*it;
  for(int rep=0;rep<3;++rep){
  auto t0=std::chrono::steady_clock::now(); for(int i=0;i<it;++i) varA<16>(x.data(),W.data(),Y.data());
  auto t1=std::chrono::steady_clock::now(); float a0=Y[5];
  for(int i=0;i<it;++i){ prep(x.data(),yz.data()); varB(yz.data(),W2.data(),M.data(),Y.data());}
  auto t2=std::chrono::steady_clock::now(); float b0=Y[5];
  for(int i=0;i<it;++i){ prep(x.data(),yz.data()); varC(yz.data(),W2.data(),M.data(),Y.data());}
  auto t3=std::chrono::steady_clock::now();
  for(int i=0;i<it;++i){ prep(x.data(),yz.data());}
  auto t4=std::chrono::steady_clock::now();
  auto s=[](auto a,auto b){return std::chrono::duration<double>(b-a).count();};
  printf("A %.1f  B %.1f  C %.1f  prep-only %.3f ms/it-us   GFLOPeq/s  (%g %g %g)\n", fl/s(t0,t1)/1e9, fl/s(t1,t2)/1e9, fl/s(t2,t3)/1e9, s(t3,t4)/it*1e6, a0,b0,Y[5]);
  }
}
}  // namespace pair

// ---- fused
// Rademacher B-formulation v = c (2 sum_{s=+1} x - sum x) for the a side as masked adds (FADD pipes) interleaved with
// the g side's FMAs (FMA pipes), MR = 8 (+ 8) accumulators, plus the per-token row sums. Result on the Zen 4 VM: 2 x FMA16
// 113-117, fused 129-143 GFLOP-equivalent/s per core under load (1.13-1.25x), 148-155 on a quiet host (1.28-1.34x).
namespace fused {
template<int MR> __attribute__((noinline)) void fused(const float* g, const float* a, const float* W, const __mmask16* M, float* U, float* V){
  __m512 au[MR], av[MR]; for(int r=0;r<MR;++r){au[r]=_mm512_setzero_ps(); av[r]=_mm512_setzero_ps();}
  for(int k=0;k<K;++k){ __m512 w=_mm512_loadu_ps(W+k*16); __mmask16 m=M[k];
#pragma GCC unroll 16
    for(int r=0;r<MR;++r){ au[r]=_mm512_fmadd_ps(_mm512_set1_ps(g[r*K+k]),w,au[r]);
      av[r]=_mm512_mask_add_ps(av[r],m,av[r],_mm512_set1_ps(a[r*K+k]));}}
  for(int r=0;r<MR;++r){ _mm512_storeu_ps(U+r*16,au[r]); _mm512_storeu_ps(V+r*16,av[r]);}
}
template<int MR> __attribute__((noinline)) void rowsum(const float* a, float* S){
  for(int r=0;r<MR;++r){ __m512 s=_mm512_setzero_ps(); int k=0; for(;k+16<=K;k+=16) s=_mm512_add_ps(s,_mm512_loadu_ps(a+r*K+k));
    s=_mm512_add_ps(s,_mm512_maskz_loadu_ps((1u<<(K-k))-1,a+r*K+k)); S[r]=_mm512_reduce_add_ps(s);}
}
void run(){
  std::vector<float> g(16*K), a(16*K), W(K*16), U(256), V(256), S(16);
  std::vector<__mmask16> M(K);
  for(auto& v:g) v=rand()/(float)RAND_MAX-0.5f; for(auto& v:a) v=rand()/(float)RAND_MAX-0.5f;
  for(int k=0;k<K;++k){unsigned m=0; for(int l=0;l<16;++l){ bool b=rand()&1; W[k*16+l]=b?0.25f:-0.25f; if(b) m|=1u<<l;} M[k]=m;}
  const int it=20000; double fl=2.0*2*16*K*16*it;  // both sides, 16 tokens
  auto s=[](auto a,auto b){return std::chrono::duration<double>(b-a).count();};
  for(int rep=0;rep<4;++rep){
    auto t0=std::chrono::steady_clock::now();
    for(int i=0;i<it;++i){ varA<16>(g.data(),W.data(),U.data()); varA<16>(a.data(),W.data(),V.data());}
    auto t1=std::chrono::steady_clock::now();
    for(int i=0;i<it;++i){ fused<8>(g.data(),a.data(),W.data(),M.data(),U.data(),V.data()); fused<8>(g.data()+8*K,a.data()+8*K,W.data(),M.data(),U.data()+128,V.data()+128); rowsum<16>(a.data(),S.data());}
    auto t2=std::chrono::steady_clock::now();
    for(int i=0;i<it;++i){ fused<12>(g.data(),a.data(),W.data(),M.data(),U.data(),V.data()); fused<4>(g.data()+12*K,a.data()+12*K,W.data(),M.data(),U.data()+192,V.data()+192); rowsum<16>(a.data(),S.data());}
    auto t3=std::chrono::steady_clock::now();
    printf("2xFMA16 %.1f   fused8x2 %.1f  fused12+4 %.1f GFLOPeq/s  %g\n", fl/s(t0,t1)/1e9, fl/s(t1,t2)/1e9, fl/s(t2,t3)/1e9, U[3]+V[3]+S[2]);
  }
}
}  // namespace fused

// ---- tok
// lanes = 16 tokens (transposed tile), x_k and -x_k stored side by side, each output's sign picks the address from an
// offset table, adds alternating between FADD and FMA(x, 1) so both pipe pairs work. Result on the Zen 4 VM: FMA 113-116,
// this 58-80 GFLOP-equivalent/s per core (two loads per op), before the transpose (6-8 us per tile on its own).
namespace tok {
constexpr int P=16;
__attribute__((noinline)) void tok(const float* xb, const int32_t* off, float* Y){
  __m512 acc[P]; for(int j=0;j<P;++j) acc[j]=_mm512_setzero_ps();
  const char* base=reinterpret_cast<const char*>(xb);
  const __m512 one=_mm512_set1_ps(1.0f);
  for(int k=0;k<K;++k){ const int32_t* o=off+k*P;
#pragma GCC unroll 16
    for(int j=0;j<P;++j){ __m512 v=_mm512_loadu_ps(reinterpret_cast<const float*>(base+o[j]));
      if(j&1) acc[j]=_mm512_add_ps(acc[j],v); else acc[j]=_mm512_fmadd_ps(v,one,acc[j]);}}
  for(int j=0;j<P;++j) _mm512_storeu_ps(Y+j*16,acc[j]);
}
__attribute__((noinline)) void prep(const float* x, float* xb){
  for(int k0=0;k0<K;k0+=16){ int nk=K-k0<16?K-k0:16; alignas(64) float t[16][16];
    for(int r=0;r<16;++r) for(int kk=0;kk<nk;++kk) t[kk][r]=x[r*K+k0+kk];
    for(int kk=0;kk<nk;++kk){ __m512 v=_mm512_load_ps(t[kk]); _mm512_storeu_ps(xb+(k0+kk)*32,v); _mm512_storeu_ps(xb+(k0+kk)*32+16,_mm512_sub_ps(_mm512_setzero_ps(),v));}
  }
}
void run(){
  std::vector<float> x(16*K), W(K*16), Y(256), xb(K*32);
  std::vector<int32_t> off(K*P);
  for(auto& v:x) v=rand()/(float)RAND_MAX-0.5f;
  for(int k=0;k<K;++k) for(int l=0;l<16;++l){ bool b=rand()&1; W[k*16+l]=b?0.25f:-0.25f; off[k*P+l]=k*128+(b?0:64);}
  const int it=20000; double fl=2.0*16*K*16*it;
  auto s=[](auto a,auto b){return std::chrono::duration<double>(b-a).count();};
  for(int rep=0;rep<4;++rep){
    auto t0=std::chrono::steady_clock::now();
    for(int i=0;i<it;++i) varA<16>(x.data(),W.data(),Y.data());
    auto t1=std::chrono::steady_clock::now(); float a=Y[17];
    for(int i=0;i<it;++i) tok(xb.data(),off.data(),Y.data());
    auto t2=std::chrono::steady_clock::now();
    for(int i=0;i<it;++i) prep(x.data(),xb.data());
    auto t3=std::chrono::steady_clock::now();
    printf("FMA %.1f  tok-add %.1f  prep %.2f us/tile (FMA tile %.2f us)  %g %g\n", fl/s(t0,t1)/1e9, fl/s(t1,t2)/1e9, s(t2,t3)/it*1e6, s(t0,t1)/it*1e6, a, Y[17]);
  }
}
}  // namespace tok

// ---- aliasing
// Rows of a power-of-two width sit a multiple of 4 KiB apart, so the lines that a pass over MR rows reads at one
// feature all map to one set of the 8-way L1. Today's kernel shape (broadcast FMA, 16 outputs) with row
// pointers at stride ld floats, MR = 16 vs two passes of MR = 8, in cache. Result on the Zen 4 VM (session 9):
// ld = 1000 / 768: MR = 16 88-90 (this plain loop spills its 16 row pointers; the library's unrolled kernel
// reaches 100-115), 2 x MR = 8 114-115; ld = 1024 / 2048: MR = 16 48-52, 2 x MR = 8 110-113. The fused B-formulation above
// behaves alike (8 + 8 rows: 45-48 when a's and g's rows share the set, 4 + 4 rows: 126-139). Built into the
// library with 4 + 4 rows, the fused kernel was no faster end to end (0.84-1.08x of two MR = 8 FMA passes):
// there the a / g rows stream from L3 / DRAM (each pass's software prefetch of the next tile is the limit, not
// the FMA pipes), so only MR = 8 was kept.
namespace aliasing {
template <int MR>
__attribute__((noinline)) void pass(const float* const* X, int64_t K, const float* W, float* Y) {
  __m512 acc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m512 w = _mm512_loadu_ps(W + k * 16);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(X[r][k]), w, acc[r]);
  }
  for (int r = 0; r < MR; ++r) _mm512_storeu_ps(Y + r * 16, acc[r]);
}
void run() {
  for (int ld : {1000, 768, 1024, 2048}) {
    std::vector<float> x(16 * ld + 16), W(K * 16), Y(256);
    for (auto& v : x) v = rand() / (float)RAND_MAX;
    for (auto& v : W) v = 0.25f;
    float* base = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(x.data()) + 63) & ~uintptr_t(63));
    const float* rows[16];
    for (int r = 0; r < 16; ++r) rows[r] = base + r * ld;
    const int it = 20000;
    const double fl = 2.0 * 16 * K * 16 * it;
    auto s = [](auto a, auto b) { return std::chrono::duration<double>(b - a).count(); };
    double b16 = 0, b8 = 0;
    for (int rep = 0; rep < 5; ++rep) {
      auto t0 = std::chrono::steady_clock::now();
      for (int i = 0; i < it; ++i) pass<16>(rows, K, W.data(), Y.data());
      auto t1 = std::chrono::steady_clock::now();
      for (int i = 0; i < it; ++i) { pass<8>(rows, K, W.data(), Y.data()); pass<8>(rows + 8, K, W.data(), Y.data() + 128); }
      auto t2 = std::chrono::steady_clock::now();
      b16 = std::max(b16, fl / s(t0, t1) / 1e9);
      b8 = std::max(b8, fl / s(t1, t2) / 1e9);
    }
    printf("ld %4d: MR=16 %.1f  2 x MR=8 %.1f GFLOP/s (best of 5)  %g\n", ld, b16, b8, Y[3]);
  }
}
}  // namespace aliasing

int main() {
  std::printf("pair:\n");
  pair::run();
  std::printf("fused:\n");
  fused::run();
  std::printf("tok:\n");
  tok::run();
  std::printf("aliasing:\n");
  aliasing::run();
}
