// The named model shapes (model/model_shapes.h): one table, printed by `antkv-eval shapes` for
// scripts/scale_run.py, parsed like a checkpoint's config.json, and found by name with a clear error.
#include <catch2/catch.hpp>

#include <cstdlib>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/atomic_file.h"
#include "core/error.h"
#include "model/model_shapes.h"
#include "test_support.h"

using namespace antkv;
using Catch::Matchers::Contains;
namespace fs = std::filesystem;

namespace {

struct Printed {
  int rc = 0;
  std::string out, err;
};

// antkv-eval with `args`, stdout and stderr captured
Printed run_eval(const std::string& args) {
  const std::string dir = test::temp_dir();
  const std::string o = dir + "/stdout", e = dir + "/stderr";
  Printed p;
  p.rc = std::system((std::string(ANTKV_EVAL_PATH) + " " + args + " > '" + o + "' 2> '" + e + "'").c_str());
  p.out = read_file(o);
  p.err = read_file(e);
  return p;
}

}  // namespace

TEST_CASE("model shapes: the architectures of the real checkpoints they name", "[shapes]") {
  std::vector<std::string> names;
  for (const auto& s : model_shapes()) names.push_back(s.name);
  CHECK(names == std::vector<std::string>{"llama3-8b", "llama2-7b", "mistral-7b", "qwen2-7b"});
  const ModelConfig l3 = find_model_shape("llama3-8b").config();
  CHECK(l3.num_layers == 32);
  CHECK(l3.num_heads == 32);
  CHECK(l3.num_kv_heads == 8);
  CHECK(l3.head_dim == 128);
  CHECK(l3.vocab_size == 128256);
  CHECK(l3.rope_scaling.type == RopeScaling::Type::kLlama3);
  CHECK(l3.max_position_embeddings == 131072);
  const ModelConfig l2 = find_model_shape("llama2-7b").config();
  CHECK(l2.num_kv_heads == 32);
  CHECK(l2.intermediate_size == 11008);
  const ModelConfig mi = find_model_shape("mistral-7b").config();
  CHECK(mi.model_type == "mistral");
  CHECK(mi.sliding_window == 4096);
  const ModelConfig qw = find_model_shape("qwen2-7b").config();
  CHECK(qw.attention_bias);
  CHECK(qw.head_dim == 128);             // 3584 / 28
  CHECK(qw.sliding_window == 0);         // use_sliding_window: false
  CHECK(find_model_shape("qwen2-7b").tokenizer_family == "bytelevel");
  CHECK(find_model_shape("llama2-7b").tokenizer_family == "sentencepiece");
}

TEST_CASE("model shapes: an unknown name is an error naming the option and every shape", "[shapes]") {
  try {
    find_model_shape("llama-9b", "--shape");
    FAIL("no error");
  } catch (const Error& e) {
    CHECK_THAT(e.what(), Contains("unknown --shape \"llama-9b\""));
    for (const auto& s : model_shapes()) CHECK_THAT(e.what(), Contains(s.name));
  }
}

TEST_CASE("antkv-eval shapes: prints every shape, as a table and as the config.json fields", "[shapes][cli]") {
  const Printed table = run_eval("shapes");
  INFO(table.err);
  REQUIRE(table.rc == 0);
  for (const auto& s : model_shapes()) CHECK_THAT(table.out, Contains(s.name) && Contains(s.checkpoint));

  const Printed js = run_eval("shapes --format json");
  INFO(js.err);
  REQUIRE(js.rc == 0);
  const auto j = nlohmann::json::parse(js.out);
  REQUIRE(j.size() == model_shapes().size());
  for (size_t i = 0; i < j.size(); ++i) {
    const ModelShape& s = model_shapes()[i];
    INFO(s.name);
    CHECK(j[i]["name"] == s.name);
    CHECK(j[i]["tokenizer_family"] == s.tokenizer_family);
    // the printed config.json fields describe the same architecture as the table's own
    const ModelConfig printed = parse_model_config(j[i]["config"].dump(), "printed " + s.name);
    CHECK(printed.config_hash == s.config().config_hash);
    CHECK(printed.max_position_embeddings == s.config().max_position_embeddings);
    CHECK(printed.sliding_window == s.config().sliding_window);
  }

  const Printed bad = run_eval("shapes --format yaml");
  CHECK(bad.rc != 0);
}
