// The AVX2 6x16 GEMM micro-kernel and its tile hand-off, shared by the panel GEMM
// (panel_gemm.cpp) and the prefill attention (prefill_attention.cpp) of the same extension.
//
// micro_kernel computes the 6 x 16 tile a[kc][6] . b[kc][16] in 12 ymm accumulators (two b
// loads and six broadcasts per k) and hands each of its rows to an epilogue functor as a Tile.
// Callers pack a as micro-panels [kc][6] and b as panels [kc][16].
#pragma once

#include <algorithm>
#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define MOELENS_PANEL_X86 1
#else
#define MOELENS_PANEL_X86 0
#endif

namespace moelens::panel {

constexpr int NR = 16;  // output columns per panel (two ymm)
constexpr int MR = 6;   // rows per micro-kernel

inline bool cpu_supported() {
#if MOELENS_PANEL_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

// Where an a operand reads its row r: row index[r] (a gather) or r, `stride` floats apart.
struct Rows {
  const float* x;
  int64_t stride;
  const int64_t* index;  // nullptr: rows in order
  const float* row(int64_t r) const { return x + (index ? index[r] : r) * stride; }
};

// One a micro-panel [kc][6]: rows [m0, m0 + rows) x columns [k0, k0 + kc) of x, rows past
// `rows` (<= 6) zero.
inline void pack_micro_panel(const Rows& x, int64_t m0, int rows, int64_t k0, int kc,
                             float* out) {
  for (int r = 0; r < MR; ++r) {
    if (r >= rows) {
      for (int k = 0; k < kc; ++k) out[k * MR + r] = 0.f;
      continue;
    }
    const float* src = x.row(m0 + r) + k0;
    for (int k = 0; k < kc; ++k) out[k * MR + r] = src[k];
  }
}

#if MOELENS_PANEL_X86
#define MOELENS_AVX2 __attribute__((target("avx2,fma")))

// The 16 accumulated columns of one row of a micro-tile, and where they sit in the GEMM.
struct Tile {
  __m256 lo, hi;   // columns 0-7 and 8-15 of panel p
  int64_t row;     // row of x (before any gather)
  int local;       // row within the current MC block
  int64_t panel;   // p
  bool first;      // the first KC block of the reduction (nothing accumulated yet)
  bool last;       // the last KC block (the sum is complete)
};

// Store `n` <= 8 floats of v at dst (the partial last panel).
MOELENS_AVX2 inline void store_n(float* dst, __m256 v, int n) {
  alignas(32) float t[8];
  _mm256_store_ps(t, v);
  for (int j = 0; j < n; ++j) dst[j] = t[j];
}

MOELENS_AVX2 inline __m256 load_n(const float* src, int n) {
  alignas(32) float t[8] = {};
  for (int j = 0; j < n; ++j) t[j] = src[j];
  return _mm256_load_ps(t);
}

// dst[0:cols] += v (cols <= 16), or = v when `add` is false.
MOELENS_AVX2 inline void put16(float* dst, __m256 lo, __m256 hi, int cols, bool add) {
  if (cols == NR) {
    if (add) {
      lo = _mm256_add_ps(lo, _mm256_loadu_ps(dst));
      hi = _mm256_add_ps(hi, _mm256_loadu_ps(dst + 8));
    }
    _mm256_storeu_ps(dst, lo);
    _mm256_storeu_ps(dst + 8, hi);
    return;
  }
  const int nlo = std::min(cols, 8), nhi = cols - nlo;
  if (add) {
    lo = _mm256_add_ps(lo, load_n(dst, nlo));
    if (nhi > 0) hi = _mm256_add_ps(hi, load_n(dst + 8, nhi));
  }
  store_n(dst, lo, nlo);
  if (nhi > 0) store_n(dst + 8, hi, nhi);
}

// Cache lines of the next W panel slice for one micro-kernel to prefetch: `lines` panel rows of
// 64 B from `at`.
struct Prefetch {
  const float* at;
  int lines;
};

// Rows [row0, row0 + rows) of the tile a[kc][6] · b[kc][16], handed to `out`; one line of `pf`
// is prefetched per k, so the next panel is in cache when the micro-kernels reach it.
template <class Out>
MOELENS_AVX2 void micro_kernel(const float* __restrict a, const float* __restrict b, int kc,
                               const Out& out, Tile where, int rows, Prefetch pf) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00,
         c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int k = 0; k < kc; ++k) {
    if (k < pf.lines) _mm_prefetch(reinterpret_cast<const char*>(pf.at + k * NR), _MM_HINT_T0);
    const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
    __m256 a0 = _mm256_broadcast_ss(a), a1 = _mm256_broadcast_ss(a + 1);
    c00 = _mm256_fmadd_ps(a0, b0, c00);
    c01 = _mm256_fmadd_ps(a0, b1, c01);
    c10 = _mm256_fmadd_ps(a1, b0, c10);
    c11 = _mm256_fmadd_ps(a1, b1, c11);
    a0 = _mm256_broadcast_ss(a + 2);
    a1 = _mm256_broadcast_ss(a + 3);
    c20 = _mm256_fmadd_ps(a0, b0, c20);
    c21 = _mm256_fmadd_ps(a0, b1, c21);
    c30 = _mm256_fmadd_ps(a1, b0, c30);
    c31 = _mm256_fmadd_ps(a1, b1, c31);
    a0 = _mm256_broadcast_ss(a + 4);
    a1 = _mm256_broadcast_ss(a + 5);
    c40 = _mm256_fmadd_ps(a0, b0, c40);
    c41 = _mm256_fmadd_ps(a0, b1, c41);
    c50 = _mm256_fmadd_ps(a1, b0, c50);
    c51 = _mm256_fmadd_ps(a1, b1, c51);
    a += MR;
    b += NR;
  }
  const __m256 acc[MR][2] = {{c00, c01}, {c10, c11}, {c20, c21},
                             {c30, c31}, {c40, c41}, {c50, c51}};
  for (int r = 0; r < rows; ++r) {
    where.lo = acc[r][0];
    where.hi = acc[r][1];
    out(where);
    ++where.row;
    ++where.local;
  }
}
#endif  // MOELENS_PANEL_X86

}  // namespace moelens::panel
