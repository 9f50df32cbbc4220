// What a new user meets first: the device chosen for them (auto = the GPU when usable, else the
// CPU, said in one line; cuda without a GPU fails before any work), `run --out DIR` holding every output,
// windows never shorter than a useful minimum, and shipped recipes that compare methods.
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>

#include "calibrate/calibrate.h"
#include "core/atomic_file.h"
#include "core/device.h"
#include "core/error.h"
#include "eval/perplexity.h"
#include "quant/method.h"
#include "recipe/recipe.h"
#include "test_support.h"

using namespace antkv;
namespace fs = std::filesystem;
using Catch::Matchers::Contains;
using Catch::Matchers::StartsWith;

namespace {

const GpuProbe kNoGpu{false, "", "cudaErrorNoDevice: no CUDA-capable device is detected"};
const GpuProbe kGpu{true, "Test GPU (80.0 GiB)", ""};

std::vector<std::string> lines_of(const std::string& s) {
  std::vector<std::string> v;
  std::stringstream ss(s);
  for (std::string l; std::getline(ss, l);) v.push_back(l);
  return v;
}

}  // namespace

TEST_CASE("devices: auto is the CPU without a usable GPU, said in one line with the reason", "[device]") {
  const auto s = select_devices({{"calibration.device", "auto"}, {"kmeans.device", "auto"}, {"eval.device", "auto"}},
                                kNoGpu, "r.yaml");
  CHECK(s.devices == std::vector<std::string>{"cpu", "cpu", "cpu"});
  CHECK(s.line == "device: cpu (no usable GPU: cudaErrorNoDevice: no CUDA-capable device is detected)");
  // with a GPU, auto takes it; keys asked for otherwise are named
  const auto g = select_devices({{"calibration.device", "auto"}, {"eval.device", "auto"}}, kGpu, "r.yaml");
  CHECK(g.devices == std::vector<std::string>{"cuda", "cuda"});
  CHECK(g.line == "device: cuda (Test GPU (80.0 GiB))");
  const auto m = select_devices({{"calibration.device", "cpu"}, {"eval.device", "auto"}}, kGpu, "r.yaml");
  CHECK(m.devices == std::vector<std::string>{"cpu", "cuda"});
  CHECK(m.line == "device: calibration.device cpu, eval.device cuda (Test GPU (80.0 GiB))");
  CHECK(select_devices({{"--device", "cpu"}}, kNoGpu, "x").line == "device: cpu (as asked)");
}

TEST_CASE("devices: cuda asked for without a usable GPU is a one-line error naming the key", "[device]") {
  CHECK_THROWS_WITH(select_devices({{"eval.device", "auto"}, {"kmeans.device", "cuda"}}, kNoGpu, "r.yaml"),
                    Contains("r.yaml: kmeans.device = cuda, but there is no usable GPU (cudaErrorNoDevice"));
  CHECK_THROWS_WITH(select_devices({{"eval.device", "gpu"}}, kGpu, "r.yaml"),
                    Contains("eval.device = \"gpu\" is not one of: auto, cpu, cuda"));
  // the recipe's defaults are auto, and resolving writes the choice into the recipe
  Recipe r = Recipe::defaults_with({});
  CHECK(r.calibration.device == "auto");
  CHECK(r.kmeans.device == "auto");
  CHECK(r.eval.device == "auto");
  const std::string line = resolve_recipe_devices(r, {"calibration.device", "kmeans.device", "eval.device"});
  CHECK_THAT(line, StartsWith("device: "));
  for (const auto* d : {&r.calibration.device, &r.kmeans.device, &r.eval.device})
    CHECK((*d == "cpu" || *d == (probe_gpu().usable ? "cuda" : "cpu")));
  Recipe c = Recipe::defaults_with({"eval.device=cuda"});
  if (!probe_gpu().usable)
    CHECK_THROWS_WITH(resolve_recipe_devices(c, {"eval.device"}), Contains("eval.device = cuda, but there is no usable GPU"));
}

TEST_CASE("antkv-eval run: cuda without a GPU fails before any work, in one line", "[device][cli]") {
  const std::string dir = test::temp_dir();
  // the model does not exist: the device error must come first
  std::ofstream(dir + "/r.yaml") << "name: r\nmodel: /nonexistent/model\ncalibration:\n  text: /nonexistent/t.txt\n"
                                    "eval:\n  texts: [/nonexistent/e.txt]\n  methods: [fp16, antkv]\n";
  for (const char* key : {"calibration.device", "kmeans.device", "eval.device"}) {
    INFO(key);
    const auto c = test::run_without_gpu(dir, std::string(ANTKV_EVAL_PATH) + " run --recipe r.yaml --out out --set " + key +
                                            "=cuda");
    INFO(c.err);
    CHECK(c.rc != 0);
    CHECK(lines_of(c.err).size() == 1);
    CHECK_THAT(c.err, Contains(std::string(key) + " = cuda, but there is no usable GPU"));
    CHECK_FALSE(fs::exists(dir + "/out"));
  }
  const auto c = test::run_without_gpu(dir, std::string(ANTKV_EVAL_PATH) + " ppl --model /nonexistent --text r.yaml --device cuda");
  CHECK(c.rc != 0);
  CHECK_THAT(c.err, Contains("--device = cuda, but there is no usable GPU"));
  CHECK(lines_of(c.err).size() == 1);
}

TEST_CASE("antkv-eval ppl: device auto without a GPU runs on the CPU and says why", "[device][cli][shared]") {
  const std::string dir = test::temp_dir();
  const auto c = test::run_without_gpu(dir, std::string(ANTKV_EVAL_PATH) + " ppl --model " + test::model_dir("stories260K") +
                                          " --text " + test::shared_path("data/books-test.txt") +
                                          " --seq-len 512 --protocol single_bos --max-windows 1 -q");
  INFO(c.err);
  REQUIRE(c.rc == 0);
  const auto err = lines_of(c.err);
  REQUIRE(!err.empty());
  CHECK_THAT(err[0], StartsWith("device: cpu (no usable GPU: "));
  CHECK_THAT(c.out, Contains("on cpu"));
}

TEST_CASE("antkv-eval run --out DIR: every stage's output lands in DIR, nothing in the current folder",
          "[cli][shared][slow]") {  // 8 s in Release
  const std::string dir = test::temp_dir();
  const std::string cwd = dir + "/cwd";
  fs::create_directories(cwd);
  // stories260K (head_dim 8): two calibration dumps (post- and pre-RoPE keys), three codebook sets
  std::ofstream(dir + "/r.yaml") << "name: tiny\nmodel: " << test::model_dir("stories260K")
                                 << "\ncalibration:\n  text: " << test::shared_path("data/books-calib.txt")
                                 << "\n  tokens: 1533\n  seq_len: 512\nquant:\n  bits: 1\nkmeans:\n  iters: 2\n"
                                    "eval:\n  texts: ["
                                 << test::shared_path("data/books-test.txt")
                                 << "]\n  seq_len: 512\n  protocol: single_bos\n  max_windows: 1\n"
                                    "  methods: [fp16, vq, antkv, \"antkv:key_rope=pre\"]\n";
  const auto c = test::run_without_gpu(cwd, std::string(ANTKV_EVAL_PATH) + " run --recipe ../r.yaml --out ../run -q");
  INFO(c.err);
  REQUIRE(c.rc == 0);
  std::set<std::string> files;
  for (const auto& e : fs::recursive_directory_iterator(dir + "/run"))
    if (e.is_regular_file()) files.insert(fs::relative(e.path(), dir + "/run").string());
  for (const char* f : {"calib-post.h5", "calib-post.h5.summary.json", "calib-pre.h5", "calib-pre.h5.summary.json",
                        "codebooks/k-c8b8_v-c8b8_anchor_post.h5", "codebooks/k-c8b8_v-c8b8_none_all_post.h5",
                        "codebooks/k-c8b8_v-c8b8_anchor_pre.h5", "results.json", "results.csv", "results.txt"}) {
    INFO(f);
    CHECK(files.count(f));
  }
  CHECK(fs::is_empty(cwd));  // no runs/<name> in the current folder
  CHECK_THAT(c.out, Contains("plot: /usr/bin/python3 scripts/plot_results.py " +
                             fs::weakly_canonical(dir + "/run").string() + "/results.json"));
  // ppl and diagnose with the same --out read the codebooks from DIR (ppl replaces the run's results: --force)
  const auto p = test::run_without_gpu(cwd, std::string(ANTKV_EVAL_PATH) + " ppl --recipe ../r.yaml --out ../run --force -q");
  INFO(p.err);
  CHECK(p.rc == 0);
}

TEST_CASE("calibration windows: a last window shorter than half a window is dropped, and said so", "[calibrate]") {
  std::vector<int32_t> ids(1 + 5000);
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int32_t>(i);
  // 4096 text tokens in windows of 2048 (BOS + 2047): 2 full windows and 2 tokens left
  auto p = plan_calibration(ids, 4096, 2048, 0);
  CHECK(p.windows == 2);
  CHECK(p.text_tokens_used == 4094);
  CHECK(p.dropped_tokens == 2);
  CHECK(calibration_plan_line(p) ==
        "calibration: 4094 text tokens in 2 windows of 2048 (the last 2 tokens, less than half a window, are left out)");
  // half a window or more is kept (as a shorter window); a single short window is all there is
  p = plan_calibration(ids, 2047 + 1024, 2048, 0);
  CHECK(p.windows == 2);
  CHECK(p.dropped_tokens == 0);
  CHECK(p.window(1, 7).size() == 1025);
  p = plan_calibration(ids, 2047 + 1023, 2048, 0);
  CHECK(p.windows == 1);
  CHECK(p.dropped_tokens == 1023);
  p = plan_calibration(ids, 100, 2048, 0);
  CHECK(p.windows == 1);
  CHECK(p.dropped_tokens == 0);
  CHECK(calibration_plan_line(p) == "calibration: 100 text tokens in 1 windows of 2048");
  // overlapping windows: the window before the dropped one is full
  p = plan_calibration(ids, 1000, 11, 5);  // span 10: windows at 0, 5, ..., 990
  CHECK(p.windows == 199);
  CHECK(p.dropped_tokens == 0);
  p = plan_calibration(ids, 1002, 11, 5);  // a 200th window would hold 7 tokens (>= 5): kept
  CHECK(p.windows == 200);
  p = plan_calibration(ids, 1000, 11, 10);
  CHECK(p.windows == 100);
  p = plan_calibration(ids, 1004, 11, 10);  // 4 tokens after 100 windows of 10: dropped
  CHECK(p.windows == 100);
  CHECK(p.dropped_tokens == 4);
  // no BOS (Qwen2): the window starts with the text token before its span, and is as long as with BOS
  p = plan_calibration(ids, 4094, 2048, 0);
  const auto w = p.window(1, -1);
  REQUIRE(w.size() == 2048);
  CHECK(w[0] == 2047);
  CHECK(w[1] == 2048);
}

TEST_CASE("evaluation windows: the remainder is never scored, and the line says so", "[ppl]") {
  // bos_window: BOS + 2047 text tokens per window
  CHECK(remainder_tokens(1 + 3 * 2047 + 5, 2048, WindowProtocol::kBosWindow) == 5);
  CHECK(remainder_tokens(1 + 3 * 2047, 2048, WindowProtocol::kBosWindow) == 0);
  CHECK(remainder_tokens(3 * 512 + 100, 512, WindowProtocol::kSingleBos) == 100);
  CHECK(windows_line("t.txt", 1 + 3 * 2047 + 5, 2048, WindowProtocol::kBosWindow, 0, -1) ==
        "t.txt: 6147 tokens, 3 windows of 2048; the last 5 tokens (less than a window) are not scored");
  CHECK(windows_line("t.txt", 1 + 3 * 2047, 2048, WindowProtocol::kBosWindow, 0, -1) ==
        "t.txt: 6142 tokens, 3 windows of 2048");
  CHECK(windows_line("t.txt", 1 + 3 * 2047 + 5, 2048, WindowProtocol::kBosWindow, 0, 2) ==
        "t.txt: 6147 tokens, 2 of its 3 windows of 2048");
  CHECK_THROWS_WITH(Recipe::defaults_with({"eval.max_windows=0"}), Contains("eval.max_windows"));
}

TEST_CASE("recipes: every shipped recipe compares methods beyond fp16, and needs no GPU", "[recipe]") {
  int n = 0;
  for (const auto& e : fs::directory_iterator(test::source_path("recipes"))) {
    if (e.path().extension() != ".yaml") continue;
    INFO(e.path().string());
    const Recipe r = Recipe::load(e.path().string());
    std::set<std::string> kinds;
    for (const auto& m : r.eval.methods) kinds.insert(parse_method(m, r).kind_name());
    for (const char* k : {"fp16", "uniform", "vq", "antkv"}) CHECK(kinds.count(k) == 1);  // and rsq where listed
    CHECK(r.eval.methods.size() >= 5);
    // auto (or cpu): a shipped recipe runs on a machine without a GPU
    for (const auto* d : {&r.calibration.device, &r.kmeans.device, &r.eval.device}) CHECK(*d != "cuda");
    ++n;
  }
  CHECK(n >= 8);
  // one recipe per model; its vq/antkv methods take the width of --set quant.bits
  for (const char* model : {"llama3-8b", "mistral-7b", "llama2-7b", "qwen2-7b"}) {
    for (double bits : {4.0, 2.0, 1.0, 0.75, 0.5, 0.375}) {
      INFO(model << " at " << bits << " bits");
      const Recipe r = Recipe::load(test::source_path(std::string("recipes/") + model + ".yaml"),
                                    {"quant.bits=" + std::to_string(bits)});
      int at_width = 0;
      for (const auto& s : r.eval.methods) {
        const MethodSpec m = parse_method(s, r);
        if (m.needs_codebooks()) {
          CHECK(m.keys.bits() == bits);
          ++at_width;
        }
      }
      CHECK(at_width >= 4);  // vq, antkv and ablations
      CHECK(r.eval.methods.size() >= 7);
    }
  }
}

TEST_CASE("recipes: eval.widths repeats the vq/antkv methods without bits at each width", "[recipe]") {
  Recipe r = Recipe::load(test::source_path("recipes/llama3-8b.yaml"), {"eval.widths=[1, 0.5]"});
  CHECK(r.eval.methods == std::vector<std::string>{
                              "fp16", "uniform:bits=4,group=128", "uniform:bits=2,group=128",
                              "vq:bits=1", "antkv:bits=1", "antkv:bits=1,anchors=off", "antkv:bits=1,weighting=none",
                              "vq:bits=1,key_rope=pre", "antkv:bits=1,key_rope=pre",
                              "vq:bits=0.5", "antkv:bits=0.5", "antkv:bits=0.5,anchors=off",
                              "antkv:bits=0.5,weighting=none", "vq:bits=0.5,key_rope=pre", "antkv:bits=0.5,key_rope=pre"});
  // methods naming their bits stay as they are, duplicates are dropped, and the stored recipe loads the same
  r = Recipe::defaults_with({"eval.methods=[fp16, \"vq:bits=2\", antkv, \"antkv:kbits=1\"]", "eval.widths=[2, 0.375]"});
  CHECK(r.eval.methods ==
        std::vector<std::string>{"fp16", "vq:bits=2", "antkv:bits=2", "antkv:bits=0.375", "antkv:kbits=1"});
  const std::string p = test::temp_dir() + "/stored.yaml";
  std::ofstream(p) << r.to_yaml();
  CHECK(Recipe::load(p).eval.methods == r.eval.methods);
  CHECK_THROWS_WITH(Recipe::defaults_with({"eval.methods=[antkv]", "eval.widths=[3]"}),
                    Contains("key \"eval.widths\": \"3\" is not one of the widths"));
}
