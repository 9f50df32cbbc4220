// Rotary position embedding in Hugging Face's rotate-half layout: channel i pairs with i + d/2.
// inv_freq[i] = theta^(-2i/d) (computed in fp32 as transformers does), then rescaled per rope_scaling
// (linear, llama3). The same table feeds the CPU runtime and the CUDA kernels.
#pragma once
#include <cstdint>
#include <vector>

#include "model/model_config.h"

namespace antkv {

// [head_dim / 2] inverse frequencies after scaling.
std::vector<float> rope_inv_freq(int head_dim, double theta, const RopeScaling& scaling);
std::vector<float> rope_inv_freq(const ModelConfig& cfg);

// x: [n_tokens, n_heads, head_dim] fp32, rotated in place; positions: [n_tokens].
void rope_apply(float* x, int n_tokens, int n_heads, int head_dim, const int32_t* positions,
                const float* inv_freq);

}  // namespace antkv
