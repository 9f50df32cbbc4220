// The architecture hyper-parameters of a Hugging Face LLaMA-family checkpoint (config.json):
// model_type llama, mistral or qwen2. Parsing validates every field the runtime uses.
#pragma once
#include <cstdint>
#include <string>

namespace antkv {

struct RopeScaling {
  enum class Type { kNone, kLinear, kLlama3 };
  Type type = Type::kNone;
  double factor = 1.0;
  double low_freq_factor = 1.0;       // llama3
  double high_freq_factor = 4.0;      // llama3
  int64_t original_max_position = 8192;  // llama3: original_max_position_embeddings
};

struct ModelConfig {
  std::string model_type;   // "llama" | "mistral" | "qwen2"
  int hidden_size = 0;
  int num_layers = 0;
  int num_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;         // config.head_dim, else hidden_size / num_heads
  int intermediate_size = 0;
  int vocab_size = 0;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;  // top-level rope_theta or rope_parameters.rope_theta
  RopeScaling rope_scaling;
  int64_t max_position_embeddings = 0;
  // Sliding-window attention (Mistral-7B v0.1: 4096; Qwen2 when use_sliding_window): 0 = none. The runtimes
  // attend to every cached key, so windows longer than this are refused (check_window_length). Not in
  // config_hash: it does not change K/V within the window.
  int64_t sliding_window = 0;
  bool tie_word_embeddings = false;
  bool attention_bias = false;  // q/k/v biases (qwen2 always; llama when attention_bias: true)
  int bos_token_id = -1;
  int eos_token_id = -1;
  std::string torch_dtype;      // as declared ("bfloat16", "float16", "float32"); informational
  std::string config_hash;      // hash of the architecture fields above (not of the file's bytes)

  int gqa_group() const { return num_heads / num_kv_heads; }
  int q_dim() const { return num_heads * head_dim; }
  int kv_dim() const { return num_kv_heads * head_dim; }
};

// Parses config.json text; `source` names the file in error messages.
ModelConfig parse_model_config(const std::string& json_text, const std::string& source);
ModelConfig load_model_config(const std::string& config_json_path);

// The window length the model allows: seq_len must not exceed max_position_embeddings, nor a sliding window
// (not implemented: attention over all cached keys would be wrong past it). A clear error naming the option
// (seq_len_name: "--seq-len", "eval.seq_len", ...) and the limit otherwise.
void check_window_length(const ModelConfig& cfg, int64_t seq_len, const std::string& seq_len_name);

}  // namespace antkv
