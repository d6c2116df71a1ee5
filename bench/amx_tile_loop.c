// This CPU's AMX bf16 ceiling and the rate of bf16_gemm.cpp's bare 2 x 2-tile AMX loop (no copy, no
// epilogue) as the operands move from L1 to L2:
//
//     gcc -O2 -fopenmp -mamx-tile -mamx-bf16 bench/amx_tile_loop.c -o /tmp/amx_tile_loop
//     /tmp/amx_tile_loop
//
// "ceiling": TDPBF16PS on register tiles only. "loop": block_32x32's body over `rows` rows of a
// tile-ordered A and one pair of VNNI panels of depth K (C stored per 32-row block), best of 200;
// with two threads each thread has its own data.
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

typedef struct { uint8_t palette, start; uint8_t reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; } cfg_t;

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static void tiles_on(void) {  // every tile 16 rows x 64 bytes
  static __thread cfg_t c;
  memset(&c, 0, sizeof c);
  c.palette = 1;
  for (int i = 0; i < 8; i++) c.colsb[i] = 64, c.rows[i] = 16;
  __asm__ volatile("" ::: "memory");  // GCC would drop the stores above (see amx_gemm.cpp)
  _tile_loadconfig(&c);
}

static double ceiling(int threads) {
  const long iters = 20000000;
  const double t0 = now();
#pragma omp parallel num_threads(threads)
  {
    tiles_on();
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    _tile_zero(4); _tile_zero(5); _tile_zero(6); _tile_zero(7);
    for (long i = 0; i < iters / 4; i++) {
      _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
    }
    _tile_release();
  }
  return 2.0 * 16 * 16 * 32 * iters * threads / (now() - t0) / 1e9;
}

static double loop(int rows, int K) {  // GFLOP/s of the calling thread
  static __thread float c[1024] __attribute__((aligned(64)));
  uint16_t *a = aligned_alloc(64, (size_t)rows * K * 2), *b = aligned_alloc(64, (size_t)2 * K * 16 * 2);
  memset(a, 0x3f, (size_t)rows * K * 2);
  memset(b, 0x3f, (size_t)2 * K * 16 * 2);
  double best = 1e9;
  for (int rep = 0; rep < 200; rep++) {
    const double t0 = now();
    for (int r = 0; r < rows; r += 32) {
      const uint16_t *ar = a + (size_t)r * K, *b0 = b, *b1 = b + K * 16;
      _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
      for (int k = 0; k < K; k += 32) {
        _tile_loadd(4, ar + k * 16, 64);
        _tile_loadd(5, ar + 16 * K + k * 16, 64);
        _tile_loadd(6, b0 + k * 16, 64);
        _tile_loadd(7, b1 + k * 16, 64);
        _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
      }
      _tile_stored(0, c, 64); _tile_stored(1, c + 256, 64);
      _tile_stored(2, c + 512, 64); _tile_stored(3, c + 768, 64);
    }
    const double dt = now() - t0;
    if (dt < best) best = dt;
  }
  free(a);
  free(b);
  return 2.0 * rows * 32 * K / best / 1e9;
}

int main(void) {
  if (syscall(SYS_arch_prctl, 0x1023, 18) != 0) {  // ARCH_REQ_XCOMP_PERM, XTILEDATA
    fprintf(stderr, "no AMX permission\n");
    return 1;
  }
  for (int threads = 1; threads <= 2; threads++)
    printf("ceiling, %d thread(s): %.0f GFLOP/s\n", threads, ceiling(threads));
  const int depths[] = {64, 256, 1024, 2048};
  for (int threads = 1; threads <= 2; threads++)
    for (int i = 0; i < 4; i++) {
      double total = 0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
      {
        syscall(SYS_arch_prctl, 0x1023, 18);
        tiles_on();
        total += loop(256, depths[i]);
        _tile_release();
      }
      printf("loop, %d thread(s), 256 rows, K %4d (B pair %3d KiB): %.0f GFLOP/s\n", threads,
             depths[i], depths[i] * 64 / 1024, total);
    }
  return 0;
}
