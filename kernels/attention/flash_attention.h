// kernels/attention/: attention on the GPU (flash prefill, flash decoding, decode over the quantized cache).
// Flash attention on the GPU (kernels in flash_prefill.cu, flash_decode.cu): causal GQA prefill that also
// returns each row's log-sum-exp (the anchor-score pass needs it), and flash-decoding over the bf16 KV cache
// arena. The quantized-cache decode is in quant_decode.h. Launchers take one plain params struct by value,
// check it and throw antkv::Error on anything outside the supported (closed) set; every launch is checked.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kernels/common/dtypes.h"

namespace antkv::cuda {

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

}  // namespace antkv::cuda
