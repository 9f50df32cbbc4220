// The calibration dump (design note §7), HDF5:
//   /meta                       attributes: model, config_hash, recipe (YAML), tokens, seq_len, windows,
//                               key_rope, anchor_score, seed, text, text_hash, num_layers, num_kv_heads,
//                               head_dim, version (nothing that varies between runs: the same inputs give the
//                               same bytes, and a dump's content hash names it in its codebooks' fingerprint)
//   /tokens     [N] int32       token id of each stored token
//   /positions  [N] int32       its position in its window
//   /window     [N] int32       its window's index
//   /layer_{l}/keys          [N, kv_heads, d] fp16   (post- or pre-RoPE as meta key_rope says)
//   /layer_{l}/values        [N, kv_heads, d] fp16
//   /layer_{l}/S_K, /S_V, /anchor_score  [N, kv_heads] fp32
//   /layer_{l}/query_moment  [kv_heads, d, d] fp32   sum over the KV head's G query heads of the mean over the
//                            calibration tokens run (every token of every window, sampled or not) of q q^T, q the
//                            post-RoPE query (metric=task keys; dumps before it, or from a device stage that does not
//                            compute it, lack it)
//   /layer_{l}/oproj_gram    [kv_heads, d, d] fp32   sum over the G query heads g of W_o,g^T W_o,g, W_o,g the head's
//                            d columns of o_proj (metric=task values; written when the model directory is known)
// Datasets grow window by window (chunked), so memory stays bounded. Not compressed by default: on fp16
// K/V, shuffle + deflate saves little (meta kv_compression says what was used) and costs one core's deflate
// time, which bounded calibration at the 8B shape (see CalibDumpWriter).
// Every per-token or per-codebook array is a dataset; /meta holds small scalar attributes only (HDF5
// attributes stop at 64 KiB). Written in the HDF5 1.10 format (checksummed metadata), every dataset with the
// Fletcher32 filter; the reader checks every value and shape, so a damaged file is one error line
// "<file>: <object>: damaged or not an antkv file (...)", never a wrong value or a crash.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace antkv {

struct CalibMeta {
  std::string model, config_hash, recipe, key_rope, anchor_score, text, text_hash, version;
  std::string fingerprint;  // what the dump depends on (antkv-eval run reuses a dump whose fingerprint matches)
  int64_t tokens = 0, seq_len = 0, windows = 0, seed = 0;
  int64_t num_layers = 0, num_kv_heads = 0, head_dim = 0;
  int64_t sample_per_window = 0;  // tokens stored per window (0: all); the recipe's calibration.sample_per_window
  std::string kv_compression;     // "none" | "shuffle+deflate-<level>" (read back; set by the writer)
};

class CalibDumpWriter {
 public:
  // Creates `path` (the caller writes to a temporary path and renames it when complete). deflate_level 0:
  // K/V and scores uncompressed; 1-9: shuffle + deflate at that level.
  CalibDumpWriter(const std::string& path, int num_layers, int num_kv_heads, int head_dim, int deflate_level = 0);
  ~CalibDumpWriter();
  // n tokens of one window: ids, positions, window index: [n] each.
  void append_tokens(int n, const int32_t* tokens, const int32_t* positions, const int32_t* windows);
  // The same n tokens for one layer: keys, values [n, kv_heads, d]; s_k, s_v, anchor_score [n, kv_heads].
  void append_layer(int layer, int n, const float* keys, const float* values, const float* s_k,
                    const float* s_v, const float* anchor_score);
  // The same with K/V already fp16 (IEEE half bits).
  void append_layer_f16(int layer, int n, const uint16_t* keys, const uint16_t* values, const float* s_k,
                        const float* s_v, const float* anchor_score);
  int64_t bytes_appended() const;  // K/V and score bytes so far (before any compression)
  // The metric=task statistics of one layer, [kv_heads, d, d] each (null: not stored), written by finish().
  void set_query_moment(int layer, const std::vector<float>& m);
  void set_oproj_gram(int layer, const std::vector<float>& m);
  void finish(const CalibMeta& meta);  // writes /meta and closes; the dump is complete

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

class CalibDumpReader {
 public:
  struct Impl;  // opaque (public for the reader's helpers in calib_dump.cpp)
  explicit CalibDumpReader(const std::string& path);  // validates layout and shapes
  ~CalibDumpReader();
  const CalibMeta& meta() const;
  const std::string& path() const;
  int64_t n_tokens() const;
  std::vector<int32_t> tokens() const;
  std::vector<int32_t> positions() const;
  std::vector<int32_t> windows() const;
  // rows [row0, row0 + rows) of one layer; keys/values: [rows, kv_heads, d], scores: [rows, kv_heads].
  void read_keys(int layer, int64_t row0, int64_t rows, float* out) const;
  void read_values(int layer, int64_t row0, int64_t rows, float* out) const;
  void read_scores(int layer, const char* name, int64_t row0, int64_t rows, float* out) const;  // S_K|S_V|anchor_score
  // The stored fp16 bits themselves (no conversion): [rows, kv_heads, d].
  void read_keys_half(int layer, int64_t row0, int64_t rows, uint16_t* out) const;
  void read_values_half(int layer, int64_t row0, int64_t rows, uint16_t* out) const;
  // metric=task statistics ([kv_heads, d, d]); has_*: whether every layer holds them.
  bool has_query_moment() const;
  bool has_oproj_gram() const;
  std::vector<float> read_query_moment(int layer) const;  // errors clearly when the dump lacks it
  std::vector<float> read_oproj_gram(int layer) const;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace antkv
