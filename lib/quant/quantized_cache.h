// The CPU reference KV cache of every method (docs/METHODS.md says what each method and option stores): what
// attention reads is the dequantized cache, computed when tokens are appended. vq/antkv keep the ceil(ratio * n)
// tokens of each appended chunk with the largest anchor score (and the chunk's position 0) in FP16, scored from the
// chunk's full-precision attention; pre-RoPE keys are quantized before RoPE and rotated after dequantization.
// Decode (one-token appends): a new token stays FP16 while it is among the newest decode_window (the
// method's, from the recipe's anchor.window); when
// it leaves the window it is quantized, or kept as an anchor by the online rule of design note §2
// (MethodSpec::promote): per layer and KV head, while the head holds fewer than ceil(ratio * length) anchors
// it is kept; else it takes the place of the anchor with the smallest running score (token 0 excepted; ties to
// the earliest position) when its running score is larger, and that anchor is quantized. Order within a step:
// the new token enters, the leaving token is decided on the running scores of the earlier rows, then the new
// token's attention row (q over the cache as attention will read it: softmax of q.k / sqrt(d), output o) adds
//   A_gj |q_g| |v_j - o_g| / sqrt(d) * e_K + A_gj * e_V   (error_bound; attention_mass / key_bound: one term)
// summed over the head's G query heads, to the running score of every anchor and window token. A prefill
// chunk's anchors start from their chunk scores. Scores are accumulated in double.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "io/codebooks.h"
#include "quant/method.h"
#include "runtime/kv_cache.h"

namespace antkv {

struct QuantizedCacheStats {
  int64_t tokens = 0, anchors = 0, fp16_tokens = 0;  // per layer and head, summed
};

class QuantizedKvCache : public KvCache {
 public:
  // codebooks: required for vq/antkv (quant/codebook_fit.h: they must fit the model and the method).
  QuantizedKvCache(const ModelConfig& cfg, const MethodSpec& method, std::shared_ptr<const CodebookSet> codebooks);
  std::string name() const override { return method_.text; }
  void reset() override;
  int length(int layer) const override { return static_cast<int>(k_[layer].size() / row_); }
  void append(const KvAppend& a) override;
  const float* keys(int layer) const override { return k_[layer].data(); }
  const float* values(int layer) const override { return v_[layer].data(); }
  size_t stored_bytes() const override;
  const float* key_error(int layer) const override {
    return method_.correct ? key_err_[layer].data() : nullptr;
  }

  const QuantizedCacheStats& stats() const { return stats_; }
  // Bits the cache holds now, counted from what it stores: quantized codes, FP16 tokens (anchors with their
  // 32-bit index per anchored tensor, decode-window tokens, uniform's incomplete key group and window), fp16 scales and
  // zero points, the key errors of correct=on, gain-shape norms, and (include_codebooks) the fp16 centroids of every layer,
  // head and group. effective_bits divides by the 2 * length * kv_dim * layers stored K/V elements; it is
  // what lib/quant/method.h's effective_bits() predicts for one prefill of `length` tokens, and differs when
  // prefill was chunked (anchors are chosen per chunk) or tokens wait in the decode window.
  double stored_bits(bool include_codebooks = true) const;
  double effective_bits(bool include_codebooks = true) const;
  // Anchor flags of layer l: [length, kv_heads] (1 = kept in FP16).
  const std::vector<uint8_t>& anchor_flags(int layer) const { return anchor_[layer]; }
  // Running anchor scores of layer l (promotes()): [length, kv_heads]; meaningful for anchors and window tokens.
  const std::vector<double>& running_scores(int layer) const { return running_[layer]; }

 private:
  void quantize_rows(int layer, int64_t row0, int64_t n, const float* k_pre, const float* k_post, const float* v,
                     const uint8_t* keep_fp16, int position0);
  const ModelConfig cfg_;
  MethodSpec method_;
  std::shared_ptr<const CodebookSet> cb_;
  int decode_window_;
  size_t row_;
  std::vector<float> inv_freq_;
  std::vector<std::vector<float>> k_, v_;          // dequantized, [len, kv, d]
  std::vector<std::vector<float>> k_exact_, v_exact_, k_pre_exact_;  // FP16 copies of window tokens awaiting quantization
  std::vector<std::vector<uint8_t>> anchor_;       // [len, kv]
  std::vector<std::vector<float>> key_err_;        // [len, kv] |k - k_hat|^2 / d (correct=on), fp16-rounded
  std::vector<int> quantized_upto_;                // uniform/decode: rows [0, quantized_upto) are final
  // promotes(): running anchor scores [len, kv] (meaningful for anchors and window tokens), anchors per head [kv]
  std::vector<std::vector<double>> running_;
  std::vector<std::vector<int>> anchor_count_;
  // metric=task: [layer * 2 + side] the searched centroids L^T c, [kv, groups, 2^b, c] (mapped on first use)
  std::vector<std::vector<float>> metric_cents_;
  void decide_leaving(int layer, int64_t row, int64_t len);   // the online rule for `row` leaving the window
  void add_attention_row(int layer, const float* q);        // the newest row's attention into running_
  QuantizedCacheStats stats_;
};

// Asymmetric uniform quantization of n values with stride: min/max, fp16 scale and zero point.
void uniform_quantize(float* x, int64_t n, int64_t stride, int bits);

}  // namespace antkv
