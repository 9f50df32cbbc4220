// Where the work runs: "auto" (the default of every device setting) is the GPU when one is usable, else the
// CPU; "cuda" asked for without a usable GPU is an error raised before any work starts.
// Usable = this build has CUDA and cudaGetDeviceCount() succeeds with at least one device (a missing or too
// old driver, CUDA_VISIBLE_DEVICES="" or no device all mean "not usable"; the probe never throws).
#pragma once
#include <string>
#include <vector>

namespace antkv {

struct GpuProbe {
  bool usable = false;
  std::string name;    // "NVIDIA H200 (139.8 GiB)" when usable
  std::string reason;  // why not, when not usable: "cudaErrorInsufficientDriver: CUDA driver version is ..."
};

// Probes once per process (cached); never throws.
const GpuProbe& probe_gpu();

// One device setting to resolve: key names it in messages ("calibration.device", "--device").
struct DeviceRequest {
  std::string key;
  std::string requested;  // auto | cpu | cuda
};

struct DeviceSelection {
  std::vector<std::string> devices;  // "cpu" or "cuda", one per request, in order
  std::string line;                  // "device: cpu (no usable GPU: ...)", to print once
};

// Resolves every request against `probe`. An explicit "cuda" without a usable GPU, or a value other than
// auto/cpu/cuda, throws a one-line Error naming the key (`where` is the recipe file or command).
DeviceSelection select_devices(const std::vector<DeviceRequest>& requests, const GpuProbe& probe,
                               const std::string& where);
// The same with the process's probe; probes only when some request is auto or cuda.
DeviceSelection select_devices(const std::vector<DeviceRequest>& requests, const std::string& where);

}  // namespace antkv
