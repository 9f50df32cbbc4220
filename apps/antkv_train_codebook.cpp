// antkv-train-codebook: token-aware weighted k-means codebooks from a calibration dump (design note §3-4).
//   antkv-train-codebook --recipe R --calib calib.h5 --out codebooks.h5 [--set key=value ...]
#include <CLI/CLI.hpp>
#include <chrono>
#include <nlohmann/json.hpp>
#include <cstdio>
#include <filesystem>

#include "codebook/train_codebooks.h"
#include "core/atomic_file.h"
#include "core/error.h"
#include "core/interrupt.h"
#include "core/output_check.h"
#include "eval/fingerprint.h"
#include "io/calib_dump.h"
#include "model/checkpoint.h"
#include "model/model_config.h"
#include "cli_errors.h"
#ifdef ANTKV_HAVE_CUDA
#include "kernels/kmeans/kmeans.h"
#endif

namespace fs = std::filesystem;
using namespace antkv;

int main(int argc, char** argv) {
  CLI::App app{"antkv-train-codebook: weighted k-means VQ codebooks for every layer, KV head and channel group"};
  std::string recipe_path, calib, out, report, device;
  std::vector<std::string> sets;
  bool force = false, quiet = false, allow_other_weights = false;
  app.add_option("--recipe", recipe_path, "recipe YAML")->required();
  app.add_option("--calib", calib, "calibration dump from antkv-calibrate")->required();
  app.add_option("--out", out, "output codebook HDF5 file")->required();
  app.add_option("--set", sets, "override a recipe field: key=value (repeatable), e.g. quant.bits=0.5");
  app.add_option("--device", device, "shorthand for --set kmeans.device=auto|cpu|cuda (auto: the GPU when one is "
                 "usable, else FAISS on the CPU)")->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  app.add_option("--report", report, "summary JSON (default: <out>.report.json)");
  app.add_flag("--force", force, "overwrite an existing output");
  app.add_flag("--quiet,-q", quiet, "no progress line");
  app.add_flag("--allow-other-weights", allow_other_weights, "use a dump made from other weights than the recipe's "
               "model (a warning instead of an error)");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return exit_on_usage_error(app, e, "antkv-train-codebook");
  }
  install_interrupt_handler();
  try {
    if (!device.empty()) sets.push_back("kmeans.device=" + device);
    Recipe recipe = Recipe::load(recipe_path, sets);
    const std::string device_line = resolve_recipe_devices(recipe, {"kmeans.device"});
    if (report.empty()) report = out + ".report.json";
    ANTKV_CHECK(fs::is_regular_file(calib), "{}: calibration dump not found", calib);
    // every output checked before k-means: writable, not an input, not another output, --force to replace
    OutputCheck outputs;
    outputs.input(recipe_path, "--recipe");
    outputs.input(calib, "--calib");
    if (!recipe.model.empty()) outputs.input_folder(recipe.model, "a file of the model");
    outputs.output(out, "--out", force);
    outputs.output(report, "--report", force);
    outputs.check();

    std::fprintf(stderr, "%s\n", device_line.c_str());  // after the inputs' checks: an error stays one line
    TrainCodebooksOptions o;
    o.recipe = &recipe;
    o.calib_path = calib;
    std::string model_hash;  // the weights the dump came from, recorded in the codebooks' fingerprint
    {
      const std::string dump_fingerprint = CalibDumpReader(calib).meta().fingerprint;
      model_hash = fingerprint_field(dump_fingerprint, kModelContentField);
      if (!recipe.model.empty()) {  // provenance: the dump must come from the recipe's weights
        const Checkpoint ckpt = Checkpoint::open(recipe.model);
        o.expected_config_hash = ckpt.config().config_hash;
        check_same_weights(calib, dump_fingerprint, ckpt.content_hash(), recipe.model, allow_other_weights);
      }
    }
    if (!model_hash.empty())
      o.fingerprint = make_fingerprint({{"stage", "codebooks"}, {kModelContentField, model_hash}});
    o.version = ANTKV_VERSION;
    o.progress = !quiet;
    if (recipe.kmeans.device == "cuda") {
#ifdef ANTKV_HAVE_CUDA
      o.make_trainer = [](const KMeansParams& p) { return make_kmeans_gpu(p); };
      o.trainer_name = "antkv-gpu";
#else
      fail("kmeans.device = cuda: this antkv-train-codebook was built without CUDA (use --device cpu for FAISS)");
#endif
    }
    AtomicFile file(out);
    const TrainCodebooksResult res = train_codebooks(o);
    const auto tw = std::chrono::steady_clock::now();
    write_codebooks(file.temp_path(), res.codebooks);
    const double write_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - tw).count();
    auto rep = nlohmann::json::parse(train_report_json(res));
    rep["seconds_split"]["write"] = write_s;
    // both outputs complete before either gets its final name
    AtomicFile report_file(report);
    report_file.write(rep.dump(1) + "\n");
    file.commit();
    report_file.commit();

    const auto& m = res.codebooks.meta;
    std::printf("%s: keys c%db%d (%.3g bits), values c%db%d (%.3g bits), weighting %s, %s, %.1f s\n", out.c_str(), m.key_c,
                m.key_b, double(m.key_b) / m.key_c, m.value_c, m.value_b, double(m.value_b) / m.value_c,
                m.weighting.c_str(), m.trainer.c_str(), res.seconds);
    std::printf("time: read %.1f s (on a prefetch thread; training waited %.1f s for it), prepare %.1f s, k-means %.1f s, "
                "held-out error %.1f s, write %.2f s; %lld calibration tokens, %zu codebooks\n",
                res.read_seconds, res.wait_read_seconds, res.prepare_seconds, res.kmeans_seconds, res.heldout_seconds,
                write_s, static_cast<long long>(res.calibration_tokens),
                static_cast<size_t>(m.num_layers) * m.num_kv_heads * (m.head_dim / m.key_c + m.head_dim / m.value_c));
    std::printf("layer  K rel err  V rel err  K weighted  V weighted  (held-out tokens)\n");
    for (size_t l = 0; l < res.layers.size(); ++l)
      std::printf("%5zu  %9.4f  %9.4f  %10.4f  %10.4f  (%lld)\n", l, res.layers[l].keys.relative,
                  res.layers[l].values.relative, res.layers[l].keys.weighted_relative,
                  res.layers[l].values.weighted_relative, static_cast<long long>(res.layers[l].keys.tokens));
    std::printf("report: %s\n", report.c_str());
    return 0;
  } catch (const Interrupted&) {
    std::fprintf(stderr, "antkv-train-codebook: interrupted; no output written\n");
    return 128 + interrupt_signal();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "antkv-train-codebook: error: %s\n", e.what());
    return 1;
  }
}
