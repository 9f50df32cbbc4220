// The KV cache behind the CPU runtime. Quantizers plug in here: append() receives each layer's new
// keys and values in full precision, and keys()/values() give what attention reads (for a quantizing
// cache: the dequantized values, with anchors and the recent window in FP16). The dense cache stores
// fp32, fp16 or bf16 (rounded on append).
#pragma once
#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include "model/model_config.h"

namespace antkv {

// New tokens of one layer, fp32 row-major:
struct KvAppend {
  int layer = 0;
  int n_tokens = 0;
  int position0 = 0;                  // position of the first new token
  const float* k_pre_rope = nullptr;  // [n_tokens, kv_heads, head_dim]
  const float* k_post_rope = nullptr; // [n_tokens, kv_heads, head_dim]
  const float* v = nullptr;           // [n_tokens, kv_heads, head_dim]
  const float* q = nullptr;           // [n_tokens, num_heads, head_dim] post-RoPE queries (anchor scores)
};

class KvCache {
 public:
  virtual ~KvCache() = default;
  virtual std::string name() const = 0;
  virtual void reset() = 0;
  virtual int length(int layer) const = 0;
  virtual void append(const KvAppend& a) = 0;
  // What attention reads, post-RoPE keys and values: [length(layer), kv_heads, head_dim] fp32.
  virtual const float* keys(int layer) const = 0;
  virtual const float* values(int layer) const = 0;
  // Bytes the cache would occupy in its storage format (codes, FP16 parts, metadata).
  virtual size_t stored_bytes() const = 0;
  // Optional: [length(layer), kv_heads] per-channel mean squared error of each stored key (0 for exact
  // keys), for attention's score correction; null when the cache asks for none.
  virtual const float* key_error(int /*layer*/) const { return nullptr; }
};

enum class KvDType { kF32, kF16, kBF16 };
KvDType parse_kv_dtype(const std::string& s);  // "fp32" | "fp16" | "bf16"
const char* kv_dtype_name(KvDType t);

// Keys and values rounded to `dtype` on append (fp16 is the toolkit's FP16 baseline).
class DenseKvCache : public KvCache {
 public:
  DenseKvCache(const ModelConfig& cfg, KvDType dtype);
  std::string name() const override;
  void reset() override;
  int length(int layer) const override { return static_cast<int>(k_[layer].size() / row_); }
  void append(const KvAppend& a) override;
  const float* keys(int layer) const override { return k_[layer].data(); }
  const float* values(int layer) const override { return v_[layer].data(); }
  size_t stored_bytes() const override;

 private:
  KvDType dtype_;
  size_t row_;  // kv_heads * head_dim
  std::vector<std::vector<float>> k_, v_;
};

}  // namespace antkv
