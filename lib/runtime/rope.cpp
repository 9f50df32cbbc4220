#include "runtime/rope.h"

#include <cmath>

namespace antkv {

std::vector<float> rope_inv_freq(int head_dim, double theta, const RopeScaling& s) {
  const int half = head_dim / 2;
  std::vector<float> inv(static_cast<size_t>(half));
  for (int i = 0; i < half; ++i) {
    // transformers: 1.0 / (base ** (arange(0, dim, 2).float() / dim)), all in fp32
    const float expo = static_cast<float>(2 * i) / static_cast<float>(head_dim);
    inv[i] = 1.0f / std::pow(static_cast<float>(theta), expo);
  }
  if (s.type == RopeScaling::Type::kLinear) {
    for (auto& f : inv) f = static_cast<float>(f / s.factor);
  } else if (s.type == RopeScaling::Type::kLlama3) {
    // transformers' _compute_llama3_parameters
    const double low_wavelen = s.original_max_position / s.low_freq_factor;
    const double high_wavelen = s.original_max_position / s.high_freq_factor;
    for (auto& f : inv) {
      const double wavelen = 2.0 * M_PI / f;
      if (wavelen > low_wavelen) {
        f = static_cast<float>(f / s.factor);
      } else if (wavelen >= high_wavelen) {  // medium frequencies: interpolate
        const double smooth = (s.original_max_position / wavelen - s.low_freq_factor) /
                              (s.high_freq_factor - s.low_freq_factor);
        f = static_cast<float>((1.0 - smooth) * f / s.factor + smooth * f);
      }
    }
  }
  return inv;
}

std::vector<float> rope_inv_freq(const ModelConfig& cfg) {
  return rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling);
}

void rope_apply(float* x, int n_tokens, int n_heads, int head_dim, const int32_t* positions,
                const float* inv_freq) {
  const int half = head_dim / 2;
#pragma omp parallel for schedule(static)
  for (int t = 0; t < n_tokens; ++t) {
    for (int i = 0; i < half; ++i) {
      // angle in fp32 as transformers computes (inv_freq @ position), then cos/sin of that value
      const float angle = static_cast<float>(positions[t]) * inv_freq[i];
      const float c = static_cast<float>(std::cos(static_cast<double>(angle)));
      const float sn = static_cast<float>(std::sin(static_cast<double>(angle)));
      for (int h = 0; h < n_heads; ++h) {
        float* xh = x + (static_cast<int64_t>(t) * n_heads + h) * head_dim;
        const float a = xh[i], b = xh[i + half];
        xh[i] = a * c - b * sn;
        xh[i + half] = b * c + a * sn;
      }
    }
  }
}

}  // namespace antkv
