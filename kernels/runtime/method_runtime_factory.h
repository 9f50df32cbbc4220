// The GPU counterpart of cpu_method_runtime_factory (eval/compare.h): a GpuRuntime per method with the method's
// simulated quantizer (kernels/quant/simulated_quantizer.h) and, for a real cache, the compressed or the packed
// uniform cache.
#pragma once
#include "eval/compare.h"
#include "kernels/runtime/gpu_runtime.h"

namespace antkv {

class Checkpoint;

// GpuRuntimes (weights from ckpt, which must outlive the factory's runtimes) with the method's quantizer.
// real_cache: vq/antkv runtimes keep the compressed cache (kernels/quant/compressed_cache.h; their quantizer
// still chooses the prefill's anchors and simulates the prefill's own attention); uniform runtimes keep the packed
// uniform cache (kernels/quant/uniform_cache.h: bits 2 or 4, group 32, 64 or 128, head_dim 64 or 128; other
// shapes refused, naming the method), their quantizer simulating the prefill's own attention; fp16 and rsq stay
// simulated.
MethodRuntimeFactory gpu_method_runtime_factory(const Checkpoint& ckpt, const GpuRuntimeOptions& opt = {},
                                                bool real_cache = false);

}  // namespace antkv
