// Anchor scores (design note §2): how much a token's K/V quantization error can disturb attention.
// For one layer, KV head h and its G query heads, over the causal rows i >= j of one window:
//   S_V(j) = sum_g sum_{i>=j} A_gij                                     (attention mass received)
//   S_K(j) = sum_g sum_{i>=j} A_gij |q_gi| |v_j - o_gi| / sqrt(d)       (first-order key sensitivity)
//   AnS(j) = S_K(j) e_K + S_V(j) e_V   (error_bound; e_K, e_V mean error norms of the codebooks, or 1)
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace antkv {

// Inputs of one layer for one window, fp32 row-major, post-RoPE queries and keys (what attention used):
//   q: [T, n_heads, d], k: [T, n_kv_heads, d], v: [T, n_kv_heads, d]
// Outputs: s_k, s_v: [T, n_kv_heads].
struct AnchorScoreArgs {
  const float* q = nullptr;
  const float* k = nullptr;
  const float* v = nullptr;
  int n_tokens = 0;
  int n_heads = 0;
  int n_kv_heads = 0;
  int head_dim = 0;
};

// Reference: materializes each head's full T x T attention matrix, accumulates in double. Small T only.
void anchor_scores_reference(const AnchorScoreArgs& a, float* s_k, float* s_v);
// The CPU path used by calibration: blocked over query rows on Eigen GEMMs (T x T never whole).
void anchor_scores_cpu(const AnchorScoreArgs& a, float* s_k, float* s_v);

enum class AnchorScoreKind { kErrorBound, kAttentionMass, kKeyBound, kRandom, kRecent };
AnchorScoreKind parse_anchor_score_kind(const std::string& s);
const char* anchor_score_kind_name(AnchorScoreKind k);

// The weights (w_K, w_V) of S_K and S_V in the score of KV head `head` for the kinds that attention defines:
// error_bound (e_K[head], e_V[head], or 1 where e_k / e_v is null), attention_mass (0, 1), key_bound (1, 0).
// random and recent are not sums over attention rows: an antkv::Error.
std::pair<float, float> anchor_score_weights(AnchorScoreKind kind, const float* e_k, const float* e_v, int head);
// The same for every KV head: [n_kv_heads][2] = (w_K, w_V), from the codebooks' error norms e_k / e_v ([n_kv_heads]
// each, or empty for 1): the coefficients the GPU caches' running-score kernels read.
std::vector<float> anchor_score_weight_table(AnchorScoreKind kind, const std::vector<float>& e_k,
                                             const std::vector<float>& e_v, int n_kv_heads);

// anchor_score: [T, n_kv_heads] from s_k, s_v ([T, n_kv_heads]); e_k/e_v per KV head ([n_kv_heads]) or
// null for 1. kRandom draws from `seed`; kRecent scores by position (later = higher).
void combine_anchor_scores(AnchorScoreKind kind, const float* s_k, const float* s_v, const float* e_k,
                           const float* e_v, int n_tokens, int n_kv_heads, uint64_t seed, float* anchor_score);

// The ceil(ratio * T) tokens of KV head `head` with the largest scores, token 0 (attention sink) always
// included; returned sorted by position. scores: [T, n_kv_heads].
std::vector<int32_t> select_anchors(const float* scores, int n_tokens, int n_kv_heads, int head, double ratio);

}  // namespace antkv
