// Decode benchmark per KV-cache method (antkv-eval bench --method, antkv-eval max-context): the whole model
// (random weights of a real shape) decoding from a cache filled with synthetic contents (decode time does not
// depend on the values): fp16 = the bf16 arena read by flash-decoding; uniform = the packed-integer KIVI cache
// (kernels/quant/uniform_cache.h) read by uniform_decode; vq/antkv = the compressed cache
// (kernels/quant/compressed_cache.h) read by quant_decode. Roofline: the device copy bandwidth.
#pragma once
#include <functional>
#include <string>
#include <vector>

#include "kernels/attention/quant_decode.h"
#include "kernels/attention/uniform_decode.h"
#include "model/model_config.h"
#include "quant/method_support.h"

namespace antkv::cuda {

struct BenchMethod {
  std::string text;          // as given: fp16 | uniform:bits=B,group=G | vq:bits=B | antkv:bits=B[,ratio=R]
  bool uniform = false;      // uniform: bits 2|4, group 32|64|128, window (FP16 newest tokens)
  int uniform_bits = 2, uniform_group = 128, uniform_window = 0;
  bool compressed = false;   // vq / antkv
  VqKernelConfig config = VqKernelConfig::kC8B8;  // the keys' (layer 0's with per-layer widths)
  // each layer's configurations of keys and values: one entry (every layer the same) or one per layer
  // (lkbits/lvbits); keys and values may differ (kbits != vbits)
  std::vector<VqKernelConfig> key_configs, value_configs;
  double anchor_ratio = 0;   // antkv: ratio (default 0.01); vq: 0
  int window = 128;          // FP16 decode window (compressed)
  bool pre_rope = false;     // key_rope=pre: pre-RoPE code stream (dequantize-rotate-dot decode)
  bool commute = false;      // key_rope=commute: pre-RoPE codes in RoPE pair order (commute_decode)
  bool promote = false;      // antkv with promote=on (the default): decode-time anchors, running scores updated
  // gain=k|kv, rotate=pca: the coded transform (synthetic scales, basis and mean), the real cache's decode path;
  // metric=task changes only which codes are written, not the decode
  bool gain_keys = false, gain_values = false, rotate = false;
};
// What `path` (bench or max-context) runs of `text`, on a model of `shape` when given: fp16, uniform at bits 2 or
// 4 (group 32, 64 or 128), or vq/antkv at widths of quant_decode's closed set (bits 4, 2, 1, 0.75, 0.5, 0.375; per
// layer and per tensor) and the options the compressed cache runs; anything else is method_support's error
// (quant/method_support.h).
BenchMethod parse_bench_method(const std::string& text, MethodPath path = MethodPath::kBench,
                               const ModelShapeFacts* shape = nullptr);

// Device bytes of one sequence's KV cache of `capacity` tokens.
double sequence_cache_bytes(const ModelConfig& cfg, const BenchMethod& m, int capacity);

struct MethodDecodePoint {
  std::string method;
  int batch = 0, context = 0;
  bool equal_memory = false;   // batch = the largest that fits in the GPU's memory at this context
  bool ran = false;
  std::string note;            // why it did not run
  double seq_cache_bytes = 0;  // one sequence's cache (at the runtime's capacity)
  double ms_per_step = 0;      // one decode step of the whole model (CUDA graph replay), host-timed; 0: not timed
  double tokens_per_s = 0;
  double attn_ms_per_step = 0; // the attention kernels of every layer alone (CUDA events)
  double attn_bytes_per_step = 0;  // cache bytes attention reads per step (all layers, all sequences)
  double attn_frac_of_copy = 0;    // attn bytes / attn time / copy bandwidth
  double bytes_per_step = 0;   // weights + attention bytes
  double frac_of_copy = 0;     // bytes_per_step / step time / copy bandwidth
};

struct MethodBenchOptions {
  ModelConfig cfg;
  std::vector<std::string> methods = {"fp16", "vq:bits=1"};
  std::vector<int> batches = {1, 16};
  std::vector<int> contexts = {32768, 131072};
  bool equal_memory = true;    // also each method at its largest batch per context
  bool e2e = true;             // time the whole model's decode step too (false: the attention kernels alone)
  int max_batch_cap = 512;     // equal-memory batches are capped here
  int iters = 20;
  uint64_t seed = 1;
  UniformDecodeKernel uniform_kernel = kDefaultUniformDecodeKernel;  // the uniform cache's split kernel
};

struct MethodBenchResult {
  std::string device;
  double copy_gbps = 0;
  std::vector<MethodDecodePoint> points;
};

MethodBenchResult run_method_bench(const MethodBenchOptions& o, const std::function<void(const std::string&)>& log = {});
std::string format_method_bench(const MethodBenchResult& r);

struct MaxContextPoint {
  std::string method;
  int context = 0;             // the longest context that decoded (batch 1)
  bool ran = false;
  std::string note;
  double cache_gib = 0;        // the sequence's cache
  double ms_per_step = 0, tokens_per_s = 0;
};
// The longest context per method whose cache fits beside the weights (from free memory, then backed off 4%
// per failed allocation) and decodes a few steps at batch 1.
std::vector<MaxContextPoint> run_max_context(const ModelConfig& cfg, const std::vector<std::string>& methods,
                                             const std::function<void(const std::string&)>& log = {});
std::string format_max_context(const std::vector<MaxContextPoint>& r);

}  // namespace antkv::cuda
