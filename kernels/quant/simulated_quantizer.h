// kernels/quant/: the GPU counterparts of lib/quant's KV caches.
// The simulated GPU quantizer (design note §5): the methods of lib/quant/method.h applied to GpuRuntime's bf16
// KV arena as *fake quantization*: after a layer's new K/V are in the cache and before attention reads them, the
// quantizer rewrites the new tokens' cache entries with their dequantized values. What each method and option
// means: docs/METHODS.md. The semantics are those of the CPU reference cache QuantizedKvCache
// (lib/quant/quantized_cache.h), step for step; the only systematic difference is that the arena holds bf16, so
// every value the CPU cache holds in fp32 (an fp16-rounded token, a dequantized value) is rounded once more, to
// bf16, when stored (fp16: bf16(fp16(x)), within 2^-9 relative of the CPU's value).
//
// How it runs each part on the GPU:
//   uniform     group quantization of fp16 copies; the tokens still waiting (window, incomplete key group) are
//               carried over from their exact fp16 copies until a later forward() completes the group or moves
//               them out of the window.
//   vq / antkv  nearest centroid per group of c channels with the codebooks uploaded once; antkv's prefill
//               anchors from the chunk's full-precision attention (kernels/anchor/anchor_scores.h on the
//               runtime's fp32 q/k/v), combined with the codebooks' error_norm as combine_anchor_scores and
//               selected on the host as QuantizedKvCache does; key_rope=pre rotates the dequantized keys with the
//               runtime's RoPE kernel and inv_freq; key_rope=commute codes them in RoPE pair order first
//               (quant/vq.h rope_pair_order; cuda::permute_pair_order there and back).
//   gain, rotate=pca, metric=task  gain_kernel, rotate_kernel (a batched d x d product per row and head) and
//               metric_forward_kernel (L^T x against L^T c precomputed at upload); norms and products are summed
//               in fp64 in the CPU's order, so codes and values are the CPU's bit for bit before the bf16 store.
//   rsq         rsq_kernel (quant/vq.h rsq_quantize), with the same prefill / decode-window flow as vq.
//   per-layer lists  each layer's arrays in that layer's configuration (MethodSpec::key_config / value_config,
//               ratio_of).
// Decode (one-token forwards): tokens wait in FP16 for the method's decode window (recipe anchor.window) as on
// the CPU; exact fp16 copies of the waiting tokens are kept on the device in a small per-layer ring (window +
// group or decode_window + 1 tokens), so nothing is re-read from the bf16 arena. Decode-time anchors
// (quant/anchor_rule.h) are decided on the host from running scores kept in double, to which each step's
// attention row over the bf16 arena (attention_row_kernel, fp32) adds; a displaced anchor is quantized from an
// exact fp16 copy (all rows of the layer are kept, [3][capacity][kvd] fp32, while the rule runs).
// Refused, with an error naming the method: correct=on (the CPU attention's score correction), group sizes c
// outside 1, 2, 4, 8, 16, 32, b outside [1, 16], rotate=pca with head_dim > 512, rsq with a head_dim that is not
// a power of 2 in [2, 1024], uniform whose min(group, head_dim) does not divide head_dim.
// GpuRuntime::decode_batch() does not support a quantizer (it throws when one is set). The compressed (real)
// cache is kernels/quant/compressed_cache.h; gpu_method_runtime_factory (kernels/runtime/method_runtime_factory.h)
// keeps fp16, uniform and rsq on this quantizer there.
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

// The quantizer of `method`; codebooks are required for vq/antkv and checked by check_codebooks_fit
// (quant/codebook_fit.h, the check of the CPU cache and the compressed cache too) plus this quantizer's own
// limits (above); errors name the method. rsq needs none. Codebooks are uploaded to the current CUDA device here.
// decode_window: the newest tokens kept FP16 during decode (the method's decode_window, recipe anchor.window).
std::unique_ptr<GpuKvQuantizer> make_gpu_kv_quantizer(const ModelConfig& cfg, const MethodSpec& method,
                                                      std::shared_ptr<const CodebookSet> codebooks,
                                                      int decode_window = 128);

}  // namespace antkv
