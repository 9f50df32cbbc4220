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

// Gain-shape VQ (our option gain=k|kv, not the paper's): a head's d-vector is stored as its L2 norm (fp16) and
// the vector-quantized direction x / |x|. The reconstruction is norm * u / |u| for the concatenated centroids
// u: renormalized, so its norm is the stored one. k-means centroids are means and shrink (|u| < 1 on average);
// scaling u by the norm alone would keep that shrinkage, which flattens the attention logits q.k; the MSE-optimal
// scale <x, u> / |u|^2 would shrink them further. A zero vector has norm 0 and reconstructs as 0.
// x: [n, stride] (the head's d channels at x + row * stride), normalized in place; norms: [n], fp16-rounded.
void gain_normalize(float* x, int64_t n, int64_t stride, int d, float* norms);
// out: [n, stride] direction reconstructions (the head's d channels), rescaled in place to norms[r] * out / |out|.
void gain_restore(float* out, int64_t n, int64_t stride, int d, const float* norms);

}  // namespace antkv
