// fp32 GEMM y[M, N] = x[M, K] · W[N, K]^T for the CPU device, with W packed once (at weight load)
// into panels of 16 output columns: wp[P, K, 16], P = ceil(N / 16), columns past N zero.
//
// Why: a decode step gives each expert only tens of rows. MKL repacks W on every call, which at
// M = 64 costs about as much as the multiply itself; with W already in panel order the only
// per-call packing is x's, M·K floats. Two micro-kernels (micro_kernel.h), chosen at run time:
//
// - AVX2, 6 x 16 (12 ymm accumulators, two panel loads and six broadcasts per k), shared with
//   the prefill attention (prefill_attention.cpp). x is packed per (MC rows, KC columns) block
//   into 6-row micro-panels [KC][6] that sit in L1 while one W panel slice streams through from
//   L2 (KC = 1024: each slice is read once per MC rows of x; 256 and 512 were slower on Zen 3).
//   The micro-kernels of one slice prefetch the next one (9-13% at 16-64 tokens). Threads split
//   the W panels; x is packed cooperatively. A bench-mixtral MoE layer ran 4.0x / 2.1x / 1.25x
//   faster than with MKL at 4 / 64 / 1024 rows per expert on Zen 3.
// - AVX-512, 12 x 32 (two adjacent panels, 24 zmm accumulators), run_zmm below: x packed over
//   the whole depth per L2-sized block of rows, each 128-deep W slice of a pair of panels
//   L1-resident for every micro-panel of the block, partial sums carried between slices, so
//   each output is written once. 1.2x / 1.45x / 1.02x MKL at 4 / 64 / 1024 rows per expert on a
//   Sapphire Rapids Xeon.
//
// The MoE expert MLP runs fused (`grouped_swiglu`): the rows of each expert are gathered from the
// token activations while x is packed, the gate/up GEMM's epilogue writes silu(gate) * up (its
// weight is packed "gated": each panel holds 8 gate columns and the same 8 up columns, so one
// micro-tile has both), and the down GEMM's epilogue scales each row by its routing weight and
// adds it into its token's output row. No [rows, 2I] activation, gathered copy of x or
// [rows, H] expert output is ever written. The epilogues are written once, for the AVX2 tiles;
// the AVX-512 kernel hands them each row's 16 columns as two halves.
#include <torch/extension.h>

#include <omp.h>

#include <algorithm>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "bf16_gemm.h"
#include "micro_kernel.h"
#include "openmp_team.h"
#include "prefill_attention.h"
#include "rms_norm.h"
#include "row_stats.h"
#if MOELENS_PANEL_X86
#include "simd_exp.h"
#endif

namespace {

using namespace moelens::panel;

constexpr int KC = 1024;  // reduction depth per block
constexpr int MC = 144;   // rows of x per block (24 micro-panels)

constexpr int KC_ZMM = 128;  // the AVX-512 kernel's slice depth: [128][32] W is 16 KiB (L1)
constexpr int MC_ZMM = 576;  // at most this many rows of x per block
constexpr int64_t XPACK_BYTES_ZMM = 1 << 20;  // a packed x block [rows][K] within L2
constexpr int ZMM_MIN_ROWS_PER_THREAD = 96;  // from here on threads split the rows, not panels

// Rows of x per AVX-512 block: a multiple of 12 whose [rows][K] block fits XPACK_BYTES_ZMM.
int zmm_block_rows(int64_t K) {
  const int64_t rows = XPACK_BYTES_ZMM / (4 * std::max<int64_t>(K, 1)) / MR_ZMM * MR_ZMM;
  return int(std::clamp<int64_t>(rows, MR_ZMM, MC_ZMM));
}

// How run_zmm blocks the rows of an [M, K] operand over `threads`: with rows enough for a
// block per thread the threads split the rows (equal blocks, a whole number per thread, each
// thread packing its own), otherwise the panels (one packed block at a time, shared).
struct ZmmPlan {
  bool by_rows;
  int64_t num_blocks;
  int block;              // rows per block, a multiple of MR_ZMM (<= zmm_block_rows(K))
  int64_t pack_floats;    // packed x for a block per thread, or one shared, at any M' <= M
};

ZmmPlan zmm_plan(int64_t M, int64_t K, int threads) {
  const int mcb = zmm_block_rows(K);
  const bool by_rows = M >= int64_t(threads) * ZMM_MIN_ROWS_PER_THREAD;
  const int64_t per_thread = (M + int64_t(threads) * mcb - 1) / (int64_t(threads) * mcb);
  const int64_t num_blocks = std::max<int64_t>(1, by_rows ? per_thread * threads
                                                         : (M + mcb - 1) / mcb);
  const int block = int((M + num_blocks - 1) / num_blocks + MR_ZMM - 1) / MR_ZMM * MR_ZMM;
  // The block does not grow with M, so a bound over every M' <= M (one buffer serves all the
  // experts of a layer, sized for the widest): the rows rounded up, at most a full block.
  const int64_t widest = std::min<int64_t>((M + MR_ZMM - 1) / MR_ZMM * MR_ZMM, mcb);
  return {by_rows, num_blocks, block, (by_rows ? threads : 1) * widest * K};
}

// The micro-kernel the GEMMs run: the widest this CPU has, unless pinned (tests, A/B).
enum class Isa : int { kAvx2 = 1, kAvx512 = 2 };

Isa best_isa() { return cpu_supports_avx512() ? Isa::kAvx512 : Isa::kAvx2; }

Isa& isa_in_use() {
  static Isa isa = best_isa();
  return isa;
}

// Rows [m0, m0 + mc) x columns [k0, k0 + kc) of x as micro-panels [ceil(mc / width)][kc][width],
// rows past mc zero. Micro-panels are shared out over the calling team.
void pack_x(const Rows& x, int64_t m0, int mc, int64_t k0, int kc, float* out, int width) {
  const int panels = (mc + width - 1) / width;
#pragma omp for schedule(static)
  for (int mp = 0; mp < panels; ++mp)
    pack_micro_panel(x, m0 + mp * width, std::min(width, mc - mp * width), k0, kc,
                     out + int64_t(mp) * kc * width, width);
}

#if MOELENS_PANEL_X86
// silu(g) = g / (1 + e^-g), as torch computes it.
MOELENS_AVX2 inline __m256 silu(__m256 g) {
  const __m256 e = moelens::exp_avx2(_mm256_sub_ps(_mm256_setzero_ps(), g));
  return _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.f), e));
}

// y[row, panel columns] = the tile (+ what earlier KC blocks left there).
struct StoreOut {
  float* y;
  int64_t n;  // N = the row stride of y
  MOELENS_AVX2 void operator()(const Tile& t) const {
    put16(y + t.row * n + t.panel * NR, t.lo, t.hi, int(std::min<int64_t>(NR, n - t.panel * NR)),
          !t.first);
  }
};

// h[row, 8p : 8p + 8] = silu(gate) * up for a gated weight (lo: gate, hi: up). A reduction over
// several KC blocks parks its partial sums in `partial` [MC][P * 16] until the last block.
struct SwiGluOut {
  float* h;
  int64_t inter;     // I = the row stride of h
  float* partial;    // nullptr when K fits one KC block
  int64_t partial_n; // P * 16
  MOELENS_AVX2 void operator()(const Tile& t) const {
    __m256 gate = t.lo, up = t.hi;
    float* part = partial ? partial + t.local * partial_n + t.panel * NR : nullptr;
    if (!t.first) {
      gate = _mm256_add_ps(gate, _mm256_loadu_ps(part));
      up = _mm256_add_ps(up, _mm256_loadu_ps(part + 8));
    }
    if (!t.last) {
      _mm256_storeu_ps(part, gate);
      _mm256_storeu_ps(part + 8, up);
      return;
    }
    const __m256 v = _mm256_mul_ps(silu(gate), up);
    const int cols = int(std::min<int64_t>(8, inter - t.panel * 8));
    float* dst = h + t.row * inter + t.panel * 8;
    if (cols == 8) _mm256_storeu_ps(dst, v); else store_n(dst, v, cols);
  }
};

// out[dest[row], panel columns] += scale[row] * tile: the down projection's rows weighted by
// their routing weight and summed into their token's row (linear, so per KC block is exact).
struct ScatterAddOut {
  float* out;
  int64_t n;  // N = the row stride of out
  const int64_t* dest;
  const float* scale;
  MOELENS_AVX2 void operator()(const Tile& t) const {
    const __m256 s = _mm256_set1_ps(scale[t.row]);
    put16(out + dest[t.row] * n + t.panel * NR, _mm256_mul_ps(t.lo, s), _mm256_mul_ps(t.hi, s),
          int(std::min<int64_t>(NR, n - t.panel * NR)), true);
  }
};

#endif

#if MOELENS_PANEL_X86
// One AVX-512 micro-tile of `rows` rows and np panels, on the kernel padded to 4, 8 or 12 rows.
template <class Out>
MOELENS_AVX512 void zmm_tile(const float* a, const float* b, int64_t b_stride, int kc,
                             const Out& out, const Tile& where, int rows, int np,
                             const Prefetch2& pf, float* sums) {
  switch ((rows + 3) / 4 * 2 + np - 1) {
    case 2: micro_kernel_zmm<4, 1>(a, b, b_stride, kc, out, where, rows, pf, sums); break;
    case 3: micro_kernel_zmm<4, 2>(a, b, b_stride, kc, out, where, rows, pf, sums); break;
    case 4: micro_kernel_zmm<8, 1>(a, b, b_stride, kc, out, where, rows, pf, sums); break;
    case 5: micro_kernel_zmm<8, 2>(a, b, b_stride, kc, out, where, rows, pf, sums); break;
    case 6: micro_kernel_zmm<12, 1>(a, b, b_stride, kc, out, where, rows, pf, sums); break;
    default: micro_kernel_zmm<12, 2>(a, b, b_stride, kc, out, where, rows, pf, sums); break;
  }
}

// A W slice [kc][16] of one or two panels, and the lines of it still to prefetch.
struct Slice {
  const float* at;  // nullptr: none
  int np;
  int kc;
};

// The AVX-512 kernel over one packed block of x (rows [m0, m0 + mc), the whole depth K) and
// panels [p0, p1): pairs of panels one after another and, per pair, the KC blocks in order,
// every micro-panel of x on one KC-deep slice of the pair (L1-resident) before the next slice.
// The partial sums of the pair's tiles wait in `sums` between slices, so each output is written
// once, whole, by its epilogue. The next slice in this order is prefetched to L2 meanwhile.
template <class Out>
MOELENS_AVX512 void zmm_block(const float* xpack, int64_t m0, int mc, const float* wp,
                              int64_t p0, int64_t p1, int64_t K, const Out& out, float* sums) {
  auto slice = [&](int64_t p, int64_t k0) -> Slice {
    if (p >= p1) return {nullptr, 0, 0};
    return {wp + (p * K + k0) * NR, int(std::min<int64_t>(2, p1 - p)),
            int(std::min<int64_t>(KC_ZMM, K - k0))};
  };
  const int micro_panels = (mc + MR_ZMM - 1) / MR_ZMM;
  for (int64_t p = p0; p < p1; p += 2) {
    for (int64_t k0 = 0; k0 < K; k0 += KC_ZMM) {
      const Slice now = slice(p, k0);
      const Slice next = k0 + KC_ZMM < K ? slice(p, k0 + KC_ZMM) : slice(p + 2, 0);
      const int chunk = (next.kc + micro_panels - 1) / micro_panels;  // lines per micro-tile
      for (int mp = 0; mp < micro_panels; ++mp) {
        const Tile where{{}, {}, m0 + mp * MR_ZMM, mp * MR_ZMM, p, k0 == 0, k0 + now.kc == K};
        const int first = std::min(next.kc, mp * chunk);
        const Prefetch2 pf{next.at ? next.at + int64_t(first) * NR : now.at,
                           next.np == 2 ? K * NR : 0,
                           next.at ? std::min(chunk, next.kc - first) : 0};
        zmm_tile(xpack + (int64_t(mp) * K + k0) * MR_ZMM, now.at, K * NR, now.kc, out, where,
                 std::min(MR_ZMM, mc - mp * MR_ZMM), now.np, pf,
                 sums + int64_t(mp) * MR_ZMM * 2 * NR);
      }
    }
  }
}

// run() on the AVX-512 kernel (zmm_plan): x is packed per block of rows over the whole depth K
// (a block stays in L2). Split by rows, each thread packs its own blocks into its slice of
// `xpack` and runs them against every panel (no barrier; each streams W, mostly from the L3);
// split by panels (a decode step's tens of rows per expert), the team shares each packed block.
template <class Out>
void run_zmm(const Rows& x, const float* wp, int64_t M, int64_t P, int64_t K, const Out& out,
             float* xpack, int num_threads) {
  const ZmmPlan plan = zmm_plan(M, K, num_threads);
  const int block = plan.block;
#pragma omp parallel num_threads(num_threads)
  {
    const int team = omp_get_num_threads(), me = omp_get_thread_num();
    std::vector<float> sums(size_t(block) * 2 * NR);  // [block][2 panels][16]
    if (plan.by_rows) {
      float* own = xpack + int64_t(me) * block * K;
#pragma omp for schedule(static)
      for (int64_t b = 0; b < plan.num_blocks; ++b) {
        const int64_t m0 = b * block;
        const int mc = int(std::min<int64_t>(block, M - m0));
        if (mc <= 0) continue;
        for (int mp = 0; mp * MR_ZMM < mc; ++mp)
          pack_micro_panel(x, m0 + mp * MR_ZMM, std::min(MR_ZMM, mc - mp * MR_ZMM), 0, int(K),
                           own + int64_t(mp) * K * MR_ZMM, MR_ZMM);
        zmm_block(own, m0, mc, wp, 0, P, K, out, sums.data());
      }
    } else {
      const int64_t pairs = (P + 1) / 2;
      const int64_t p0 = 2 * (pairs * me / team);
      const int64_t p1 = std::min(P, 2 * (pairs * (me + 1) / team));
      for (int64_t m0 = 0; m0 < M; m0 += block) {
        const int mc = int(std::min<int64_t>(block, M - m0));
        pack_x(x, m0, mc, 0, int(K), xpack, MR_ZMM);  // ends with the team's barrier
        zmm_block(xpack, m0, mc, wp, p0, p1, K, out, sums.data());
#pragma omp barrier  // everyone is done with xpack before it is repacked
      }
    }
  }
}
#endif

// x[M, K] (gathered through `x.index`) times the panels wp[P, K, 16], each finished tile handed
// to `out`. `xpack`: pack_buffer's scratch for this operand.
template <class Out>
void run(const Rows& x, const float* wp, int64_t M, int64_t P, int64_t K, const Out& out,
         float* xpack, int num_threads) {
#if MOELENS_PANEL_X86
  if (isa_in_use() == Isa::kAvx512) {
    run_zmm(x, wp, M, P, K, out, xpack, num_threads);
    return;
  }
#pragma omp parallel num_threads(num_threads)
  {
    const int team = omp_get_num_threads(), me = omp_get_thread_num();
    const int64_t p0 = P * me / team, p1 = P * (me + 1) / team;
    for (int64_t m0 = 0; m0 < M; m0 += MC) {
      const int mc = int(std::min<int64_t>(MC, M - m0));
      for (int64_t k0 = 0; k0 < K; k0 += KC) {
        const int kc = int(std::min<int64_t>(KC, K - k0));
        pack_x(x, m0, mc, k0, kc, xpack, MR);  // ends with the team's barrier
        const int micro_panels = (mc + MR - 1) / MR;
        // The micro-kernels of panel p share out the prefetch of this thread's panel p + 1.
        const int chunk = (kc + micro_panels - 1) / micro_panels;
        for (int64_t p = p0; p < p1; ++p) {
          const float* panel = wp + (p * K + k0) * NR;
          for (int mp = 0; mp < micro_panels; ++mp) {
            const Tile where{{}, {}, m0 + mp * MR, mp * MR, p, k0 == 0, k0 + kc == K};
            const int first = std::min(kc, mp * chunk);
            const bool more = p + 1 < p1;
            const Prefetch next{more ? panel + K * NR + int64_t(first) * NR : panel,
                                more ? std::min(chunk, kc - first) : 0};
            micro_kernel(xpack + int64_t(mp) * kc * MR, panel, kc, out, where,
                         std::min(MR, mc - mp * MR), next);
          }
        }
#pragma omp barrier  // everyone is done with xpack before it is repacked
      }
    }
  }
#else
  TORCH_CHECK(false, "panel GEMM needs an x86-64 CPU with AVX2 and FMA");
#endif
}

// Floats of packed x that run() needs for an [M, K] operand on `threads` threads.
int64_t pack_floats(int64_t M, int64_t K, int threads) {
  if (isa_in_use() == Isa::kAvx512) return zmm_plan(M, K, threads).pack_floats;
  const int64_t mc = std::min<int64_t>(MC, M), kc = std::min<int64_t>(KC, K);
  return (mc + MR - 1) / MR * MR * kc;
}

// Scratch for the packed x of [M, K] operands, for each K in `depths`.
std::vector<float> pack_buffer(int64_t M, std::initializer_list<int64_t> depths, int threads) {
  int64_t floats = 0;
  for (const int64_t K : depths) floats = std::max(floats, pack_floats(M, K, threads));
  return std::vector<float>(size_t(floats));
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> names;
  if (cpu_supports_avx512()) names.push_back("avx512");
  if (cpu_supported()) names.push_back("avx2");
  return names;
}

// Pins the micro-kernel ("avx512", "avx2") or restores the best (""); returns the one in use.
std::string set_isa(const std::string& name) {
  if (name == "avx512") {
    TORCH_CHECK_VALUE(cpu_supports_avx512(), "panel GEMM: this CPU has no AVX-512");
    isa_in_use() = Isa::kAvx512;
  } else if (name == "avx2") {
    TORCH_CHECK_VALUE(cpu_supported(), "panel GEMM: this CPU has no AVX2 and FMA");
    isa_in_use() = Isa::kAvx2;
  } else {
    TORCH_CHECK_VALUE(name.empty(), "panel GEMM: unknown ISA '", name,
                      "', choose avx512, avx2 or '' (the best)");
    isa_in_use() = best_isa();
  }
  return isa_in_use() == Isa::kAvx512 ? "avx512" : "avx2";
}

void check_cpu() {
  static const bool supported = cpu_supported();  // once per process, not per call
  TORCH_CHECK_VALUE(supported, "panel GEMM needs a CPU with AVX2 and FMA");
}

// Panels [.., P, K, 16] of float32 holding `out_features` columns over K = `in_features`.
void check_panels(const torch::Tensor& wp, int64_t dims, int64_t in_features,
                  int64_t out_features, const char* what) {
  TORCH_CHECK_VALUE(wp.scalar_type() == torch::kFloat32 || wp.scalar_type() == torch::kBFloat16,
                    "panel GEMM: ", what, " panels must be float32 or bfloat16, got ",
                    wp.scalar_type());
  TORCH_CHECK_VALUE(wp.dim() == dims && wp.size(-1) == NR, "panel GEMM: ", what,
                    " panels must be ", dims == 3 ? "[P, K, 16]" : "[E, P, K, 16]", ", got ",
                    wp.sizes());
  TORCH_CHECK_VALUE(wp.size(-2) == in_features, "panel GEMM: x has K = ", in_features,
                    " columns, the ", what, " panels K = ", wp.size(-2));
  TORCH_CHECK_VALUE(out_features > (wp.size(-3) - 1) * NR && out_features <= wp.size(-3) * NR,
                    "panel GEMM: ", wp.size(-3), " ", what, " panels cannot hold ", out_features,
                    " output features");
}

void check_x(const torch::Tensor& x, int64_t num_threads) {
  TORCH_CHECK_VALUE(x.scalar_type() == torch::kFloat32,
                    "panel GEMM: x must be float32, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2, "panel GEMM: x must be [M, K], got ", x.sizes());
  TORCH_CHECK_VALUE(num_threads >= 1, "panel GEMM: num_threads must be >= 1");
  check_cpu();
}

// Rows may be strided (e.g. the gate half of a [M, 2I] activation); elements must not be.
torch::Tensor row_major(const torch::Tensor& x) {
  return x.stride(1) == 1 && x.stride(0) >= x.size(1) ? x : x.contiguous();
}

// fp32_out: a bf16 weight's product comes back in fp32 (an fp32 weight's always does).
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& wp, int64_t out_features,
                     int64_t num_threads, bool fp32_out) {
  if (wp.scalar_type() == torch::kBFloat16) {
    check_panels(wp, 3, x.size(1), out_features, "weight");
    return moelens::bf16::linear(x, wp, out_features, num_threads, fp32_out);
  }
  check_x(x, num_threads);
  check_panels(wp, 3, x.size(1), out_features, "weight");
  const auto xc = row_major(x);
  const auto wc = wp.contiguous();
  auto y = torch::empty({x.size(0), out_features}, x.options());
  if (x.size(0) == 0) return y;
  if (x.size(1) == 0) return y.zero_();
  {
    pybind11::gil_scoped_release no_gil;
    auto xpack = pack_buffer(x.size(0), {x.size(1)}, int(num_threads));
#if MOELENS_PANEL_X86
    run(Rows{xc.data_ptr<float>(), xc.stride(0), nullptr}, wc.data_ptr<float>(), x.size(0),
        wc.size(0), x.size(1), StoreOut{y.data_ptr<float>(), out_features}, xpack.data(),
        int(num_threads));
#endif
  }
  return y;
}

#if MOELENS_PANEL_X86
// silu(x · gate^T) * (x · up^T) for rows x.row(0..M) and a gated weight wp [P, K, 16]: h [M, I].
void swiglu_rows(const Rows& x, int64_t M, int64_t K, const float* wp, int64_t P, int64_t inter,
                 float* h, float* xpack, std::vector<float>& partial, int num_threads) {
  const bool split = isa_in_use() == Isa::kAvx2 && K > KC;  // the AVX2 kernel's KC blocks
  if (split) partial.resize(size_t(std::min<int64_t>(MC, M) * P * NR));
  run(x, wp, M, P, K, SwiGluOut{h, inter, split ? partial.data() : nullptr, P * NR}, xpack,
      num_threads);
}
#endif

torch::Tensor swiglu(const torch::Tensor& x, const torch::Tensor& wp, int64_t inter,
                     int64_t num_threads) {
  check_panels(wp, 3, x.size(1), 2 * inter, "gate/up");
  TORCH_CHECK_VALUE(wp.size(0) == (inter + 7) / 8, "panel GEMM: a gated weight of I = ", inter,
                    " has ", (inter + 7) / 8, " panels, got ", wp.size(0));
  if (wp.scalar_type() == torch::kBFloat16) return moelens::bf16::swiglu(x, wp, inter, num_threads);
  check_x(x, num_threads);
  TORCH_CHECK_VALUE(x.size(1) > 0, "panel GEMM: x has no columns");
  const auto xc = row_major(x);
  const auto wc = wp.contiguous();
  auto h = torch::empty({x.size(0), inter}, x.options());
  if (x.size(0) == 0) return h;
  {
    pybind11::gil_scoped_release no_gil;
    auto xpack = pack_buffer(x.size(0), {x.size(1)}, int(num_threads));
    std::vector<float> partial;
#if MOELENS_PANEL_X86
    swiglu_rows(Rows{xc.data_ptr<float>(), xc.stride(0), nullptr}, x.size(0), x.size(1),
                wc.data_ptr<float>(), wc.size(0), inter, h.data_ptr<float>(), xpack.data(),
                partial, int(num_threads));
#endif
  }
  return h;
}

// The routed experts of an MoE layer: out[t] = sum over t's picks (e, w) of
// w * down_e(silu(gate_e(x[t])) * up_e(x[t])). The (token, expert) pairs come sorted by expert:
// pair_token[R] their token, pair_weight[R] their routing weight, counts[E] pairs per expert.
torch::Tensor grouped_swiglu(const torch::Tensor& x, const torch::Tensor& pair_token,
                             const torch::Tensor& pair_weight, const torch::Tensor& counts,
                             const torch::Tensor& gate_up, const torch::Tensor& down,
                             int64_t inter, int64_t num_threads) {
  const bool is_bf16 = gate_up.scalar_type() == torch::kBFloat16;
  if (!is_bf16) check_x(x, num_threads);
  TORCH_CHECK_VALUE(x.dim() == 2, "panel GEMM: x must be [M, K], got ", x.sizes());
  const int64_t T = x.size(0), H = x.size(1), E = gate_up.size(0), R = pair_token.numel();
  check_panels(gate_up, 4, H, 2 * inter, "gate/up");
  check_panels(down, 4, inter, H, "down");
  TORCH_CHECK_VALUE(gate_up.size(1) == (inter + 7) / 8, "panel GEMM: a gated weight of I = ",
                    inter, " has ", (inter + 7) / 8, " panels, got ", gate_up.size(1));
  TORCH_CHECK_VALUE(down.size(0) == E && counts.numel() == E,
                    "panel GEMM: gate/up, down and counts disagree on the number of experts (",
                    E, ", ", down.size(0), ", ", counts.numel(), ")");
  TORCH_CHECK_VALUE(pair_token.scalar_type() == torch::kInt64 &&
                        counts.scalar_type() == torch::kInt64,
                    "panel GEMM: pair_token and counts must be int64");
  TORCH_CHECK_VALUE(pair_weight.scalar_type() == torch::kFloat32 && pair_weight.numel() == R,
                    "panel GEMM: pair_weight must be float32 with one weight per pair");
  TORCH_CHECK_VALUE(H > 0 && inter > 0, "panel GEMM: empty hidden or intermediate size");
  const auto xc = x.contiguous(), tokens = pair_token.contiguous().cpu();
  const auto weights = pair_weight.contiguous(), per_expert = counts.contiguous().cpu();
  const auto gu = gate_up.contiguous(), dn = down.contiguous();
  const int64_t* tok = tokens.data_ptr<int64_t>();
  const int64_t* cnt = per_expert.data_ptr<int64_t>();
  int64_t total = 0, widest = 0;
  for (int64_t e = 0; e < E; ++e) {
    TORCH_CHECK_VALUE(cnt[e] >= 0, "panel GEMM: negative count for expert ", e);
    total += cnt[e];
    widest = std::max(widest, cnt[e]);
  }
  TORCH_CHECK_VALUE(total == R, "panel GEMM: counts sum to ", total, ", there are ", R, " pairs");
  for (int64_t r = 0; r < R; ++r)
    TORCH_CHECK_VALUE(tok[r] >= 0 && tok[r] < T, "panel GEMM: pair ", r, " names token ",
                      tok[r], ", x has ", T);
  if (is_bf16) return moelens::bf16::grouped_swiglu(x, tok, weights.data_ptr<float>(), cnt, gu, dn,
                                               inter, num_threads);
  auto out = torch::zeros({T, H}, x.options());
  if (R == 0) return out;
  {
    pybind11::gil_scoped_release no_gil;
    auto xpack = pack_buffer(widest, {H, inter}, int(num_threads));
    std::unique_ptr<float[]> h(new float[size_t(widest * inter)]);  // [rows, I], not zeroed
    std::vector<float> partial;
#if MOELENS_PANEL_X86
    const int64_t p_up = gu.size(1), p_down = dn.size(1);
    const float* w = weights.data_ptr<float>();
    int64_t start = 0;
    for (int64_t e = 0; e < E; start += cnt[e], ++e) {
      if (cnt[e] == 0) continue;
      swiglu_rows(Rows{xc.data_ptr<float>(), H, tok + start}, cnt[e], H,
                  gu.data_ptr<float>() + e * p_up * H * NR, p_up, inter, h.get(), xpack.data(),
                  partial, int(num_threads));
      run(Rows{h.get(), inter, nullptr}, dn.data_ptr<float>() + e * p_down * inter * NR, cnt[e],
          p_down, inter, ScatterAddOut{out.data_ptr<float>(), H, tok + start, w + start},
          xpack.data(), int(num_threads));
    }
#endif
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear, "y = x @ W^T with W packed as [P, K, 16] panels");
  m.def("swiglu", &swiglu, "silu(x @ gate^T) * (x @ up^T) for a gated [P, K, 16] weight");
  m.def("grouped_swiglu", &grouped_swiglu, "an MoE layer's routed experts, fused");
  m.def("causal_attention", &moelens::causal_attention,
        "causal attention over the new tokens of packed prompts (prefill_attention.cpp)");
  m.def("argmax_logsumexp", &moelens::argmax_logsumexp,
        "each row's first argmax and logsumexp (row_stats.cpp)");
  m.def("rms_norm", &moelens::rms_norm, "HF's RMSNorm over the last dim (rms_norm.cpp)");
  m.def("supported", &cpu_supported, "this CPU has AVX2 and FMA");
  m.def("bf16_supported", &moelens::bf16::supported, "this CPU runs a bf16 engine");
  m.def("bf16_engines", &moelens::bf16::engines, "bf16 engines this CPU runs, best first");
  m.def("set_bf16_engine", &moelens::bf16::set_engine,
        "pin the bf16 engine: amx, avx512_bf16, or '' for the best");
  m.def("set_isa", &set_isa, "pin the micro-kernel: avx512, avx2, or '' for the best");
  m.def("supported_isas", &supported_isas, "micro-kernels this CPU runs, best first");
  m.def("pin_openmp_team", &moelens::pin_openmp_team, "thread t of the OpenMP team to cpus[t]");
}
