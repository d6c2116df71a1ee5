// The decode attention kernel body, written once against a vector type and compiled once per ISA:
// paged_attention.cpp includes this file several times, each time inside that ISA's
// `#pragma GCC target` region with ATTN_NS (namespace name) and ATTN_VEC (a vec.h struct) defined.
// It therefore has no include guard and includes nothing itself.
//
// Algorithm for one work item (a query row, a KV head, a token range): the group's G query heads
// share every K and V row. Blocks are taken in chunks of ~128 tokens; for a chunk, scores for all
// G heads are computed block by block (each K row read once), one online-softmax update rescales
// the running output, then V rows are accumulated (each V row read once). KV is thus streamed once,
// in one pass, converted to fp32 in registers.

namespace ATTN_NS {

using V = ATTN_VEC;
using R = typename V::R;
constexpr int W = V::W;

inline void prefetch_run(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 3);
}

// s[h, t] = q_h . k_t for NH heads x NT tokens: a K chunk is loaded once for all NH heads and a q
// chunk (L1-resident) once for all NT tokens; NH * NT accumulators stay in registers.
template <class Tag, int NH, int NT>
inline void qk_tile(const float* q, int dp, const typename Tag::type* k, int dim, float* s,
                    int ss) {
  R acc[NH][NT];
  for (int h = 0; h < NH; ++h)
    for (int t = 0; t < NT; ++t) acc[h][t] = V::zero();
  int d = 0;
  for (; d + W <= dim; d += W) {
    R kv[NT];
    for (int t = 0; t < NT; ++t) kv[t] = V::template load<Tag>(k + int64_t(t) * dim + d);
    for (int h = 0; h < NH; ++h) {
      R qv = V::template load<F32>(q + h * dp + d);
      for (int t = 0; t < NT; ++t) acc[h][t] = V::fma(qv, kv[t], acc[h][t]);
    }
  }
  if (d < dim) {  // head_dim tail: masked K loads; q's padding is zero
    R kv[NT];
    for (int t = 0; t < NT; ++t)
      kv[t] = V::template load_n<Tag>(k + int64_t(t) * dim + d, dim - d);
    for (int h = 0; h < NH; ++h) {
      R qv = V::template load<F32>(q + h * dp + d);
      for (int t = 0; t < NT; ++t) acc[h][t] = V::fma(qv, kv[t], acc[h][t]);
    }
  }
  for (int h = 0; h < NH; ++h)
    for (int t = 0; t < NT; ++t) s[h * ss + t] = V::hsum(acc[h][t]);
}

template <class Tag, int NH>
inline void qk_heads(const float* q, int dp, const typename Tag::type* k, int n, int dim,
                     float* s, int ss) {
  constexpr int NT = NH <= 2 ? 4 : 2;
  int t = 0;
  for (; t + NT <= n; t += NT) qk_tile<Tag, NH, NT>(q, dp, k + int64_t(t) * dim, dim, s + t, ss);
  for (; t < n; ++t) qk_tile<Tag, NH, 1>(q, dp, k + int64_t(t) * dim, dim, s + t, ss);
}

// Scores of `group` heads against the n rows of one (block, kv head) run.
template <class Tag>
void qk_block(const float* q, int group, int dp, const typename Tag::type* k, int n, int dim,
              float* s, int ss) {
  for (int h = 0; h < group; h += 4) {
    const float* qh = q + h * dp;
    float* sh = s + h * ss;
    switch (group - h) {
      case 1: qk_heads<Tag, 1>(qh, dp, k, n, dim, sh, ss); break;
      case 2: qk_heads<Tag, 2>(qh, dp, k, n, dim, sh, ss); break;
      case 3: qk_heads<Tag, 3>(qh, dp, k, n, dim, sh, ss); break;
      default: qk_heads<Tag, 4>(qh, dp, k, n, dim, sh, ss); break;
    }
  }
}

// acc[h, d0 : d0 + CT*W] += sum_t p[h, t] * v[t, same columns]. The accumulators live in registers
// across all n tokens; `kTail`: the single chunk is the head_dim tail with `tail` valid lanes.
template <class Tag, int NH, int CT, bool kTail>
inline void av_tile(const float* p, int ss, const typename Tag::type* v, int n, int dim,
                    float* acc, int dp, int d0, int tail) {
  R a[NH][CT];
  for (int h = 0; h < NH; ++h)
    for (int c = 0; c < CT; ++c) a[h][c] = V::template load<F32>(acc + h * dp + d0 + c * W);
  for (int t = 0; t < n; ++t) {
    const typename Tag::type* row = v + int64_t(t) * dim + d0;
    R vv[CT];
    for (int c = 0; c < CT; ++c)
      vv[c] = kTail ? V::template load_n<Tag>(row, tail) : V::template load<Tag>(row + c * W);
    for (int h = 0; h < NH; ++h) {
      R pb = V::set1(p[h * ss + t]);
      for (int c = 0; c < CT; ++c) a[h][c] = V::fma(pb, vv[c], a[h][c]);
    }
  }
  for (int h = 0; h < NH; ++h)
    for (int c = 0; c < CT; ++c) V::store(acc + h * dp + d0 + c * W, a[h][c]);
}

template <class Tag, int NH>
inline void av_heads(const float* p, int ss, const typename Tag::type* v, int n, int dim,
                     float* acc, int dp) {
  int d0 = 0;
  for (; d0 + 2 * W <= dim; d0 += 2 * W) av_tile<Tag, NH, 2, false>(p, ss, v, n, dim, acc, dp, d0, W);
  for (; d0 + W <= dim; d0 += W) av_tile<Tag, NH, 1, false>(p, ss, v, n, dim, acc, dp, d0, W);
  if (d0 < dim) av_tile<Tag, NH, 1, true>(p, ss, v, n, dim, acc, dp, d0, dim - d0);
}

template <class Tag>
void av_block(const float* p, int group, int ss, const typename Tag::type* v, int n, int dim,
              float* acc, int dp) {
  for (int h = 0; h < group; h += 4) {
    const float* ph = p + h * ss;
    float* ah = acc + h * dp;
    switch (group - h) {
      case 1: av_heads<Tag, 1>(ph, ss, v, n, dim, ah, dp); break;
      case 2: av_heads<Tag, 2>(ph, ss, v, n, dim, ah, dp); break;
      case 3: av_heads<Tag, 3>(ph, ss, v, n, dim, ah, dp); break;
      default: av_heads<Tag, 4>(ph, ss, v, n, dim, ah, dp); break;
    }
  }
}

// Online softmax over one chunk of n scores per head: turns scores into exp(s - m_new) in place,
// folds them into the running sum and rescales the running output when the max moved.
inline void softmax_update(Scratch& sc, int group, int n) {
  const int ss = sc.s_stride, dp = sc.dp;
  for (int h = 0; h < group; ++h) {
    float* s = sc.s.data() + h * ss;
    float mx = s[0];
    for (int t = 1; t < n; ++t) mx = s[t] > mx ? s[t] : mx;
    const float m_old = sc.m[h];
    const float m_new = mx > m_old ? mx : m_old;
    const R mv = V::set1(m_new);
    for (int t = 0; t < n; t += W) V::store(s + t, V::exp(V::sub(V::template load<F32>(s + t), mv)));
    float sum = 0.f;
    for (int t = 0; t < n; ++t) sum += s[t];
    const float alpha = std::exp(m_old - m_new);
    sc.l[h] = sc.l[h] * alpha + sum;
    if (alpha != 1.f) {
      const R av = V::set1(alpha);
      float* a = sc.acc.data() + h * dp;
      for (int d = 0; d < dp; d += W) V::store(a + d, V::mul(V::template load<F32>(a + d), av));
    }
    sc.m[h] = m_new;
  }
}

inline void start_item(const AttnArgs& a, const WorkItem& w, Scratch& sc) {
  const int G = a.group, D = a.head_dim;
  const float* q = a.q + (int64_t(w.row) * a.num_kv_heads + w.kv_head) * G * D;  // [G, D]
  for (int h = 0; h < G; ++h)
    for (int d = 0; d < D; ++d) sc.q[h * sc.dp + d] = q[h * D + d] * a.scale;
  for (float& x : sc.acc) x = 0.f;
  for (int h = 0; h < G; ++h) {
    sc.m[h] = -INFINITY;
    sc.l[h] = 0.f;
  }
}

inline void finish_item(const AttnArgs& a, const WorkItem& w, const Scratch& sc, float* out,
                        float* partials) {
  const int G = a.group, D = a.head_dim;
  if (w.part < 0) {
    float* o = out + (int64_t(w.row) * a.num_kv_heads + w.kv_head) * G * D;  // [G, D]
    for (int h = 0; h < G; ++h) {
      const float inv = 1.f / sc.l[h];
      for (int d = 0; d < D; ++d) o[h * D + d] = sc.acc[h * sc.dp + d] * inv;
    }
    return;
  }
  float* p = partials + w.part * partial_floats(G, D);
  for (int h = 0; h < G; ++h) {
    p[h] = sc.m[h];
    p[G + h] = sc.l[h];
    for (int d = 0; d < D; ++d) p[2 * G + h * D + d] = sc.acc[h * sc.dp + d];
  }
}

template <class Tag>
void run_item(const AttnArgs& a, const WorkItem& w, Scratch& sc, float* out, float* partials) {
  using T = typename Tag::type;
  const int G = a.group, D = a.head_dim, B = a.block_size;
  const int64_t run = int64_t(B) * D;                // one (block, kv head): [B, D]
  const int64_t block_stride = a.num_kv_heads * run;  // one block: [Hkv, B, D]
  const int32_t* table = a.block_tables + w.row * a.table_stride;
  const T* k_base = static_cast<const T*>(a.k_pool) + w.kv_head * run;
  const T* v_base = static_cast<const T*>(a.v_pool) + w.kv_head * run;
  auto k_run = [&](int b) { return k_base + table[b] * block_stride; };
  auto v_run = [&](int b) { return v_base + table[b] * block_stride; };
  auto tokens_in = [&](int b) { return (w.t1 - b * B) < B ? (w.t1 - b * B) : B; };
  auto bytes_of = [&](int b) { return int64_t(tokens_in(b)) * D * int64_t(sizeof(T)); };

  start_item(a, w, sc);
  const int first = w.t0 / B, last = (w.t1 + B - 1) / B;
  for (int cb = first; cb < last; cb += sc.blocks_per_chunk) {
    const int ce = cb + sc.blocks_per_chunk < last ? cb + sc.blocks_per_chunk : last;
    for (int b = cb; b < ce; ++b) {  // stream order: K of the chunk, then its V, then next chunk
      if (b + 1 < ce) prefetch_run(k_run(b + 1), bytes_of(b + 1));
      else prefetch_run(v_run(cb), bytes_of(cb));
      qk_block<Tag>(sc.q.data(), G, sc.dp, k_run(b), tokens_in(b), D,
                    sc.s.data() + (b - cb) * B, sc.s_stride);
    }
    softmax_update(sc, G, (ce - cb - 1) * B + tokens_in(ce - 1));
    for (int b = cb; b < ce; ++b) {
      if (b + 1 < ce) prefetch_run(v_run(b + 1), bytes_of(b + 1));
      else if (ce < last) prefetch_run(k_run(ce), bytes_of(ce));
      av_block<Tag>(sc.s.data() + (b - cb) * B, G, sc.s_stride, v_run(b), tokens_in(b), D,
                    sc.acc.data(), sc.dp);
    }
  }
  finish_item(a, w, sc, out, partials);
}

inline void run_item_any(const AttnArgs& a, const WorkItem& w, Scratch& sc, float* out,
                         float* partials) {
  switch (a.dtype) {
    case KvDtype::kF32: run_item<F32>(a, w, sc, out, partials); break;
    case KvDtype::kF16: run_item<F16>(a, w, sc, out, partials); break;
    case KvDtype::kBF16: run_item<BF16>(a, w, sc, out, partials); break;
  }
}

// Sum of n floats with four independent vector accumulators: the streaming-read reference.
inline float read_sum(const float* p, int64_t n) {
  R a0 = V::zero(), a1 = V::zero(), a2 = V::zero(), a3 = V::zero();
  int64_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W) {
    a0 = V::add(a0, V::template load<F32>(p + i));
    a1 = V::add(a1, V::template load<F32>(p + i + W));
    a2 = V::add(a2, V::template load<F32>(p + i + 2 * W));
    a3 = V::add(a3, V::template load<F32>(p + i + 3 * W));
  }
  float s = V::hsum(V::add(V::add(a0, a1), V::add(a2, a3)));
  for (; i < n; ++i) s += p[i];
  return s;
}

}  // namespace ATTN_NS
