// The GPU counterpart of cpu_method_runtime_factory (eval/compare.h): a GpuRuntime per method with the method's
// simulated quantizer (kernels/quant/simulated_quantizer.h) and, for a real cache, the compressed cache.
#pragma once
#include "eval/compare.h"
#include "kernels/runtime/gpu_runtime.h"

namespace antkv {

class Checkpoint;

// GpuRuntimes (weights from ckpt, which must outlive the factory's runtimes) with the method's quantizer.
// real_cache: vq/antkv runtimes keep the compressed cache (kernels/quant/compressed_cache.h; their quantizer
// still chooses the prefill's anchors and simulates the prefill's own attention); fp16/uniform/rsq stay simulated.
MethodRuntimeFactory gpu_method_runtime_factory(const Checkpoint& ckpt, const GpuRuntimeOptions& opt = {},
                                                bool real_cache = false);

}  // namespace antkv
