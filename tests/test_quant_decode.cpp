// Quantized-KV decode attention and the quantize kernel (kernels/attention/quant_decode.h) against the CPU reference:
// the codes dequantized with the fp16-rounded centroids (vq_decode), concatenated with the FP16 anchors and
// window, through cpu::attention (one query row per head). Fresh random inputs (the seed is printed on
// failure), batch 3 with different per-sequence counts (odd, not multiples of the 1024-slot tile, one
// sequence with no quantized tokens), GQA 1/2/4, every configuration at head_dim 128 and 64, code slots past
// n_quant poisoned with 0xFF bytes and FP16 slots past the counts with NaN.
//
// Tolerances (max |gpu - ref| / max |ref|, test::max_rel_error). Both sides see the same fp16 K/V, the same
// fp16-rounded centroids and the same bf16 q. What differs:
//  - the output is bf16 (one rounding, <= 2^-9 relative);
//  - the quantized tokens' weights are dithered u32 fixed point, the largest of a tile >= 2^14, so each
//    weight carries an unbiased error <= 2^-14 of the tile's largest weight; these average over many tokens;
//  - fp32 LUT sums vs the CPU's dot products: a few ulp of the score;
//  - fp16 LUT (c16b12, lut_half): each table entry rounded to fp16 (2^-11 relative, |entry| < ~2 here), the
//    score off by < ~1e-3 (log2 units), i.e. weights off by < ~0.1%.
// Output: 1e-2 (the bf16 rounding dominates; flash_decode's bound). LSE (fp32, no output rounding): 3e-4 with
// fp32 LUTs, 3e-3 with fp16 LUTs (relative to max |LSE|, itself ~ log(T) ~ 5-10 here).
// The quantize kernel sums squared differences channel by channel without FMA contraction, as vq_encode
// does, so its codes equal the CPU's; a differing code is accepted only at an exact-arithmetic near tie
// (distances within 1e-5 relative).
#include "test_support.h"
#include "gpu_test_support.h"

// The whole file needs the CUDA build: even its host-side checks live in antkv_cuda.
#ifdef ANTKV_HAVE_CUDA
#include "kernels/attention/quant_decode.h"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <numeric>
#include <optional>
#include <random>
#include <vector>

#include "core/error.h"

using antkv::cuda::VqKernelConfig;

namespace {

const auto& kAllConfigs = antkv::cuda::kVqKernelConfigs;

}  // namespace

TEST_CASE("quant: pack/unpack of b-bit codes round-trips with the swizzled group order", "[quant]") {
  std::mt19937 rng(1234);
  for (VqKernelConfig cfg : kAllConfigs)
    for (int d : {128, 64}) {
      const int ng = antkv::cuda::vq_groups(d, cfg), rb = antkv::cuda::vq_record_bytes(d, cfg);
      const int k = antkv::cuda::vq_centroid_count(cfg), nb = antkv::cuda::vq_kernel_config_info(cfg).b;
      INFO(fmt::format("{} d {}", antkv::cuda::vq_kernel_config_info(cfg).name, d));
      CHECK(rb * 8 == ng * nb);
      const int n = 37;
      std::vector<int32_t> codes(size_t(n) * ng), back(codes.size(), -1);
      std::uniform_int_distribution<int> ud(0, k - 1);
      for (auto& c : codes) c = ud(rng);
      codes[0] = k - 1;  // extremes
      codes[1] = 0;
      for (int64_t first : {int64_t(0), int64_t(5), int64_t(1000003)}) {
        std::vector<uint8_t> packed(size_t(n) * rb, 0xAB);
        antkv::cuda::pack_codes(codes.data(), n, first, d, cfg, packed.data());
        antkv::cuda::unpack_codes(packed.data(), n, first, d, cfg, back.data());
        CHECK(back == codes);
        // the layout itself: the i-th b-bit field of slot t's record is the code of group i ^ (t mod NG)
        for (int r = 0; r < n; ++r)
          for (int i = 0; i < ng; ++i) {
            int32_t field = 0;
            for (int bit = 0; bit < nb; ++bit) {
              const int at = i * nb + bit;
              field |= int32_t((packed[size_t(r) * rb + at / 8] >> (at % 8)) & 1) << bit;
            }
            REQUIRE(field == codes[size_t(r) * ng + (i ^ int((first + r) % ng))]);
          }
      }
      // one record unpacked alone at its own slot gives the same codes
      std::vector<uint8_t> packed(size_t(n) * rb);
      antkv::cuda::pack_codes(codes.data(), n, 7, d, cfg, packed.data());
      std::vector<int32_t> one(ng);
      antkv::cuda::unpack_codes(packed.data() + 3 * rb, 1, 10, d, cfg, one.data());
      CHECK(std::equal(one.begin(), one.end(), codes.begin() + 3 * ng));
      // codes outside [0, 2^b) are errors
      std::vector<int32_t> bad(ng, 0);
      bad[ng - 1] = k;
      CHECK_THROWS_WITH(antkv::cuda::pack_codes(bad.data(), 1, 0, d, cfg, packed.data()),
                        Catch::Contains(fmt::format("code {} of token 0 is outside [0, {})", k, k)));
      bad[ng - 1] = -1;
      CHECK_THROWS_WITH(antkv::cuda::pack_codes(bad.data(), 1, 0, d, cfg, packed.data()),
                        Catch::Contains(fmt::format("code -1 of token 0 is outside [0, {})", k)));
    }
  // bits of a 6-bit record by hand: slot 0, groups 0..7 = 1, 2, 3, ..., 8 (head_dim 128, c16b6)
  std::vector<int32_t> c6 = {1, 2, 3, 4, 5, 6, 7, 8};
  std::vector<uint8_t> r6(6);
  antkv::cuda::pack_codes(c6.data(), 1, 0, 128, VqKernelConfig::kC16B6, r6.data());
  uint64_t v = 0;
  for (int i = 0; i < 6; ++i) v |= uint64_t(r6[i]) << (8 * i);
  for (int i = 0; i < 8; ++i) CHECK(int((v >> (6 * i)) & 63) == i + 1);
  // slot 3: the record starts with group 3's code
  antkv::cuda::pack_codes(c6.data(), 1, 3, 128, VqKernelConfig::kC16B6, r6.data());
  CHECK((r6[0] & 63) == 4);
  CHECK_THROWS_WITH(antkv::cuda::check_vq_shape(96, VqKernelConfig::kC8B8), Catch::Contains("head_dim 96 is not supported"));
  CHECK_THROWS_WITH(antkv::cuda::parse_vq_kernel_config("c8b12"), Catch::Contains("unknown VQ configuration 'c8b12'"));
  CHECK(antkv::cuda::parse_vq_kernel_config("c16b12") == VqKernelConfig::kC16B12);
}

#ifdef ANTKV_HAVE_CUDA

#include <cuda_fp16.h>

#include "kernels/common/cuda_check.h"
#include "kernels/common/device_buffer.h"
#include "kernels/attention/flash_attention.h"
#include "kernels/runtime/ops.h"
#include "quant/vq.h"
#include "runtime/rope.h"
#include "runtime/cpu_ops.h"

using namespace antkv;
using cuda::bf16;
using cuda::DeviceBuffer;
using test::f2bf;
using test::bf2f;
using test::fresh_seed;
using test::upload;
using test::download;
using test::download_bf;

namespace {


float round_f16(float f) { return __half2float(__float2half_rn(f)); }
__half nan_f16() {
  __half_raw r;
  r.x = 0x7e00;
  return __half(r);
}

DeviceBuffer<__half> upload_f16(const std::vector<float>& h) {
  std::vector<__half> x(h.size());
  for (size_t i = 0; i < h.size(); ++i) x[i] = std::isnan(h[i]) ? nan_f16() : __float2half_rn(h[i]);
  return upload(x);
}
double rel_err(const std::vector<float>& a, const std::vector<float>& b) {
  REQUIRE(a.size() == b.size());
  return test::max_rel_error(a.data(), b.data(), a.size());
}

struct SeqCounts {
  int n_quant, n_anchor, n_window;
};

struct QCase {
  VqKernelConfig cfg;
  int d, heads, kv_heads;
  std::vector<SeqCounts> seqs;
  float q_scale;     // spread of the scores (1: about uniform attention; 4: peaked)
  bool sorted;       // quantized stream sorted by increasing score (forces a rescale at every tile)
  bool lut_half;
  bool pre_rope = false;  // pre-RoPE code stream: keys rotated to code_pos (random positions up to ~2^20)
  int coded = 0;          // the coded transform: | 1 key scales (gain=k), | 2 value scales (gain=kv), | 4 rotated bases
  std::optional<VqKernelConfig> vcfg;  // the values' configuration when it differs from the keys' (cfg)
};

// Case n of a configuration sweep: 2 KV heads of G query heads each, three sequences of odd counts (the second
// spans several tiles from `second` quantized tokens on, the third has no quantized tokens), peaked scores every
// other case; no sorting, fp32 tables, post-RoPE and no coded transform until the caller sets them.
QCase sweep_case(VqKernelConfig cfg, int d, int G, int n, int second = 2001) {
  QCase c;
  c.cfg = cfg;
  c.d = d;
  c.kv_heads = 2;
  c.heads = 2 * G;
  c.seqs = {{1 + 2 * (n % 7) + 1023, 11, 128}, {second + n, 31, 77}, {0, 1, 5}};
  c.q_scale = (n % 2) ? 4.f : 1.f;
  c.sorted = false;
  c.lut_half = false;
  return c;
}

// The LLaMA-3-8B-shaped group (c8b8, head_dim 128, 32 query / 8 KV heads) with a long stream, peaked and sorted
// scores; fp32 tables, post-RoPE and no coded transform until the caller sets them.
QCase llama8b_case() {
  return {VqKernelConfig::kC8B8, 128, 32, 8, {{9001, 90, 128}, {1025, 10, 128}, {5, 1, 1}}, 4.f, true, false};
}

// Runs one case through every split plan and compares with the CPU reference.
void run_case(const QCase& c, std::mt19937& rng) {
  const auto info = cuda::vq_kernel_config_info(c.cfg);
  const VqKernelConfig vconf = c.vcfg.value_or(c.cfg);
  const int B = static_cast<int>(c.seqs.size());
  const int d = c.d, H = c.heads, Hkv = c.kv_heads, G = H / Hkv;
  // each tensor's groups, centroids, channels per group and record bytes
  const int ng = cuda::vq_groups(d, c.cfg), K = cuda::vq_centroid_count(c.cfg), cc = info.c;
  const int rb = cuda::vq_record_bytes(d, c.cfg);
  const int vng = cuda::vq_groups(d, vconf), vK = cuda::vq_centroid_count(vconf),
            vcc = cuda::vq_kernel_config_info(vconf).c, vrb = cuda::vq_record_bytes(d, vconf);
  // the dequantize-dot kernel with run-time widths: fp32 scores as the pre-RoPE kernel's
  const bool run_time_widths = vconf != c.cfg || (c.coded && !cuda::vq_uses_lut(c.cfg));
  int max_q = 0, max_a = 0, max_w = 0;
  for (const auto& s : c.seqs) {
    max_q = std::max(max_q, s.n_quant);
    max_a = std::max(max_a, s.n_anchor);
    max_w = std::max(max_w, s.n_window);
  }
  const int qcap = max_q + 41, acap = max_a + 3, wcap = max_w + 2;
  INFO(fmt::format("{}{} d {} heads {}/{} q_scale {} sorted {} lut_half {} pre_rope {} coded {} counts {}/{}/{} {}/{}/{} {}/{}/{}",
                   info.name, vconf != c.cfg ? std::string(" / ") + cuda::vq_kernel_config_info(vconf).name : "", d, H, Hkv, c.q_scale, c.sorted, c.lut_half, c.pre_rope, c.coded, c.seqs[0].n_quant, c.seqs[0].n_anchor,
                   c.seqs[0].n_window, c.seqs[1].n_quant, c.seqs[1].n_anchor, c.seqs[1].n_window, c.seqs[2].n_quant,
                   c.seqs[2].n_anchor, c.seqs[2].n_window));
  std::normal_distribution<float> nd(0.f, 1.f);
  auto randn = [&](size_t n, float s) {
    std::vector<float> v(n);
    for (auto& x : v) x = round_f16(nd(rng) * s);
    return v;
  };
  // codebooks (fp16-rounded), q (bf16-rounded)
  const auto kcent = randn(size_t(Hkv) * ng * K * cc, 1.f), vcent = randn(size_t(Hkv) * vng * vK * vcc, 1.f);
  std::vector<float> q(size_t(B) * H * d);
  for (auto& x : q) x = bf2f(f2bf(nd(rng) * c.q_scale));
  const float scale = 1.0f / std::sqrt(float(d));
  // the coded transform: per KV head a basis R and mean per tensor (fp16-valued, as the codebooks'; the algebra
  // does not need R orthogonal), per code slot fp16 scales 2^U(-2, 2) (every 17th value scale 0: the token then
  // adds only p * mean); slots past n_quant NaN
  const bool kgain = c.coded & 1, vgain = c.coded & 2, rot = c.coded & 4;
  std::vector<float> krot, vrot, kmean, vmean;
  if (rot) {
    krot = randn(size_t(Hkv) * d * d, 1.f / std::sqrt(float(d))), vrot = randn(krot.size(), 1.f / std::sqrt(float(d)));
    kmean = randn(size_t(Hkv) * d, 0.5f), vmean = randn(size_t(Hkv) * d, 0.5f);
  }
  std::vector<float> kscale(size_t(B) * Hkv * qcap, NAN), vscale(kscale.size(), NAN);
  std::uniform_real_distribution<float> ulog(-2.f, 2.f);
  // rows [n, stride] of one head: row <- mean + R^T (s_t row) (R, mean null: identity, zero; s null: 1)
  auto transform = [&](float* rows, int n, int64_t stride, const float* R, const float* mean, const float* sc) {
    std::vector<double> u(d);
    for (int t = 0; t < n; ++t) {
      float* r = rows + t * stride;
      for (int i = 0; i < d; ++i) u[i] = double(r[i]) * (sc ? sc[t] : 1.f);
      for (int e = 0; e < d; ++e) {
        double y = u[e];
        if (R) {
          y = mean[e];
          for (int i = 0; i < d; ++i) y += double(R[size_t(i) * d + e]) * u[i];
        }
        r[e] = float(y);
      }
    }
  };
  // per sequence and KV head: codes (natural order) [n_quant, ng] for K and V, anchors, window
  std::uniform_int_distribution<int> ud(0, K - 1), vud(0, vK - 1);
  std::vector<uint8_t> kcodes(size_t(B) * Hkv * qcap * rb, 0xFF), vcodes(size_t(B) * Hkv * qcap * vrb, 0xFF);
  std::vector<float> ak(size_t(B) * Hkv * acap * d, NAN), av(ak.size(), NAN), wk(size_t(B) * Hkv * wcap * d, NAN),
      wv(wk.size(), NAN);
  std::vector<int32_t> apos(size_t(B) * Hkv * acap, -1);
  std::vector<int32_t> cpos(size_t(B) * Hkv * qcap, -1);  // pre_rope: positions of the code slots
  const auto inv_freq = rope_inv_freq(d, 500000.0, RopeScaling{});
  std::uniform_int_distribution<int> upos(0, (1 << 20) - 1);
  std::vector<float> want(size_t(B) * H * d), want_lse(size_t(B) * H);
  std::vector<float> want_logits(size_t(B) * H * (acap + wcap), NAN);  // entries past n_anchor + n_window: not written
  for (int b = 0; b < B; ++b) {
    const auto& s = c.seqs[b];
    const int T = s.n_quant + s.n_anchor + s.n_window;
    std::vector<float> kref(size_t(T) * Hkv * d), vref(kref.size());
    for (int h = 0; h < Hkv; ++h) {
      std::vector<int32_t> kc(size_t(s.n_quant) * ng), vc(size_t(s.n_quant) * vng);
      for (auto& x : kc) x = ud(rng);
      for (auto& x : vc) x = vud(rng);
      VqHeadCodebooks kcb{kcent.data() + size_t(h) * ng * K * cc, ng, K, cc};
      VqHeadCodebooks vcb{vcent.data() + size_t(h) * vng * vK * vcc, vng, vK, vcc};
      if (c.sorted && s.n_quant > 0) {  // order the stream by the first query head's score, increasing
        std::vector<float> kd(size_t(s.n_quant) * d);
        vq_decode(kcb, kc.data(), s.n_quant, d, kd.data());
        const float* qh = q.data() + (size_t(b) * H + size_t(h) * G) * d;
        std::vector<float> sc(s.n_quant);
        for (int t = 0; t < s.n_quant; ++t) sc[t] = std::inner_product(qh, qh + d, kd.data() + size_t(t) * d, 0.f);
        std::vector<int> order(s.n_quant);
        std::iota(order.begin(), order.end(), 0);
        std::sort(order.begin(), order.end(), [&](int x, int y) { return sc[x] < sc[y]; });
        std::vector<int32_t> kc2(kc.size()), vc2(vc.size());
        for (int t = 0; t < s.n_quant; ++t) {
          std::copy_n(kc.begin() + size_t(order[t]) * ng, ng, kc2.begin() + size_t(t) * ng);
          std::copy_n(vc.begin() + size_t(order[t]) * vng, vng, vc2.begin() + size_t(t) * vng);
        }
        kc.swap(kc2);
        vc.swap(vc2);
      }
      cuda::pack_codes(kc.data(), s.n_quant, 0, d, c.cfg, kcodes.data() + (size_t(b) * Hkv + h) * qcap * rb);
      cuda::pack_codes(vc.data(), s.n_quant, 0, d, vconf, vcodes.data() + (size_t(b) * Hkv + h) * qcap * vrb);
      // reference rows: quantized tokens, then anchors, then window (order does not matter to attention)
      vq_decode(kcb, kc.data(), s.n_quant, int64_t(Hkv) * d, kref.data() + size_t(h) * d);
      vq_decode(vcb, vc.data(), s.n_quant, int64_t(Hkv) * d, vref.data() + size_t(h) * d);
      if (c.coded) {  // pre-RoPE keys: mapped back (mean + R^T (s u)) before their rotation
        float* ks = kscale.data() + (size_t(b) * Hkv + h) * qcap;
        float* vs = vscale.data() + (size_t(b) * Hkv + h) * qcap;
        for (int t = 0; t < s.n_quant; ++t) {
          ks[t] = kgain ? round_f16(std::exp2(ulog(rng))) : 1.f;
          vs[t] = vgain ? (t % 17 == 5 ? 0.f : round_f16(std::exp2(ulog(rng)))) : 1.f;
        }
        const size_t rh = size_t(h) * d * d, mh = size_t(h) * d;
        transform(kref.data() + size_t(h) * d, s.n_quant, int64_t(Hkv) * d, rot ? krot.data() + rh : nullptr,
                  rot ? kmean.data() + mh : nullptr, kgain ? ks : nullptr);
        transform(vref.data() + size_t(h) * d, s.n_quant, int64_t(Hkv) * d, rot ? vrot.data() + rh : nullptr,
                  rot ? vmean.data() + mh : nullptr, vgain ? vs : nullptr);
      }
      if (c.pre_rope && s.n_quant > 0) {  // the stream's keys are pre-RoPE: the reference rotates them
        std::vector<float> kh(size_t(s.n_quant) * d);
        std::vector<int32_t> pos(s.n_quant);
        for (int t = 0; t < s.n_quant; ++t) {
          pos[t] = upos(rng);
          cpos[(size_t(b) * Hkv + h) * qcap + t] = pos[t];
          std::copy_n(kref.begin() + (size_t(t) * Hkv + h) * d, d, kh.begin() + size_t(t) * d);
        }
        rope_apply(kh.data(), s.n_quant, 1, d, pos.data(), inv_freq.data());
        for (int t = 0; t < s.n_quant; ++t)
          std::copy_n(kh.begin() + size_t(t) * d, d, kref.begin() + (size_t(t) * Hkv + h) * d);
      }
      for (int j = 0; j < s.n_anchor + s.n_window; ++j) {
        const bool anchor = j < s.n_anchor;
        const size_t src = anchor ? ((size_t(b) * Hkv + h) * acap + j) * d : ((size_t(b) * Hkv + h) * wcap + (j - s.n_anchor)) * d;
        auto& kk = anchor ? ak : wk;
        auto& vv = anchor ? av : wv;
        for (int e = 0; e < d; ++e) {
          kk[src + e] = round_f16(nd(rng));
          vv[src + e] = round_f16(nd(rng));
        }
        if (anchor) apos[(size_t(b) * Hkv + h) * acap + j] = 3 * j;
        const size_t dst = (size_t(s.n_quant + j) * Hkv + h) * d;
        std::copy_n(kk.begin() + src, d, kref.begin() + dst);
        std::copy_n(vv.begin() + src, d, vref.begin() + dst);
      }
    }
    for (int hq = 0; hq < H; ++hq)  // fp16_logits: the scaled score of each FP16 token (anchors, then window)
      for (int f = 0; f < s.n_anchor + s.n_window; ++f) {
        const float* qh = q.data() + (size_t(b) * H + hq) * d;
        const float* kr = kref.data() + (size_t(s.n_quant + f) * Hkv + hq / G) * d;
        double dot = 0;
        for (int e = 0; e < d; ++e) dot += double(qh[e]) * kr[e];
        want_logits[(size_t(b) * H + hq) * (acap + wcap) + f] = float(dot * scale);
      }
    std::vector<float> o(size_t(H) * d), l(H);
    cpu::attention(q.data() + size_t(b) * H * d, kref.data(), vref.data(), o.data(), l.data(), 1, T, H, Hkv, d, scale);
    std::copy(o.begin(), o.end(), want.begin() + size_t(b) * H * d);
    std::copy(l.begin(), l.end(), want_lse.begin() + size_t(b) * H);
  }

  std::vector<uint16_t> qb(q.size());
  for (size_t i = 0; i < q.size(); ++i) qb[i] = f2bf(q[i]);
  auto dq = upload(qb);
  auto dkc = upload(kcodes), dvc = upload(vcodes);
  auto dkcent = upload_f16(kcent), dvcent = upload_f16(vcent);
  auto dak = upload_f16(ak), dav = upload_f16(av), dwk = upload_f16(wk), dwv = upload_f16(wv);
  auto dapos = upload(apos);
  auto dcpos = upload(cpos);
  auto dfreq = upload(inv_freq);
  std::vector<int32_t> nq(B), na(B), nw(B);
  for (int b = 0; b < B; ++b) nq[b] = c.seqs[b].n_quant, na[b] = c.seqs[b].n_anchor, nw[b] = c.seqs[b].n_window;
  auto dnq = upload(nq), dna = upload(na), dnw = upload(nw);
  DeviceBuffer<bf16> out(q.size());
  DeviceBuffer<float> lse(size_t(B) * H);
  DeviceBuffer<float> logits(want_logits.size());

  cuda::QuantDecodeParams p;
  p.config = c.cfg;
  p.value_config = c.vcfg;
  p.batch = B;
  p.n_heads = H;
  p.n_kv_heads = Hkv;
  p.head_dim = d;
  p.q = reinterpret_cast<const bf16*>(dq.get());
  p.k_codes = dkc.get();
  p.v_codes = dvc.get();
  p.k_centroids = dkcent.get();
  p.v_centroids = dvcent.get();
  p.anchor_k = dak.get();
  p.anchor_v = dav.get();
  p.anchor_pos = dapos.get();
  p.window_k = dwk.get();
  p.window_v = dwv.get();
  p.n_quant = dnq.get();
  p.n_anchor = dna.get();
  p.n_window = dnw.get();
  p.quant_capacity = qcap;
  p.anchor_capacity = acap;
  p.window_capacity = wcap;
  p.out = out.get();
  p.lse = lse.get();
  p.fp16_logits = logits.get();
  p.scale = scale;
  p.lut_half = c.lut_half;
  p.pre_rope = c.pre_rope;
  p.code_pos = c.pre_rope ? dcpos.get() : nullptr;
  p.inv_freq = c.pre_rope ? dfreq.get() : nullptr;
  // the coded transform's device side: R_k q and q . k_mean per (sequence, head) from the bf16-valued q (as the
  // compressed cache's query_rotate_kernel computes them), scales, R_v and v_mean
  std::vector<float> qrot(q.size()), qmean(size_t(B) * H);
  if (rot)
    for (int b = 0; b < B; ++b)
      for (int hq = 0; hq < H; ++hq) {
        const float* qh = q.data() + (size_t(b) * H + hq) * d;
        const float* R = krot.data() + size_t(hq / G) * d * d;
        double dm = 0;
        for (int i = 0; i < d; ++i) {
          double y = 0;
          for (int e = 0; e < d; ++e) y += double(R[size_t(i) * d + e]) * qh[e];
          qrot[(size_t(b) * H + hq) * d + i] = float(y);
          dm += double(qh[i]) * kmean[size_t(hq / G) * d + i];
        }
        qmean[size_t(b) * H + hq] = float(dm);
      }
  auto dqrot = upload(qrot), dqmean = upload(qmean);
  auto dks = upload_f16(kscale), dvs = upload_f16(vscale);
  auto dvrot = upload(rot ? vrot : std::vector<float>(1)), dvmean = upload(rot ? vmean : std::vector<float>(1));
  auto dkrot = upload(rot ? krot : std::vector<float>(1)), dkmean = upload(rot ? kmean : std::vector<float>(1));
  if (rot && c.pre_rope) p.k_rotation = dkrot.get(), p.k_mean = dkmean.get();  // R_k row-major, as krot
  else if (rot) p.q_rot = dqrot.get(), p.q_mean = dqmean.get();
  if (rot) p.v_rotation = dvrot.get(), p.v_mean = dvmean.get();
  if (kgain) p.k_scale = dks.get();
  if (vgain) p.v_scale = dvs.get();
  REQUIRE(p.coded_transform() == (c.coded != 0));
  const bool half_lut = !c.pre_rope && !run_time_widths && (c.lut_half || c.cfg == VqKernelConfig::kC16B12);
  const int tile = cuda::quant_decode_tile();
  // the planner's split, one split for everything, and one split per tile
  const auto auto_plan = cuda::plan_quant_decode(B, H, Hkv, d, c.cfg, max_q, c.lut_half, 1, c.coded != 0);
  std::vector<std::pair<int, int>> plans = {{auto_plan.n_splits, auto_plan.split_len},
                                            {1, std::max(1, (max_q + tile - 1) / tile) * tile},
                                            {std::max(1, (max_q + tile - 1) / tile), tile}};
  for (auto [ns, sl] : plans) {
    DeviceBuffer<float> ws(cuda::quant_decode_workspace_floats(B, H, d, ns, c.coded != 0));
    cuda::fill_bf16(out.get(), int64_t(out.size()), NAN, nullptr);
    cuda::fill_f32(lse.get(), int64_t(lse.size()), NAN, nullptr);
    cuda::fill_f32(ws.get(), int64_t(ws.size()), NAN, nullptr);
    cuda::fill_f32(logits.get(), int64_t(logits.size()), NAN, nullptr);
    p.workspace = ws.get();
    p.workspace_floats = int64_t(ws.size());
    p.n_splits = ns;
    p.split_len = sl;
    cuda::quant_decode(p, nullptr);
    const double eo = rel_err(download_bf(out.get(), out.size()), want);
    const double el = rel_err(download(lse.get(), lse.size()), want_lse);
    INFO(fmt::format("{} splits of {}: output error {:.3g}, LSE error {:.3g}", ns, sl, eo, el));
    // outputs are bf16 (2^-9 relative) of an fp32 softmax: 1e-2 of max |out|; the LSE carries the score
    // error: fp32 lookup tables / dequantize-rotate-dot in fp32 (sincosf within 2 ulp of the reference's
    // double sincos) 3e-4, fp16 lookup tables (2^-11 per entry, NG entries summed) 3e-3
    // the coded transform: the same bounds (the scales are exact fp16 on both sides, the rotations fp32 on the
    // GPU and double in the reference: a few ulp; scores up to 4x larger with key scales, whose fp16 table
    // entries then carry 4x the absolute rounding: 1.2e-2 for the LSE with fp16 tables and key scales)
    const std::string tag = (c.coded ? fmt::format(" coded {}", c.coded) : "") + (run_time_widths ? " run-time widths" : "");
    CHECK_MEASURED(c.pre_rope ? "test_quant_decode: pre-RoPE output rel err" + tag
                              : "test_quant_decode: output rel err" + tag,
                   eo, 1e-2);
    CHECK_MEASURED(c.pre_rope          ? "test_quant_decode: pre-RoPE LSE rel err" + tag
                   : run_time_widths ? "test_quant_decode: dequantize-dot LSE rel err" + tag
                   : half_lut ? "test_quant_decode: LSE rel err (fp16 lookup tables)" + tag
                              : "test_quant_decode: LSE rel err (fp32 lookup tables)" + tag,
                   el, half_lut ? (kgain ? 1.2e-2 : 3e-3) : 3e-4);
    // fp16_logits: an fp32 dot of bf16 q and fp16 k (d products; the reference sums in double): 1e-5 of the
    // largest |score|; slots past the counts keep the NaN they were filled with (never written)
    const auto got_logits = download(logits.get(), logits.size());
    double worst = 0, top = 1e-30;
    int wrong_written = 0;
    for (size_t i = 0; i < got_logits.size(); ++i) {
      if (std::isnan(want_logits[i])) {
        wrong_written += !std::isnan(got_logits[i]);
        continue;
      }
      worst = std::max(worst, double(std::fabs(got_logits[i] - want_logits[i])));
      top = std::max(top, double(std::fabs(want_logits[i])));
    }
    INFO(fmt::format("fp16_logits: max error {:.3g} of max |score| {:.3g}", worst, top));
    test::report_measured(c.pre_rope ? "test_quant_decode: pre-RoPE fp16_logits max err / max |score|"
                                     : "test_quant_decode: fp16_logits max err / max |score|",
                          worst / top, 1e-5);
    CHECK(worst <= 1e-5 * top);
    CHECK(wrong_written == 0);
  }
}

}  // namespace

TEST_CASE("GPU quant decode: every configuration, GQA 1/2/4, batch 3, equals the dequantized CPU reference",
          "[gpu][quant]") {
  SKIP_WITHOUT_GPU();
  const uint32_t seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937 rng(seed);
  int n = 0;
  for (VqKernelConfig cfg : kAllConfigs)
    for (int d : {128, 64})
      for (int G : {1, 2, 4}) {
        QCase c = sweep_case(cfg, d, G, n, 3001);
        c.sorted = (n % 3) == 0;
        run_case(c, rng);
        ++n;
      }
  // fp16 lookup tables for c8b8; a LLaMA-3-8B-shaped group (32/8 heads) with a long sorted stream
  run_case({VqKernelConfig::kC8B8, 128, 8, 2, {{4097, 41, 128}, {333, 3, 17}, {0, 0, 1}}, 1.f, false, true}, rng);
  run_case({VqKernelConfig::kC8B8, 128, 2, 2, {{2049, 21, 128}, {1, 0, 0}, {77, 1, 2}}, 4.f, true, true}, rng);
  run_case(llama8b_case(), rng);
}

// gain= and rotate=pca (QuantDecodeParams q_rot .. v_mean): every lookup-table configuration, head_dim 128 and 64,
// GQA 1/4/8, each combination of key scales, value scales (with zeros) and rotated bases, against the reference
// whose quantized rows are mean + R^T (s u). Measured on an H100 (2026-12-07): output 4.9e-3, LSE 4.8e-4 (fp16
// tables with key scales) and 4.7e-7 (fp32 tables); compute-sanitizer racecheck and memcheck clean.
TEST_CASE("GPU quant decode: per-token scales and rotated bases (gain=, rotate=pca) equal the transformed CPU reference",
          "[gpu][quant]") {
  SKIP_WITHOUT_GPU();
  const uint32_t seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937 rng(seed);
  int n = 0;
  for (VqKernelConfig cfg : kAllConfigs) {
    if (!cuda::vq_uses_lut(cfg)) continue;
    for (int d : {128, 64})
      for (int G : {1, 4, 8}) {
        QCase c = sweep_case(cfg, d, G, n);
        c.sorted = (n % 3) == 0;
        c.lut_half = cfg == VqKernelConfig::kC8B8 && (n % 2) == 0;
        c.coded = std::array<int, 5>{1, 3, 4, 7, 6}[n % 5];
        run_case(c, rng);
        ++n;
      }
  }
  // the LLaMA-3-8B-shaped group with every option, fp16 tables
  QCase big = llama8b_case();
  big.lut_half = true;
  big.coded = 7;
  run_case(big, rng);
}

// Keys and values of different configurations (QuantDecodeParams::value_config: the dequantize-dot kernel with each
// tensor's widths read at run time, 6- and 12-bit codes included), and the coded transform at c2b8 / c4b8 (the same
// kernel): every ordered pair of configurations, head_dim 128 and 64 in turn, GQA 1/4/8, post- and pre-RoPE keys,
// each combination of scales and bases; odd counts, slots past the counts poisoned (NaN, 0xFF codes).
// Tolerances: run_case's dequantize-dot bounds (fp32 scores, as the pre-RoPE kernel's).
TEST_CASE("GPU quant decode: keys and values of different configurations, and gain= / rotate=pca at c2b8 / c4b8, equal "
          "the CPU reference (dequantize-dot with run-time widths)",
          "[gpu][quant]") {
  SKIP_WITHOUT_GPU();
  const uint32_t seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937 rng(seed);
  int n = 0;
  for (VqKernelConfig kc : kAllConfigs)
    for (VqKernelConfig vc : kAllConfigs) {
      if (kc == vc) continue;
      QCase c = sweep_case(kc, n % 2 ? 64 : 128, std::array<int, 3>{1, 4, 8}[n % 3], n, 1025);
      c.vcfg = vc;
      c.sorted = (n % 4) == 0;
      c.pre_rope = (n % 3) == 1;
      c.coded = std::array<int, 5>{0, 1, 3, 4, 7}[n % 5];
      run_case(c, rng);
      ++n;
    }
  for (VqKernelConfig cfg : {VqKernelConfig::kC4B8, VqKernelConfig::kC2B8})
    for (int d : {128, 64})
      for (bool pre : {false, true}) {
        QCase c = sweep_case(cfg, d, 4, n, 1025);
        c.pre_rope = pre;
        c.coded = std::array<int, 4>{7, 1, 6, 3}[n % 4];
        run_case(c, rng);
        ++n;
      }
  // the LLaMA-3-8B-shaped group: 1-bit keys, 2-bit values with every option, long stream
  QCase big = llama8b_case();
  big.coded = 7;
  big.vcfg = VqKernelConfig::kC4B8;
  run_case(big, rng);
}

TEST_CASE("GPU quant decode: pre-RoPE keys (dequantize, rotate at code_pos, dot) equal the rotated CPU reference", "[gpu][quant]") {
  SKIP_WITHOUT_GPU();
  const uint32_t seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937 rng(seed);
  int n = 0;
  for (VqKernelConfig cfg : kAllConfigs)
    for (int d : {128, 64})
      for (int G : {1, 4}) {
        QCase c = sweep_case(cfg, d, G, n);
        c.pre_rope = true;
        run_case(c, rng);
        ++n;
      }
}

// gain= and rotate=pca with pre-RoPE keys (QuantDecodeParams k_rotation, k_mean, k_scale, v_scale, v_rotation,
// v_mean): the dequantize-rotate-dot kernel maps each coded key back (k_mean + R_k^T (ks u)) before rotating it to
// code_pos; the reference's quantized keys are mean + R^T (s u), then RoPE. Every lookup-table configuration, head_dim
// 128 and 64, GQA 1/4/8, each combination of key scales, value scales (with zeros) and bases; odd counts, slots past
// the counts poisoned. Tolerances: run_case's pre-RoPE bounds (fp32 throughout: the basis product in fp32 against the
// reference's double, a few ulp of scores up to 4x larger with key scales).
TEST_CASE("GPU quant decode: pre-RoPE keys with per-token scales and bases (gain=, rotate=pca, key_rope=pre) equal the "
          "transformed, rotated CPU reference",
          "[gpu][quant]") {
  SKIP_WITHOUT_GPU();
  const uint32_t seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937 rng(seed);
  int n = 0;
  for (VqKernelConfig cfg : kAllConfigs) {
    if (!cuda::vq_uses_lut(cfg)) continue;
    for (int d : {128, 64})
      for (int G : {1, 4, 8}) {
        QCase c = sweep_case(cfg, d, G, n);
        c.pre_rope = true;
        c.coded = std::array<int, 5>{7, 1, 3, 4, 6}[n % 5];
        run_case(c, rng);
        ++n;
      }
  }
  // the LLaMA-3-8B-shaped group with every option, unsorted
  QCase big = llama8b_case();
  big.sorted = false;
  big.pre_rope = true;
  big.coded = 7;
  run_case(big, rng);
}

// A workspace sized by quant_decode_max_splits holds every plan of up to that many sequences and tokens: a
// shorter stream can get more splits than a longer one (the split length is rounded up to whole tiles).
TEST_CASE("GPU quant decode: quant_decode_max_splits bounds every plan", "[gpu][quant]") {
  SKIP_WITHOUT_GPU();
  for (const auto cfg : {VqKernelConfig::kC8B8, VqKernelConfig::kC16B8, VqKernelConfig::kC2B8})
    for (int B : {1, 2, 3, 7, 16, 64}) {
      for (int64_t cap : {int64_t{1000}, int64_t{131086}, int64_t{1} << 20, int64_t{15805237}}) {
        const int bound = cuda::quant_decode_max_splits(B, 32, 8, 128, cfg, cap);
        for (int64_t len = 0; len <= cap; len += std::max<int64_t>(1, cap / 997)) {
          const auto plan = cuda::plan_quant_decode(B, 32, 8, 128, cfg, len);
          REQUIRE(plan.n_splits <= bound);
        }
      }
    }
}

TEST_CASE("GPU quant decode: closed set and bad counts", "[gpu][quant]") {
  SKIP_WITHOUT_GPU();
  DeviceBuffer<uint8_t> codes(1 << 16);
  DeviceBuffer<__half> cent(size_t(2) * 16 * 4096 * 16), fp(1 << 16);
  DeviceBuffer<uint16_t> q(1024), out(1024);
  std::vector<int32_t> one = {1};
  auto dnq = upload(std::vector<int32_t>{5000}), dna = upload(std::vector<int32_t>{1}), dnw = upload(one);
  DeviceBuffer<float> ws(cuda::quant_decode_workspace_floats(1, 4, 128, 4)), lse(4);
  cuda::QuantDecodeParams p;
  p.batch = 1;
  p.n_heads = 4;
  p.n_kv_heads = 2;
  p.head_dim = 128;
  p.q = reinterpret_cast<const bf16*>(q.get());
  p.k_codes = p.v_codes = codes.get();
  p.k_centroids = p.v_centroids = cent.get();
  p.anchor_k = p.anchor_v = p.window_k = p.window_v = fp.get();
  p.n_quant = dnq.get();
  p.n_anchor = dna.get();
  p.n_window = dnw.get();
  p.quant_capacity = 8192;
  p.anchor_capacity = 4;
  p.window_capacity = 4;
  p.out = reinterpret_cast<bf16*>(out.get());
  p.lse = lse.get();
  p.workspace = ws.get();
  p.workspace_floats = int64_t(ws.size());
  p.n_splits = 4;
  p.split_len = 1024;
  p.scale = 0.1f;
  // a plan for 4096 slots and 5000 quantized tokens: NaN, not a silently shortened context
  cuda::quant_decode(p, nullptr);
  {
    const auto o = download_bf(p.out, 4 * 128);
    const auto l = download(lse.get(), 4);
    CHECK(std::all_of(o.begin(), o.end(), [](float x) { return std::isnan(x); }));
    CHECK(std::all_of(l.begin(), l.end(), [](float x) { return std::isnan(x); }));
  }
  auto e = p;
  e.head_dim = 96;
  CHECK_THROWS_WITH(cuda::quant_decode(e, nullptr), Catch::Contains("head_dim 96 is not supported"));
  e = p;
  e.config = VqKernelConfig::kC16B8;
  e.lut_half = true;  // fp16 tables exist for c8b8 and c16b12 only
  CHECK_THROWS_WITH(cuda::quant_decode(e, nullptr), Catch::Contains("fp16 lookup tables are built for c8b8 and c16b12 only"));
  e = p;
  e.split_len = 1000;  // not a multiple of the tile
  CHECK_THROWS_WITH(cuda::quant_decode(e, nullptr), Catch::Contains("bad split plan") && Catch::Contains("of 1000 slots"));
  e = p;
  e.split_len = 65536;  // over the bins' overflow bound
  CHECK_THROWS_WITH(cuda::quant_decode(e, nullptr), Catch::Contains("bad split plan") && Catch::Contains("of 65536 slots"));
  e = p;
  e.n_heads = 5;
  CHECK_THROWS_WITH(cuda::quant_decode(e, nullptr), Catch::Contains("n_heads 5 must be a multiple of n_kv_heads"));
  e = p;
  e.workspace_floats = 10;
  CHECK_THROWS_WITH(cuda::quant_decode(e, nullptr), Catch::Contains("workspace of 10 floats is too small"));
  CHECK_THROWS_WITH(cuda::plan_quant_decode(1, 4, 2, 80, VqKernelConfig::kC8B8, 100), Catch::Contains("head_dim 80 is not supported"));
  const auto plan = cuda::plan_quant_decode(1, 32, 8, 128, VqKernelConfig::kC8B8, 4 << 20);
  CHECK(int64_t(plan.n_splits) * plan.split_len >= (4 << 20));
  CHECK(plan.split_len <= 32768);
  CHECK(plan.heads_per_block == 4);
}

TEST_CASE("GPU quantize: nearest-centroid codes equal vq_encode and land packed in their slots", "[gpu][quant]") {
  SKIP_WITHOUT_GPU();
  const uint32_t seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  int n_case = 0;
  for (VqKernelConfig cfg : kAllConfigs)
    for (int d : {128, 64}) {
      const auto info = cuda::vq_kernel_config_info(cfg);
      const cuda::ElemType xt = n_case % 3 == 0 ? cuda::ElemType::kF16 : n_case % 3 == 1 ? cuda::ElemType::kBF16 : cuda::ElemType::kF32;
      ++n_case;
      const int ng = cuda::vq_groups(d, cfg), K = cuda::vq_centroid_count(cfg), cc = info.c;
      const int rb = cuda::vq_record_bytes(d, cfg);
      const int Hkv = 3, n = 29, B = 2, cap = 40;
      const int64_t stride = int64_t(Hkv) * d + 8;
      INFO(fmt::format("{} d {} input {}", info.name, d, cuda::elem_type_name(xt)));
      std::vector<float> cent(size_t(Hkv) * ng * K * cc);
      for (auto& x : cent) x = round_f16(nd(rng));
      // inputs: near centroids (a realistic assignment) plus noise, rounded to the input type
      std::vector<float> x(size_t(n) * stride, 0.f);
      std::uniform_int_distribution<int> ud(0, K - 1);
      for (int i = 0; i < n; ++i)
        for (int h = 0; h < Hkv; ++h)
          for (int g = 0; g < ng; ++g) {
            const int code = ud(rng);
            for (int e = 0; e < cc; ++e) {
              float v = cent[((size_t(h) * ng + g) * K + code) * cc + e] + 0.3f * nd(rng);
              if (xt == cuda::ElemType::kF16) v = round_f16(v);
              if (xt == cuda::ElemType::kBF16) v = bf2f(f2bf(v));
              x[size_t(i) * stride + size_t(h) * d + g * cc + e] = v;
            }
          }
      DeviceBuffer<uint8_t> dx_bytes;
      if (xt == cuda::ElemType::kF16) {
        std::vector<__half> hx(x.size());
        for (size_t i = 0; i < x.size(); ++i) hx[i] = __float2half_rn(x[i]);
        auto t = upload(hx);
        dx_bytes.resize(x.size() * 2);
        ANTKV_CUDA_CHECK(cudaMemcpy(dx_bytes.get(), t.get(), x.size() * 2, cudaMemcpyDeviceToDevice));
      } else if (xt == cuda::ElemType::kBF16) {
        std::vector<uint16_t> hx(x.size());
        for (size_t i = 0; i < x.size(); ++i) hx[i] = f2bf(x[i]);
        auto t = upload(hx);
        dx_bytes.resize(x.size() * 2);
        ANTKV_CUDA_CHECK(cudaMemcpy(dx_bytes.get(), t.get(), x.size() * 2, cudaMemcpyDeviceToDevice));
      } else {
        auto t = upload(x);
        dx_bytes.resize(x.size() * 4);
        ANTKV_CUDA_CHECK(cudaMemcpy(dx_bytes.get(), t.get(), x.size() * 4, cudaMemcpyDeviceToDevice));
      }
      // token i -> sequence i % 2, slots scattered; the last row's slot is out of range (skipped)
      std::vector<int32_t> seq(n), slot(n);
      for (int i = 0; i < n; ++i) {
        seq[i] = i % B;
        slot[i] = (7 * (i / B) + 3) % cap;
      }
      slot[n - 1] = cap;
      auto dseq = upload(seq), dslot = upload(slot);
      auto dcent = upload_f16(cent);
      DeviceBuffer<uint8_t> arena(size_t(B) * Hkv * cap * rb);
      ANTKV_CUDA_CHECK(cudaMemset(arena.get(), 0xFF, arena.bytes()));
      DeviceBuffer<int32_t> codes_out(size_t(n) * Hkv * ng);
      cuda::QuantizeParams p;
      p.config = cfg;
      p.n_tokens = n;
      p.n_kv_heads = Hkv;
      p.head_dim = d;
      p.x = dx_bytes.get();
      p.x_type = xt;
      p.x_row_stride = stride;
      p.centroids = dcent.get();
      p.seq_index = dseq.get();
      p.slot = dslot.get();
      p.codes = arena.get();
      p.batch = B;
      p.capacity = cap;
      p.codes_out = codes_out.get();
      cuda::quantize_kv(p, nullptr);
      const auto got = download(codes_out.get(), codes_out.size());
      const auto packed = download(arena.get(), arena.size());
      // CPU reference per head
      int mismatches = 0, ties = 0;
      for (int h = 0; h < Hkv; ++h) {
        VqHeadCodebooks cb{cent.data() + size_t(h) * ng * K * cc, ng, K, cc};
        std::vector<int32_t> ref(size_t(n) * ng);
        vq_encode(cb, x.data() + size_t(h) * d, n, stride, ref.data());
        for (int i = 0; i < n - 1; ++i)
          for (int g = 0; g < ng; ++g) {
            const int a = got[(size_t(i) * Hkv + h) * ng + g], r = ref[size_t(i) * ng + g];
            if (a == r) continue;
            auto dist = [&](int code) {
              double s = 0;
              for (int e = 0; e < cc; ++e) {
                const double diff = double(x[size_t(i) * stride + size_t(h) * d + g * cc + e]) -
                                    cent[((size_t(h) * ng + g) * K + code) * cc + e];
                s += diff * diff;
              }
              return s;
            };
            if (a >= 0 && a < K && std::abs(dist(a) - dist(r)) <= 1e-5 * (1.0 + dist(r))) ++ties;
            else ++mismatches;
          }
        for (int g = 0; g < ng; ++g) CHECK(got[(size_t(n - 1) * Hkv + h) * ng + g] == -1);
      }
      CHECK(mismatches == 0);
      test::report_measured("test_quant_decode: quantize nearest-centroid ties (count)", ties, 2);
      CHECK(ties <= 2);
      // the arena: each written (sequence, slot) unpacks to the codes; every other slot is untouched
      std::vector<bool> written(size_t(B) * cap, false);
      for (int i = 0; i < n - 1; ++i) {
        written[size_t(seq[i]) * cap + slot[i]] = true;
        for (int h = 0; h < Hkv; ++h) {
          std::vector<int32_t> un(ng);
          cuda::unpack_codes(packed.data() + ((size_t(seq[i]) * Hkv + h) * cap + slot[i]) * rb, 1, slot[i], d, cfg, un.data());
          CHECK(std::equal(un.begin(), un.end(), got.begin() + (size_t(i) * Hkv + h) * ng));
        }
      }
      for (int b = 0; b < B; ++b)
        for (int h = 0; h < Hkv; ++h)
          for (int t = 0; t < cap; ++t)
            if (!written[size_t(b) * cap + t]) {
              const uint8_t* r = packed.data() + ((size_t(b) * Hkv + h) * cap + t) * rb;
              CHECK(std::all_of(r, r + rb, [](uint8_t v) { return v == 0xFF; }));
            }
    }
}

#endif  // ANTKV_HAVE_CUDA

#endif  // ANTKV_HAVE_CUDA (the whole file)
