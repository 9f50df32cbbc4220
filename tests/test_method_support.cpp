// What runs where (quant/method_support.h): every method option against every path with each refusal's words,
// the recipe check that stops antkv-eval before any calibration, bench's check of --method, and the table of
// docs/METHODS.md, which must be the one `antkv-eval methods --format markdown` prints.
#include <sys/wait.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <algorithm>
#include <set>

#include "core/error.h"
#include "core/atomic_file.h"
#include "quant/method.h"
#include "quant/method_support.h"
#include "recipe/recipe.h"
#include "test_support.h"

using namespace antkv;
namespace fs = std::filesystem;
using Catch::Matchers::Contains;

namespace {

constexpr MethodPath kPaths[] = {MethodPath::kCpu, MethodPath::kGpuSimulated, MethodPath::kGpuReal, MethodPath::kBench,
                                 MethodPath::kMaxContext};

MethodSpec method(const std::string& text) { return parse_method(text, Recipe::defaults_with({})); }

// One method string and, per path (kPaths order), "" when it runs or a substring of its refusal.
struct Expect {
  const char* method;
  const char* want[5];
};

const char* const kCommuteLut = "key_rope=commute with gain= runs on the compressed cache's lookup-table widths";
const char* const kCorrectGpu = "correct=on (the attention-score correction) is not implemented on the GPU";
const char* const kNoCorrect = "correct=on is not implemented in the compressed cache";
const char* const kRsqReal = "rsq has no real GPU cache";

// Every kind, and every option of every kind with each of its values (numbers: one that runs, one that a path
// refuses), against every path. Shape-free: the shape rules are below.
const Expect kExpect[] = {
    {"fp16", {"", "", "", "", ""}},
    {"uniform", {"", "", "", "", ""}},
    {"vq", {"", "", "", "", ""}},
    {"antkv", {"", "", "", "", ""}},
    {"rsq", {"", "", kRsqReal, "rsq has no real GPU cache to time", "rsq has no real GPU cache to time"}},
    {"uniform:bits=4,group=64,window=32", {"", "", "", "", ""}},
    {"uniform:bits=3", {"", "", "takes bits 2 or 4, not 3", "takes bits 2 or 4, not 3", "takes bits 2 or 4, not 3"}},
    {"uniform:group=16", {"", "", "takes group 32, 64 or 128, not 16", "takes group 32, 64 or 128, not 16",
                          "takes group 32, 64 or 128, not 16"}},
    {"uniform:window=2000000", {"", "", "a window up to 2^20, not 2000000", "a window up to 2^20, not 2000000",
                                "a window up to 2^20, not 2000000"}},
    {"rsq:bits=4,key_rope=pre", {"", "", kRsqReal, kRsqReal, kRsqReal}},
    {"vq:bits=4", {"", "", "", "", ""}},
    {"vq:bits=2", {"", "", "", "", ""}},
    {"vq:bits=0.75", {"", "", "", "", ""}},
    {"vq:bits=0.5", {"", "", "", "", ""}},
    {"vq:bits=0.375", {"", "", "", "", ""}},
    {"vq:bits=1.5", {"", "", "c8b12 is not one of the compressed cache's configurations", "c8b12 is not one",
                     "c8b12 is not one"}},
    {"vq:bits=1.25", {"", "", "c8b10 is not one of the compressed cache's configurations", "c8b10 is not one",
                      "c8b10 is not one"}},
    {"vq:bits=0.25", {"", "", "c32b8 is not one of the compressed cache's configurations", "c32b8 is not one",
                      "c32b8 is not one"}},
    {"vq:kbits=1,vbits=0.5", {"", "", "", "", ""}},
    {"antkv:kbits=0.5,vbits=1,gain=kv,rotate=pca,key_rope=pre", {"", "", "", "", ""}},
    {"vq:kbits=1,vbits=2,key_rope=commute", {"", "", "key_rope=commute with kbits != vbits (c8b8 / c4b8) is not implemented",
                                             "key_rope=commute with kbits != vbits", "key_rope=commute with kbits != vbits"}},
    {"antkv:bits=1,anchors=kv", {"", "", "", "", ""}},
    {"antkv:bits=1,anchors=on", {"", "", "", "", ""}},
    {"antkv:bits=1,anchors=off", {"", "", "", "", ""}},
    {"antkv:bits=1,anchors=k", {"", "", "", "anchors=k (one tensor only) is not implemented in the synthetic cache",
                                "anchors=k (one tensor only) is not implemented in the synthetic cache"}},
    {"antkv:bits=1,anchors=v,promote=off", {"", "", "", "anchors=v (one tensor only) is not implemented in the synthetic cache",
                                            "anchors=v (one tensor only) is not implemented in the synthetic cache"}},
    {"antkv:bits=1,anchors=k,promote=off,key_rope=pre", {"", "", "anchors=k (one tensor only) runs on the compressed cache with post-RoPE keys",
                                                         "anchors=k (one tensor only) runs", "anchors=k (one tensor only) runs"}},
    {"antkv:bits=1,anchors=v,key_rope=pre", {"", "", "anchors=v (one tensor only) runs on the compressed cache with post-RoPE keys",
                                             "anchors=v (one tensor only) runs", "anchors=v (one tensor only) runs"}},
    {"antkv:bits=1,ratio=0.05", {"", "", "", "", ""}},
    {"antkv:bits=1,score=error_bound", {"", "", "", "", ""}},
    {"antkv:bits=1,score=attention_mass", {"", "", "", "", ""}},
    {"antkv:bits=1,score=key_bound", {"", "", "", "", ""}},
    {"antkv:bits=1,score=random", {"", "", "", "", ""}},
    {"antkv:bits=1,score=recent", {"", "", "", "", ""}},
    {"antkv:bits=1,promote=on", {"", "", "", "", ""}},
    {"antkv:bits=1,promote=off", {"", "", "", "", ""}},
    {"vq:bits=1,key_rope=post", {"", "", "", "", ""}},
    {"antkv:bits=1,key_rope=pre", {"", "", "", "", ""}},
    {"vq:bits=1,key_rope=commute", {"", "", "", "", ""}},
    {"antkv:bits=0.5,key_rope=commute", {"", "", "", "", ""}},
    {"vq:bits=0.75,key_rope=commute", {"", "", "key_rope=commute does not run c16b12 on the compressed cache",
                                       "does not run c16b12", "does not run c16b12"}},
    {"vq:bits=1,gain=kv,key_rope=commute", {"", "", "", "", ""}},
    {"antkv:bits=0.5,gain=k,key_rope=commute", {"", "", "", "", ""}},
    {"vq:bits=2,gain=k,key_rope=commute", {"", "", kCommuteLut, kCommuteLut, kCommuteLut}},
    {"vq:bits=1,metric=task,key_rope=commute", {"", "", "key_rope=commute with metric=task is not implemented",
                                                "key_rope=commute with metric=task", "key_rope=commute with metric=task"}},
    {"antkv:bits=1,weighting=anchor", {"", "", "", "", ""}},
    {"antkv:bits=1,weighting=none", {"", "", "", "", ""}},
    {"antkv:bits=1,exclude=on", {"", "", "", "", ""}},
    {"antkv:bits=1,exclude=off", {"", "", "", "", ""}},
    {"antkv:bits=1,correct=off", {"", "", "", "", ""}},
    {"antkv:bits=1,correct=on", {"", kCorrectGpu, kNoCorrect, kNoCorrect, kNoCorrect}},
    {"vq:bits=1,gain=off", {"", "", "", "", ""}},
    {"vq:bits=1,gain=k", {"", "", "", "", ""}},
    {"vq:bits=1,gain=kv", {"", "", "", "", ""}},
    {"vq:bits=2,gain=kv", {"", "", "", "", ""}},
    {"vq:bits=1,gain=k,key_rope=pre", {"", "", "", "", ""}},
    {"vq:bits=2,gain=k,key_rope=pre", {"", "", "", "", ""}},
    {"vq:bits=1,gain=kv,norm=fp16", {"", "", "", "", ""}},
    {"vq:bits=1,gain=kv,norm=fp8", {"", "", "", "", ""}},
    {"antkv:bits=1,gain=k,rotate=pca,norm=fp8", {"", "", "", "", ""}},
    {"vq:bits=1,rotate=off", {"", "", "", "", ""}},
    {"vq:bits=1,rotate=pca", {"", "", "", "", ""}},
    {"vq:bits=4,rotate=pca", {"", "", "", "", ""}},
    {"vq:bits=1,metric=plain", {"", "", "", "", ""}},
    {"vq:bits=1,metric=task", {"", "", "", "", ""}},
    {"vq:lkbits=1/2", {"", "", "", "", ""}},
    // the best 1-bit method's form: per-layer widths of keys and values, 8-bit norms, the task metric
    {"vq:gain=kv,rotate=pca,norm=fp8,metric=task,lkbits=1/2,lvbits=0.5/2", {"", "", "", "", ""}},
    {"vq:lkbits=1/2,lvbits=1/2", {"", "", "", "", ""}},
    {"antkv:lvbits=1/1", {"", "", "", "", ""}},
    {"vq:lkbits=1/0.5,lvbits=1/0.5,key_rope=commute", {"", "", "key_rope=commute with per-layer key widths of different group sizes",
                                          "key_rope=commute with per-layer key widths", "key_rope=commute with per-layer key widths"}},
    {"antkv:bits=1,lratio=0.01/0.02", {"", "", "", "per-layer ratios (lratio) are not implemented in the synthetic cache bench fills",
                                       "per-layer ratios (lratio) are not implemented in the synthetic cache bench fills"}},
    {"vq:bits=1,gain=kv,rotate=pca,key_rope=pre", {"", "", "", "", ""}},
    {"antkv:bits=0.5,gain=kv,rotate=pca,key_rope=pre", {"", "", "", "", ""}},
};

// What each path names as the alternative to a method it refuses (rules without words of their own).
const char* const kAlternative[] = {"", "eval.device: cpu", "eval.kv_cache: simulated",
                                    "bench and max-context time only what the real caches run",
                                    "bench and max-context time only what the real caches run"};
const char* const kPathWords[] = {"the CPU cache", "the simulated GPU quantizer", "the real GPU cache",
                                  "bench (antkv-eval bench --method)", "max-context (antkv-eval max-context)"};

}  // namespace

TEST_CASE("method_support: every method option against every path, each refusal's words", "[support]") {
  // the list names every kind and every value of every enum option (a new value must be declared here)
  std::set<std::string> listed;
  for (const Expect& e : kExpect) listed.insert(e.method);
  for (const auto& k : option_spellings<MethodKind>()) CHECK(listed.count(k.name) == 1);
  auto covered = [&](const std::string& key_value) {
    for (const auto& m : listed)
      if (m.find(key_value) != std::string::npos) return true;
    return false;
  };
  for (const auto& v : option_spellings<Gain>()) CHECK(covered(std::string("gain=") + v.name));
  for (const auto& v : option_spellings<Norm>()) CHECK(covered(std::string("norm=") + v.name));
  for (const auto& v : option_spellings<Rotate>()) CHECK(covered(std::string("rotate=") + v.name));
  for (const auto& v : option_spellings<Metric>()) CHECK(covered(std::string("metric=") + v.name));
  for (const auto& v : option_spellings<Weighting>()) CHECK(covered(std::string("weighting=") + v.name));
  for (const auto& v : option_spellings<AnchorTensors>()) CHECK(covered(std::string("anchors=") + v.name));
  for (const auto& v : option_spellings<AnchorScoreKind>()) CHECK(covered(std::string("score=") + v.name));
  for (const auto& v : option_spellings<KeyRope>()) CHECK(covered(std::string("key_rope=") + v.name));
  for (const char* k : {"bits=", "kbits=", "vbits=", "group=", "window=", "ratio=", "promote=on", "promote=off",
                        "exclude=on", "exclude=off", "correct=on", "correct=off", "lkbits=", "lvbits=", "lratio="})
    CHECK(covered(k));

  for (const Expect& e : kExpect) {
    const MethodSpec m = method(e.method);
    for (int i = 0; i < 5; ++i) {
      const PathSupport s = method_support(m, kPaths[i]);
      INFO(e.method << " on " << option_name(kPaths[i]) << ": " << (s.runs ? "runs" : s.reason));
      const std::string want = e.want[i];
      if (want.empty()) {
        CHECK(s.runs);
        CHECK(s.reason.empty());
        CHECK_NOTHROW(require_support(m, kPaths[i]));
        continue;
      }
      REQUIRE_FALSE(s.runs);
      CHECK_THAT(s.why, Contains(want));
      // one line: the method, the path, the rule's words, what to use instead
      CHECK(s.reason.find('\n') == std::string::npos);
      CHECK_THAT(s.reason, Contains(std::string("method \"") + e.method + "\" does not run on " + kPathWords[i]));
      CHECK_THAT(s.reason, Contains(s.why));
      if (m.kind != MethodKind::kRsq) CHECK_THAT(s.reason, Contains(kAlternative[i]));
      CHECK_THROWS_AS(require_support(m, kPaths[i]), Error);
      CHECK_THROWS_WITH(require_support(m, kPaths[i]), s.reason);
    }
  }
}

TEST_CASE("method_support: options a path does not read are said, not ignored silently", "[support]") {
  // bench reads no training option: it says so (it has no codebooks to train), and so does the real cache
  const PathSupport b = method_support(method("antkv:bits=1,weighting=none,exclude=off"), MethodPath::kBench);
  REQUIRE(b.runs);
  CHECK_THAT(b.note, Contains("weighting and exclude are codebook-training options"));
  CHECK_THAT(method_support(method("antkv:bits=1,score=attention_mass"), MethodPath::kMaxContext).note,
             Contains("score only decides whether decode-time anchors run"));
  CHECK_THAT(method_support(method("vq:bits=1,exclude=on"), MethodPath::kGpuReal).note,
             Contains("codebook-training options"));
  // the real path for uniform: the prefill in one chunk into the packed cache, then one token per forward
  CHECK_THAT(method_support(method("uniform:bits=2"), MethodPath::kGpuReal).note, Contains("prefill in one chunk"));
  CHECK_THAT(method_support(method("vq:bits=1,key_rope=pre"), MethodPath::kBench).note,
             Contains("dequantize-rotate-dot"));
  CHECK_THAT(method_support(method("vq:bits=1,gain=kv,rotate=pca,key_rope=pre"), MethodPath::kGpuReal).note,
             Contains("each coded key mapped back through the basis before its rotation"));
  CHECK(method_support(method("vq:bits=1"), MethodPath::kCpu).note.empty());  // the reference reads every option
}

TEST_CASE("method_support: shape rules apply with the model's facts", "[support]") {
  auto why = [](const std::string& m, MethodPath p, ModelShapeFacts s) {
    const PathSupport r = method_support(method(m), p, &s);
    return r.runs ? std::string("runs") : r.reason;
  };
  const ModelShapeFacts d64{64, 8, 2}, d96{96, 8, 8}, d80{80, 4, 4}, d40{40, 4, 4}, g32{128, 32, 1};
  // without facts the shape rules pass
  CHECK(method_support(method("rsq:bits=2"), MethodPath::kCpu).runs);
  CHECK_THAT(why("rsq:bits=2", MethodPath::kCpu, d80), Contains("rsq needs a power-of-2 head_dim") && Contains("80"));
  CHECK(why("rsq:bits=2", MethodPath::kCpu, d64) == "runs");
  CHECK_THAT(why("vq:bits=0.75", MethodPath::kCpu, d40), Contains("group size c = 16 does not divide head_dim 40"));
  CHECK(why("vq:bits=1", MethodPath::kCpu, d40) == "runs");
  for (MethodPath p : {MethodPath::kGpuSimulated, MethodPath::kGpuReal, MethodPath::kBench, MethodPath::kMaxContext}) {
    CHECK_THAT(why("fp16", p, d96), Contains("the GPU runtime takes head_dim 64 or 128, not 96"));
    CHECK_THAT(why("vq:bits=1", p, g32), Contains("GQA group of at most 16, not 32"));
    CHECK(why("vq:bits=1", p, d64) == "runs");
  }
  CHECK_THAT(why("uniform:group=48", MethodPath::kGpuSimulated, d64),
             Contains("min(group, head_dim) = 48 channels must divide head_dim 64"));
  CHECK(why("uniform:group=32", MethodPath::kGpuSimulated, d64) == "runs");
  CHECK(ModelShapeFacts{128, 32, 8}.gqa_group() == 4);
}

TEST_CASE("method_support: a recipe's methods against the paths it evaluates them on, all refusals together",
          "[support]") {
  const std::string methods =
      "eval.methods=[fp16, \"antkv:bits=1,correct=on\", \"vq:bits=1,gain=kv\", \"rsq:bits=2\", \"uniform:bits=3\", "
      "\"vq:bits=1\"]";
  // real: vq/antkv through the simulated quantizer and the compressed cache, uniform through the packed cache;
  // fp16, rsq simulated
  const Recipe real = Recipe::defaults_with({"eval.device=cuda", "eval.kv_cache=real", methods});
  const std::vector<std::string> errs = recipe_support_errors(real);
  REQUIRE(errs.size() == 2);  // vq:bits=1,gain=kv runs on the compressed cache
  CHECK_THAT(errs[0], Contains("method \"antkv:bits=1,correct=on\"") && Contains(kCorrectGpu));
  CHECK_THAT(errs[1], Contains("method \"uniform:bits=3\"") && Contains("the real GPU cache") &&
                          Contains("takes bits 2 or 4, not 3"));
  try {
    require_recipe_support(real);
    FAIL("no error");
  } catch (const Error& e) {
    const std::string msg = e.what();
    CHECK_THAT(msg, Contains("2 methods of eval.methods cannot be evaluated") && Contains("eval.kv_cache: real"));
    CHECK(std::count(msg.begin(), msg.end(), '\n') == 2);  // a first line, then one line per method
  }
  // simulated: only the score correction is refused on the GPU; the CPU runs every one of them
  const Recipe sim = Recipe::defaults_with({"eval.device=cuda", methods});
  REQUIRE(recipe_support_errors(sim).size() == 1);
  CHECK(recipe_support_errors(Recipe::defaults_with({"eval.device=cpu", methods})).empty());
  // the model's shape: head_dim 96 runs nowhere on the GPU
  const ModelShapeFacts d96{96, 8, 8};
  CHECK(recipe_support_errors(Recipe::defaults_with({"eval.device=cuda", "eval.methods=[fp16, \"vq:bits=1\"]"}), &d96)
            .size() == 2);
  // a real cache needs the GPU; auto is checked once the device is known, unless the cache is real
  CHECK_THAT(recipe_support_errors(Recipe::defaults_with({"eval.device=cpu", "eval.kv_cache=real"})).at(0),
             Contains("eval.kv_cache: real needs the GPU"));
  CHECK(recipe_support_errors(Recipe::defaults_with({methods})).empty());
  CHECK(recipe_support_errors(Recipe::defaults_with({"eval.kv_cache=real", methods})).size() == 2);
  // which paths an evaluation uses
  CHECK(eval_paths(method("vq:bits=1"), "cpu", "simulated") == std::vector<MethodPath>{MethodPath::kCpu});
  CHECK(eval_paths(method("vq:bits=1"), "cuda", "simulated") == std::vector<MethodPath>{MethodPath::kGpuSimulated});
  CHECK(eval_paths(method("antkv:bits=1"), "cuda", "real") ==
        std::vector<MethodPath>({MethodPath::kGpuSimulated, MethodPath::kGpuReal}));
  CHECK(eval_paths(method("uniform:bits=2"), "cuda", "real") ==
        std::vector<MethodPath>({MethodPath::kGpuSimulated, MethodPath::kGpuReal}));
  CHECK(eval_paths(method("rsq:bits=2"), "cuda", "real") == std::vector<MethodPath>{MethodPath::kGpuSimulated});
}

TEST_CASE("method_support: docs/METHODS.md holds the table antkv-eval methods --format markdown prints", "[support]") {
  const std::string doc = read_file(std::string(ANTKV_SOURCE_DIR) + "/docs/METHODS.md");
  const std::string begin = "<!-- BEGIN methods-support", end = "<!-- END methods-support -->";
  const size_t b = doc.find(begin), e = doc.find(end);
  REQUIRE(b != std::string::npos);
  REQUIRE(e != std::string::npos);
  const size_t body = doc.find('\n', b) + 1;
  REQUIRE(body <= e);
  INFO("regenerate it: python3 scripts/methods_table.py build/apps/antkv-eval");
  CHECK(doc.substr(body, e - body) == methods_support_markdown());
  // every row of the table is a method of the list above or a shape example, with one cell per path
  const auto rows = methods_support_table();
  CHECK(rows.size() >= 50);
  for (const auto& r : rows) CHECK(r.paths.size() == 5);
}

namespace {

struct Cli {
  int code = -1;
  std::string err;
};

Cli run_cli(const std::string& command) {
  const std::string err = test::temp_dir() + "/stderr.txt";
  const int st = std::system(("{ export OMP_NUM_THREADS=1; " + command + " ; } > /dev/null 2> " + err).c_str());
  Cli r;
  r.code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  r.err = read_file(err);
  return r;
}

std::string head_of(const std::string& dir, const std::string& name, const std::string& shared, size_t bytes) {
  const std::string p = dir + "/" + name;
  std::ofstream(p, std::ios::binary) << read_file(test::shared_path(shared)).substr(0, bytes);
  return p;
}

}  // namespace

TEST_CASE("CLI: a refused method stops run before calibrating, every refusal on its line, no output written",
          "[support][cli][shared]") {
  const std::string dir = test::temp_dir();
  const std::string recipe = dir + "/r.yaml";
  std::ofstream(recipe) << "name: t\nmodel: " << test::model_dir("stories260K") << "\ncalibration:\n  text: "
                        << head_of(dir, "calib.txt", "data/books-calib.txt", 40000)
                        << "\n  tokens: 2048\n  seq_len: 128\n  device: cpu\nquant:\n  bits: 1\nkmeans:\n  iters: 2\n"
                        << "  device: cpu\neval:\n  texts: [" << head_of(dir, "valid.txt", "data/books-valid.txt", 8000)
                        << "]\n  seq_len: 128\n  max_windows: 1\n  device: cpu\n"
                        << "  methods: [fp16, \"vq:bits=1\", \"antkv:bits=1,correct=on\", \"vq:bits=1,metric=task,key_rope=commute\"]\n";
  const std::string eval = ANTKV_EVAL_PATH;
  const std::string out = dir + "/run";
  // the real cache with correct=on and commute keys with metric=task (on a machine with or without a GPU: checked
  // before the device)
  for (const char* cmd : {" run", " ppl"}) {
    const Cli r = run_cli(eval + cmd + " --recipe " + recipe + " --out " + out +
                          " --set eval.device=cuda --set eval.kv_cache=real");
    INFO(r.err);
    CHECK(r.code == 1);
    CHECK_THAT(r.err, Contains("2 methods of eval.methods cannot be evaluated"));
    CHECK_THAT(r.err, Contains("\n  method \"antkv:bits=1,correct=on\" does not run on the simulated GPU quantizer"));
    CHECK_THAT(r.err, Contains("\n  method \"vq:bits=1,metric=task,key_rope=commute\" does not run on the real GPU cache"));
    CHECK(r.err.find("calibration:") == std::string::npos);  // no calibration plan: nothing started
    CHECK(r.err.find("outputs:") == std::string::npos);
    CHECK_FALSE(fs::exists(out));  // no folder, no lock, no dump
  }
  // the model's shape, once the checkpoint is open: stories260K's head_dim 8 is no multiple of c16's 16 (CPU, diagnose)
  for (const char* cmd : {" run", " diagnose"}) {
    const Cli r = run_cli(eval + cmd + " --recipe " + recipe + " --out " + out +
                          " --set 'eval.methods=[fp16, \"vq:bits=0.5\"]'");
    INFO(r.err);
    CHECK(r.code == 1);
    CHECK_THAT(r.err, Contains("1 method of eval.methods cannot be evaluated") &&
                          Contains("method \"vq:bits=0.5\" does not run on the CPU cache (eval.device: cpu): group size "
                                   "c = 16 does not divide head_dim 8"));
    CHECK(r.err.find("calibration:") == std::string::npos);
    CHECK_FALSE(fs::exists(out));
  }
  // eval.kv_cache: real on the CPU: refused before the folder is made
  const Cli cpu = run_cli(eval + " run --recipe " + recipe + " --out " + out + " --set eval.kv_cache=real");
  CHECK(cpu.code == 1);
  CHECK_THAT(cpu.err, Contains("eval.kv_cache: real needs the GPU (eval.device: cpu)"));
  CHECK_FALSE(fs::exists(out));
}

TEST_CASE("CLI: bench and max-context refuse every method they cannot time, together, before any work",
          "[support][cli]") {
  const std::string eval = ANTKV_EVAL_PATH;
  for (const char* cmd : {" bench", " max-context"}) {
    const Cli r = run_cli(eval + cmd + " --method fp16 --method antkv:bits=1,anchors=v,promote=off --method rsq:bits=2 "
                                       "--method uniform:bits=2,group=100");
    INFO(r.err);
    CHECK(r.code == 1);
    CHECK_THAT(r.err, Contains("3 methods of --method cannot be timed"));
    CHECK_THAT(r.err, Contains("method \"antkv:bits=1,anchors=v,promote=off\" does not run on") &&
                          Contains("anchors=v (one tensor only) is not implemented in the synthetic cache bench fills"));
    CHECK_THAT(r.err, Contains("method \"rsq:bits=2\"") && Contains("rsq has no real GPU cache to time"));
    CHECK_THAT(r.err, Contains("takes group 32, 64 or 128, not 100"));
  }
  // the model's shape: --shape names it
  const Cli d = run_cli(eval + " max-context --shape llama3-8b --method vq:bits=1,correct=on");
  CHECK(d.code == 1);
  CHECK_THAT(d.err, Contains("correct=on is not implemented in the compressed cache"));
  // the table itself
  const Cli t = run_cli(eval + " methods --format markdown");
  CHECK(t.code == 0);
  const Cli both = run_cli(eval + " methods --json --format markdown");
  CHECK(both.code == 1);
  CHECK_THAT(both.err, Contains("give --json or --format, not both"));
}
