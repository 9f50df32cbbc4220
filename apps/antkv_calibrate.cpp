// antkv-calibrate: runs the model over calibration text and dumps every layer's K/V and anchor scores
// to HDF5 (design note §2, §7).
//   antkv-calibrate --recipe recipes/antkv-ref-18m-quick.yaml --out calib.h5 [--set key=value ...]
#include <CLI/CLI.hpp>
#include <cstdio>
#include <filesystem>

#include "calibrate/calibrate.h"
#include "core/atomic_file.h"
#include "core/error.h"
#include "core/interrupt.h"
#include "core/limits.h"
#include "core/output_check.h"
#include "core/text_file.h"
#include "model/checkpoint.h"
#include "runtime/cpu_runtime.h"
#include "eval/compare.h"
#include "tokenizer/tokenizer.h"
#include "cli_errors.h"
#ifdef ANTKV_HAVE_CUDA
#include "kernels/calibrate/calib_stage.h"
#include "kernels/runtime/gpu_runtime.h"
#endif

namespace fs = std::filesystem;
using namespace antkv;

int main(int argc, char** argv) {
  CLI::App app{"antkv-calibrate: K/V activations and anchor scores of a model on calibration text, to HDF5"};
  std::string recipe_path, out, summary_path, device;
  std::vector<std::string> sets;
  int64_t max_tokens = 0;
  int threads = 0;
  bool force = false, quiet = false;
  app.add_option("--recipe", recipe_path, "recipe YAML (recipes/*.yaml)")->required();
  app.add_option("--out", out, "output HDF5 file")->required();
  app.add_option("--set", sets, "override a recipe field: key=value (repeatable), e.g. calibration.tokens=8192");
  app.add_option("--max-tokens", max_tokens, "shorthand for --set calibration.tokens=N");
  app.add_option("--device", device, "shorthand for --set calibration.device=auto|cpu|cuda (auto: the GPU when one "
                 "is usable, else the CPU)")->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  app.add_option("--summary", summary_path, "summary JSON (default: <out>.summary.json)");
  app.add_option("--threads", threads, "CPU threads (0 = all cores)");
  app.add_flag("--force", force, "overwrite an existing output");
  app.add_flag("--quiet,-q", quiet, "no progress line");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return exit_on_usage_error(app, e, "antkv-calibrate");
  }
  install_interrupt_handler();
  try {
    check_count(threads, limits::kThreads, "--threads");
    if (app.count("--max-tokens")) {  // given: checked as calibration.tokens is, not dropped when out of range
      check_count(max_tokens, limits::kTokens, "--max-tokens");
      sets.push_back("calibration.tokens=" + std::to_string(max_tokens));
    }
    if (!device.empty()) sets.push_back("calibration.device=" + device);
    Recipe recipe = Recipe::load(recipe_path, sets);
    const std::string device_line = resolve_recipe_devices(recipe, {"calibration.device"});
    if (summary_path.empty()) summary_path = out + ".summary.json";
    ANTKV_CHECK(!recipe.model.empty(), "{}: key \"model\" is not set", recipe_path);
    ANTKV_CHECK(!recipe.calibration.text.empty(), "{}: key \"calibration.text\" is not set", recipe_path);
    ANTKV_CHECK(fs::is_regular_file(recipe.calibration.text), "{}: calibration text not found (key calibration.text in {})",
                recipe.calibration.text, recipe_path);
    // every output checked before any work: writable, not an input, not another output, --force to replace
    OutputCheck outputs;
    outputs.input(recipe_path, "--recipe");
    outputs.input(recipe.calibration.text, "calibration.text");
    outputs.input_folder(recipe.model, "a file of the model");
    outputs.output(out, "--out", force);
    outputs.output(summary_path, "--summary", force);
    outputs.check();

    Checkpoint ckpt = Checkpoint::open(recipe.model);
    Tokenizer tok = Tokenizer::from_file(ckpt.tokenizer_path());
    const std::string text = read_text_file(recipe.calibration.text);
    auto ids = tok.encode(text, true);
    check_token_ids(ids, ckpt, recipe.calibration.text);
    const CalibrationPlan plan =
        plan_calibration(std::move(ids), recipe.calibration.tokens, recipe.calibration.seq_len, recipe.calibration.stride,
                         recipe.calibration.text, calibration_min_tokens(recipe));
    std::fprintf(stderr, "%s\n", device_line.c_str());  // after the inputs' checks: an error stays one line
    std::unique_ptr<Runtime> rt;
    AnchorScoreFn anchor_fn;  // default: CPU
    CalibDeviceStageFactory device_stage;
    if (recipe.calibration.device == "cuda") {
#ifdef ANTKV_HAVE_CUDA
      GpuRuntimeOptions go;
      go.max_context = recipe.calibration.seq_len;  // the KV cache holds one window
      rt = make_gpu_runtime(ckpt, go);
      device_stage = gpu_calib_device_stage();
#else
      fail("calibration.device = cuda: this antkv-calibrate was built without CUDA");
#endif
    } else {
      CpuRuntimeOptions o;
      o.threads = threads;
      o.kv_dtype = KvDType::kF32;  // calibration sees the model's own full-precision K/V
      rt = std::make_unique<CpuRuntime>(ckpt, o);
    }
    if (!quiet || plan.dropped_tokens > 0)  // tokens left out are said even when quiet
      std::fprintf(stderr, "calibrating %s on %s (%s), on %s\n", recipe.model.c_str(), recipe.calibration.text.c_str(),
                   calibration_plan_line(plan).c_str(), rt->device_name().c_str());

    AtomicFile h5(out);
    CalibrationOptions co;
    co.recipe = &recipe;
    co.out_path = h5.temp_path();
    co.model_dir = recipe.model;
    co.text_path = recipe.calibration.text;
    co.version = ANTKV_VERSION;
    co.anchor_fn = anchor_fn;
    co.device_stage = device_stage;
    co.progress = !quiet;
    // what the dump depends on, the weights included: train-codebook, ppl and diagnose check provenance with it
    co.fingerprint = calibration_fingerprint(recipe, ckpt.content_hash(), dump_key_rope(recipe.key_rope));
    CalibrationResult res;
    try {
      res = run_calibration(*rt, tok, plan, co);
    } catch (const NonFinite& e) {
      rethrow_with_weight_check(e, ckpt);
    }
    // both outputs complete before either gets its final name
    AtomicFile summary(summary_path);
    summary.write(calibration_summary_json(res, tok) + "\n");
    h5.commit();
    summary.commit();

    std::printf("%s: %lld tokens stored from %lld windows, %.1f tokens/s on %s\n", out.c_str(),
                static_cast<long long>(res.tokens_stored), static_cast<long long>(res.windows), res.tokens_per_second,
                rt->device_name().c_str());
    std::printf("time: %.1f s (forward%s %.1f s, host half %.1f s of which HDF5 writes %.1f s, waiting for the host "
                "half %.1f s, closing the file %.1f s); %.2f GiB of K/V and scores stored (%s)\n",
                res.seconds, res.device_path ? " + device stage" : " + host half", res.forward_seconds,
                res.host_seconds, res.write_seconds, res.stall_seconds, res.finish_seconds,
                res.bytes_stored / 1073741824.0, res.device_path ? "device path" : "host path");
    std::printf("layer  top-1%% share of attention mass  top-1%% share of anchor score  sink share\n");
    for (size_t l = 0; l < res.layers.size(); ++l)
      std::printf("%5zu  %31.3f  %28.3f  %10.3f\n", l, res.layers[l].top1_share_attention,
                  res.layers[l].top1_share_anchor, res.layers[l].sink_share_attention);
    std::printf("summary: %s\n", summary_path.c_str());
    return 0;
  } catch (const Interrupted&) {
    std::fprintf(stderr, "antkv-calibrate: interrupted; no output written\n");
    return 128 + interrupt_signal();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "antkv-calibrate: error: %s\n", e.what());
    return 1;
  }
}
