// Small Hugging Face-layout checkpoints with random weights, written by the tests themselves (no model
// weights are committed): config.json + model.safetensors (or shards with model.safetensors.index.json).
// Weights: matrices N(0, 1/fan_in), norms 1 + N(0, 0.2), q/k/v biases N(0, 0.5), from one seed; biases come
// from their own stream and an untied LM head is drawn last, so the other weights do not depend on them.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace antkv::test {

struct TensorData {
  std::string name;
  std::vector<int64_t> shape;
  std::vector<float> values;  // row-major
};

// One .safetensors file: the values stored as dtype F32, BF16 or F16 (rounded to nearest even).
void write_safetensors(const std::string& path, const std::vector<TensorData>& tensors, const std::string& dtype);

struct SyntheticCheckpoint {
  std::string model_type = "llama";
  int hidden = 32, layers = 2, heads = 4, kv_heads = 2, head_dim = 8, ffn = 48, vocab = 64;
  bool bias = false;           // q/k/v biases (qwen2)
  bool tied = true;            // false: lm_head.weight is written
  std::string dtype = "F32";   // F32 | BF16 | F16
  int shards = 1;              // 2: layers from layers/2 on go to the second file, with an index
  double rms_norm_eps = 1e-5, rope_theta = 10000.0;
  std::string config_extra = "{}";  // a JSON object merged into config.json (e.g. rope_scaling)
  uint32_t seed = 1234;
};

std::vector<TensorData> synthetic_tensors(const SyntheticCheckpoint& m);
// Writes the checkpoint into dir (created); returns dir.
std::string write_synthetic_checkpoint(const std::string& dir, const SyntheticCheckpoint& m);

}  // namespace antkv::test
