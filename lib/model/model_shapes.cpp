#include "model/model_shapes.h"

#include <fmt/format.h>

#include <nlohmann/json.hpp>

#include "core/error.h"

namespace antkv {

const std::vector<ModelShape>& model_shapes() {
  static const std::vector<ModelShape> shapes = {
      // GQA 32/8, llama3 rope scaling, 128K positions
      {"llama3-8b", "LLaMA-3.1-8B", "bytelevel", R"({
        "model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256,
        "max_position_embeddings": 131072, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": false, "attention_bias": false,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192}})"},
      // MHA 32/32, 4K positions
      {"llama2-7b", "LLaMA-2-7B", "sentencepiece", R"({
        "model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 32, "intermediate_size": 11008, "vocab_size": 32000,
        "max_position_embeddings": 4096, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": false, "attention_bias": false})"},
      // GQA 32/8, sliding window 4096
      {"mistral-7b", "Mistral-7B v0.1", "sentencepiece", R"({
        "model_type": "mistral", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 32000,
        "max_position_embeddings": 32768, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": false, "attention_bias": false, "sliding_window": 4096})"},
      // q/k/v biases, GQA 28/4, hidden 3584; its sliding window is off (use_sliding_window false)
      {"qwen2-7b", "Qwen2-7B", "bytelevel", R"({
        "model_type": "qwen2", "hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28,
        "num_key_value_heads": 4, "intermediate_size": 18944, "vocab_size": 152064,
        "max_position_embeddings": 131072, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": false, "attention_bias": true, "sliding_window": 131072,
        "use_sliding_window": false})"},
  };
  return shapes;
}

ModelConfig ModelShape::config() const { return parse_model_config(config_json, "model shape " + name); }

std::string model_shape_names() {
  std::string s;
  for (const auto& m : model_shapes()) s += (s.empty() ? "" : ", ") + m.name;
  return s;
}

const ModelShape& find_model_shape(const std::string& name, const std::string& option) {
  for (const auto& m : model_shapes())
    if (m.name == name) return m;
  fail("unknown {} \"{}\" (the shapes: {})", option, name, model_shape_names());
}

std::string model_shapes_json() {
  nlohmann::ordered_json out = nlohmann::ordered_json::array();  // keys in the order written
  for (const auto& m : model_shapes())
    out.push_back({{"name", m.name}, {"checkpoint", m.checkpoint}, {"tokenizer_family", m.tokenizer_family},
                   {"config", nlohmann::ordered_json::parse(m.config_json)}});
  return out.dump(1) + "\n";
}

std::string model_shapes_table() {
  std::string s = fmt::format("{:<12} {:<16} {:>6} {:>7} {:>8} {:>6} {:>6} {:>7} {:>10}  {}\n", "shape", "checkpoint",
                              "layers", "heads", "head_dim", "hidden", "ffn", "vocab", "positions", "tokenizer");
  for (const auto& m : model_shapes()) {
    const ModelConfig c = m.config();
    s += fmt::format("{:<12} {:<16} {:>6} {:>7} {:>8} {:>6} {:>6} {:>7} {:>10}  {}\n", m.name, m.checkpoint,
                     c.num_layers, fmt::format("{}/{}", c.num_heads, c.num_kv_heads), c.head_dim, c.hidden_size,
                     c.intermediate_size, c.vocab_size, c.max_position_embeddings, m.tokenizer_family);
  }
  return s;
}

}  // namespace antkv
