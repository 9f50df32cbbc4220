// The compressed KV cache of the vq and antkv methods (design note §2-3, §6; what the methods and options mean:
// docs/METHODS.md): what GpuRuntime keeps instead of its bf16 arena when the cache is real
// (GpuRuntimeOptions::compressed_kv, eval.kv_cache: real). Per layer, in the layout of
// kernels/attention/quant_decode.h: packed b-bit codes of the quantized tokens, FP16 anchors with their
// positions, an FP16 ring of the newest `window` decoded tokens (the method's decode window, recipe
// anchor.window), and the layer's codebooks in fp16.
//
// Life of a sequence:
//  - prefill (sequence empty, T tokens): the caller (GpuRuntime) has chosen the anchors (the method's score,
//    GpuKvQuantizer); write_prefill() keeps each KV head's anchors in FP16 and quantizes its other tokens
//    into that head's code stream, on the GPU (quantize_kv). The window is empty after a prefill.
//  - decode (one token per sequence and step): plan_step() moves the host counts one token on and uploads
//    the step's slots; per layer, append() puts the new token into the window ring and, when the ring is full,
//    quantizes the token leaving it into the code stream (the oldest of the window, in the same ring slot);
//    attend() runs quant_decode over codes + anchors + window.
//  Decode-time anchors (MethodSpec::promotes()): the rule of quant/anchor_rule.h (docs/METHODS.md), run here on
//  the GPU. Each anchor and window token has a running anchor score (fp32), which starts from the prefill's
//  score (anchors) or 0 (a decoded token) and grows after every step's attention by that row's contribution
//  (running_score_kernel, from the attention's log-sum-exp and output). Whether the anchor budget grows is
//  decided on the host, so the counts stay the same for every head; else window_append_kernel compares the
//  leaving token with each head's weakest anchor and quantizes the displaced one in its place.
//  Keys are post-RoPE, or pre-RoPE (key_rope: pre): then the code stream holds pre-RoPE keys with each slot's
//  token position (code_pos, int32: +4 bytes per token and KV head), the window keeps a pre-RoPE copy of its
//  keys for the quantization at eviction, and decode dequantizes, rotates and dots (quant_decode pre_rope).
//  Anchors and window keys are post-RoPE either way. key_rope=commute: as pre, with the pre-RoPE keys put in RoPE
//  pair order (quant/vq.h rope_pair_order) before they are kept or coded, and decode by commute_decode
//  (kernels/attention/commute_decode.h: codeword times e^{i pos theta}, every configuration but c16b12; gain=k|kv:
//  the per-token scales as for post-RoPE keys, the key's applied after the lookups).
// Coded tokens as the CPU reference codes them (quant/quantized_cache.cpp quantize_head; encode_rows_kernel here):
//  - rotate=pca: x' = R (x - mean) per (layer, KV head, tensor); decode rotates the query once per step and head
//    (q' = R_k q, and q . k_mean added to every quantized token's score) and the values' coded sums back once per
//    (sequence, head) (quant_decode's coded transform); pre-RoPE keys (key_rope=pre) are mapped back per token
//    instead, k = k_mean + R_k^T (ks u), then rotated to their position (RoPE does not commute with R_k);
//  - gain=k|kv: x' / |x'| is coded and the stored fp16 norm over |u| (u: the codes' concatenated centroids) is one
//    fp16 scale per token and head (k_scale / v_scale, counted in bytes_per_sequence), so the lookup tables stay
//    as they are: score = ks * sum_g LUT[g][code] (+ q . k_mean), value bins weigh p * vs; norm=fp8: the norm is
//    E4M3-rounded first (the numbers of the simulated path), and the scale kept in fp16 as with fp16 norms (so the
//    cache holds 16 bits per token and head where the method's accounting counts 8: decode would otherwise need
//    |u| per token);
//  - metric=task: the nearest L^T c to L^T x' is taken; decode reads the original-space centroids (unchanged).
// Per-layer widths (lkbits/lvbits): each layer its own configurations (codes, codebooks, lookup tables), and keys
// and values of a layer may differ (kbits != vbits): decode then takes quant_decode's dequantize-dot kernel with
// run-time widths, as it does for gain= or rotate=pca on c2b8 / c4b8.
// anchors=k|v (post-RoPE keys): the other tensor's anchor tokens are coded as any token at the prefill and at a
// decode-time promotion (anchor_requantize_kernel) and kept dequantized (fp16) in their anchor slots, which decode
// reads as any anchor: the quality of the method; the bytes of anchors=kv (the anchors are ~ratio of the tokens).
// With decode-time anchors an anchor also keeps an exact fp16 copy of that tensor (anchor_kpre / anchor_vsrc), so
// that a displaced anchor is coded from its exact rows as the CPU reference codes it (QuantizedKvCache::
// decide_leaving re-quantizes from the exact copies): one more FP16 row per anchor.
// What it runs is declared in quant/method_support.cpp (require_support in the constructor). Refused there: a
// width outside quant_decode's closed set (c2b8, c4b8, c8b8, c16b12, c16b8, c16b6), anchors=k|v with pre-RoPE
// keys, correct=on, commute at c16b12, with metric=task, with kbits != vbits or with gain= at c2b8 / c4b8
// (rotate=pca with commute: parse_method); the codebooks are checked by check_codebooks_fit
// (quant/codebook_fit.h), as in the CPU cache and the simulated quantizer.
// Counts (per sequence and layer, the same for every KV head): n_anchor anchors, n_window window tokens, n_quant
// quantized tokens; their sum is the sequence length. Per-layer ratios (lratio): each layer its own anchor ratio,
// so its own anchor capacity (ceil(ratio * capacity) + 1 slots), prefill anchors and decode-time budget
// ceil(ratio * length), as QuantizedKvCache::ratio_of; n_window is the same in every layer, n_anchor and n_quant
// are the layer's. A layer of ratio 0 keeps no anchors (and runs no decode-time anchors).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "io/codebooks.h"
#include "kernels/attention/quant_decode.h"
#include "kernels/common/device_buffer.h"
#include "model/model_config.h"
#include "quant/method.h"

namespace antkv {

struct CompressedSeqState {
  int n_quant = 0, n_anchor = 0, n_window = 0;
  int64_t n_entered = 0;  // tokens that ever entered the window ring (the next goes to slot n_entered % window)
  int length() const { return n_quant + n_anchor + n_window; }
};

class GpuCompressedKvCache {
 public:
  // A layer's configurations of keys and values (kbits != vbits: two; quant_decode then reads each tensor's widths
  // at run time, QuantDecodeParams::value_config).
  struct LayerWidths {
    cuda::VqKernelConfig keys = cuda::VqKernelConfig::kC8B8, values = cuda::VqKernelConfig::kC8B8;
  };
  // The cache of method m (vq or antkv) with its codebooks (refusals above); window: the FP16 decode ring's length
  // (m.decode_window from the runtime factory).
  GpuCompressedKvCache(const ModelConfig& cfg, const MethodSpec& m, const CodebookSet& cb, int max_batch,
                       int capacity, int window);
  // Synthetic codebooks (uniform fp16 in [-1, 1)): benchmarks and max-context, where decode time does not
  // depend on the values. widths: each layer's configurations (one per layer).
  // promote: decode steps run the online anchor rule (its cost in the benchmarks; scores start at 0).
  // gain_keys / gain_values / rotate: the coded transform with synthetic scales (uniform in [0.5, 1.5)), means and
  // bases (uniform in [-1, 1) / sqrt(head_dim)), run through the same decode as a real cache's (post- or pre-RoPE).
  GpuCompressedKvCache(const ModelConfig& cfg, const std::vector<LayerWidths>& widths, double anchor_ratio,
                       int max_batch, int capacity, int window, uint64_t seed, bool pre_rope = false,
                       bool promote = false, bool gain_keys = false, bool gain_values = false, bool rotate = false,
                       bool commute = false);
  ~GpuCompressedKvCache();

  const std::string& name() const { return name_; }
  cuda::VqKernelConfig config() const { return config_; }  // layer 0's keys' (per-layer widths: each layer its own)
  const LayerWidths& widths(int layer) const { return layer_cfg_.at(layer); }
  // fp16 lookup tables in quant_decode (c8b8: measured faster on the H200 at every batch and context, e.g.
  // 4.08x against 2.98x of fp16 flash-decoding at batch 16 / 128K; c16b12 always; others fp32)
  bool lut_half() const { return lut_half_; }
  bool pre_rope() const { return pre_; }
  bool gain_keys() const { return gain_k_; }
  bool gain_values() const { return gain_v_; }
  bool rotates() const { return rotate_; }
  bool task_metric() const { return task_; }
  // Whether decode runs quant_decode's coded transform (gain or rotate).
  bool coded_transform() const { return gain_k_ || gain_v_ || rotate_; }
  bool commute() const { return commute_; }  // key_rope=commute (implies pre_rope)
  bool promotes() const { return promote_; }
  int max_batch() const { return max_batch_; }
  int capacity() const { return capacity_; }          // tokens per sequence
  int anchor_capacity() const { return anchor_cap_; }  // the largest of any layer's
  int anchor_capacity(int layer) const;                 // layer's own (lratio: each layer its own ratio)
  int window() const { return window_; }
  // Device bytes held (all layers, all sequences; codebooks and workspace included).
  size_t device_bytes() const { return device_bytes_; }
  // Bytes of one sequence's cache at full capacity (codes, anchors with positions, window), all layers.
  size_t bytes_per_sequence() const;
  // Device bytes that grow with one more quantized token of one sequence (codes of K and V and their gain
  // scales, all layers).
  size_t code_bytes_per_token() const;

  void reset();  // every sequence empty
  // Sequence seq's counts in layer 0 (the same in every layer without per-layer ratios), and in `layer`.
  const CompressedSeqState& state(int seq) const { return seqs_.at(0).at(seq); }
  const CompressedSeqState& state(int seq, int layer) const { return seqs_.at(layer).at(seq); }
  int length(int seq) const { return seqs_.at(0).at(seq).length(); }

  // ---- prefill ----
  // Layer `layer` of the T-token prefill of the empty sequence `seq`: k, v are the chunk's fp32 post-RoPE keys
  // and values, k_pre its pre-RoPE keys (read only when pre_rope; device, [T, kv_heads, head_dim] with row
  // strides in elements); anchor_flags (host, [T, kv_heads],
  // 1 = FP16 anchor, null = none) must give every KV head the same number of anchors, at most anchor_capacity;
  // anchor_scores (host, [T, kv_heads]: the method's combined scores) start the running scores (promotes()).
  // K/V are rounded to fp16 before the nearest-centroid search (as the simulated caches do).
  void write_prefill(int layer, int seq, int T, const float* k, int64_t k_stride, const float* v, int64_t v_stride,
                     const float* k_pre, int64_t k_pre_stride, const uint8_t* anchor_flags,
                     const float* anchor_scores, cudaStream_t stream);
  // After every layer's write_prefill: the sequence holds T tokens.
  void commit_prefill(int seq, int T);

  // ---- decode ----
  // Moves sequences 0..B-1 one token on (host counts) and uploads the step (slots and counts) on `stream`.
  // The host buffer it copies from is reused by the next call: synchronize the stream in between.
  void plan_step(int B, cudaStream_t stream);
  // Uploads the counts of sequences 0..B-1 as they are, nothing appended (attention benchmarks).
  void upload_counts(int B, cudaStream_t stream);
  // The largest n_quant among sequences 0..B-1 (after plan_step: the decode plan's length).
  int max_quant(int B) const;
  // The decode plan of sequences 0..B-1 as they are now.
  cuda::QuantDecodePlan plan(int B, int n_heads) const;
  // Layer `layer`: token b's new K/V (fp32 post-RoPE, rows of `stride` elements, [B, kv_heads, head_dim];
  // k_pre [B, kv_heads, head_dim] dense, read when pre_rope) into the window; the token leaving a full window
  // into the code stream.
  void append(int layer, int B, const float* k, const float* v, int64_t stride, const float* k_pre,
              cudaStream_t stream);
  // Decode attention of layer `layer` for sequences 0..B-1: q [B, n_heads, head_dim] bf16 post-RoPE -> out
  // [B, n_heads, head_dim] bf16 (plan from plan_quant_decode(B, ..., max_quant(B))).
  void attend(int layer, int B, int n_heads, const cuda::bf16* q, cuda::bf16* out,
              const cuda::QuantDecodePlan& plan, float scale, cudaStream_t stream);

  // ---- synthetic contents (benchmarks, max-context) ----
  // Every code random bytes, every FP16 token uniform in [-1, 1) (codebooks untouched).
  void fill_random(uint64_t seed, cudaStream_t stream);
  // Sequence b holds lens[b] tokens: ceil(ratio * len) anchors (at most anchor_capacity), min(window, rest)
  // window tokens, the rest quantized (the split a prefill and decode steps would leave).
  void set_synthetic_lengths(const std::vector<int>& lens);
  // Tests: the positions of sequence seq's anchors in layer `layer`, [kv_heads][n_anchor] (slot order; synchronous).
  std::vector<int32_t> anchor_positions(int layer, int seq) const;
  // Tests: their running scores (promotes()), the same layout.
  std::vector<float> anchor_running_scores(int layer, int seq) const;
  // Tests: every FP16 slot NaN and every code byte 0xFF, so that a read past the counts shows.
  void poison();

 private:
  struct Layer;
  // ratios: each layer's anchor ratio (0: no anchors in that layer)
  void allocate(const ModelConfig& cfg, int max_batch, int capacity, int window, const std::vector<double>& ratios,
                bool pre_rope, bool promote);
  // K then V of n_tokens fp16 rows [n_tokens, kv_heads, head_dim] into layer L's code streams (quantize_kv:
  // slot per token, or slot_per_head), through encode_rows_kernel first when the tensor is rotated, gain-coded
  // or searched in a metric (enc: fp32 rows and norms of n_tokens tokens: the decode step's own buffers, which
  // captured graphs hold, or the prefill's)
  void quantize_pair(Layer& L, int n_tokens, const __half* k, const __half* v, const int32_t* seq_index,
                     const int32_t* slot, const int32_t* slot_per_head, float* enc_rows, float* enc_norms,
                     cudaStream_t stream);
  // The rotation, mean and metric tables of layer l from the codebooks (rotate=pca, metric=task).
  void upload_transforms(int l, const CodebookSet& cb, const MethodSpec& m);
  // anchors=k|v: the other tensor's anchor slots coded and rewritten dequantized, in place: slots 0..blocks-1 of
  // sequence seq (prefill), or sequence b's slot slot_of[b][h] for b < blocks (a decode step's promotions)
  void requantize_anchors(Layer& L, int blocks, int seq, const int32_t* slot_of, cudaStream_t stream);
  std::string name_;
  cuda::VqKernelConfig config_ = cuda::VqKernelConfig::kC8B8;
  int n_layers_ = 0, n_kv_ = 0, n_heads_ = 0, d_ = 0;
  int max_batch_ = 0, capacity_ = 0, anchor_cap_ = 0, window_ = 0;
  bool lut_half_ = false, pre_ = false, promote_ = false;
  bool gain_k_ = false, gain_v_ = false, rotate_ = false, task_ = false;
  bool fp8_norm_ = false;  // norm=fp8: the gain norm E4M3-rounded before its fp16 scale norm / |u| is kept
  int anchor_quant_side_ = -1;  // anchors=k: 1 (the anchors' values are quantized), anchors=v: 0 (keys); else -1
  cuda::DeviceBuffer<float> inv_freq_;  // [head_dim / 2] (pre_rope)
  bool commute_ = false;
  cuda::DeviceBuffer<int32_t> pair_order_;  // commute: [head_dim] rope_pair_order
  // commute: pre-RoPE keys in pair order, [max_batch | T, kv_heads * head_dim]: decode steps' (fixed: captured decode
  // graphs hold the pointer) and a prefill's
  cuda::DeviceBuffer<float> pair_rows_, prefill_pairs_;
  void set_commute(const ModelConfig& cfg, const std::string& who);
  // commute: k_pre rows put in pair order into buf (dense), else k_pre itself
  const float* pair_ordered(const float* k_pre, int64_t& stride, int rows, cuda::DeviceBuffer<float>& buf,
                            cudaStream_t stream);
  size_t device_bytes_ = 0;
  std::vector<std::unique_ptr<Layer>> layers_;
  std::vector<LayerWidths> layer_cfg_;  // each layer's configurations (set before allocate)
  std::vector<std::vector<CompressedSeqState>> seqs_;  // [layer][sequence] (per-layer ratios: each layer its counts)
  // step: evict_slot | new_slot | code_slot | n_quant | n_anchor | n_window | seq_index | evict_pos,
  // [layer][8][max_batch]
  cuda::DeviceBuffer<int32_t> step_d_;
  int32_t* step_field(int layer, int field) const {
    return step_d_.get() + (static_cast<size_t>(layer) * 8 + field) * max_batch_;
  }
  cuda::PinnedBuffer<int32_t> step_h_;
  int step_B_ = 0;
  cuda::DeviceBuffer<__half> stage_k_, stage_v_;  // [max_batch, kv_heads, head_dim]: tokens leaving the window
  cuda::DeviceBuffer<__half> prefill_k_, prefill_v_, prefill_kpre_;  // [T, kv_heads, head_dim]: a prefill's fp16 K/V
  std::vector<int> pending_anchors_;              // [layer] anchors per head of the prefill being written, -1: none
  cuda::DeviceBuffer<int32_t> prefill_ints_;      // slot_per_head [T, KV] | seq_index [T] | anchor_idx [KV, A]
  std::vector<int32_t> prefill_h_;
  cuda::DeviceBuffer<float> workspace_;
  cuda::DeviceBuffer<float> lse_;                 // promote: [max_batch, n_heads] this step's log-sum-exp
  cuda::DeviceBuffer<float> logits_;              // promote: [max_batch, n_heads, anchor_cap + window] its FP16 scores
  cuda::DeviceBuffer<float> prefill_score_;       // promote: [T, kv_heads] a prefill's anchor scores
  cuda::DeviceBuffer<int32_t> promo_slot_;        // promote, anchors=k|v: [max_batch, kv_heads] this step's promotions
  // coded transform: the step's rotated queries and mean dots, [max_batch, n_heads, head_dim] and [max_batch, n_heads]
  cuda::DeviceBuffer<float> q_rot_, q_mean_;
  // encode (rotate, gain, metric): fp32 rows and norms of the decode step's tokens [max_batch, kv_heads, head_dim]
  // / [max_batch, kv_heads], and of a prefill's [T, ...]
  cuda::DeviceBuffer<float> step_enc_, step_norm_, prefill_enc_, prefill_norm_;
};

}  // namespace antkv
