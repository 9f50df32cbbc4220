// Decode over RoPE-commuting key codes (kernels/attention/commute_decode.h) against the CPU reference: each code
// slot's key is its pair-ordered codeword (vq_decode with the fp16-rounded codebooks) put back in channel order
// (permute_channels) and rotated to its position at the exact angle pos * inv_freq (rope_exact below; the runtime's
// rope_apply rounds the angle to fp32 first, which commute decode does not: see commute_decode.h), i.e. RoPE of the
// decoded pre-RoPE key; values dequantized as always; with the FP16 anchors and window through cpu::attention. Fresh random inputs
// (the seed is printed on failure), batch 3 with odd per-sequence counts (one sequence without codes, one spanning
// many 512-slot tiles), GQA 1/4/8, head_dim 64 and 128, every configuration commute decode runs, positions up to
// 2^20, code slots past n_quant poisoned with 0xFF bytes (positions -1) and FP16 slots past the counts with NaN.
// Three split plans (the planner's, one split, one split per tile); a CUDA graph replay equals the eager launch bit
// for bit. Positions: random, or as the compressed cache's streams hold them (increasing from a random start up to
// 2^20, runs of consecutive positions broken where anchors left the stream, now and then a displaced anchor's
// position out of order). gain=k|kv: per-slot fp16 scales 2^U(-2, 2) (every 17th value scale 0) multiply the
// reference's decoded key and value.
//
// Tolerances (max |gpu - ref| / max |ref|): the output is bf16 (<= 2^-9 relative) of an fp32 softmax: 1e-2 (as
// quant_decode's). LSE (fp32, no output rounding): the GPU turns the fp16 codeword by the fast sine/cosine of the
// exact angle reduced to [-pi, pi] (~2^-21 absolute), or by a table entry e^{i (pos - base) theta} and a query turned
// back by e^{-i base theta} (each ~2^-21 absolute: ~2^-20 together), and sums in fp32; the reference takes the double
// sine/cosine of the exact angle: 3e-4 (quant_decode's pre-RoPE bound). fp16_logits (the FP16
// tokens' scaled scores, fp32 dots): 1e-5 of the largest |score|.
#include "test_support.h"
#include "gpu_test_support.h"

#ifdef ANTKV_HAVE_CUDA
#include <cuda_fp16.h>
#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "kernels/attention/commute_decode.h"
#include "kernels/bench/method_bench.h"
#include "kernels/common/cuda_check.h"
#include "kernels/common/device_buffer.h"
#include "kernels/runtime/ops.h"
#include "quant/vq.h"
#include "runtime/cpu_ops.h"
#include "runtime/rope.h"

using namespace antkv;
using antkv::cuda::VqKernelConfig;
using cuda::bf16;
using cuda::DeviceBuffer;
using test::bf2f;
using test::download;
using test::download_bf;
using test::f2bf;
using test::fresh_seed;
using test::upload;

namespace {

float round_f16(float f) { return __half2float(__float2half_rn(f)); }

DeviceBuffer<__half> upload_f16(const std::vector<float>& h) {
  std::vector<__half> x(h.size());
  for (size_t i = 0; i < h.size(); ++i) {
    if (std::isnan(h[i])) {
      __half_raw r;
      r.x = 0x7e00;
      x[i] = __half(r);
    } else {
      x[i] = __float2half_rn(h[i]);
    }
  }
  return upload(x);
}

// RoPE at the exact angle pos * inv_freq[i] (the product of two fp32 numbers is exact in double), double sine/cosine:
// the rotation commute decode applies (rope_apply takes the fp32-rounded angle, as the runtime)
void rope_exact(float* x, int n_tokens, int head_dim, const int32_t* positions, const float* inv_freq) {
  const int half = head_dim / 2;
  for (int t = 0; t < n_tokens; ++t)
    for (int i = 0; i < half; ++i) {
      const double angle = double(positions[t]) * double(inv_freq[i]);
      const double c = std::cos(angle), sn = std::sin(angle);
      float* xh = x + size_t(t) * head_dim;
      const double a = xh[i], b = xh[i + half];
      xh[i] = float(a * c - b * sn);
      xh[i + half] = float(b * c + a * sn);
    }
}

struct Counts {
  int n_quant, n_anchor, n_window;
};

enum class Positions { kRandom, kStream };

// gain: 0 none, 1 key scales (gain=k), 3 key and value scales (gain=kv)
void run_case(VqKernelConfig cfg, int d, int G, const std::vector<Counts>& seqs, float q_scale, std::mt19937& rng,
              int gain = 0, Positions positions = Positions::kRandom) {
  const auto info = cuda::vq_kernel_config_info(cfg);
  const int B = static_cast<int>(seqs.size()), Hkv = 2, H = Hkv * G;
  const int ng = cuda::vq_groups(d, cfg), K = cuda::vq_centroid_count(cfg), cc = info.c;
  const int rb = cuda::vq_record_bytes(d, cfg);
  int max_q = 0, max_a = 0, max_w = 0;
  for (const auto& s : seqs) max_q = std::max(max_q, s.n_quant), max_a = std::max(max_a, s.n_anchor), max_w = std::max(max_w, s.n_window);
  const int qcap = max_q + 37, acap = max_a + 3, wcap = max_w + 2;
  INFO(fmt::format("{} d {} G {} counts {}/{}/{} {}/{}/{} {}/{}/{} q_scale {} gain {} positions {}", info.name, d, G,
                   seqs[0].n_quant, seqs[0].n_anchor, seqs[0].n_window, seqs[1].n_quant, seqs[1].n_anchor,
                   seqs[1].n_window, seqs[2].n_quant, seqs[2].n_anchor, seqs[2].n_window, q_scale, gain,
                   positions == Positions::kRandom ? "random" : "stream"));
  std::normal_distribution<float> nd(0.f, 1.f);
  auto randn = [&](size_t n) {
    std::vector<float> v(n);
    for (auto& x : v) x = round_f16(nd(rng));
    return v;
  };
  const auto kcent = randn(size_t(Hkv) * ng * K * cc), vcent = randn(size_t(Hkv) * ng * K * cc);  // keys: pair order
  std::vector<float> q(size_t(B) * H * d);
  for (auto& x : q) x = bf2f(f2bf(nd(rng) * q_scale));
  const float scale = 1.0f / std::sqrt(float(d));
  const std::vector<int> order = rope_pair_order(d, cc);
  const auto inv_freq = rope_inv_freq(d, 500000.0, RopeScaling{});
  std::uniform_int_distribution<int> ud(0, K - 1), upos(0, (1 << 20) - 1);
  std::vector<uint8_t> kcodes(size_t(B) * Hkv * qcap * rb, 0xFF), vcodes(kcodes.size(), 0xFF);
  std::vector<float> ak(size_t(B) * Hkv * acap * d, NAN), av(ak.size(), NAN), wk(size_t(B) * Hkv * wcap * d, NAN),
      wv(wk.size(), NAN);
  std::vector<int32_t> cpos(size_t(B) * Hkv * qcap, -1);
  std::vector<float> kscale(size_t(B) * Hkv * qcap, NAN), vscale(kscale.size(), NAN);  // gain: per code slot
  std::uniform_real_distribution<float> ulog(-2.f, 2.f);
  std::uniform_int_distribution<int> event(0, 499), gap(1, 40);
  auto position_list = [&](int n) {
    std::vector<int32_t> pos(n);
    if (positions == Positions::kRandom) {
      for (auto& x : pos) x = upos(rng);
      return pos;
    }
    int32_t next = std::uniform_int_distribution<int>(0, (1 << 20) - 24 * n - 1)(rng);
    for (auto& x : pos) {
      const int e = event(rng);
      if (e < 10) next += gap(rng);  // anchors kept out of the stream
      x = e == 10 ? upos(rng) : next++;  // a displaced anchor coded in its place
    }
    return pos;
  };
  std::vector<float> want(size_t(B) * H * d), want_lse(size_t(B) * H), want_logits(size_t(B) * H * (acap + wcap), NAN);
  for (int b = 0; b < B; ++b) {
    const auto& s = seqs[b];
    const int T = s.n_quant + s.n_anchor + s.n_window;
    std::vector<float> kref(size_t(T) * Hkv * d), vref(kref.size());
    for (int h = 0; h < Hkv; ++h) {
      std::vector<int32_t> kc(size_t(s.n_quant) * ng), vc(kc.size());
      for (auto& x : kc) x = ud(rng);
      for (auto& x : vc) x = ud(rng);
      const size_t base = (size_t(b) * Hkv + h) * qcap * rb;
      cuda::pack_codes(kc.data(), s.n_quant, 0, d, cfg, kcodes.data() + base);
      cuda::pack_codes(vc.data(), s.n_quant, 0, d, cfg, vcodes.data() + base);
      VqHeadCodebooks kcb{kcent.data() + size_t(h) * ng * K * cc, ng, K, cc};
      VqHeadCodebooks vcb{vcent.data() + size_t(h) * ng * K * cc, ng, K, cc};
      if (s.n_quant > 0) {  // RoPE(decoded pre-RoPE key): pair order -> channel order -> rotated to its position
        std::vector<float> kh(size_t(s.n_quant) * d);
        std::vector<int32_t> pos(s.n_quant);
        vq_decode(kcb, kc.data(), s.n_quant, d, kh.data());
        permute_channels(order, false, kh.data(), s.n_quant, d);
        pos = position_list(s.n_quant);
        for (int t = 0; t < s.n_quant; ++t) cpos[(size_t(b) * Hkv + h) * qcap + t] = pos[t];
        rope_exact(kh.data(), s.n_quant, d, pos.data(), inv_freq.data());
        for (int t = 0; t < s.n_quant; ++t) std::copy_n(kh.begin() + size_t(t) * d, d, kref.begin() + (size_t(t) * Hkv + h) * d);
      }
      vq_decode(vcb, vc.data(), s.n_quant, int64_t(Hkv) * d, vref.data() + size_t(h) * d);
      if (gain) {  // RoPE keeps the norm: the key's scale multiplies the rotated key as well as the pre-RoPE one
        float* ks = kscale.data() + (size_t(b) * Hkv + h) * qcap;
        float* vs = vscale.data() + (size_t(b) * Hkv + h) * qcap;
        for (int t = 0; t < s.n_quant; ++t) {
          ks[t] = round_f16(std::exp2(ulog(rng)));
          vs[t] = (gain & 2) ? (t % 17 == 5 ? 0.f : round_f16(std::exp2(ulog(rng)))) : 1.f;
          for (int e = 0; e < d; ++e) {
            kref[(size_t(t) * Hkv + h) * d + e] *= ks[t];
            vref[(size_t(t) * Hkv + h) * d + e] *= vs[t];
          }
        }
      }
      for (int j = 0; j < s.n_anchor + s.n_window; ++j) {
        const bool anchor = j < s.n_anchor;
        const size_t src = anchor ? ((size_t(b) * Hkv + h) * acap + j) * d : ((size_t(b) * Hkv + h) * wcap + (j - s.n_anchor)) * d;
        auto& kk = anchor ? ak : wk;
        auto& vv = anchor ? av : wv;
        for (int e = 0; e < d; ++e) kk[src + e] = round_f16(nd(rng)), vv[src + e] = round_f16(nd(rng));
        const size_t dst = (size_t(s.n_quant + j) * Hkv + h) * d;
        std::copy_n(kk.begin() + src, d, kref.begin() + dst);
        std::copy_n(vv.begin() + src, d, vref.begin() + dst);
      }
    }
    for (int hq = 0; hq < H; ++hq)
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
  auto dcpos = upload(cpos);
  auto dfreq = upload(inv_freq);
  std::vector<int32_t> nq(B), na(B), nw(B);
  for (int b = 0; b < B; ++b) nq[b] = seqs[b].n_quant, na[b] = seqs[b].n_anchor, nw[b] = seqs[b].n_window;
  auto dnq = upload(nq), dna = upload(na), dnw = upload(nw);
  DeviceBuffer<bf16> out(q.size()), out_graph(q.size());
  DeviceBuffer<float> lse(size_t(B) * H), logits(want_logits.size());

  cuda::QuantDecodeParams p;
  p.config = cfg;
  p.batch = B, p.n_heads = H, p.n_kv_heads = Hkv, p.head_dim = d;
  p.q = reinterpret_cast<const bf16*>(dq.get());
  p.k_codes = dkc.get(), p.v_codes = dvc.get();
  p.k_centroids = dkcent.get(), p.v_centroids = dvcent.get();
  p.anchor_k = dak.get(), p.anchor_v = dav.get(), p.window_k = dwk.get(), p.window_v = dwv.get();
  p.n_quant = dnq.get(), p.n_anchor = dna.get(), p.n_window = dnw.get();
  p.quant_capacity = qcap, p.anchor_capacity = acap, p.window_capacity = wcap;
  p.lse = lse.get();
  p.fp16_logits = logits.get();
  p.scale = scale;
  p.pre_rope = true;
  p.code_pos = dcpos.get();
  p.inv_freq = dfreq.get();
  auto dks = upload_f16(kscale), dvs = upload_f16(vscale);
  if (gain & 1) p.k_scale = dks.get();
  if (gain & 2) p.v_scale = dvs.get();
  const auto auto_plan = cuda::plan_commute_decode(B, H, Hkv, d, cfg, max_q);
  REQUIRE(auto_plan.n_splits <= cuda::commute_decode_max_splits(B, H, Hkv, d, cfg));
  const int tile = cuda::commute_decode_tile();
  const std::vector<std::pair<int, int>> plans = {{auto_plan.n_splits, auto_plan.split_len},
                                                  {1, std::max(1, (max_q + tile - 1) / tile) * tile},
                                                  {std::max(1, (max_q + tile - 1) / tile), tile}};
  for (auto [ns, sl] : plans) {
    DeviceBuffer<float> ws(cuda::quant_decode_workspace_floats(B, H, d, ns));
    cuda::fill_bf16(out.get(), int64_t(out.size()), NAN, nullptr);
    cuda::fill_f32(lse.get(), int64_t(lse.size()), NAN, nullptr);
    cuda::fill_f32(ws.get(), int64_t(ws.size()), NAN, nullptr);
    cuda::fill_f32(logits.get(), int64_t(logits.size()), NAN, nullptr);
    p.workspace = ws.get();
    p.workspace_floats = int64_t(ws.size());
    p.n_splits = ns, p.split_len = sl;
    p.out = out.get();
    cuda::commute_decode(p, nullptr);
    ANTKV_CUDA_CHECK(cudaDeviceSynchronize());
    const auto got = download_bf(out.get(), out.size());
    const double eo = test::max_rel_error(got.data(), want.data(), want.size());
    const auto got_lse = download(lse.get(), lse.size());
    const double el = test::max_rel_error(got_lse.data(), want_lse.data(), want_lse.size());
    INFO(fmt::format("{} splits of {}: output error {:.3g}, LSE error {:.3g}", ns, sl, eo, el));
    const std::string tag = gain ? fmt::format(" gain {}", gain) : "";
    CHECK_MEASURED("test_commute_decode: output rel err" + tag, eo, 1e-2);
    CHECK_MEASURED("test_commute_decode: LSE rel err" + tag, el, 3e-4);
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
    CHECK_MEASURED("test_commute_decode: fp16_logits max err / max |score|", worst / top, 1e-5);
    CHECK(wrong_written == 0);
    // the same launch captured in a CUDA graph and replayed: bit-identical output
    cudaStream_t st;
    ANTKV_CUDA_CHECK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    cuda::fill_bf16(out_graph.get(), int64_t(out_graph.size()), NAN, st);
    cuda::QuantDecodeParams pg = p;
    pg.out = out_graph.get();
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    ANTKV_CUDA_CHECK(cudaStreamSynchronize(st));
    ANTKV_CUDA_CHECK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
    cuda::commute_decode(pg, st);
    ANTKV_CUDA_CHECK(cudaStreamEndCapture(st, &graph));
    ANTKV_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    ANTKV_CUDA_CHECK(cudaGraphLaunch(exec, st));
    ANTKV_CUDA_CHECK(cudaStreamSynchronize(st));
    ANTKV_CUDA_CHECK(cudaGraphExecDestroy(exec));
    ANTKV_CUDA_CHECK(cudaGraphDestroy(graph));
    ANTKV_CUDA_CHECK(cudaStreamDestroy(st));
    const auto got_graph = download_bf(out_graph.get(), out_graph.size());
    CHECK(std::memcmp(got_graph.data(), got.data(), got.size() * sizeof(float)) == 0);
  }
}

}  // namespace

TEST_CASE("GPU commute decode: codeword times e^{i pos theta} equals RoPE of the decoded pre-RoPE key (CPU reference)",
          "[gpu][quant][commute]") {
  SKIP_WITHOUT_GPU();
  const uint32_t seed = fresh_seed();
  INFO("seed " << seed);
  std::mt19937 rng(seed);
  int n = 0;
  for (VqKernelConfig cfg : {VqKernelConfig::kC8B8, VqKernelConfig::kC16B8, VqKernelConfig::kC16B6, VqKernelConfig::kC4B8,
                             VqKernelConfig::kC2B8})
    for (int d : {128, 64})
      for (int G : {1, 4, 8}) {
        // odd counts; the first spans several tiles, the third has no codes; positions random or as a cache's
        // stream holds them; no scales, key scales, key and value scales
        run_case(cfg, d, G, {{1 + 2 * (n % 7) + 1023, 11, 128}, {2001 + 3 * n, 31, 77}, {0, 1, 5}}, (n % 2) ? 4.f : 1.f,
                 rng, std::array<int, 3>{0, 3, 1}[n % 3], (n % 2) ? Positions::kRandom : Positions::kStream);
        ++n;
      }
  // LLaMA-3-8B's group (G 4, head_dim 128, c8b8) with a longer stream and a two-sequence batch of it
  run_case(VqKernelConfig::kC8B8, 128, 4, {{9001, 90, 128}, {4097, 41, 128}, {5, 1, 1}}, 4.f, rng);
  run_case(VqKernelConfig::kC8B8, 128, 4, {{9001, 90, 128}, {4097, 41, 128}, {5, 1, 1}}, 4.f, rng, 3, Positions::kStream);
}

TEST_CASE("bench methods: key_rope=commute times the commute kernel, c16b12 refused by name", "[quant][commute]") {
  const auto b = cuda::parse_bench_method("vq:bits=1,key_rope=commute");
  CHECK(b.compressed);
  CHECK(b.commute);
  CHECK(b.pre_rope);  // a pre-RoPE code stream with positions
  CHECK_FALSE(cuda::parse_bench_method("vq:bits=1,key_rope=pre").commute);
  CHECK_THROWS_WITH(cuda::parse_bench_method("vq:bits=0.75,key_rope=commute"),
                    Catch::Contains("method \"vq:bits=0.75,key_rope=commute\" does not run on bench") && Catch::Contains("key_rope=commute does not run c16b12"));
}

TEST_CASE("GPU commute decode: refusals", "[gpu][quant][commute]") {
  SKIP_WITHOUT_GPU();
  CHECK_FALSE(cuda::commute_decode_supports(VqKernelConfig::kC16B12));
  CHECK_THROWS_WITH(cuda::plan_commute_decode(1, 8, 2, 128, VqKernelConfig::kC16B12, 100),
                    Catch::Contains("c16b12 is not supported") && Catch::Contains("does not fit in shared memory"));
  CHECK_THROWS_WITH(cuda::plan_commute_decode(1, 6, 2, 128, VqKernelConfig::kC8B8, 100),
                    Catch::Contains("3 query heads per KV head is not supported"));
  cuda::QuantDecodeParams p;
  p.config = VqKernelConfig::kC8B8;
  p.batch = 1, p.n_heads = 4, p.n_kv_heads = 1, p.head_dim = 128;
  DeviceBuffer<float> ws(1024);
  DeviceBuffer<int32_t> counts(3);
  DeviceBuffer<bf16> q(128 * 4), out(128 * 4);
  p.q = q.get(), p.out = out.get(), p.workspace = ws.get(), p.workspace_floats = 1024;
  p.n_quant = counts.get(), p.n_anchor = counts.get() + 1, p.n_window = counts.get() + 2;
  p.n_splits = 1, p.split_len = 256;
  CHECK_THROWS_WITH(cuda::commute_decode(p, nullptr), Catch::Contains("must hold pre-RoPE keys"));
  p.pre_rope = true;
  p.split_len = 100;
  CHECK_THROWS_WITH(cuda::commute_decode(p, nullptr), Catch::Contains("bad split plan"));
  DeviceBuffer<float> basis(128 * 128);
  p.v_rotation = basis.get();  // rotate=pca mixes the RoPE pairs: no basis with commuting keys
  CHECK_THROWS_WITH(cuda::commute_decode(p, nullptr), Catch::Contains("a basis (rotate=pca) is not implemented"));
}
#endif  // ANTKV_HAVE_CUDA
