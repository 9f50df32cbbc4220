#include "synthetic_checkpoint.h"

#include <Eigen/Core>
#include <fmt/format.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "core/error.h"

namespace fs = std::filesystem;

namespace antkv::test {

void write_safetensors(const std::string& path, const std::vector<TensorData>& tensors, const std::string& dtype) {
  ANTKV_CHECK(dtype == "F32" || dtype == "BF16" || dtype == "F16", "write_safetensors: dtype {}", dtype);
  const size_t es = dtype == "F32" ? 4 : 2;
  nlohmann::json header = {{"__metadata__", {{"format", "pt"}}}};
  std::string data;
  for (const auto& t : tensors) {
    const size_t begin = data.size();
    for (float v : t.values) {
      char b[4];
      if (dtype == "F32") std::memcpy(b, &v, 4);
      else if (dtype == "BF16") {
        const uint16_t u = Eigen::numext::bit_cast<uint16_t>(Eigen::bfloat16(v));
        std::memcpy(b, &u, 2);
      } else {
        const uint16_t u = Eigen::numext::bit_cast<uint16_t>(Eigen::half(v));
        std::memcpy(b, &u, 2);
      }
      data.append(b, es);
    }
    header[t.name] = {{"dtype", dtype}, {"shape", t.shape}, {"data_offsets", {begin, data.size()}}};
  }
  std::string hs = header.dump();
  while (hs.size() % 8) hs.push_back(' ');
  std::ofstream f(path, std::ios::binary);
  const uint64_t hl = hs.size();
  f.write(reinterpret_cast<const char*>(&hl), 8);
  f.write(hs.data(), static_cast<std::streamsize>(hs.size()));
  f.write(data.data(), static_cast<std::streamsize>(data.size()));
  ANTKV_CHECK(f.good(), "{}: write failed", path);
}

std::vector<TensorData> synthetic_tensors(const SyntheticCheckpoint& m) {
  std::mt19937 rng(m.seed), bias_rng(m.seed + 1);
  std::vector<TensorData> ts;
  auto add = [&](std::string name, std::vector<int64_t> shape, std::mt19937& r, float mean, float sd) {
    int64_t n = 1;
    for (auto s : shape) n *= s;
    std::normal_distribution<float> nd(mean, sd);
    TensorData t{std::move(name), std::move(shape), std::vector<float>(n)};
    for (auto& x : t.values) x = nd(r);
    ts.push_back(std::move(t));
  };
  auto matrix = [&](std::string name, int64_t rows, int64_t cols) {
    add(std::move(name), {rows, cols}, rng, 0.f, 1.0f / std::sqrt(static_cast<float>(cols)));
  };
  const int64_t H = m.hidden, Q = int64_t{m.heads} * m.head_dim, KV = int64_t{m.kv_heads} * m.head_dim;
  matrix("model.embed_tokens.weight", m.vocab, H);
  add("model.norm.weight", {H}, rng, 1.f, 0.2f);
  for (int l = 0; l < m.layers; ++l) {
    auto n = [&](const char* s) { return fmt::format("model.layers.{}.{}", l, s); };
    add(n("input_layernorm.weight"), {H}, rng, 1.f, 0.2f);
    add(n("post_attention_layernorm.weight"), {H}, rng, 1.f, 0.2f);
    matrix(n("self_attn.q_proj.weight"), Q, H);
    matrix(n("self_attn.k_proj.weight"), KV, H);
    matrix(n("self_attn.v_proj.weight"), KV, H);
    matrix(n("self_attn.o_proj.weight"), H, Q);
    matrix(n("mlp.gate_proj.weight"), m.ffn, H);
    matrix(n("mlp.up_proj.weight"), m.ffn, H);
    matrix(n("mlp.down_proj.weight"), H, m.ffn);
    if (m.bias) {
      add(n("self_attn.q_proj.bias"), {Q}, bias_rng, 0.f, 0.5f);
      add(n("self_attn.k_proj.bias"), {KV}, bias_rng, 0.f, 0.5f);
      add(n("self_attn.v_proj.bias"), {KV}, bias_rng, 0.f, 0.5f);
    }
  }
  if (!m.tied) matrix("lm_head.weight", m.vocab, H);  // last: the other weights equal the tied checkpoint's
  return ts;
}

std::string write_synthetic_checkpoint(const std::string& dir, const SyntheticCheckpoint& m) {
  ANTKV_CHECK(m.shards == 1 || m.shards == 2, "write_synthetic_checkpoint: 1 or 2 shards");
  fs::create_directories(dir);
  nlohmann::json cfg = {{"architectures", {m.model_type == "qwen2" ? "Qwen2ForCausalLM" : "LlamaForCausalLM"}},
                        {"model_type", m.model_type},
                        {"hidden_size", m.hidden},
                        {"num_hidden_layers", m.layers},
                        {"num_attention_heads", m.heads},
                        {"num_key_value_heads", m.kv_heads},
                        {"head_dim", m.head_dim},
                        {"intermediate_size", m.ffn},
                        {"vocab_size", m.vocab},
                        {"rms_norm_eps", m.rms_norm_eps},
                        {"rope_theta", m.rope_theta},
                        {"max_position_embeddings", 4096},
                        {"tie_word_embeddings", m.tied},
                        {"hidden_act", "silu"},
                        {"bos_token_id", 1},
                        {"eos_token_id", 2}};
  cfg.merge_patch(nlohmann::json::parse(m.config_extra));
  std::ofstream(dir + "/config.json") << cfg.dump(1) << "\n";
  const auto ts = synthetic_tensors(m);
  if (m.shards == 1) {
    write_safetensors(dir + "/model.safetensors", ts, m.dtype);
    return dir;
  }
  // the second shard holds the layers from layers/2 on
  std::vector<TensorData> parts[2];
  nlohmann::json weight_map = nlohmann::json::object();
  const char* files[2] = {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"};
  for (const auto& t : ts) {
    int s = 0;
    for (int l = m.layers / 2; l < m.layers; ++l)
      if (t.name.rfind(fmt::format("model.layers.{}.", l), 0) == 0) s = 1;
    parts[s].push_back(t);
    weight_map[t.name] = files[s];
  }
  for (int s = 0; s < 2; ++s) write_safetensors(dir + "/" + files[s], parts[s], m.dtype);
  std::ofstream(dir + "/model.safetensors.index.json") << nlohmann::json{{"metadata", nlohmann::json::object()},
                                                                        {"weight_map", weight_map}}.dump(1);
  return dir;
}

}  // namespace antkv::test
