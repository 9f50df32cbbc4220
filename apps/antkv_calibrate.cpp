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
#include "model/checkpoint.h"
#include "runtime/cpu_runtime.h"
#include "tokenizer/tokenizer.h"
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
  app.add_option("--device", device, "shorthand for --set calibration.device=cpu|cuda")
      ->check(CLI::IsMember({"cpu", "cuda"}));
  app.add_option("--summary", summary_path, "summary JSON (default: <out>.summary.json)");
  app.add_option("--threads", threads, "CPU threads (0 = all cores)");
  app.add_flag("--force", force, "overwrite an existing output");
  app.add_flag("--quiet,-q", quiet, "no progress line");
  CLI11_PARSE(app, argc, argv);
  install_interrupt_handler();
  try {
    if (max_tokens > 0) sets.push_back("calibration.tokens=" + std::to_string(max_tokens));
    if (!device.empty()) sets.push_back("calibration.device=" + device);
    const Recipe recipe = Recipe::load(recipe_path, sets);
    if (summary_path.empty()) summary_path = out + ".summary.json";
    ANTKV_CHECK(force || !fs::exists(out), "{}: already exists (use --force to overwrite)", out);
    ANTKV_CHECK(!recipe.model.empty(), "{}: key \"model\" is not set", recipe_path);
    ANTKV_CHECK(!recipe.calibration.text.empty(), "{}: key \"calibration.text\" is not set", recipe_path);
    ANTKV_CHECK(fs::is_regular_file(recipe.calibration.text), "{}: calibration text not found (key calibration.text in {})",
                recipe.calibration.text, recipe_path);
    const fs::path out_dir = fs::absolute(out).parent_path();
    ANTKV_CHECK(fs::is_directory(out_dir), "{}: output folder {} does not exist", out, out_dir.string());

    Checkpoint ckpt = Checkpoint::open(recipe.model);
    Tokenizer tok = Tokenizer::from_file(ckpt.tokenizer_path());
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
    const std::string text = read_file(recipe.calibration.text);
    auto ids = tok.encode(text, true);
    const CalibrationPlan plan =
        plan_calibration(std::move(ids), recipe.calibration.tokens, recipe.calibration.seq_len, recipe.calibration.stride);
    if (!quiet)
      std::fprintf(stderr, "calibrating %s on %s: %lld text tokens in %lld windows of %d on %s\n", recipe.model.c_str(),
                   recipe.calibration.text.c_str(), static_cast<long long>(plan.text_tokens_used),
                   static_cast<long long>(plan.windows), plan.seq_len, rt->device_name().c_str());

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
    const CalibrationResult res = run_calibration(*rt, tok, plan, co);
    h5.commit();
    write_file_atomic(summary_path, calibration_summary_json(res, tok) + "\n");

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
    return 130;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "antkv-calibrate: error: %s\n", e.what());
    return 1;
  }
}
