// Microbenchmark (issue 6, session 8), not built by setup.py: g++ -O3 -mavx512f -mavx512bw -mavx512dq -mfma rademacher_tok.cpp && ./a.out
// lanes = 16 tokens (transposed tile), x_k and -x_k stored side by side, each output's sign picks the address from an
// offset table, adds alternating between FADD and FMA(x, 1) so both pipe pairs work. Result on the Zen 4 VM: FMA 113-116,
// this 58-71 GFLOP-equivalent/s per core (two loads per op), before the transpose (6-8 us per tile on its own).
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <cstdint>
constexpr int K=1000, P=16;
template<int MR> __attribute__((noinline)) void varA(const float* x, const float* W, float* Y){
  __m512 acc[MR]; for(int r=0;r<MR;++r) acc[r]=_mm512_setzero_ps();
  for(int k=0;k<K;++k){ __m512 w=_mm512_loadu_ps(W+k*16);
#pragma GCC unroll 16
    for(int r=0;r<MR;++r) acc[r]=_mm512_fmadd_ps(_mm512_set1_ps(x[r*K+k]),w,acc[r]);}
  for(int r=0;r<MR;++r) _mm512_storeu_ps(Y+r*16,acc[r]);
}
// xb: per k: [x_k (16 tokens), -x_k (16 tokens)] ; off[k*P+j] = byte offset (k*128 + neg*64)
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
// transpose+negate prep: x (16 tokens x K row-major) -> xb
__attribute__((noinline)) void prep(const float* x, float* xb){
  for(int k0=0;k0<K;k0+=16){ int nk=K-k0<16?K-k0:16; alignas(64) float t[16][16];
    for(int r=0;r<16;++r) for(int kk=0;kk<nk;++kk) t[kk][r]=x[r*K+k0+kk];
    for(int kk=0;kk<nk;++kk){ __m512 v=_mm512_load_ps(t[kk]); _mm512_storeu_ps(xb+(k0+kk)*32,v); _mm512_storeu_ps(xb+(k0+kk)*32+16,_mm512_sub_ps(_mm512_setzero_ps(),v));}
  }
}
int main(){
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
