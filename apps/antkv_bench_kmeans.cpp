// antkv-bench-kmeans: codebook training for LLaMA-3-8B on one GPU (design note §8: all 1-bit codebooks,
// 256K calibration tokens, in under 60 s). Jobs (synthetic Gaussian-mixture data generated on the device,
// chunk by chunk, weights log-normal with ~10% zeros):
//   1bit  c8b8:   8192 codebooks (32 layers x 8 KV heads x 16 groups x K/V), 256K points in R^8, 256 centroids
//   0.75bit c16b12: 4096 codebooks (x 8 groups), 256K points in R^16, 4096 centroids
// 20 Lloyd iterations each (tol disabled: fixed work), k-means++ on the GPU included in the time.
// Reported: seconds (init + Lloyd; data generation apart), the assignment kernels' FLOP/s (2 n k c per
// codebook and pass) against the H200's fp32 peak, and FAISS on the host's cores on a slice of the same
// job (same data, same k-means++ init; its time per codebook extrapolated to the whole job).
// FAISS runs as the CPU trainer (make_kmeans_cpu) does. The one measurement so far (2026-11) was of the
// earlier trainer, codebooks one after another with FAISS's own threads: 14.2 s per 1-bit codebook on the
// 16-core host, no faster than one thread elsewhere (its threads did not scale on these small problems).
// The trainer now runs codebooks in parallel, one thread each: re-measure before quoting a speedup.
#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <thread>

#include "core/atomic_file.h"
#include "core/output_check.h"
#include "core/error.h"
#include "kernels/common/device_buffer.h"
#include "kernels/bench/kmeans_bench.h"
#include "kernels/kmeans/kmeans.h"
#include "kmeans/kmeans.h"

namespace {

using namespace antkv;
using namespace antkv::cuda;

constexpr double kFp32PeakTflops = 67.0;  // H200 SXM dense fp32 (datasheet)

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

struct SliceResult {
  int codebooks = 0;
  double faiss_s = 0;        // Lloyd only (init given), all slice codebooks
  double gpu_s = 0;          // the same on the GPU (train_device with the init)
  double mean_gap = 0;       // mean (gpu - faiss) / faiss objective
  double max_abs_gap = 0;
};

// FAISS and the GPU on codebooks [0, F) of the job, from the same GPU k-means++ init.
SliceResult compare_slice(const KMeansJob& job, int F) {
  SliceResult s;
  s.codebooks = F;
  const int64_t n = job.n_points;
  const int dim = job.dim, k = job.k;
  DeviceBuffer<float> dx(static_cast<size_t>(F) * n * dim), dw(static_cast<size_t>(F) * n),
      dinit(static_cast<size_t>(F) * k * dim), dc(static_cast<size_t>(F) * k * dim);
  kmeans_synthetic_data(dx.get(), dw.get(), 0, F, n, dim, job.seed, true);
  KMeansParams p;
  p.k = k;
  p.iters = job.iters;
  p.tol = job.tol;
  p.seed = job.seed;
  p.init_sample = job.init_sample;
  KMeansGpu g(p, job.path);
  const KMeansDeviceBatch db{F, n, dim, dx.get(), dw.get()};
  g.kmeanspp_device(db, dinit.get());
  KMeansResult rg;
  g.train_device(db, dinit.get(), dc.get(), rg);  // warm
  ANTKV_CUDA_CHECK(cudaDeviceSynchronize());
  const double t0 = now_s();
  g.train_device(db, dinit.get(), dc.get(), rg);
  ANTKV_CUDA_CHECK(cudaDeviceSynchronize());
  s.gpu_s = now_s() - t0;
  std::vector<float> x(static_cast<size_t>(F) * n * dim), w(static_cast<size_t>(F) * n),
      init(static_cast<size_t>(F) * k * dim);
  ANTKV_CUDA_CHECK(cudaMemcpy(x.data(), dx.get(), x.size() * 4, cudaMemcpyDeviceToHost));
  ANTKV_CUDA_CHECK(cudaMemcpy(w.data(), dw.get(), w.size() * 4, cudaMemcpyDeviceToHost));
  ANTKV_CUDA_CHECK(cudaMemcpy(init.data(), dinit.get(), init.size() * 4, cudaMemcpyDeviceToHost));
  KMeansBatch hb;
  hb.n_codebooks = F;
  hb.n_points = n;
  hb.dim = dim;
  hb.x = x.data();
  hb.weights = w.data();
  auto faiss = make_kmeans_cpu(p);
  const double t1 = now_s();
  const KMeansResult rc = faiss->train(hb, init.data());
  s.faiss_s = now_s() - t1;
  for (int i = 0; i < F; ++i) {
    const double gap = (rg.objective[i] - rc.objective[i]) / rc.objective[i];
    s.mean_gap += gap / F;
    s.max_abs_gap = std::max(s.max_abs_gap, std::abs(gap));
  }
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"antkv GPU k-means benchmark (LLaMA-3-8B codebook training)"};
  std::vector<std::string> jobs = {"1bit", "0.75bit"};  // suffix -simt / -tc forces the assignment kernel
  int cb1 = 8192, cb075 = 4096, iters = 20, faiss1 = 4, faiss075 = 2, chunk1 = 256, chunk075 = 128;
  int64_t points = 262144, init_sample_075 = 16384;
  std::string json_path;
  app.add_option("--jobs", jobs, "jobs to run: 1bit, 0.75bit (append -simt or -tc to force the assignment kernel)");
  app.add_option("--codebooks-1bit", cb1, "codebooks of the 1-bit job (8192 = the whole model)");
  app.add_option("--codebooks-075", cb075, "codebooks of the 0.75-bit job (4096 = the whole model)");
  app.add_option("--points", points, "calibration points per codebook");
  app.add_option("--iters", iters, "Lloyd iterations");
  app.add_option("--chunk-1bit", chunk1, "codebooks per device chunk, 1-bit");
  app.add_option("--chunk-075", chunk075, "codebooks per device chunk, 0.75-bit");
  app.add_option("--init-sample-075", init_sample_075, "k-means++ sample of the 0.75-bit job (0: min(n, 64 k))");
  app.add_option("--faiss-1bit", faiss1, "codebooks of the FAISS slice, 1-bit (0: skip)");
  app.add_option("--faiss-075", faiss075, "codebooks of the FAISS slice, 0.75-bit (0: skip)");
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
    cudaDeviceProp prop{};
    ANTKV_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    const unsigned cores = std::thread::hardware_concurrency();
    fmt::print("device: {} ({} SMs); host: {} hardware threads; fp32 peak taken as {} TFLOP/s\n", prop.name,
               prop.multiProcessorCount, cores, kFp32PeakTflops);
    nlohmann::json out;
    out["device"] = prop.name;
    out["host_threads"] = cores;
    std::string table =
        "| job | codebooks | seconds (init + Lloyd) | init s | Lloyd s | assign s | assign TFLOP/s (% fp32 peak) | "
        "Lloyd-level TFLOP/s | FAISS s/codebook (slice) | FAISS job s (extrap.) | speedup job | speedup Lloyd | "
        "obj gap vs FAISS |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
    for (const auto& spec : jobs) {
      KMeansJob job;
      int faiss_cb = 0;
      std::string name = spec;
      if (name.size() > 5 && name.substr(name.size() - 5) == "-simt") {
        job.path = KMeansAssignPath::Simt;
        name.resize(name.size() - 5);
      } else if (name.size() > 3 && name.substr(name.size() - 3) == "-tc") {
        job.path = KMeansAssignPath::TensorCore;
        name.resize(name.size() - 3);
      }
      if (name == "1bit") {
        job.name = "1-bit c8b8";
        job.n_codebooks = cb1;
        job.dim = 8;
        job.k = 256;
        job.chunk_codebooks = chunk1;
        faiss_cb = faiss1;
      } else if (name == "0.75bit") {
        job.name = "0.75-bit c16b12";
        job.n_codebooks = cb075;
        job.dim = 16;
        job.k = 4096;
        job.chunk_codebooks = chunk075;
        job.init_sample = init_sample_075;
        faiss_cb = faiss075;
      } else {
        fail("unknown job '{}' (1bit, 0.75bit)", spec);
      }
      KMeansParams pp;
      pp.k = job.k;
      job.name += std::string(" [") + to_string(KMeansGpu(pp, job.path).assign_path(job.dim)) + "]";
      job.n_points = points;
      job.iters = iters;
      fmt::print("== {}: {} codebooks x {} points in R^{}, k = {}, {} iterations, init sample {}\n", job.name,
                 job.n_codebooks, job.n_points, job.dim, job.k, job.iters,
                 job.init_sample ? job.init_sample : std::min<int64_t>(job.n_points, 64LL * job.k));
      std::fflush(stdout);
      const KMeansJobResult r = run_kmeans_job(job, [](const std::string& s) {
        std::fprintf(stderr, "%s\n", s.c_str());
      });
      fmt::print(
          "   {:.2f} s (init {:.2f}, stats {:.2f}, Lloyd {:.2f} of which assignment {:.2f}); data generation {:.2f} s "
          "apart; uploading the data from the host would add ~{:.1f} s at the measured {:.1f} GB/s\n",
          r.seconds, r.t.init_s, r.t.stats_s, r.t.lloyd_s, r.t.assign_s, r.gen_s, r.upload_s_est, r.upload_gbps);
      fmt::print("   assignment {:.1f} TFLOP/s = {:.0f}% of fp32 peak ({:.3e} FLOP); Lloyd-level {:.1f} TFLOP/s; "
                 "mean objective/point {:.5f}, mean iterations {:.1f}, reseeded {}; device memory {:.2f} GiB\n",
                 r.assign_tflops, 100 * r.assign_tflops / kFp32PeakTflops, r.t.assign_flops, r.lloyd_tflops,
                 r.mean_objective_per_point, r.mean_iterations, r.reseeded, r.device_bytes / 1073741824.0);
      std::fflush(stdout);
      nlohmann::json j = {{"job", job.name},
                          {"codebooks", job.n_codebooks},
                          {"points", job.n_points},
                          {"dim", job.dim},
                          {"k", job.k},
                          {"iters", job.iters},
                          {"seconds", r.seconds},
                          {"init_s", r.t.init_s},
                          {"stats_s", r.t.stats_s},
                          {"lloyd_s", r.t.lloyd_s},
                          {"assign_s", r.t.assign_s},
                          {"gen_s", r.gen_s},
                          {"upload_s_est", r.upload_s_est},
                          {"upload_gbps", r.upload_gbps},
                          {"assign_flops", r.t.assign_flops},
                          {"assign_tflops", r.assign_tflops},
                          {"lloyd_tflops", r.lloyd_tflops},
                          {"fp32_peak_fraction", r.assign_tflops / kFp32PeakTflops},
                          {"mean_objective_per_point", r.mean_objective_per_point},
                          {"mean_iterations", r.mean_iterations},
                          {"reseeded", r.reseeded},
                          {"device_bytes", r.device_bytes}};
      std::string faiss_cols = "| - | - | - | - | - |";
      if (faiss_cb > 0) {
        fmt::print("   FAISS slice: {} codebooks on {} host threads (same data, same init)...\n", faiss_cb, cores);
        std::fflush(stdout);
        const SliceResult s = compare_slice(job, faiss_cb);
        const double faiss_per_cb = s.faiss_s / faiss_cb;
        const double faiss_job = faiss_per_cb * job.n_codebooks;
        const double speed_job = faiss_job / r.seconds;
        const double speed_lloyd = faiss_per_cb / (r.t.lloyd_s / job.n_codebooks);
        fmt::print("   FAISS {:.2f} s for {} codebooks = {:.3f} s/codebook -> {:.0f} s for the job (extrapolated); "
                   "GPU on the slice {:.3f} s; objective gap GPU vs FAISS mean {:+.4f}%, max |gap| {:.4f}%\n",
                   s.faiss_s, faiss_cb, faiss_per_cb, faiss_job, s.gpu_s, 100 * s.mean_gap, 100 * s.max_abs_gap);
        fmt::print("   speedup vs FAISS: whole job (GPU init + Lloyd vs FAISS Lloyd) {:.1f}x, Lloyd vs Lloyd {:.1f}x\n",
                   speed_job, speed_lloyd);
        j["faiss"] = {{"codebooks", faiss_cb},     {"seconds", s.faiss_s},          {"per_codebook_s", faiss_per_cb},
                      {"job_s_extrapolated", faiss_job}, {"gpu_slice_s", s.gpu_s}, {"speedup_job", speed_job},
                      {"speedup_lloyd", speed_lloyd}, {"mean_objective_gap", s.mean_gap},
                      {"max_abs_objective_gap", s.max_abs_gap}};
        faiss_cols = fmt::format("| {:.3f} | {:.0f} | {:.1f}x | {:.1f}x | {:+.3f}% (max {:.3f}%) |", faiss_per_cb,
                                 faiss_job, speed_job, speed_lloyd, 100 * s.mean_gap, 100 * s.max_abs_gap);
      }
      table += fmt::format("| {} | {} | {:.2f} | {:.2f} | {:.2f} | {:.2f} | {:.1f} ({:.0f}%) | {:.1f} ", job.name,
                           job.n_codebooks, r.seconds, r.t.init_s, r.t.lloyd_s, r.t.assign_s, r.assign_tflops,
                           100 * r.assign_tflops / kFp32PeakTflops, r.lloyd_tflops) +
               faiss_cols + "\n";
      out["jobs"].push_back(j);
      std::fflush(stdout);
    }
    std::cout << "\n" << table;
    if (!json_path.empty()) antkv::write_file_atomic(json_path, out.dump(2) + "\n");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
