// Recipes: the shipped files parse, overrides apply, unknown keys and bad values name the key.
#include <filesystem>
#include <fstream>

#include "core/atomic_file.h"
#include "core/error.h"
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
  int n = 0;
  for (const auto& e : fs::directory_iterator(test::source_path("recipes"))) {
    if (e.path().extension() != ".yaml") continue;
    INFO(e.path().string());
    const Recipe r = Recipe::load(e.path().string());
    CHECK(r.name == e.path().stem().string());
    CHECK(!r.model.empty());
    CHECK(fs::path(r.calibration.text).is_absolute());
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
  CHECK_THROWS_WITH(Recipe::defaults_with({"nosuch.key=1"}), Contains("--set") && Contains("nosuch.key"));
  CHECK_THROWS_WITH(Recipe::defaults_with({"novalue"}), Contains("key=value"));
  CHECK_THROWS_WITH(Recipe::load("/nonexistent/recipe.yaml"), Contains("/nonexistent/recipe.yaml"));
}
