#include "quant/method.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace antkv {

std::string MethodSpec::codebook_file() const {
  auto suffix = [](const char* tag, auto v, auto none) { return v == none ? std::string() : tag + std::string(option_name(v)); };
  return fmt::format("k-c{}b{}_v-c{}b{}_{}{}_{}{}{}{}.h5", keys.c, keys.b, values.c, values.b, option_name(weighting),
                     exclude_anchors ? "" : "_all", option_name(key_rope), suffix("_g", gain, Gain::kOff),
                     suffix("_r", rotate, Rotate::kOff), suffix("_m", metric, Metric::kPlain));
}

double MethodSpec::nominal_bits() const {
  if (kind == MethodKind::kFp16) return 16;
  if (kind == MethodKind::kUniform || kind == MethodKind::kRsq) return bits;
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

bool MethodText::has(const std::string& key) const {
  for (const auto& [k, v] : options)
    if (k == key) return true;
  return false;
}

namespace {

// s cut at every `sep`, empty pieces kept ("a,,b" -> "a", "", "b")
std::vector<std::string> split_at(const std::string& s, char sep) {
  std::vector<std::string> out;
  for (size_t start = 0;;) {
    const size_t end = s.find(sep, start);
    out.push_back(s.substr(start, end == std::string::npos ? std::string::npos : end - start));
    if (end == std::string::npos) return out;
    start = end + 1;
  }
}

}  // namespace

MethodText split_method_text(const std::string& text) {
  MethodText t;
  const size_t colon = text.find(':');
  t.kind = text.substr(0, colon);
  if (colon == std::string::npos) return t;
  const std::string rest = text.substr(colon + 1);
  ANTKV_CHECK(!rest.empty(), "method \"{}\": nothing after ':' (write the kind alone, or kind:key=value,...)", text);
  for (const std::string& kv : split_at(rest, ',')) {
    const size_t eq = kv.find('=');
    ANTKV_CHECK(eq != std::string::npos && eq > 0, "method \"{}\": option \"{}\" is not key=value", text, kv);
    const std::string key = kv.substr(0, eq);
    ANTKV_CHECK(!t.has(key), "method \"{}\": option {} is given twice", text, key);
    t.options.emplace_back(key, kv.substr(eq + 1));
  }
  return t;
}

namespace {

// The options each kind takes, in the order the error messages list them.
const std::vector<std::string>& options_of(MethodKind k) {
  static const std::vector<std::string> none, rsq = {"bits", "key_rope"}, uniform = {"bits", "group", "window"},
                                              vq = {"bits",   "kbits",    "vbits",   "anchors", "weighting", "ratio",
                                                    "score",  "key_rope", "correct", "promote", "exclude",   "gain",
                                                    "norm",   "rotate",   "metric",  "lkbits",  "lvbits",  "lratio"};
  switch (k) {
    case MethodKind::kFp16: return none;
    case MethodKind::kRsq: return rsq;
    case MethodKind::kUniform: return uniform;
    default: return vq;
  }
}

std::string join(const std::vector<std::string>& xs) {
  std::string s;
  for (const auto& x : xs) s += (s.empty() ? "" : ", ") + x;
  return s;
}

}  // namespace

MethodSpec parse_method(const std::string& text, const Recipe& r) {
  const MethodText t = split_method_text(text);
  MethodSpec m;
  m.text = text;
  const std::string where = fmt::format("method \"{}\"", text);
  m.kind = parse_option<MethodKind>(t.kind, where, "the kind");
  // defaults from the recipe
  m.keys = r.quant.keys;
  m.values = r.quant.values;
  m.ratio = r.anchor.ratio;
  m.score = r.anchor.score;
  m.decode_window = r.anchor.window;
  m.key_rope = r.key_rope;
  m.weighting = r.kmeans.weighting;
  m.exclude_anchors = r.kmeans.exclude_anchors;
  m.gain = r.kmeans.gain;
  m.rotate = r.kmeans.rotate;
  m.metric = r.kmeans.metric;
  if (m.kind == MethodKind::kRsq) m.bits = 1;
  if (!m.needs_codebooks()) {  // the options below are vq/antkv's
    m.anchors = AnchorTensors::kOff, m.weighting = Weighting::kNone;
    m.gain = Gain::kOff, m.rotate = Rotate::kOff, m.metric = Metric::kPlain;
  }
  if (m.kind == MethodKind::kVq)  // CQ-style: no anchors, no weights, every calibration token
    m.anchors = AnchorTensors::kOff, m.weighting = Weighting::kNone, m.exclude_anchors = false;

  const auto& allowed = options_of(m.kind);
  ANTKV_CHECK(m.kind != MethodKind::kFp16 || t.options.empty(), "{}: fp16 takes no options", where);
  for (const auto& [key, v] : t.options) {
    const std::string& k = key;
    ANTKV_CHECK(std::find(allowed.begin(), allowed.end(), k) != allowed.end(), "{}: unknown option \"{}\" for {} ({})",
                where, k, t.kind, join(allowed));
    auto number = [&](const std::string& x) {
      try {
        size_t used = 0;
        const double y = std::stod(x, &used);
        ANTKV_CHECK(used == x.size() && std::isfinite(y), "");
        return y;
      } catch (...) {
        fail("{}: option {} needs a number, got \"{}\"", where, k, x);
      }
    };
    auto integer = [&]() {
      const double x = number(v);
      ANTKV_CHECK(x == std::floor(x) && std::fabs(x) < 1e9, "{}: option {} needs a whole number, got \"{}\"", where, k, v);
      return static_cast<int>(x);
    };
    auto on_off = [&]() {
      ANTKV_CHECK(v == "on" || v == "off", "{}: option {} is on or off, got \"{}\"", where, k, v);
      return v == "on";
    };
    auto width = [&](const std::string& x) {
      const double bits = number(x);
      try {
        return vq_config_for_bits(bits);
      } catch (const Error& e) {
        fail("{}: option {}: {}", where, k, e.what());
      }
    };
    auto list = [&]() {  // '/'-separated, one per layer
      const std::vector<std::string> items = split_at(v, '/');
      for (const auto& x : items)
        ANTKV_CHECK(!x.empty(), "{}: {} lists one value per layer, separated by /, got \"{}\"", where, k, v);
      return items;
    };
    if (k == "bits" && !m.needs_codebooks()) m.bits = integer();
    else if (k == "bits") m.keys = m.values = width(v);
    else if (k == "kbits") m.keys = width(v);
    else if (k == "vbits") m.values = width(v);
    else if (k == "group") m.group = integer();
    else if (k == "window") m.window = integer();
    else if (k == "anchors") m.anchors = parse_option<AnchorTensors>(v, where, "anchors");
    else if (k == "gain") m.gain = parse_option<Gain>(v, where, "gain");
    else if (k == "norm") m.norm = parse_option<Norm>(v, where, "norm");
    else if (k == "rotate") m.rotate = parse_option<Rotate>(v, where, "rotate");
    else if (k == "metric") m.metric = parse_option<Metric>(v, where, "metric");
    else if (k == "weighting") m.weighting = parse_option<Weighting>(v, where, "weighting");
    else if (k == "score") m.score = parse_option<AnchorScoreKind>(v, where, "score");
    else if (k == "key_rope") m.key_rope = parse_option<KeyRope>(v, where, "key_rope");
    else if (k == "correct") m.correct = on_off();
    else if (k == "promote") m.promote = on_off();
    else if (k == "exclude") m.exclude_anchors = on_off();
    else if (k == "ratio") m.ratio = number(v);
    else if (k == "lkbits" || k == "lvbits") {
      for (const auto& x : list()) (k == "lkbits" ? m.layer_keys : m.layer_values).push_back(width(x));
    } else if (k == "lratio") {
      for (const auto& x : list()) {
        double y = 0;
        try {
          y = number(x);
        } catch (const Error&) {
          fail("{}: lratio needs numbers separated by /, got \"{}\"", where, v);
        }
        ANTKV_CHECK(y >= 0 && y <= 1, "{}: lratio values must be in [0, 1], got {}", where, x);
        m.layer_ratio.push_back(y);
      }
    }
  }

  // Values and combinations, each refused with its reason.
  if (m.kind == MethodKind::kRsq) {
    ANTKV_CHECK(m.bits >= 1 && m.bits <= 4, "{}: rsq bits must be in [1, 4]", where);
    ANTKV_CHECK(!m.commute(), "{}: key_rope=commute groups codebook channels by RoPE pair and rsq has no codebooks (use key_rope=pre)",
                where);
  } else if (m.kind == MethodKind::kUniform) {
    ANTKV_CHECK(m.bits >= 1 && m.bits <= 8, "{}: bits must be in [1, 8]", where);
    ANTKV_CHECK(m.group >= 1, "{}: group must be positive", where);
    ANTKV_CHECK(m.window >= 0, "{}: window must be >= 0", where);
  } else if (m.needs_codebooks()) {
    ANTKV_CHECK(m.ratio >= 0 && m.ratio <= 1, "{}: ratio must be in [0, 1]", where);
    if (m.kind == MethodKind::kVq) {
      ANTKV_CHECK(!m.has_anchors(), "{}: vq has no anchors (use antkv:anchors=..., or antkv:weighting=none)", where);
      for (const char* k : {"ratio", "score", "promote", "lratio"})
        ANTKV_CHECK(!t.has(k), "{}: vq has no anchors ({}= is an antkv option)", where, k);
      ANTKV_CHECK(m.weighting == Weighting::kNone,
                  "{}: vq trains unweighted codebooks (weighting=anchor without anchors is antkv:anchors=off)", where);
    } else if (!m.has_anchors()) {
      for (const char* k : {"ratio", "score", "promote", "lratio"})
        ANTKV_CHECK(!t.has(k), "{}: {}= has no effect with anchors=off", where, k);
    }
    ANTKV_CHECK(!(t.has("promote") && m.promote && !score_is_attention_sum(m.score)),
                "{}: promote=on needs a score that is a sum over attention rows (error_bound, attention_mass or "
                "key_bound), not {}",
                where, option_name(m.score));
    ANTKV_CHECK(!t.has("norm") || m.gain != Gain::kOff,
                "{}: norm= is the format of gain-shape VQ's norms and needs gain=k or gain=kv", where);
    ANTKV_CHECK(!(t.has("bits") && (t.has("kbits") || t.has("vbits"))),
                "{}: bits= sets both widths; give it or kbits=/vbits=, not both", where);
    // a width list of one tensor gives the other tensor's layers its single width
    if (!m.layer_keys.empty() || !m.layer_values.empty()) {
      if (m.layer_keys.empty()) m.layer_keys.assign(m.layer_values.size(), m.keys);
      if (m.layer_values.empty()) m.layer_values.assign(m.layer_keys.size(), m.values);
    }
    if (m.commute()) {
      // a learned basis mixes the RoPE pairs: its codewords would not commute with RoPE any more
      ANTKV_CHECK(m.rotate == Rotate::kOff,
                  "{}: key_rope=commute with rotate=pca: the PCA basis mixes RoPE pairs, so the key codewords would not "
                  "commute with RoPE (use key_rope=pre with rotate=pca)",
                  where);
      for (int l = 0; l < std::max(1, m.listed_layers()); ++l)
        ANTKV_CHECK(m.key_config(l).c % 2 == 0, "{}: key_rope=commute needs key groups of whole RoPE pairs (an even c), got c{}b{}",
                    where, m.key_config(l).c, m.key_config(l).b);
    }
    const size_t n = static_cast<size_t>(m.listed_layers());
    ANTKV_CHECK((m.layer_keys.empty() || m.layer_keys.size() == n) && (m.layer_values.empty() || m.layer_values.size() == n) &&
                    (m.layer_ratio.empty() || m.layer_ratio.size() == n),
                "{}: lkbits, lvbits and lratio must list the same number of layers", where);
  }
  return m;
}

std::vector<std::string> expand_method_widths(const std::vector<std::string>& methods,
                                              const std::vector<std::string>& widths, const std::string& src) {
  if (widths.empty()) return methods;
  std::vector<std::string> canonical;
  for (const auto& w : widths) {
    double bits = 0;
    try {
      size_t used = 0;
      bits = std::stod(w, &used);
      ANTKV_CHECK(used == w.size(), "");
      vq_config_for_bits(bits);
    } catch (const std::exception&) {
      fail("{}: key \"eval.widths\": \"{}\" is not one of the widths 4, 2, 1, 0.75, 0.5, 0.375, 1.5, 1.25, 0.25", src, w);
    }
    canonical.push_back(fmt::format("{}", bits));
  }
  auto takes_width = [](const std::string& m) {
    const MethodText t = split_method_text(m);
    return (t.kind == "vq" || t.kind == "antkv") && !t.has("bits") && !t.has("kbits") && !t.has("vbits");
  };
  std::vector<std::string> out, block;
  for (const auto& w : canonical)
    for (const auto& m : methods)
      if (takes_width(m)) {
        const size_t colon = m.find(':');
        block.push_back(colon == std::string::npos ? m + ":bits=" + w
                                                   : m.substr(0, colon) + ":bits=" + w + "," + m.substr(colon + 1));
      }
  bool placed = false;
  auto add = [&](const std::string& m) {
    if (std::find(out.begin(), out.end(), m) == out.end()) out.push_back(m);
  };
  for (const auto& m : methods) {
    if (!takes_width(m)) {
      add(m);
    } else if (!placed) {
      for (const auto& b : block) add(b);
      placed = true;
    }
  }
  return out;
}

double effective_bits(const MethodSpec& m, int L, int d, bool include_codebooks) {
  if (m.kind == MethodKind::kFp16) return 16;
  if (m.kind == MethodKind::kUniform) {
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
  if (m.kind == MethodKind::kRsq) return m.bits + 16.0 / d;  // codes and an fp16 norm per token and head, both tensors
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
  const int n_anchor_tokens = m.has_anchors() ? std::min(L, static_cast<int>(std::ceil(m.ratio * L))) : 0;
  double total = 0;
  for (const VqConfig* qp : {&m.keys, &m.values}) {
    const VqConfig& q = *qp;
    const bool is_keys = qp == &m.keys;
    // anchors=k|v: the other tensor of an anchor token is quantized
    const int n_anchor = (is_keys ? m.anchor_keys() : m.anchor_values()) ? n_anchor_tokens : 0;
    double bits = ((L - n_anchor) * q.bits() * d + n_anchor * (16.0 * d + 32.0)) / (static_cast<double>(L) * d);
    if (include_codebooks) bits += static_cast<double>(1 << q.b) * 16.0 / L;  // 2^b x c fp16 per group of c channels
    if (include_codebooks && m.rotate != Rotate::kOff) bits += (d + 1) * 16.0 / L;  // fp16 d x d basis and d-mean per head
    if (include_codebooks && m.metric != Metric::kPlain) bits += q.c * 16.0 / L;  // fp16 c x c metric factor per group
    if (m.correct && is_keys) bits += (L - n_anchor) * 16.0 / (static_cast<double>(L) * d);  // fp16 error per key
    if (is_keys ? m.gain_keys() : m.gain_values())  // fp16 (norm=fp8: 8-bit) norm per quantized token and head
      bits += (L - n_anchor) * m.norm_bits() / (static_cast<double>(L) * d);
    total += bits;
  }
  return total / 2;
}

}  // namespace antkv
