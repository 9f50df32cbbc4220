#include "kernels/runtime/gpu_runtime.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <set>
#include <tuple>

#include "core/error.h"
#include "kernels/common/cuda_check.h"
#include "kernels/common/device_buffer.h"
#include "kernels/runtime/gemm.h"
#include "kernels/quant/compressed_cache.h"
#include "kernels/quant/uniform_cache.h"
#include "kernels/quant/simulated_quantizer.h"
#include "kernels/attention/flash_attention.h"
#include "kernels/runtime/ops.h"
#include "model/checkpoint.h"
#include "runtime/rope.h"

namespace antkv {

using cuda::bf16;
using cuda::DeviceBuffer;
using cuda::ElemType;

namespace {

struct LayerWeights {
  DeviceBuffer<bf16> wqkv;     // [q_dim + 2 kv_dim, hidden]: q_proj | k_proj | v_proj rows
  DeviceBuffer<float> bqkv;    // [q_dim + 2 kv_dim] (attention_bias) or empty
  DeviceBuffer<bf16> wo;       // [hidden, q_dim]
  DeviceBuffer<bf16> wgu;      // [2 ffn, hidden]: gate_proj | up_proj rows
  DeviceBuffer<bf16> wdown;    // [hidden, ffn]
  DeviceBuffer<float> attn_norm, ffn_norm;  // [hidden]
  DeviceBuffer<bf16> k_cache, v_cache;      // [max_batch, kv_heads, capacity, head_dim]
};

ElemType elem_type_of(const TensorView& t) {
  switch (t.dtype) {
    case DType::kF32: return ElemType::kF32;
    case DType::kF16: return ElemType::kF16;
    case DType::kBF16: return ElemType::kBF16;
    default: fail("{}: tensor {} has dtype {}; bf16, fp16 or fp32 expected", t.file, t.name, dtype_name(t.dtype));
  }
}

void validate_config(const ModelConfig& c) {
  ANTKV_CHECK(c.hidden_size > 0 && c.num_layers > 0 && c.num_heads > 0 && c.num_kv_heads > 0 &&
                  c.intermediate_size > 0 && c.vocab_size > 0,
              "GpuRuntime: incomplete model config");
  ANTKV_CHECK(c.num_heads % c.num_kv_heads == 0, "GpuRuntime: num_heads {} not a multiple of num_kv_heads {}",
              c.num_heads, c.num_kv_heads);
  ANTKV_CHECK(c.head_dim == 64 || c.head_dim == 128,
              "GpuRuntime: head_dim {} is not supported by the CUDA attention kernels (64 or 128)", c.head_dim);
  ANTKV_CHECK(c.gqa_group() <= 16, "GpuRuntime: GQA group {} > 16 is not supported", c.gqa_group());
  ANTKV_CHECK(c.hidden_size % 8 == 0 && c.intermediate_size % 8 == 0,
              "GpuRuntime: hidden_size and intermediate_size must be multiples of 8");
}

}  // namespace

struct GpuRuntime::Impl {
  ModelConfig cfg;
  GpuRuntimeOptions opt;
  int capacity = 0;
  cudaStream_t stream = nullptr;
  std::unique_ptr<cuda::Blas> blas;
  std::string name;

  std::vector<LayerWeights> layers;
  DeviceBuffer<bf16> embed;       // [vocab, hidden]
  DeviceBuffer<bf16> lm_head_own; // [vocab, hidden] when not tied
  const bf16* lm_head = nullptr;
  DeviceBuffer<float> final_norm;
  DeviceBuffer<float> inv_freq;   // [head_dim / 2]
  size_t weight_bytes = 0;

  std::vector<int> lens;          // tokens cached per sequence
  std::unique_ptr<GpuKvQuantizer> quantizer;  // or null
  std::unique_ptr<GpuCompressedKvCache> compressed;  // compressed_kv: the cache (null until set)
  DeviceBuffer<bf16> prefill_k, prefill_v;     // compressed_kv, uniform_kv: a prefill's own K/V, [kv_heads, T, head_dim]
  cuda::QuantDecodePlan qplan;                 // compressed_kv: this decode step's plan
  std::unique_ptr<GpuUniformKvCache> uniform;  // uniform_kv: the cache (null until set)
  cuda::UniformDecodePlan uplan;               // uniform_kv: this decode step's plan

  // scratch (grown to the largest chunk seen)
  int rows_cap = 0;
  DeviceBuffer<float> x, qkv, gu, k_pre;
  DeviceBuffer<bf16> hn, qb, attn, act;
  DeviceBuffer<int32_t> ints;     // tokens | positions | seq_index | seq_lens | targets | argmax
  DeviceBuffer<float> logits, nll;
  DeviceBuffer<float> decode_ws;
  DeviceBuffer<uint32_t> decode_counters;  // flash_decode's split counters (zeroed once, left zero by each step)
  cuda::PinnedBuffer<int32_t> host_ints;
  int logits_rows = 0;

  // decode_batch graphs, keyed by (batch, n_splits, split_len, argmax); a key runs eagerly once first
  using GraphKey = std::tuple<int, int, int, bool>;
  std::map<GraphKey, cudaGraphExec_t> graphs;
  std::set<GraphKey> seen;
  void clear_graphs() {
    for (auto& kv : graphs) cudaGraphExecDestroy(kv.second);
    graphs.clear();
    seen.clear();
  }

  int qkv_dim() const { return cfg.q_dim() + 2 * cfg.kv_dim(); }

  void init_common(const ModelConfig& c, const GpuRuntimeOptions& o) {
    validate_config(c);
    cfg = c;
    opt = o;
    ANTKV_CHECK(opt.max_batch >= 1, "GpuRuntime: max_batch must be >= 1");
    ANTKV_CHECK(!(opt.compressed_kv && opt.uniform_kv), "GpuRuntime: compressed_kv and uniform_kv exclude each other");
    capacity = opt.max_context > 0
                   ? opt.max_context
                   : static_cast<int>(std::max<int64_t>(2048, std::min<int64_t>(cfg.max_position_embeddings, 8192)));
    ANTKV_CUDA_CHECK(cudaSetDevice(opt.device));
    cudaDeviceProp prop{};
    ANTKV_CUDA_CHECK(cudaGetDeviceProperties(&prop, opt.device));
    name = fmt::format("cuda:{} {}", opt.device, prop.name);
    ANTKV_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    blas = std::make_unique<cuda::Blas>(stream);
    lens.assign(opt.max_batch, 0);
    const auto inv = rope_inv_freq(cfg);
    inv_freq.resize(inv.size());
    ANTKV_CUDA_CHECK(cudaMemcpy(inv_freq.get(), inv.data(), inv.size() * sizeof(float), cudaMemcpyHostToDevice));
    layers.resize(cfg.num_layers);
    // logits chunk: at most ~256 MB of fp32 logits at a time
    logits_rows = static_cast<int>(std::max<int64_t>(1, (int64_t{256} << 20) / (4 * int64_t{cfg.vocab_size})));
    logits_rows = std::max(logits_rows, opt.max_batch);
    logits.resize(static_cast<size_t>(logits_rows) * cfg.vocab_size);
    decode_ws.resize(cuda::decode_workspace_floats(opt.max_batch, cfg.num_heads, cfg.head_dim));
    decode_counters.resize(cuda::decode_counter_count(opt.max_batch, cfg.num_kv_heads));
    ANTKV_CUDA_CHECK(cudaMemset(decode_counters.get(), 0, decode_counters.bytes()));
    ensure_rows(std::max(opt.max_batch, 16));
  }

  void alloc_layer(LayerWeights& L) {
    const int64_t H = cfg.hidden_size, F = cfg.intermediate_size;
    L.wqkv.resize(static_cast<size_t>(qkv_dim()) * H);
    if (cfg.attention_bias) L.bqkv.resize(qkv_dim());
    L.wo.resize(static_cast<size_t>(H) * cfg.q_dim());
    L.wgu.resize(static_cast<size_t>(2 * F) * H);
    L.wdown.resize(static_cast<size_t>(H) * F);
    L.attn_norm.resize(H);
    L.ffn_norm.resize(H);
    if (!opt.compressed_kv && !opt.uniform_kv) {
      const size_t kv = static_cast<size_t>(opt.max_batch) * cfg.num_kv_heads * capacity * cfg.head_dim;
      L.k_cache.resize(kv);
      L.v_cache.resize(kv);
    }
    weight_bytes += L.wqkv.bytes() + L.bqkv.bytes() + L.wo.bytes() + L.wgu.bytes() + L.wdown.bytes() +
                    L.attn_norm.bytes() + L.ffn_norm.bytes();
  }

  void ensure_rows(int rows) {
    if (rows <= rows_cap) return;
    clear_graphs();  // they hold the old scratch pointers
    const size_t r = rows;
    x.resize(r * cfg.hidden_size);
    qkv.resize(r * qkv_dim());
    k_pre.resize(r * cfg.kv_dim());  // sized with the rows: captured decode graphs hold its pointer
    gu.resize(r * 2 * cfg.intermediate_size);
    hn.resize(r * std::max(cfg.hidden_size, cfg.q_dim()));
    qb.resize(r * cfg.q_dim());
    attn.resize(r * cfg.q_dim());
    act.resize(r * cfg.intermediate_size);
    nll.resize(r);
    ints.resize(6 * std::max<size_t>(r, opt.max_batch));
    host_ints.ensure(6 * std::max<size_t>(r, opt.max_batch));
    rows_cap = rows;
  }

  // ---- loading ----
  // Uploads t (any float dtype) as bf16 into dst (numel elements); staging holds non-bf16 sources.
  void upload_bf16(const TensorView& t, bf16* dst, DeviceBuffer<unsigned char>& staging) {
    const ElemType et = elem_type_of(t);
    if (et == ElemType::kBF16) {
      ANTKV_CUDA_CHECK(cudaMemcpyAsync(dst, t.data, t.nbytes, cudaMemcpyHostToDevice, stream));
      ANTKV_CUDA_CHECK(cudaStreamSynchronize(stream));
      return;
    }
    staging.ensure(t.nbytes);
    ANTKV_CUDA_CHECK(cudaMemcpyAsync(staging.get(), t.data, t.nbytes, cudaMemcpyHostToDevice, stream));
    cuda::convert_to_bf16(staging.get(), et, dst, t.numel(), stream);
    ANTKV_CUDA_CHECK(cudaStreamSynchronize(stream));
  }
  void upload_f32(const TensorView& t, float* dst, DeviceBuffer<unsigned char>& staging) {
    const ElemType et = elem_type_of(t);
    staging.ensure(t.nbytes);
    ANTKV_CUDA_CHECK(cudaMemcpyAsync(staging.get(), t.data, t.nbytes, cudaMemcpyHostToDevice, stream));
    cuda::convert_to_f32(staging.get(), et, dst, t.numel(), stream);
    ANTKV_CUDA_CHECK(cudaStreamSynchronize(stream));
  }

  void load(const Checkpoint& ck) {
    init_common(ck.config(), opt);
    const int64_t H = cfg.hidden_size, F = cfg.intermediate_size, V = cfg.vocab_size;
    const int64_t qd = cfg.q_dim(), kvd = cfg.kv_dim();
    DeviceBuffer<unsigned char> staging;
    auto lname = [](int l, const char* s) { return fmt::format("model.layers.{}.{}", l, s); };
    embed.resize(static_cast<size_t>(V) * H);
    upload_bf16(ck.tensor("model.embed_tokens.weight", {V, H}), embed.get(), staging);
    weight_bytes += embed.bytes();
    const TensorView& t = ck.lm_head();  // lm_head.weight, else the embedding when tied
    if (&t == &ck.tensor("model.embed_tokens.weight")) {
      lm_head = embed.get();
    } else {
      ANTKV_CHECK(t.shape == std::vector<int64_t>({V, H}), "{}: lm_head {} has shape {}, expected [{}, {}]", t.file,
                  t.name, t.shape_str(), V, H);
      lm_head_own.resize(static_cast<size_t>(V) * H);
      upload_bf16(t, lm_head_own.get(), staging);
      lm_head = lm_head_own.get();
      weight_bytes += lm_head_own.bytes();
    }
    final_norm.resize(H);
    upload_f32(ck.tensor("model.norm.weight", {H}), final_norm.get(), staging);
    weight_bytes += final_norm.bytes();
    for (int l = 0; l < cfg.num_layers; ++l) {
      LayerWeights& L = layers[l];
      alloc_layer(L);
      upload_bf16(ck.tensor(lname(l, "self_attn.q_proj.weight"), {qd, H}), L.wqkv.get(), staging);
      upload_bf16(ck.tensor(lname(l, "self_attn.k_proj.weight"), {kvd, H}), L.wqkv.get() + qd * H, staging);
      upload_bf16(ck.tensor(lname(l, "self_attn.v_proj.weight"), {kvd, H}), L.wqkv.get() + (qd + kvd) * H, staging);
      if (cfg.attention_bias) {
        upload_f32(ck.tensor(lname(l, "self_attn.q_proj.bias"), {qd}), L.bqkv.get(), staging);
        upload_f32(ck.tensor(lname(l, "self_attn.k_proj.bias"), {kvd}), L.bqkv.get() + qd, staging);
        upload_f32(ck.tensor(lname(l, "self_attn.v_proj.bias"), {kvd}), L.bqkv.get() + qd + kvd, staging);
      }
      upload_bf16(ck.tensor(lname(l, "self_attn.o_proj.weight"), {H, qd}), L.wo.get(), staging);
      upload_bf16(ck.tensor(lname(l, "mlp.gate_proj.weight"), {F, H}), L.wgu.get(), staging);
      upload_bf16(ck.tensor(lname(l, "mlp.up_proj.weight"), {F, H}), L.wgu.get() + F * H, staging);
      upload_bf16(ck.tensor(lname(l, "mlp.down_proj.weight"), {H, F}), L.wdown.get(), staging);
      upload_f32(ck.tensor(lname(l, "input_layernorm.weight"), {H}), L.attn_norm.get(), staging);
      upload_f32(ck.tensor(lname(l, "post_attention_layernorm.weight"), {H}), L.ffn_norm.get(), staging);
    }
    ANTKV_CUDA_CHECK(cudaStreamSynchronize(stream));
  }

  void randomize(uint64_t seed) {
    const int64_t H = cfg.hidden_size, F = cfg.intermediate_size, V = cfg.vocab_size;
    // uniform(-a, a) with a = sqrt(3 / fan_in): unit-variance outputs for unit-variance inputs
    auto a = [](int64_t fan_in) { return static_cast<float>(std::sqrt(3.0 / static_cast<double>(fan_in))); };
    uint64_t s = seed * 1000003ull + 17;
    embed.resize(static_cast<size_t>(V) * H);
    cuda::fill_random_bf16(embed.get(), V * H, s++, 1.0f, stream);
    weight_bytes += embed.bytes();
    if (cfg.tie_word_embeddings) {
      lm_head = embed.get();
    } else {
      lm_head_own.resize(static_cast<size_t>(V) * H);
      cuda::fill_random_bf16(lm_head_own.get(), V * H, s++, a(H), stream);
      lm_head = lm_head_own.get();
      weight_bytes += lm_head_own.bytes();
    }
    final_norm.resize(H);
    cuda::fill_f32(final_norm.get(), H, 1.0f, stream);
    weight_bytes += final_norm.bytes();
    for (auto& L : layers) {
      alloc_layer(L);
      cuda::fill_random_bf16(L.wqkv.get(), static_cast<int64_t>(L.wqkv.size()), s++, a(H), stream);
      if (cfg.attention_bias) cuda::fill_random_f32(L.bqkv.get(), qkv_dim(), s++, 0.1f, stream);
      cuda::fill_random_bf16(L.wo.get(), static_cast<int64_t>(L.wo.size()), s++, a(cfg.q_dim()), stream);
      cuda::fill_random_bf16(L.wgu.get(), static_cast<int64_t>(L.wgu.size()), s++, a(H), stream);
      cuda::fill_random_bf16(L.wdown.get(), static_cast<int64_t>(L.wdown.size()), s++, a(F), stream);
      cuda::fill_f32(L.attn_norm.get(), H, 1.0f, stream);
      cuda::fill_f32(L.ffn_norm.get(), H, 1.0f, stream);
    }
    ANTKV_CUDA_CHECK(cudaStreamSynchronize(stream));
  }

  // ---- forward ----
  // The transformer layers over T rows already embedded in x. Row t is token positions[t] of sequence
  // seq_index[t] (null: sequence 0). decode: one row per sequence, attention by flash-decoding over
  // sequences 0..T-1; else one sequence's chunk at positions past..past+T-1, flash prefill.
  // quant (forward() only: sequence 0): the KV-cache quantizer hook, or null.
  void run_layers(int T, bool decode, int past, const int32_t* d_pos, const int32_t* d_seq,
                  const int32_t* d_lens, const cuda::DecodePlan& plan, ForwardObserver* observer,
                  GpuKvQuantizer* quant = nullptr) {
    const int H = cfg.hidden_size, F = cfg.intermediate_size, qd = cfg.q_dim(), kvd = cfg.kv_dim();
    const int d = cfg.head_dim;
    const float scale = 1.0f / std::sqrt(static_cast<float>(d));
    std::vector<float> hq, hkpre, hkpost, hv;
    GpuCompressedKvCache* comp = opt.compressed_kv ? compressed.get() : nullptr;
    ANTKV_CHECK(!opt.compressed_kv || comp, "GpuRuntime: compressed_kv is set but no compressed cache is installed");
    GpuUniformKvCache* uni = opt.uniform_kv ? uniform.get() : nullptr;
    ANTKV_CHECK(!opt.uniform_kv || uni, "GpuRuntime: uniform_kv is set but no uniform cache is installed");
    const bool own_prefill = (comp || uni) && !decode;  // a real cache's prefill attends over its own scratch K/V
    const bool want_f32 = observer != nullptr || quant != nullptr || comp || uni;  // fp32 q, k_pre, k_post, v kept
    const bool observe_device = observer != nullptr && observer->wants_device();
    for (int l = 0; l < cfg.num_layers; ++l) {
      LayerWeights& L = layers[l];
      cuda::RmsNormParams rn;
      rn.x = x.get();
      rn.weight = L.attn_norm.get();
      rn.y = hn.get();
      rn.y_type = ElemType::kBF16;
      rn.n_rows = T;
      rn.n = H;
      rn.eps = static_cast<float>(cfg.rms_norm_eps);
      cuda::rmsnorm(rn, stream);
      blas->linear(hn.get(), H, L.wqkv.get(), qkv.get(), qkv_dim(), T, qkv_dim(), H);

      cuda::QkvRopeStoreParams qp;
      qp.qkv = qkv.get();
      qp.bias = cfg.attention_bias ? L.bqkv.get() : nullptr;
      qp.positions = d_pos;
      qp.seq_index = d_seq;
      qp.inv_freq = inv_freq.get();
      qp.q_out = qb.get();
      qp.k_cache = L.k_cache.get();
      qp.v_cache = L.v_cache.get();
      qp.capacity = capacity;
      if (comp || uni) {  // decode: K/V only written back (append() takes them); prefill: the chunk's own scratch
        qp.k_cache = decode ? nullptr : prefill_k.get();
        qp.v_cache = decode ? nullptr : prefill_v.get();
        qp.capacity = decode ? 0 : T;
      }
      qp.k_pre_rope = want_f32 ? k_pre.get() : nullptr;
      qp.write_back = want_f32;
      qp.n_tokens = T;
      qp.n_heads = cfg.num_heads;
      qp.n_kv_heads = cfg.num_kv_heads;
      qp.head_dim = d;
      cuda::qkv_rope_store(qp, stream);

      DeviceLayerActivations da;  // this layer's fp32 activations on the device (observer and quantizer)
      da.layer = l;
      da.n_tokens = T;
      da.position0 = past;
      da.q = qkv.get();
      da.k_post = qkv.get() + qd;
      da.v = qkv.get() + qd + kvd;
      da.q_stride = da.k_post_stride = da.v_stride = qkv_dim();
      da.k_pre = k_pre.get();
      da.k_pre_stride = kvd;
      da.stream = stream;
      if (observe_device) {
        observer->on_layer_device(da);
      } else if (observer) {
        hq.resize(static_cast<size_t>(T) * qd);
        hkpre.resize(static_cast<size_t>(T) * kvd);
        hkpost.resize(static_cast<size_t>(T) * kvd);
        hv.resize(static_cast<size_t>(T) * kvd);
        const size_t ld = static_cast<size_t>(qkv_dim()) * sizeof(float);
        ANTKV_CUDA_CHECK(cudaMemcpy2DAsync(hq.data(), qd * sizeof(float), qkv.get(), ld, qd * sizeof(float), T,
                                           cudaMemcpyDeviceToHost, stream));
        ANTKV_CUDA_CHECK(cudaMemcpy2DAsync(hkpost.data(), kvd * sizeof(float), qkv.get() + qd, ld, kvd * sizeof(float),
                                           T, cudaMemcpyDeviceToHost, stream));
        ANTKV_CUDA_CHECK(cudaMemcpy2DAsync(hv.data(), kvd * sizeof(float), qkv.get() + qd + kvd, ld,
                                           kvd * sizeof(float), T, cudaMemcpyDeviceToHost, stream));
        ANTKV_CUDA_CHECK(cudaMemcpyAsync(hkpre.data(), k_pre.get(), hkpre.size() * sizeof(float),
                                         cudaMemcpyDeviceToHost, stream));
        ANTKV_CUDA_CHECK(cudaStreamSynchronize(stream));
        LayerActivations act_;
        act_.layer = l;
        act_.n_tokens = T;
        act_.position0 = past;
        act_.q = hq.data();
        act_.k_pre_rope = hkpre.data();
        act_.k_post_rope = hkpost.data();
        act_.v = hv.data();
        observer->on_layer(act_);
      }

      // fake quantization of this layer's new cache entries, before attention reads them (a real cache's
      // prefill: its scratch, so that the prefill's logits are the simulated path's; its decode reads the real cache)
      if (quant && !((comp || uni) && decode)) {
        GpuKvLayerChunk ch;
        static_cast<DeviceLayerActivations&>(ch) = da;
        ch.positions = d_pos;
        ch.inv_freq = inv_freq.get();
        ch.k_cache = own_prefill ? prefill_k.get() : L.k_cache.get();  // sequence 0
        ch.v_cache = own_prefill ? prefill_v.get() : L.v_cache.get();
        ch.capacity = own_prefill ? T : capacity;
        quant->on_layer(ch, stream);
      }

      if (uni && decode) {
        uni->append(l, T, qkv.get() + qd, qkv.get() + qd + kvd, qkv_dim(), stream);
        uni->attend(l, T, cfg.num_heads, qb.get(), attn.get(), uplan, scale, stream);
      } else if (comp && decode) {
        comp->append(l, T, qkv.get() + qd, qkv.get() + qd + kvd, qkv_dim(), k_pre.get(), stream);
        comp->attend(l, T, cfg.num_heads, qb.get(), attn.get(), qplan, scale, stream);
      } else if (decode) {
        cuda::FlashDecodeParams fp;
        fp.q = qb.get();
        fp.k_cache = L.k_cache.get();
        fp.v_cache = L.v_cache.get();
        fp.seq_lens = d_lens;
        fp.out = attn.get();
        fp.workspace = decode_ws.get();
        fp.workspace_floats = static_cast<int64_t>(decode_ws.size());
        fp.split_counters = decode_counters.get();
        fp.batch = T;
        fp.n_heads = cfg.num_heads;
        fp.n_kv_heads = cfg.num_kv_heads;
        fp.head_dim = d;
        fp.capacity = capacity;
        fp.n_splits = plan.n_splits;
        fp.split_len = plan.split_len;
        fp.scale = scale;
        cuda::flash_decode(fp, stream);
      } else {
        cuda::FlashPrefillParams fp;
        fp.q = qb.get();
        fp.k = own_prefill ? prefill_k.get() : L.k_cache.get();  // sequence 0: [kv_heads, capacity, d]
        fp.v = own_prefill ? prefill_v.get() : L.v_cache.get();
        fp.out = attn.get();
        fp.n_q = T;
        fp.n_kv = past + T;
        fp.n_heads = cfg.num_heads;
        fp.n_kv_heads = cfg.num_kv_heads;
        fp.head_dim = d;
        fp.scale = scale;
        fp.q_row_stride = qd;
        fp.o_row_stride = qd;
        fp.k_row_stride = fp.v_row_stride = d;
        fp.k_head_stride = fp.v_head_stride = static_cast<int64_t>(own_prefill ? T : capacity) * d;
        cuda::flash_prefill(fp, stream);
        if (uni) uni->write_prefill(l, 0, T, qkv.get() + qd, qkv_dim(), qkv.get() + qd + kvd, qkv_dim(), stream);
        if (comp) {
          const uint8_t* flags = nullptr;
          const float* scores = nullptr;  // where decode-time anchors' running scores start
          if (quant) {
            const auto& f = quant->anchor_flags(l);
            ANTKV_CHECK(f.size() == static_cast<size_t>(T) * cfg.num_kv_heads,
                        "GpuRuntime: the quantizer's anchor flags of layer {} hold {} entries, expected {}", l, f.size(),
                        static_cast<size_t>(T) * cfg.num_kv_heads);
            flags = f.data();
            const auto& sc = quant->anchor_scores(l);
            if (sc.size() == f.size()) scores = sc.data();
          }
          comp->write_prefill(l, 0, T, qkv.get() + qd, qkv_dim(), qkv.get() + qd + kvd, qkv_dim(), k_pre.get(), kvd, flags,
                              scores, stream);
        }
      }
      blas->linear(attn.get(), qd, L.wo.get(), x.get(), H, T, H, qd, 1.0f);  // x += attn . Wo^T

      rn.weight = L.ffn_norm.get();
      cuda::rmsnorm(rn, stream);
      blas->linear(hn.get(), H, L.wgu.get(), gu.get(), 2 * F, T, 2 * F, H);
      cuda::SwigluParams sp;
      sp.gate = gu.get();
      sp.up = gu.get() + F;
      sp.out = act.get();
      sp.out_type = ElemType::kBF16;
      sp.n_rows = T;
      sp.n = F;
      sp.ld_in = 2 * F;
      cuda::swiglu(sp, stream);
      blas->linear(act.get(), F, L.wdown.get(), x.get(), H, T, H, F, 1.0f);  // x += act . Wdown^T
    }
  }

  void final_norm_rows(int first_row, int n_rows) {
    cuda::RmsNormParams rn;
    rn.x = x.get() + static_cast<size_t>(first_row) * cfg.hidden_size;
    rn.weight = final_norm.get();
    rn.y = hn.get();
    rn.y_type = ElemType::kBF16;
    rn.n_rows = n_rows;
    rn.n = cfg.hidden_size;
    rn.eps = static_cast<float>(cfg.rms_norm_eps);
    cuda::rmsnorm(rn, stream);
  }

  void check_tokens(const int32_t* tokens, int n) const {
    for (int i = 0; i < n; ++i)
      ANTKV_CHECK(tokens[i] >= 0 && tokens[i] < cfg.vocab_size, "GpuRuntime: token id {} at {} outside the vocabulary [0, {})",
                  tokens[i], i, cfg.vocab_size);
  }

  void forward(const ForwardRequest& req, ForwardResult& out) {
    out.logits.clear();
    out.nll.clear();
    const int T = req.n_tokens;
    ANTKV_CHECK(T >= 0 && (T == 0 || req.tokens), "GpuRuntime::forward: bad request");
    if (T == 0) return;
    check_tokens(req.tokens, T);
    const int past = lens[0];
    GpuUniformKvCache* uni = opt.uniform_kv ? uniform.get() : nullptr;
    if (opt.uniform_kv) {
      ANTKV_CHECK(uni, "GpuRuntime: uniform_kv is set but no uniform cache is installed");
      if (T > 1 && past > 0)
        fail("GPU runtime ({} cache): a prefill chunk of {} tokens after {} cached tokens; prefill over the packed "
             "uniform cache is one chunk into an empty sequence (--prefill-chunk 0), then one token per step",
             uni->name(), T, past);
    }
    GpuCompressedKvCache* comp = opt.compressed_kv ? compressed.get() : nullptr;
    if (opt.compressed_kv) {
      ANTKV_CHECK(comp, "GpuRuntime: compressed_kv is set but no compressed cache is installed");
      if (T > 1 && past > 0)
        fail("GPU runtime ({} compressed cache): a prefill chunk of {} tokens after {} cached tokens; prefill over the "
             "compressed cache is one chunk into an empty sequence (--prefill-chunk 0), then one token per step",
             comp->name(), T, past);
    }
    if (past + T > capacity)
      fail("GPU runtime: its KV cache holds {} tokens per sequence, and {} cached + {} new exceed it (the "
           "capacity is the evaluation's window length: --seq-len, eval.seq_len or calibration.seq_len)",
           capacity, past, T);
    ensure_rows(T);
    const int H = cfg.hidden_size, V = cfg.vocab_size;
    // ints: tokens [T] | positions [T] | seq_lens [1] | targets [T]
    int32_t* hi = host_ints.get();
    std::memcpy(hi, req.tokens, T * sizeof(int32_t));
    for (int i = 0; i < T; ++i) hi[T + i] = past + i;
    hi[2 * T] = past + T;
    const bool want_nll = req.targets != nullptr;
    if (want_nll) std::memcpy(hi + 2 * T + 1, req.targets, T * sizeof(int32_t));
    const size_t n_ints = 2 * T + 1 + (want_nll ? T : 0);
    ANTKV_CUDA_CHECK(cudaMemcpyAsync(ints.get(), hi, n_ints * sizeof(int32_t), cudaMemcpyHostToDevice, stream));
    const int32_t* d_tok = ints.get();
    const int32_t* d_pos = ints.get() + T;
    const int32_t* d_lens = ints.get() + 2 * T;
    const int32_t* d_tgt = ints.get() + 2 * T + 1;

    cuda::EmbeddingParams ep;
    ep.table = embed.get();
    ep.tokens = d_tok;
    ep.out = x.get();
    ep.n_tokens = T;
    ep.hidden = H;
    ep.vocab = V;
    cuda::embedding(ep, stream);
    const bool decode = (T == 1);
    cuda::DecodePlan plan;
    if (decode && comp) {
      comp->plan_step(1, stream);
      qplan = comp->plan(1, cfg.num_heads);
    } else if (decode && uni) {
      uni->plan_step(1, stream);  // the host length one token on, uploaded before the step
      uplan = uni->plan(1, cfg.num_heads);
    } else if (decode) {
      plan = cuda::plan_flash_decode(1, cfg.num_kv_heads, past + T, cfg.head_dim);
    }
    if ((comp || uni) && !decode) {
      const size_t n = static_cast<size_t>(cfg.num_kv_heads) * T * cfg.head_dim;
      prefill_k.ensure(n);
      prefill_v.ensure(n);
    }
    run_layers(T, decode, past, d_pos, nullptr, d_lens, plan, req.observer, quantizer.get());
    if (comp && !decode) comp->commit_prefill(0, T);
    if (uni && !decode) uni->commit_prefill(0, T);
    lens[0] = past + T;

    const bool all_rows = want_nll || req.logits == LogitsMode::kAll;
    if (all_rows || req.logits == LogitsMode::kLast) {
      const int first = all_rows ? 0 : T - 1;
      const int n_rows = T - first;
      final_norm_rows(first, n_rows);
      if (req.logits == LogitsMode::kAll) out.logits.resize(static_cast<size_t>(T) * V);
      if (req.logits == LogitsMode::kLast) out.logits.resize(V);
      for (int r0 = 0; r0 < n_rows; r0 += logits_rows) {
        const int c = std::min(logits_rows, n_rows - r0);
        blas->linear(hn.get() + static_cast<size_t>(r0) * H, H, lm_head, logits.get(), V, c, V, H);
        if (want_nll) {
          cuda::NllParams np;
          np.logits = logits.get();
          np.targets = d_tgt + r0;
          np.nll = nll.get() + r0;
          np.n_rows = c;
          np.vocab = V;
          np.ld = V;
          cuda::nll_rows(np, stream);
        }
        if (req.logits == LogitsMode::kAll) {
          ANTKV_CUDA_CHECK(cudaMemcpyAsync(out.logits.data() + static_cast<size_t>(first + r0) * V, logits.get(),
                                           static_cast<size_t>(c) * V * sizeof(float), cudaMemcpyDeviceToHost, stream));
        } else if (req.logits == LogitsMode::kLast && first + r0 + c == T) {
          ANTKV_CUDA_CHECK(cudaMemcpyAsync(out.logits.data(), logits.get() + static_cast<size_t>(c - 1) * V,
                                           V * sizeof(float), cudaMemcpyDeviceToHost, stream));
        }
        // the logits buffer is reused by the next chunk: stream order keeps copies before overwrites
      }
      if (want_nll) {
        out.nll.resize(T);
        ANTKV_CUDA_CHECK(cudaMemcpyAsync(out.nll.data(), nll.get(), T * sizeof(float), cudaMemcpyDeviceToHost, stream));
      }
    }
    ANTKV_CUDA_CHECK(cudaStreamSynchronize(stream));
  }

  void decode_batch(const std::vector<int32_t>& tokens, std::vector<float>* out_logits, std::vector<int32_t>* next) {
    const int B = static_cast<int>(tokens.size());
    ANTKV_CHECK(B >= 1 && B <= opt.max_batch, "decode_batch: batch {} outside [1, max_batch {}]", B, opt.max_batch);
    ANTKV_CHECK(!quantizer || opt.compressed_kv || opt.uniform_kv,
                "decode_batch: not supported with a KV-cache quantizer ({}) on the simulated cache; use forward()",
                quantizer ? quantizer->name() : std::string());
    GpuCompressedKvCache* comp = opt.compressed_kv ? compressed.get() : nullptr;
    ANTKV_CHECK(!opt.compressed_kv || comp, "GpuRuntime: compressed_kv is set but no compressed cache is installed");
    GpuUniformKvCache* uni = opt.uniform_kv ? uniform.get() : nullptr;
    ANTKV_CHECK(!opt.uniform_kv || uni, "GpuRuntime: uniform_kv is set but no uniform cache is installed");
    check_tokens(tokens.data(), B);
    int max_len = 0;
    for (int b = 0; b < B; ++b) {
      if (lens[b] + 1 > capacity)
        fail("GpuRuntime: KV cache capacity exceeded: sequence {} holds {} tokens, capacity {}", b, lens[b], capacity);
      max_len = std::max(max_len, lens[b] + 1);
    }
    const int V = cfg.vocab_size;
    // ints: tokens [B] | positions [B] | seq_index [B] | seq_lens [B] | argmax [B]
    int32_t* hi = host_ints.get();
    for (int b = 0; b < B; ++b) {
      hi[b] = tokens[b];
      hi[B + b] = lens[b];
      hi[2 * B + b] = b;
      hi[3 * B + b] = lens[b] + 1;
    }
    ANTKV_CUDA_CHECK(cudaMemcpyAsync(ints.get(), hi, 4 * B * sizeof(int32_t), cudaMemcpyHostToDevice, stream));
    cuda::DecodePlan plan;
    if (comp) {
      comp->plan_step(B, stream);  // host counts one token on; slots and counts uploaded before the step
      qplan = comp->plan(B, cfg.num_heads);
      plan.n_splits = qplan.n_splits;
      plan.split_len = qplan.split_len;
    } else if (uni) {
      uni->plan_step(B, stream);  // host lengths one token on, uploaded before the step
      uplan = uni->plan(B, cfg.num_heads);
      plan.n_splits = uplan.n_splits;
      plan.split_len = uplan.split_len;
    } else {
      plan = cuda::plan_flash_decode(B, cfg.num_kv_heads, max_len, cfg.head_dim);
    }
    auto body = [&] {
      cuda::EmbeddingParams ep;
      ep.table = embed.get();
      ep.tokens = ints.get();
      ep.out = x.get();
      ep.n_tokens = B;
      ep.hidden = cfg.hidden_size;
      ep.vocab = V;
      cuda::embedding(ep, stream);
      run_layers(B, true, 0, ints.get() + B, ints.get() + 2 * B, ints.get() + 3 * B, plan, nullptr);
      final_norm_rows(0, B);
      blas->linear(hn.get(), cfg.hidden_size, lm_head, logits.get(), V, B, V, cfg.hidden_size);
      if (next) {
        cuda::ArgmaxParams ap;
        ap.logits = logits.get();
        ap.out = ints.get() + 4 * B;
        ap.n_rows = B;
        ap.vocab = V;
        ap.ld = V;
        cuda::argmax_rows(ap, stream);
      }
    };
    const GraphKey key{B, plan.n_splits, plan.split_len, next != nullptr};
    auto it = graphs.find(key);
    if (!opt.use_graphs || cuda::sync_mode()) {
      body();
    } else if (it != graphs.end()) {
      ANTKV_CUDA_CHECK(cudaGraphLaunch(it->second, stream));
    } else if (!seen.count(key)) {
      body();  // first time eagerly: lazy initialization (function attributes, cuBLAS) stays out of capture
      if (seen.size() >= 64) seen.clear();
      seen.insert(key);
    } else {
      cudaGraph_t graph = nullptr;
      ANTKV_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
      try {
        body();
      } catch (...) {
        cudaStreamEndCapture(stream, &graph);
        if (graph) cudaGraphDestroy(graph);
        (void)cudaGetLastError();
        throw;
      }
      ANTKV_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
      cudaGraphExec_t exec = nullptr;
      const cudaError_t err = cudaGraphInstantiate(&exec, graph, 0);
      cudaGraphDestroy(graph);
      if (err != cudaSuccess) cuda::throw_cuda_error(err, "cudaGraphInstantiate(decode step)", __FILE__, __LINE__);
      if (graphs.size() >= 16) {  // the plan changes every n_splits * 64 tokens: keep the cache small
        for (auto& kv : graphs) cudaGraphExecDestroy(kv.second);
        graphs.clear();
      }
      graphs.emplace(key, exec);
      ANTKV_CUDA_CHECK(cudaGraphLaunch(exec, stream));
    }
    for (int b = 0; b < B; ++b) lens[b] += 1;
    if (next) {
      next->resize(B);
      ANTKV_CUDA_CHECK(cudaMemcpyAsync(next->data(), ints.get() + 4 * B, B * sizeof(int32_t), cudaMemcpyDeviceToHost, stream));
    }
    if (out_logits) {
      out_logits->resize(static_cast<size_t>(B) * V);
      ANTKV_CUDA_CHECK(cudaMemcpyAsync(out_logits->data(), logits.get(), static_cast<size_t>(B) * V * sizeof(float),
                                       cudaMemcpyDeviceToHost, stream));
    }
    ANTKV_CUDA_CHECK(cudaStreamSynchronize(stream));
  }

  ~Impl() {
    clear_graphs();
    blas.reset();
    if (stream) cudaStreamDestroy(stream);
  }
};

GpuRuntime::GpuRuntime(const Checkpoint& ckpt, const GpuRuntimeOptions& opt) : impl_(std::make_unique<Impl>()) {
  impl_->opt = opt;
  impl_->load(ckpt);
}

GpuRuntime::GpuRuntime(const ModelConfig& cfg, uint64_t seed, const GpuRuntimeOptions& opt)
    : impl_(std::make_unique<Impl>()) {
  impl_->init_common(cfg, opt);
  impl_->randomize(seed);
}

GpuRuntime::~GpuRuntime() = default;

const ModelConfig& GpuRuntime::config() const { return impl_->cfg; }
std::string GpuRuntime::device_name() const { return impl_->name; }
void GpuRuntime::reset() {
  std::fill(impl_->lens.begin(), impl_->lens.end(), 0);
  if (impl_->quantizer) impl_->quantizer->reset();
  if (impl_->compressed) impl_->compressed->reset();
  if (impl_->uniform) impl_->uniform->reset();
}
void GpuRuntime::set_kv_quantizer(std::unique_ptr<GpuKvQuantizer> q) {
  ANTKV_CUDA_CHECK(cudaStreamSynchronize(impl_->stream));  // nothing in flight uses the old one
  impl_->quantizer = std::move(q);
}
GpuKvQuantizer* GpuRuntime::kv_quantizer() const { return impl_->quantizer.get(); }
namespace {
// A real cache (compressed or uniform) into the runtime's slot: it must match the runtime's batch and capacity;
// the graphs, which hold the old cache's pointers, are dropped, and every sequence starts empty.
template <class Cache, class Impl>
void install_cache(Impl& impl, std::unique_ptr<Cache>& slot, std::unique_ptr<Cache> c, bool enabled, const char* kind,
                   const char* option) {
  ANTKV_CHECK(enabled, "GpuRuntime: set_{}_cache needs GpuRuntimeOptions::{}", kind, option);
  ANTKV_CHECK(!c || (c->max_batch() == impl.opt.max_batch && c->capacity() == impl.capacity),
              "GpuRuntime: the {} cache holds {} sequences of {} tokens, the runtime {} of {}", kind,
              c ? c->max_batch() : 0, c ? c->capacity() : 0, impl.opt.max_batch, impl.capacity);
  ANTKV_CUDA_CHECK(cudaStreamSynchronize(impl.stream));
  impl.clear_graphs();
  slot = std::move(c);
  std::fill(impl.lens.begin(), impl.lens.end(), 0);
}
}  // namespace

void GpuRuntime::set_compressed_cache(std::unique_ptr<GpuCompressedKvCache> c) {
  install_cache(*impl_, impl_->compressed, std::move(c), impl_->opt.compressed_kv, "compressed", "compressed_kv");
}
GpuCompressedKvCache* GpuRuntime::compressed_cache() const { return impl_->compressed.get(); }
void GpuRuntime::set_uniform_cache(std::unique_ptr<GpuUniformKvCache> c) {
  install_cache(*impl_, impl_->uniform, std::move(c), impl_->opt.uniform_kv, "uniform", "uniform_kv");
}
GpuUniformKvCache* GpuRuntime::uniform_cache() const { return impl_->uniform.get(); }
int GpuRuntime::cached_tokens() const { return impl_->lens[0]; }
void GpuRuntime::forward(const ForwardRequest& req, ForwardResult& out) { impl_->forward(req, out); }
int GpuRuntime::max_batch() const { return impl_->opt.max_batch; }
int GpuRuntime::capacity() const { return impl_->capacity; }

void GpuRuntime::set_batch_lengths(const std::vector<int>& lens) {
  ANTKV_CHECK(static_cast<int>(lens.size()) <= impl_->opt.max_batch, "set_batch_lengths: {} sequences > max_batch {}",
              lens.size(), impl_->opt.max_batch);
  for (size_t b = 0; b < lens.size(); ++b) {
    ANTKV_CHECK(lens[b] >= 0 && lens[b] <= impl_->capacity, "set_batch_lengths: length {} outside [0, capacity {}]",
                lens[b], impl_->capacity);
    impl_->lens[b] = lens[b];
  }
  if (impl_->compressed) impl_->compressed->set_synthetic_lengths(lens);
  if (impl_->uniform) impl_->uniform->set_synthetic_lengths(lens);
}

std::vector<int> GpuRuntime::batch_lengths() const { return impl_->lens; }

void GpuRuntime::fill_kv_random(uint64_t seed) {
  if (impl_->opt.compressed_kv) {
    ANTKV_CHECK(impl_->compressed, "fill_kv_random: no compressed cache installed");
    impl_->compressed->fill_random(seed, impl_->stream);
    return;
  }
  if (impl_->opt.uniform_kv) {
    ANTKV_CHECK(impl_->uniform, "fill_kv_random: no uniform cache installed");
    impl_->uniform->fill_random(seed, impl_->stream);
    return;
  }
  uint64_t s = seed * 7919ull + 3;
  for (auto& L : impl_->layers) {
    cuda::fill_random_bf16(L.k_cache.get(), static_cast<int64_t>(L.k_cache.size()), s++, 1.0f, impl_->stream);
    cuda::fill_random_bf16(L.v_cache.get(), static_cast<int64_t>(L.v_cache.size()), s++, 1.0f, impl_->stream);
  }
  synchronize();
}

void GpuRuntime::decode_batch(const std::vector<int32_t>& tokens, std::vector<float>* logits,
                              std::vector<int32_t>* next_tokens) {
  impl_->decode_batch(tokens, logits, next_tokens);
}

void GpuRuntime::set_use_graphs(bool on) { impl_->opt.use_graphs = on; }
void GpuRuntime::synchronize() { ANTKV_CUDA_CHECK(cudaStreamSynchronize(impl_->stream)); }
size_t GpuRuntime::weight_bytes() const { return impl_->weight_bytes; }
size_t GpuRuntime::step_weight_bytes() const {
  // an untied embedding is only gathered (a few rows), the LM head is read whole
  return impl_->weight_bytes - (impl_->lm_head == impl_->embed.get() ? 0 : impl_->embed.bytes());
}
size_t GpuRuntime::kv_bytes_per_token() const {
  if (impl_->opt.compressed_kv && impl_->compressed) return impl_->compressed->code_bytes_per_token();
  if (impl_->opt.uniform_kv && impl_->uniform) return impl_->uniform->code_bytes_per_token();
  const auto& c = impl_->cfg;
  return static_cast<size_t>(c.num_layers) * 2 * c.num_kv_heads * c.head_dim * sizeof(bf16);
}

size_t GpuRuntime::kv_device_bytes() const {
  if (impl_->opt.compressed_kv) return impl_->compressed ? impl_->compressed->device_bytes() : 0;
  if (impl_->opt.uniform_kv) return impl_->uniform ? impl_->uniform->device_bytes() : 0;
  size_t n = 0;
  for (const auto& L : impl_->layers) n += L.k_cache.bytes() + L.v_cache.bytes();
  return n;
}

std::unique_ptr<Runtime> make_gpu_runtime(const Checkpoint& ckpt, const GpuRuntimeOptions& opt) {
  return std::make_unique<GpuRuntime>(ckpt, opt);
}

}  // namespace antkv
