#include "model/model_config.h"

#include <cmath>
#include <nlohmann/json.hpp>

#include "core/atomic_file.h"
#include "core/error.h"
#include "core/hash.h"

namespace antkv {
namespace {
using json = nlohmann::json;

const json& require(const json& j, const char* key, const std::string& src) {
  auto it = j.find(key);
  ANTKV_CHECK(it != j.end() && !it->is_null(), "{}: missing required field \"{}\"", src, key);
  return *it;
}

int require_int(const json& j, const char* key, const std::string& src, int min_value = 1) {
  const json& v = require(j, key, src);
  ANTKV_CHECK(v.is_number_integer(), "{}: field \"{}\" must be an integer, got {}", src, key, v.dump());
  const auto x = v.get<int64_t>();
  ANTKV_CHECK(x >= min_value && x <= (1LL << 30), "{}: field \"{}\" = {} is out of range", src, key, x);
  return static_cast<int>(x);
}

double get_number(const json& j, const char* key, double def, const std::string& src) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return def;
  ANTKV_CHECK(it->is_number(), "{}: field \"{}\" must be a number, got {}", src, key, it->dump());
  return it->get<double>();
}

int get_token_id(const json& j, const char* key) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return -1;
  if (it->is_number_integer()) return it->get<int>();
  if (it->is_array() && !it->empty() && (*it)[0].is_number_integer()) return (*it)[0].get<int>();
  return -1;
}

RopeScaling parse_rope_scaling(const json& rs, const std::string& src) {
  RopeScaling s;
  std::string type;
  if (rs.contains("rope_type") && rs["rope_type"].is_string()) type = rs["rope_type"].get<std::string>();
  else if (rs.contains("type") && rs["type"].is_string()) type = rs["type"].get<std::string>();
  if (type.empty() || type == "default") return s;
  if (type == "linear") {
    s.type = RopeScaling::Type::kLinear;
    s.factor = get_number(rs, "factor", 0.0, src);
    ANTKV_CHECK(s.factor > 0, "{}: rope scaling \"linear\" needs a positive \"factor\"", src);
  } else if (type == "llama3") {
    s.type = RopeScaling::Type::kLlama3;
    s.factor = get_number(rs, "factor", 0.0, src);
    s.low_freq_factor = get_number(rs, "low_freq_factor", 0.0, src);
    s.high_freq_factor = get_number(rs, "high_freq_factor", 0.0, src);
    s.original_max_position =
        static_cast<int64_t>(get_number(rs, "original_max_position_embeddings", 0.0, src));
    ANTKV_CHECK(s.factor > 0 && s.low_freq_factor > 0 && s.high_freq_factor > s.low_freq_factor &&
                    s.original_max_position > 0,
                "{}: rope scaling \"llama3\" needs factor, low_freq_factor < high_freq_factor and "
                "original_max_position_embeddings",
                src);
  } else {
    fail("{}: unsupported rope scaling type \"{}\" (supported: default, linear, llama3)", src, type);
  }
  return s;
}
}  // namespace

ModelConfig parse_model_config(const std::string& text, const std::string& src) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::parse_error& e) {
    fail("{}: not valid JSON: {}", src, e.what());
  }
  ANTKV_CHECK(j.is_object(), "{}: expected a JSON object", src);
  ModelConfig c;
  const json& mt = require(j, "model_type", src);
  ANTKV_CHECK(mt.is_string(), "{}: \"model_type\" must be a string", src);
  c.model_type = mt.get<std::string>();
  ANTKV_CHECK(c.model_type == "llama" || c.model_type == "mistral" || c.model_type == "qwen2",
              "{}: unsupported architecture model_type \"{}\" (supported: llama, mistral, qwen2)", src,
              c.model_type);
  c.hidden_size = require_int(j, "hidden_size", src);
  c.num_layers = require_int(j, "num_hidden_layers", src);
  c.num_heads = require_int(j, "num_attention_heads", src);
  c.num_kv_heads = j.contains("num_key_value_heads") && !j["num_key_value_heads"].is_null()
                       ? require_int(j, "num_key_value_heads", src)
                       : c.num_heads;
  c.intermediate_size = require_int(j, "intermediate_size", src);
  c.vocab_size = require_int(j, "vocab_size", src);
  if (j.contains("head_dim") && !j["head_dim"].is_null()) {
    c.head_dim = require_int(j, "head_dim", src);
  } else {
    ANTKV_CHECK(c.hidden_size % c.num_heads == 0,
                "{}: hidden_size {} is not divisible by num_attention_heads {} (and no head_dim given)", src,
                c.hidden_size, c.num_heads);
    c.head_dim = c.hidden_size / c.num_heads;
  }
  ANTKV_CHECK(c.num_heads % c.num_kv_heads == 0,
              "{}: num_attention_heads {} is not a multiple of num_key_value_heads {}", src, c.num_heads,
              c.num_kv_heads);
  ANTKV_CHECK(c.head_dim % 2 == 0, "{}: head_dim {} must be even for RoPE", src, c.head_dim);
  c.rms_norm_eps = get_number(j, "rms_norm_eps", 1e-6, src);
  ANTKV_CHECK(c.rms_norm_eps > 0 && c.rms_norm_eps < 1, "{}: rms_norm_eps {} out of range", src, c.rms_norm_eps);

  // rope_theta at top level (transformers < 5) or inside rope_parameters (transformers >= 5).
  const json* rope_params = nullptr;
  if (j.contains("rope_parameters") && j["rope_parameters"].is_object()) rope_params = &j["rope_parameters"];
  // absent: the transformers default 10000; given, it must be positive (0 would make every rotation the identity)
  const bool top_theta = j.contains("rope_theta") && !j["rope_theta"].is_null();
  double theta = get_number(j, "rope_theta", 0.0, src);
  if (!top_theta && rope_params && rope_params->contains("rope_theta") && !(*rope_params)["rope_theta"].is_null())
    theta = get_number(*rope_params, "rope_theta", 0.0, src);
  else if (!top_theta)
    theta = 10000.0;
  ANTKV_CHECK(theta > 0 && std::isfinite(theta), "{}: field \"rope_theta\" = {} must be positive", src, theta);
  c.rope_theta = theta;
  if (j.contains("rope_scaling") && j["rope_scaling"].is_object())
    c.rope_scaling = parse_rope_scaling(j["rope_scaling"], src);
  else if (rope_params)
    c.rope_scaling = parse_rope_scaling(*rope_params, src);

  // absent: no limit on the window length; given, it must be a positive count
  if (j.contains("max_position_embeddings") && !j["max_position_embeddings"].is_null())
    c.max_position_embeddings = require_int(j, "max_position_embeddings", src);
  // sliding_window: Mistral uses it whenever set (null in v0.2+); Qwen2 only with use_sliding_window: true
  if (j.contains("sliding_window") && j["sliding_window"].is_number()) {
    const bool used = c.model_type == "qwen2" ? j.value("use_sliding_window", false) : true;
    if (used) c.sliding_window = static_cast<int64_t>(get_number(j, "sliding_window", 0, src));
    ANTKV_CHECK(c.sliding_window >= 0, "{}: sliding_window {} is negative", src, c.sliding_window);
  }
  c.tie_word_embeddings = j.value("tie_word_embeddings", false);
  c.attention_bias = c.model_type == "qwen2" ? true : j.value("attention_bias", false);
  ANTKV_CHECK(!j.value("mlp_bias", false), "{}: mlp_bias = true is not supported", src);
  if (j.contains("hidden_act") && j["hidden_act"].is_string()) {
    const auto act = j["hidden_act"].get<std::string>();
    ANTKV_CHECK(act == "silu" || act == "swish", "{}: unsupported hidden_act \"{}\" (supported: silu)", src, act);
  }
  c.bos_token_id = get_token_id(j, "bos_token_id");
  c.eos_token_id = get_token_id(j, "eos_token_id");
  if (j.contains("torch_dtype") && j["torch_dtype"].is_string()) c.torch_dtype = j["torch_dtype"];
  else if (j.contains("dtype") && j["dtype"].is_string()) c.torch_dtype = j["dtype"];

  const std::string arch = fmt::format(
      "{}|h{}|l{}|nh{}|kv{}|d{}|ffn{}|v{}|eps{}|theta{}|rs{},{},{},{},{}|tie{}|bias{}", c.model_type,
      c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size, c.vocab_size,
      c.rms_norm_eps, c.rope_theta, static_cast<int>(c.rope_scaling.type), c.rope_scaling.factor,
      c.rope_scaling.low_freq_factor, c.rope_scaling.high_freq_factor, c.rope_scaling.original_max_position,
      c.tie_word_embeddings, c.attention_bias);
  c.config_hash = hash_bytes(arch);
  return c;
}

ModelConfig load_model_config(const std::string& path) { return parse_model_config(read_file(path), path); }

void check_window_length(const ModelConfig& cfg, int64_t seq_len, const std::string& seq_len_name) {
  ANTKV_CHECK(cfg.max_position_embeddings <= 0 || seq_len <= cfg.max_position_embeddings,
              "{} {} exceeds the model's max_position_embeddings {} (config.json); use {} <= {}", seq_len_name, seq_len,
              cfg.max_position_embeddings, seq_len_name, cfg.max_position_embeddings);
  ANTKV_CHECK(cfg.sliding_window <= 0 || seq_len <= cfg.sliding_window,
              "{} {} exceeds the model's sliding_window {} (config.json): attention limited to the last {} keys is not "
              "implemented, so longer windows would be evaluated wrongly; use {} <= {}",
              seq_len_name, seq_len, cfg.sliding_window, cfg.sliding_window, seq_len_name, cfg.sliding_window);
}

}  // namespace antkv
