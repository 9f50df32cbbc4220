// The built-in transformer runtime. A Runtime owns the model weights (on its device) and one sequence's
// KV cache; forward() runs a chunk of tokens at the next positions (prefill of a window, or one decode
// step), appending their K/V to the cache. CPU (CpuRuntime) and CUDA (GpuRuntime) implement it.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "model/model_config.h"

namespace antkv {

class Checkpoint;

// Per-layer activations handed to an observer (calibration dumps them, anchor scores use them).
// All fp32, row-major, on the host:
struct LayerActivations {
  int layer = 0;
  int n_tokens = 0;            // tokens of this forward() call
  int position0 = 0;           // position of the first of them
  const float* q = nullptr;           // [n_tokens, num_heads, head_dim], post-RoPE
  const float* k_pre_rope = nullptr;  // [n_tokens, num_kv_heads, head_dim]
  const float* k_post_rope = nullptr; // [n_tokens, num_kv_heads, head_dim]
  const float* v = nullptr;           // [n_tokens, num_kv_heads, head_dim]
};

// The same activations left on the device (GpuRuntime), fp32 row-major with row strides in elements,
// valid until the layer's attention runs; `stream` is the runtime's cudaStream_t (work enqueued on it is
// ordered before the rest of the forward pass).
struct DeviceLayerActivations {
  int layer = 0;
  int n_tokens = 0;
  int position0 = 0;
  const float* q = nullptr;       // [n_tokens, num_heads, head_dim], post-RoPE
  const float* k_pre = nullptr;   // [n_tokens, num_kv_heads, head_dim]
  const float* k_post = nullptr;  // [n_tokens, num_kv_heads, head_dim]
  const float* v = nullptr;       // [n_tokens, num_kv_heads, head_dim]
  int64_t q_stride = 0, k_pre_stride = 0, k_post_stride = 0, v_stride = 0;
  void* stream = nullptr;
};

class ForwardObserver {
 public:
  virtual ~ForwardObserver() = default;
  virtual void on_layer(const LayerActivations& act) = 0;
  // When true, a GPU runtime calls on_layer_device instead of on_layer: no copies to the host, no
  // synchronization per layer (the observer enqueues its own work on the runtime's stream).
  virtual bool wants_device() const { return false; }
  virtual void on_layer_device(const DeviceLayerActivations& /*act*/) {}
};

enum class LogitsMode { kNone, kLast, kAll };

struct ForwardRequest {
  const int32_t* tokens = nullptr;   // [n_tokens]
  int n_tokens = 0;
  LogitsMode logits = LogitsMode::kNone;
  // When set: [n_tokens] next-token targets (negative = skip); the result holds per-position NLL,
  // computed in row chunks so that [n_tokens, vocab] logits are never materialized whole.
  const int32_t* targets = nullptr;
  ForwardObserver* observer = nullptr;
};

struct ForwardResult {
  std::vector<float> logits;  // [rows, vocab]: rows = n_tokens (kAll), 1 (kLast), 0 (kNone)
  std::vector<float> nll;     // [n_tokens] when targets were given
};

class Runtime {
 public:
  virtual ~Runtime() = default;
  virtual const ModelConfig& config() const = 0;
  virtual std::string device_name() const = 0;
  virtual void reset() = 0;                // empties the KV cache (a new sequence)
  virtual int cached_tokens() const = 0;   // tokens in the KV cache
  virtual void forward(const ForwardRequest& req, ForwardResult& out) = 0;
};

}  // namespace antkv
