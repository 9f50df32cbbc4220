// The KIVI-style `uniform` KV cache kept as packed integers on the GPU (uniform:bits=2|4,group=G[,window=W]),
// with its decode attention: what antkv-eval bench and max-context decode from for the uniform method. The
// semantics are the CPU reference's (lib/quant/quantized_cache.{h,cpp}, uniform_quantize): keys asymmetric per
// channel over blocks of `group` tokens, values asymmetric per token over groups of vgs = min(group, head_dim)
// channels, fp16 scale and zero point (zero = fp16(min), scale = fp16((max - zero) / (2^b - 1)), code =
// clamp(rint((x - zero) / scale)), x^ = code * scale + zero); the newest `window` tokens stay FP16 (keys and
// values) and so do the keys of an incomplete block.
//
// Counts (per sequence, the same for every layer and KV head; len tokens): qlen = max(0, len - W) tokens have
// quantized values, n_kb = qlen / group blocks (k_end = n_kb * group tokens) have quantized keys; tokens
// [k_end, len) keep their FP16 keys in the residual ring, tokens [qlen, len) their FP16 values too.
//
// ---- layout, per layer (indexes [sequence, KV head] first; WPT = head_dim * bits / 32 words per token,
//      channel c's code at bits (c * bits) % 32 of word (c * bits) / 32; KB = ceil(capacity / group);
//      NVG = head_dim / vgs; R = group + window) --------------------------------------------------------------
//  k_codes uint32 [batch, kv_heads, KB * group, WPT]  key codes, token t of block t / group in row t
//  k_sz    half2  [batch, kv_heads, KB, head_dim]      per (block, channel): (scale, zero)
//  v_codes uint32 [batch, kv_heads, capacity, WPT]    value codes of token t in row t
//  v_sz    half2  [batch, kv_heads, capacity, NVG]     per (token, channel group): (scale, zero)
//  ring_k, ring_v half [batch, kv_heads, R, head_dim]  FP16 residual: token t in row t % R (t >= k_end)
// Rows past the counts are never read (tests poison them with NaN / 0xFF).
//
// ---- decode step (one token per sequence) ---------------------------------------------------------------
// plan_step() moves the host lengths one token on and uploads them; append() writes the new token's K/V (fp16)
// into its ring row, quantizes the value of token len - 1 - W (when it exists) into the value stream and,
// when qlen reaches a multiple of `group`, the keys of that block (per channel over its tokens) into the key
// stream; attend() runs the decode attention: flash-decoding splits over the quantized key blocks (per
// block: q_c * s_c and q . z precomputed, score = sum_c (q_c s_c) code_c + q . z; values sum_t (p_t s_t)
// code_t + sum_t p_t z_t), the last split also over the residual, merged by split_combine.cuh's combine.
//
// ---- prefill (one chunk of T tokens into an empty sequence) -----------------------------------------------
// write_prefill() quantizes the chunk per layer as the decode appends would have, token by token (the groups do
// not depend on the chunking): the values of tokens [0, qlen), the keys of the n_kb complete blocks, the rest
// FP16 into the ring (tokens [k_end, T), row t % R); commit_prefill() then sets the length, and decode
// appends continue from it. GpuRuntime prefills through it under eval.kv_cache: real; bench and max-context
// fill the cache synthetically.
#pragma once
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <vector>

#include "kernels/common/device_buffer.h"
#include "kernels/attention/uniform_decode.h"
#include "kernels/common/dtypes.h"
#include "model/model_config.h"

namespace antkv {

class GpuUniformKvCache {
 public:
  GpuUniformKvCache(const ModelConfig& cfg, int bits, int group, int window, int max_batch, int capacity);
  const std::string& name() const { return name_; }
  int bits() const { return bits_; }
  int group() const { return group_; }
  int window() const { return window_; }
  int max_batch() const { return max_batch_; }
  int capacity() const { return capacity_; }
  size_t device_bytes() const { return device_bytes_; }
  // The split kernel attend() runs (kDefaultUniformDecodeKernel: CUDA cores; tensor cores opt-in).
  void set_decode_kernel(cuda::UniformDecodeKernel k) { decode_kernel_ = k; }
  cuda::UniformDecodeKernel decode_kernel() const { return decode_kernel_; }
  // Bytes of one sequence's cache at full capacity (codes, scales/zeros, residual), all layers.
  static double sequence_bytes(const ModelConfig& cfg, int bits, int group, int window, int64_t capacity);
  // Bytes attention reads for one sequence of len tokens in one layer (all KV heads).
  static double attention_bytes(const ModelConfig& cfg, int bits, int group, int window, int64_t len);
  // K+V bytes one more token adds, all layers (codes and their scales/zeros, amortized per token).
  size_t code_bytes_per_token() const;

  void reset();
  int length(int seq) const { return lens_.at(seq); }
  // Sequence b holds lens[b] tokens (synthetic contents: benchmarks, max-context, tests).
  void set_synthetic_lengths(const std::vector<int>& lens);
  // Layer `layer` of the T-token prefill of the empty sequence `seq`: k, v its fp32 post-RoPE keys and values
  // (device, [T, kv_heads, head_dim] with row strides in elements), rounded to fp16 and quantized (see above).
  void write_prefill(int layer, int seq, int T, const float* k, int64_t k_stride, const float* v, int64_t v_stride,
                     cudaStream_t stream);
  // After every layer's write_prefill: the sequence holds T tokens.
  void commit_prefill(int seq, int T);
  // Moves sequences 0..B-1 one token on (host lengths) and uploads them (stream order).
  void plan_step(int B, cudaStream_t stream);
  // Uploads the lengths of sequences 0..B-1 as they are (attention benchmarks and tests).
  void upload_counts(int B, cudaStream_t stream);
  cuda::UniformDecodePlan plan(int B, int n_heads) const;
  // Layer `layer`: token b's new K/V (fp32 post-RoPE, rows of `stride` elements, [B, kv_heads, head_dim]) into
  // the ring; the value leaving the window and a completed key block quantized (after plan_step).
  void append(int layer, int B, const float* k, const float* v, int64_t stride, cudaStream_t stream);
  // q [B, n_heads, head_dim] bf16 -> out [B, n_heads, head_dim] bf16 (lse [B, n_heads] or null).
  void attend(int layer, int B, int n_heads, const cuda::bf16* q, cuda::bf16* out, const cuda::UniformDecodePlan& plan,
              float scale, cudaStream_t stream, float* lse = nullptr);
  // Every code random, scales/zeros and FP16 rows uniform in [-1, 1) (decode time does not depend on them).
  void fill_random(uint64_t seed, cudaStream_t stream);
  // Every byte 0xFF (fp16 NaN scales, zeros and residual rows): a read past the counts shows as NaN.
  void poison();

  // Tests: one (layer, sequence, KV head) read back and unpacked (synchronous).
  struct HostView {
    int len = 0, k_end = 0, v_end = 0;
    std::vector<uint8_t> k_code;        // [k_end, head_dim]
    std::vector<float> k_scale, k_zero; // [k_end / group, head_dim]
    std::vector<uint8_t> v_code;        // [v_end, head_dim]
    std::vector<float> v_scale, v_zero; // [v_end, NVG]
    std::vector<float> res_k, res_v;    // [len - k_end, head_dim]: tokens k_end .. len-1 (res_v valid for t >= v_end)
  };
  HostView download(int layer, int seq, int kv_head) const;

 private:
  struct Layer {
    cuda::DeviceBuffer<uint32_t> k_codes, v_codes;
    cuda::DeviceBuffer<__half2> k_sz, v_sz;
    cuda::DeviceBuffer<__half> ring_k, ring_v;
  };
  // The fields append's and attend's kernel parameters share: the configuration, layer `layer`'s streams, scales
  // and ring, the device lengths.
  template <class Params>
  void set_layer_fields(Params& p, int layer) const;
  std::string name_;
  int n_layers_ = 0, n_kv_ = 0, n_heads_ = 0, d_ = 0, bits_ = 2, group_ = 128, window_ = 0;
  int max_batch_ = 0, capacity_ = 0, kb_ = 0, wpt_ = 0, nvg_ = 0, ring_ = 0;
  size_t device_bytes_ = 0;
  cuda::UniformDecodeKernel decode_kernel_ = cuda::kDefaultUniformDecodeKernel;
  std::vector<Layer> layers_;
  std::vector<int> lens_;
  int pending_seq_ = -1, pending_tokens_ = 0;  // the prefill being written (write_prefill), -1: none
  std::vector<bool> pending_layers_;           // its layers written so far
  cuda::DeviceBuffer<int32_t> lens_d_;
  cuda::PinnedBuffer<int32_t> lens_h_;
  cuda::DeviceBuffer<float> workspace_;
};

}  // namespace antkv
