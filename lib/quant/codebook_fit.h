// Whether a codebook set can serve a method on a model: the one check the CPU cache, the simulated GPU quantizer and
// the compressed GPU cache make before they read codebooks (each adds only what its own kernels restrict).
#pragma once
#include "io/codebooks.h"
#include "model/model_config.h"
#include "quant/method.h"

namespace antkv {

// Throws antkv::Error naming the method and what does not fit: the model (config hash, layers, KV heads, head_dim),
// the configuration (c, b of every layer and tensor; per-layer widths), key placement, gain, rotate, metric, and
// the sizes of every array the method reads (centroids, error norms, rotation and mean, metric factors).
void check_codebooks_fit(const MethodSpec& m, const CodebookSet& cb, const ModelConfig& cfg);

}  // namespace antkv
