// Vector quantization of one head's vectors with per-group codebooks (design note §3):
// a d-dimensional vector is split into d/c contiguous groups of c channels; group g stores the index of
// its nearest centroid among the 2^b of codebook g.
#pragma once
#include <cstdint>
#include <vector>

#include "quant/method_options.h"

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

// Gain-shape VQ (our option gain=k|kv, not the paper's): a head's d-vector is stored as its L2 norm (fp16, or FP8
// E4M3 with norm=fp8: quant/fp8.h, rounded once from the exact norm) and the vector-quantized direction x / |x|.
// The reconstruction is norm * u / |u| for the concatenated centroids u: renormalized, so its norm is the stored
// one. k-means centroids are means and shrink (|u| < 1 on average); scaling u by the norm alone would keep that
// shrinkage, which flattens the attention logits q.k; the MSE-optimal scale <x, u> / |u|^2 would shrink them further. A zero vector has norm 0 and reconstructs as 0.
// x: [n, stride] (the head's d channels at x + row * stride), normalized in place; norms: [n], rounded to `format`
// (the direction is x / |x| with the exact norm: the codebooks do not depend on the norm's format).
void gain_normalize(float* x, int64_t n, int64_t stride, int d, float* norms, Norm format = Norm::kFp16);
// out: [n, stride] direction reconstructions (the head's d channels), rescaled in place to norms[r] * out / |out|.
void gain_restore(float* out, int64_t n, int64_t stride, int d, const float* norms);

// RoPE-commuting key groups (key_rope=commute, CommVQ's idea, arXiv 2506.18879): RoPE (runtime/rope.h, rotate-half
// layout) turns each channel pair (j, j + d/2) as the complex number z_j = x_j + i x_{j+d/2} times e^{i pos theta_j}.
// Coded in the pair order below, a group of c channels holds c/2 whole pairs (real parts first, then imaginary
// parts), so a codeword is c/2 complex numbers w and RoPE of the decoded pre-RoPE key is the codeword times
// e^{i pos theta}: the code of a key does not depend on its position. Coded position g c + t holds channel
// g c/2 + t for t < c/2 and d/2 + g c/2 + t - c/2 for t >= c/2 (c even, dividing d). The k-means, the gain norm and
// the nearest-centroid search are those of any coded vector, in this order.
// order[i] = the channel at coded position i, [d].
std::vector<int> rope_pair_order(int d, int c);
// x: [n, stride] rows whose d channels are permuted in place: to_pairs: row'[i] = row[order[i]]; else the inverse.
void permute_channels(const std::vector<int>& order, bool to_pairs, float* x, int64_t n, int64_t stride);

// Rotated VQ (our option rotate=pca, not the paper's): each (layer, KV head, tensor) has a mean and an orthogonal
// d x d basis learned from the calibration K/V; a head vector is coded as x' = R (x - mean) (R row-major: row i is
// the i-th basis vector), and reconstructed as mean + R^T x'_hat. The basis is the covariance's eigenvectors,
// grouped for product quantization by OPQ's eigenvalue allocation (Ge et al., CVPR 2013): eigenvalues in
// decreasing order each go to the group of c channels (not yet full) whose product of eigenvalues is smallest,
// so that the d/c codebooks see balanced variance, and the mean (centering) costs no centroids. Mean and basis
// are stored in fp16 (rounded here) and counted with the codebooks in effective bits.
// x: [n, stride] (the head's d channels at x + row * stride), transformed in place.
void rotate_forward(const float* rotation, const float* mean, int d, float* x, int64_t n, int64_t stride);
void rotate_inverse(const float* rotation, const float* mean, int d, float* x, int64_t n, int64_t stride);
// cov: [d, d] symmetric (row-major, double), the weighted covariance of a head's vectors; c divides d.
// Writes rotation [d, d] (fp16-rounded rows; group g is rows [g c, (g+1) c)).
void pca_rotation(const double* cov, int d, int c, float* rotation);

// Rotated scalar quantization (method kind rsq: a training-free baseline in the manner of TurboQuant, Zandieh et
// al. 2025, and QuaRot): a head vector x is rotated by y = H S x / sqrt(d) (S random signs from a fixed seed per
// layer, tensor and head, H the Walsh-Hadamard matrix; d a power of 2), its norm |y| = |x| is stored in fp16,
// each coordinate of sqrt(d) y / |y| (close to N(0, 1) after the rotation) is rounded to the nearest of the 2^bits
// Lloyd-Max levels of the standard normal, and the reconstruction is renormalized to the stored norm (as gain-shape)
// and rotated back. bits in [1, 4]; bits + 16 / d stored bits per channel.
// The Lloyd-Max levels of N(0, 1) for `bits` (increasing; symmetric), computed once.
const std::vector<float>& lloyd_max_gaussian(int bits);
// x: [n, stride] (the head's d channels at x + row * stride), quantized in place; signs: [d] of +-1.
void rsq_quantize(float* x, int64_t n, int64_t stride, int d, int bits, const float* signs);
// The fixed signs of (layer, tensor 0 keys / 1 values, head).
std::vector<float> rsq_signs(int d, int layer, int tensor, int head);

// Task-metric VQ (our option metric=task, quant/method.h): group g of a head's coded vector has a c x c metric
// block M_g (symmetric positive semi-definite) and a stored lower-triangular factor L_g with M_g + ridge = L_g L_g^T;
// the distance of x to centroid c is |L_g^T (x - c)|^2 = (x - c)^T L L^T (x - c). k-means in the metric is plain
// k-means on x' = L^T x with the centroids mapped back c = L^-T c'.
// M: [c, c] row-major (double). Writes L [c, c] row-major (fp16-rounded, zero above the diagonal): the Cholesky
// factor of M' + 1e-3 I, M' = M scaled to trace c (the scale changes no nearest centroid; entries of order 1 keep
// fp16 precise), so that the block is positive definite (the ridge is 1e-3 of the mean eigenvalue). A block without
// a positive trace gets the identity (Euclidean).
// A block whose factorization fails (not PSD, NaN) is an error naming `what`.
void metric_factor(const double* M, int c, float* L, const char* what);
// x: [n, stride] (the head's d channels at x + row * stride); metric: [groups, c, c] factors. x <- L_g^T x per group.
void metric_forward(const float* metric, int groups, int c, float* x, int64_t n, int64_t stride);
// The inverse: x <- L_g^-T x per group (a triangular solve).
void metric_inverse(const float* metric, int groups, int c, float* x, int64_t n, int64_t stride);
// The searched centroids L_g^T c of every group: [groups, k, c] (cb's layout); metric: [groups, c, c] factors.
// cb may span several heads (groups = heads x groups per head) when the factors are laid out the same way.
std::vector<float> metric_centroids(const VqHeadCodebooks& cb, const float* metric);
// vq_quantize in the metric: codes = argmin over centroids of |L^T (x - c)|^2 (nearest L^T c to L^T x; ties: lowest
// index), out = the original-space centroids of the codes (out may alias x). `mapped`: metric_centroids(cb, metric),
// computed once by callers that quantize often; the overload without it maps them on every call.
void vq_quantize_metric(const VqHeadCodebooks& cb, const float* mapped, const float* metric, const float* x, int64_t n,
                        int64_t stride, float* out);
void vq_quantize_metric(const VqHeadCodebooks& cb, const float* metric, const float* x, int64_t n, int64_t stride,
                        float* out);

}  // namespace antkv
