// A Hugging Face checkpoint directory: config.json, model.safetensors (or shards listed in
// model.safetensors.index.json), tokenizer.json. Tensors stay memory-mapped; runtimes convert them to
// their own dtype and device. Lookups check names, shapes and dtypes and name file and tensor on error.
#pragma once
#include <memory>
#include <string>
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

 private:
  std::string dir_;
  ModelConfig config_;
  std::vector<std::shared_ptr<SafetensorsFile>> files_;
  std::map<std::string, const TensorView*> index_;
};

}  // namespace antkv
