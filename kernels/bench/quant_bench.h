// Benchmark of the quantized-KV decode attention (kernels/attention/quant_decode.h) against our FP16 (bf16 cache)
// flash-decoding, in the same run, on LLaMA-3-8B's attention shape (32 query heads, 8 KV heads, d 128), one
// layer per step; and the largest context a 1-bit cache allows for the whole model on this GPU, with one
// decode step of one layer run at a long context to show that it works.
//
// Cache contents are synthetic (decode time does not depend on values): uniformly random code bytes, random
// fp16 anchors/window/codebooks, random bf16 q. Context T is split as the runtime keeps it: ceil(rho*T)
// anchors (rho = 1%), a window of W = 128 FP16 tokens, the rest quantized. Several copies of the cache (and
// of the codebooks) are rotated so that no step finds the previous step's data in L2.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "kernels/attention/quant_decode.h"

namespace antkv::cuda {

struct QuantBenchOptions {
  std::vector<int> batches = {1, 16};
  std::vector<int64_t> contexts = {32768, 131072};
  std::vector<int64_t> batch1_contexts = {1048576};    // extra contexts at batch 1 only
  std::vector<VqKernelConfig> configs = {VqKernelConfig::kC8B8};   // the quantized variants timed at every point
  bool lut_half_too = true;                            // also time c8b8 with fp16 lookup tables
  double anchor_ratio = 0.01;
  int window = 128;
  int n_layers = 32, n_heads = 32, n_kv_heads = 8, head_dim = 128;  // LLaMA-3-8B
  std::vector<int64_t> long_contexts = {4194304};      // one layer, batch 1; plus the computed maximum
  bool long_at_max = true;
  int iters = 20;
  uint64_t seed = 1;
};

struct QuantBenchPoint {
  int batch = 0;
  int64_t context = 0;
  std::string config;           // e.g. "c8b8" or "c8b8/lut16"
  int64_t n_quant = 0, n_anchor = 0, n_window = 0;
  int n_splits = 0, split_len = 0;
  double ms_per_step = 0;       // split + reduce kernels, one layer
  double bytes = 0;             // codes + FP16 anchors/window + codebooks + q + out
  double gbps = 0, frac_of_copy = 0;
  double fp16_ms_per_step = 0;  // flash_decode over the bf16 cache of the same context, same run
  double fp16_bytes = 0, fp16_gbps = 0, fp16_frac_of_copy = 0;
  double speedup = 0;           // fp16 / quantized
};

// Memory of a 1-bit (or other) cache for the whole model, per design note §3 "effective bits".
struct QuantMemoryEstimate {
  std::string config;
  double bytes_per_token = 0;   // all layers and KV heads: K and V codes + rho * (K and V fp16 + int32 position)
  double codebook_bytes = 0;    // all layers: K and V codebooks, fp16
  double window_bytes = 0;      // all layers: W tokens' K and V in fp16
  double weights_bytes = 0;     // LLaMA-3-8B in bf16 (for the end-to-end figure)
  double reserve_bytes = 0;     // activations, workspaces, allocator slack
  double free_bytes = 0, total_bytes = 0;  // cudaMemGetInfo at the start of the benchmark
  int64_t max_context_cache_only = 0;      // (free - codebooks - window - reserve) / bytes_per_token
  int64_t max_context_with_weights = 0;    // the same, weights resident too
};

struct QuantLongRun {
  int64_t context = 0;
  bool ran = false;
  std::string note;
  int n_splits = 0, split_len = 0;
  double layer_cache_bytes = 0; // one layer's cache (codes, anchors, window, codebooks)
  double ms_per_step = 0;
  double gbps = 0, frac_of_copy = 0;
  bool finite = false;          // every output value finite
  double fp16_ms_per_step = 0;  // flash_decode at the same context when the bf16 cache fits (0: not run)
};

struct QuantBenchResult {
  std::string device;
  double copy_gbps = 0;
  std::vector<QuantBenchPoint> points;
  QuantMemoryEstimate memory;
  std::vector<QuantLongRun> long_runs;
};

QuantBenchResult run_quant_decode_bench(const QuantBenchOptions& opt,
                                        const std::function<void(const std::string&)>& log = {});
std::string format_quant_bench(const QuantBenchResult& r);

}  // namespace antkv::cuda
