// The KV-cache methods the evaluation compares (design note §5), parsed from recipe strings:
//   fp16
//   uniform:bits=2,group=128,window=0          KIVI-style: keys per channel, values per token
//   vq:bits=1                                  CQ-style: plain k-means codebooks, no anchors
//   antkv:bits=1                               weighted codebooks + anchors (the paper's method)
//   rsq:bits=1,key_rope=post                   ours, a training-free baseline: random Hadamard rotation, fp16 norm and
//                                              per-coordinate Lloyd-Max levels (quant/vq.h rsq_quantize), bits 1-4
// Options of vq/antkv: bits (both K and V; or kbits=, vbits=), anchors=kv|k|v|off (on = kv), weighting=anchor|none,
// ratio=0.01, score=error_bound|attention_mass|key_bound|random|recent, key_rope=post|pre, correct=on|off,
// gain=off|k|kv, promote=on|off (decode-time anchors, see MethodSpec::promote).
//   anchors=k|v (ours, not the paper's): anchor tokens keep FP16 only for that tensor; the other tensor of an
//     anchor token is quantized like any token (the selection is the paper's, from both scores). exclude=on
//     still leaves the calibration anchors out of both tensors' codebooks (exclude=off trains on every token).
//   gain=k|kv (ours): gain-shape VQ of keys (and values): each token's per-head vector keeps its L2 norm in fp16
//     and only its direction is vector-quantized, with codebooks trained on unit vectors (a codebook
//     configuration of its own: file name suffix _gk / _gkv, /meta attribute gain). The dequantized vector is
//     norm * u / |u| for the concatenated centroid direction u, so every reconstructed norm is the original's.
//   rotate=pca (ours): K and V coded in a learned centered basis per layer, head and tensor (quant/vq.h
//     rotate_forward: mean and PCA basis with OPQ eigenvalue allocation over the groups), codebooks trained in that
//     basis (a configuration of its own: file name suffix _rpca, /meta attribute rotate); mean and basis are fp16
//     side information counted with the codebooks in effective bits. Combines with gain (norm of x - mean).
//   metric=task (ours; default metric=plain): codebooks trained and codes assigned in the task metric instead of
//     the Euclidean one: a group's distance is (x - c)^T M (x - c) with M the group's c x c diagonal block of
//     keys: the second moment E[q q^T] of the post-RoPE queries reading the KV head (summed over its G query heads;
//           calibration dump /layer_{l}/query_moment), so that the error is that of the scores q.(k - k_hat);
//           pre-RoPE keys (key_rope=pre): a rotation-invariant diagonal, both channels of RoPE pair (i, i + d/2)
//           get (E[q_i^2] + E[q_{i+d/2}^2]) / 2;
//     values: sum over the G query heads g of W_o,g^T W_o,g (W_o,g the d columns of o_proj for head g; dump
//           /layer_{l}/oproj_gram), the output error W_o (v - v_hat).
//     With rotate=pca the blocks are those of R M R^T (the metric in the coded basis). Per (layer, head, group)
//     the fp16 Cholesky factor L of the block (scaled to trace c, + ridge 1e-3 I) is stored (file suffix _mtask, /meta
//     attribute metric, /layer_{l}/key_metric [kv_heads, d/c, c, c]); training runs plain/weighted k-means on
//     L^T x (both trainers) and maps the centroids back (c = L^-T c'); the quantizer assigns by nearest L^T c to
//     L^T x and decodes with the original-space centroids. The factors count with the codebooks in effective bits
//     (c x c fp16 per group). The simulated GPU quantizer runs it (kernels/quant/quantized_cache.h); the compressed
//     cache refuses it.
// `vq` is antkv with anchors=off, weighting=none and codebooks trained on every calibration token (CQ knows
// no anchors); antkv's codebooks leave the calibration anchors out (recipe kmeans.exclude_anchors; option
// exclude=on|off). Ablations are antkv with one component off.
#pragma once
#include <string>
#include <vector>

#include "recipe/recipe.h"

namespace antkv {

struct MethodSpec {
  std::string text;            // as written
  std::string kind;            // fp16 | uniform | vq | antkv | rsq
  // uniform
  int bits = 2, group = 128, window = 0;
  // vq / antkv
  VqConfig keys, values;
  bool anchors = true;          // any anchors (anchor_keys || anchor_values)
  bool anchor_keys = true, anchor_values = true;  // which tensors anchor tokens keep in FP16
  std::string gain = "off";     // off | k | kv: gain-shape (norm in fp16, direction quantized) keys / values
  std::string rotate = "off";   // off | pca: coded in a learned centered, rotated basis (codebook configuration)
  std::string metric = "plain"; // plain | task: codebooks and assignment in the task metric (codebook configuration)
  std::string weighting = "anchor";
  bool exclude_anchors = true;  // codebooks trained without the calibration anchors (vq: false)
  double ratio = 0.01;
  std::string score = "error_bound";
  std::string key_rope = "post";
  // Our variant (not in the paper): store each quantized key's error |k - k_hat|^2 (fp16, per token and
  // head) and add scale^2 |q|^2 e / 2 to its attention score, undoing the exp-mass that centroid keys lose
  // against exact (anchor) keys. Option correct=on.
  bool correct = false;
  // Decode-time anchors (design note §2's online rule; option promote=on|off, on by default): a token leaving
  // the FP16 decode window becomes an anchor while the head holds fewer than ceil(ratio * length) anchors, or
  // in place of the anchor with the smallest running score (the sink excepted) when its own running score is
  // larger; the displaced anchor is then quantized. Running scores are the anchor score (the method's `score`)
  // summed over every attention row the token has been in: the prefill's rows, then each decode step's.
  // Tracked for anchors and window tokens only (a quantized token cannot come back).
  bool promote = true;
  // Whether decode steps run that rule: anchors on, a score that attention defines (not random or recent).
  bool promotes() const {
    return anchors && promote && (score == "error_bound" || score == "attention_mass" || score == "key_bound");
  }

  // Per-layer budgets (ours): lkbits= / lvbits= give every layer its key / value width ('/'-separated named
  // widths, one per layer: lkbits=1/1/1/1/1.25/1.5), lratio= every layer's anchor ratio (lratio=0.02/0.01/...).
  // Empty: every layer takes keys / values / ratio. A width list needs one codebook file per distinct (key, value)
  // width pair of its layers (codebook_specs()).
  std::vector<VqConfig> layer_keys, layer_values;
  std::vector<double> layer_ratio;
  bool layered() const { return !layer_keys.empty(); }
  VqConfig key_config(int l) const { return layer_keys.empty() ? keys : layer_keys.at(static_cast<size_t>(l)); }
  VqConfig value_config(int l) const { return layer_values.empty() ? values : layer_values.at(static_cast<size_t>(l)); }
  double ratio_of(int l) const { return layer_ratio.empty() ? ratio : layer_ratio.at(static_cast<size_t>(l)); }
  int listed_layers() const;  // the length of the per-layer lists (0: none)
  // The specs (one per codebook file; lists cleared, keys / values set) whose codebooks this method reads.
  std::vector<MethodSpec> codebook_specs() const;
  // The name of this method's codebook set in load_method_codebooks' map: codebook_file(), or for per-layer widths
  // "layers:" + the files of its layers.
  std::string codebook_key() const;
  bool gain_keys() const { return gain == "k" || gain == "kv"; }
  bool gain_values() const { return gain == "kv"; }
  // anchors as written in options: kv | k | v | off
  std::string anchors_name() const;
  bool needs_codebooks() const { return kind == "vq" || kind == "antkv"; }
  // The codebook file name of the configuration this method needs: "k-c8b8_v-c8b8_anchor_post.h5"
  // ("k-c8b8_v-c8b8_none_all_post.h5" when trained on every token, anchors included; "..._post_gk.h5" for
  // gain-shape keys, "_gkv" for keys and values, "_rpca" for rotate=pca, "_mtask" for metric=task).
  std::string codebook_file() const;
  // Nominal bits per channel (K and V averaged).
  double nominal_bits() const;
};

// Defaults (ratio, score, key_rope, bits) come from the recipe; errors name the method string.
MethodSpec parse_method(const std::string& text, const Recipe& r);

// Effective bits per channel (K and V averaged) at context length `context`, counting everything stored:
// codes, FP16 anchors with their 32-bit indices (per anchored tensor), the FP16 window, scales/zero points,
// gain-shape norms (fp16 per quantized token and head), and codebooks (with rotate=pca's fp16 mean and d x d basis per
// layer, head and tensor) (fp16 centroids) amortized over the context. include_codebooks = false leaves the codebooks out.
double effective_bits(const MethodSpec& m, int context, int head_dim, bool include_codebooks = true);

}  // namespace antkv
