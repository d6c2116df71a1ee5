// Causal self-attention over the new tokens of a prefill batch (no cached prefix), fp32, GQA,
// computed transposed so that both of its GEMMs run on the panel micro-kernel with no transpose
// in between.
//
// Why: torch's SDPA runs a batch of 128-token prompts at 20-30 GFLOP/s on the 2-core dev machine
// (its blocking is sized for long sequences), a fifth of what the same cores reach in GEMMs;
// this kernel is 2-2.4x faster at 32-512-token prompts, 1.4-1.75x at 926-2048
// (bench/prefill_attention.py).
//
// Shapes: S prompts of L_s tokens, Hq query heads, Hkv KV heads, G = Hq / Hkv, D head_dim.
// The query rows of (prompt s, KV head h) are its positions x its G heads, position-major
// (row i: position i / G, head h·G + i % G). A work item is 16 of those rows:
//   1. S^T [keys][16] = K · Q^T: a = K packed per 6 keys [D][6], b = the item's q rows as one
//      panel [D][16], scaled. Only keys up to the item's last position are computed (causal).
//   2. Softmax down each column of S^T (one query row per lane, two ymm), keys past the
//      row's position masked; S^T now holds the unnormalised P^T and 1 / rowsum is kept.
//   3. out^T [D][16] = V^T · P^T: a = V^T packed per 6 head dims [keys][6], b = P^T [keys][16];
//      the epilogue scales by 1 / rowsum and stores each row to out[position, head].
// Q, K and V are packed once per (s, h) (K and V shared by its G heads and all its items). Items
// run group by group, longest prompts first, so both threads read the same packed K/V, and
// within a group last rows first (they see the most keys; the cheapest items end the call).
#include "prefill_attention.h"

#include <omp.h>

#include <algorithm>
#include <limits>
#include <memory>
#include <numeric>
#include <vector>

#include "micro_kernel.h"
#if MOELENS_PANEL_X86
#include "simd_exp.h"
#endif

namespace moelens {
namespace {

using namespace moelens::panel;

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Where the packed K and V of one (prompt, KV head) live, and its rows' place in q/out.
struct Group {
  int64_t start;     // first token of the prompt in q/k/v/out
  int64_t len;       // L
  int64_t kv_head;   // h
  float* qp;         // [ceil(L·G / 16)][D][16]: its query rows, 16 per panel
  float* kp;         // [ceil(L / 6)][D][6]
  float* vp;         // [ceil(D / 6)][L][6]
};

// One work item: query rows [row0, row0 + 16) of a group (rows past L·G are padding).
struct Item {
  int64_t group;
  int64_t row0;
  int64_t keys;  // keys the item needs: its last position + 1
};

#if MOELENS_PANEL_X86  // the packers and the item kernel; the entry point checks the CPU
// The columns 0:D of rows t0..t0+n of x[t, h, :], transposed into micro-panels
// [ceil(D / 6)][n][6] (6 head dims each, dims past D zero).
void pack_dims(const float* x, int64_t t0, int64_t n, int64_t heads, int64_t h, int64_t dim,
               float* out) {
  for (int64_t dp = 0; dp < (dim + MR - 1) / MR; ++dp) {
    float* o = out + dp * n * MR;
    for (int64_t t = 0; t < n; ++t) {
      const float* src = x + ((t0 + t) * heads + h) * dim + dp * MR;
      for (int r = 0; r < MR; ++r) o[t * MR + r] = dp * MR + r < dim ? src[r] : 0.f;
    }
  }
}

// out[d * 16 + r] = rows[r][d0 + d] for r, d < 8: one 8 x 8 transpose (rows[r] null: zeros).
MOELENS_AVX2 void transpose8(const float* const* rows, int64_t d0, float* out) {
  __m256 r[8];
  for (int i = 0; i < 8; ++i)
    r[i] = rows[i] ? _mm256_loadu_ps(rows[i] + d0) : _mm256_setzero_ps();
  __m256 s[8];
  for (int i = 0; i < 8; i += 4) {  // rows i..i+3: s[i + j] holds dims j (low lane), j + 4 (high)
    const __m256 lo01 = _mm256_unpacklo_ps(r[i], r[i + 1]);
    const __m256 hi01 = _mm256_unpackhi_ps(r[i], r[i + 1]);
    const __m256 lo23 = _mm256_unpacklo_ps(r[i + 2], r[i + 3]);
    const __m256 hi23 = _mm256_unpackhi_ps(r[i + 2], r[i + 3]);
    s[i] = _mm256_shuffle_ps(lo01, lo23, _MM_SHUFFLE(1, 0, 1, 0));
    s[i + 1] = _mm256_shuffle_ps(lo01, lo23, _MM_SHUFFLE(3, 2, 3, 2));
    s[i + 2] = _mm256_shuffle_ps(hi01, hi23, _MM_SHUFFLE(1, 0, 1, 0));
    s[i + 3] = _mm256_shuffle_ps(hi01, hi23, _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int j = 0; j < 4; ++j) {
    _mm256_storeu_ps(out + j * NR, _mm256_permute2f128_ps(s[j], s[j + 4], 0x20));
    _mm256_storeu_ps(out + (j + 4) * NR, _mm256_permute2f128_ps(s[j], s[j + 4], 0x31));
  }
}

// The query rows of group g (position-major, G heads per position) as panels [D][16], rows past
// L·G zero; 8 x 8 transposes, the dims past a multiple of 8 one by one.
MOELENS_AVX2 void pack_queries(const float* q, const Group& g, int64_t hq,
                                      int64_t group_size, int64_t dim) {
  const int64_t rows = g.len * group_size;
  for (int64_t j = 0; j < (rows + NR - 1) / NR; ++j) {
    float* o = g.qp + j * dim * NR;
    const float* src[NR];
    for (int c = 0; c < NR; ++c) {
      const int64_t i = j * NR + c, head = g.kv_head * group_size + i % group_size;
      src[c] = i < rows ? q + ((g.start + i / group_size) * hq + head) * dim : nullptr;
    }
    int64_t d = 0;
    for (; d + 8 <= dim; d += 8) {
      transpose8(src, d, o + d * NR);
      transpose8(src + 8, d, o + d * NR + 8);
    }
    for (; d < dim; ++d)
      for (int c = 0; c < NR; ++c) o[d * NR + c] = src[c] ? src[c][d] : 0.f;
  }
}

// S^T[key, 0:16] = scale * tile row (the 16 query rows' scores for one key).
struct StoreScores {
  float* st;
  __m256 scale;
  MOELENS_AVX2 void operator()(const Tile& t) const {
    _mm256_storeu_ps(st + t.row * NR, _mm256_mul_ps(t.lo, scale));
    _mm256_storeu_ps(st + t.row * NR + 8, _mm256_mul_ps(t.hi, scale));
  }
};

// out[row c, dim t.row] = tile[c] / rowsum[c] for the item's valid query rows.
struct StoreOut {
  float* out;
  const int64_t* row_offset;  // [16] where query row c's output starts in out
  const float* inv_sum;       // [16]
  int rows;                   // valid query rows
  MOELENS_AVX2 void operator()(const Tile& t) const {
    alignas(32) float v[NR];
    _mm256_store_ps(v, _mm256_mul_ps(t.lo, _mm256_loadu_ps(inv_sum)));
    _mm256_store_ps(v + 8, _mm256_mul_ps(t.hi, _mm256_loadu_ps(inv_sum + 8)));
    if (rows == NR) {  // a constant trip count: unrolled, no compare per store
      for (int c = 0; c < NR; ++c) out[row_offset[c] + t.row] = v[c];
    } else {
      for (int c = 0; c < rows; ++c) out[row_offset[c] + t.row] = v[c];
    }
  }
};

// Softmax of each column c of st[keys][16] over keys 0..pos[c] (later keys become 0); the
// exponentials stay in st, 1 / their sum goes to inv_sum[c]. Padding columns have pos = -1.
MOELENS_AVX2 void softmax_columns(float* st, int64_t keys, const int32_t* pos, float* inv_sum) {
  const __m256 neg_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  for (int half = 0; half < 2; ++half) {
    float* s = st + half * 8;
    const __m256i last = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pos + half * 8));
    __m256 max = neg_inf;
    for (int64_t j = 0; j < keys; ++j) {
      const __m256 live = _mm256_castsi256_ps(
          _mm256_cmpgt_epi32(_mm256_set1_epi32(int32_t(j)), last));  // key j past the row
      max = _mm256_max_ps(max, _mm256_blendv_ps(_mm256_loadu_ps(s + j * NR), neg_inf, live));
    }
    // columns with no key at all (padding) keep max = -inf; use 0 so exp stays finite
    max = _mm256_blendv_ps(max, _mm256_setzero_ps(), _mm256_cmp_ps(max, neg_inf, _CMP_EQ_OQ));
    __m256 sum = _mm256_setzero_ps();
    for (int64_t j = 0; j < keys; ++j) {
      const __m256 past = _mm256_castsi256_ps(
          _mm256_cmpgt_epi32(_mm256_set1_epi32(int32_t(j)), last));
      const __m256 e = _mm256_andnot_ps(
          past, moelens::exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(s + j * NR), max)));
      _mm256_storeu_ps(s + j * NR, e);
      sum = _mm256_add_ps(sum, e);
    }
    _mm256_storeu_ps(inv_sum + half * 8, _mm256_div_ps(_mm256_set1_ps(1.f), sum));
  }
}

// Scratch of one thread: S^T and the item's per-row bookkeeping.
struct Scratch {
  std::vector<float> st;          // [keys rounded up to 6][16]
  alignas(32) int32_t pos[NR];    // position of each query row (-1: padding)
  alignas(32) float inv_sum[NR];
  int64_t row_offset[NR];
};

MOELENS_AVX2 void run_item(const Item& item, const Group& g, float* out, int64_t hq, int64_t dim,
                           int64_t group_size, float scale, Scratch& sc) {
  const int rows = int(std::min<int64_t>(NR, g.len * group_size - item.row0));
  for (int c = 0; c < NR; ++c) {
    const int64_t i = item.row0 + c, p = i / group_size;
    sc.pos[c] = c < rows ? int32_t(p) : -1;
    sc.row_offset[c] = ((g.start + p) * hq + g.kv_head * group_size + i % group_size) * dim;
  }
  // 1. S^T = K · Q^T over the keys the item needs, 6 keys per micro-kernel
  const float* qp = g.qp + item.row0 * dim;  // the item's panel [D][16]
  const StoreScores scores{sc.st.data(), _mm256_set1_ps(scale)};
  for (int64_t k0 = 0; k0 < item.keys; k0 += MR) {
    micro_kernel(g.kp + k0 * dim, qp, int(dim), scores,
                 Tile{{}, {}, k0, 0, 0, true, true}, MR, Prefetch{nullptr, 0});
  }
  // 2. column softmax
  softmax_columns(sc.st.data(), item.keys, sc.pos, sc.inv_sum);
  // 3. out^T = V^T · P^T, 6 head dims per micro-kernel
  const StoreOut store{out, sc.row_offset, sc.inv_sum, rows};
  for (int64_t d0 = 0; d0 < dim; d0 += MR) {
    micro_kernel(g.vp + d0 * g.len, sc.st.data(), int(item.keys), store,
                 Tile{{}, {}, d0, 0, 0, true, true}, int(std::min<int64_t>(MR, dim - d0)),
                 Prefetch{nullptr, 0});
  }
}
#endif

}  // namespace

torch::Tensor causal_attention(const torch::Tensor& q, const torch::Tensor& k,
                               const torch::Tensor& v, const torch::Tensor& seq_lens,
                               double scale, int64_t num_threads) {
  TORCH_CHECK_VALUE(cpu_supported(), "prefill attention needs a CPU with AVX2 and FMA");
  for (const auto* t : {&q, &k, &v}) {
    TORCH_CHECK_VALUE(t->scalar_type() == torch::kFloat32 && t->dim() == 3 && t->device().is_cpu(),
                      "prefill attention: q, k and v must be float32 [T, H, D] CPU tensors, got ",
                      t->scalar_type(), " ", t->sizes());
  }
  const int64_t T = q.size(0), hq = q.size(1), dim = q.size(2), hkv = k.size(1);
  TORCH_CHECK_VALUE(k.sizes() == v.sizes() && k.size(0) == T && k.size(2) == dim,
                    "prefill attention: k and v must be [T, Hkv, D] = [", T, ", Hkv, ", dim,
                    "], got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK_VALUE(hkv > 0 && hq % hkv == 0, "prefill attention: ", hq,
                    " query heads are not a multiple of ", hkv, " KV heads");
  TORCH_CHECK_VALUE(dim > 0, "prefill attention: head_dim must be > 0");
  TORCH_CHECK_VALUE(num_threads >= 1, "prefill attention: num_threads must be >= 1");
  TORCH_CHECK_VALUE(seq_lens.scalar_type() == torch::kInt64 && seq_lens.dim() == 1,
                    "prefill attention: seq_lens must be a 1-D int64 tensor");
  const auto lens_t = seq_lens.contiguous().cpu();
  const int64_t* lens = lens_t.data_ptr<int64_t>();
  const int64_t S = lens_t.numel();
  int64_t total = 0, longest = 0;
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK_VALUE(lens[s] > 0, "prefill attention: seq_lens[", s, "] = ", lens[s],
                      " must be > 0");
    total += lens[s];
    longest = std::max(longest, lens[s]);
  }
  TORCH_CHECK_VALUE(total == T, "prefill attention: seq_lens sum to ", total, ", q has ", T,
                    " tokens");
  auto out = torch::empty_like(q, torch::MemoryFormat::Contiguous);
  if (T == 0) return out;
  const auto qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  const int64_t group_size = hq / hkv, dim6 = round_up(dim, MR);
#if MOELENS_PANEL_X86
  pybind11::gil_scoped_release no_gil;
  // packed Q panels, K [ceil(L / 6)][D][6] and V^T [ceil(D / 6)][L][6] of every (prompt, KV
  // head), in one allocation
  std::vector<Group> groups;
  std::vector<int64_t> offsets;  // q, k, v of each group
  int64_t size = 0, start = 0;
  for (int64_t s = 0; s < S; start += lens[s], ++s) {
    for (int64_t h = 0; h < hkv; ++h) {
      groups.push_back(Group{start, lens[s], h, nullptr, nullptr, nullptr});
      for (const int64_t n : {round_up(lens[s] * group_size, NR) * dim,
                              round_up(lens[s], MR) * dim, dim6 * lens[s]}) {
        offsets.push_back(size);
        size += n;
      }
    }
  }
  std::unique_ptr<float[]> packed(new float[size_t(size)]);
  for (size_t i = 0; i < groups.size(); ++i) {
    groups[i].qp = packed.get() + offsets[3 * i];
    groups[i].kp = packed.get() + offsets[3 * i + 1];
    groups[i].vp = packed.get() + offsets[3 * i + 2];
  }
  // work items in the order of the file comment
  std::vector<int64_t> order(groups.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return groups[a].len > groups[b].len; });
  std::vector<Item> items;
  for (const int64_t gi : order) {
    const int64_t rows = groups[gi].len * group_size;
    for (int64_t r0 = (rows - 1) / NR * NR; r0 >= 0; r0 -= NR) {
      const int64_t end = std::min(rows, r0 + NR);  // the last row's position is (end - 1) / G
      items.push_back(Item{gi, r0, (end + group_size - 1) / group_size});
    }
  }
  const float* qd = qc.data_ptr<float>();
  const float *kd = kc.data_ptr<float>(), *vd = vc.data_ptr<float>();
  float* od = out.data_ptr<float>();
#pragma omp parallel num_threads(int(num_threads))
  {
#pragma omp for schedule(dynamic, 1)
    for (int64_t gi = 0; gi < int64_t(groups.size()); ++gi) {
      const Group& g = groups[gi];
      pack_queries(qd, g, hq, group_size, dim);
      const Rows keys{kd + g.kv_head * dim, hkv * dim, nullptr};  // K[t, h, :]
      for (int64_t k0 = 0; k0 < g.len; k0 += MR)
        pack_micro_panel(keys, g.start + k0, int(std::min<int64_t>(MR, g.len - k0)), 0, int(dim),
                         g.kp + k0 * dim);
      pack_dims(vd, g.start, g.len, hkv, g.kv_head, dim, g.vp);
    }
    Scratch sc;
    sc.st.resize(size_t(round_up(longest, MR) * NR));
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < int64_t(items.size()); ++i) {
      run_item(items[i], groups[items[i].group], od, hq, dim, group_size, float(scale), sc);
    }
  }
#endif
  return out;
}

}  // namespace moelens
