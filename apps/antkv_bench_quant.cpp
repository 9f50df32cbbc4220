// antkv-bench-quant: quantized-KV decode attention (kernels/attention/quant_decode.h) against FP16 flash-decoding on
// LLaMA-3-8B's attention shape (kernels/bench/quant_bench.h): time per step, bytes moved, % of the measured copy
// bandwidth, speedup; the largest context of a 1-bit cache on this GPU, and one decode step of one layer at
// long contexts. Prints a table; --json writes the figures.
#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <cstdio>
#include <fstream>
#include <iostream>

#include "core/atomic_file.h"
#include "core/output_check.h"
#include "core/error.h"
#include "kernels/bench/quant_bench.h"

int main(int argc, char** argv) {
  CLI::App app{"antkv quantized-KV decode attention benchmark"};
  antkv::cuda::QuantBenchOptions opt;
  std::vector<std::string> configs = {"c8b8"};
  std::string json_path;
  bool no_lut16 = false, no_max = false;
  app.add_option("--batches", opt.batches, "batch sizes");
  app.add_option("--contexts", opt.contexts, "context lengths (every batch)");
  app.add_option("--batch1-contexts", opt.batch1_contexts, "extra context lengths at batch 1");
  app.add_option("--configs", configs, "quantized configurations (c8b8, c16b12, c16b8, c16b6); the first one is used "
                                       "for the memory estimate and the long-context runs");
  app.add_flag("--no-lut16", no_lut16, "do not also time c8b8 with fp16 lookup tables");
  app.add_option("--long-contexts", opt.long_contexts, "one-layer decode steps at these contexts (batch 1)");
  app.add_flag("--no-max-context", no_max, "skip the one-layer run at the computed maximum context");
  app.add_option("--iters", opt.iters, "timed iterations (at least)");
  app.add_option("--json", json_path, "write the results as JSON");
  bool force = false;
  app.add_flag("--force", force, "overwrite an existing --json file");
  CLI11_PARSE(app, argc, argv);
  try {
    if (!json_path.empty()) {  // checked before the benchmark, not after
      antkv::OutputCheck outputs;
      outputs.output(json_path, "--json", force);
      outputs.check();
    }
    opt.configs.clear();
    for (const auto& c : configs) opt.configs.push_back(antkv::cuda::parse_vq_kernel_config(c));
    opt.lut_half_too = !no_lut16;
    opt.long_at_max = !no_max;
    const auto r = antkv::cuda::run_quant_decode_bench(opt, [](const std::string& s) {
      std::fprintf(stderr, "%s\n", s.c_str());
    });
    std::cout << antkv::cuda::format_quant_bench(r);
    if (!json_path.empty()) {
      nlohmann::json j;
      j["device"] = r.device;
      j["copy_gbps"] = r.copy_gbps;
      for (const auto& p : r.points)
        j["decode_attention"].push_back(
            {{"batch", p.batch}, {"context", p.context}, {"config", p.config}, {"n_quant", p.n_quant},
             {"n_anchor", p.n_anchor}, {"n_window", p.n_window}, {"n_splits", p.n_splits}, {"split_len", p.split_len},
             {"ms_per_step", p.ms_per_step}, {"bytes", p.bytes}, {"gbps", p.gbps}, {"frac_of_copy_bw", p.frac_of_copy},
             {"fp16_ms_per_step", p.fp16_ms_per_step}, {"fp16_bytes", p.fp16_bytes}, {"fp16_gbps", p.fp16_gbps},
             {"fp16_frac_of_copy_bw", p.fp16_frac_of_copy}, {"speedup", p.speedup}});
      const auto& m = r.memory;
      j["memory"] = {{"config", m.config},
                     {"bytes_per_token", m.bytes_per_token},
                     {"codebook_bytes", m.codebook_bytes},
                     {"window_bytes", m.window_bytes},
                     {"weights_bytes", m.weights_bytes},
                     {"reserve_bytes", m.reserve_bytes},
                     {"free_bytes", m.free_bytes},
                     {"total_bytes", m.total_bytes},
                     {"max_context_cache_only", m.max_context_cache_only},
                     {"max_context_with_weights", m.max_context_with_weights}};
      for (const auto& l : r.long_runs)
        j["long_context"].push_back({{"context", l.context}, {"ran", l.ran}, {"note", l.note}, {"n_splits", l.n_splits},
                                     {"split_len", l.split_len}, {"layer_cache_bytes", l.layer_cache_bytes},
                                     {"ms_per_step", l.ms_per_step}, {"gbps", l.gbps}, {"frac_of_copy_bw", l.frac_of_copy},
                                     {"finite", l.finite}, {"fp16_ms_per_step", l.fp16_ms_per_step}});
      antkv::write_file_atomic(json_path, j.dump(2) + "\n");
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
