#include "runtime/kv_cache.h"

#include <Eigen/Core>

#include "core/error.h"

namespace antkv {

KvDType parse_kv_dtype(const std::string& s) {
  if (s == "fp32") return KvDType::kF32;
  if (s == "fp16") return KvDType::kF16;
  if (s == "bf16") return KvDType::kBF16;
  fail("unknown KV cache dtype \"{}\" (expected fp32, fp16 or bf16)", s);
}

const char* kv_dtype_name(KvDType t) {
  switch (t) {
    case KvDType::kF32: return "fp32";
    case KvDType::kF16: return "fp16";
    case KvDType::kBF16: return "bf16";
  }
  return "?";
}

DenseKvCache::DenseKvCache(const ModelConfig& cfg, KvDType dtype)
    : dtype_(dtype), row_(static_cast<size_t>(cfg.kv_dim())), k_(cfg.num_layers), v_(cfg.num_layers) {}

std::string DenseKvCache::name() const { return std::string("dense-") + kv_dtype_name(dtype_); }

void DenseKvCache::reset() {
  for (auto& k : k_) k.clear();
  for (auto& v : v_) v.clear();
}

namespace {
void append_rounded(std::vector<float>& dst, const float* src, size_t n, KvDType t) {
  const size_t old = dst.size();
  dst.resize(old + n);
  float* out = dst.data() + old;
  for (size_t i = 0; i < n; ++i) {
    switch (t) {
      case KvDType::kF32: out[i] = src[i]; break;
      case KvDType::kF16: out[i] = static_cast<float>(Eigen::half(src[i])); break;
      case KvDType::kBF16: out[i] = static_cast<float>(Eigen::bfloat16(src[i])); break;
    }
  }
}
}  // namespace

void DenseKvCache::append(const KvAppend& a) {
  ANTKV_CHECK(a.layer >= 0 && a.layer < static_cast<int>(k_.size()), "KV cache: layer {} out of range", a.layer);
  ANTKV_CHECK(a.position0 == length(a.layer), "KV cache: layer {} appends at position {} but holds {} tokens",
              a.layer, a.position0, length(a.layer));
  const size_t n = static_cast<size_t>(a.n_tokens) * row_;
  append_rounded(k_[a.layer], a.k_post_rope, n, dtype_);
  append_rounded(v_[a.layer], a.v, n, dtype_);
}

size_t DenseKvCache::stored_bytes() const {
  const size_t elem = dtype_ == KvDType::kF32 ? 4 : 2;
  size_t n = 0;
  for (size_t l = 0; l < k_.size(); ++l) n += (k_[l].size() + v_[l].size()) * elem;
  return n;
}

}  // namespace antkv
