#include "quant/method.h"

#include <algorithm>
#include <cmath>
#include <sstream>

#include "core/error.h"

namespace antkv {

std::string MethodSpec::codebook_file() const {
  return fmt::format("k-c{}b{}_v-c{}b{}_{}{}_{}{}{}{}.h5", keys.c, keys.b, values.c, values.b, weighting,
                     exclude_anchors ? "" : "_all", key_rope, gain == "off" ? "" : "_g" + gain,
                     rotate == "off" ? "" : "_r" + rotate, metric == "plain" ? "" : "_m" + metric);
}

std::string MethodSpec::anchors_name() const {
  return anchor_keys && anchor_values ? "kv" : anchor_keys ? "k" : anchor_values ? "v" : "off";
}

double MethodSpec::nominal_bits() const {
  if (kind == "fp16") return 16;
  if (kind == "uniform" || kind == "rsq") return bits;
  const int n = listed_layers();
  if (n > 0 && layered()) {
    double s = 0;
    for (int l = 0; l < n; ++l) s += (key_config(l).bits() + value_config(l).bits()) / 2;
    return s / n;
  }
  return (keys.bits() + values.bits()) / 2;
}

int MethodSpec::listed_layers() const {
  return static_cast<int>(std::max({layer_keys.size(), layer_values.size(), layer_ratio.size()}));
}

std::vector<MethodSpec> MethodSpec::codebook_specs() const {
  std::vector<MethodSpec> out;
  auto base = *this;
  base.layer_keys.clear(), base.layer_values.clear(), base.layer_ratio.clear();
  if (!layered()) return {base};
  for (int l = 0; l < listed_layers(); ++l) {
    MethodSpec s = base;
    s.keys = key_config(l), s.values = value_config(l);
    bool seen = false;
    for (const auto& o : out) seen |= o.codebook_file() == s.codebook_file();
    if (!seen) out.push_back(s);
  }
  return out;
}

std::string MethodSpec::codebook_key() const {
  if (!layered()) return codebook_file();
  std::string k = "layers:";
  for (int l = 0; l < listed_layers(); ++l) {
    MethodSpec s = *this;
    s.keys = key_config(l), s.values = value_config(l);
    k += (l ? "/" : "") + s.codebook_file();
  }
  return k;
}

MethodSpec parse_method(const std::string& text, const Recipe& r) {
  MethodSpec m;
  m.text = text;
  const size_t colon = text.find(':');
  m.kind = text.substr(0, colon);
  ANTKV_CHECK(m.kind == "fp16" || m.kind == "uniform" || m.kind == "vq" || m.kind == "antkv" || m.kind == "rsq",
              "method \"{}\": unknown kind \"{}\" (expected fp16, uniform, vq, antkv or rsq)", text, m.kind);
  m.keys = r.quant.keys;
  m.values = r.quant.values;
  m.ratio = r.anchor.ratio;
  m.score = r.anchor.score;
  m.key_rope = r.key_rope;
  m.weighting = r.kmeans.weighting;
  m.exclude_anchors = r.kmeans.exclude_anchors;
  if (m.kind == "rsq") m.bits = 1, m.anchors = m.anchor_keys = m.anchor_values = false, m.weighting = "none";
  if (m.kind == "vq") m.anchors = m.anchor_keys = m.anchor_values = false, m.weighting = "none", m.exclude_anchors = false;
  if (colon == std::string::npos) return m;
  ANTKV_CHECK(m.kind != "fp16", "method \"{}\": fp16 takes no options", text);
  std::stringstream ss(text.substr(colon + 1));
  for (std::string kv; std::getline(ss, kv, ',');) {
    const size_t eq = kv.find('=');
    ANTKV_CHECK(eq != std::string::npos, "method \"{}\": option \"{}\" is not key=value", text, kv);
    const std::string k = kv.substr(0, eq), v = kv.substr(eq + 1);
    auto number = [&]() {
      try {
        size_t used = 0;
        const double x = std::stod(v, &used);
        ANTKV_CHECK(used == v.size(), "");
        return x;
      } catch (...) {
        fail("method \"{}\": option {} needs a number, got \"{}\"", text, k, v);
      }
    };
    auto on_off = [&]() {
      ANTKV_CHECK(v == "on" || v == "off", "method \"{}\": option {} is on or off, got \"{}\"", text, k, v);
      return v == "on";
    };
    if (m.kind == "rsq") {
      if (k == "bits") m.bits = static_cast<int>(number());
      else if (k == "key_rope") {
        ANTKV_CHECK(v == "post" || v == "pre", "method \"{}\": key_rope is post or pre", text);
        m.key_rope = v;
      } else fail("method \"{}\": unknown option \"{}\" for rsq (bits, key_rope)", text, k);
    } else if (m.kind == "uniform") {
      if (k == "bits") m.bits = static_cast<int>(number());
      else if (k == "group") m.group = static_cast<int>(number());
      else if (k == "window") m.window = static_cast<int>(number());
      else fail("method \"{}\": unknown option \"{}\" for uniform (bits, group, window)", text, k);
    } else {
      if (k == "bits") m.keys = m.values = vq_config_for_bits(number());
      else if (k == "kbits") m.keys = vq_config_for_bits(number());
      else if (k == "vbits") m.values = vq_config_for_bits(number());
      else if (k == "anchors") {
        ANTKV_CHECK(v == "kv" || v == "on" || v == "k" || v == "v" || v == "off",
                    "method \"{}\": anchors is kv, k, v or off (on = kv), got \"{}\"", text, v);
        m.anchor_keys = v == "kv" || v == "on" || v == "k";
        m.anchor_values = v == "kv" || v == "on" || v == "v";
        m.anchors = m.anchor_keys || m.anchor_values;
      } else if (k == "gain") {
        ANTKV_CHECK(v == "off" || v == "k" || v == "kv", "method \"{}\": gain is off, k or kv, got \"{}\"", text, v);
        m.gain = v;
      } else if (k == "lkbits" || k == "lvbits" || k == "lratio") {
        std::vector<std::string> items;
        std::stringstream ls(v);
        for (std::string it; std::getline(ls, it, '/');) items.push_back(it);
        ANTKV_CHECK(!items.empty(), "method \"{}\": {} lists one value per layer, separated by /", text, k);
        std::vector<double> xs;
        for (const auto& it : items) {
          try {
            size_t used = 0;
            xs.push_back(std::stod(it, &used));
            ANTKV_CHECK(used == it.size(), "");
          } catch (...) {
            fail("method \"{}\": {} needs numbers separated by /, got \"{}\"", text, k, v);
          }
        }
        if (k == "lratio") {
          m.layer_ratio = xs;
          for (double x : xs) ANTKV_CHECK(x >= 0 && x <= 1, "method \"{}\": lratio values must be in [0, 1]", text);
        } else {
          auto& dst = k == "lkbits" ? m.layer_keys : m.layer_values;
          dst.clear();
          for (double x : xs) dst.push_back(vq_config_for_bits(x));
        }
      } else if (k == "rotate") {
        ANTKV_CHECK(v == "off" || v == "pca", "method \"{}\": rotate is off or pca, got \"{}\"", text, v);
        m.rotate = v;
      } else if (k == "metric") {
        ANTKV_CHECK(v == "plain" || v == "task", "method \"{}\": metric is plain or task, got \"{}\"", text, v);
        m.metric = v;
      }
      else if (k == "correct") m.correct = on_off();
      else if (k == "promote") m.promote = on_off();
      else if (k == "exclude") m.exclude_anchors = on_off();
      else if (k == "weighting") {
        ANTKV_CHECK(v == "anchor" || v == "none", "method \"{}\": weighting is anchor or none", text);
        m.weighting = v;
      } else if (k == "ratio") m.ratio = number();
      else if (k == "score") m.score = v;
      else if (k == "key_rope") {
        ANTKV_CHECK(v == "post" || v == "pre", "method \"{}\": key_rope is post or pre", text);
        m.key_rope = v;
      } else fail("method \"{}\": unknown option \"{}\" (bits, kbits, vbits, anchors, weighting, ratio, score, key_rope, correct, promote, exclude, gain, rotate, metric, lkbits, lvbits, lratio)", text, k);
    }
  }
  if (m.kind == "rsq") {
    ANTKV_CHECK(m.bits >= 1 && m.bits <= 4, "method \"{}\": rsq bits must be in [1, 4]", text);
  } else if (m.kind == "uniform") {
    ANTKV_CHECK(m.bits >= 1 && m.bits <= 8, "method \"{}\": bits must be in [1, 8]", text);
    ANTKV_CHECK(m.group >= 1, "method \"{}\": group must be positive", text);
    ANTKV_CHECK(m.window >= 0, "method \"{}\": window must be >= 0", text);
  } else {
    ANTKV_CHECK(m.ratio >= 0 && m.ratio <= 1, "method \"{}\": ratio must be in [0, 1]", text);
    if (m.kind == "vq") ANTKV_CHECK(!m.anchors, "method \"{}\": vq has no anchors (use antkv:weighting=none)", text);
    const size_t n = static_cast<size_t>(m.listed_layers());
    for (auto* lst : {&m.layer_keys, &m.layer_values})
      if (!lst->empty() || (n > 0 && !(m.layer_keys.empty() && m.layer_values.empty())))
        if (lst->empty()) lst->assign(n, lst == &m.layer_keys ? m.keys : m.values);
    ANTKV_CHECK((m.layer_keys.empty() || m.layer_keys.size() == n) && (m.layer_values.empty() || m.layer_values.size() == n) &&
                    (m.layer_ratio.empty() || m.layer_ratio.size() == n),
                "method \"{}\": lkbits, lvbits and lratio must list the same number of layers", text);
    if (m.kind == "vq") ANTKV_CHECK(m.layer_ratio.empty(), "method \"{}\": vq has no anchors (lratio)", text);
  }
  return m;
}

double effective_bits(const MethodSpec& m, int L, int d, bool include_codebooks) {
  if (m.kind == "fp16") return 16;
  if (m.kind == "uniform") {
    // keys: groups of `group` tokens per channel with an fp16 scale and zero point; tokens of a partial
    // group and the window stay FP16. values: groups of `group` channels per token (at most d).
    const int window = std::min(m.window, L);
    const int quant = L - window;
    const int full = quant / m.group * m.group;
    const double key_bits = (full * (m.bits + 32.0 / m.group) + (L - full) * 16.0) / L;
    const int vg = std::min(m.group, d);
    const double groups_per_head = std::ceil(static_cast<double>(d) / vg);  // the last group may be shorter
    const double value_bits = (quant * (m.bits + 32.0 * groups_per_head / d) + window * 16.0) / L;
    return (key_bits + value_bits) / 2;
  }
  if (m.kind == "rsq") return m.bits + 16.0 / d;  // codes and an fp16 norm per token and head, both tensors
  if (m.listed_layers() > 0) {  // per-layer widths / ratios: the mean over the layers (each stores L x d per tensor)
    double s = 0;
    const int n = m.listed_layers();
    for (int l = 0; l < n; ++l) {
      MethodSpec one = m;
      one.keys = m.key_config(l), one.values = m.value_config(l), one.ratio = m.ratio_of(l);
      one.layer_keys.clear(), one.layer_values.clear(), one.layer_ratio.clear();
      s += effective_bits(one, L, d, include_codebooks);
    }
    return s / n;
  }
  const int n_anchor_tokens = m.anchors ? std::min(L, static_cast<int>(std::ceil(m.ratio * L))) : 0;
  double total = 0;
  for (const VqConfig* qp : {&m.keys, &m.values}) {
    const VqConfig& q = *qp;
    const bool is_keys = qp == &m.keys;
    // anchors=k|v: the other tensor of an anchor token is quantized
    const int n_anchor = (is_keys ? m.anchor_keys : m.anchor_values) ? n_anchor_tokens : 0;
    double bits = ((L - n_anchor) * q.bits() * d + n_anchor * (16.0 * d + 32.0)) / (static_cast<double>(L) * d);
    if (include_codebooks) bits += static_cast<double>(1 << q.b) * 16.0 / L;  // 2^b x c fp16 per group of c channels
    if (include_codebooks && m.rotate != "off") bits += (d + 1) * 16.0 / L;  // fp16 d x d basis and d-mean per head
    if (include_codebooks && m.metric != "plain") bits += q.c * 16.0 / L;  // fp16 c x c metric factor per group
    if (m.correct && is_keys) bits += (L - n_anchor) * 16.0 / (static_cast<double>(L) * d);  // fp16 error per key
    if (is_keys ? m.gain_keys() : m.gain_values())  // fp16 norm per quantized token and head
      bits += (L - n_anchor) * 16.0 / (static_cast<double>(L) * d);
    total += bits;
  }
  return total / 2;
}

}  // namespace antkv
