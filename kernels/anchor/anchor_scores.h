// kernels/anchor/: the GPU counterpart of lib/anchor's score pass.
// GPU anchor scores (design note §2), FlashAttention-compatible: the T x T attention matrix is never stored.
// Same semantics as antkv::anchor_scores_reference (lib/anchor/anchor_scores.h): one window, causal, GQA (the
// G = n_heads / n_kv_heads query heads of a KV head add into that KV head's scores), all in fp32:
//   S_V(j) = sum_g sum_{i>=j} A_gij
//   S_K(j) = sum_g sum_{i>=j} A_gij |q_gi| |v_j - o_gi| / sqrt(d)
// Pass 1: fp32 flash attention forward (tiled, online softmax) -> o_i, the row log-sum-exp L_i and per-row
//         statistics (|q_i| / sqrt(d), |o_i|^2).
// Pass 2: one thread block per (block of 64 keys, KV head) recomputes the score tiles A_ij = exp(s_ij - L_i)
//         of every query block i >= j of the G query heads, and the products v_j . o_i, accumulating S_V and
//         S_K in registers (fp64 accumulators); one plain store per key: no atomics, deterministic.
// head_dim 64 or 128; anything else is an antkv::Error naming it. Every launch is checked.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>

#include "kernels/common/device_buffer.h"
#include "runtime/runtime.h"

namespace antkv::cuda {

// Device pointers, fp32, row-major. Inputs are post-RoPE q and k (what attention used).
struct AnchorScoreGpuArgs {
  const float* q = nullptr;  // [n_tokens, n_heads, head_dim]     (16-byte aligned)
  const float* k = nullptr;  // [n_tokens, n_kv_heads, head_dim]  (16-byte aligned)
  const float* v = nullptr;  // [n_tokens, n_kv_heads, head_dim]  (16-byte aligned)
  float* s_k = nullptr;      // [n_tokens, n_kv_heads] output: key sensitivity S_K
  float* s_v = nullptr;      // [n_tokens, n_kv_heads] output: value sensitivity S_V (attention mass)
  // Scratch written by pass 1 and read by pass 2 (AnchorScoreWorkspace::bind fills these):
  float* o = nullptr;        // [n_tokens, n_heads, head_dim] attention output o_i (fp32)
  float* lse = nullptr;      // [n_heads, n_tokens] natural log-sum-exp L_i of each row's scaled scores
  float* row_stats = nullptr;  // [n_heads, n_tokens, 4]: {L_i * log2(e), |q_i| / sqrt(d), |o_i|^2, 0}
  int n_tokens = 0;          // T (one window)
  int n_heads = 0;           // query heads
  int n_kv_heads = 0;        // KV heads; n_heads % n_kv_heads == 0
  int head_dim = 0;          // d: 64 or 128
};

// Reusable scratch for o, lse and row_stats: grows when needed, never shrinks; no allocation when a call
// fits what is held (so calibration loops allocate once).
class AnchorScoreWorkspace {
 public:
  // Ensures capacity for (n_tokens, n_heads, head_dim) and points p.o, p.lse, p.row_stats at it.
  void bind(AnchorScoreGpuArgs& p);
  // A runtime layer's strided fp32 q, k_post, v (DeviceLayerActivations: rows of the runtime's qkv buffer)
  // copied dense into the workspace on `stream`; p.q, p.k, p.v point at the copies and the shapes are set
  // (p.s_k, p.s_v stay the caller's). The calibration stage and the GPU quantizer score anchors this way.
  void pack(const DeviceLayerActivations& a, int n_heads, int n_kv_heads, int head_dim, AnchorScoreGpuArgs& p,
            cudaStream_t stream);
  size_t bytes() const { return o_.bytes() + lse_.bytes() + stats_.bytes() + q_.bytes() + k_.bytes() + v_.bytes(); }

 private:
  DeviceBuffer<float> o_, lse_, stats_;
  DeviceBuffer<float> q_, k_, v_;  // pack(): dense [n_tokens, heads, head_dim]
};

// Both passes on `stream` (asynchronous; the caller synchronizes). p.o, p.lse and p.row_stats must be set.
void anchor_scores_gpu(const AnchorScoreGpuArgs& p, cudaStream_t stream);
// The same, with scratch from `ws`.
void anchor_scores_gpu(AnchorScoreGpuArgs p, AnchorScoreWorkspace& ws, cudaStream_t stream);

// The passes on their own (for timing, or to reuse o / L): pass 1 writes o, lse, row_stats; pass 2 reads
// q, k, v, o, row_stats and writes s_k, s_v.
void anchor_scores_pass1(const AnchorScoreGpuArgs& p, cudaStream_t stream);
void anchor_scores_pass2(const AnchorScoreGpuArgs& p, cudaStream_t stream);

}  // namespace antkv::cuda
