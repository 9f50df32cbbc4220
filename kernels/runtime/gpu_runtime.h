// GpuRuntime: the transformer on one CUDA GPU (antkv::Runtime), for LLaMA-family checkpoints.
// Weights are uploaded once as bf16 (fp16/fp32 converted on load; norm weights and biases fp32).
// Activations: fp32 residual stream and GEMM outputs, bf16 GEMM inputs, bf16 KV cache (see kernels/runtime/ops.h).
// The KV cache is one preallocated arena per layer, [max_batch, kv_heads, max_context, head_dim] for K
// and for V; forward() uses sequence slot 0, decode_batch() slots 0..B-1. Nothing is allocated on the
// device in a decode step (scratch grows only when a longer prefill chunk than before arrives).
// A KV-cache quantizer (kernels/quant/simulated_quantizer.h) may be installed: forward() then hands it every layer's new
// tokens after their K/V are in the cache and before attention reads it (fake quantization in place).
// With compressed_kv the cache is real instead: no bf16 arena; a GpuCompressedKvCache
// (kernels/quant/compressed_cache.h) holds codes, anchors and the FP16 window, prefill (one chunk into an
// empty sequence, anchors chosen by the installed quantizer) writes it and every decode step reads it
// through quant_decode. With uniform_kv the same for the packed-integer uniform cache (GpuUniformKvCache,
// kernels/quant/uniform_cache.h).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "runtime/runtime.h"

namespace antkv {

class Checkpoint;
class GpuKvQuantizer;
class GpuCompressedKvCache;
class GpuUniformKvCache;

struct GpuRuntimeOptions {
  int max_context = 0;  // KV capacity per sequence; 0: min(max_position_embeddings, 8192), at least 2048
  int max_batch = 1;    // sequences in the KV arena (for decode_batch)
  int device = 0;       // CUDA device ordinal
  bool use_graphs = true;  // decode_batch replays a captured CUDA graph per (batch, split plan); off with
                           // ANTKV_CUDA_SYNC=1
  bool compressed_kv = false;  // the KV cache is a GpuCompressedKvCache (set_compressed_cache), no bf16 arena
  bool uniform_kv = false;     // the KV cache is a GpuUniformKvCache (set_uniform_cache), no bf16 arena
};

class GpuRuntime : public Runtime {
 public:
  // Weights from a checkpoint.
  GpuRuntime(const Checkpoint& ckpt, const GpuRuntimeOptions& opt = {});
  // Random weights of the shapes in cfg (benchmarks on real shapes): reproducible from seed.
  GpuRuntime(const ModelConfig& cfg, uint64_t seed, const GpuRuntimeOptions& opt = {});
  ~GpuRuntime() override;

  const ModelConfig& config() const override;
  std::string device_name() const override;
  void reset() override;                // all sequences emptied
  int cached_tokens() const override;   // of sequence 0
  void forward(const ForwardRequest& req, ForwardResult& out) override;

  // ---- KV-cache quantizer hook (kernels/quant/simulated_quantizer.h) ----
  // In every forward() (prefill chunks and one-token steps), for each layer: after the chunk's q, pre-RoPE k,
  // post-RoPE k and v are computed (fp32) and the K/V written to the bf16 cache, and before attention reads
  // the cache, q->on_layer() may rewrite the cache entries. reset() resets it too. Null (the default): the
  // plain bf16 cache. decode_batch() throws while one is set. Replacing it mid-sequence is the caller's call
  // (the new one expects position 0: reset() first).
  void set_kv_quantizer(std::unique_ptr<GpuKvQuantizer> q);
  GpuKvQuantizer* kv_quantizer() const;

  // ---- the compressed cache (GpuRuntimeOptions::compressed_kv) ----
  // Its max_batch and capacity must be the runtime's. A prefill (forward of n > 1 tokens) goes into an empty
  // sequence 0 only; its anchors are the installed quantizer's (antkv; none without a quantizer or for vq),
  // and the quantizer also gives the prefill's own attention its simulated K/V, so that a prefill's
  // logits are the simulated path's. Decode (forward of one token, decode_batch) reads the compressed cache.
  void set_compressed_cache(std::unique_ptr<GpuCompressedKvCache> c);
  GpuCompressedKvCache* compressed_cache() const;

  // ---- the packed-integer uniform cache (GpuRuntimeOptions::uniform_kv; kernels/quant/uniform_cache.h) ----
  // Its max_batch and capacity must be the runtime's. As the compressed cache: a prefill (forward of n > 1
  // tokens) goes into an empty sequence 0 only and is quantized into it (write_prefill), its own attention over
  // the installed quantizer's simulated K/V (so its logits are the simulated path's); decode (forward of one
  // token, decode_batch) appends to it and reads it. Bench and max-context fill it with fill_kv_random and
  // set_batch_lengths.
  void set_uniform_cache(std::unique_ptr<GpuUniformKvCache> c);
  GpuUniformKvCache* uniform_cache() const;

  // ---- batched decode (sequences 0..B-1 of the arena) ----
  int max_batch() const;
  int capacity() const;  // tokens per sequence
  // Declares that sequence b holds lens[b] tokens (b < lens.size()), e.g. after fill_kv_random() for a
  // benchmark; lengths beyond capacity are an error.
  void set_batch_lengths(const std::vector<int>& lens);
  std::vector<int> batch_lengths() const;
  // Fills every cache slot of every layer with random bf16 values (benchmarks: decode time does not
  // depend on the values); with the compressed cache, random codes and FP16 tokens, and set_batch_lengths
  // splits each length into anchors, window and codes as a prefill and decode would.
  void fill_kv_random(uint64_t seed);
  // One decode step: tokens[b] is the next token of sequence b (B = tokens.size() <= max_batch), at
  // position batch_lengths()[b]. When set, logits gets [B, vocab] and next_tokens the greedy argmax [B].
  void decode_batch(const std::vector<int32_t>& tokens, std::vector<float>* logits,
                    std::vector<int32_t>* next_tokens);
  // Waits for the runtime's stream (benchmarks time around it).
  void synchronize();
  void set_use_graphs(bool on);

  size_t weight_bytes() const;          // device bytes of all weights
  size_t step_weight_bytes() const;     // weight bytes one decode step reads (all but an untied embedding)
  size_t kv_bytes_per_token() const;    // K+V bytes of one token over all layers (compressed: its codes)
  size_t kv_device_bytes() const;       // device bytes of the KV cache (arena, or the compressed cache)

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

std::unique_ptr<Runtime> make_gpu_runtime(const Checkpoint& ckpt, const GpuRuntimeOptions& opt = {});

}  // namespace antkv
