// Per-row statistics of sampling logits on the CPU (row_stats.cpp); bound into the panel GEMM
// extension by panel_gemm.cpp.
#pragma once

#include <torch/extension.h>

#include <tuple>

namespace moelens {

// logits [R, V] fp32 -> (index of each row's first maximum [R] int64, log Σ exp over the row [R]).
std::tuple<torch::Tensor, torch::Tensor> argmax_logsumexp(const torch::Tensor& logits,
                                                          int64_t num_threads);

}  // namespace moelens
