// Host-side helpers shared by the GPU tests: bf16 conversion (round to nearest even, as the kernels store),
// a fresh random seed per run (GPU tests draw new inputs every time), and (CUDA builds) checked uploads and
// downloads of device buffers, and report_measured (one grep-able line per tolerance check, so a GPU run
// shows the achieved precision: ./antkv-tests "[gpu]" | grep MEASURED).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>

namespace antkv::test {

inline uint16_t f2bf(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return 0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>(u >> 16);
}
inline float bf2f(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float round_bf(float f) { return bf2f(f2bf(f)); }

inline uint32_t fresh_seed() {
  static std::random_device rd;
  return rd();
}

// Prints "MEASURED <label> = <value> (bound <bound>)" on stdout; call it where a tolerance is checked, with the
// measured quantity (max abs/rel error, ...) the check compares against the bound.
inline void report_measured(const std::string& label, double value, double bound) {
  std::printf("MEASURED %s = %.6g (bound %.6g)\n", label.c_str(), value, bound);
  std::fflush(stdout);
}

}  // namespace antkv::test

// CHECK(value < bound) with the value reported first (report_measured): the usual form of a tolerance check in
// the GPU tests. value is evaluated once.
#define CHECK_MEASURED(label, value, bound)                    \
  do {                                                         \
    const double measured_value_ = (value);                    \
    ::antkv::test::report_measured((label), measured_value_, (bound)); \
    CHECK(measured_value_ < (bound));                          \
  } while (0)

#ifdef ANTKV_HAVE_CUDA
#include <vector>

#include "kernels/common/cuda_check.h"
#include "kernels/common/device_buffer.h"
#include "kernels/runtime/ops.h"

namespace antkv::test {

template <typename T>
cuda::DeviceBuffer<T> upload(const std::vector<T>& h) {
  cuda::DeviceBuffer<T> d(h.size());
  if (!h.empty()) ANTKV_CUDA_CHECK(cudaMemcpy(d.get(), h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}
// fp32 host values rounded to bf16 on the way
inline cuda::DeviceBuffer<cuda::bf16> upload_bf(const std::vector<float>& h) {
  std::vector<uint16_t> b(h.size());
  for (size_t i = 0; i < h.size(); ++i) b[i] = f2bf(h[i]);
  cuda::DeviceBuffer<cuda::bf16> d(h.size());
  if (!h.empty()) ANTKV_CUDA_CHECK(cudaMemcpy(d.get(), b.data(), b.size() * 2, cudaMemcpyHostToDevice));
  return d;
}
// Synchronizes the device first (kernels run on whatever stream), then copies n elements.
template <typename T>
std::vector<T> download(const T* d, size_t n) {
  std::vector<T> h(n);
  ANTKV_CUDA_CHECK(cudaDeviceSynchronize());
  if (n) ANTKV_CUDA_CHECK(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
  return h;
}
template <typename T>
std::vector<T> download(const cuda::DeviceBuffer<T>& d, size_t n = 0) {
  return download(d.get(), n ? n : d.size());
}
inline std::vector<float> download_bf(const cuda::bf16* d, size_t n) {
  const auto b = download(reinterpret_cast<const uint16_t*>(d), n);
  std::vector<float> f(n);
  for (size_t i = 0; i < n; ++i) f[i] = bf2f(b[i]);
  return f;
}

}  // namespace antkv::test
#endif
