// A Hugging Face checkpoint directory: config.json, model.safetensors (or shards listed in
// model.safetensors.index.json), tokenizer.json. Tensors stay memory-mapped; runtimes convert them to
// their own dtype and device. Lookups check names, shapes and dtypes and name file and tensor on error.
#pragma once
#include <memory>
#include <string>

#include "core/error.h"
#include <vector>

#include "model/model_config.h"
#include "model/safetensors.h"

namespace antkv {

class Checkpoint {
 public:
  static Checkpoint open(const std::string& dir);  // validates every tensor the model needs

  const std::string& dir() const { return dir_; }
  const ModelConfig& config() const { return config_; }
  std::string tokenizer_path() const { return dir_ + "/tokenizer.json"; }

  bool has(const std::string& name) const;
  // The tensor, checked to have `shape` and a floating dtype (bf16/fp16/fp32).
  const TensorView& tensor(const std::string& name, const std::vector<int64_t>& shape) const;
  const TensorView& tensor(const std::string& name) const;

  // HF LLaMA names: "model.layers.{l}.self_attn.q_proj.weight", ...
  static std::string layer_name(int layer, const char* suffix);
  // The LM head: "lm_head.weight", or the embedding when tied.
  const TensorView& lm_head() const;
  size_t total_bytes() const;
  // XXH3-128 of the whole content of every safetensors file (in name order) and of tokenizer.json: what
  // the weights and the tokenization are, for the fingerprints of outputs made from this checkpoint
  // (~10 GB/s from the page cache; computed once).
  const std::string& content_hash() const;
  // The first weight that is NaN or infinite, as "tensor \"name\" (file) element i = nan", or "" when all
  // are finite (scans every tensor: called after a non-finite result, to name its cause).
  std::string find_non_finite_weight() const;

 private:
  std::string dir_;
  ModelConfig config_;
  std::vector<std::shared_ptr<SafetensorsFile>> files_;
  std::map<std::string, const TensorView*> index_;
  mutable std::string content_hash_;
};

// Token ids of `text_path` (from this checkpoint's tokenizer.json) must be inside the model's vocabulary; an id
// outside it means a tokenizer of another model: an error naming the text, the tokenizer and config.json.
void check_token_ids(const std::vector<int32_t>& ids, const Checkpoint& ckpt, const std::string& text_path);

// Rethrows a NonFinite error with its cause in the checkpoint appended (the first non-finite weight, or
// that every weight is finite).
[[noreturn]] void rethrow_with_weight_check(const NonFinite& e, const Checkpoint& ckpt);

}  // namespace antkv
