#include "quant/method_support.h"

#include <fmt/format.h>

#include <algorithm>
#include <nlohmann/json.hpp>

#include "core/error.h"

namespace antkv {

template <>
const std::vector<OptionSpelling<MethodPath>>& option_spellings<MethodPath>() {
  static const std::vector<OptionSpelling<MethodPath>> v = {{MethodPath::kCpu, "cpu"},
                                                            {MethodPath::kGpuSimulated, "simulated"},
                                                            {MethodPath::kGpuReal, "real"},
                                                            {MethodPath::kBench, "bench"},
                                                            {MethodPath::kMaxContext, "max-context"}};
  return v;
}

namespace {

// ---- helpers the rules read --------------------------------------------------------------------------------

bool power_of_2(int d) { return d >= 1 && (d & (d - 1)) == 0; }

// Every codebook width the method uses: keys, values and each listed layer's.
std::vector<VqConfig> widths_of(const MethodSpec& m) {
  std::vector<VqConfig> w = {m.keys, m.values};
  w.insert(w.end(), m.layer_keys.begin(), m.layer_keys.end());
  w.insert(w.end(), m.layer_values.begin(), m.layer_values.end());
  return w;
}
// The first width whose c is not in `ok` (c = 0: none).
template <class Ok>
VqConfig first_width_not(const MethodSpec& m, Ok ok) {
  for (const VqConfig q : widths_of(m))
    if (!ok(q)) return q;
  return {0, 0};
}
bool gpu_c(int c) { return c == 1 || c == 2 || c == 4 || c == 8 || c == 16 || c == 32; }
// The compressed cache's closed set of (c, b): quant_decode's kernels (kernels/attention/quant_decode.h kVqKernelConfigs).
bool compressed_width(VqConfig q) {
  static const VqConfig set[] = {{2, 8}, {4, 8}, {8, 8}, {16, 12}, {16, 8}, {16, 6}};
  for (const VqConfig s : set)
    if (s.c == q.c && s.b == q.b) return true;
  return false;
}
// The first width of m whose c does not divide the model's head_dim (c = 0: none, or no shape).
VqConfig width_not_dividing(const MethodSpec& m, const ModelShapeFacts* s) {
  return s ? first_width_not(m, [&](VqConfig q) { return s->head_dim % q.c == 0; }) : VqConfig{0, 0};
}
VqConfig width_not_on_gpu(const MethodSpec& m) {
  return first_width_not(m, [](VqConfig q) { return gpu_c(q.c) && q.b >= 1 && q.b <= 16; });
}
// Whether the method string names the option (for notes on options a path does not read).
bool names(const MethodSpec& m, const char* key) {
  try {
    return split_method_text(m.text).has(key);
  } catch (const Error&) {
    return false;
  }
}
bool vq_like(const MethodSpec& m) { return m.needs_codebooks(); }
// The first layer whose key and value widths differ, as "c1b8 / c2b8 in layer 3" (empty: none).
std::string two_widths_in_a_layer(const MethodSpec& m) {
  const int n = std::max(1, m.listed_layers());
  for (int l = 0; l < n; ++l) {
    const VqConfig k = m.key_config(l), v = m.value_config(l);
    if (k.c != v.c || k.b != v.b)
      return fmt::format("c{}b{} / c{}b{}{}", k.c, k.b, v.c, v.b, m.layered() ? fmt::format(" in layer {}", l) : "");
  }
  return {};
}
// key_rope=commute with per-layer widths of different key group sizes (the compressed cache keeps one RoPE pair
// order, that of layer 0's keys)
bool commute_pair_orders_differ(const MethodSpec& m) {
  if (!m.commute()) return false;
  for (int l = 0; l < m.listed_layers(); ++l)
    if (m.key_config(l).c != m.key_config(0).c) return true;
  return false;
}
bool one_anchor_tensor(const MethodSpec& m) { return m.anchors == AnchorTensors::kKeys || m.anchors == AnchorTensors::kValues; }
// gain= or rotate=pca: the compressed cache's coded transform (per-token scale, rotated basis)
bool coded(const MethodSpec& m) { return m.gain != Gain::kOff || m.rotate != Rotate::kOff; }
// The lookup-table widths of quant_decode (c >= 8; c2b8 and c4b8 decode by dequantize-dot).
bool lut_width(VqConfig q) { return compressed_width(q) && q.c >= 8; }
// The widths commute_decode builds (kernels/attention/commute_decode.h commute_decode_supports: all but c16b12).
bool commute_width(VqConfig q) { return compressed_width(q) && !(q.c == 16 && q.b == 12); }

// ---- the rules ---------------------------------------------------------------------------------------------
// A rule returns why the path does not run m (empty: no objection). s: the model's shape, or null (shape rules
// then pass). One line per rule.
struct Rule {
  std::string (*why)(const MethodSpec& m, const ModelShapeFacts* s);
  bool own_alternative;  // the words name what to use instead; else the path's alternative follows them
};
#define ANTKV_RULE_FN(cond, ...)                                                           \
  [](const MethodSpec& m, const ModelShapeFacts* s) -> std::string {                       \
    (void)m, (void)s;                                                                      \
    return (cond) ? fmt::format(__VA_ARGS__) : std::string();                              \
  }
#define ANTKV_RULE(cond, ...) Rule{ANTKV_RULE_FN(cond, __VA_ARGS__), false}
#define ANTKV_RULE_ALT(cond, ...) Rule{ANTKV_RULE_FN(cond, __VA_ARGS__), true}
// A note: what a path that runs m does not read, or does differently, and why that is fine.
using Note = std::string (*)(const MethodSpec& m, const ModelShapeFacts* s);
#define ANTKV_NOTE(cond, ...) ANTKV_RULE_FN(cond, __VA_ARGS__)

// CPU cache (lib/quant/quantized_cache.h): the reference runs every option.
const std::vector<Rule> kCpuRules = {
    ANTKV_RULE_ALT(s && m.kind == MethodKind::kRsq && !power_of_2(s->head_dim), "rsq needs a power-of-2 head_dim (its Walsh-Hadamard transform), the model has {}; use uniform or vq", s->head_dim),
    ANTKV_RULE_ALT(vq_like(m) && width_not_dividing(m, s).c, "group size c = {} does not divide head_dim {}; give a width whose c divides it", width_not_dividing(m, s).c, s->head_dim),
};

// Every GPU path: GpuRuntime's kernels (kernels/runtime/gpu_runtime.cpp).
const std::vector<Rule> kGpuRuntimeRules = {
    ANTKV_RULE_ALT(s && s->head_dim != 64 && s->head_dim != 128, "the GPU runtime takes head_dim 64 or 128, not {} (the model's); use eval.device: cpu", s->head_dim),
    ANTKV_RULE_ALT(s && s->gqa_group() > 16, "the GPU runtime takes a GQA group of at most 16, not {} (the model's); use eval.device: cpu", s->gqa_group()),
};

// GPU simulated (kernels/quant/simulated_quantizer.h): every option but the score correction.
const std::vector<Rule> kSimulatedRules = {
    ANTKV_RULE(m.correct, "correct=on (the attention-score correction) is not implemented on the GPU"),
    ANTKV_RULE(s && m.kind == MethodKind::kUniform && s->head_dim % std::min(m.group, s->head_dim) != 0, "uniform value groups of min(group, head_dim) = {} channels must divide head_dim {}", std::min(m.group, s->head_dim), s->head_dim),
    ANTKV_RULE(s && m.kind == MethodKind::kRsq && !(power_of_2(s->head_dim) && s->head_dim >= 2 && s->head_dim <= 1024), "rsq needs a power-of-2 head_dim in [2, 1024] on the GPU, the model has {}", s->head_dim),
    ANTKV_RULE(vq_like(m) && width_not_on_gpu(m).c, "c{}b{}: the GPU takes group size c 1, 2, 4, 8, 16 or 32 and b in [1, 16]", width_not_on_gpu(m).c, width_not_on_gpu(m).b),
    ANTKV_RULE_ALT(vq_like(m) && width_not_dividing(m, s).c, "group size c = {} does not divide head_dim {}; give a width whose c divides it", width_not_dividing(m, s).c, s->head_dim),
    ANTKV_RULE(s && m.rotate == Rotate::kPca && s->head_dim > 512, "rotate=pca takes head_dim up to 512 on the GPU, the model has {}", s->head_dim),
};

// The compressed vq/antkv cache (kernels/quant/compressed_cache.h): real path, bench, max-context.
const std::vector<Rule> kCompressedRules = {
    ANTKV_RULE(m.commute() && !two_widths_in_a_layer(m).empty(), "key_rope=commute with kbits != vbits ({}) is not implemented in the compressed cache (commute_decode reads one configuration)", two_widths_in_a_layer(m)),
    ANTKV_RULE(first_width_not(m, compressed_width).c, "c{}b{} is not one of the compressed cache's configurations (bits 4, 2, 1, 0.75, 0.5, 0.375: c2b8, c4b8, c8b8, c16b12, c16b8, c16b6)", first_width_not(m, compressed_width).c, first_width_not(m, compressed_width).b),
    ANTKV_RULE(one_anchor_tensor(m) && m.pre_rope(), "anchors={} (one tensor only) runs on the compressed cache with post-RoPE keys (its anchor slots hold post-RoPE keys, the code stream pre-RoPE ones); key_rope=post", option_name(m.anchors)),
    ANTKV_RULE(m.commute() && first_width_not(m, commute_width).c, "key_rope=commute does not run c{}b{} on the compressed cache (its key codebook does not fit in shared memory)", first_width_not(m, commute_width).c, first_width_not(m, commute_width).b),
    ANTKV_RULE(m.commute() && m.metric != Metric::kPlain, "key_rope=commute with metric=task is not implemented in the compressed cache"),
    ANTKV_RULE(m.commute() && s && !(s->gqa_group() == 1 || s->gqa_group() == 2 || s->gqa_group() == 4 || s->gqa_group() == 8), "key_rope=commute takes a GQA group of 1, 2, 4 or 8 on the compressed cache, not {} (the model's)", s->gqa_group()),
    ANTKV_RULE(commute_pair_orders_differ(m), "key_rope=commute with per-layer key widths of different group sizes is not implemented in the compressed cache (one RoPE pair order)"),
    ANTKV_RULE(m.commute() && coded(m) && first_width_not(m, lut_width).c, "key_rope=commute with gain= runs on the compressed cache's lookup-table widths (bits 1, 0.75, 0.5, 0.375), not c{}b{}", first_width_not(m, lut_width).c, first_width_not(m, lut_width).b),
    ANTKV_RULE(m.correct, "correct=on is not implemented in the compressed cache"),
};
const std::vector<Note> kCompressedNotes = {
    ANTKV_NOTE(m.pre_rope() && !m.commute(), "pre-RoPE keys decode by dequantize-rotate-dot"),
    ANTKV_NOTE(m.pre_rope() && !m.commute() && m.rotate == Rotate::kPca, "each coded key mapped back through the basis before its rotation (a head_dim x head_dim product per token)"),
    ANTKV_NOTE(one_anchor_tensor(m), "the other tensor's anchor tokens are coded and kept dequantized in their FP16 slots (quality of anchors={}, memory of anchors=kv{})", option_name(m.anchors), m.promotes() ? ", and an exact FP16 copy of that tensor per anchor, which a displaced anchor is coded from" : ""),
    ANTKV_NOTE(m.metric == Metric::kTask, "codes assigned in the task metric at prefill and append; decode reads the original-space centroids"),
    ANTKV_NOTE(m.keys.c < 8 && compressed_width(m.keys), "c{}b{}: its tables do not fit in shared memory, decode by dequantize-dot", m.keys.c, m.keys.b),
    ANTKV_NOTE(!m.commute() && !two_widths_in_a_layer(m).empty(), "kbits != vbits ({}): such layers decode by dequantize-dot with each tensor's widths read at run time", two_widths_in_a_layer(m)),
    ANTKV_NOTE(!m.commute() && coded(m) && first_width_not(m, lut_width).c, "gain= / rotate=pca at c{}b{}: decode by dequantize-dot with run-time widths", first_width_not(m, lut_width).c, first_width_not(m, lut_width).b),
    ANTKV_NOTE(m.norm == Norm::kFp8 && m.gain != Gain::kOff, "norm=fp8: the norms E4M3-rounded as the simulated path's, the per-token scale kept in fp16 (8 bits per token and head more than the method's accounting)"),
};

// The packed uniform cache (kernels/quant/uniform_cache.h): real path (one prefill chunk, then decode), bench, max-context.
const std::vector<Rule> kPackedUniformRules = {
    ANTKV_RULE(m.bits != 2 && m.bits != 4, "the packed uniform cache takes bits 2 or 4, not {}", m.bits),
    ANTKV_RULE(m.group != 32 && m.group != 64 && m.group != 128, "the packed uniform cache takes group 32, 64 or 128, not {}", m.group),
    ANTKV_RULE(m.window < 0 || m.window > (1 << 20), "the packed uniform cache takes a window up to 2^20, not {}", m.window),
};

// The real path: the compressed cache for vq/antkv, the packed uniform cache for uniform.
const std::vector<Rule> kRealKindRules = {
    ANTKV_RULE_ALT(m.kind == MethodKind::kRsq, "rsq has no real GPU cache (eval.kv_cache: real evaluates it on the simulated cache)"),
};
const std::vector<Note> kRealNotes = {
    ANTKV_NOTE(m.kind == MethodKind::kFp16, "the bf16 cache"),
    ANTKV_NOTE(m.kind == MethodKind::kUniform, "a window's prefill in one chunk into the packed cache, then one token per forward"),
    ANTKV_NOTE(vq_like(m), "the simulated quantizer chooses the prefill's anchors; a window's prefill in one chunk"),
    ANTKV_NOTE(vq_like(m) && (names(m, "weighting") || names(m, "exclude")), "weighting and exclude are codebook-training options"),
};

// bench and max-context: the real caches filled with synthetic contents.
// The synthetic compressed cache that bench and max-context fill (kernels/bench/method_bench.cpp).
const std::vector<Rule> kBenchCompressedRules = {
    ANTKV_RULE(vq_like(m) && one_anchor_tensor(m), "anchors={} (one tensor only) is not implemented in the synthetic cache bench fills", option_name(m.anchors)),
    ANTKV_RULE(vq_like(m) && !m.layer_ratio.empty(), "per-layer ratios (lratio) are not implemented in the synthetic cache bench fills"),
    ANTKV_RULE(vq_like(m) && m.layered() && s && s->num_layers > 0 && m.listed_layers() != s->num_layers, "lkbits/lvbits list {} layers, the model has {}", m.listed_layers(), s->num_layers),
};
const std::vector<Rule> kBenchKindRules = {
    ANTKV_RULE_ALT(m.kind == MethodKind::kRsq, "rsq has no real GPU cache to time (its cache is simulated); bench and max-context time fp16, uniform, vq and antkv"),
};
const std::vector<Note> kBenchNotes = {
    ANTKV_NOTE(m.kind == MethodKind::kFp16, "the bf16 cache"),
    ANTKV_NOTE(vq_like(m), "synthetic codebooks and codes: decode time does not depend on their values"),
    ANTKV_NOTE(vq_like(m) && (names(m, "weighting") || names(m, "exclude")), "weighting and exclude are codebook-training options: no codebooks are trained"),
    ANTKV_NOTE(vq_like(m) && names(m, "score"), "score only decides whether decode-time anchors run (their cost is measured)"),
};

const std::vector<Rule> kNoRules;
const std::vector<Note> kNoNotes;
#undef ANTKV_RULE
#undef ANTKV_RULE_ALT
#undef ANTKV_NOTE
#undef ANTKV_RULE_FN

// ---- which rules each path reads ---------------------------------------------------------------------------

struct PathRules {
  const char* name;  // in messages: "the simulated GPU quantizer (eval.device: cuda)"
  const char* alt;   // what to use instead
  std::vector<const std::vector<Rule>*> rules;
  std::vector<const std::vector<Note>*> notes;
};

PathRules rules_of(MethodPath p, MethodKind k) {
  const bool vq = k == MethodKind::kVq || k == MethodKind::kAntkv, uni = k == MethodKind::kUniform;
  const auto* cache = vq ? &kCompressedRules : uni ? &kPackedUniformRules : &kNoRules;
  const auto* cache_notes = vq ? &kCompressedNotes : &kNoNotes;
  const char* bench_alt = "bench and max-context time only what the real caches run (its perplexity: eval.kv_cache: simulated)";
  switch (p) {  // the CPU rules name their own alternative
    case MethodPath::kCpu: return {"the CPU cache (eval.device: cpu)", "", {&kCpuRules}, {}};
    case MethodPath::kGpuSimulated:
      return {"the simulated GPU quantizer (eval.device: cuda)", "evaluate it with eval.device: cpu",
              {&kGpuRuntimeRules, &kSimulatedRules}, {}};
    case MethodPath::kGpuReal:
      return {"the real GPU cache (eval.kv_cache: real)", "evaluate it with eval.kv_cache: simulated",
              {&kGpuRuntimeRules, &kRealKindRules, cache}, {&kRealNotes, cache_notes}};
    case MethodPath::kBench:
      return {"bench (antkv-eval bench --method)", bench_alt, {&kGpuRuntimeRules, &kBenchKindRules, cache, &kBenchCompressedRules},
              {&kBenchNotes, cache_notes}};
    case MethodPath::kMaxContext:
      return {"max-context (antkv-eval max-context)", bench_alt, {&kGpuRuntimeRules, &kBenchKindRules, cache, &kBenchCompressedRules},
              {&kBenchNotes, cache_notes}};
  }
  fail("method_support: unknown path");
}

}  // namespace

PathSupport method_support(const MethodSpec& m, MethodPath p, const ModelShapeFacts* shape) {
  const PathRules pr = rules_of(p, m.kind);
  PathSupport out;
  for (const auto* list : pr.rules)
    for (const Rule& r : *list) {
      std::string why = r.why(m, shape);
      if (why.empty()) continue;
      out.reason = fmt::format("method \"{}\" does not run on {}: {}{}{}", m.text, pr.name, why,
                               r.own_alternative ? "" : "; ", r.own_alternative ? "" : pr.alt);
      out.why = std::move(why);
      return out;
    }
  out.runs = true;
  for (const auto* list : pr.notes)
    for (Note n : *list) {
      const std::string s = n(m, shape);
      if (!s.empty()) out.note += (out.note.empty() ? "" : "; ") + s;
    }
  return out;
}

void require_support(const MethodSpec& m, MethodPath p, const ModelShapeFacts* shape) {
  const PathSupport s = method_support(m, p, shape);
  if (!s.runs) throw Error(s.reason);
}

std::vector<MethodPath> eval_paths(const MethodSpec& m, const std::string& device, const std::string& kv_cache) {
  // the kinds eval.kv_cache: real evaluates on a real cache (fp16 and rsq stay on the simulated one)
  const bool real_cache = m.kind == MethodKind::kVq || m.kind == MethodKind::kAntkv || m.kind == MethodKind::kUniform;
  if (device == "cpu") return {MethodPath::kCpu};
  if (kv_cache == "real" && real_cache) return {MethodPath::kGpuSimulated, MethodPath::kGpuReal};
  return {MethodPath::kGpuSimulated};
}

std::string eval_kv_cache(const MethodSpec& m, const std::string& device, const std::string& kv_cache) {
  const auto paths = eval_paths(m, device, kv_cache);
  return std::find(paths.begin(), paths.end(), MethodPath::kGpuReal) != paths.end() ? "real" : "simulated";
}

std::vector<std::string> recipe_support_errors(const Recipe& r, const ModelShapeFacts* shape) {
  const std::string src = r.source.empty() ? "recipe" : r.source;
  const bool real = r.eval.kv_cache == "real";
  if (r.eval.device == "cpu" && real) return {fmt::format("{}: eval.kv_cache: real needs the GPU (eval.device: cpu)", src)};
  std::string device = r.eval.device;
  if (device == "auto") {
    if (!real) return {};  // the paths are known once the device is resolved
    device = "cuda";       // a real cache needs the GPU whatever auto resolves to
  }
  std::vector<std::string> out;
  for (const auto& text : r.eval.methods) {
    const MethodSpec m = parse_method(text, r);
    for (MethodPath p : eval_paths(m, device, r.eval.kv_cache)) {
      const PathSupport s = method_support(m, p, shape);
      if (!s.runs) {
        out.push_back(s.reason);
        break;  // one line per method
      }
    }
  }
  return out;
}

void require_recipe_support(const Recipe& r, const ModelShapeFacts* shape) {
  const std::vector<std::string> errors = recipe_support_errors(r, shape);
  if (errors.empty()) return;
  std::string msg = fmt::format("{}: {} of eval.methods cannot be evaluated as the recipe asks (eval.device: {}, "
                                "eval.kv_cache: {}); nothing was run:",
                                r.source.empty() ? "recipe" : r.source,
                                errors.size() == 1 ? std::string("1 method") : fmt::format("{} methods", errors.size()),
                                r.eval.device, r.eval.kv_cache);
  for (const auto& e : errors) msg += "\n  " + e;
  throw Error(msg);
}

// ---- the table ---------------------------------------------------------------------------------------------

namespace {

struct Example {
  std::string method;
  ModelShapeFacts shape;  // head_dim 0: no shape
  std::string shape_label;
};

std::vector<Example> examples() {
  std::vector<Example> out;
  auto add = [&](const std::string& m) { out.push_back({m, {}, ""}); };
  // every kind
  for (const auto& k : option_spellings<MethodKind>()) add(k.name);
  // uniform's options
  for (const char* m : {"uniform:bits=2", "uniform:bits=4", "uniform:bits=3", "uniform:group=32", "uniform:group=16",
                        "uniform:window=64"})
    add(m);
  add("rsq:bits=2");
  for (const char* k : {"post", "pre"}) add(fmt::format("rsq:key_rope={}", k));  // commute: parse_method refuses it
  // vq / antkv widths: every named width, and keys and values apart
  for (const char* w : {"4", "2", "1", "0.75", "0.5", "0.375", "1.5", "1.25", "0.25"}) add(fmt::format("vq:bits={}", w));
  add("vq:kbits=1,vbits=2");
  // every value of every enum option
  for (const auto& v : option_spellings<AnchorTensors>())
    if (!v.alias) add(fmt::format("antkv:bits=1,anchors={}", v.name));
  add("antkv:bits=1,ratio=0.05");
  for (const auto& v : option_spellings<AnchorScoreKind>()) add(fmt::format("antkv:bits=1,score={}", v.name));
  for (const char* v : {"on", "off"}) add(fmt::format("antkv:bits=1,promote={}", v));
  for (const auto& v : option_spellings<KeyRope>()) add(fmt::format("vq:bits=1,key_rope={}", v.name));
  for (const auto& v : option_spellings<Weighting>()) add(fmt::format("antkv:bits=1,weighting={}", v.name));
  for (const char* v : {"on", "off"}) add(fmt::format("antkv:bits=1,exclude={}", v));
  for (const char* v : {"off", "on"}) add(fmt::format("antkv:bits=1,correct={}", v));
  for (const auto& v : option_spellings<Gain>()) add(fmt::format("vq:bits=1,gain={}", v.name));
  for (const auto& v : option_spellings<Norm>()) add(fmt::format("vq:bits=1,gain=kv,norm={}", v.name));
  for (const auto& v : option_spellings<Rotate>()) add(fmt::format("vq:bits=1,rotate={}", v.name));
  for (const auto& v : option_spellings<Metric>()) add(fmt::format("vq:bits=1,metric={}", v.name));
  add("antkv:bits=1,anchors=v,promote=off");
  add("vq:bits=0.75,key_rope=commute");
  add("vq:bits=1,gain=k,key_rope=commute");
  add("vq:lkbits=1/2");
  add("vq:lkbits=1/0.5,lvbits=1/0.5");
  add("vq:lvbits=1/0.5");
  add("antkv:bits=1,lratio=0.01/0.02");
  add("vq:bits=2,gain=kv,rotate=pca");
  add("vq:bits=1,gain=kv,rotate=pca");  // the best 1-bit method (post-RoPE form)
  add("vq:bits=1,gain=kv,rotate=pca,key_rope=pre");  // its pre-RoPE form
  // shape rules
  const ModelShapeFacts d96{96, 8, 8}, d80{80, 8, 8}, g32{128, 32, 1};
  for (const char* m : {"fp16", "rsq:bits=2", "vq:bits=1"}) out.push_back({m, d96, "head_dim 96"});
  out.push_back({"rsq:bits=2", d80, "head_dim 80"});
  out.push_back({"vq:bits=0.75", {40, 8, 8}, "head_dim 40"});
  out.push_back({"fp16", g32, "GQA group 32"});
  return out;
}

std::string row_label(const MethodSupportRow& r) {
  return r.shape.empty() ? r.method : fmt::format("{} ({})", r.method, r.shape);
}

std::vector<MethodSupportRow> rows_of(const std::vector<Example>& ex) {
  std::vector<MethodSupportRow> out;
  const Recipe defaults = Recipe::defaults_with({});
  for (const auto& e : ex) {
    const MethodSpec m = parse_method(e.method, defaults);
    MethodSupportRow row;
    row.method = e.method;
    row.shape = e.shape_label;
    for (const auto& p : option_spellings<MethodPath>())
      row.paths.push_back(method_support(m, p.value, e.shape.head_dim ? &e.shape : nullptr));
    out.push_back(std::move(row));
  }
  return out;
}

std::string cell(const PathSupport& s) {
  if (!s.runs) return "refused: " + s.why;
  return s.note.empty() ? "runs" : "runs (" + s.note + ")";
}

}  // namespace

std::vector<MethodSupportRow> methods_support_table() { return rows_of(examples()); }

std::string methods_support_markdown() {
  std::string out = "| method |";
  std::string rule = "|---|";
  for (const auto& p : option_spellings<MethodPath>()) out += fmt::format(" {} |", p.name), rule += "---|";
  out += "\n" + rule + "\n";
  for (const auto& row : methods_support_table()) {
    out += fmt::format("| `{}`{} |", row.method, row.shape.empty() ? "" : " (" + row.shape + ")");
    for (const auto& s : row.paths) {
      std::string c = cell(s);
      for (char& ch : c)
        if (ch == '|') ch = '/';  // a table cell holds no column separator
      out += " " + c + " |";
    }
    out += "\n";
  }
  return out;
}

std::string methods_support_text() {
  std::string out;
  for (const auto& row : methods_support_table()) {
    out += row_label(row) + "\n";
    size_t i = 0;
    for (const auto& p : option_spellings<MethodPath>()) out += fmt::format("  {:<12} {}\n", p.name, cell(row.paths[i++]));
  }
  return out;
}

std::string methods_support_json() {
  nlohmann::json rows = nlohmann::json::array();
  for (const auto& row : methods_support_table()) {
    nlohmann::json paths = nlohmann::json::object();
    size_t i = 0;
    for (const auto& p : option_spellings<MethodPath>()) {
      const PathSupport& s = row.paths[i++];
      paths[p.name] = s.runs ? nlohmann::json{{"runs", true}, {"note", s.note}}
                             : nlohmann::json{{"runs", false}, {"rule", s.why}, {"reason", s.reason}};
    }
    rows.push_back({{"method", row.method}, {"shape", row.shape}, {"paths", paths}});
  }
  return rows.dump(1) + "\n";
}

}  // namespace antkv
