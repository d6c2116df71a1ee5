// bf16 GEMMs for the CPU device: y = x · W^T with W packed once (at weight load) into the panel
// order of panel_gemm.cpp, [P, K, 16], each panel's rows paired ("VNNI": element (k, n) of a
// panel sits at (k / 2) * 32 + n * 2 + k % 2), so a 32-deep slice of a panel is one AMX B tile
// (16 rows of 16 pairs, 64 bytes a row) and each pair row is one AVX512-BF16 operand.
//
// Why: oneDNN's bf16 matmul reorders the weight on every call; at the 16-64 rows per expert of a
// decode step that costs as much as the multiply (a bench-mixtral expert at 64 rows: 1.0 ms plain,
// 0.5 ms prepacked). With the weight already in panel order the only per-call copy is x's.
//
// Blocking: x is copied (gathered, for the experts) MC rows at a time into a zero-padded
// [rows, K] block in tile order that stays in L2; threads split the column blocks of two panels;
// each column block runs 32 x 32 outputs at a time into a small fp32 buffer, which goes to the
// epilogue: plain bf16 store, silu(gate) * up for a gated gate/up weight (its panels hold 8 gate
// and the same 8 up columns, as in panel_gemm.cpp), or routing-weighted adds into fp32 token rows
// for the experts' down GEMM. Two engines compute the 32 x 32 block, chosen at run time:
// - AMX (Intel Sapphire Rapids and later): four C tiles, two A and two B tiles per 32-deep step.
// - AVX512-BF16 (AMD Zen 4 and later, Intel Cooper Lake): VDPBF16PS, four passes of 8 rows x
//   32 columns (16 zmm accumulators), each x pair broadcast against a pair row of both panels.
// K must be a multiple of 32 (moelens.panel_gemm packs only such weights in bf16).
#include "bf16_gemm.h"

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "simd_exp.h"
#define MOELENS_BF16_X86 1
#define MOELENS_BF16 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")))
#define MOELENS_AMX \
  __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")))
#else
#define MOELENS_BF16_X86 0
#endif

namespace moelens::bf16 {
namespace {

constexpr int NR = 16;                     // columns per panel
constexpr int KB = 32;                     // depth of one tile product (bf16 pairs x 16)
constexpr int MB = 32;                     // rows per block: two A tiles
constexpr int64_t ABLOCK_BYTES = 1 << 20;  // the copied x block [rows][K], within L2

using bf16 = uint16_t;

constexpr const char* kAmxName = "amx";
constexpr const char* kDpName = "avx512_bf16";

// Rows of x: row r is base + (idx ? idx[r] : r) * stride.
struct Rows {
  const bf16* base;
  int64_t stride;
  const int64_t* idx;
  const bf16* row(int64_t r) const { return base + (idx ? idx[r] : r) * stride; }
};

#if MOELENS_BF16_X86
struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Every tile 16 rows x 64 bytes: C 0-3 (fp32 16 x 16), A 4-5 (bf16 16 x 32), B 6-7 (16 x 16 pairs).
MOELENS_AMX void load_tile_config() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.colsb[t] = 64, cfg.rows[t] = 16;
  // GCC's _tile_loadconfig tells the compiler it reads only 8 bytes, which lets it drop the
  // stores above; the barrier keeps them.
  __asm__ __volatile__("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

// Both engines compute c[2 row tiles][2 panels][16][16] = a[32 rows][K] · the panels b0, b1
// ([K/2][16][2] each), a in tile order (`tiled`), of which the first `rows` rows are valid.
// The two panels of the column block after this one (nullptr: none), for a software prefetch.
struct Panels {
  const bf16* b0 = nullptr;
  const bf16* b1 = nullptr;
};

struct AmxBlock {
  MOELENS_AMX void begin() const { load_tile_config(); }
  MOELENS_AMX void end() const { _tile_release(); }
  // All 32 rows, whatever `rows` says: a tile product costs the same for any row count.
  MOELENS_AMX void operator()(const bf16* a, int64_t K, const bf16* b0, const bf16* b1,
                              float* c, int /*rows*/, const Panels& /*next*/) const {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t k = 0; k < K; k += KB) {
      _tile_loadd(4, a + k * 16, 64);
      _tile_loadd(5, a + 16 * K + k * 16, 64);
      _tile_loadd(6, b0 + k * NR, 64);
      _tile_loadd(7, b1 + k * NR, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, c, 64);
    _tile_stored(1, c + 256, 64);
    _tile_stored(2, c + 512, 64);
    _tile_stored(3, c + 768, 64);
  }
};

// VDPBF16PS: acc[n] += x[r, k] * w[k, n] + x[r, k + 1] * w[k + 1, n] over 16 columns n, with x's
// pair broadcast to every lane and w's pair row as it lies in the panel. Up to 8 rows x 2 panels
// of accumulators per pass; the rows of one pass are consecutive in one 16-row group of a's tile
// order, so each 32-deep step reads adjacent 64-byte rows of a. Only the block's `rows` valid
// rows are computed: a decode step's experts get tens of rows each, and rounding every expert up
// to 32 cost a quarter of the work at 64 rows an expert. The first pass prefetches `next`, one
// line of each panel per pair row it reads: at a decode step's 64 rows an expert each panel is
// used for two blocks only, and its first reads would otherwise wait on memory (bench-mixtral's
// MoE layer at 200 and 256 tokens: faster in 6 of 6 alternated runs, 1-17%, median ~3%;
// `bench/moe_layer_bf16.py`, session 18).
struct DpBlock {
  static constexpr int ROWS = 8;
  void begin() const {}
  void end() const {}
  MOELENS_BF16 void operator()(const bf16* a, int64_t K, const bf16* b0, const bf16* b1,
                               float* c, int rows, const Panels& next) const {
    int r0 = 0;
    for (; r0 + ROWS <= rows; r0 += ROWS) pass<ROWS>(a, K, b0, b1, c, r0, r0 ? Panels{} : next);
    const Panels pf = r0 ? Panels{} : next;
    switch (rows - r0) {
      case 1: pass<1>(a, K, b0, b1, c, r0, pf); break;
      case 2: pass<2>(a, K, b0, b1, c, r0, pf); break;
      case 3: pass<3>(a, K, b0, b1, c, r0, pf); break;
      case 4: pass<4>(a, K, b0, b1, c, r0, pf); break;
      case 5: pass<5>(a, K, b0, b1, c, r0, pf); break;
      case 6: pass<6>(a, K, b0, b1, c, r0, pf); break;
      case 7: pass<7>(a, K, b0, b1, c, r0, pf); break;
      default: break;
    }
  }

  // Rows [r0, r0 + R) of the block, r0 a multiple of 8 (so within one 16-row group).
  template <int R>
  MOELENS_BF16 static void pass(const bf16* a, int64_t K, const bf16* b0, const bf16* b1,
                                float* c, int r0, const Panels& next) {
    __m512 acc[R][2];
    for (int i = 0; i < R; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    const bf16* rows = a + (r0 / 16) * 16 * K + (r0 % 16) * KB;  // row r0's first 32-deep step
    for (int64_t k = 0; k < K; k += KB) {
      const bf16* ak = rows + k * 16;  // tiled(r0, k, K)
      const bf16 *wk0 = b0 + k * NR, *wk1 = b1 + k * NR;
      for (int kk = 0; kk < KB; kk += 2) {
        if (next.b0) {  // the line at this offset of each next panel
          __builtin_prefetch(next.b0 + (k + kk) * NR, 0, 2);
          __builtin_prefetch(next.b1 + (k + kk) * NR, 0, 2);
        }
        const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wk0 + kk * NR);
        const __m512bh w1 = (__m512bh)_mm512_loadu_si512(wk1 + kk * NR);
        for (int i = 0; i < R; ++i) {
          int32_t pair;
          std::memcpy(&pair, ak + i * KB + kk, 4);
          const __m512bh xi = (__m512bh)_mm512_set1_epi32(pair);
          acc[i][0] = _mm512_dpbf16_ps(acc[i][0], xi, w0);
          acc[i][1] = _mm512_dpbf16_ps(acc[i][1], xi, w1);
        }
      }
    }
    for (int i = 0; i < R; ++i) {
      const int r = r0 + i;
      for (int p = 0; p < 2; ++p)
        _mm512_storeu_ps(c + ((r / 16) * 2 + p) * 256 + (r % 16) * 16, acc[i][p]);
    }
  }
};

MOELENS_BF16 inline __m512 c_row(const float* c, int r, int panel) {
  return _mm512_loadu_ps(c + ((r / 16) * 2 + panel) * 256 + (r % 16) * 16);
}

// A operands are stored in tile order: element (r, k) of [rows, K] at tiled(r, k, K), so each
// A tile (16 rows x 32) is 1 KiB contiguous. Row-major rows 2K bytes apart would put a tile's 16
// lines into two L1 sets.
inline int64_t tiled(int64_t r, int64_t k, int64_t K) {
  return ((r / 16) * (K / KB) + k / KB) * (16 * KB) + (r % 16) * KB + k % KB;
}

// Epilogues get rows [row0, row0 + rows) of the GEMM and panels [panel0, panel0 + panels).
// y[M, N] in T: bf16 (the sums rounded) or fp32 (the accumulators as they are: logits, with no
// bf16 rounding and no conversion pass over [rows, vocab]).
template <typename T>
struct StoreOut {
  T* y;
  int64_t N;
  MOELENS_BF16 void operator()(int64_t row0, int rows, int64_t panel0, int panels,
                               const float* c) const {
    for (int r = 0; r < rows; ++r)
      for (int p = 0; p < panels; ++p) {
        const int64_t col = (panel0 + p) * NR;
        const __mmask16 m = __mmask16((1u << std::min<int64_t>(NR, N - col)) - 1);
        T* dst = y + (row0 + r) * N + col;
        if constexpr (std::is_same_v<T, float>)
          _mm512_mask_storeu_ps(dst, m, c_row(c, r, p));
        else
          _mm256_mask_storeu_epi16(dst, m, (__m256i)_mm512_cvtneps_pbh(c_row(c, r, p)));
      }
  }
};

struct SwiGluOut {  // h[M, stride] bf16 (row-major, or `tile_order`), columns < inter written
  bf16* h;
  int64_t inter, stride;
  bool tile_order;
  // The two panels of a block (`run` passes an even panel0) hold 8 gate and 8 up columns each,
  // for h's 16 consecutive columns 8 * panel0 ...: one 16-lane silu(g) * u per row, 1 / (1 + e)
  // by rcp14 and one Newton step (exp is clamped, so 1 + e is finite).
  MOELENS_BF16 void operator()(int64_t row0, int rows, int64_t panel0, int panels,
                               const float* c) const {
    const __m512 one = _mm512_set1_ps(1.f), two = _mm512_set1_ps(2.f);
    const int64_t col = panel0 * (NR / 2);
    const int n = int(std::min<int64_t>(panels * (NR / 2), inter - col));
    const __mmask16 mask = __mmask16((1u << n) - 1);
    for (int r = 0; r < rows; ++r) {
      const __m512 gu0 = c_row(c, r, 0), gu1 = c_row(c, r, panels - 1);
      const __m512 g = _mm512_shuffle_f32x4(gu0, gu1, 0x44);  // gate lanes of both panels
      const __m512 u = _mm512_shuffle_f32x4(gu0, gu1, 0xEE);  // up lanes
      const __m512 d = _mm512_add_ps(one, exp_avx512(_mm512_sub_ps(_mm512_setzero_ps(), g)));
      __m512 inv = _mm512_rcp14_ps(d);
      inv = _mm512_mul_ps(inv, _mm512_fnmadd_ps(d, inv, two));
      const __m512 act = _mm512_mul_ps(_mm512_mul_ps(g, u), inv);
      const int64_t at = tile_order ? tiled(row0 + r, col, stride) : (row0 + r) * stride + col;
      _mm256_mask_storeu_epi16(h + at, mask, (__m256i)_mm512_cvtneps_pbh(act));  // within a tile row
    }
  }
};

struct ScatterAddOut {  // out[tok[r], :N] += w[r] * y[r] in fp32
  float* out;
  int64_t N;
  const int64_t* tok;
  const float* w;
  MOELENS_BF16 void operator()(int64_t row0, int rows, int64_t panel0, int panels,
                               const float* c) const {
    for (int r = 0; r < rows; ++r) {
      const __m512 scale = _mm512_set1_ps(w[row0 + r]);
      float* dst = out + tok[row0 + r] * N;
      for (int p = 0; p < panels; ++p) {
        const int64_t col = (panel0 + p) * NR;
        const __mmask16 m = __mmask16((1u << std::min<int64_t>(NR, N - col)) - 1);
        const __m512 acc = _mm512_maskz_loadu_ps(m, dst + col);
        _mm512_mask_storeu_ps(dst + col, m, _mm512_fmadd_ps(scale, c_row(c, r, p), acc));
      }
    }
  }
};

// m rounded up to whole blocks of two A tiles.
inline int64_t padded_rows(int64_t m) { return (m + MB - 1) / MB * MB; }

// Rows of x per copied block: a multiple of 32 whose [rows][K] block fits ABLOCK_BYTES.
int64_t block_rows(int64_t K) {
  return std::max<int64_t>(MB, ABLOCK_BYTES / (2 * K) / MB * MB);
}

// y = x[M, K] · W^T for panels wp [P, K, 16] through `epi`, inside an omp parallel region
// (every thread calls it). `direct`: x is already in tile order with rows up to M rounded to 32
// readable, so A tiles load from it; otherwise blocks of rows are copied into `ablock` in tile
// order.
template <typename Block, typename Epi>
MOELENS_BF16 void run(const Block& block, const Rows& x, bool direct, int64_t M, int64_t K,
                      const bf16* wp, int64_t P, const Epi& epi, bf16* ablock) {
  alignas(64) float c[4 * 256];
  const int64_t mc_max = block_rows(K), Q = (P + 1) / 2, panel_elems = K * NR;
  for (int64_t m0 = 0; m0 < M; m0 += mc_max) {
    const int64_t mc = std::min(mc_max, M - m0), padded = padded_rows(mc);
    const bf16* a = x.base + m0 * K;
    if (!direct) {
#pragma omp for schedule(static)
      for (int64_t r = 0; r < padded; ++r) {
        const bf16* src = r < mc ? x.row(m0 + r) : nullptr;
        for (int64_t k = 0; k < K; k += KB) {
          bf16* dst = ablock + tiled(r, k, K);
          if (src) std::memcpy(dst, src + k, KB * 2);
          else std::memset(dst, 0, KB * 2);
        }
      }  // implicit barrier: the block is complete
      a = ablock;
    }
#pragma omp for schedule(static)
    for (int64_t q = 0; q < Q; ++q) {
      const int panels = int(std::min<int64_t>(2, P - 2 * q));
      const bf16* b0 = wp + 2 * q * panel_elems;
      const bf16* b1 = panels == 2 ? b0 + panel_elems : b0;  // a lone last panel runs twice
      Panels next;
      if (2 * q + 2 < P) {
        next.b0 = b0 + 2 * panel_elems;
        next.b1 = 2 * q + 3 < P ? next.b0 + panel_elems : next.b0;
      }
      for (int64_t r = 0; r < padded; r += MB) {
        const int rows = int(std::min<int64_t>(MB, mc - r));
        block(a + r * K, K, b0, b1, c, rows, r == 0 ? next : Panels{});
        epi(m0 + r, rows, 2 * q, panels, c);
      }
    }  // implicit barrier: nobody still reads the block
  }
}

bool request_permission() {
  constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
  return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

bool has_avx512_bf16() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
}

bool has_amx() {
  static const bool ok = has_avx512_bf16() && __builtin_cpu_supports("amx-bf16") &&
                         request_permission();
  return ok;
}
#else
bool has_avx512_bf16() { return false; }
bool has_amx() { return false; }
#endif

enum class Engine { kNone, kAvx512Bf16, kAmx };

Engine best_engine() {
  return has_amx() ? Engine::kAmx : has_avx512_bf16() ? Engine::kAvx512Bf16 : Engine::kNone;
}

Engine& engine_in_use() {
  static Engine engine = best_engine();
  return engine;
}

const bf16* data(const torch::Tensor& t) {
  return reinterpret_cast<const bf16*>(t.data_ptr<at::BFloat16>());
}

bf16* data(torch::Tensor& t) { return reinterpret_cast<bf16*>(t.data_ptr<at::BFloat16>()); }

void check_x(const torch::Tensor& x, const torch::Tensor& wp, int64_t num_threads) {
  TORCH_CHECK_VALUE(supported(), "bf16 GEMM: this CPU has neither AMX-BF16 nor AVX512-BF16");
  TORCH_CHECK_VALUE(x.scalar_type() == torch::kBFloat16 && wp.scalar_type() == torch::kBFloat16,
                    "bf16 GEMM: x and the panels must be bfloat16, got ", x.scalar_type(),
                    " and ", wp.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) % KB == 0,
                    "bf16 GEMM: x must be [M, K] with K a multiple of 32, got ", x.sizes());
  TORCH_CHECK_VALUE(num_threads >= 1, "bf16 GEMM: num_threads must be >= 1");
}

#if MOELENS_BF16_X86
// body(block) on every thread of an omp parallel region, with the engine in use set up around
// it on each thread (AMX: the tile configuration).
template <typename Body>
void parallel(int64_t num_threads, const Body& body) {
  const auto on_threads = [&](const auto& block) {
#pragma omp parallel num_threads(int(num_threads))
    {
      block.begin();
      body(block);
      block.end();
    }
  };
  if (engine_in_use() == Engine::kAmx) on_threads(AmxBlock{});
  else on_threads(DpBlock{});
}

// out [M, columns] = x · W^T through the epilogue `make_epi(out)` builds, on `num_threads`.
template <typename T, typename MakeEpi>
torch::Tensor run_plain(const torch::Tensor& x, const torch::Tensor& wp, int64_t columns,
                        int64_t num_threads, const MakeEpi& make_epi) {
  check_x(x, wp, num_threads);
  const auto xc = x.contiguous(), wc = wp.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  constexpr auto dtype = std::is_same_v<T, float> ? torch::kFloat32 : torch::kBFloat16;
  auto out = torch::empty({M, columns}, x.options().dtype(dtype));
  if (M == 0) return out;
  const auto epi = make_epi(static_cast<T*>(out.data_ptr()));
  pybind11::gil_scoped_release no_gil;
  std::vector<bf16> ablock(size_t(std::min(block_rows(K), padded_rows(M)) * K));
  parallel(num_threads, [&](const auto& block) {
    run(block, Rows{data(xc), K, nullptr}, false, M, K, data(wc), wc.size(0), epi,
        ablock.data());
  });
  return out;
}
#endif

}  // namespace

bool supported() { return engine_in_use() != Engine::kNone; }

std::vector<std::string> engines() {
  std::vector<std::string> names;
  if (has_amx()) names.push_back(kAmxName);
  if (has_avx512_bf16()) names.push_back(kDpName);
  return names;
}

std::string set_engine(const std::string& name) {
  if (name.empty()) {
    engine_in_use() = best_engine();
  } else if (name == kAmxName) {
    TORCH_CHECK_VALUE(has_amx(), "bf16 GEMM: this CPU or kernel has no AMX-BF16");
    engine_in_use() = Engine::kAmx;
  } else if (name == kDpName) {
    TORCH_CHECK_VALUE(has_avx512_bf16(), "bf16 GEMM: this CPU has no AVX512-BF16");
    engine_in_use() = Engine::kAvx512Bf16;
  } else {
    TORCH_CHECK_VALUE(false, "bf16 GEMM: unknown engine '", name, "', choose ", kAmxName,
                      ", ", kDpName, " or '' (the best)");
  }
  switch (engine_in_use()) {
    case Engine::kAmx: return kAmxName;
    case Engine::kAvx512Bf16: return kDpName;
    default: return "";
  }
}

#if MOELENS_BF16_X86
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& wp, int64_t out_features,
                     int64_t num_threads, bool fp32_out) {
  if (fp32_out)
    return run_plain<float>(x, wp, out_features, num_threads,
                            [&](float* y) { return StoreOut<float>{y, out_features}; });
  return run_plain<bf16>(x, wp, out_features, num_threads,
                         [&](bf16* y) { return StoreOut<bf16>{y, out_features}; });
}

torch::Tensor swiglu(const torch::Tensor& x, const torch::Tensor& wp, int64_t inter,
                     int64_t num_threads) {
  return run_plain<bf16>(x, wp, inter, num_threads,
                         [&](bf16* h) { return SwiGluOut{h, inter, inter, false}; });
}
#else
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& wp, int64_t, int64_t threads,
                     bool) {
  check_x(x, wp, threads);  // raises: no bf16 engine here
  return {};
}

torch::Tensor swiglu(const torch::Tensor& x, const torch::Tensor& wp, int64_t, int64_t threads) {
  check_x(x, wp, threads);
  return {};
}
#endif

torch::Tensor grouped_swiglu(const torch::Tensor& x, const int64_t* tok, const float* weight,
                             const int64_t* counts, const torch::Tensor& gate_up,
                             const torch::Tensor& down, int64_t inter, int64_t num_threads) {
  check_x(x, gate_up, num_threads);
  TORCH_CHECK_VALUE(down.scalar_type() == torch::kBFloat16 && inter % KB == 0,
                    "bf16 GEMM: the down panels must be bfloat16 over a multiple of 32, got ",
                    down.scalar_type(), " and I = ", inter);
  const auto xc = x.contiguous(), gu = gate_up.contiguous(), dn = down.contiguous();
  const int64_t T = x.size(0), H = x.size(1), E = gu.size(0);
  auto out = torch::zeros({T, H}, x.options().dtype(torch::kFloat32));
#if MOELENS_BF16_X86
  int64_t widest = 0;
  for (int64_t e = 0; e < E; ++e) widest = std::max(widest, counts[e]);
  if (widest == 0) return out;
  pybind11::gil_scoped_release no_gil;
  const int64_t padded = padded_rows(widest);
  std::vector<bf16> ablock(size_t(std::min(block_rows(H), padded) * H));
  // [rows, I]: rows past an expert's count hold an earlier expert's values, seen only by their own
  // (discarded) outputs
  std::vector<bf16> h(size_t(padded * inter), 0);  // in tile order
  const int64_t p_up = gu.size(1), p_down = dn.size(1);
  parallel(num_threads, [&](const auto& block) {
    int64_t start = 0;
    for (int64_t e = 0; e < E; start += counts[e], ++e) {
      if (counts[e] == 0) continue;
      run(block, Rows{data(xc), H, tok + start}, false, counts[e], H,
          data(gu) + e * p_up * H * NR, p_up, SwiGluOut{h.data(), inter, inter, true},
          ablock.data());
#pragma omp barrier  // h is complete
      run(block, Rows{h.data(), inter, nullptr}, true, counts[e], inter,
          data(dn) + e * p_down * inter * NR, p_down,
          ScatterAddOut{out.data_ptr<float>(), H, tok + start, weight + start}, ablock.data());
    }  // run's last barrier: h is free for the next expert
  });
#endif
  return out;
}

}  // namespace moelens::bf16
