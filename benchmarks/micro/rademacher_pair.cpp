// Microbenchmark (issue 6, session 8), not built by setup.py: g++ -O3 -mavx512f -mavx512bw -mavx512dq -mfma rademacher_pair.cpp && ./a.out
// Rademacher pair trick, lanes = the p outputs: v = blend(sign(k) == sign(k+1), x_k + x_{k+1}, x_k - x_{k+1}), one FMA per pair of k
// instead of two (plus the pair sums per token). Result on the Zen 4 VM: A (today's broadcast FMA) 104-117, B / C (blend /
// masked broadcast) 73-79 GFLOP-equivalent/s per core: the blend costs as much as the FMA it saves.
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <cstring>
constexpr int MR=16; constexpr int K=1000;
__attribute__((noinline)) void varA(const float* x, const float* W, float* Y){
  __m512 acc[MR]; for(int r=0;r<MR;++r) acc[r]=_mm512_setzero_ps();
  for(int k=0;k<K;++k){ __m512 w=_mm512_loadu_ps(W+k*16);
#pragma GCC unroll 16
    for(int r=0;r<MR;++r) acc[r]=_mm512_fmadd_ps(_mm512_set1_ps(x[r*K+k]),w,acc[r]);}
  for(int r=0;r<MR;++r) _mm512_storeu_ps(Y+r*16,acc[r]);
}
// prep: per token row: ys[j]=x[2j]+x[2j+1], zs[j]=x[2j]-x[2j+1]
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
// variant C: masked broadcast move instead of blend
__attribute__((noinline)) void varC(const float* yz, const float* W2, const __mmask16* M, float* Y){
  __m512 acc[MR]; for(int r=0;r<MR;++r) acc[r]=_mm512_setzero_ps();
  for(int j=0;j<K/2;++j){ __m512 w=_mm512_loadu_ps(W2+j*16); __mmask16 m=M[j];
#pragma GCC unroll 16
    for(int r=0;r<MR;++r){ __m512 v=_mm512_set1_ps(yz[r*K+j]); v=_mm512_mask_broadcastss_ps(v,m,_mm_load_ss(yz+r*K+K/2+j));
      acc[r]=_mm512_fmadd_ps(v,w,acc[r]);}}
  for(int r=0;r<MR;++r) _mm512_storeu_ps(Y+r*16,acc[r]);
}
int main(){
  std::vector<float> x(MR*K), W(K*16), W2(K/2*16), yz(MR*K), Y(MR*16);
  std::vector<__mmask16> M(K/2);
  for(auto& v:x) v=rand()/(float)RAND_MAX-0.5f;
  for(int k=0;k<K;++k) for(int l=0;l<16;++l) W[k*16+l]=(rand()&1)?0.25f:-0.25f;
  for(int j=0;j<K/2;++j){ unsigned m=0; for(int l=0;l<16;++l){W2[j*16+l]=W[2*j*16+l]; if(W[2*j*16+l]!=W[(2*j+1)*16+l]) m|=1u<<l;} M[j]=m;}
  const int it=20000; double fl=2.0*MR*K*16*it;
  for(int rep=0;rep<3;++rep){
  auto t0=std::chrono::steady_clock::now(); for(int i=0;i<it;++i) varA(x.data(),W.data(),Y.data());
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
