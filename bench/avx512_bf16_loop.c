// This CPU's AVX512-BF16 ceiling: one thread running register-only VDPBF16PS (16 independent
// zmm accumulators, 64 FLOP per instruction), the rate bf16_gemm.cpp's AVX512-BF16 engine is
// measured against in the README.
//
//   gcc -O2 -mavx512f -mavx512bf16 bench/avx512_bf16_loop.c -o /tmp/avx512_bf16_loop && /tmp/avx512_bf16_loop
#include <immintrin.h>
#include <stdio.h>
#include <time.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
int main(void) {
  __m512 acc[16]; for(int i=0;i<16;i++) acc[i]=_mm512_setzero_ps();
  __m512bh a=(__m512bh)_mm512_set1_epi32(0x3f803f80), b=(__m512bh)_mm512_set1_epi32(0x3f803f80);
  long n=200000000; double t=now();
  for(long i=0;i<n;i++){
#pragma GCC unroll 16
    for(int j=0;j<16;j++) acc[j]=_mm512_dpbf16_ps(acc[j],a,b);
    __asm__ volatile("" : "+v"(a));
  }
  t=now()-t; float s=0; for(int i=0;i<16;i++) s+=_mm512_reduce_add_ps(acc[i]);
  printf("%.1f GFLOP/s one thread (%g)\n", n*16*64.0/t/1e9, s);
}
