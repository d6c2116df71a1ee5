// bf16 GEMMs on AMX or AVX512-BF16 with weights packed as pair-ordered panels (bf16_gemm.cpp).
#pragma once

#include <torch/extension.h>

#include <string>
#include <vector>

namespace moelens::bf16 {

// This CPU runs one of the engines: AMX-BF16 (and the kernel lets this process use the tiles)
// or AVX512-BF16.
bool supported();

// The engines this CPU runs, best first: "amx", "avx512_bf16".
std::vector<std::string> engines();

// Pins the engine ("amx", "avx512_bf16") or restores the best (""); returns the one in use.
std::string set_engine(const std::string& name);

// y[M, N] = x[M, K] · W^T, W as panels wp [P, K, 16] (bf16, rows paired); y in bf16, or in
// fp32 (the accumulators unrounded) when fp32_out.
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& wp, int64_t out_features,
                     int64_t num_threads, bool fp32_out);

// silu(x · gate^T) * (x · up^T) for a gated weight wp [P, K, 16] -> h [M, inter].
torch::Tensor swiglu(const torch::Tensor& x, const torch::Tensor& wp, int64_t inter,
                     int64_t num_threads);

// panel_gemm.cpp's grouped_swiglu in bf16, its arguments already checked -> fp32 out [T, H].
torch::Tensor grouped_swiglu(const torch::Tensor& x, const int64_t* tok, const float* weight,
                             const int64_t* counts, const torch::Tensor& gate_up,
                             const torch::Tensor& down, int64_t inter, int64_t num_threads);

}  // namespace moelens::bf16
