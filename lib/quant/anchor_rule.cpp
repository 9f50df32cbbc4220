#include "quant/anchor_rule.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "anchor/anchor_scores.h"
#include "core/error.h"

namespace antkv {

void mark_chunk_anchors(const float* score, int n, int KV, double ratio, bool starts_at_zero, uint8_t* keep) {
  for (int h = 0; h < KV; ++h) {
    std::vector<int32_t> picked;
    if (starts_at_zero) {
      picked = select_anchors(score, n, KV, h, ratio);
    } else {  // no sink in this chunk: plain top ceil(ratio * n)
      std::vector<int32_t> idx(static_cast<size_t>(n));
      std::iota(idx.begin(), idx.end(), 0);
      const int m = std::min(n, static_cast<int>(std::ceil(ratio * n)));
      std::partial_sort(idx.begin(), idx.begin() + m, idx.end(), [&](int32_t x, int32_t y) {
        return score[static_cast<size_t>(x) * KV + h] > score[static_cast<size_t>(y) * KV + h];
      });
      picked.assign(idx.begin(), idx.begin() + m);
    }
    for (int32_t t : picked) keep[static_cast<size_t>(t) * KV + h] = 1;
  }
}

std::vector<int64_t> decide_leaving_token(std::vector<uint8_t>& flags, const std::vector<double>& running,
                                          std::vector<int>& count, int kv_heads, int64_t r, int budget) {
  const int KV = kv_heads;
  ANTKV_CHECK(KV > 0 && r >= 0 && static_cast<size_t>(KV) == count.size() &&
                  flags.size() >= static_cast<size_t>(r + 1) * KV && running.size() >= flags.size(),
              "decide_leaving_token: row {} outside the layer's {} rows of {} heads", r, flags.size() / KV, KV);
  std::vector<int64_t> displaced(static_cast<size_t>(KV), -1);
  for (int h = 0; h < KV; ++h) {
    const size_t x = static_cast<size_t>(r) * KV + h;
    if (count[h] < budget) {  // the budget grew: the leaving token fills the new place
      flags[x] = 1, ++count[h];
      continue;
    }
    int64_t weakest = -1;
    for (int64_t t = 1; t < r; ++t) {
      const size_t y = static_cast<size_t>(t) * KV + h;
      if (flags[y] && (weakest < 0 || running[y] < running[static_cast<size_t>(weakest) * KV + h])) weakest = t;
    }
    if (weakest < 0 || !(running[x] > running[static_cast<size_t>(weakest) * KV + h])) continue;
    flags[x] = 1;
    flags[static_cast<size_t>(weakest) * KV + h] = 0;
    displaced[static_cast<size_t>(h)] = weakest;
  }
  return displaced;
}

}  // namespace antkv
