// Vector types the attention kernel is written against: one struct per ISA, same interface.
//
//   W           lanes of fp32
//   R           register type
//   load<Tag>   W elements of the KV dtype `Tag`, widened to fp32 in registers
//   load_n<Tag> first n < W elements, the rest zero, never touching memory past p + n
//
// The AVX2 and AVX-512 structs are compiled under `#pragma GCC target`, so this file needs no
// -mavx flags and the scalar path stays runnable on any x86-64 (dispatch happens at run time).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MOELENS_X86_ISAS 1
#include <immintrin.h>

#include "simd_exp.h"
#else
#define MOELENS_X86_ISAS 0
#endif

namespace moelens {

struct F32 { using type = float; };
struct F16 { using type = uint16_t; };
struct BF16 { using type = uint16_t; };

inline float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// IEEE half -> float without F16C (scalar path): handles zero, subnormals, inf and NaN.
inline float half_to_float(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (man << 13));
  if (exp != 0) return bits_to_float(sign | ((exp + 112) << 23) | (man << 13));
  float mag = float(man) * 5.9604644775390625e-8f;  // man * 2^-24
  return sign ? -mag : mag;
}

inline float to_float(float x, F32) { return x; }
inline float to_float(uint16_t x, F16) { return half_to_float(x); }
inline float to_float(uint16_t x, BF16) { return bits_to_float(uint32_t(x) << 16); }

struct VecScalar {
  static constexpr int W = 1;
  using R = float;
  static R zero() { return 0.f; }
  static R set1(float x) { return x; }
  template <class Tag> static R load(const typename Tag::type* p) { return to_float(*p, Tag{}); }
  template <class Tag> static R load_n(const typename Tag::type*, int) { return 0.f; }
  static void store(float* p, R x) { *p = x; }
  static R fma(R a, R b, R c) { return a * b + c; }
  static R mul(R a, R b) { return a * b; }
  static R add(R a, R b) { return a + b; }
  static R sub(R a, R b) { return a - b; }
  static R max(R a, R b) { return a > b ? a : b; }
  static float hmax(R x) { return x; }
  static float hsum(R x) { return x; }
  static R exp(R x) { return std::exp(x); }
};

#if MOELENS_X86_ISAS

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

struct VecAvx2 {
  static constexpr int W = 8;
  using R = __m256;
  static R zero() { return _mm256_setzero_ps(); }
  static R set1(float x) { return _mm256_set1_ps(x); }
  template <class Tag> static R load(const typename Tag::type* p) {
    if constexpr (sizeof(typename Tag::type) == 4) {
      return _mm256_loadu_ps(p);
    } else {
      __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
      if constexpr (std::is_same_v<Tag, F16>) return _mm256_cvtph_ps(h);
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
  }
  template <class Tag> static R load_n(const typename Tag::type* p, int n) {
    if constexpr (sizeof(typename Tag::type) == 4) {
      __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), idx);
      return _mm256_maskload_ps(p, mask);
    } else {
      alignas(16) uint16_t tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      std::memcpy(tmp, p, sizeof(uint16_t) * n);
      return load<Tag>(tmp);
    }
  }
  static void store(float* p, R x) { _mm256_storeu_ps(p, x); }
  static R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  static R add(R a, R b) { return _mm256_add_ps(a, b); }
  static R sub(R a, R b) { return _mm256_sub_ps(a, b); }
  static R max(R a, R b) { return _mm256_max_ps(a, b); }
  static float hmax(R x) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
  }
  static float hsum(R x) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static R exp(R x) { return exp_avx2(x); }  // simd_exp.h (moelens/csrc/common)
};

#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")

struct VecAvx512 {
  static constexpr int W = 16;
  using R = __m512;
  static R zero() { return _mm512_setzero_ps(); }
  static R set1(float x) { return _mm512_set1_ps(x); }
  template <class Tag> static R load(const typename Tag::type* p) {
    if constexpr (sizeof(typename Tag::type) == 4) {
      return _mm512_loadu_ps(p);
    } else {
      return widen<Tag>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    }
  }
  template <class Tag> static R load_n(const typename Tag::type* p, int n) {
    if constexpr (sizeof(typename Tag::type) == 4) {
      return _mm512_maskz_loadu_ps(__mmask16((1u << n) - 1), p);
    } else {
      return widen<Tag>(_mm256_maskz_loadu_epi16(__mmask16((1u << n) - 1), p));
    }
  }
  template <class Tag> static R widen(__m256i h) {
    if constexpr (std::is_same_v<Tag, F16>) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static void store(float* p, R x) { _mm512_storeu_ps(p, x); }
  static R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  static R add(R a, R b) { return _mm512_add_ps(a, b); }
  static R sub(R a, R b) { return _mm512_sub_ps(a, b); }
  static R max(R a, R b) { return _mm512_max_ps(a, b); }
  static float hmax(R x) { return _mm512_reduce_max_ps(x); }
  static float hsum(R x) { return _mm512_reduce_add_ps(x); }
  static R exp(R x) { return exp_avx512(x); }  // simd_exp.h (moelens/csrc/common)
};

#pragma GCC pop_options

#endif  // MOELENS_X86_ISAS

}  // namespace moelens
