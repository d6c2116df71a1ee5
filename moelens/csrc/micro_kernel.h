// The GEMM micro-kernels and their tile hand-off, shared by the panel GEMM (panel_gemm.cpp) and
// the prefill attention (prefill_attention.cpp) of the same extension.
//
// micro_kernel (AVX2) computes the 6 x 16 tile a[kc][6] . b[kc][16] in 12 ymm accumulators (two
// b loads and six broadcasts per k) and hands each of its rows to an epilogue functor as a Tile.
// Callers pack a as micro-panels [kc][6] and b as panels [kc][16]. micro_kernel_zmm (AVX-512)
// computes up to 12 x 32: two adjacent panels at once, one zmm per panel row, 24 accumulators.
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

constexpr int MR_ZMM = 12;  // rows per AVX-512 micro-kernel (a micro-panels [kc][12])

inline bool cpu_supported() {
#if MOELENS_PANEL_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

inline bool cpu_supports_avx512() {
#if MOELENS_PANEL_X86
  __builtin_cpu_init();
  return cpu_supported() && __builtin_cpu_supports("avx512f");
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

// One a micro-panel [kc][width]: rows [m0, m0 + rows) x columns [k0, k0 + kc) of x, rows
// past `rows` (<= width: MR or MR_ZMM) zero.
inline void pack_micro_panel(const Rows& x, int64_t m0, int rows, int64_t k0, int kc,
                             float* out, int width = MR) {
  for (int r = 0; r < width; ++r) {
    if (r >= rows) {
      for (int k = 0; k < kc; ++k) out[k * width + r] = 0.f;
      continue;
    }
    const float* src = x.row(m0 + r) + k0;
    for (int k = 0; k < kc; ++k) out[k * width + r] = src[k];
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

#define MOELENS_AVX512 __attribute__((target("avx512f,avx2,fma")))

// Where a two-panel micro-kernel prefetches: `lines` rows of 64 B of each of two panels.
struct Prefetch2 {
  const float* at;
  int64_t second;  // floats from the first panel's line to the second's
  int lines;
};

// The tile a[kc][12] · [b0 | b1] for ROWS (4, 8 or 12: the padded rows of a) rows and NP (1 or
// 2) panels b0 = b, b1 = b + b_stride, each [kc][16]: one zmm per (row, panel), so 24
// accumulators, two panel loads and twelve broadcasts per k at full size. Why two panels: with
// one, each k costs a broadcast per FMA, and the broadcasts, not the FMAs, set the pace.
// A reduction split over KC blocks carries its partial sums in `sums` [12][2][16] (read unless
// where.first, written unless where.last), so the epilogue runs once, on the whole sum: the
// first `rows` rows go to `out` as Tiles, panel by panel (the AVX2 epilogues take the two
// halves). The accumulators are named variables: GCC keeps an array of them on the stack.
#define MOELENS_ZMM_ROW(r)                                                  \
  if (ROWS > r) {                                                           \
    const __m512 ar = _mm512_set1_ps(a[r]);                                 \
    c##r##0 = _mm512_fmadd_ps(ar, w0, c##r##0);                             \
    if (NP == 2) c##r##1 = _mm512_fmadd_ps(ar, w1, c##r##1);                \
  }
#define MOELENS_ZMM_ROWS(f) f(0) f(1) f(2) f(3) f(4) f(5) f(6) f(7) f(8) f(9) f(10) f(11)
#define MOELENS_ZMM_LOAD(r)                                                 \
  if (ROWS > r && !where.first) {                                           \
    c##r##0 = _mm512_loadu_ps(sums + (2 * r) * NR);                         \
    if (NP == 2) c##r##1 = _mm512_loadu_ps(sums + (2 * r + 1) * NR);        \
  }
#define MOELENS_ZMM_STORE(r)                                                \
  if (ROWS > r) {                                                           \
    _mm512_storeu_ps(sums + (2 * r) * NR, c##r##0);                         \
    if (NP == 2) _mm512_storeu_ps(sums + (2 * r + 1) * NR, c##r##1);        \
  }
template <int ROWS, int NP, class Out>
MOELENS_AVX512 void micro_kernel_zmm(const float* __restrict a, const float* __restrict b,
                                     int64_t b_stride, int kc, const Out& out, Tile where,
                                     int rows, Prefetch2 pf, float* __restrict sums) {
  const __m512 z = _mm512_setzero_ps();
  __m512 c00 = z, c01 = z, c10 = z, c11 = z, c20 = z, c21 = z, c30 = z, c31 = z, c40 = z,
         c41 = z, c50 = z, c51 = z, c60 = z, c61 = z, c70 = z, c71 = z, c80 = z, c81 = z,
         c90 = z, c91 = z, c100 = z, c101 = z, c110 = z, c111 = z;
  MOELENS_ZMM_ROWS(MOELENS_ZMM_LOAD)
  const float* b1 = b + b_stride;
#pragma GCC unroll 4
  for (int k = 0; k < kc; ++k) {
    if (k < pf.lines) {  // to L2: the L1 holds this slice (reused by every micro-panel)
      _mm_prefetch(reinterpret_cast<const char*>(pf.at + k * NR), _MM_HINT_T1);
      if (NP == 2)
        _mm_prefetch(reinterpret_cast<const char*>(pf.at + pf.second + k * NR), _MM_HINT_T1);
    }
    const __m512 w0 = _mm512_loadu_ps(b), w1 = NP == 2 ? _mm512_loadu_ps(b1) : z;
    MOELENS_ZMM_ROWS(MOELENS_ZMM_ROW)
    a += MR_ZMM;
    b += NR;
    b1 += NR;
  }
  if (!where.last) {
    MOELENS_ZMM_ROWS(MOELENS_ZMM_STORE)
    return;
  }
  const __m512 acc[MR_ZMM][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31},
                                 {c40, c41}, {c50, c51}, {c60, c61}, {c70, c71},
                                 {c80, c81}, {c90, c91}, {c100, c101}, {c110, c111}};
  const int64_t panel = where.panel;
  where.first = true;  // the epilogue sees the whole sum
  for (int r = 0; r < rows; ++r) {
    for (int j = 0; j < NP; ++j) {
      where.panel = panel + j;
      where.lo = _mm512_castps512_ps256(acc[r][j]);
      where.hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[r][j]), 1));
      out(where);
    }
    ++where.row;
    ++where.local;
  }
}
#undef MOELENS_ZMM_ROW
#undef MOELENS_ZMM_ROWS
#undef MOELENS_ZMM_LOAD
#undef MOELENS_ZMM_STORE
#endif  // MOELENS_PANEL_X86

}  // namespace moelens::panel
