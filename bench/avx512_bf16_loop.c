// This CPU's AVX512-BF16 ceiling: one thread running register-only VDPBF16PS (16 independent
// zmm accumulators, 64 FLOP per instruction), the rate bf16_gemm.cpp's AVX512-BF16 engine is
// measured against in the README.
//
//   gcc -O2 -mavx512f -mavx512bf16 bench/avx512_bf16_loop.c -o /tmp/avx512_bf16_loop && /tmp/avx512_bf16_loop
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

enum { ACCUMULATORS = 16 };

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(void) {
  __m512 acc[ACCUMULATORS];
  for (int i = 0; i < ACCUMULATORS; i++) acc[i] = _mm512_setzero_ps();
  __m512bh a = (__m512bh)_mm512_set1_epi32(0x3f803f80);  // pairs of bf16 1.0
  const __m512bh b = a;
  const long steps = 200000000;
  double t = now();
  for (long s = 0; s < steps; s++) {
#pragma GCC unroll 16
    for (int i = 0; i < ACCUMULATORS; i++) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
    __asm__ volatile("" : "+v"(a));  // keeps the loop from being folded
  }
  t = now() - t;
  float sum = 0;  // uses every accumulator
  for (int i = 0; i < ACCUMULATORS; i++) sum += _mm512_reduce_add_ps(acc[i]);
  printf("VDPBF16PS ceiling: %.1f GFLOP/s on one thread (checksum %g)\n",
         steps * ACCUMULATORS * 64.0 / t / 1e9, sum);
  return 0;
}
