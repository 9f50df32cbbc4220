#include "quant/codebook_fit.h"

#include "core/error.h"

namespace antkv {

void check_codebooks_fit(const MethodSpec& m, const CodebookSet& cb, const ModelConfig& cfg) {
  const CodebookMeta& cm = cb.meta;
  const int KV = cfg.num_kv_heads, d = cfg.head_dim, L = cfg.num_layers;
  ANTKV_CHECK(cm.config_hash == cfg.config_hash, "method {}: the codebooks were trained for another model", m.text);
  ANTKV_CHECK(cm.num_layers == L && cm.num_kv_heads == KV && cm.head_dim == d,
              "method {}: codebook shapes do not match the model (codebooks: {} layers, {} KV heads, head_dim {}; "
              "model: {}, {}, {})",
              m.text, cm.num_layers, cm.num_kv_heads, cm.head_dim, L, KV, d);
  ANTKV_CHECK(m.listed_layers() == 0 || m.listed_layers() == L,
              "method {}: lkbits/lvbits/lratio list {} layers, the model has {}", m.text, m.listed_layers(), L);
  // per-layer widths: the set merges the layers of several files (lib/eval/compare.cpp, meta of layer 0's), so
  // every layer's arrays are checked against its own configuration below instead
  ANTKV_CHECK(m.layered() || (cm.key_c == m.keys.c && cm.key_b == m.keys.b && cm.value_c == m.values.c &&
                              cm.value_b == m.values.b),
              "method {}: codebooks are keys c{}b{} / values c{}b{}, the method needs c{}b{} / c{}b{}", m.text, cm.key_c,
              cm.key_b, cm.value_c, cm.value_b, m.keys.c, m.keys.b, m.values.c, m.values.b);
  ANTKV_CHECK(cm.key_rope == option_name(m.key_rope), "method {}: codebooks are for {}-RoPE keys, the method needs {}-RoPE",
              m.text, cm.key_rope, option_name(m.key_rope));
  ANTKV_CHECK(cm.gain == option_name(m.gain),
              "method {}: codebooks are for gain={} (unit-vector training), the method needs gain={}", m.text, cm.gain,
              option_name(m.gain));
  ANTKV_CHECK(cm.rotate == option_name(m.rotate), "method {}: codebooks are for rotate={}, the method needs rotate={}",
              m.text, cm.rotate, option_name(m.rotate));
  ANTKV_CHECK(cm.metric == option_name(m.metric), "method {}: codebooks are for metric={}, the method needs metric={}",
              m.text, cm.metric, option_name(m.metric));
  ANTKV_CHECK(static_cast<int>(cb.keys.size()) == L && static_cast<int>(cb.values.size()) == L,
              "method {}: codebooks hold {} / {} layers of key / value centroids, the model has {}", m.text,
              cb.keys.size(), cb.values.size(), L);
  const size_t kv = static_cast<size_t>(KV), dd = static_cast<size_t>(d);
  for (int l = 0; l < L; ++l)
    for (int side = 0; side < 2; ++side) {
      const LayerCodebooks& lc = side ? cb.values[l] : cb.keys[l];
      const VqConfig q = side ? m.value_config(l) : m.key_config(l);
      const char* what = side ? "value" : "key";
      ANTKV_CHECK(q.c >= 1 && d % q.c == 0, "method {}: layer {}: group size c = {} does not divide head_dim {}", m.text,
                  l, q.c, d);
      const size_t want = kv * (dd / q.c) * (size_t{1} << q.b) * q.c;
      ANTKV_CHECK(lc.centroids.size() == want,
                  "method {}: layer {} {} centroids hold {} floats, expected {} ([kv_heads {}, groups {}, 2^{}, c {}]: "
                  "the c{}b{} shape)",
                  m.text, l, what, lc.centroids.size(), want, KV, d / q.c, q.b, q.c, q.c, q.b);
      ANTKV_CHECK(lc.error_norm.empty() || lc.error_norm.size() == kv,
                  "method {}: layer {} {} error_norm holds {} values, expected {} (one per KV head)", m.text, l, what,
                  lc.error_norm.size(), KV);
      if (m.rotate != Rotate::kOff)
        ANTKV_CHECK(lc.rotation.size() == kv * dd * dd && lc.mean.size() == kv * dd,
                    "method {}: layer {} {} rotation / mean hold {} / {} floats, expected {} / {} ([kv_heads {}, d {}, d] "
                    "/ [kv_heads, d])",
                    m.text, l, what, lc.rotation.size(), lc.mean.size(), kv * dd * dd, kv * dd, KV, d);
      if (m.metric != Metric::kPlain)  // c x c per head and group
        ANTKV_CHECK(lc.metric.size() == kv * dd * q.c,
                    "method {}: layer {} {} metric=task factors hold {} floats, expected {} ([kv_heads {}, groups {}, c "
                    "{}, c])",
                    m.text, l, what, lc.metric.size(), kv * dd * q.c, KV, d / q.c, q.c);
    }
}

}  // namespace antkv
