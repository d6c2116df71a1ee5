// The decode attention kernel body, written once against a vector type and compiled once per ISA:
// paged_attention.cpp includes this file several times, each time inside that ISA's
// `#pragma GCC target` region with ATTN_NS (namespace name) and ATTN_VEC (a vec.h struct) defined.
// It therefore has no include guard and includes nothing itself.
//
// Algorithm for one work item (a query row, a token range, all KV heads): the G query heads of a
// KV head share each of its K and V rows. Blocks are taken in chunks of ~128 tokens; for a chunk,
// scores of every head are computed block by block (each K row read once, for its G heads), one
// online-softmax update rescales the running outputs, then V rows are accumulated (each read
// once). KV is thus streamed once, in one pass, converted to fp32 in registers. With fp32 KV and
// a group that fills the vector lanes (GQA 8 on AVX2) the scores are computed with heads in lanes
// instead (qk_lanes).

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
    for (int64_t off = 0; off < n; off += 64) __builtin_prefetch(p + off, 0, 3);
    p += n;
    left -= n;
  }
  void finish() {
    per_step = left;
    step();
  }
};

// Keeps a loaded vector in a register: without it GCC folds the load into each FMA that uses
// it, one load per token of the tile instead of one.
template <class T>
inline void pin(T& x) {
#if defined(__GNUC__) && MOELENS_X86_ISAS
  asm("" : "+x"(x));
#endif
}

// Tokens per score tile for nh heads: 8 accumulators where possible (one hsum8 tree).
constexpr int token_tile(int nh) { return nh == 1 ? 8 : nh == 2 ? 4 : 2; }

// s[h, t] = q_h . k_t for NH heads x NT tokens: a K chunk is loaded once for all NH heads and a q
// chunk (L1-resident) once for all NT tokens; NH * NT accumulators stay in registers.
template <class Tag, int NH, int NT>
inline void qk_tile(const float* q, int dp, const typename Tag::type* k, int dim, float* s,
                    int ss, Prefetch* pf) {
  R acc[NH][NT];
  for (int h = 0; h < NH; ++h)
    for (int t = 0; t < NT; ++t) acc[h][t] = V::zero();
  int d = 0;
  for (; d + W <= dim; d += W) {
    if (pf) pf->step();
    R kv[NT];
    for (int t = 0; t < NT; ++t) kv[t] = V::template load<Tag>(k + int64_t(t) * dim + d);
    for (int h = 0; h < NH; ++h) {
      R qv = V::template load<F32>(q + h * dp + d);
      if constexpr (NT > 1) pin(qv);
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
  if constexpr (NH * NT == 8) {
    float sums[8];
    V::hsum8(&acc[0][0], sums);
    for (int h = 0; h < NH; ++h)
      for (int t = 0; t < NT; ++t) s[h * ss + t] = sums[h * NT + t];
  } else {
    for (int h = 0; h < NH; ++h)
      for (int t = 0; t < NT; ++t) s[h * ss + t] = V::hsum(acc[h][t]);
  }
}

template <class Tag, int NH>
inline void qk_heads(const float* q, int dp, const typename Tag::type* k, int n, int dim,
                     float* s, int ss, Prefetch* pf) {
  constexpr int NT = token_tile(NH);
  int t = 0;
  for (; t + NT <= n; t += NT)
    qk_tile<Tag, NH, NT>(q, dp, k + int64_t(t) * dim, dim, s + t, ss, pf);
  for (; t < n; ++t) qk_tile<Tag, NH, 1>(q, dp, k + int64_t(t) * dim, dim, s + t, ss, nullptr);
}

// Scores of `group` heads against the n rows of one (block, kv head) run, prefetching `next`.
template <class Tag>
void qk_block(const float* q, int group, int dp, const typename Tag::type* k, int n, int dim,
              float* s, int ss, const void* next, int64_t next_bytes) {
  Prefetch pf(next, next_bytes, n / token_tile(group < 4 ? group : 4) * (dim / W));
  for (int h = 0; h < group; h += 4) {
    const float* qh = q + h * dp;
    float* sh = s + h * ss;
    Prefetch* p = h == 0 ? &pf : nullptr;
    switch (group - h) {
      case 1: qk_heads<Tag, 1>(qh, dp, k, n, dim, sh, ss, p); break;
      case 2: qk_heads<Tag, 2>(qh, dp, k, n, dim, sh, ss, p); break;
      case 3: qk_heads<Tag, 3>(qh, dp, k, n, dim, sh, ss, p); break;
      default: qk_heads<Tag, 4>(qh, dp, k, n, dim, sh, ss, p); break;
    }
  }
  pf.finish();
}

// Probabilities of one run: p(h, t) at p[h * head_stride + t * token_stride] ([head][token] on
// the default path, [token][head] with heads in lanes).
struct Probs {
  const float* p;
  int head_stride;
  int token_stride;
  float at(int h, int t) const { return p[h * head_stride + t * token_stride]; }
  Probs heads_from(int h) const { return {p + h * head_stride, head_stride, token_stride}; }
};

// acc[h, d0 : d0 + CT*W] += sum_t p(h, t) * v[t, same columns]. The accumulators live in
// registers across all n tokens; `kTail`: the single chunk is the head_dim tail with `tail` valid
// lanes.
template <class Tag, int NH, int CT, bool kTail>
inline void av_tile(Probs p, const typename Tag::type* v, int n, int dim, float* acc, int dp,
                    int d0, int tail, Prefetch* pf) {
  R a[NH][CT];
  for (int h = 0; h < NH; ++h)
    for (int c = 0; c < CT; ++c) a[h][c] = V::template load<F32>(acc + h * dp + d0 + c * W);
  for (int t = 0; t < n; ++t) {
    if (pf) pf->step();
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
  Prefetch pf(next, next_bytes, dim / (2 * W) * n);
  for (int h = 0; h < group; h += 4) {
    const Probs ph = p.heads_from(h);
    float* ah = acc + h * dp;
    Prefetch* f = h == 0 ? &pf : nullptr;
    switch (group - h) {
      case 1: av_heads<Tag, 1>(ph, v, n, dim, ah, dp, f); break;
      case 2: av_heads<Tag, 2>(ph, v, n, dim, ah, dp, f); break;
      case 3: av_heads<Tag, 3>(ph, v, n, dim, ah, dp, f); break;
      default: av_heads<Tag, 4>(ph, v, n, dim, ah, dp, f); break;
    }
  }
  pf.finish();
}

// Heads in lanes, for fp32 KV and groups of a multiple of W query heads per KV head (GQA 8 on
// AVX2): the scores of W heads for one token are one vector, s[t, g] = sum_d k[t, d] * qt[d, g],
// each K element broadcast against q transposed to [D, G] (L1-resident). Unlike the head x token
// tiles above there is no horizontal sum, each K row is read once per W heads, and the softmax
// runs with heads in lanes as well. (16-bit KV keeps the tiles: widening each run into an fp32
// buffer first measured 20% slower than converting in registers.)
template <class Tag>
inline bool heads_in_lanes(int group) {
  return std::is_same_v<Tag, F32> && W >= 8 && group % W == 0;
}

constexpr int kLaneTokens = 8;  // tokens per register tile: 8 accumulators

// DIM > 0: head_dim known at compile time, so the NT row offsets are immediates (with a run-time
// dim GCC keeps them on the stack and reloads one per broadcast: a third of the loop's time).
template <int NT, int DIM>
inline void qk_lanes_tile(const float* qt, int G, const float* k, int dim_rt, float* s,
                          Prefetch* pf) {
  const int dim = DIM > 0 ? DIM : dim_rt;
  R acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = V::zero();
  for (int d0 = 0; d0 < dim; d0 += W) {
    if (pf) pf->step();
    const int d1 = d0 + W < dim ? d0 + W : dim;
    for (int d = d0; d < d1; ++d) {
      R qv = V::template load<F32>(qt + int64_t(d) * G);
      pin(qv);
      for (int t = 0; t < NT; ++t) acc[t] = V::fma(V::set1(k[t * dim + d]), qv, acc[t]);
    }
  }
  for (int t = 0; t < NT; ++t) V::store(s + int64_t(t) * G, acc[t]);
}

template <int DIM>
inline void qk_lanes_run(const float* qt, int G, const float* k, int n, int dim, float* s,
                         Prefetch& pf) {
  for (int j = 0; j < G; j += W) {
    Prefetch* p = j == 0 ? &pf : nullptr;
    int t = 0;
    for (; t + kLaneTokens <= n; t += kLaneTokens)
      qk_lanes_tile<kLaneTokens, DIM>(qt + j, G, k + int64_t(t) * dim, dim,
                                      s + int64_t(t) * G + j, p);
    for (; t < n; ++t)
      qk_lanes_tile<1, DIM>(qt + j, G, k + int64_t(t) * dim, dim, s + int64_t(t) * G + j, p);
  }
}

// Scores s[n, G] of one fp32 (block, kv head) run k[n, dim], prefetching `next`.
inline void qk_lanes(const float* qt, int G, const float* k, int n, int dim, float* s,
                     const void* next, int64_t next_bytes) {
  Prefetch pf(next, next_bytes, (n / kLaneTokens + n % kLaneTokens) * ((dim + W - 1) / W));
  switch (dim) {
    case 64: qk_lanes_run<64>(qt, G, k, n, dim, s, pf); break;
    case 128: qk_lanes_run<128>(qt, G, k, n, dim, s, pf); break;
    default: qk_lanes_run<0>(qt, G, k, n, dim, s, pf); break;
  }
  pf.finish();
}


// acc[0:dp] *= alpha: a running output whose max moved (nothing to do when it did not).
inline void rescale(float* acc, int dp, float alpha) {
  if (alpha == 1.f) return;
  const R av = V::set1(alpha);
  for (int d = 0; d < dp; d += W) V::store(acc + d, V::mul(V::template load<F32>(acc + d), av));
}

// softmax_update (below) for scores laid out [Hkv][t][G]: the running max, sum and rescale
// factor of W heads are one vector each.
inline void softmax_lanes(Scratch& sc, int num_kv_heads, int G, int n) {
  const int ss = sc.s_stride, dp = sc.dp;
  for (int h = 0; h < num_kv_heads; ++h)
    for (int j = 0; j < G; j += W) {
      float* s = sc.s.data() + int64_t(h) * G * ss + j;  // s[t * G] = W heads of token t
      const int hq = h * G + j;
      const R m_old = V::template load<F32>(sc.m.data() + hq);
      R m_new = m_old;
      for (int t = 0; t < n; ++t) m_new = V::max(m_new, V::template load<F32>(s + t * G));
      R sum = V::zero();
      for (int t = 0; t < n; ++t) {
        const R p = V::exp(V::sub(V::template load<F32>(s + t * G), m_new));
        V::store(s + t * G, p);
        sum = V::add(sum, p);
      }
      float m_prev[16], m_next[16];
      V::store(m_prev, m_old);
      V::store(m_next, m_new);
      for (int i = 0; i < W; ++i) {
        const float alpha = std::exp(m_prev[i] - m_next[i]);  // 0 on the first chunk (-inf)
        sc.l[hq + i] *= alpha;
        rescale(sc.acc.data() + int64_t(hq + i) * dp, dp, alpha);
      }
      V::store(sc.l.data() + hq, V::add(V::template load<F32>(sc.l.data() + hq), sum));
      V::store(sc.m.data() + hq, m_new);
    }
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

// The item's q times scale: sc.q [Hq, dp] for the head tiles, or with heads in lanes (`lanes`)
// sc.qt, transposed per KV head: qt[h][d][g] = q[h * G + g][d].
inline void start_item(const AttnArgs& a, const WorkItem& w, Scratch& sc, bool lanes) {
  const int G = a.group, H = a.num_kv_heads * G, D = a.head_dim;
  const float* q = a.q + int64_t(w.row) * H * D;  // [Hq, D]
  if (lanes) {
    for (int h = 0; h < H; ++h)
      for (int d = 0; d < D; ++d)
        sc.qt[(int64_t(h / G) * D + d) * G + h % G] = q[h * D + d] * a.scale;
  } else {
    for (int h = 0; h < H; ++h)
      for (int d = 0; d < D; ++d) sc.q[h * sc.dp + d] = q[h * D + d] * a.scale;
  }
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
// within a block, heads in order, so each block's [Hkv, B, D] K (then V) is read as one
// contiguous stretch; runs kPrefetchBlocks ahead in stream order are prefetched meanwhile.
template <class Tag>
void run_item(const AttnArgs& a, const WorkItem& w, Scratch& sc, float* out, float* partials) {
  using T = typename Tag::type;
  constexpr int kPrefetchBlocks = 1;  // further ahead measured no better here
  const int G = a.group, D = a.head_dim, B = a.block_size, Hkv = a.num_kv_heads;
  const int64_t run = int64_t(B) * D;  // one (block, kv head): [B, D]
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
    return p.block < 0 ? 0 : int64_t(tokens_in(p.block)) * D * int64_t(sizeof(T));
  };

  const bool lanes = heads_in_lanes<Tag>(G);
  start_item(a, w, sc, lanes);
  // Scores of kv head h, block b of the chunk: [G][ss] rows by head, or [B][G] with heads in lanes.
  auto scores = [&](int h, int b, int cb) {
    return sc.s.data() + int64_t(h) * G * ss + (b - cb) * B * (lanes ? G : 1);
  };
  for (int cb = first; cb < last; cb += sc.blocks_per_chunk) {
    const int ce = cb + sc.blocks_per_chunk < last ? cb + sc.blocks_per_chunk : last;
    for (int b = cb; b < ce; ++b)
      for (int h = 0; h < Hkv; ++h) {
        const T* k = at(k_pool, b, h);
        if constexpr (std::is_same_v<Tag, F32>) {
          if (lanes) {
            qk_lanes(sc.qt.data() + int64_t(h) * D * G, G, k, tokens_in(b), D, scores(h, b, cb),
                     next_run(false, b, h), next_bytes(false, b));
            continue;
          }
        }
        qk_block<Tag>(sc.q.data() + h * G * dp, G, dp, k, tokens_in(b), D, scores(h, b, cb), ss,
                      next_run(false, b, h), next_bytes(false, b));
      }
    const int n = (ce - cb - 1) * B + tokens_in(ce - 1);
    if (lanes) softmax_lanes(sc, Hkv, G, n); else softmax_update(sc, Hkv * G, n);
    for (int b = cb; b < ce; ++b)
      for (int h = 0; h < Hkv; ++h) {
        const Probs p = lanes ? Probs{scores(h, b, cb), 1, G} : Probs{scores(h, b, cb), ss, 1};
        av_block<Tag>(p, G, at(v_pool, b, h), tokens_in(b), D, sc.acc.data() + h * G * dp, dp,
                      next_run(true, b, h), next_bytes(true, b));
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
