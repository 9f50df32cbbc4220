// Recipes: the shipped files parse, overrides apply, unknown keys and bad values name the key.
#include <algorithm>
#include <filesystem>
#include <fstream>

#include "core/atomic_file.h"
#include "core/error.h"
#include "quant/method.h"
#include "recipe/recipe.h"
#include "test_support.h"

using namespace antkv;
namespace fs = std::filesystem;
using Catch::Matchers::Contains;

namespace {
std::string write_recipe(const std::string& text) {
  const std::string p = test::temp_dir() + "/r.yaml";
  std::ofstream(p) << text;
  return p;
}
}  // namespace

TEST_CASE("recipes: every shipped recipe loads and names a VQ configuration of the design note", "[recipe]") {
  // the design note's configurations (§3): 4 c2b8, 2 c4b8, 1 c8b8, 0.75 c16b12, 0.5 c16b8, 0.375 c16b6
  // and ours for unequal K/V widths: 1.5 c8b12, 1.25 c8b10, 0.25 c32b8
  const std::vector<std::pair<int, int>> named = {{2, 8}, {4, 8}, {8, 8}, {16, 12}, {16, 8}, {16, 6},
                                                  {8, 12}, {8, 10}, {32, 8}};
  auto is_named = [&](const VqConfig& q) {
    return std::find(named.begin(), named.end(), std::make_pair(q.c, q.b)) != named.end();
  };
  int n = 0;
  for (const auto& e : fs::recursive_directory_iterator(test::source_path("recipes"))) {
    if (e.path().extension() != ".yaml") continue;
    INFO(e.path().string());
    const Recipe r = Recipe::load(e.path().string());
    CHECK(r.name == e.path().stem().string());
    CHECK(!r.model.empty());
    CHECK(fs::path(r.calibration.text).is_absolute());
    CHECK(is_named(r.quant.keys));
    CHECK(is_named(r.quant.values));
    CHECK(!r.eval.methods.empty());
    for (const auto& text : r.eval.methods) {  // every method parses, and its VQ configurations are named ones
      INFO("method " << text);
      const MethodSpec m = parse_method(text, r);
      if (m.needs_codebooks()) {
        CHECK(is_named(m.keys));
        CHECK(is_named(m.values));
      }
    }
    ++n;
  }
  CHECK(n >= 8);  // 18m quick, full and table, stories260K, and one recipe per 7B/8B model
  // the width of a model recipe is --set quant.bits=...
  const Recipe r = Recipe::load(test::source_path("recipes/llama3-8b.yaml"), {"quant.bits=0.75"});
  CHECK(r.quant.keys.c == 16);
  CHECK(r.quant.keys.b == 12);
  CHECK(r.quant.values.bits() == 0.75);
}

TEST_CASE("recipes: overrides, shorthands, env expansion, relative paths, YAML round trip", "[recipe]") {
  setenv("ANTKV_TEST_MODELS", "/opt/models", 1);
  const std::string p = write_recipe(R"(
name: t
model: ${ANTKV_TEST_MODELS}/m
calibration:
  text: texts/calib.txt
  tokens: 100
quant:
  bits: 2
  values:
    c: 16
    b: 6
)");
  Recipe r = Recipe::load(p, {"calibration.tokens=4096", "anchor.ratio=0.05", "quant.keys.bits=0.5",
                              "eval.methods=[fp16, uniform]", "kmeans.exclude_anchors=false"});
  CHECK(r.model == "/opt/models/m");
  CHECK(r.calibration.text == (fs::path(p).parent_path() / "texts/calib.txt").string());
  CHECK(r.calibration.tokens == 4096);
  CHECK(r.anchor.ratio == 0.05);
  CHECK(r.quant.keys.c == 16);  // 0.5 bits = c16b8
  CHECK(r.quant.keys.b == 8);
  CHECK(r.quant.values.c == 16);  // explicit c/b beat the file's shorthand
  CHECK(r.quant.values.b == 6);
  CHECK(r.eval.methods == std::vector<std::string>{"fp16", "uniform"});
  CHECK_FALSE(r.kmeans.exclude_anchors);

  // the resolved YAML loads back to the same recipe
  const std::string again = write_recipe(r.to_yaml());
  const Recipe r2 = Recipe::load(again);
  CHECK(r2.to_yaml() == r.to_yaml());
}

TEST_CASE("recipes: unknown keys and bad values are errors naming the key", "[recipe]") {
  CHECK_THROWS_WITH(Recipe::load(write_recipe("model: m\ncalibration:\n  tokenz: 5\n")),
                    Contains("r.yaml") && Contains("unknown key \"calibration.tokenz\""));
  CHECK_THROWS_WITH(Recipe::load(write_recipe("calibration:\n  tokens: many\n")),
                    Contains("calibration.tokens") && Contains("integer"));
  CHECK_THROWS_WITH(Recipe::load(write_recipe("key_rope: sideways\n")), Contains("key_rope") && Contains("sideways"));
  CHECK_THROWS_WITH(Recipe::load(write_recipe("quant:\n  bits: 3\n")), Contains("quant.bits") && Contains("3"));
  CHECK_THROWS_WITH(Recipe::load(write_recipe("anchor:\n  ratio: 2\n")), Contains("anchor.ratio"));
  CHECK_THROWS_WITH(Recipe::load(write_recipe("model: [unclosed\n")), Contains("YAML"));
  CHECK_THROWS_WITH(Recipe::load(write_recipe("model: ${ANTKV_SURELY_UNSET_VAR}/x\n")),
                    Contains("ANTKV_SURELY_UNSET_VAR"));
  CHECK_THROWS_WITH(Recipe::defaults_with({"kmeans.weighting=heavy"}), Contains("kmeans.weighting"));
  CHECK_THROWS_WITH(Recipe::defaults_with({"eval.kv_cache=compressed"}), Contains("eval.kv_cache") && Contains("compressed"));
  CHECK_THROWS_WITH(Recipe::defaults_with({"eval.decode_from=2048"}), Contains("eval.decode_from"));
  CHECK(Recipe::defaults_with({"eval.kv_cache=real", "eval.decode_from=1024"}).eval.decode_from == 1024);
  CHECK_THROWS_WITH(Recipe::defaults_with({"nosuch.key=1"}), Contains("--set") && Contains("nosuch.key"));
  CHECK_THROWS_WITH(Recipe::defaults_with({"novalue"}), Contains("key=value"));
  CHECK_THROWS_WITH(Recipe::load("/nonexistent/recipe.yaml"), Contains("/nonexistent/recipe.yaml"));
}

// Precedence, from lowest to highest: defaults < the file < --set. Within one source the shorthands come
// first (quant.bits, then quant.keys.bits / quant.values.bits) and explicit c/b win over them; a later --set
// of the same key wins over an earlier one.
TEST_CASE("recipes: override precedence - file, shorthands, --set, the same key twice, ${VAR:-default}", "[recipe]") {
  const std::string p = write_recipe(R"(
name: prec
model: /m
quant:
  bits: 2
  keys:
    bits: 0.5
  values:
    c: 16
    b: 6
anchor:
  ratio: 0.03
)");
  const Recipe f = Recipe::load(p);
  CHECK(f.quant.keys.c == 16);  // quant.keys.bits 0.5 (c16b8) beats quant.bits 2 (c4b8)
  CHECK(f.quant.keys.b == 8);
  CHECK(f.quant.values.c == 16);  // explicit c/b beat the shorthand of the same file
  CHECK(f.quant.values.b == 6);
  CHECK(f.anchor.ratio == 0.03);
  CHECK(f.kmeans.iters == Recipe::defaults_with({}).kmeans.iters);  // not in the file: the default

  // --set beats the file, shorthand or not: quant.bits=1 replaces the file's explicit values c16b6 too
  const Recipe s = Recipe::load(p, {"quant.bits=1", "anchor.ratio=0.2"});
  CHECK(s.quant.keys.c == 8);
  CHECK(s.quant.keys.b == 8);
  CHECK(s.quant.values.c == 8);
  CHECK(s.quant.values.b == 8);
  CHECK(s.anchor.ratio == 0.2);
  // within --set, explicit c/b beat a shorthand whatever their order
  const Recipe s2 = Recipe::load(p, {"quant.values.b=12", "quant.bits=1"});
  CHECK(s2.quant.values.c == 8);
  CHECK(s2.quant.values.b == 12);
  CHECK(s2.quant.keys.b == 8);
  // the same key twice on the command line: the last one wins
  CHECK(Recipe::load(p, {"anchor.ratio=0.1", "anchor.ratio=0.05"}).anchor.ratio == 0.05);
  CHECK(Recipe::load(p, {"quant.bits=4", "quant.bits=0.375"}).quant.keys.c == 16);
  // the same key twice in the file is an error naming the file and the key, not a silent choice
  const std::string dup = write_recipe("name: d\nanchor:\n  ratio: 0.1\n  ratio: 0.2\n");
  CHECK_THROWS_WITH(Recipe::load(dup), Contains("r.yaml") && Contains("\"anchor.ratio\" is given twice"));

  // ${VAR:-default}: the default when the variable is unset or empty, the variable otherwise
  unsetenv("ANTKV_TEST_PREC_DIR");
  const std::string e = write_recipe("name: e\nmodel: ${ANTKV_TEST_PREC_DIR:-/opt/fallback}/m\n");
  CHECK(Recipe::load(e).model == "/opt/fallback/m");
  setenv("ANTKV_TEST_PREC_DIR", "", 1);
  CHECK(Recipe::load(e).model == "/opt/fallback/m");
  setenv("ANTKV_TEST_PREC_DIR", "/data/models", 1);
  CHECK(Recipe::load(e).model == "/data/models/m");
  // --set paths resolve against the working directory, the file's against the file's directory
  CHECK(Recipe::load(e, {"model=rel/m"}).model == (fs::current_path() / "rel/m").lexically_normal().string());
  CHECK(Recipe::load(e, {"model=${ANTKV_TEST_PREC_DIR}/n"}).model == "/data/models/n");
  unsetenv("ANTKV_TEST_PREC_DIR");
  CHECK_THROWS_WITH(Recipe::load(e, {"model=${ANTKV_TEST_PREC_DIR}/n"}), Contains("ANTKV_TEST_PREC_DIR"));
}
