// CUDA operators of the transformer (launchers; kernels in elementwise.cu, flash_prefill.cu,
// flash_decode.cu). Each launcher takes one plain params struct by value, checks it, and throws
// antkv::Error on anything outside the supported (closed) set; every launch is checked.
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

namespace antkv::cuda {

using bf16 = __nv_bfloat16;

// The element types a launcher accepts where it takes a void* (anything else is an antkv::Error).
enum class ElemType { kF32, kF16, kBF16 };
const char* elem_type_name(ElemType t);

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
  bf16* k_cache = nullptr;           // [n_seqs, n_kv_heads, capacity, head_dim], post-RoPE
  bf16* v_cache = nullptr;           // [n_seqs, n_kv_heads, capacity, head_dim]
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

// ---- flash attention, prefill ---------------------------------------------------------------------
// Causal GQA attention with a past: queries at positions past .. past + n_q - 1 (past = n_kv - n_q)
// attend to keys 0 .. their own position. bf16 in, fp32 accumulate (tensor cores, mma.sync m16n8k16),
// bf16 out, and each row's natural log-sum-exp of the scaled scores. head_dim 64 or 128 only.
// Element (token j, kv head h, channel c) of K is k[h * k_head_stride + j * k_row_stride + c]; this
// covers both [n_kv, n_kv_heads, d] (row stride n_kv_heads*d, head stride d) and the KV cache layout
// [n_kv_heads, capacity, d] (row stride d, head stride capacity*d). Strides in elements, multiples of 8.
struct FlashPrefillParams {
  const bf16* q = nullptr;      // [n_q, n_heads, head_dim] with row stride q_row_stride
  const bf16* k = nullptr;      // see above
  const bf16* v = nullptr;      // see above
  bf16* out = nullptr;          // [n_q, n_heads, head_dim] with row stride o_row_stride
  float* lse = nullptr;         // [n_heads, n_q] or null
  int n_q = 0, n_kv = 0, n_heads = 0, n_kv_heads = 0, head_dim = 0;
  float scale = 0.f;            // usually 1/sqrt(head_dim)
  int64_t q_row_stride = 0, o_row_stride = 0;
  int64_t k_row_stride = 0, k_head_stride = 0, v_row_stride = 0, v_head_stride = 0;
};
void flash_prefill(FlashPrefillParams p, cudaStream_t stream);

// ---- flash decoding ------------------------------------------------------------------------------------
// One new query token per sequence over a bf16 KV cache arena [batch, n_kv_heads, capacity, head_dim]
// (each sequence's keys 0 .. seq_lens[b]-1). The context is split into n_splits chunks of split_len keys
// (one thread block per split, kv head and sequence; all n_heads/n_kv_heads query heads of a group read
// each K/V tile once, as the rows of one tensor-core tile); the last split block of each (sequence, kv head)
// to finish combines the splits (one kernel per step).
// Cache slots at or past seq_lens[b] are never read. head_dim 64 or 128; group size <= 16.
struct FlashDecodeParams {
  const bf16* q = nullptr;          // [batch, n_heads, head_dim]
  const bf16* k_cache = nullptr;    // [batch, n_kv_heads, capacity, head_dim]
  const bf16* v_cache = nullptr;    // [batch, n_kv_heads, capacity, head_dim]
  const int32_t* seq_lens = nullptr;// [batch] (device), each in [1, capacity]; otherwise NaN outputs
  bf16* out = nullptr;              // [batch, n_heads, head_dim]
  float* lse = nullptr;             // [batch, n_heads] or null
  float* workspace = nullptr;       // decode_workspace_floats(batch, n_heads, head_dim) floats
  int64_t workspace_floats = 0;
  uint32_t* split_counters = nullptr;  // [batch, n_kv_heads]: zero before the first launch (cudaMemset once
                                       // after allocation); every completed launch leaves them zero
  int batch = 0, n_heads = 0, n_kv_heads = 0, head_dim = 0, capacity = 0;
  int n_splits = 0, split_len = 0;  // from plan_flash_decode(); split_len a multiple of 64
  float scale = 0.f;
};
struct DecodePlan {
  int n_splits = 1;
  int split_len = 64;
};
constexpr int kMaxDecodeSplits = 256;
// Chooses the split (max_len: the longest sequence) so that the grid is about `waves` waves of resident
// blocks (occupancy x SMs): one wave by default, so that each block streams a long stretch of the cache and
// pays its pipeline start and drain once. A plan is valid for any max_len up to n_splits * split_len.
DecodePlan plan_flash_decode(int batch, int n_kv_heads, int max_len, int head_dim = 128, int waves = 1);
// Resident split-kernel blocks on the whole device (occupancy x SMs) for head_dim 64 or 128.
int decode_resident_blocks(int head_dim);
int64_t decode_workspace_floats(int batch, int n_heads, int head_dim);
int64_t decode_counter_count(int batch, int n_kv_heads);  // entries of FlashDecodeParams::split_counters
void flash_decode(FlashDecodeParams p, cudaStream_t stream);

// Multiprocessor count of the current device (cached).
int device_sm_count();

}  // namespace antkv::cuda
