// The CPU reference operators of the transformer, fp32. The CPU runtime is built from these and every
// CUDA kernel is tested against them. All tensors are row-major; shapes are given per argument.
#pragma once
#include <cstddef>
#include <cstdint>

namespace antkv::cpu {

// x: [n_rows, n], weight: [n] -> y: [n_rows, n]; y = x / sqrt(mean(x^2) + eps) * weight (y may alias x).
void rmsnorm(const float* x, const float* weight, float* y, int64_t n_rows, int n, float eps);

// gate, up: [n] -> out: [n]; out = silu(gate) * up (out may alias gate).
void swiglu(const float* gate, const float* up, float* out, int64_t n);

// Causal grouped-query attention with a past:
//   q:   [n_q, n_heads, d]      queries at positions past .. past + n_q - 1 (past = n_kv_tokens - n_q)
//   k,v: [n_kv_tokens, n_kv_heads, d]  all cached tokens including the n_q new ones
//   out: [n_q, n_heads, d]
//   lse: [n_heads, n_q] or null: natural log-sum-exp of the scaled scores of each row
// Query head h reads KV head h / (n_heads / n_kv_heads). scale is usually 1/sqrt(d).
void attention(const float* q, const float* k, const float* v, float* out, float* lse, int n_q,
               int n_kv_tokens, int n_heads, int n_kv_heads, int d, float scale);

// Per-row negative log-likelihood of targets under logits:
//   logits: [n_rows, vocab], targets: [n_rows] (a negative target skips the row, nll = 0) -> nll: [n_rows]
void nll_from_logits(const float* logits, const int32_t* targets, float* nll, int64_t n_rows, int vocab);

}  // namespace antkv::cpu
