// Checkpoint loading: small random-weight checkpoints the tests write themselves (synthetic_checkpoint.h;
// no model weights are committed) and malformed variants made from them. Every mistake must be an
// antkv::Error naming the file and the tensor or field, never a crash.
#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/atomic_file.h"
#include "core/error.h"
#include "model/checkpoint.h"
#include "runtime/cpu_runtime.h"
#include "runtime/rope.h"
#include "synthetic_checkpoint.h"
#include "test_support.h"

using namespace antkv;
namespace fs = std::filesystem;
using Catch::Matchers::Contains;

namespace {
// tiny llama: 2 layers, GQA 4/2, head_dim 8, random fp32 weights, tied embeddings
std::string tiny_llama() { return test::write_synthetic_checkpoint(test::temp_dir(), {}); }

// tiny llama with config.json edited by `edit`.
std::string tiny_copy_with_config(const std::function<void(nlohmann::json&)>& edit) {
  const std::string dir = tiny_llama();
  auto cfg = nlohmann::json::parse(read_file(dir + "/config.json"));
  edit(cfg);
  std::ofstream(dir + "/config.json") << cfg.dump();
  return dir;
}

// tiny llama's config, edited, as a file of the given name
std::string edited_config(const std::string& name, const std::function<void(nlohmann::json&)>& edit) {
  const std::string dir = tiny_copy_with_config(edit);
  const std::string path = dir + "/" + name;
  fs::rename(dir + "/config.json", path);
  return path;
}

// tiny llama's weights stored as two bf16 shards with model.safetensors.index.json
std::string tiny_sharded() {
  test::SyntheticCheckpoint m;
  m.dtype = "BF16";
  m.shards = 2;
  return test::write_synthetic_checkpoint(test::temp_dir(), m);
}

std::vector<float> logits_of(const Checkpoint& ckpt, const std::vector<int32_t>& ids) {
  CpuRuntimeOptions o;
  o.kv_dtype = KvDType::kF32;
  CpuRuntime rt(ckpt, o);
  ForwardRequest req;
  req.tokens = ids.data();
  req.n_tokens = static_cast<int>(ids.size());
  req.logits = LogitsMode::kAll;
  ForwardResult res;
  rt.forward(req, res);
  return res.logits;
}
}  // namespace

TEST_CASE("config.json: fields, GQA, head_dim, rope_theta places, rope scaling", "[model]") {
  auto c = parse_model_config(R"({"model_type":"mistral","hidden_size":4096,"num_hidden_layers":32,
      "num_attention_heads":32,"num_key_value_heads":8,"intermediate_size":14336,"vocab_size":32000,
      "rms_norm_eps":1e-5,"rope_theta":1000000.0,"tie_word_embeddings":false})", "mistral.json");
  CHECK(c.head_dim == 128);
  CHECK(c.gqa_group() == 4);
  CHECK(c.rope_theta == 1e6);
  CHECK_FALSE(c.attention_bias);

  // transformers >= 5 puts rope_theta and the scaling into rope_parameters
  auto l3 = parse_model_config(R"({"model_type":"llama","hidden_size":4096,"num_hidden_layers":32,
      "num_attention_heads":32,"num_key_value_heads":8,"intermediate_size":14336,"vocab_size":128256,
      "rope_parameters":{"rope_type":"llama3","rope_theta":500000.0,"factor":8.0,"low_freq_factor":1.0,
      "high_freq_factor":4.0,"original_max_position_embeddings":8192}})", "llama3.json");
  CHECK(l3.rope_theta == 500000.0);
  CHECK(l3.rope_scaling.type == RopeScaling::Type::kLlama3);
  // llama3 scaling: high frequencies kept, low frequencies divided by the factor
  const auto plain = rope_inv_freq(128, 500000.0, RopeScaling{});
  const auto scaled = rope_inv_freq(l3);
  CHECK(scaled[0] == plain[0]);
  CHECK(scaled[63] == Approx(plain[63] / 8.0).epsilon(1e-6));
  CHECK(scaled[40] < plain[40]);
  CHECK(l3.config_hash != c.config_hash);

  auto q = parse_model_config(R"({"model_type":"qwen2","hidden_size":896,"num_hidden_layers":24,
      "num_attention_heads":14,"num_key_value_heads":2,"intermediate_size":4864,"vocab_size":151936,
      "rope_theta":1000000.0,"tie_word_embeddings":true})", "qwen2.json");
  CHECK(q.attention_bias);
  CHECK(q.head_dim == 64);

  CHECK_THROWS_WITH(parse_model_config(R"({"model_type":"llama","hidden_size":64,"num_hidden_layers":2,
      "num_attention_heads":8,"num_key_value_heads":3,"intermediate_size":8,"vocab_size":8})", "x.json"),
                    Contains("x.json") && Contains("num_key_value_heads"));
  CHECK_THROWS_WITH(parse_model_config(R"({"model_type":"llama","hidden_size":64,"num_hidden_layers":2,
      "num_attention_heads":8,"intermediate_size":8,"vocab_size":8,"rope_scaling":{"rope_type":"yarn","factor":4}})",
                                       "y.json"),
                    Contains("y.json") && Contains("yarn"));
  CHECK_THROWS_WITH(parse_model_config("{not json", "z.json"), Contains("z.json") && Contains("JSON"));
}

TEST_CASE("malformed config fixtures: one clear error each", "[model]") {
  CHECK_THROWS_WITH(
      load_model_config(edited_config("config-missing-field.json", [](nlohmann::json& c) { c.erase("num_hidden_layers"); })),
      Contains("config-missing-field.json") && Contains("num_hidden_layers"));
  CHECK_THROWS_WITH(
      load_model_config(edited_config("config-unsupported-arch.json", [](nlohmann::json& c) { c["model_type"] = "gpt2"; })),
      Contains("config-unsupported-arch.json") && Contains("gpt2"));
}

TEST_CASE("malformed safetensors fixtures: truncated, lying offsets, bad header", "[model]") {
  const std::string dir = test::temp_dir();
  const std::string full = read_file(tiny_llama() + "/model.safetensors");
  // cut short: the header promises more data than the file holds
  std::ofstream(dir + "/truncated.safetensors", std::ios::binary) << full.substr(0, full.size() / 2);
  // a header whose data_offsets point past the end of the data
  uint64_t n = 0;
  std::memcpy(&n, full.data(), 8);
  auto header = nlohmann::json::parse(full.substr(8, n));
  header["model.norm.weight"]["data_offsets"] = {full.size(), full.size() + 32 * 4};
  const std::string h = header.dump();
  const uint64_t hn = h.size();
  std::ofstream(dir + "/lying-offsets.safetensors", std::ios::binary)
      << std::string(reinterpret_cast<const char*>(&hn), 8) << h << full.substr(8 + n);
  // a header that is not JSON
  const uint64_t bn = 16;
  std::ofstream(dir + "/bad-header.safetensors", std::ios::binary)
      << std::string(reinterpret_cast<const char*>(&bn), 8) << "{\"not json\",,,,}" << std::string(64, '\0');

  CHECK_THROWS_WITH(SafetensorsFile::open(dir + "/truncated.safetensors"),
                    Contains("truncated.safetensors") && Contains("outside"));
  CHECK_THROWS_WITH(SafetensorsFile::open(dir + "/lying-offsets.safetensors"),
                    Contains("lying-offsets.safetensors") && Contains("model.norm.weight") && Contains("outside"));
  CHECK_THROWS_WITH(SafetensorsFile::open(dir + "/bad-header.safetensors"),
                    Contains("bad-header.safetensors") && Contains("JSON"));
  std::ofstream(dir + "/tiny.safetensors") << "abc";
  CHECK_THROWS_WITH(SafetensorsFile::open(dir + "/tiny.safetensors"), Contains("truncated"));
  CHECK_THROWS_WITH(SafetensorsFile::open(dir + "/absent.safetensors"), Contains("absent.safetensors"));
}

TEST_CASE("checkpoint: wrong shapes and missing tensors name the tensor", "[model]") {
  const auto wrong_hidden = tiny_copy_with_config([](nlohmann::json& c) { c["intermediate_size"] = 40; });
  CHECK_THROWS_WITH(Checkpoint::open(wrong_hidden), Contains("mlp.gate_proj.weight") && Contains("[48, 32]") &&
                                                        Contains("[40, 32]"));
  const auto extra_layer = tiny_copy_with_config([](nlohmann::json& c) { c["num_hidden_layers"] = 3; });
  CHECK_THROWS_WITH(Checkpoint::open(extra_layer), Contains("model.layers.2.input_layernorm.weight"));
  const auto untied = tiny_copy_with_config([](nlohmann::json& c) { c["tie_word_embeddings"] = false; });
  CHECK_THROWS_WITH(Checkpoint::open(untied), Contains("lm_head.weight"));
  CHECK_THROWS_WITH(Checkpoint::open(test::temp_dir()), Contains("config.json"));

  // an index that lists a shard that is not there
  const std::string dir = tiny_sharded();
  fs::remove(dir + "/model-00002-of-00002.safetensors");
  CHECK_THROWS_WITH(Checkpoint::open(dir), Contains("model-00002-of-00002.safetensors") && Contains("missing"));
}

TEST_CASE("checkpoint: tiny llama, sharded bf16 and qwen2 with biases load and run", "[model][runtime]") {
  const std::vector<int32_t> ids = {1, 5, 9, 33, 2, 63, 17};
  Checkpoint tiny = Checkpoint::open(tiny_llama());
  CHECK(tiny.config().num_layers == 2);
  const auto ref = logits_of(tiny, ids);

  Checkpoint sharded = Checkpoint::open(tiny_sharded());
  CHECK(sharded.tensor("model.layers.1.mlp.up_proj.weight").file.find("00002") != std::string::npos);
  const auto got = logits_of(sharded, ids);
  REQUIRE(got.size() == ref.size());
  // the sharded copy stores the same weights rounded to bf16 (8 mantissa bits): ~1% relative
  const double err = test::max_rel_error(got.data(), ref.data(), ref.size());
  INFO("bf16 shards vs fp32: " << err);
  CHECK(err < 3e-2);
  CHECK(err > 0);

  // qwen2: q/k/v biases, untied LM head, llama3 RoPE scaling, fp16 weights
  test::SyntheticCheckpoint qm;
  qm.model_type = "qwen2";
  qm.bias = true;
  qm.tied = false;
  qm.dtype = "F16";
  qm.config_extra = R"({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}})";
  const std::string qdir = test::write_synthetic_checkpoint(test::temp_dir(), qm);
  Checkpoint qwen = Checkpoint::open(qdir);
  CHECK(qwen.config().attention_bias);
  CHECK(qwen.config().rope_scaling.type == RopeScaling::Type::kLlama3);
  CHECK(qwen.has("lm_head.weight"));
  const auto ql = logits_of(qwen, ids);
  for (float x : ql) REQUIRE(std::isfinite(x));
  // The same checkpoint with the biases set to zero: the biases must change the output.
  const std::string zdir = test::temp_dir();
  fs::copy_file(qdir + "/config.json", zdir + "/config.json");
  auto zero_bias = test::synthetic_tensors(qm);
  for (auto& t : zero_bias)
    if (t.name.size() > 5 && t.name.compare(t.name.size() - 5, 5, ".bias") == 0) std::fill(t.values.begin(), t.values.end(), 0.f);
  test::write_safetensors(zdir + "/model.safetensors", zero_bias, qm.dtype);
  const auto zl = logits_of(Checkpoint::open(zdir), ids);
  CHECK(test::max_rel_error(ql.data(), zl.data(), zl.size()) > 1e-2);
}

TEST_CASE("antkv-eval: a checkpoint with a mistake gives a one-line error and a non-zero exit", "[model][cli]") {
  const std::string out = test::temp_dir() + "/stderr.txt";
  const auto broken = tiny_copy_with_config([](nlohmann::json& c) { c.erase("vocab_size"); });
  const std::string text = test::temp_dir() + "/t.txt";
  std::ofstream(text) << "hello";
  const std::string cmd = std::string(ANTKV_EVAL_PATH) + " ppl --model " + broken + " --text " + text +
                          " --json " + broken + "/r.json 2> " + out;
  const int rc = std::system(cmd.c_str());
  CHECK(rc != 0);
  const std::string err = read_file(out);
  INFO(err);
  CHECK_THAT(err, Contains("config.json") && Contains("vocab_size"));
  CHECK(std::count(err.begin(), err.end(), '\n') == 1);
  CHECK_FALSE(fs::exists(broken + "/r.json"));
}
