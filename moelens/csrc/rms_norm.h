// RMSNorm of the rows of x on the CPU (rms_norm.cpp); bound into the panel GEMM extension by
// panel_gemm.cpp.
#pragma once

#include <torch/extension.h>

namespace moelens {

// HF's RMSNorm over the last dim: weight * to(x.dtype)(x * rsqrt(mean(x^2) + eps)) in fp32.
// x [..., N] and weight [N], both float32 or both bfloat16 -> [..., N] in that dtype.
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps,
                       int64_t num_threads);

}  // namespace moelens
