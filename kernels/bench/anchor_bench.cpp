// The anchor-score pass's benchmark (bench.h: bench_anchor_scores), moved out of the test suite: pass 1 (fp32
// flash attention forward with row statistics) and pass 2 (the S_K / S_V accumulation) timed separately.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/error.h"
#include "kernels/anchor/anchor_scores.h"
#include "kernels/bench/bench.h"
#include "kernels/common/cuda_check.h"
#include "kernels/common/cuda_timing.h"
#include "kernels/common/device_buffer.h"
#include "kernels/runtime/ops.h"

namespace antkv::cuda {

AnchorScoresPoint bench_anchor_scores(int T, int H, int KV, int d, int min_iters, cudaStream_t st) {
  // values do not change the time: uniform random fp32 in [-2, 2)
  DeviceBuffer<float> q(static_cast<size_t>(T) * H * d), k(static_cast<size_t>(T) * KV * d), v(k.size());
  DeviceBuffer<float> sk(static_cast<size_t>(T) * KV), sv(sk.size());
  fill_random_f32(q.get(), static_cast<int64_t>(q.size()), 21, 2.0f, st);
  fill_random_f32(k.get(), static_cast<int64_t>(k.size()), 22, 2.0f, st);
  fill_random_f32(v.get(), static_cast<int64_t>(v.size()), 23, 2.0f, st);
  AnchorScoreGpuArgs p;
  p.q = q.get();
  p.k = k.get();
  p.v = v.get();
  p.s_k = sk.get();
  p.s_v = sv.get();
  p.n_tokens = T;
  p.n_heads = H;
  p.n_kv_heads = KV;
  p.head_dim = d;
  AnchorScoreWorkspace ws;
  ws.bind(p);
  for (int w = 0; w < 2; ++w) anchor_scores_gpu(p, st);  // warm-up
  ANTKV_CUDA_CHECK(cudaStreamSynchronize(st));
  // pass 2 reads what pass 1 wrote and rewrites only S_K / S_V, so each pass may repeat on its own
  const int iters = std::max(5, T <= 2048 ? min_iters : min_iters / 4);
  Events ev;
  ev.start(st);
  for (int i = 0; i < iters; ++i) anchor_scores_pass1(p, st);
  const float ms1 = ev.stop_ms(st);
  ev.start(st);
  for (int i = 0; i < iters; ++i) anchor_scores_pass2(p, st);
  const float ms2 = ev.stop_ms(st);

  std::vector<float> hv(sv.size());
  ANTKV_CUDA_CHECK(cudaMemcpy(hv.data(), sv.get(), sv.bytes(), cudaMemcpyDeviceToHost));
  double sum = 0;
  for (float x : hv) sum += x;
  const double want = static_cast<double>(H) * T;
  ANTKV_CHECK(std::fabs(sum - want) <= 1e-4 * want,
              "anchor-score benchmark T={}: S_V sums to {} instead of n_heads * T = {}: the kernels are broken", T, sum,
              want);

  AnchorScoresPoint r;
  r.n_tokens = T;
  r.n_heads = H;
  r.n_kv_heads = KV;
  r.head_dim = d;
  r.ms_pass1 = ms1 / iters;
  r.ms_pass2 = ms2 / iters;
  const double flops = 4.0 * d * H * (static_cast<double>(T) * (T + 1) / 2);
  r.tflops_pass1 = flops / (r.ms_pass1 * 1e-3) / 1e12;
  r.tflops_pass2 = flops / (r.ms_pass2 * 1e-3) / 1e12;
  r.workspace_mib = ws.bytes() / 1048576.0;
  return r;
}

}  // namespace antkv::cuda
