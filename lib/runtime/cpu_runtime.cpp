#include "runtime/cpu_runtime.h"

#include <omp.h>
#include <unistd.h>

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <limits>

#include "core/error.h"
#include "runtime/cpu_ops.h"
#include "runtime/rope.h"

namespace antkv {

using MatrixRM = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MapRM = Eigen::Map<MatrixRM>;
using ConstMapRM = Eigen::Map<const MatrixRM>;

struct CpuRuntime::LayerWeights {
  std::vector<float> attn_norm, mlp_norm;       // [h]
  std::vector<float> wq, wk, wv, wo;            // [q,h] [kv,h] [kv,h] [h,q]
  std::vector<float> bq, bk, bv;                // [q] [kv] [kv] (attention_bias only)
  std::vector<float> w_gate, w_up, w_down;      // [f,h] [f,h] [h,f]
};

namespace {
double physical_ram_gb() {
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
  return pages > 0 && page > 0 ? static_cast<double>(pages) * page / 1e9 : 8.0;
}

void load_into(std::vector<float>& dst, const TensorView& t) {
  dst.resize(static_cast<size_t>(t.numel()));
  t.to_float(dst.data());
}

// y[T, out] = x[T, in] * W[out, in]^T (+ bias[out])
void linear(const float* x, const std::vector<float>& w, const std::vector<float>* bias, float* y, int T,
            int in, int out) {
  ConstMapRM X(x, T, in), W(w.data(), out, in);
  MapRM Y(y, T, out);
  Y.noalias() = X * W.transpose();
  if (bias && !bias->empty()) Y.rowwise() += Eigen::Map<const Eigen::RowVectorXf>(bias->data(), out);
}
}  // namespace

void attention_blocked(const float* q, const float* k, const float* v, float* out, float* lse, int n_q,
                       int n_kv_tokens, int n_heads, int n_kv_heads, int d, float scale, const float* key_err) {
  const int past = n_kv_tokens - n_q;
  const int group = n_heads / n_kv_heads;
  constexpr int kBlock = 64;  // query rows per task: bounds the score matrix to kBlock x n_kv_tokens
  const int n_blocks = (n_q + kBlock - 1) / kBlock;
  using Stride = Eigen::OuterStride<>;
  using ConstStrided = Eigen::Map<const MatrixRM, 0, Stride>;
  using Strided = Eigen::Map<MatrixRM, 0, Stride>;
#pragma omp parallel
  {
    MatrixRM scores;
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int h = 0; h < n_heads; ++h) {
      for (int b = 0; b < n_blocks; ++b) {
        const int kvh = h / group;
        const int i0 = b * kBlock, rows = std::min(kBlock, n_q - i0);
        const int n_keys = past + i0 + rows;  // the last row of the block sees keys [0, n_keys)
        ConstStrided Q(q + (static_cast<int64_t>(i0) * n_heads + h) * d, rows, d, Stride(n_heads * d));
        ConstStrided K(k + static_cast<int64_t>(kvh) * d, n_keys, d, Stride(n_kv_heads * d));
        ConstStrided V(v + static_cast<int64_t>(kvh) * d, n_keys, d, Stride(n_kv_heads * d));
        scores.noalias() = (Q * K.transpose()) * scale;
        for (int r = 0; r < rows; ++r) {
          const int visible = past + i0 + r + 1;  // causal
          float* s = scores.row(r).data();
          if (key_err) {
            const float half_var = 0.5f * scale * scale * Q.row(r).squaredNorm();
            for (int j = 0; j < visible; ++j) s[j] += half_var * key_err[static_cast<int64_t>(j) * n_kv_heads + kvh];
          }
          float m = -std::numeric_limits<float>::infinity();
          for (int j = 0; j < visible; ++j) m = std::max(m, s[j]);
          double sum = 0;
          for (int j = 0; j < visible; ++j) {
            s[j] = std::exp(s[j] - m);
            sum += s[j];
          }
          const float inv = static_cast<float>(1.0 / sum);
          for (int j = 0; j < visible; ++j) s[j] *= inv;
          for (int j = visible; j < n_keys; ++j) s[j] = 0.0f;
          if (lse) lse[static_cast<int64_t>(h) * n_q + i0 + r] = static_cast<float>(m + std::log(sum));
        }
        Strided O(out + (static_cast<int64_t>(i0) * n_heads + h) * d, rows, d, Stride(n_heads * d));
        O.noalias() = scores * V;
      }
    }
  }
}

CpuRuntime::CpuRuntime(const Checkpoint& ckpt, CpuRuntimeOptions opts)
    : ckpt_(ckpt), cfg_(ckpt.config()), opts_(opts) {
  if (opts_.threads > 0) omp_set_num_threads(opts_.threads);
  Eigen::initParallel();
  inv_freq_ = rope_inv_freq(cfg_);
  load_into(embed_, ckpt.tensor("model.embed_tokens.weight", {cfg_.vocab_size, cfg_.hidden_size}));
  load_into(final_norm_, ckpt.tensor("model.norm.weight", {cfg_.hidden_size}));
  if (!(cfg_.tie_word_embeddings && !ckpt.has("lm_head.weight"))) load_into(lm_head_, ckpt.lm_head());

  const double budget = opts_.resident_budget_gb >= 0 ? opts_.resident_budget_gb : physical_ram_gb() / 2;
  const double fp32_gb = static_cast<double>(ckpt.total_bytes()) / 1e9 *
                         (ckpt.tensor("model.embed_tokens.weight").dtype == DType::kF32 ? 1.0 : 2.0);
  resident_ = fp32_gb <= budget;
  layers_.resize(resident_ ? cfg_.num_layers : 1);
  if (resident_)
    for (int l = 0; l < cfg_.num_layers; ++l) layer(l);
  cache_ = std::make_unique<DenseKvCache>(cfg_, opts_.kv_dtype);
}

CpuRuntime::~CpuRuntime() = default;

std::string CpuRuntime::device_name() const {
  return fmt::format("cpu ({} threads{})", omp_get_max_threads(), resident_ ? "" : ", streamed weights");
}

const CpuRuntime::LayerWeights& CpuRuntime::layer(int l) {
  const int slot = resident_ ? l : 0;
  if (layers_[slot] && (resident_ || scratch_layer_ == l)) return *layers_[slot];
  if (!layers_[slot]) layers_[slot] = std::make_unique<LayerWeights>();
  LayerWeights& w = *layers_[slot];
  const int64_t h = cfg_.hidden_size, q = cfg_.q_dim(), kv = cfg_.kv_dim(), f = cfg_.intermediate_size;
  auto name = [l](const char* s) { return Checkpoint::layer_name(l, s); };
  load_into(w.attn_norm, ckpt_.tensor(name("input_layernorm.weight"), {h}));
  load_into(w.mlp_norm, ckpt_.tensor(name("post_attention_layernorm.weight"), {h}));
  load_into(w.wq, ckpt_.tensor(name("self_attn.q_proj.weight"), {q, h}));
  load_into(w.wk, ckpt_.tensor(name("self_attn.k_proj.weight"), {kv, h}));
  load_into(w.wv, ckpt_.tensor(name("self_attn.v_proj.weight"), {kv, h}));
  load_into(w.wo, ckpt_.tensor(name("self_attn.o_proj.weight"), {h, q}));
  if (cfg_.attention_bias) {
    load_into(w.bq, ckpt_.tensor(name("self_attn.q_proj.bias"), {q}));
    load_into(w.bk, ckpt_.tensor(name("self_attn.k_proj.bias"), {kv}));
    load_into(w.bv, ckpt_.tensor(name("self_attn.v_proj.bias"), {kv}));
  }
  load_into(w.w_gate, ckpt_.tensor(name("mlp.gate_proj.weight"), {f, h}));
  load_into(w.w_up, ckpt_.tensor(name("mlp.up_proj.weight"), {f, h}));
  load_into(w.w_down, ckpt_.tensor(name("mlp.down_proj.weight"), {h, f}));
  scratch_layer_ = l;
  return w;
}

void CpuRuntime::forward(const ForwardRequest& req, ForwardResult& out) {
  const int T = req.n_tokens;
  ANTKV_CHECK(T > 0 && req.tokens, "forward: no tokens");
  const int h = cfg_.hidden_size, nq = cfg_.q_dim(), nkv = cfg_.kv_dim(), f = cfg_.intermediate_size;
  const int d = cfg_.head_dim, V = cfg_.vocab_size;
  const int past = cache_->length(0);
  for (int t = 0; t < T; ++t)
    ANTKV_CHECK(req.tokens[t] >= 0 && req.tokens[t] < V, "forward: token id {} out of range [0, {})",
                req.tokens[t], V);

  std::vector<int32_t> positions(T);
  for (int t = 0; t < T; ++t) positions[t] = past + t;
  std::vector<float> x(static_cast<size_t>(T) * h), xn(x.size()), q(static_cast<size_t>(T) * nq),
      k(static_cast<size_t>(T) * nkv), k_pre, v(static_cast<size_t>(T) * nkv), attn(q.size()),
      gate(static_cast<size_t>(T) * f), up(gate.size());
  for (int t = 0; t < T; ++t)
    std::copy_n(embed_.data() + static_cast<size_t>(req.tokens[t]) * h, h, x.data() + static_cast<size_t>(t) * h);

  const float eps = static_cast<float>(cfg_.rms_norm_eps);
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  for (int l = 0; l < cfg_.num_layers; ++l) {
    const LayerWeights& w = layer(l);
    cpu::rmsnorm(x.data(), w.attn_norm.data(), xn.data(), T, h, eps);
    linear(xn.data(), w.wq, &w.bq, q.data(), T, h, nq);
    linear(xn.data(), w.wk, &w.bk, k.data(), T, h, nkv);
    linear(xn.data(), w.wv, &w.bv, v.data(), T, h, nkv);
    k_pre = k;  // kept for quantizers that store pre-RoPE keys and for observers
    rope_apply(q.data(), T, cfg_.num_heads, d, positions.data(), inv_freq_.data());
    rope_apply(k.data(), T, cfg_.num_kv_heads, d, positions.data(), inv_freq_.data());
    if (req.observer) {
      LayerActivations act;
      act.layer = l;
      act.n_tokens = T;
      act.position0 = past;
      act.q = q.data();
      act.k_pre_rope = k_pre.data();
      act.k_post_rope = k.data();
      act.v = v.data();
      req.observer->on_layer(act);
    }
    KvAppend app;
    app.layer = l;
    app.n_tokens = T;
    app.position0 = past;
    app.k_pre_rope = k_pre.data();
    app.k_post_rope = k.data();
    app.v = v.data();
    app.q = q.data();
    cache_->append(app);
    const int S = cache_->length(l);
    attention_blocked(q.data(), cache_->keys(l), cache_->values(l), attn.data(), nullptr, T, S, cfg_.num_heads,
                      cfg_.num_kv_heads, d, scale, cache_->key_error(l));
    linear(attn.data(), w.wo, nullptr, xn.data(), T, nq, h);
    for (size_t i = 0; i < x.size(); ++i) x[i] += xn[i];

    cpu::rmsnorm(x.data(), w.mlp_norm.data(), xn.data(), T, h, eps);
    linear(xn.data(), w.w_gate, nullptr, gate.data(), T, h, f);
    linear(xn.data(), w.w_up, nullptr, up.data(), T, h, f);
    cpu::swiglu(gate.data(), up.data(), gate.data(), static_cast<int64_t>(T) * f);
    linear(gate.data(), w.w_down, nullptr, xn.data(), T, f, h);
    for (size_t i = 0; i < x.size(); ++i) x[i] += xn[i];
  }
  cpu::rmsnorm(x.data(), final_norm_.data(), xn.data(), T, h, eps);

  const std::vector<float>& head = lm_head_.empty() ? embed_ : lm_head_;
  out.logits.clear();
  out.nll.clear();
  if (req.logits == LogitsMode::kAll) {
    out.logits.resize(static_cast<size_t>(T) * V);
    linear(xn.data(), head, nullptr, out.logits.data(), T, h, V);
  } else if (req.logits == LogitsMode::kLast) {
    out.logits.resize(static_cast<size_t>(V));
    linear(xn.data() + static_cast<size_t>(T - 1) * h, head, nullptr, out.logits.data(), 1, h, V);
  }
  if (req.targets) {
    out.nll.assign(static_cast<size_t>(T), 0.0f);
    if (req.logits == LogitsMode::kAll) {
      cpu::nll_from_logits(out.logits.data(), req.targets, out.nll.data(), T, V);
    } else {
      const int chunk = std::max(1, opts_.lm_head_chunk);
      std::vector<float> logits(static_cast<size_t>(std::min(chunk, T)) * V);
      for (int r0 = 0; r0 < T; r0 += chunk) {
        const int rows = std::min(chunk, T - r0);
        linear(xn.data() + static_cast<size_t>(r0) * h, head, nullptr, logits.data(), rows, h, V);
        cpu::nll_from_logits(logits.data(), req.targets + r0, out.nll.data() + r0, rows, V);
      }
    }
  }
}

}  // namespace antkv
