// The decode attention kernel body, written once against a vector type and compiled once per ISA:
// paged_attention.cpp includes this file several times, each time inside that ISA's
// `#pragma GCC target` region with ATTN_NS (namespace name) and ATTN_VEC (a vec.h struct) defined.
// It therefore has no include guard and includes nothing itself.
//
// Algorithm for one work item (a query row, a token range, all KV heads): the G query heads of a
// KV head share each of its K and V rows. Blocks are taken in chunks of ~128 tokens; for a chunk,
// scores of every head are computed block by block, one online-softmax update rescales the
// running outputs, then V rows are accumulated. KV is thus streamed once, in one pass, converted
// to fp32 in registers. K runs are stored transposed ([D][B], tokens contiguous), so a score
// vector holds W tokens of one head: s[h, t:t+W] = sum_d q[h, d] * kt[d, t:t+W], one K vector
// load and one broadcast per FMA, no horizontal sums, any group size; V runs stay [B][D] and
// are accumulated with head_dim in the lanes.

namespace ATTN_NS {

using V = ATTN_VEC;
using R = typename V::R;
constexpr int W = V::W;

// Software prefetch of the next run in stream order, a line or two per inner-loop step of the
// current run (first head tile only): a burst of a whole run stalls the core until it lands,
// serialising memory and compute; spread out, the next run streams in while this one is
// computed on (~10% more bandwidth than per-tile bursts, measured with random block tables).
struct Prefetch {
  const char* p;
  int64_t left;
  int64_t per_step;

  Prefetch(const void* run, int64_t bytes, int steps)
      : p(static_cast<const char*>(run)), left(bytes),
        per_step((bytes / (steps > 0 ? steps : 1) + 63) / 64 * 64) {}
  void step() {
    const int64_t n = left < per_step ? left : per_step;
    for (int64_t off = 0; off < n; off += 64) __builtin_prefetch(p + off, 0, 2);
    p += n;
    left -= n;
  }
  void finish() {
    per_step = left;
    step();
  }
};

constexpr int kDimsPerStep = 8;  // head dims per prefetch step of a score tile

// s[h, t0 : t0 + W] for NH heads from one transposed K run kt[D][B] (tokens t0.., `tokens` of
// them real, kFull: all W; otherwise the rest of the vector is zero). S interleaved partial sums
// over d keep at least 8 FMA chains in flight however few heads there are (an FMA's latency is
// 4 cycles, two issue per cycle); q [NH][dp] is broadcast from L1, one element per FMA. The
// prefetcher steps once per kDimsPerStep dims (per d its bookkeeping cost as much as the FMAs).
template <class Tag, int NH, bool kFull>
inline void qk_tile(const float* q, int dp, const typename Tag::type* kt, int B, int D,
                    int tokens, float* s, int ss, Prefetch* pf) {
  constexpr int S = NH >= 8 ? 1 : 8 / NH;
  static_assert(kDimsPerStep % S == 0, "a prefetch step covers whole rounds of partial sums");
  R acc[S][NH];
  for (int j = 0; j < S; ++j)
    for (int h = 0; h < NH; ++h) acc[j][h] = V::zero();
  auto fma_row = [&](int d, int j) {
    const typename Tag::type* k = kt + int64_t(d) * B;
    const R kv = kFull ? V::template load<Tag>(k) : V::template load_n<Tag>(k, tokens);
    for (int h = 0; h < NH; ++h) acc[j][h] = V::fma(V::set1(q[h * dp + d]), kv, acc[j][h]);
  };
  int d = 0;
  for (; d + kDimsPerStep <= D; d += kDimsPerStep) {
    if (pf) pf->step();
    for (int u = 0; u < kDimsPerStep; u += S)
      for (int j = 0; j < S; ++j) fma_row(d + u + j, j);
  }
  for (; d < D; ++d) fma_row(d, 0);  // head_dim not a multiple of kDimsPerStep
  for (int h = 0; h < NH; ++h) {
    R sum = acc[0][h];
    for (int j = 1; j < S; ++j) sum = V::add(sum, acc[j][h]);
    V::store(s + h * ss, sum);  // a whole vector: rows of s have W floats of slack
  }
}

template <class Tag, bool kFull>
inline void qk_heads(const float* q, int nh, int dp, const typename Tag::type* kt, int B, int D,
                     int tokens, float* s, int ss, Prefetch* pf) {
  switch (nh) {
    case 1: qk_tile<Tag, 1, kFull>(q, dp, kt, B, D, tokens, s, ss, pf); break;
    case 2: qk_tile<Tag, 2, kFull>(q, dp, kt, B, D, tokens, s, ss, pf); break;
    case 3: qk_tile<Tag, 3, kFull>(q, dp, kt, B, D, tokens, s, ss, pf); break;
    case 4: qk_tile<Tag, 4, kFull>(q, dp, kt, B, D, tokens, s, ss, pf); break;
    case 5: qk_tile<Tag, 5, kFull>(q, dp, kt, B, D, tokens, s, ss, pf); break;
    case 6: qk_tile<Tag, 6, kFull>(q, dp, kt, B, D, tokens, s, ss, pf); break;
    case 7: qk_tile<Tag, 7, kFull>(q, dp, kt, B, D, tokens, s, ss, pf); break;
    default: qk_tile<Tag, 8, kFull>(q, dp, kt, B, D, tokens, s, ss, pf); break;
  }
}

constexpr int kTileHeads = 8;  // heads per score tile: 8 accumulators, plus K and a broadcast

// Scores s[h][0 : B] of `group` heads against one (block, kv head) run kt[D][B], prefetching
// `next`. Token positions past the run's real ones get scores too (from whatever the block
// holds there); the softmax overwrites them with -inf.
template <class Tag>
void qk_block(const float* q, int group, int dp, const typename Tag::type* kt, int B, int D,
              float* s, int ss, const void* next, int64_t next_bytes) {
  Prefetch pf(next, next_bytes, D / kDimsPerStep);
  for (int h = 0; h < group; h += kTileHeads) {
    const int nh = group - h < kTileHeads ? group - h : kTileHeads;
    for (int t0 = 0; t0 < B; t0 += W) {
      Prefetch* p = h == 0 && t0 == 0 ? &pf : nullptr;
      const typename Tag::type* k = kt + t0;
      float* st = s + h * ss + t0;
      if (B - t0 >= W) qk_heads<Tag, true>(q + h * dp, nh, dp, k, B, D, W, st, ss, p);
      else qk_heads<Tag, false>(q + h * dp, nh, dp, k, B, D, B - t0, st, ss, p);
    }
  }
  pf.finish();
}

// Probabilities of one run: p(h, t) at p[h * ss + t].
struct Probs {
  const float* p;
  int ss;
  float at(int h, int t) const { return p[h * ss + t]; }
  Probs heads_from(int h) const { return {p + h * ss, ss}; }
};

constexpr int kTokensPerStep = 4;  // V rows per prefetch step of an output tile

// acc[h, d0 : d0 + CT*W] += sum_t p(h, t) * v[t, same columns]. The accumulators live in
// registers across all n tokens; `kTail`: the single chunk is the head_dim tail with `tail` valid
// lanes. The prefetcher steps once per kTokensPerStep tokens.
template <class Tag, int NH, int CT, bool kTail>
inline void av_tile(Probs p, const typename Tag::type* v, int n, int dim, float* acc, int dp,
                    int d0, int tail, Prefetch* pf) {
  R a[NH][CT];
  for (int h = 0; h < NH; ++h)
    for (int c = 0; c < CT; ++c) a[h][c] = V::template load<F32>(acc + h * dp + d0 + c * W);
  for (int t = 0; t < n; ++t) {
    if (pf && t % kTokensPerStep == 0) pf->step();
    const typename Tag::type* row = v + int64_t(t) * dim + d0;
    R vv[CT];
    for (int c = 0; c < CT; ++c)
      vv[c] = kTail ? V::template load_n<Tag>(row, tail) : V::template load<Tag>(row + c * W);
    for (int h = 0; h < NH; ++h) {
      R pb = V::set1(p.at(h, t));
      for (int c = 0; c < CT; ++c) a[h][c] = V::fma(pb, vv[c], a[h][c]);
    }
  }
  for (int h = 0; h < NH; ++h)
    for (int c = 0; c < CT; ++c) V::store(acc + h * dp + d0 + c * W, a[h][c]);
}

template <class Tag, int NH>
inline void av_heads(Probs p, const typename Tag::type* v, int n, int dim, float* acc, int dp,
                     Prefetch* pf) {
  int d0 = 0;
  for (; d0 + 2 * W <= dim; d0 += 2 * W)
    av_tile<Tag, NH, 2, false>(p, v, n, dim, acc, dp, d0, W, pf);
  for (; d0 + W <= dim; d0 += W)
    av_tile<Tag, NH, 1, false>(p, v, n, dim, acc, dp, d0, W, nullptr);
  if (d0 < dim) av_tile<Tag, NH, 1, true>(p, v, n, dim, acc, dp, d0, dim - d0, nullptr);
}

template <class Tag>
void av_block(Probs p, int group, const typename Tag::type* v, int n, int dim, float* acc,
              int dp, const void* next, int64_t next_bytes) {
  Prefetch pf(next, next_bytes, dim / (2 * W) * ((n + kTokensPerStep - 1) / kTokensPerStep));
  for (int h = 0, nh; h < group; h += nh) {
    const int left = group - h;
    nh = left >= 8 ? 8 : left >= 4 ? 4 : left;
    const Probs ph = p.heads_from(h);
    float* ah = acc + h * dp;
    Prefetch* f = h == 0 ? &pf : nullptr;
    switch (nh) {
      case 1: av_heads<Tag, 1>(ph, v, n, dim, ah, dp, f); break;
      case 2: av_heads<Tag, 2>(ph, v, n, dim, ah, dp, f); break;
      case 3: av_heads<Tag, 3>(ph, v, n, dim, ah, dp, f); break;
      case 4: av_heads<Tag, 4>(ph, v, n, dim, ah, dp, f); break;
      default: av_heads<Tag, 8>(ph, v, n, dim, ah, dp, f); break;
    }
  }
  pf.finish();
}

// acc[0:dp] *= alpha: a running output whose max moved (nothing to do when it did not).
inline void rescale(float* acc, int dp, float alpha) {
  if (alpha == 1.f) return;
  const R av = V::set1(alpha);
  for (int d = 0; d < dp; d += W) V::store(acc + d, V::mul(V::template load<F32>(acc + d), av));
}

// Online softmax over one chunk of n scores per head: turns scores into exp(s - m_new) in place,
// folds them into the running sum and rescales the running output when the max moved. The row
// is padded to whole vectors with -inf, whose exp is 0, so every loop runs on full vectors.
inline void softmax_update(Scratch& sc, int num_heads, int n) {
  const int ss = sc.s_stride, dp = sc.dp, padded = (n + W - 1) / W * W;
  for (int h = 0; h < num_heads; ++h) {
    float* s = sc.s.data() + h * ss;
    for (int t = n; t < padded; ++t) s[t] = -INFINITY;
    R mx = V::template load<F32>(s);
    for (int t = W; t < padded; t += W) mx = V::max(mx, V::template load<F32>(s + t));
    const float m_old = sc.m[h], m_chunk = V::hmax(mx);
    const float m_new = m_chunk > m_old ? m_chunk : m_old;
    const R mv = V::set1(m_new);
    R sum = V::zero();
    for (int t = 0; t < padded; t += W) {
      const R p = V::exp(V::sub(V::template load<F32>(s + t), mv));
      V::store(s + t, p);
      sum = V::add(sum, p);
    }
    const float alpha = std::exp(m_old - m_new);
    sc.l[h] = sc.l[h] * alpha + V::hsum(sum);
    rescale(sc.acc.data() + h * dp, dp, alpha);
    sc.m[h] = m_new;
  }
}

// The item's q times scale into sc.q [Hq, dp], and empty running results.
inline void start_item(const AttnArgs& a, const WorkItem& w, Scratch& sc) {
  const int H = a.num_kv_heads * a.group, D = a.head_dim;
  const float* q = a.q + int64_t(w.row) * H * D;  // [Hq, D]
  for (int h = 0; h < H; ++h)
    for (int d = 0; d < D; ++d) sc.q[h * sc.dp + d] = q[h * D + d] * a.scale;
  for (float& x : sc.acc) x = 0.f;
  for (int h = 0; h < H; ++h) {
    sc.m[h] = -INFINITY;
    sc.l[h] = 0.f;
  }
}

inline void finish_item(const AttnArgs& a, const WorkItem& w, const Scratch& sc, float* out,
                        float* partials) {
  const int H = a.num_kv_heads * a.group, D = a.head_dim;
  if (w.part < 0) {
    float* o = out + int64_t(w.row) * H * D;  // [Hq, D]
    for (int h = 0; h < H; ++h) {
      const float inv = 1.f / sc.l[h];
      for (int d = 0; d < D; ++d) o[h * D + d] = sc.acc[h * sc.dp + d] * inv;
    }
    return;
  }
  float* p = partials + w.part * partial_floats(H, D);
  for (int h = 0; h < H; ++h) {
    p[h] = sc.m[h];
    p[H + h] = sc.l[h];
    for (int d = 0; d < D; ++d) p[2 * H + h * D + d] = sc.acc[h * sc.dp + d];
  }
}

// The order in which one work item streams its blocks: for each chunk of blocks, their K, then
// their V. `ahead` names the block `dist` steps further along, for prefetching.
struct StreamOrder {
  int first, last, per_chunk;

  struct Pos {
    bool is_v;
    int block;  // -1: past the end
  };
  Pos ahead(bool is_v, int b, int dist) const {
    int cb = first + (b - first) / per_chunk * per_chunk;
    int len = cb + per_chunk < last ? per_chunk : last - cb;
    int idx = (is_v ? len : 0) + (b - cb) + dist;
    while (idx >= 2 * len) {
      idx -= 2 * len;
      cb += len;
      if (cb >= last) return {false, -1};
      len = cb + per_chunk < last ? per_chunk : last - cb;
    }
    return {idx >= len, cb + idx % len};
  }
};

// One work item: all KV heads of one row over tokens [t0, t1). Blocks are visited in order and,
// within a block, heads in order, so each block's [Hkv, D, B] K (then [Hkv, B, D] V) is read as
// one contiguous stretch; runs kPrefetchBlocks ahead in stream order are prefetched meanwhile.
template <class Tag>
void run_item(const AttnArgs& a, const WorkItem& w, Scratch& sc, float* out, float* partials) {
  using T = typename Tag::type;
  constexpr int kPrefetchBlocks = 1;  // further ahead measured no better here
  const int G = a.group, D = a.head_dim, B = a.block_size, Hkv = a.num_kv_heads;
  const int64_t run = int64_t(B) * D;  // one (block, kv head): K [D, B], V [B, D]
  const int32_t* table = a.block_tables + w.row * a.table_stride;
  const T* k_pool = static_cast<const T*>(a.k_pool);
  const T* v_pool = static_cast<const T*>(a.v_pool);
  auto at = [&](const T* pool, int b, int h) { return pool + (table[b] * int64_t(Hkv) + h) * run; };
  auto tokens_in = [&](int b) { return (w.t1 - b * B) < B ? (w.t1 - b * B) : B; };
  const int ss = sc.s_stride, dp = sc.dp;
  const int first = w.t0 / B, last = (w.t1 + B - 1) / B;
  const StreamOrder order{first, last, sc.blocks_per_chunk};
  auto next_run = [&](bool is_v, int b, int h) -> const T* {
    const StreamOrder::Pos p = order.ahead(is_v, b, kPrefetchBlocks);
    return p.block < 0 ? nullptr : at(p.is_v ? v_pool : k_pool, p.block, h);
  };
  auto next_bytes = [&](bool is_v, int b) -> int64_t {
    const StreamOrder::Pos p = order.ahead(is_v, b, kPrefetchBlocks);
    if (p.block < 0) return 0;
    // a K run is read whole (its tokens are the rows' lanes), a V run only up to its last token
    return (p.is_v ? int64_t(tokens_in(p.block)) * D : run) * int64_t(sizeof(T));
  };

  start_item(a, w, sc);
  // Scores of kv head h, block b of the chunk: rows of ss floats by head.
  auto scores = [&](int h, int b, int cb) {
    return sc.s.data() + int64_t(h) * G * ss + (b - cb) * B;
  };
  for (int cb = first; cb < last; cb += sc.blocks_per_chunk) {
    const int ce = cb + sc.blocks_per_chunk < last ? cb + sc.blocks_per_chunk : last;
    for (int b = cb; b < ce; ++b)
      for (int h = 0; h < Hkv; ++h)
        qk_block<Tag>(sc.q.data() + h * G * dp, G, dp, at(k_pool, b, h), B, D, scores(h, b, cb),
                      ss, next_run(false, b, h), next_bytes(false, b));
    const int n = (ce - cb - 1) * B + tokens_in(ce - 1);
    softmax_update(sc, Hkv * G, n);
    for (int b = cb; b < ce; ++b)
      for (int h = 0; h < Hkv; ++h)
        av_block<Tag>(Probs{scores(h, b, cb), ss}, G, at(v_pool, b, h), tokens_in(b), D,
                      sc.acc.data() + h * G * dp, dp, next_run(true, b, h), next_bytes(true, b));
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
