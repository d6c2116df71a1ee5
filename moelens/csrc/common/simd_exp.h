// e^x on 8 fp32 lanes (AVX2 + FMA) or 16 (AVX-512F), shared by the C++ extensions: moelens.native puts this folder
// on every extension's include path and into its build key.
//
// Cephes-style expf: x = n·ln2 + r, a degree-5 polynomial for e^r, 2^n through the exponent bits;
// ~2 ulp. Inputs are clamped to [-87.3, 88.3], so the result is always finite: below, ~1e-38
// (masked -inf attention scores vanish), above, ~2e38.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

namespace moelens {

// The polynomial's constants, one set for every width.
namespace exp_coef {
constexpr float kLo = -87.3f, kHi = 88.3f, kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = -0.693359375f, kLn2Lo = 2.12194440e-4f;  // -ln2 split in two
constexpr float kP[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                         4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
}  // namespace exp_coef

__attribute__((target("avx2,fma"))) inline __m256 exp_avx2(__m256 x) {
  using namespace exp_coef;
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(kLo)), _mm256_set1_ps(kHi));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  x = _mm256_fmadd_ps(n, _mm256_set1_ps(kLn2Lo), x);
  __m256 y = _mm256_set1_ps(kP[0]);
  for (int i = 1; i < 6; ++i) y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(kP[i]));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// The same polynomial on 16 lanes (one zmm instead of two ymm halves).
__attribute__((target("avx512f"))) inline __m512 exp_avx512(__m512 x) {
  using namespace exp_coef;
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(kLo)), _mm512_set1_ps(kHi));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm512_fmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  x = _mm512_fmadd_ps(n, _mm512_set1_ps(kLn2Lo), x);
  __m512 y = _mm512_set1_ps(kP[0]);
  for (int i = 1; i < 6; ++i) y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(kP[i]));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.f)));
  const __m512i e = _mm512_slli_epi32(
      _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(y, _mm512_castsi512_ps(e));
}

}  // namespace moelens
#endif
