// kernels/quant/: the GPU counterparts of lib/quant's KV caches.
// KV-cache quantizers on the GPU (design note §5): the compared methods of lib/quant/method.h applied to
// GpuRuntime's bf16 KV arena as *fake quantization*: after a layer's new K/V are in the cache and before
// attention reads them, the quantizer rewrites the new tokens' cache entries with their dequantized values.
// The semantics are those of the CPU reference cache QuantizedKvCache (lib/quant/quantized_cache.h), step
// for step; the only systematic difference is that the arena holds bf16, so every value the CPU cache holds
// in fp32 (an fp16-rounded token, a dequantized value) is rounded once more, to bf16, when stored:
//   fp16     each new token's K and V rounded to fp16 (the CPU FP16 baseline), then stored as bf16: the
//            stored value is bf16(fp16(x)), within 2^-9 relative of what the CPU fp16 cache holds (the same
//            bf16 rounding the plain GpuRuntime applies; fp16's range limit 65504 and its subnormals apply).
//   uniform  KIVI-style: keys per channel over complete groups of `group` tokens, values per token over groups
//            of min(group, head_dim) channels; fp16 scale and zero point (asymmetric, round half to even);
//            the newest `window` tokens and an incomplete key group stay FP16 (carried over, from their exact
//            fp16 copies, until a later forward() completes the group or moves them out of the window).
//   vq       nearest centroid (squared L2, ties to the lowest index) per group of c channels, codebooks per
//            (layer, KV head, group), uploaded once; no anchors.
//   antkv    vq, plus ceil(ratio * n) FP16 anchor tokens per KV head in every prefill chunk of n > 1
//            tokens, from the chunk's full-precision attention (kernels/anchor/anchor_scores.h on the runtime's fp32
//            q/k/v), combined with the codebooks' error_norm as e_K / e_V exactly as combine_anchor_scores,
//            selected on the host (select_anchors when the chunk starts at position 0, so token 0 is always
//            an anchor; else the plain top ceil(ratio * n), as QuantizedKvCache does).
//   key_rope: pre   the fp16 pre-RoPE keys are quantized with the pre-RoPE codebooks, dequantized and rotated to
//            their positions (the runtime's RoPE kernel and inv_freq); anchors keep their post-RoPE keys.
//   gain=k|kv  (vq/antkv) gain-shape VQ of keys (and values): per token and KV head the fp16 L2 norm and the
//            nearest centroids of the unit direction, renormalized to the stored norm (quant/vq.h gain_normalize /
//            gain_restore; gain_kernel).
//   rotate=pca (vq/antkv) coded in the codebooks' centered basis: x' = R (x - mean) before the above, mean + R^T x'
//            after (rotate_forward / rotate_inverse; rotate_kernel, a batched d x d product per row and head).
//            Combines with gain (the norm of R (x - mean)), key_rope=pre and anchors (which keep exact values).
//            Norms and d x d products are summed in fp64 in the CPU's order (a float product is exact in fp64),
//            so the results are the CPU's floats bit for bit before the bf16 store.
//   metric=task (vq/antkv) codes assigned in the task metric: per (layer, KV head, group) the codebooks' fp16
//            factor L; the coded vector (after rotate=pca / gain, as on the CPU) is mapped to L^T x and searched
//            against L^T c, precomputed at upload by the CPU's metric_forward (quant/vq.h vq_quantize_metric); the
//            winner's original-space centroid is stored (metric_forward_kernel: fp64 in the CPU's order, so L^T x
//            is the CPU's bit for bit and the codes are the CPU's, ties to the lowest index).
//   lkbits= / lvbits= / lratio=  (vq/antkv) per layer its own key and value configuration c/b (the codebook set
//            holds each layer's arrays in that layer's shape, MethodSpec::key_config / value_config) and its own
//            anchor ratio (MethodSpec::ratio_of; a layer at 0 keeps no anchors), as QuantizedKvCache.
//   rsq      training-free: random-sign Hadamard rotation, fp16 norm, Lloyd-Max levels of N(0, 1) per coordinate,
//            renormalized and rotated back (quant/vq.h rsq_quantize; rsq_kernel), bits 1-4, no anchors; same
//            prefill / decode-window flow as vq; key_rope=pre quantizes the pre-RoPE keys.
// Inputs of quantization are the fp16-rounded K/V (the CPU cache quantizes its fp16 copies too); anchor scores
// use the unrounded fp32 q/k/v, as on the CPU.
// Decode (one-token forwards), as QuantizedKvCache: vq/antkv tokens stay FP16 while among the newest
// `decode_window` (128) tokens and are quantized when they leave it, or kept as anchors by the online rule
// (promote=on, the default for antkv): quant/anchor_rule.h decides on the host from running scores kept in
// double, each step's attention row over the bf16 arena (attention_row_kernel, fp32) adds to them, and a
// displaced anchor is quantized from an exact fp16 copy (all rows of the layer are kept, [3][capacity][kvd]
// fp32, while the rule runs); uniform follows its own `window` and key groups. Exact fp16 copies of the tokens still waiting are kept on the device in a small
// per-layer ring (window + group or decode_window + 1 tokens), so nothing is re-read from the bf16 arena.
// A prefill chunk (n > 1) after decode steps quantizes only its own tokens (the waiting ones stay FP16), as on
// the CPU. GpuRuntime::decode_batch() does not support a quantizer (it throws when one is set); the option
// correct=on (the CPU attention's score correction) is refused with an error naming the method. The compressed
// (real) cache refuses gain=, rotate=, metric=task, per-layer widths and ratios (lkbits, lvbits, lratio) and rsq
// (real_cache in gpu_method_runtime_factory, kernels/runtime/method_runtime_factory.h, keeps rsq simulated, as
// fp16 and uniform).
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "io/codebooks.h"
#include "kernels/runtime/gpu_runtime.h"
#include "model/model_config.h"
#include "quant/method.h"

namespace antkv {

// One layer's new tokens of one forward() (sequence 0), handed to the quantizer: the layer's device
// activations as a device observer sees them (runtime/runtime.h: fp32 q [n, num_heads, head_dim] post-RoPE,
// k_pre / k_post / v [n, num_kv_heads, head_dim], row strides in elements; n = n_tokens at position0 =
// cache slot of the first), plus what the quantizer needs of the cache:
struct GpuKvLayerChunk : DeviceLayerActivations {
  const int32_t* positions = nullptr;  // [n] the tokens' positions (position0 + t)
  const float* inv_freq = nullptr;     // [head_dim / 2] RoPE inverse frequencies (rope_inv_freq)
  // This layer's cache of sequence 0, [num_kv_heads, capacity, head_dim] bf16: token t of the chunk is in
  // slot position0 + t (already written by the runtime as bf16 of the fp32 K/V); slots [0, position0) hold
  // earlier tokens. The quantizer may rewrite any slot < position0 + n.
  __nv_bfloat16* k_cache = nullptr;
  __nv_bfloat16* v_cache = nullptr;
  int capacity = 0;
};

class GpuKvQuantizer {
 public:
  virtual ~GpuKvQuantizer() = default;
  virtual std::string name() const = 0;
  // A new sequence (GpuRuntime::reset calls it).
  virtual void reset() = 0;
  // Rewrites the chunk's cache entries (and any earlier ones whose turn has come) on `stream`. Chunks of a
  // layer must arrive in order: c.position0 == the tokens this quantizer has seen for the layer.
  virtual void on_layer(const GpuKvLayerChunk& c, cudaStream_t stream) = 0;
  // Anchor flags of layer l: [tokens seen, num_kv_heads], 1 = kept in FP16 as an anchor (all 0 without anchors).
  virtual const std::vector<uint8_t>& anchor_flags(int layer) const = 0;
  // Anchor scores of layer l as the method combined them, [tokens seen, num_kv_heads] (empty without anchors;
  // entries of prefill chunks): where the compressed cache's running scores start.
  virtual const std::vector<float>& anchor_scores(int layer) const = 0;
};

// The quantizer of `method`; codebooks are required for vq/antkv and validated like QuantizedKvCache's (model
// hash, c/b, key_rope, gain, rotate, metric, layer/head counts, the per-layer lists' length) plus every layer's
// centroid, error_norm, (rotate=pca) rotation and mean and (metric=task) factor array sizes in that layer's
// configuration; errors name the method. rsq needs none. Codebooks are uploaded to the current CUDA device here.
std::unique_ptr<GpuKvQuantizer> make_gpu_kv_quantizer(const ModelConfig& cfg, const MethodSpec& method,
                                                      std::shared_ptr<const CodebookSet> codebooks,
                                                      int decode_window = 128);

}  // namespace antkv
