// Plain structs shared by the ISA-specific kernel bodies and the torch-facing driver.
#pragma once

#include <cstdint>
#include <vector>

namespace moelens {

enum class KvDtype : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// Every shape the kernel needs; pointers are raw so the kernel bodies never see torch headers.
struct AttnArgs {
  const float* q;               // [R, Hq, D]
  const void* k_pool;           // [N, Hkv, D, B] in `dtype`: K transposed per (block, head)
  const void* v_pool;           // [N, Hkv, B, D] in `dtype`
  const int32_t* block_tables;  // [R, table_stride], validated
  int64_t table_stride;
  int num_kv_heads;
  int group;                    // Hq / Hkv
  int block_size;
  int head_dim;
  float scale;
  KvDtype dtype;
};

// One unit of parallel work: query row `row` (all its heads), cached tokens [t0, t1) with t0 a
// multiple of the block size. part < 0: the item covers the whole context and writes the output
// directly; otherwise it writes (m, l, acc) into partial slot `part`, combined afterwards.
struct WorkItem {
  int32_t row;
  int32_t t0;
  int32_t t1;
  int32_t part;
};

// A row whose context was split over parts [first_part, first_part + num_parts).
struct SplitRow {
  int32_t row;
  int32_t first_part;
  int32_t num_parts;
};

// Per-thread buffers, sized once per call. Rows are padded to `dp` (a multiple of every ISA's
// width) and zero in the padding, so vector loads and stores on them never need a mask.
struct Scratch {
  int dp;                // padded head_dim
  int s_stride;          // floats per row of scores: the chunk's tokens, padded, plus a vector
  int blocks_per_chunk;  // blocks whose scores are computed before one softmax update
  std::vector<float> q;    // [Hq, dp] query rows times scale
  std::vector<float> acc;  // [Hq, dp] unnormalised output
  std::vector<float> m;    // [Hq] running max
  std::vector<float> l;    // [Hq] running sum of exp
  std::vector<float> s;    // [Hq, s_stride] scores, then probabilities

  Scratch(int num_heads, int head_dim, int block_size) {
    constexpr int kMaxLanes = 16;
    constexpr int kChunkTokens = 128;  // amortises the softmax rescale for small blocks
    dp = (head_dim + kMaxLanes - 1) / kMaxLanes * kMaxLanes;
    blocks_per_chunk = kChunkTokens / block_size > 1 ? kChunkTokens / block_size : 1;
    int chunk = blocks_per_chunk * block_size;
    // a score vector stored at a block's last token vector may reach W - 1 floats past it
    s_stride = (chunk + kMaxLanes - 1) / kMaxLanes * kMaxLanes + kMaxLanes;
    q.assign(size_t(num_heads) * dp, 0.f);
    acc.assign(size_t(num_heads) * dp, 0.f);
    m.assign(num_heads, 0.f);
    l.assign(num_heads, 0.f);
    s.assign(size_t(num_heads) * s_stride, 0.f);
  }
};

// Floats one partial result occupies: m[Hq], l[Hq], acc[Hq, D].
inline int64_t partial_floats(int num_heads, int head_dim) {
  return int64_t(num_heads) * (head_dim + 2);
}

}  // namespace moelens
