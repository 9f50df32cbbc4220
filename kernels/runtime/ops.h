// CUDA operators of the transformer besides attention (launchers; kernels in elementwise.cu; attention is
// in kernels/attention/flash_attention.h). Each launcher takes one plain params struct by value, checks it,
// and throws antkv::Error on anything outside the supported (closed) set; every launch is checked.
//
// Dtypes (the GPU runtime's convention):
//  - residual stream, GEMM outputs (q/k/v, gate/up, logits): fp32;
//  - GEMM inputs (normed activations, attention output, SwiGLU output), weights, Q for attention and the
//    KV cache: bf16; attention and reductions accumulate in fp32;
//  - norm weights and biases: fp32.
// Shapes are row-major and written beside each field.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kernels/common/dtypes.h"

namespace antkv::cuda {


// ---- embedding gather --------------------------------------------------------------------------
struct EmbeddingParams {
  const bf16* table = nullptr;     // [vocab, hidden]
  const int32_t* tokens = nullptr; // [n_tokens] (device); out-of-range ids produce NaN rows (callers
                                   // validate on the host first)
  float* out = nullptr;            // [n_tokens, hidden]
  int n_tokens = 0, hidden = 0, vocab = 0;
};
void embedding(EmbeddingParams p, cudaStream_t stream);

// ---- RMSNorm -----------------------------------------------------------------------------------
struct RmsNormParams {
  const float* x = nullptr;        // [n_rows, n]
  const float* weight = nullptr;   // [n]
  void* y = nullptr;               // [n_rows, n] of y_type (kF32 or kBF16); may alias x when kF32
  ElemType y_type = ElemType::kBF16;
  int64_t n_rows = 0;
  int n = 0;
  float eps = 1e-6f;
};
void rmsnorm(RmsNormParams p, cudaStream_t stream);

// ---- RoPE (rotate-half, as rope_apply) ------------------------------------------------------------
struct RopeParams {
  float* x = nullptr;                // [n_tokens, n_heads, head_dim], rotated in place
  const int32_t* positions = nullptr;// [n_tokens] (device)
  const float* inv_freq = nullptr;   // [head_dim / 2] (device), from rope_inv_freq()
  int n_tokens = 0, n_heads = 0, head_dim = 0;
};
void rope(RopeParams p, cudaStream_t stream);

// ---- fused QKV epilogue: bias, RoPE on q and k, q -> bf16, k/v -> bf16 KV cache ----------------
struct QkvRopeStoreParams {
  float* qkv = nullptr;              // [n_tokens, (n_heads + 2 n_kv_heads) * head_dim]: q | k | v (GEMM out)
  const float* bias = nullptr;       // [(n_heads + 2 n_kv_heads) * head_dim] or null
  const int32_t* positions = nullptr;// [n_tokens] (device): RoPE position = cache slot of the token
  const int32_t* seq_index = nullptr;// [n_tokens] (device) or null (all 0): which sequence's cache
  const float* inv_freq = nullptr;   // [head_dim / 2]
  bf16* q_out = nullptr;             // [n_tokens, n_heads, head_dim], post-RoPE
  bf16* k_cache = nullptr;           // [n_seqs, n_kv_heads, capacity, head_dim], post-RoPE; null (with v_cache
  bf16* v_cache = nullptr;           // [n_seqs, n_kv_heads, capacity, head_dim]    null): no cache store, write_back only
  int capacity = 0;                  // positions must be < capacity (checked by the caller)
  float* k_pre_rope = nullptr;       // [n_tokens, n_kv_heads, head_dim] or null: biased k before RoPE
  bool write_back = false;           // also write biased+rotated q, k and biased v back into qkv (fp32)
  int n_tokens = 0, n_heads = 0, n_kv_heads = 0, head_dim = 0;
};
void qkv_rope_store(QkvRopeStoreParams p, cudaStream_t stream);

// ---- SwiGLU ------------------------------------------------------------------------------------
struct SwigluParams {
  const float* gate = nullptr;  // [n_rows, ld_in] (columns 0..n-1 used)
  const float* up = nullptr;    // [n_rows, ld_in]
  void* out = nullptr;          // [n_rows, n] of out_type (kF32 or kBF16)
  ElemType out_type = ElemType::kBF16;
  int64_t n_rows = 0;
  int n = 0;
  int64_t ld_in = 0;            // row stride of gate/up in elements (>= n)
};
void swiglu(SwigluParams p, cudaStream_t stream);

// ---- residual add: x += y ------------------------------------------------------------------------
struct ResidualAddParams {
  float* x = nullptr;           // [n]
  const void* y = nullptr;      // [n] of y_type (kF32 or kBF16)
  ElemType y_type = ElemType::kF32;
  int64_t n = 0;
};
void residual_add(ResidualAddParams p, cudaStream_t stream);

// ---- NLL over logits rows (one chunk of rows of the LM head) ----------------------------------
struct NllParams {
  const float* logits = nullptr;   // [n_rows, ld] (columns 0..vocab-1)
  const int32_t* targets = nullptr;// [n_rows] (device); negative: skipped, nll = 0
  float* nll = nullptr;            // [n_rows]
  int64_t n_rows = 0;
  int vocab = 0;
  int64_t ld = 0;
};
void nll_rows(NllParams p, cudaStream_t stream);

// ---- argmax over logits rows (greedy decoding) -------------------------------------------------
struct ArgmaxParams {
  const float* logits = nullptr;   // [n_rows, ld]
  int32_t* out = nullptr;          // [n_rows]: smallest index of the row maximum
  int64_t n_rows = 0;
  int vocab = 0;
  int64_t ld = 0;
};
void argmax_rows(ArgmaxParams p, cudaStream_t stream);

// ---- conversions and fills ------------------------------------------------------------------------
// dst[i] = (bf16) src[i], src of src_type.
void convert_to_bf16(const void* src, ElemType src_type, bf16* dst, int64_t n, cudaStream_t stream);
// dst[i] = (float) src[i].
void convert_to_f32(const void* src, ElemType src_type, float* dst, int64_t n, cudaStream_t stream);
// Uniform in [-scale, scale), a counter-based hash of (seed, i): reproducible, no state.
void fill_random_bf16(bf16* dst, int64_t n, uint64_t seed, float scale, cudaStream_t stream);
void fill_random_f32(float* dst, int64_t n, uint64_t seed, float scale, cudaStream_t stream);
void fill_bf16(bf16* dst, int64_t n, float value, cudaStream_t stream);  // value may be NaN
void fill_f32(float* dst, int64_t n, float value, cudaStream_t stream);

}  // namespace antkv::cuda
