// Codebook files (design note §7), HDF5:
//   /meta   attributes: config_hash, calib_hash, recipe (YAML), key_rope, weighting, exclude_anchors, gain, rotate, metric, key_c,
//           key_b, value_c, value_b, num_layers, num_kv_heads, head_dim, trainer, version
//   /layer_{l}/key_centroids    [kv_heads, d/c, 2^b, c] fp32   (value_centroids likewise, with the value c, b)
//   /layer_{l}/key_objective    [kv_heads, d/c] fp64   final weighted k-means objective per codebook
//   /layer_{l}/key_iterations   [kv_heads, d/c] int32, /key_reseeded [kv_heads, d/c] int64
//   /layer_{l}/key_error_norm   [kv_heads] fp32   mean |k - k_hat| on held-out tokens (e_K of §2)
//   /layer_{l}/key_rotation     [kv_heads, d, d] fp32, /key_mean [kv_heads, d] fp32   (rotate=pca only;
//                               fp16-rounded values)
//   /layer_{l}/key_metric       [kv_heads, d/c, c, c] fp32   (metric=task only; fp16-rounded lower-triangular
//                               Cholesky factor L of each group's metric block, M ~ L L^T; quant/method.h)
//   (value_* likewise)
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace antkv {

struct CodebookMeta {
  std::string config_hash, calib_hash, recipe, key_rope, weighting, trainer, version;
  std::string fingerprint;  // what the codebooks depend on (antkv-eval run reuses matching ones)
  int key_c = 0, key_b = 0, value_c = 0, value_b = 0;
  int num_layers = 0, num_kv_heads = 0, head_dim = 0;
  bool exclude_anchors = true;  // the calibration anchors were left out of training (files before it: true)
  // off | k | kv: the key (and value) codebooks were trained on unit vectors, for gain-shape VQ (files before
  // it: off)
  std::string gain = "off";
  // off | pca: K/V coded in a learned rotated, centered basis (quant/vq.h rotate_forward; files before it: off)
  std::string rotate = "off";
  // plain | task: codebooks trained (and codes assigned) in the task metric, factors in /layer_{l}/*_metric (files
  // before it: plain)
  std::string metric = "plain";
};

// One layer's codebooks for keys or values.
struct LayerCodebooks {
  std::vector<float> centroids;   // [kv_heads, d/c, 2^b, c]
  std::vector<double> objective;  // [kv_heads, d/c]
  std::vector<int32_t> iterations;
  std::vector<int64_t> reseeded;
  std::vector<float> error_norm;  // [kv_heads]
  std::vector<float> rotation;    // rotate=pca: [kv_heads, d, d] fp16-rounded orthogonal basis (rows)
  std::vector<float> mean;        // rotate=pca: [kv_heads, d] fp16-rounded mean subtracted before the rotation
  // metric=task: [kv_heads, d/c, c, c] fp16-rounded lower-triangular factors L (row-major); the distance of group g
  // is |L^T (x - c)|^2 (in the coded basis: after rotate=pca's rotation)
  std::vector<float> metric;
};

struct CodebookSet {
  CodebookMeta meta;
  std::vector<LayerCodebooks> keys, values;  // [num_layers]
  int key_groups() const { return meta.head_dim / meta.key_c; }
};

void write_codebooks(const std::string& path, const CodebookSet& set);  // path: caller renames into place
// Validates every value and shape (a damaged file: "<path>: <object>: damaged or not an antkv file (...)").
CodebookSet read_codebooks(const std::string& path);

}  // namespace antkv
