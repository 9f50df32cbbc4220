#include "core/device.h"

#include <fmt/format.h>

#include <algorithm>

#include "core/error.h"
#ifdef ANTKV_HAVE_CUDA
#include <cuda_runtime.h>
#endif

namespace antkv {

namespace {

GpuProbe run_probe() {
  GpuProbe p;
#ifdef ANTKV_HAVE_CUDA
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    p.reason = fmt::format("{}: {}", cudaGetErrorName(err), cudaGetErrorString(err));
    cudaGetLastError();  // clear the sticky error of the failed call
    return p;
  }
  if (n <= 0) {
    p.reason = "no CUDA device";
    return p;
  }
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, 0) != cudaSuccess) {
    cudaGetLastError();
    p.reason = "cudaGetDeviceProperties failed on device 0";
    return p;
  }
  p.usable = true;
  p.name = fmt::format("{} ({:.1f} GiB)", prop.name, prop.totalGlobalMem / double(1ull << 30));
#else
  p.reason = "this build has no CUDA (configure with nvcc available)";
#endif
  return p;
}

}  // namespace

const GpuProbe& probe_gpu() {
  static const GpuProbe probe = run_probe();
  return probe;
}

DeviceSelection select_devices(const std::vector<DeviceRequest>& requests, const GpuProbe& probe,
                               const std::string& where) {
  DeviceSelection s;
  bool any_auto = false;
  for (const auto& r : requests) {
    ANTKV_CHECK(r.requested == "auto" || r.requested == "cpu" || r.requested == "cuda",
                "{}: {} = \"{}\" is not one of: auto, cpu, cuda", where, r.key, r.requested);
    ANTKV_CHECK(r.requested != "cuda" || probe.usable, "{}: {} = cuda, but there is no usable GPU ({}); use auto or cpu",
                where, r.key, probe.reason);
    any_auto |= r.requested == "auto";
    s.devices.push_back(r.requested == "auto" ? (probe.usable ? "cuda" : "cpu") : r.requested);
  }
  bool same = true;
  for (const auto& d : s.devices) same &= d == s.devices.front();
  std::string what;
  if (s.devices.empty() || same) {
    what = s.devices.empty() ? "cpu" : s.devices.front();
  } else {
    for (size_t i = 0; i < requests.size(); ++i)
      what += fmt::format("{}{} {}", i ? ", " : "", requests[i].key, s.devices[i]);
  }
  const bool uses_gpu = std::find(s.devices.begin(), s.devices.end(), "cuda") != s.devices.end();
  if (uses_gpu) s.line = fmt::format("device: {} ({})", what, probe.name);
  else if (!probe.usable && any_auto) s.line = fmt::format("device: {} (no usable GPU: {})", what, probe.reason);
  else if (probe.usable) s.line = fmt::format("device: {} (as asked; {} unused)", what, probe.name);
  else s.line = fmt::format("device: {} (as asked)", what);
  return s;
}

DeviceSelection select_devices(const std::vector<DeviceRequest>& requests, const std::string& where) {
  bool need_probe = false;
  for (const auto& r : requests) need_probe |= r.requested != "cpu";
  static const GpuProbe no_probe{};
  return select_devices(requests, need_probe ? probe_gpu() : no_probe, where);
}

}  // namespace antkv
