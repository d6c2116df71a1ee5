// RMSNorm of each row in one pass over the row and one over the output, with HF's roundings:
// y = weight * to(x.dtype)(x32 * rsqrt(sum(x32^2) / N + eps)), the last product in fp32 and
// rounded to x's dtype (for bf16: bf16(w * bf16(x * r)), as torch's bf16 multiply rounds).
//
// Why: torch runs it as eight element-wise ops with fp32 temporaries; for a bench-mixtral layer's
// [2048, 1024] bf16 input that took 1.6 ms on the 2-core dev machine against 0.43 fused
// (bench/rms_norm.py; ~6 ms while glibc still returned the temporaries to the kernel, see
// moelens/malloc_tuning.py), twice a layer. Only the
// sum of squares is ordered differently from torch's (a few fp32 ulps of r).
#include "rms_norm.h"

#include <omp.h>

#include <cmath>
#include <cstring>

#include "micro_kernel.h"  // MOELENS_PANEL_X86, MOELENS_AVX2, cpu_supported

namespace moelens {
namespace {

using bf16 = uint16_t;

float bf16_to_float(bf16 v) {
  const uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

bf16 float_to_bf16(float f) {  // round to nearest even, NaN kept (c10::BFloat16's rounding)
  if (std::isnan(f)) return 0x7FC0;
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  return bf16((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

// Element access per dtype: load as fp32, store from fp32 with the dtype's rounding.
struct F32 {
  using T = float;
  static float load(const float* p) { return *p; }
  static void store(float* p, float v) { *p = v; }
};
struct BF16 {
  using T = bf16;
  static float load(const bf16* p) { return bf16_to_float(*p); }
  static void store(bf16* p, float v) { *p = float_to_bf16(v); }
};

// y[j] = w[j] * round(x[j] * r) for j in [from, n): the output pass, one element at a time.
template <class D>
void scale_scalar(const typename D::T* x, const typename D::T* w, typename D::T* y,
                  int64_t from, int64_t n, float r) {
  for (int64_t j = from; j < n; ++j) {
    typename D::T normed;
    D::store(&normed, D::load(x + j) * r);
    D::store(y + j, D::load(w + j) * D::load(&normed));
  }
}

template <class D>
void row_scalar(const typename D::T* x, const typename D::T* w, typename D::T* y, int64_t n,
                float eps) {
  float sum = 0.f;
  for (int64_t j = 0; j < n; ++j) sum += D::load(x + j) * D::load(x + j);
  scale_scalar<D>(x, w, y, 0, n, 1.f / std::sqrt(sum / float(n) + eps));
}

#if MOELENS_PANEL_X86
MOELENS_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
MOELENS_AVX2 inline __m256 load8(const bf16* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
MOELENS_AVX2 inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
MOELENS_AVX2 inline __m256 round8(float*, __m256 v) { return v; }  // fp32: nothing to round
// to bf16 and back (the value a bf16 tensor would hold), round to nearest even, NaN kept
MOELENS_AVX2 inline __m256i bf16_bits8(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(_mm256_srli_epi32(rounded, 16), _mm256_set1_epi32(0x7FC0), nan);
}
MOELENS_AVX2 inline __m256 round8(bf16*, __m256 v) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits8(v), 16));
}
MOELENS_AVX2 inline void store8(bf16* p, __m256 v) {
  const __m256i b = bf16_bits8(v);  // 8 x u32 holding u16s
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}

template <class D>
MOELENS_AVX2 void row_avx2(const typename D::T* x, const typename D::T* w, typename D::T* y,
                           int64_t n, float eps) {
  using T = typename D::T;
  const int64_t body = n / 8 * 8;
  __m256 s0 = _mm256_setzero_ps(), s1 = s0;
  int64_t j = 0;
  for (; j + 16 <= body; j += 16) {
    const __m256 a = load8(x + j), b = load8(x + j + 8);
    s0 = _mm256_fmadd_ps(a, a, s0);
    s1 = _mm256_fmadd_ps(b, b, s1);
  }
  for (; j < body; j += 8) {
    const __m256 a = load8(x + j);
    s0 = _mm256_fmadd_ps(a, a, s0);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_add_ps(s0, s1));
  float sum = 0.f;
  for (const float v : lanes) sum += v;
  for (; j < n; ++j) sum += D::load(x + j) * D::load(x + j);
  const float r = 1.f / std::sqrt(sum / float(n) + eps);
  const __m256 vr = _mm256_set1_ps(r);
  T* tag = nullptr;  // picks round8's overload
  for (j = 0; j < body; j += 8) {
    const __m256 normed = round8(tag, _mm256_mul_ps(load8(x + j), vr));
    store8(y + j, _mm256_mul_ps(load8(w + j), normed));
  }
  scale_scalar<D>(x, w, y, body, n, r);
}
#endif

template <class D>
void run_rows(const torch::Tensor& x, const torch::Tensor& w, torch::Tensor& y, float eps,
              int64_t num_threads) {
  using T = typename D::T;
  const int64_t n = x.size(-1), rows = n ? x.numel() / n : 0;
  const T* xd = reinterpret_cast<const T*>(x.data_ptr());
  const T* wd = reinterpret_cast<const T*>(w.data_ptr());
  T* yd = reinterpret_cast<T*>(y.data_ptr());
  static const bool avx2 = panel::cpu_supported();
  pybind11::gil_scoped_release no_gil;
#pragma omp parallel for num_threads(int(num_threads)) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
#if MOELENS_PANEL_X86
    if (avx2) {
      row_avx2<D>(xd + r * n, wd, yd + r * n, n, eps);
      continue;
    }
#endif
    row_scalar<D>(xd + r * n, wd, yd + r * n, n, eps);
  }
}

}  // namespace

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps,
                       int64_t num_threads) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK_VALUE((dtype == torch::kFloat32 || dtype == torch::kBFloat16) &&
                        weight.scalar_type() == dtype && x.device().is_cpu() &&
                        weight.device().is_cpu(),
                    "rms_norm: x and weight must be float32 or bfloat16 CPU tensors of one dtype, "
                    "got ", x.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK_VALUE(x.dim() >= 1 && weight.dim() == 1 && weight.size(0) == x.size(-1),
                    "rms_norm: weight must be [N] for x [..., N], got ", weight.sizes(), " and ",
                    x.sizes());
  TORCH_CHECK_VALUE(num_threads >= 1, "rms_norm: num_threads must be >= 1");
  const auto xc = x.contiguous(), wc = weight.contiguous();
  auto y = torch::empty_like(xc);
  if (dtype == torch::kFloat32) run_rows<F32>(xc, wc, y, float(eps), num_threads);
  else run_rows<BF16>(xc, wc, y, float(eps), num_threads);
  return y;
}

}  // namespace moelens
