// Synthetic device data for benchmarks and max-context runs (quant_bench.cpp; the compressed and uniform caches'
// fill_random): counter-based hashes of (seed, index), so the values do not depend on the launch shape.
#pragma once
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace antkv::cuda {

// Uniformly random bytes (a counter-based hash of (seed, i)): synthetic code streams.
void fill_random_bytes(uint8_t* dst, int64_t n, uint64_t seed, cudaStream_t stream);
// Uniform in [-scale, scale), rounded to fp16.
void fill_random_f16(__half* dst, int64_t n, uint64_t seed, float scale, cudaStream_t stream);

}  // namespace antkv::cuda
