// antkv-bench-kernels: the CUDA kernel benchmark (kernels/bench/bench.h) from the command line: copy bandwidth,
// flash-decoding attention (% of copy bandwidth), flash prefill TFLOP/s, the anchor-score pass's two kernels, and
// end-to-end decode of a random-weight LLaMA-3-8B-shaped model beside its roofline. Prints a table; --json writes the figures.
#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <cstdio>
#include <fstream>
#include <iostream>

#include "core/atomic_file.h"
#include "core/output_check.h"
#include "core/error.h"
#include "kernels/bench/bench.h"

int main(int argc, char** argv) {
  CLI::App app{"antkv CUDA kernel benchmark"};
  antkv::cuda::KernelBenchOptions opt;
  opt.anchor_tokens = {2048, 8192};
  std::string json_path;
  bool no_e2e = false;
  app.add_option("--batches", opt.decode_batches, "decode attention batch sizes");
  app.add_option("--contexts", opt.decode_contexts, "decode attention context lengths");
  app.add_option("--waves", opt.decode_waves, "decode split plans to compare (grid size in waves)");
  app.add_option("--prefill-tokens", opt.prefill_tokens, "prefill attention lengths");
  app.add_option("--anchor-tokens", opt.anchor_tokens, "anchor-score pass lengths (default 2048 8192)");
  app.add_option("--iters", opt.iters, "timed iterations (at least)");
  app.add_flag("--no-e2e", no_e2e, "skip the end-to-end decode of the random-weight model");
  app.add_option("--json", json_path, "write the results as JSON");
  bool force = false;
  app.add_flag("--force", force, "overwrite an existing --json file");
  CLI11_PARSE(app, argc, argv);
  if (no_e2e) opt.e2e_points.clear();
  try {
    if (!json_path.empty()) {  // checked before the benchmark, not after
      antkv::OutputCheck outputs;
      outputs.output(json_path, "--json", force);
      outputs.check();
    }
    const auto r = antkv::cuda::run_kernel_bench(opt, [](const std::string& s) {
      std::fprintf(stderr, "%s\n", s.c_str());
    });
    std::cout << antkv::cuda::format_kernel_bench(r);
    if (!json_path.empty()) {
      nlohmann::json j;
      j["device"] = r.device;
      j["copy_gbps"] = r.copy_gbps;
      for (const auto& p : r.decode)
        j["decode_attention"].push_back({{"batch", p.batch}, {"context", p.context}, {"waves", p.waves}, {"n_splits", p.n_splits},
                                         {"split_len", p.split_len}, {"ms_per_step", p.ms_per_step}, {"bytes", p.bytes},
                                         {"gbps", p.gbps}, {"frac_of_copy_bw", p.frac_of_copy}});
      for (const auto& p : r.prefill)
        j["prefill_attention"].push_back({{"tokens", p.n_tokens}, {"heads", p.n_heads}, {"kv_heads", p.n_kv_heads},
                                          {"head_dim", p.head_dim}, {"ms", p.ms}, {"tflops", p.tflops}});
      for (const auto& p : r.anchor)
        j["anchor_scores"].push_back({{"tokens", p.n_tokens}, {"heads", p.n_heads}, {"kv_heads", p.n_kv_heads},
                                      {"head_dim", p.head_dim}, {"ms_pass1", p.ms_pass1}, {"ms_pass2", p.ms_pass2},
                                      {"tflops_pass1", p.tflops_pass1}, {"tflops_pass2", p.tflops_pass2},
                                      {"workspace_mib", p.workspace_mib}});
      for (const auto& p : r.e2e)
        j["e2e_decode"].push_back({{"batch", p.batch}, {"context", p.context}, {"ran", p.ran}, {"note", p.note},
                                   {"ms_per_step", p.ms_per_step}, {"ms_per_step_eager", p.ms_per_step_eager}, {"tokens_per_s", p.tokens_per_s},
                                   {"bytes_per_step", p.bytes_per_step}, {"roofline_ms", p.roofline_ms},
                                   {"roofline_tokens_per_s", p.roofline_tokens_per_s},
                                   {"frac_of_roofline", p.frac_of_roofline}});
      antkv::write_file_atomic(json_path, j.dump(2) + "\n");
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
