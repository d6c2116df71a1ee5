// Paged decode attention over a host-memory KV pool, as a torch extension (kernel.py builds it).
//
// Layout: q [R, Hq, D] fp32; k_pool [N, Hkv, D, B] and v_pool [N, Hkv, B, D], fp32/fp16/bf16;
// each (block, kv head) is one contiguous run, K's transposed (tokens contiguous: they are the
// score vectors' lanes), V's by token (head_dim in the lanes of the output). The kernel body
// (attention_impl.h) is compiled three times: scalar, AVX2+FMA+F16C and AVX-512, each under its
// own target pragma; the caller picks the ISA at run time (kernel.py asks `supported_isas`), so
// the file is built without -march flags.
// Work is split into (row, token range) items scheduled dynamically over OpenMP threads; long
// contexts are split so that a batch of one still keeps every thread busy.
#include <torch/extension.h>

#include <omp.h>

#include <algorithm>
#include <string>
#include <vector>

#include "attention_types.h"
#include "openmp_team.h"
#include "vec.h"

namespace moelens {

#define ATTN_NS scalar
#define ATTN_VEC VecScalar
#include "attention_impl.h"
#undef ATTN_NS
#undef ATTN_VEC

#if MOELENS_X86_ISAS
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define ATTN_NS avx2
#define ATTN_VEC VecAvx2
#include "attention_impl.h"
#undef ATTN_NS
#undef ATTN_VEC
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#define ATTN_NS avx512
#define ATTN_VEC VecAvx512
#include "attention_impl.h"
#undef ATTN_NS
#undef ATTN_VEC
#pragma GCC pop_options
#endif

namespace {

enum Isa : int64_t { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

bool isa_supported(int64_t isa) {
#if MOELENS_X86_ISAS
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  if (isa == kAvx2) return avx2;
  if (isa == kAvx512)
    return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#endif
  return isa == kScalar;
}

int resolve_threads(int64_t num_threads) {
  return num_threads > 0 ? int(num_threads) : omp_get_max_threads();
}

KvDtype kv_dtype(const torch::Tensor& pool) {
  switch (pool.scalar_type()) {
    case torch::kFloat32: return KvDtype::kF32;
    case torch::kFloat16: return KvDtype::kF16;
    case torch::kBFloat16: return KvDtype::kBF16;
    default: TORCH_CHECK_VALUE(false, "KV pool dtype must be float32, float16 or bfloat16, got ",
                               pool.scalar_type());
  }
  return KvDtype::kF32;
}

void check_pools(const torch::Tensor& k_pool, const torch::Tensor& v_pool) {
  TORCH_CHECK_VALUE(k_pool.dim() == 4 && v_pool.dim() == 4, "k_pool must be [num_blocks, "
                    "num_kv_heads, head_dim, block_size] and v_pool [num_blocks, num_kv_heads, "
                    "block_size, head_dim], got ", k_pool.dim(), " and ", v_pool.dim(), " dims");
  TORCH_CHECK_VALUE(k_pool.size(0) == v_pool.size(0) && k_pool.size(1) == v_pool.size(1) &&
                        k_pool.size(2) == v_pool.size(3) && k_pool.size(3) == v_pool.size(2),
                    "k_pool ", k_pool.sizes(), " [N, Hkv, D, B] and v_pool ", v_pool.sizes(),
                    " [N, Hkv, B, D] do not describe the same blocks");
  TORCH_CHECK_VALUE(k_pool.scalar_type() == v_pool.scalar_type(), "k_pool dtype ",
                    k_pool.scalar_type(), " differs from v_pool dtype ", v_pool.scalar_type());
  TORCH_CHECK_VALUE(k_pool.is_contiguous() && v_pool.is_contiguous(),
                    "k_pool and v_pool must be contiguous");
  TORCH_CHECK_VALUE(k_pool.device().is_cpu(), "KV pools must be CPU tensors");
  kv_dtype(k_pool);
}

// Every block a row needs must be a real block of the pool; entries past them are never read.
void check_rows(const torch::Tensor& block_tables, const torch::Tensor& context_lens,
                int64_t num_blocks, int64_t block_size) {
  const int64_t rows = block_tables.size(0), width = block_tables.size(1);
  const int32_t* table = block_tables.data_ptr<int32_t>();
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK_VALUE(lens[r] > 0, "context_lens[", r, "] = ", lens[r], " must be positive");
    const int64_t needed = (lens[r] + block_size - 1) / block_size;
    TORCH_CHECK_VALUE(needed <= width, "row ", r, " has context_len ", lens[r], " needing ",
                      needed, " blocks of ", block_size, " but block_tables has only ", width,
                      " columns");
    for (int64_t b = 0; b < needed; ++b) {
      const int32_t blk = table[r * width + b];
      TORCH_CHECK_VALUE(blk >= 0 && blk < num_blocks, "block_tables[", r, ", ", b, "] = ", blk,
                        " is not a pool block (pool has ", num_blocks, " blocks); row ", r,
                        " needs ", needed, " blocks");
    }
  }
}

void check_attention_inputs(const torch::Tensor& q, const torch::Tensor& k_pool,
                            const torch::Tensor& v_pool, const torch::Tensor& block_tables,
                            const torch::Tensor& context_lens) {
  check_pools(k_pool, v_pool);
  TORCH_CHECK_VALUE(q.dim() == 3, "q must be [rows, num_heads, head_dim], got ", q.dim(), " dims");
  TORCH_CHECK_VALUE(q.scalar_type() == torch::kFloat32, "q must be float32, got ", q.scalar_type());
  TORCH_CHECK_VALUE(q.device().is_cpu(), "q must be a CPU tensor");
  TORCH_CHECK_VALUE(q.size(2) == v_pool.size(3), "q head_dim ", q.size(2),
                    " differs from the pool's head_dim ", v_pool.size(3));
  TORCH_CHECK_VALUE(q.size(1) % k_pool.size(1) == 0, "num_heads ", q.size(1),
                    " is not a multiple of num_kv_heads ", k_pool.size(1));
  TORCH_CHECK_VALUE(block_tables.dim() == 2 && block_tables.scalar_type() == torch::kInt32,
                    "block_tables must be [rows, max_blocks] int32, got ", block_tables.dim(),
                    " dims of ", block_tables.scalar_type());
  TORCH_CHECK_VALUE(context_lens.dim() == 1 && context_lens.scalar_type() == torch::kInt32,
                    "context_lens must be [rows] int32, got ", context_lens.dim(), " dims of ",
                    context_lens.scalar_type());
  TORCH_CHECK_VALUE(block_tables.size(0) == q.size(0) && context_lens.size(0) == q.size(0),
                    "q has ", q.size(0), " rows but block_tables has ", block_tables.size(0),
                    " and context_lens ", context_lens.size(0));
}

// Items of at most `split` tokens (a multiple of the block size), largest first so the dynamic
// schedule ends balanced. `split` is sized for ~4 items per thread but never below 128 tokens, so
// a large batch is not split at all while a single long sequence is spread over every thread.
std::vector<WorkItem> plan_items(const int32_t* lens, int64_t rows, int block_size,
                                 int num_threads, std::vector<SplitRow>& splits,
                                 int64_t& num_parts) {
  int64_t total = 0;
  for (int64_t r = 0; r < rows; ++r) total += lens[r];
  const int64_t target = std::max<int64_t>(128, (total + 4 * num_threads - 1) / (4 * num_threads));
  const int64_t split = (target + block_size - 1) / block_size * block_size;
  std::vector<WorkItem> items;
  num_parts = 0;
  for (int64_t r = 0; r < rows; ++r) {
    if (lens[r] <= split) {
      items.push_back({int32_t(r), 0, lens[r], -1});
      continue;
    }
    const int32_t first = int32_t(num_parts);
    for (int64_t t0 = 0; t0 < lens[r]; t0 += split)
      items.push_back({int32_t(r), int32_t(t0), int32_t(std::min<int64_t>(t0 + split, lens[r])),
                       int32_t(num_parts++)});
    splits.push_back({int32_t(r), first, int32_t(num_parts - first)});
  }
  std::stable_sort(items.begin(), items.end(), [](const WorkItem& x, const WorkItem& y) {
    return x.t1 - x.t0 > y.t1 - y.t0;
  });
  return items;
}

// Merges the parts of one split row: out = sum_p e^(m_p - M) acc_p / sum_p e^(m_p - M) l_p.
void combine_parts(const SplitRow& sp, const float* partials, int H, int D, float* out) {
  const int64_t stride = partial_floats(H, D);
  float* o = out + int64_t(sp.row) * H * D;  // [Hq, D]
  for (int h = 0; h < H; ++h) {
    float m = -INFINITY;
    for (int p = 0; p < sp.num_parts; ++p)
      m = std::max(m, partials[(sp.first_part + p) * stride + h]);
    float l = 0.f;
    for (int d = 0; d < D; ++d) o[h * D + d] = 0.f;
    for (int p = 0; p < sp.num_parts; ++p) {
      const float* part = partials + (sp.first_part + p) * stride;
      const float e = std::exp(part[h] - m);
      l += e * part[H + h];
      for (int d = 0; d < D; ++d) o[h * D + d] += e * part[2 * H + h * D + d];
    }
    for (int d = 0; d < D; ++d) o[h * D + d] /= l;
  }
}

using ItemFn = void (*)(const AttnArgs&, const WorkItem&, Scratch&, float*, float*);

ItemFn item_fn(int64_t isa) {
#if MOELENS_X86_ISAS
  if (isa == kAvx512) return avx512::run_item_any;
  if (isa == kAvx2) return avx2::run_item_any;
#endif
  return scalar::run_item_any;
}

}  // namespace

torch::Tensor paged_attention(const torch::Tensor& q_in, const torch::Tensor& k_pool,
                              const torch::Tensor& v_pool, const torch::Tensor& block_tables_in,
                              const torch::Tensor& context_lens_in, double scale,
                              int64_t num_threads, int64_t isa) {
  TORCH_CHECK_VALUE(isa_supported(isa), "ISA ", isa, " is not supported by this CPU");
  check_attention_inputs(q_in, k_pool, v_pool, block_tables_in, context_lens_in);
  const torch::Tensor q = q_in.contiguous();
  const torch::Tensor block_tables = block_tables_in.contiguous();
  const torch::Tensor context_lens = context_lens_in.contiguous();
  check_rows(block_tables, context_lens, v_pool.size(0), v_pool.size(2));

  AttnArgs a{q.data_ptr<float>(), k_pool.data_ptr(), v_pool.data_ptr(),
             block_tables.data_ptr<int32_t>(), block_tables.size(1), int(v_pool.size(1)),
             int(q.size(1) / v_pool.size(1)), int(v_pool.size(2)), int(v_pool.size(3)),
             float(scale), kv_dtype(v_pool)};
  torch::Tensor out = torch::empty_like(q);
  const int threads = resolve_threads(num_threads);
  const int num_heads = int(q.size(1));
  std::vector<SplitRow> splits;
  int64_t num_parts = 0;
  const std::vector<WorkItem> items = plan_items(context_lens.data_ptr<int32_t>(), q.size(0),
                                                 a.block_size, threads, splits, num_parts);
  std::vector<float> partials(size_t(num_parts * partial_floats(num_heads, a.head_dim)));
  float* o = out.data_ptr<float>();
  const ItemFn run = item_fn(isa);
  {
    pybind11::gil_scoped_release no_gil;
#pragma omp parallel num_threads(threads)
    {
      Scratch sc(num_heads, a.head_dim, a.block_size);
#pragma omp for schedule(dynamic, 1)
      for (int64_t i = 0; i < int64_t(items.size()); ++i) run(a, items[i], sc, o, partials.data());
#pragma omp for schedule(static)
      for (int64_t i = 0; i < int64_t(splits.size()); ++i)
        combine_parts(splits[i], partials.data(), num_heads, a.head_dim, o);
    }
  }
  return out;
}

// Copies token t's rows k[t], v[t] ([Hkv, D], already in the pool dtype, elements of type E) to
// slot s[t]: K transposed (kt[blk, h, d, off] = k[t, h, d]), V as it is.
template <class E>
void store_rows(const torch::Tensor& k, const torch::Tensor& v, torch::Tensor& k_pool,
                torch::Tensor& v_pool, const int64_t* s, int64_t num_tokens) {
  const int64_t num_kv_heads = v_pool.size(1), block_size = v_pool.size(2), dim = v_pool.size(3);
  const E* ks = static_cast<const E*>(k.data_ptr());
  const E* vs = static_cast<const E*>(v.data_ptr());
  E* kd = static_cast<E*>(k_pool.data_ptr());
  E* vd = static_cast<E*>(v_pool.data_ptr());
  for (int64_t t = 0; t < num_tokens; ++t) {
    const int64_t blk = s[t] / block_size, off = s[t] % block_size;
    for (int64_t h = 0; h < num_kv_heads; ++h) {
      const int64_t run = (blk * num_kv_heads + h) * block_size * dim;  // same for K and V
      const E* kr = ks + (t * num_kv_heads + h) * dim;
      std::memcpy(vd + run + off * dim, vs + (t * num_kv_heads + h) * dim, dim * sizeof(E));
      for (int64_t d = 0; d < dim; ++d) kd[run + d * block_size + off] = kr[d];
    }
  }
}

// K rows go in transposed (kt[blk, h, d, off] = k[t, h, d]), V rows as they are.
void store_kv(torch::Tensor& k_pool, torch::Tensor& v_pool, const torch::Tensor& k,
              const torch::Tensor& v, const torch::Tensor& slots_in) {
  check_pools(k_pool, v_pool);
  const int64_t num_kv_heads = v_pool.size(1), block_size = v_pool.size(2);
  const int64_t dim = v_pool.size(3), num_slots = v_pool.size(0) * block_size;
  TORCH_CHECK_VALUE(k.dim() == 3 && k.sizes() == v.sizes(), "k and v must both be [tokens, "
                    "num_kv_heads, head_dim], got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK_VALUE(k.size(1) == num_kv_heads && k.size(2) == dim, "k/v rows ", k.sizes(),
                    " do not match the pool's [num_kv_heads, head_dim] = [", num_kv_heads,
                    ", ", dim, "]");
  TORCH_CHECK_VALUE(slots_in.dim() == 1 && slots_in.scalar_type() == torch::kInt64 &&
                    slots_in.size(0) == k.size(0), "slots must be [tokens] int64 with ",
                    k.size(0), " entries, got ", slots_in.sizes(), " ", slots_in.scalar_type());
  const torch::Tensor slots = slots_in.contiguous();
  const int64_t* s = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < slots.size(0); ++t)  // all checked before any write
    TORCH_CHECK_VALUE(s[t] >= 0 && s[t] < num_slots, "slots[", t, "] = ", s[t],
                      " is outside the pool's ", num_slots, " slots");
  const torch::Tensor kc = k.to(k_pool.scalar_type()).contiguous();  // [T, Hkv, D]
  const torch::Tensor vc = v.to(v_pool.scalar_type()).contiguous();
  if (k_pool.element_size() == 4)
    store_rows<uint32_t>(kc, vc, k_pool, v_pool, s, slots.size(0));
  else
    store_rows<uint16_t>(kc, vc, k_pool, v_pool, s, slots.size(0));
}

// Best-of-`reps` streaming read bandwidth in GB/s over a freshly allocated buffer of `num_bytes`,
// each thread summing its own contiguous slice (first touched by that same thread).
double stream_read_gbps(int64_t num_bytes, int64_t num_threads, int64_t reps, int64_t isa) {
  TORCH_CHECK_VALUE(isa_supported(isa), "ISA ", isa, " is not supported by this CPU");
  TORCH_CHECK_VALUE(num_bytes >= (1 << 20) && reps >= 1, "need num_bytes >= 1 MiB and reps >= 1");
  const int threads = resolve_threads(num_threads);
  const int64_t per_thread = num_bytes / 4 / threads / 64 * 64;
  torch::Tensor buf = torch::empty({per_thread * threads}, torch::kFloat32);
  float* p = buf.data_ptr<float>();
  using SumFn = float (*)(const float*, int64_t);
  SumFn sum = scalar::read_sum;
#if MOELENS_X86_ISAS
  if (isa == kAvx2) sum = avx2::read_sum;
  if (isa == kAvx512) sum = avx512::read_sum;
#endif
  double best = 1e30;
  float sink = 0.f;
  pybind11::gil_scoped_release no_gil;
#pragma omp parallel num_threads(threads)
  std::fill_n(p + omp_get_thread_num() * per_thread, per_thread, 1.f);
  for (int64_t rep = 0; rep < reps; ++rep) {
    const double t0 = omp_get_wtime();
#pragma omp parallel num_threads(threads) reduction(+ : sink)
    sink += sum(p + omp_get_thread_num() * per_thread, per_thread);
    best = std::min(best, omp_get_wtime() - t0);
  }
  TORCH_CHECK(sink > 0.f, "stream read produced no sum");  // keeps the reads observable
  return double(per_thread * threads * 4) / best / 1e9;
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> names;
  if (isa_supported(kAvx512)) names.push_back("avx512");
  if (isa_supported(kAvx2)) names.push_back("avx2");
  names.push_back("scalar");
  return names;
}

}  // namespace moelens

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_attention", &moelens::paged_attention, "Paged decode attention (see kernel.py)");
  m.def("store_kv", &moelens::store_kv, "Write K/V rows at their slots (see kernel.py)");
  m.def("stream_read_gbps", &moelens::stream_read_gbps, "Streaming read bandwidth in GB/s");
  m.def("supported_isas", &moelens::supported_isas, "ISAs this CPU runs, best first");
  m.def("pin_openmp_team", &moelens::pin_openmp_team, "thread t of the OpenMP team to cpus[t]");
}
