// antkv::KMeansTrainer on the GPU for host inputs (make_kmeans_gpu, kernels/kmeans/kmeans.h): chunks of codebooks
// are uploaded, trained by cuda::KMeansGpu and downloaded.
#include <cuda_runtime.h>

#include <algorithm>
#include <memory>
#include <string>

#include "core/error.h"
#include "kernels/common/async_copy.h"
#include "kernels/common/cuda_check.h"
#include "kernels/common/device_buffer.h"
#include "kernels/kmeans/kmeans.h"

namespace antkv::cuda {

// ---- host trainer --------------------------------------------------------------------------------------
namespace {

class GpuKMeans : public KMeansTrainer {
 public:
  GpuKMeans(const KMeansParams& p, size_t chunk_bytes, KMeansAssignPath path)
      : p_(p), gpu_(p, path), chunk_bytes_(chunk_bytes) {}
  std::string name() const override { return "cuda"; }

  KMeansResult train(const KMeansBatch& b, const float* init) override {
    validate_kmeans_batch(b, p_.k, "k-means (GPU)");
    ANTKV_CHECK(kmeans_gpu_supported_dim(b.dim),
                "k-means (GPU): dimension {} is not supported (compiled for 2, 4, 8 and 16)", b.dim);
    const int B = b.n_codebooks, k = p_.k, dim = b.dim;
    const int64_t n = b.n_points;
    const size_t per_cb = static_cast<size_t>(n) * dim * sizeof(float);
    const int chunk = static_cast<int>(std::clamp<size_t>(chunk_bytes_ / std::max<size_t>(per_cb, 1), 1, B));
    KMeansResult r;
    r.centroids.resize(static_cast<size_t>(B) * k * dim);
    r.objective.resize(B);
    r.iterations.resize(B);
    r.reseeded.resize(B);
    DeviceBuffer<float> dx(static_cast<size_t>(chunk) * n * dim), dcent(static_cast<size_t>(chunk) * k * dim);
    DeviceBuffer<float> dw;
    if (b.weights) dw.resize(static_cast<size_t>(chunk) * n);
    cudaStream_t s = nullptr;
    for (int cb0 = 0; cb0 < B; cb0 += chunk) {
      const int nb = std::min(chunk, B - cb0);
      upload(dx.get(), b.x + static_cast<int64_t>(cb0) * n * dim, static_cast<size_t>(nb) * n * dim, s);
      if (b.weights) upload(dw.get(), b.weights + static_cast<int64_t>(cb0) * n, static_cast<size_t>(nb) * n, s);
      if (init)
        upload(dcent.get(), init + static_cast<int64_t>(cb0) * k * dim, static_cast<size_t>(nb) * k * dim, s);
      KMeansDeviceBatch db{nb, n, dim, dx.get(), b.weights ? dw.get() : nullptr};
      KMeansResult part;
      gpu_.train_device(db, init ? dcent.get() : nullptr, dcent.get(), part, s, cb0);
      download(r.centroids.data() + static_cast<int64_t>(cb0) * k * dim, dcent.get(),
               static_cast<size_t>(nb) * k * dim, s);
      ANTKV_CUDA_CHECK(cudaStreamSynchronize(s));
      std::copy(part.objective.begin(), part.objective.end(), r.objective.begin() + cb0);
      std::copy(part.iterations.begin(), part.iterations.end(), r.iterations.begin() + cb0);
      std::copy(part.reseeded.begin(), part.reseeded.end(), r.reseeded.begin() + cb0);
    }
    return r;
  }

 private:
  KMeansParams p_;
  KMeansGpu gpu_;
  size_t chunk_bytes_;
};

}  // namespace

}  // namespace antkv::cuda

namespace antkv {
std::unique_ptr<KMeansTrainer> make_kmeans_gpu(const KMeansParams& p, size_t chunk_bytes,
                                               cuda::KMeansAssignPath path) {
  return std::make_unique<cuda::GpuKMeans>(p, chunk_bytes, path);
}
}  // namespace antkv
