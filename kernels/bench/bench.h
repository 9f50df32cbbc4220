// kernels/bench/: benchmarks (this file: attention, the anchor-score pass and end-to-end decode; quant_bench.h:
// quantized decode). Kernel and end-to-end decode benchmark on the current CUDA device. Roofline: the measured device copy
// bandwidth (cudaMemcpy device-to-device of 2 GiB, bytes read + written, CUDA events after warm-up).
#pragma once
#include <cuda_runtime.h>

#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "model/model_config.h"

namespace antkv {
class GpuRuntime;
}

namespace antkv::cuda {

struct DecodeAttnPoint {
  int batch = 0, context = 0;
  int waves = 1;             // the plan's target grid size in waves of resident blocks (1: the runtime's)
  int n_splits = 0, split_len = 0;
  double ms_per_step = 0;    // the flash-decoding kernel, one layer
  double bytes = 0;          // K + V of every sequence, q, out
  double gbps = 0;           // bytes / time
  double frac_of_copy = 0;   // gbps / copy bandwidth
};

struct PrefillPoint {
  int n_tokens = 0, n_heads = 0, n_kv_heads = 0, head_dim = 0;
  double ms = 0;
  double tflops = 0;         // causal: 4 * d * heads * T(T+1)/2 flops
};

// The two passes of the GPU anchor scores (kernels/anchor/anchor_scores.h) over one window of fp32 q/k/v.
struct AnchorScoresPoint {
  int n_tokens = 0, n_heads = 0, n_kv_heads = 0, head_dim = 0;
  double ms_pass1 = 0, ms_pass2 = 0;
  double tflops_pass1 = 0, tflops_pass2 = 0;  // each pass: two causal T x T x d products per query head,
                                              // 4 * d * heads * T(T+1)/2 flops
  double workspace_mib = 0;                   // AnchorScoreWorkspace (o, LSE, row statistics)
};

struct E2EPoint {
  int batch = 0, context = 0;
  bool ran = false;
  std::string note;          // why it did not run (memory)
  double ms_per_step = 0;    // one decode step of the whole model (host-timed, includes the argmax copy),
                             // replaying a CUDA graph (the runtime's default)
  double ms_per_step_eager = 0;  // the same without graphs (kernels launched one by one)
  double tokens_per_s = 0;   // batch / step time
  double bytes_per_step = 0; // weights read + KV of every sequence
  double roofline_ms = 0;    // bytes_per_step / copy bandwidth
  double roofline_tokens_per_s = 0;
  double frac_of_roofline = 0;
};

struct KernelBenchOptions {
  std::vector<int> decode_batches = {1, 16};
  std::vector<int> decode_contexts = {32768, 131072};
  std::vector<int> decode_waves = {1, 4, 16};  // split plans compared (plan_flash_decode's waves)
  int n_heads = 32, n_kv_heads = 8, head_dim = 128;  // LLaMA-3-8B attention
  std::vector<int> prefill_tokens = {2048, 8192};
  // the anchor-score pass, same head shape (head_dim 64 or 128); none by default, so that antkv-eval bench of any
  // model shape stays as it was; antkv-bench-kernels asks for 2048 and 8192
  std::vector<int> anchor_tokens;
  std::vector<std::pair<int, int>> e2e_points = {{1, 32768}, {1, 131072}, {16, 32768}};  // (batch, context)
  ModelConfig e2e_config;    // default: llama3_8b_shape_config()
  int iters = 20;
  uint64_t seed = 1;
};

struct KernelBenchResult {
  std::string device;
  double copy_gbps = 0;
  std::vector<DecodeAttnPoint> decode;
  std::vector<PrefillPoint> prefill;
  std::vector<AnchorScoresPoint> anchor;
  std::vector<E2EPoint> e2e;
};

// LLaMA-3-8B's shapes: 32 layers, hidden 4096, 32/8 heads, head_dim 128, FFN 14336, vocab 128256.
ModelConfig llama3_8b_shape_config();
// Mean ms of one decode step of sequences 0..B-1 (each set to ctx tokens first) over `steps` after `warm`
// steps, host-timed (greedy ids fed back), CUDA graphs on or off.
double time_decode_steps(GpuRuntime& rt, int B, int ctx, int warm, int steps, int vocab, bool graphs);
double measure_copy_bandwidth_gbps(size_t bytes = size_t{2} << 30, int iters = 10);
KernelBenchResult run_kernel_bench(const KernelBenchOptions& opt,
                                   const std::function<void(const std::string&)>& log = {});
std::string format_kernel_bench(const KernelBenchResult& r);
// Flash-decoding of B sequences of `context` tokens over random bf16 caches [B, n_kv_heads, context,
// head_dim] (several copies rotated so that no step finds its data in L2), the `waves` split plan; CUDA
// events around >= min_iters back-to-back steps (and >= ~100 ms of work) after warm-up.
DecodeAttnPoint bench_flash_decode(int B, int context, int n_heads, int n_kv_heads, int head_dim, int waves,
                                   int min_iters, double copy_gbps, cudaStream_t st);

// The anchor-score pass (anchor_bench.cpp) on T tokens of random fp32 q/k/v: CUDA events around >= min_iters
// back-to-back launches of each pass after warm-up. Checks that S_V sums to n_heads * T (every query row's
// attention sums to 1), so a broken kernel is an error, not a time.
AnchorScoresPoint bench_anchor_scores(int T, int n_heads, int n_kv_heads, int head_dim, int min_iters, cudaStream_t st);

}  // namespace antkv::cuda
