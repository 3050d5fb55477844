// Microbenchmark (issue 6, session 8), not built by setup.py: g++ -O3 -mavx512f -mavx512bw -mavx512dq -mfma rademacher_fused.cpp && ./a.out
// Rademacher B-formulation v = c (2 sum_{s=+1} x - sum x) for the a side as masked adds (FADD pipes) interleaved with
// the g side's FMAs (FMA pipes), MR = 8 (+ 8) accumulators, plus the per-token row sums. Result on the Zen 4 VM: 2 x FMA16
// 113-115, fused 129-143 GFLOP-equivalent/s per core (1.13-1.25x): ~10% end to end once the DRAM stream is counted.
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>
constexpr int K=1000;
template<int MR> __attribute__((noinline)) void varA(const float* x, const float* W, float* Y){
  __m512 acc[MR]; for(int r=0;r<MR;++r) acc[r]=_mm512_setzero_ps();
  for(int k=0;k<K;++k){ __m512 w=_mm512_loadu_ps(W+k*16);
#pragma GCC unroll 16
    for(int r=0;r<MR;++r) acc[r]=_mm512_fmadd_ps(_mm512_set1_ps(x[r*K+k]),w,acc[r]);}
  for(int r=0;r<MR;++r) _mm512_storeu_ps(Y+r*16,acc[r]);
}
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
int main(){
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
