#include "model/checkpoint.h"

#include <algorithm>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>

#include "core/atomic_file.h"
#include "core/error.h"
#include "core/hash.h"

#include <cmath>

namespace fs = std::filesystem;

namespace antkv {

std::string Checkpoint::layer_name(int layer, const char* suffix) {
  return fmt::format("model.layers.{}.{}", layer, suffix);
}

bool Checkpoint::has(const std::string& name) const { return index_.count(name) != 0; }

const TensorView& Checkpoint::tensor(const std::string& name) const {
  auto it = index_.find(name);
  ANTKV_CHECK(it != index_.end(), "{}: missing tensor \"{}\"", dir_, name);
  return *it->second;
}

const TensorView& Checkpoint::tensor(const std::string& name, const std::vector<int64_t>& shape) const {
  const TensorView& t = tensor(name);
  TensorView want;
  want.shape = shape;
  ANTKV_CHECK(t.shape == shape, "{}: tensor \"{}\" has shape {}, expected {} (from config.json)", t.file, name,
              t.shape_str(), want.shape_str());
  ANTKV_CHECK(t.dtype == DType::kBF16 || t.dtype == DType::kF16 || t.dtype == DType::kF32,
              "{}: tensor \"{}\" has dtype {}, expected BF16, F16 or F32", t.file, name, dtype_name(t.dtype));
  return t;
}

const TensorView& Checkpoint::lm_head() const {
  const int64_t v = config_.vocab_size, h = config_.hidden_size;
  if (has("lm_head.weight")) return tensor("lm_head.weight", {v, h});
  ANTKV_CHECK(config_.tie_word_embeddings,
              "{}: missing tensor \"lm_head.weight\" (and tie_word_embeddings is false)", dir_);
  return tensor("model.embed_tokens.weight", {v, h});
}

size_t Checkpoint::total_bytes() const {
  size_t n = 0;
  for (auto& f : files_)
    for (auto& [name, t] : f->tensors()) n += t.nbytes;
  return n;
}

const std::string& Checkpoint::content_hash() const {
  if (content_hash_.empty()) {
    std::vector<std::string> parts;
    for (const auto& f : files_) parts.push_back(fs::path(f->path()).filename().string() + "=" + hash_file(f->path()));
    std::sort(parts.begin(), parts.end());
    std::string all = "config=" + config_.config_hash;
    for (const auto& p : parts) all += "|" + p;
    if (fs::exists(tokenizer_path())) all += "|tokenizer=" + hash_file(tokenizer_path());
    content_hash_ = hash_bytes(all);
  }
  return content_hash_;
}

std::string Checkpoint::find_non_finite_weight() const {
  std::vector<float> buf;
  for (const auto& [name, t] : index_) {
    if (t->dtype != DType::kBF16 && t->dtype != DType::kF16 && t->dtype != DType::kF32) continue;
    buf.resize(static_cast<size_t>(t->numel()));
    t->to_float(buf.data());
    for (size_t i = 0; i < buf.size(); ++i)
      if (!std::isfinite(buf[i]))
        return fmt::format("tensor \"{}\" ({}) element {} = {}", name, t->file, i, buf[i]);
  }
  return "";
}

void check_token_ids(const std::vector<int32_t>& ids, const Checkpoint& ckpt, const std::string& text_path) {
  const int64_t vocab = ckpt.config().vocab_size;
  for (const int32_t id : ids)
    ANTKV_CHECK(id >= 0 && id < vocab, "{}: token id {} (from {}) is outside the model's vocabulary of {} ({}/config.json): "
                "the tokenizer is of another model", text_path, id, ckpt.tokenizer_path(), vocab, ckpt.dir());
}

void rethrow_with_weight_check(const NonFinite& e, const Checkpoint& ckpt) {
  const std::string w = ckpt.find_non_finite_weight();
  if (w.empty()) throw NonFinite(fmt::format("{} (every weight of {} is finite)", e.what(), ckpt.dir()));
  throw NonFinite(fmt::format("{}; cause: {} has a non-finite weight: {}", e.what(), ckpt.dir(), w));
}

Checkpoint Checkpoint::open(const std::string& dir) {
  Checkpoint c;
  c.dir_ = dir;
  ANTKV_CHECK(fs::is_directory(dir), "{}: not a checkpoint directory (config.json, model.safetensors)", dir);
  const std::string cfg_path = dir + "/config.json";
  ANTKV_CHECK(fs::exists(cfg_path), "{}: missing config.json", dir);
  c.config_ = load_model_config(cfg_path);

  const std::string single = dir + "/model.safetensors";
  const std::string index = dir + "/model.safetensors.index.json";
  if (fs::exists(index)) {
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(read_file(index));
    } catch (const nlohmann::json::parse_error& e) {
      fail("{}: not valid JSON: {}", index, e.what());
    }
    ANTKV_CHECK(j.contains("weight_map") && j["weight_map"].is_object(), "{}: missing \"weight_map\" object",
                index);
    std::set<std::string> shards;
    for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
      ANTKV_CHECK(it->is_string(), "{}: weight_map entry \"{}\" is not a file name", index, it.key());
      shards.insert(it->get<std::string>());
    }
    for (const auto& s : shards) {
      ANTKV_CHECK(s.find('/') == std::string::npos, "{}: shard name \"{}\" must be a plain file name", index, s);
      const std::string p = dir + "/" + s;
      ANTKV_CHECK(fs::exists(p), "{}: shard \"{}\" listed in the index is missing", index, s);
      c.files_.push_back(SafetensorsFile::open(p));
    }
    for (auto& f : c.files_)
      for (auto& [name, t] : f->tensors()) c.index_[name] = &t;
    for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
      auto found = c.index_.find(it.key());
      ANTKV_CHECK(found != c.index_.end() && found->second->file == dir + "/" + it->get<std::string>(),
                  "{}: tensor \"{}\" is listed in {} but not stored there", index, it.key(), it->get<std::string>());
    }
  } else {
    ANTKV_CHECK(fs::exists(single), "{}: missing model.safetensors (or model.safetensors.index.json)", dir);
    c.files_.push_back(SafetensorsFile::open(single));
    for (auto& [name, t] : c.files_[0]->tensors()) c.index_[name] = &t;
  }

  // Validate every tensor the runtime needs, so problems surface at load time with the tensor's name.
  const ModelConfig& m = c.config_;
  const int64_t h = m.hidden_size, q = m.q_dim(), kv = m.kv_dim(), f = m.intermediate_size;
  c.tensor("model.embed_tokens.weight", {m.vocab_size, h});
  c.tensor("model.norm.weight", {h});
  std::set<std::string> used = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
                               "model.rotary_emb.inv_freq"};
  auto expect = [&](const std::string& name, const std::vector<int64_t>& shape) {
    c.tensor(name, shape);
    used.insert(name);
  };
  c.lm_head();
  for (int l = 0; l < m.num_layers; ++l) {
    expect(layer_name(l, "input_layernorm.weight"), {h});
    expect(layer_name(l, "post_attention_layernorm.weight"), {h});
    expect(layer_name(l, "self_attn.q_proj.weight"), {q, h});
    expect(layer_name(l, "self_attn.k_proj.weight"), {kv, h});
    expect(layer_name(l, "self_attn.v_proj.weight"), {kv, h});
    expect(layer_name(l, "self_attn.o_proj.weight"), {h, q});
    expect(layer_name(l, "mlp.gate_proj.weight"), {f, h});
    expect(layer_name(l, "mlp.up_proj.weight"), {f, h});
    expect(layer_name(l, "mlp.down_proj.weight"), {h, f});
    if (m.attention_bias) {
      expect(layer_name(l, "self_attn.q_proj.bias"), {q});
      expect(layer_name(l, "self_attn.k_proj.bias"), {kv});
      expect(layer_name(l, "self_attn.v_proj.bias"), {kv});
    }
    used.insert(layer_name(l, "self_attn.rotary_emb.inv_freq"));  // a buffer some exports carry; RoPE is recomputed
  }
  // Every tensor of the checkpoint is used: one left over means config.json describes another model (fewer
  // layers, no biases) and the results would silently be those of a part of it.
  for (const auto& [name, t] : c.index_)
    ANTKV_CHECK(used.count(name), "{}: tensor \"{}\" ({}) is not used by the model config.json describes "
                "(num_hidden_layers {}{}): config.json and the weights do not match", dir, name, t->file, m.num_layers,
                m.attention_bias ? "" : ", no attention biases");
  return c;
}

}  // namespace antkv
