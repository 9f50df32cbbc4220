// antkv-eval: evaluation of LLaMA-family checkpoints with full-precision and quantized KV caches.
//   antkv-eval ppl --model DIR --text FILE [--seq-len 2048] [--protocol bos_window|single_bos]
//                  [--max-windows N] [--device auto|cpu|cuda] [--json out.json]  one model, FP16 cache
//   antkv-eval ppl --recipe R [--set key=value ...]       every method of the recipe on every text (table)
//   antkv-eval run --recipe R [--out DIR]                  calibrate -> train codebooks -> ppl table, all in DIR
//   antkv-eval needle --recipe R [--out DIR]               long-context retrieval of every method (DIR/needle)
//   antkv-eval diagnose --recipe R [--text FILE]           per-layer attention error of each method (CPU)
//   antkv-eval bench --shape llama3-8b | --model DIR      decode attention and end-to-end decode (CUDA)
//   antkv-eval shapes [--format table|json]                the named shapes of --shape (model/model_shapes.h)
//   antkv-eval methods [--json] [--format text|markdown]   which path runs each method option (quant/method_support.h)
#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <omp.h>

#include "core/atomic_file.h"
#include "core/device.h"
#include "core/error.h"
#include "core/hash.h"
#include "core/interrupt.h"
#include "core/limits.h"
#include "core/run_lock.h"
#include "core/output_check.h"
#include "core/text_file.h"
#include "core/system_info.h"
#include "eval/compare.h"
#include "eval/diagnostics.h"
#include "eval/fingerprint.h"
#include "eval/perplexity.h"
#include "model/checkpoint.h"
#include "model/model_shapes.h"
#include "quant/method_support.h"
#include "runtime/cpu_runtime.h"
#include "tokenizer/tokenizer.h"
#include "cli_errors.h"
#include "antkv_eval_needle.h"
#include "eval/needle_eval.h"
#ifdef ANTKV_HAVE_CUDA
#include "kernels/anchor/anchor_score_fn.h"
#include "kernels/anchor/anchor_scores.h"
#include "kernels/bench/bench.h"
#include "kernels/bench/method_bench.h"
#include "kernels/calibrate/calib_stage.h"
#include "kernels/runtime/gpu_runtime.h"
#include "kernels/runtime/method_runtime_factory.h"
#include "kernels/kmeans/kmeans.h"
#endif

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace antkv {
namespace {

struct PplArgs {
  std::string model, text, json_out, device = "auto", kv_dtype = "fp16", protocol;
  int seq_len = 2048, threads = 0, prefill_chunk = 8192;
  bool window_bos = true, quiet = false, force = false;
  int64_t max_windows = -1, first_window = 0;
};

std::unique_ptr<Runtime> make_runtime(const Checkpoint& ckpt, const PplArgs& a) {
  if (a.device == "cpu") {
    CpuRuntimeOptions o;
    o.threads = a.threads;
    o.kv_dtype = parse_kv_dtype(a.kv_dtype);
    return std::make_unique<CpuRuntime>(ckpt, o);
  }
  if (a.device == "cuda") {
#ifdef ANTKV_HAVE_CUDA
    GpuRuntimeOptions go;
    go.max_context = a.seq_len;  // the KV cache holds one window
    return make_gpu_runtime(ckpt, go);
#else
    fail("--device cuda: this antkv-eval was built without CUDA (configure with nvcc available)");
#endif
  }
  fail("--device must be cpu or cuda, got \"{}\"", a.device);
}

int run_ppl(PplArgs a) {
  // the device first: an explicit cuda without a usable GPU fails before the checkpoint is read
  const DeviceSelection dev = select_devices({{"--device", a.device}}, "antkv-eval ppl");
  a.device = dev.devices[0];
  const WindowProtocol protocol = !a.protocol.empty() ? parse_window_protocol(a.protocol)
                                  : a.window_bos     ? WindowProtocol::kBosWindow
                                                     : WindowProtocol::kSingleBos;
  check_count(a.threads, limits::kThreads, "--threads");
  check_count(a.seq_len, limits::kSeqLen, "--seq-len");
  check_count(a.prefill_chunk, limits::kTokenCount, "--prefill-chunk");
  check_count(a.max_windows, limits::kWindows, "--max-windows");
  check_count(a.first_window, limits::kFirstWindow, "--first-window");
  ANTKV_CHECK(fs::is_regular_file(a.text), "{}: text file not found", a.text);
  if (!a.json_out.empty()) {  // checked before the evaluation, not after
    OutputCheck outputs;
    outputs.input(a.text, "--text");
    outputs.input_folder(a.model, "a file of the model");
    outputs.output(a.json_out, "--json", a.force);
    outputs.check();
  }
  Checkpoint ckpt = Checkpoint::open(a.model);
  check_window_length(ckpt.config(), a.seq_len, "--seq-len");  // before the runtime allocates its cache
  Tokenizer tok = Tokenizer::from_file(ckpt.tokenizer_path());
  std::fprintf(stderr, "%s\n", dev.line.c_str());  // after the inputs' checks: an error stays one line
  auto rt = make_runtime(ckpt, a);

  const auto t_tok = std::chrono::steady_clock::now();
  const std::string text = read_text_file(a.text);
  const std::vector<int32_t> ids = tok.encode(text, /*add_special=*/true);
  check_token_ids(ids, ckpt, a.text);
  const double tok_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_tok).count();
  if (!a.quiet)
    std::fprintf(stderr, "%s: %zu tokens (tokenized in %.1f s), model %s on %s\n", a.text.c_str(), ids.size(),
                 tok_seconds, a.model.c_str(), rt->device_name().c_str());
  if (!a.quiet)
    std::fprintf(stderr, "%s\n", windows_line(fs::path(a.text).filename().string(), static_cast<int64_t>(ids.size()),
                                              a.seq_len, protocol, a.first_window, a.max_windows).c_str());
  if (protocol == WindowProtocol::kBosWindow)
    ANTKV_CHECK(!ids.empty() && ids[0] == tok.bos_id(),
                "{}: the tokenizer adds no BOS token; use --protocol single_bos", ckpt.tokenizer_path());

  PerplexityOptions o;
  o.seq_len = a.seq_len;
  o.protocol = protocol;
  o.max_windows = a.max_windows;
  o.first_window = a.first_window;
  o.text_name = a.text;
  o.prefill_chunk = a.prefill_chunk;
  o.progress = !a.quiet;
  PerplexityResult r;
  try {
    r = evaluate_perplexity(*rt, ids, tok.bos_id(), o);
  } catch (const NonFinite& e) {
    rethrow_with_weight_check(e, ckpt);
  }

  if (!a.json_out.empty()) {
    json j;
    j["tool"] = "antkv-eval ppl";
    j["version"] = ANTKV_VERSION;
    j["timestamp"] = utc_timestamp();
    j["model"] = {{"dir", a.model}, {"model_type", ckpt.config().model_type},
                  {"config_hash", ckpt.config().config_hash}};
    j["text"] = {{"path", a.text}, {"bytes", text.size()}, {"tokens", ids.size()}};
    j["hardware"] = {{"device", rt->device_name()}, {"cpu", cpu_model_name()}};
    j["cache"] = {{"method", "fp16"}, {"kv_dtype", a.device == "cpu" ? a.kv_dtype : "bf16"}};
    j["protocol"] = window_protocol_name(protocol);
    j["seq_len"] = a.seq_len;
    j["first_window"] = r.first_window;
    j["windows"] = r.windows;
    j["windows_available"] = r.windows_available;
    j["predicted_tokens"] = r.predicted_tokens;
    j["nll_total"] = r.nll_total;
    j["ppl"] = r.ppl;
    j["nll_per_window"] = r.nll_per_window;
    j["seconds"] = r.seconds;
    j["tokens_per_second"] = r.tokens_per_second;
    write_file_atomic(a.json_out, j.dump(1) + "\n");
  }
  // printed after the JSON is safely written: a failed run prints no result
  std::printf("model %s  text %s  protocol %s  seq_len %d  windows %lld/%lld  ppl %.4f  (%.1f tokens/s on %s, %.1f s)\n",
              a.model.c_str(), fs::path(a.text).filename().c_str(), window_protocol_name(protocol), a.seq_len,
              static_cast<long long>(r.windows), static_cast<long long>(r.windows_available), r.ppl,
              r.tokens_per_second, rt->device_name().c_str(), r.seconds);
  return 0;
}

struct RecipeArgs {
  std::string recipe, out, codebooks;
  std::vector<std::string> sets;
  int threads = 0;
  bool quiet = false, force = false, allow_other_weights = false;
};

MethodRuntimeFactory method_factory(const Checkpoint& ckpt, const Recipe& r, int threads) {
  if (r.eval.device == "cpu") {
    ANTKV_CHECK(r.eval.kv_cache == "simulated", "{}: eval.kv_cache: real needs the GPU (eval.device: cpu)",
                r.source.empty() ? "recipe" : r.source);
    return cpu_method_runtime_factory(ckpt, threads);
  }
#ifdef ANTKV_HAVE_CUDA
  GpuRuntimeOptions go;
  go.max_context = r.eval.seq_len;  // the KV cache holds one window
  return gpu_method_runtime_factory(ckpt, go, r.eval.kv_cache == "real");
#else
  fail("eval.device = cuda: this antkv-eval was built without CUDA");
#endif
}

// The results folder, checked writable before the evaluation (stale temporaries of killed runs removed).
void check_results_folder(const std::string& out_dir, const Recipe& r) {
  OutputCheck outputs;
  outputs.input(r.source, "--recipe");
  for (const auto& t : r.eval.texts) outputs.input(t, "eval.texts");
  outputs.output_folder(out_dir, "results folder");
  outputs.check();
}

// The recipe's checkpoint; checked before any folder is made (a recipe without `model` leaves nothing behind).
Checkpoint open_recipe_model(const Recipe& r) {
  ANTKV_CHECK(!r.model.empty(), "{}: key \"model\" is not set (the checkpoint directory to evaluate)",
              r.source.empty() ? "recipe" : r.source);
  return Checkpoint::open(r.model);
}

void write_results(const std::vector<MethodResult>& res, const Recipe& r, const std::string& out_dir,
                   const std::string& device) {
  const std::string table = results_table(res);
  // all three complete before any gets its final name
  AtomicFile json_file((fs::path(out_dir) / "results.json").string()), csv((fs::path(out_dir) / "results.csv").string()),
      txt((fs::path(out_dir) / "results.txt").string());
  json_file.write(results_json(res, r, device) + "\n");
  csv.write(results_csv(res));
  txt.write(table);
  json_file.commit();
  csv.commit();
  txt.commit();
  std::printf("%sresults: %s/results.{json,csv,txt}\n", table.c_str(), out_dir.c_str());
}

// The recipe with --out as its out_dir (the folder of every output of the run) and its devices resolved
// (an explicit cuda without a usable GPU fails here, before any work); *device_line says what was chosen.
Recipe load_run_recipe(const RecipeArgs& a, const std::vector<std::string>& device_keys, std::string* device_line) {
  Recipe r = Recipe::load(a.recipe, a.sets);
  if (!a.out.empty()) r.out_dir = fs::absolute(a.out).lexically_normal().string();
  require_recipe_support(r);  // the paths the recipe names, before a missing GPU or the model is an error
  *device_line = resolve_recipe_devices(r, device_keys);
  return r;
}

// Every method of the recipe against the paths it evaluates them on (the device resolved) and the model's shape:
// all refusals in one error, before any folder, calibration or training.
void require_recipe_model_support(const Recipe& r, const Checkpoint& ckpt) {
  const ModelShapeFacts shape = ModelShapeFacts::of(ckpt.config());
  require_recipe_support(r, &shape);
}

int run_recipe_ppl(const RecipeArgs& a) {
  check_count(a.threads, limits::kThreads, "--threads");
  std::string device_line;
  const Recipe r = load_run_recipe(a, {"eval.device"}, &device_line);
  const std::string out_dir = r.out_dir;
  Checkpoint ckpt = open_recipe_model(r);
  require_recipe_model_support(r, ckpt);
  Tokenizer tok = Tokenizer::from_file(ckpt.tokenizer_path());
  const RunFolderLock lock(out_dir);  // results.* of the folder are written by one run at a time
  check_results_folder(out_dir, r);
  {  // the results of the run already in the folder are replaced only when asked
    OutputCheck results;
    for (const char* f : {"results.json", "results.csv", "results.txt"})
      results.output((fs::path(out_dir) / f).string(), "the results of the run in " + out_dir, a.force);
    results.check();
  }
  std::fprintf(stderr, "%s\n", device_line.c_str());
  CompareOptions o;
  o.recipe = &r;
  o.codebook_dir = !a.codebooks.empty() ? a.codebooks : (fs::path(r.out_dir) / "codebooks").string();
  o.make_runtime = method_factory(ckpt, r, a.threads);
  o.ckpt = &ckpt;
  o.allow_other_weights = a.allow_other_weights;
  o.progress = !a.quiet;
  std::vector<MethodResult> res;
  try {
    res = compare_methods(tok, o);
  } catch (const NonFinite& e) {
    rethrow_with_weight_check(e, ckpt);
  }
  write_results(res, r, out_dir, r.eval.device);
  return 0;
}

// `run` (eval.tasks: ppl and/or needle) and `needle` (needle_only: the needle task whatever eval.tasks says).
int run_pipeline_cmd(const RecipeArgs& a, bool needle_only = false) {
  check_count(a.threads, limits::kThreads, "--threads");
  std::string device_line;
  const Recipe r = load_run_recipe(a, {"calibration.device", "kmeans.device", "eval.device"}, &device_line);
  const std::string out_dir = r.out_dir;  // --out (folded into the recipe) holds every stage's output
  const auto has_task = [&r](const char* t) {
    return std::find(r.eval.tasks.begin(), r.eval.tasks.end(), t) != r.eval.tasks.end();
  };
  const bool want_ppl = !needle_only && has_task("ppl"), want_needle = needle_only || has_task("needle");
  Checkpoint ckpt = open_recipe_model(r);
  require_recipe_model_support(r, ckpt);  // before the first stage: no calibration or training for a refused method
  Tokenizer tok = Tokenizer::from_file(ckpt.tokenizer_path());
  NeedlePlan needle_plan;
  if (want_needle) needle_plan = plan_needle(r, ckpt, tok);  // a bad setting fails here, before any stage
  // one run owns the folder until it ends: its reuse decisions, stages and results are not mixed with another's
  const RunFolderLock lock(out_dir);
  // every folder the stages and the results go to, checked before the first stage
  check_results_folder(out_dir, r);
  check_results_folder((fs::path(r.out_dir) / "codebooks").string(), r);
  if (want_needle) check_results_folder(needle_results_dir(r), r);
  std::fprintf(stderr, "%s\n", device_line.c_str());
  PipelineOptions o;
  o.recipe = &r;
  o.ckpt = &ckpt;
  o.tok = &tok;
  o.progress = !a.quiet;
  o.force = a.force;
  o.make_method_runtime = method_factory(ckpt, r, a.threads);
  const bool cal_gpu = r.calibration.device == "cuda", km_gpu = r.kmeans.device == "cuda";
#ifdef ANTKV_HAVE_CUDA
  if (cal_gpu) {
    o.make_calibration_runtime = [&ckpt, &r]() {
      GpuRuntimeOptions go;
      go.max_context = r.calibration.seq_len;
      return make_gpu_runtime(ckpt, go);
    };
    o.anchor_fn = gpu_anchor_score_fn();
    o.calib_device_stage = gpu_calib_device_stage();
  }
  if (km_gpu) {
    o.make_trainer = [](const KMeansParams& p) { return make_kmeans_gpu(p); };
    o.trainer_name = "antkv-gpu";
  }
#else
  ANTKV_CHECK(!cal_gpu && !km_gpu, "{}: calibration.device / kmeans.device = cuda, but this antkv-eval was built "
              "without CUDA (use auto or cpu)", a.recipe);
#endif
  if (!cal_gpu) {
    o.make_calibration_runtime = [&ckpt, &a]() -> std::unique_ptr<Runtime> {
      CpuRuntimeOptions co;
      co.threads = a.threads;
      co.kv_dtype = KvDType::kF32;
      return std::make_unique<CpuRuntime>(ckpt, co);
    };
  }
  MethodRuntimeFactory needle_factory;  // made before the stages: a device error comes before any work
  if (want_needle) {
    Recipe needle_r = r;  // the GPU runtimes' KV capacity: the longest needle context
    needle_r.eval.seq_len = needle_max_context(r);
    needle_factory = method_factory(ckpt, needle_r, a.threads);
  }
  std::fprintf(stderr, "outputs: %s\n", r.out_dir.c_str());
  std::vector<MethodResult> res;
  try {
    if (want_ppl) res = run_pipeline(o);
    else prepare_codebooks(o);
  } catch (const NonFinite& e) {
    rethrow_with_weight_check(e, ckpt);
  }
  if (want_ppl) {
    write_results(res, r, out_dir, r.eval.device);
    std::printf("plot: /usr/bin/python3 scripts/plot_results.py %s/results.json  (writes %s/results.png)\n",
                r.out_dir.c_str(), r.out_dir.c_str());
  }
  if (want_needle) {
    try {
      run_needle(needle_plan, r, ckpt, tok, needle_factory, !a.quiet);
    } catch (const NonFinite& e) {
      rethrow_with_weight_check(e, ckpt);
    }
  }
  return 0;
}

int run_diagnose(const RecipeArgs& a, const std::string& text, const std::string& json_out) {
  check_count(a.threads, limits::kThreads, "--threads");
  Recipe r = Recipe::load(a.recipe, a.sets);
  if (!a.out.empty()) r.out_dir = fs::absolute(a.out).lexically_normal().string();
  if (!json_out.empty()) {
    OutputCheck outputs;
    outputs.input(a.recipe, "--recipe");
    outputs.input(text, "--text");
    for (const auto& t : r.eval.texts) outputs.input(t, "eval.texts");
    outputs.output(json_out, "--json", a.force);
    outputs.check();
  }
  Checkpoint ckpt = open_recipe_model(r);
  {  // diagnose runs every method on the CPU cache
    Recipe on_cpu = r;
    on_cpu.eval.device = "cpu", on_cpu.eval.kv_cache = "simulated";
    require_recipe_model_support(on_cpu, ckpt);
  }
  Tokenizer tok = Tokenizer::from_file(ckpt.tokenizer_path());
  std::fprintf(stderr, "device: cpu (diagnose runs on the CPU whatever eval.device says)\n");
  const std::vector<std::string> texts = text.empty() ? r.eval.texts : std::vector<std::string>{text};
  ANTKV_CHECK(!texts.empty(), "{}: no text (eval.texts is empty and no --text)", a.recipe);
  nlohmann::json all = nlohmann::json::array();
  for (const auto& t : texts) {
    DiagnoseOptions o;
    o.recipe = &r;
    o.ckpt = &ckpt;
    o.tok = &tok;
    o.text = t;
    o.codebook_dir = !a.codebooks.empty() ? a.codebooks : (fs::path(r.out_dir) / "codebooks").string();
    o.threads = a.threads;
    o.allow_other_weights = a.allow_other_weights;
    o.progress = !a.quiet;
    const auto res = diagnose_methods(o);
    std::printf("%s\n%s", t.c_str(), diagnostics_table(res).c_str());
    auto j = diagnostics_json(res);
    j["text"] = t;
    all.push_back(j);
  }
  if (!json_out.empty()) {
    nlohmann::json j{{"tool", "antkv-eval diagnose"}, {"recipe", r.to_yaml()}, {"texts", all}};
    write_file_atomic(json_out, j.dump(1) + "\n");
  }
  return 0;
}

struct BenchArgs {
  bool force = false;
  std::string shape = "llama3-8b", model, json_out;
  std::vector<int> batches = {1, 16}, contexts = {32768, 131072};
  int iters = 20;
  bool no_e2e = false;
  std::vector<std::string> methods;  // bench --method / max-context
  bool equal_memory = true;
  int max_batch = 512;
  std::string uniform_kernel;  // the packed uniform cache's split kernel; empty: kDefaultUniformDecodeKernel
};

// A named shape of model/model_shapes.h as a random-weight benchmark model: any context (decode time is measured,
// not quality, so neither max_position_embeddings nor a sliding window limits it).
ModelConfig shape_config(const std::string& shape) {
  ModelConfig c = find_model_shape(shape, "--shape").config();
  c.max_position_embeddings = 1 << 20;
  c.sliding_window = 0;
  c.config_hash = "synthetic-" + shape;
  return c;
}

// --json proved writable (and not clobbered without --force) before any work
void check_json_output(const BenchArgs& a) {
  if (a.json_out.empty()) return;
  OutputCheck outputs;
  outputs.output(a.json_out, "--json", a.force);
  outputs.check();
}
ModelConfig bench_config(const BenchArgs& a) {
  return a.model.empty() ? shape_config(a.shape) : load_model_config(a.model + "/config.json");
}

#ifdef ANTKV_HAVE_CUDA
nlohmann::json method_point_json(const cuda::MethodDecodePoint& p) {
  // the whole-model step's figures are null where it was not timed (--no-e2e, or it did not fit)
  const auto step = [&](double v) { return p.ms_per_step > 0 ? nlohmann::json(v) : nlohmann::json(nullptr); };
  return {{"method", p.method}, {"batch", p.batch}, {"context", p.context}, {"largest_batch", p.equal_memory},
          {"ran", p.ran}, {"note", p.note}, {"cache_bytes_per_sequence", p.seq_cache_bytes},
          {"ms_per_step", step(p.ms_per_step)}, {"tokens_per_s", step(p.tokens_per_s)},
          {"attention_ms_per_step", p.attn_ms_per_step}, {"attention_bytes_per_step", p.attn_bytes_per_step},
          {"attention_frac_of_copy_bw", p.attn_frac_of_copy}, {"bytes_per_step", p.bytes_per_step},
          {"frac_of_copy_bw", step(p.frac_of_copy)}};
}
#endif

void check_bench_counts(const BenchArgs& a) {
  for (int b : a.batches) check_count(b, limits::kBatch, "--batch");
  for (int c : a.contexts) check_count(c, limits::kContext, "--context");
  check_count(a.iters, limits::kIterations, "--iters");
  check_count(a.max_batch, limits::kBatch, "--max-batch");
}

// Every --method against bench or max-context on the model's shape: all refusals in one error, before any work
// (in a build without CUDA too).
void require_bench_support(const BenchArgs& a, bool max_context) {
  const ModelShapeFacts shape = ModelShapeFacts::of(bench_config(a));
  const MethodPath path = max_context ? MethodPath::kMaxContext : MethodPath::kBench;
  std::vector<std::string> errors;
  for (const auto& text : a.methods) {
    const PathSupport s = method_support(parse_method(text, Recipe::defaults_with({})), path, &shape);
    if (!s.runs) errors.push_back(s.reason);
  }
  if (errors.empty()) return;
  std::string msg = fmt::format("{}: {} of --method cannot be timed; nothing was run:", option_name(path),
                                errors.size() == 1 ? std::string("1 method") : fmt::format("{} methods", errors.size()));
  for (const auto& e : errors) msg += "\n  " + e;
  throw Error(msg);
}

int run_method_bench_cmd(const BenchArgs& a, bool max_context) {
  check_bench_counts(a);
  require_bench_support(a, max_context);
#ifdef ANTKV_HAVE_CUDA
  check_json_output(a);
  const ModelConfig cfg = bench_config(a);
  auto say = [](const std::string& s) { std::fprintf(stderr, "%s\n", s.c_str()); };
  nlohmann::json j;
  j["tool"] = max_context ? "antkv-eval max-context" : "antkv-eval bench";
  j["version"] = ANTKV_VERSION;
  j["shape"] = a.model.empty() ? a.shape : a.model;
  std::printf("shape: %s (weights random; decode time does not depend on their values)\n",
              a.model.empty() ? a.shape.c_str() : a.model.c_str());
  if (max_context) {
    const auto r = cuda::run_max_context(cfg, a.methods, say);
    std::printf("%s", cuda::format_max_context(r).c_str());
    for (const auto& p : r)
      j["max_context"].push_back({{"method", p.method}, {"context", p.context}, {"ran", p.ran}, {"note", p.note},
                                  {"cache_gib", p.cache_gib}, {"ms_per_step", p.ms_per_step},
                                  {"tokens_per_s", p.tokens_per_s}});
  } else {
    cuda::MethodBenchOptions o;
    o.cfg = cfg;
    o.methods = a.methods;
    o.batches = a.batches;
    o.contexts = a.contexts;
    o.equal_memory = a.equal_memory;
    o.max_batch_cap = a.max_batch;
    o.iters = a.iters;
    o.e2e = !a.no_e2e;
    if (!a.uniform_kernel.empty()) o.uniform_kernel = cuda::parse_uniform_decode_kernel(a.uniform_kernel);
    j["uniform_kernel"] = cuda::uniform_decode_kernel_name(o.uniform_kernel);
    const auto r = cuda::run_method_bench(o, say);
    std::printf("%s", cuda::format_method_bench(r).c_str());
    j["device"] = r.device;
    j["copy_gbps"] = r.copy_gbps;
    for (const auto& p : r.points) j["points"].push_back(method_point_json(p));
  }
  if (!a.json_out.empty()) write_file_atomic(a.json_out, j.dump(1) + "\n");
  return 0;
#else
  (void)a;
  (void)max_context;
  fail("bench/max-context: this antkv-eval was built without CUDA");
#endif
}

int run_bench(const BenchArgs& a) {
  if (!a.methods.empty()) return run_method_bench_cmd(a, false);
  check_bench_counts(a);
#ifdef ANTKV_HAVE_CUDA
  check_json_output(a);
  const ModelConfig cfg = bench_config(a);
  cuda::KernelBenchOptions o;
  o.decode_batches = a.batches;
  o.decode_contexts = a.contexts;
  o.n_heads = cfg.num_heads;
  o.n_kv_heads = cfg.num_kv_heads;
  o.head_dim = cfg.head_dim;
  o.e2e_config = cfg;
  o.iters = a.iters;
  o.e2e_points.clear();
  if (!a.no_e2e)
    for (int b : a.batches)
      for (int c : a.contexts) o.e2e_points.emplace_back(b, c);
  const auto r = cuda::run_kernel_bench(o, [](const std::string& s) { std::fprintf(stderr, "%s\n", s.c_str()); });
  std::printf("shape: %s (weights random; decode time does not depend on their values)\n%s",
              a.model.empty() ? a.shape.c_str() : a.model.c_str(), cuda::format_kernel_bench(r).c_str());
  if (!a.json_out.empty()) {
    nlohmann::json j;
    j["tool"] = "antkv-eval bench";
    j["version"] = ANTKV_VERSION;
    j["shape"] = a.model.empty() ? a.shape : a.model;
    j["device"] = r.device;
    j["copy_gbps"] = r.copy_gbps;
    for (const auto& p : r.decode)
      j["decode_attention"].push_back({{"batch", p.batch}, {"context", p.context}, {"waves", p.waves},
                                       {"ms_per_step", p.ms_per_step}, {"bytes", p.bytes}, {"gbps", p.gbps},
                                       {"frac_of_copy_bw", p.frac_of_copy}});
    for (const auto& p : r.prefill)
      j["prefill_attention"].push_back({{"tokens", p.n_tokens}, {"ms", p.ms}, {"tflops", p.tflops}});
    for (const auto& p : r.e2e)
      j["e2e_decode"].push_back({{"batch", p.batch}, {"context", p.context}, {"ran", p.ran}, {"note", p.note},
                                 {"ms_per_step", p.ms_per_step}, {"tokens_per_s", p.tokens_per_s},
                                 {"bytes_per_step", p.bytes_per_step}, {"roofline_tokens_per_s", p.roofline_tokens_per_s},
                                 {"frac_of_roofline", p.frac_of_roofline}});
    write_file_atomic(a.json_out, j.dump(1) + "\n");
  }
  return 0;
#else
  (void)a;
  fail("bench: this antkv-eval was built without CUDA");
#endif
}

}  // namespace
}  // namespace antkv

int main(int argc, char** argv) {
  using namespace antkv;
  CLI::App app{"antkv-eval: evaluate LLaMA-family models with full-precision and quantized KV caches"};
  app.require_subcommand(1);
  PplArgs p;
  RecipeArgs ra;
  auto* ppl = app.add_subcommand("ppl", "perplexity of a checkpoint on a text (FP16 cache), or of every method of a recipe");
  ppl->add_option("--model", p.model, "Hugging Face checkpoint directory (config.json, model.safetensors, tokenizer.json)");
  ppl->add_option("--text", p.text, "UTF-8 text file to evaluate");
  auto* ppl_recipe = ppl->add_option("--recipe", ra.recipe, "evaluate every method of eval.methods on every eval.texts");
  ppl->add_option("--set", ra.sets, "override a recipe field: key=value (repeatable)")->needs(ppl_recipe);
  ppl->add_option("--codebooks", ra.codebooks, "folder of codebook files (default <out_dir>/codebooks)")->needs(ppl_recipe);
  ppl->add_option("--out", ra.out, "the run's folder: results.{json,csv,txt} there, codebooks from DIR/codebooks "
                  "(default the recipe's out_dir)")->needs(ppl_recipe);
  ppl->add_option("--seq-len", p.seq_len, "window length in tokens")->capture_default_str();
  ppl->add_flag("--window-bos,!--no-window-bos", p.window_bos,
                "bos_window protocol (BOS + seq_len-1 text tokens per window; default) or single_bos");
  ppl->add_option("--protocol", p.protocol, "bos_window | single_bos (overrides --window-bos)")
      ->check(CLI::IsMember({"bos_window", "single_bos"}));
  ppl->add_option("--prefill-chunk", p.prefill_chunk,
                  "prefill windows longer than this in chunks of this many tokens (0: whole windows)")
      ->capture_default_str();
  ppl->add_option("--max-windows", p.max_windows, "evaluate at most N windows (quick runs); default all");
  ppl->add_option("--first-window", p.first_window, "index of the first window to evaluate")->capture_default_str();
  ppl->add_option("--device", p.device, "auto (the GPU when one is usable, else the CPU) | cpu | cuda")
      ->capture_default_str()->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  ppl->add_option("--kv-dtype", p.kv_dtype, "CPU cache storage: fp16 | bf16 | fp32")
      ->capture_default_str()->check(CLI::IsMember({"fp16", "bf16", "fp32"}));
  ppl->add_option("--threads", p.threads, "CPU threads (0 = all cores)")->capture_default_str();
  ppl->add_option("--json", p.json_out, "write the result (with per-window NLL) to this JSON file");
  ppl->add_flag("--force", p.force, "overwrite an existing --json file (with --recipe: the results in --out)");
  ppl->add_flag("--allow-other-weights", ra.allow_other_weights, "with --recipe: use codebooks made from other weights "
                "than the recipe's model (a warning instead of an error)")->needs(ppl_recipe);
  ppl->add_flag("--quiet,-q", p.quiet, "no progress line");

  auto* run = app.add_subcommand("run", "the whole pipeline: calibrate -> train-codebook -> ppl, reusing matching outputs");
  run->add_option("--recipe", ra.recipe, "recipe YAML")->required();
  run->add_option("--set", ra.sets, "override a recipe field: key=value (repeatable)");
  run->add_option("--out", ra.out, "folder for every output of the run: calibration dumps, codebooks, results "
                  "(default the recipe's out_dir, else runs/<name>)");
  run->add_option("--threads", ra.threads, "CPU threads (0 = all cores)");
  run->add_flag("--force", ra.force, "redo every stage");
  run->add_flag("--quiet,-q", ra.quiet, "no progress lines");

  auto* needle = app.add_subcommand("needle", "long-context retrieval (passkey, needles; eval.needle) with every method "
                                     "of the recipe, codebooks from the run's calibrate/train stages (reused)");
  needle->add_option("--recipe", ra.recipe, "recipe YAML (eval.methods, eval.needle)")->required();
  needle->add_option("--set", ra.sets, "override a recipe field: key=value (repeatable)");
  needle->add_option("--out", ra.out, "the run's folder: codebooks in DIR/codebooks, results in DIR/needle (default the "
                     "recipe's out_dir)");
  needle->add_option("--threads", ra.threads, "CPU threads (0 = all cores)");
  needle->add_flag("--force", ra.force, "redo the calibration and codebook stages");
  needle->add_flag("--quiet,-q", ra.quiet, "no progress lines");

  std::string diag_text, diag_json;
  auto* diag = app.add_subcommand("diagnose", "per-layer attention-output error, sink and anchor attention mass of "
                                  "every method of a recipe (teacher-forced on the FP16 cache, CPU)");
  diag->add_option("--recipe", ra.recipe, "recipe YAML (eval.methods, eval.texts, eval.max_windows)")->required();
  diag->add_option("--set", ra.sets, "override a recipe field: key=value (repeatable)");
  diag->add_option("--codebooks", ra.codebooks, "folder of codebook files (default <out_dir>/codebooks)");
  diag->add_option("--out", ra.out, "the folder of the run whose codebooks to use (as run --out; default the "
                   "recipe's out_dir)");
  diag->add_option("--text", diag_text, "one text instead of eval.texts");
  diag->add_option("--json", diag_json, "write the figures as JSON");
  diag->add_flag("--force", ra.force, "overwrite an existing --json file");
  diag->add_flag("--allow-other-weights", ra.allow_other_weights, "use codebooks made from other weights than the "
                 "recipe's model (a warning instead of an error)");
  diag->add_option("--threads", ra.threads, "CPU threads (0 = all cores)");
  diag->add_flag("--quiet,-q", ra.quiet, "no progress line");

  BenchArgs ba;
  auto* bench = app.add_subcommand("bench", "decode benchmark on the GPU: attention kernels and end-to-end decode vs roofline");
  bench->add_option("--shape", ba.shape, "named synthetic shape: " + model_shape_names())->capture_default_str();
  bench->add_option("--model", ba.model, "a checkpoint directory whose shapes to use instead");
  bench->add_option("--batch", ba.batches, "batch sizes")->capture_default_str();
  bench->add_option("--context", ba.contexts, "context lengths")->capture_default_str();
  bench->add_option("--iters", ba.iters, "timed iterations")->capture_default_str();
  bench->add_flag("--no-e2e", ba.no_e2e, "attention kernels only (with --method: the whole-model step is not timed)");
  bench->add_option("--json", ba.json_out, "write the figures as JSON");
  bench->add_flag("--force", ba.force, "overwrite an existing --json file");
  bench->add_option("--method", ba.methods,
                    "per-method end-to-end decode (repeatable): fp16, uniform:bits=2|4,group=32|64|128 (the packed "
                    "KIVI cache), vq:bits=B, antkv:bits=B[,ratio=R,promote=off,key_rope=pre|commute] (B = 4, 2, 1, 0.75, 0.5, "
                    "0.375; the compressed cache; also gain=k|kv, rotate=pca at B <= 1 (rotate=pca not with commute), and "
                    "metric=task); without it, the kernel benchmark");
  bench->add_flag("--equal-memory,!--no-equal-memory", ba.equal_memory,
                  "with --method: also each method at the largest batch that fits per context (default on)");
  bench->add_option("--max-batch", ba.max_batch, "cap of the equal-memory batches")->capture_default_str();
  bench->add_option("--uniform-kernel", ba.uniform_kernel,
                    "the packed uniform cache's decode split kernel: cuda-core (the default), or tensor-core (faster, "
                    "fp16 operands)")
      ->check(CLI::IsMember({"tensor-core", "cuda-core"}));

  BenchArgs ma;
  ma.methods = {"fp16", "vq:bits=1"};
  auto* maxctx = app.add_subcommand("max-context", "the longest context whose decode runs on this GPU, per method (batch "
                                                   "1, caches filled with synthetic contents)");
  maxctx->add_option("--shape", ma.shape, "named synthetic shape: " + model_shape_names())->capture_default_str();
  maxctx->add_option("--model", ma.model, "a checkpoint directory whose shapes to use instead");
  maxctx->add_option("--method", ma.methods, "methods (repeatable)")->capture_default_str();
  maxctx->add_option("--json", ma.json_out, "write the figures as JSON");
  maxctx->add_flag("--force", ma.force, "overwrite an existing --json file");
  std::string shapes_format = "table";
  auto* shapes = app.add_subcommand("shapes", "the named model shapes of bench/max-context --shape and scripts/scale_run.py");
  shapes->add_option("--format", shapes_format, "table | json (the config.json fields of each shape)")
      ->capture_default_str()->check(CLI::IsMember({"table", "json"}));
  std::string methods_format = "text";
  bool methods_json = false;
  auto* methods = app.add_subcommand("methods", "which code path runs each method kind and option (CPU, GPU "
                                     "simulated, GPU real, bench, max-context): \"runs\" or the reason");
  methods->add_option("--format", methods_format, "text | markdown (the table of docs/METHODS.md)")
      ->capture_default_str()->check(CLI::IsMember({"text", "markdown"}));
  methods->add_flag("--json", methods_json, "print JSON: per method, per path {runs, note} or {runs, rule, reason}");
  if (const std::string sub = unknown_subcommand(app, argc, argv); !sub.empty()) {
    std::fprintf(stderr, "antkv-eval: error: unknown subcommand \"%s\" (%s; see antkv-eval --help)\n", sub.c_str(),
                 subcommand_names(app).c_str());
    return 2;
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return exit_on_usage_error(app, e, "antkv-eval");
  }
  install_interrupt_handler();
  try {
    if (*ppl) {
      ra.threads = p.threads;
      ra.quiet = p.quiet;
      ra.force = p.force;
      if (!ra.recipe.empty()) {
        // the recipe names the model, the texts and the windows: options of the one-model form would be ignored
        for (const char* opt : {"--model", "--text", "--json", "--seq-len", "--protocol", "--window-bos", "--max-windows",
                                "--first-window", "--device", "--kv-dtype", "--prefill-chunk"})
          ANTKV_CHECK(ppl->count(opt) == 0, "ppl --recipe: {} is an option of ppl --model; with --recipe the recipe "
                      "sets it (--set model=DIR, --set eval.texts=[FILE], --set eval.seq_len=N, ...)", opt);
        return run_recipe_ppl(ra);
      }
      ANTKV_CHECK(!p.model.empty() && !p.text.empty(), "ppl: give --model and --text, or --recipe");
      return run_ppl(p);
    }
    if (*run) return run_pipeline_cmd(ra);
    if (*needle) return run_pipeline_cmd(ra, /*needle_only=*/true);
    if (*diag) return run_diagnose(ra, diag_text, diag_json);
    if (*bench) return run_bench(ba);
    if (*maxctx) return run_method_bench_cmd(ma, true);
    if (*methods) {
      ANTKV_CHECK(!(methods_json && methods->count("--format")), "methods: give --json or --format, not both");
      std::printf("%s", (methods_json                    ? methods_support_json()
                         : methods_format == "markdown" ? methods_support_markdown()
                                                        : methods_support_text())
                            .c_str());
      return 0;
    }
    if (*shapes) {
      std::printf("%s", (shapes_format == "json" ? model_shapes_json() : model_shapes_table()).c_str());
      return 0;
    }
  } catch (const Interrupted&) {
    std::fprintf(stderr, "antkv-eval: interrupted; no output written\n");
    return 128 + interrupt_signal();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "antkv-eval: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
