// Causal prefill attention on the panel micro-kernel (prefill_attention.cpp); bound into the
// panel GEMM extension by panel_gemm.cpp.
#pragma once

#include <torch/extension.h>

namespace moelens {

// q [T, Hq, D], k/v [T, Hkv, D] fp32: the new tokens of S prompts packed back to back, their
// lengths seq_lens [S] int64 summing to T. Returns [T, Hq, D].
torch::Tensor causal_attention(const torch::Tensor& q, const torch::Tensor& k,
                               const torch::Tensor& v, const torch::Tensor& seq_lens,
                               double scale, int64_t num_threads);

}  // namespace moelens
