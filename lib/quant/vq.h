// Vector quantization of one head's vectors with per-group codebooks (design note §3):
// a d-dimensional vector is split into d/c contiguous groups of c channels; group g stores the index of
// its nearest centroid among the 2^b of codebook g.
#pragma once
#include <cstdint>

namespace antkv {

struct VqHeadCodebooks {
  const float* centroids = nullptr;  // [groups, k, c]
  int groups = 0;                    // d / c
  int k = 0;                         // 2^b
  int c = 0;
};

// x: [n, stride] (the head's d channels start at x + row * stride) -> codes: [n, groups].
void vq_encode(const VqHeadCodebooks& cb, const float* x, int64_t n, int64_t stride, int32_t* codes);
// codes: [n, groups] -> out: [n, stride] (writes the head's d channels of each row).
void vq_decode(const VqHeadCodebooks& cb, const int32_t* codes, int64_t n, int64_t stride, float* out);
// encode + decode in one pass: out = the nearest-centroid reconstruction of x (out may alias x).
void vq_quantize(const VqHeadCodebooks& cb, const float* x, int64_t n, int64_t stride, float* out);

}  // namespace antkv
