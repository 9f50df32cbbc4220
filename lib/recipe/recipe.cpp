#include "recipe/recipe.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <sstream>

#include "core/device.h"
#include "core/error.h"
#include "core/limits.h"
#include "quant/method.h"

namespace fs = std::filesystem;

namespace antkv {

VqConfig vq_config_for_bits(double bits) {
  static const std::pair<double, VqConfig> table[] = {{4.0, {2, 8}},    {2.0, {4, 8}},  {1.0, {8, 8}},
                                                      {0.75, {16, 12}}, {0.5, {16, 8}}, {0.375, {16, 6}},
                                                      {1.5, {8, 12}},   {1.25, {8, 10}}, {0.25, {32, 8}}};
  for (auto& [b, cfg] : table)
    if (std::fabs(bits - b) < 1e-9) return cfg;
  fail("no VQ configuration for {} bits (named ones: 4, 2, 1, 0.75, 0.5, 0.375, and 1.5, 1.25, 0.25; or give c and b)", bits);
}

namespace {

enum class Kind { kString, kPath, kInt, kInt64, kUInt64, kDouble, kBool, kStringList, kPathList, kOption, kIntList,
                  kDoubleList };

// How a typed option field (quant/method_options.h) is read and written: its spellings live in one table.
struct OptionCodec {
  bool (*set)(void* field, const std::string& name);  // false: not a spelling of the option
  const char* (*get)(const void* field);
  std::string (*choices)();
};

template <typename E>
const OptionCodec* codec() {
  static const OptionCodec c = {
      [](void* f, const std::string& s) {
        auto v = find_option<E>(s);
        if (v) *static_cast<E*>(f) = *v;
        return v.has_value();
      },
      [](const void* f) { return option_name(*static_cast<const E*>(f)); }, [] { return option_choices<E>(); }};
  return &c;
}

// Calls f(key, kind, pointer, codec) for every field of the recipe, in schema order (codec: kOption fields only).
template <typename F>
void for_each_field(Recipe& r, F&& f0) {
  auto f = [&](const char* key, Kind kind, void* ptr, const OptionCodec* c = nullptr) { f0(key, kind, ptr, c); };
  f("name", Kind::kString, &r.name);
  f("model", Kind::kPath, &r.model);
  f("calibration.text", Kind::kPath, &r.calibration.text);
  f("calibration.tokens", Kind::kInt64, &r.calibration.tokens);
  f("calibration.seq_len", Kind::kInt, &r.calibration.seq_len);
  f("calibration.stride", Kind::kInt, &r.calibration.stride);
  f("calibration.sample_per_window", Kind::kInt, &r.calibration.sample_per_window);
  f("calibration.seed", Kind::kUInt64, &r.calibration.seed);
  f("calibration.device", Kind::kString, &r.calibration.device);
  f("key_rope", Kind::kOption, &r.key_rope, codec<KeyRope>());
  f("anchor.score", Kind::kOption, &r.anchor.score, codec<AnchorScoreKind>());
  f("anchor.ratio", Kind::kDouble, &r.anchor.ratio);
  f("anchor.window", Kind::kInt, &r.anchor.window);
  f("quant.keys.c", Kind::kInt, &r.quant.keys.c);
  f("quant.keys.b", Kind::kInt, &r.quant.keys.b);
  f("quant.values.c", Kind::kInt, &r.quant.values.c);
  f("quant.values.b", Kind::kInt, &r.quant.values.b);
  f("kmeans.iters", Kind::kInt, &r.kmeans.iters);
  f("kmeans.tol", Kind::kDouble, &r.kmeans.tol);
  f("kmeans.seed", Kind::kUInt64, &r.kmeans.seed);
  f("kmeans.weighting", Kind::kOption, &r.kmeans.weighting, codec<Weighting>());
  f("kmeans.exclude_anchors", Kind::kBool, &r.kmeans.exclude_anchors);
  f("kmeans.gain", Kind::kOption, &r.kmeans.gain, codec<Gain>());
  f("kmeans.rotate", Kind::kOption, &r.kmeans.rotate, codec<Rotate>());
  f("kmeans.metric", Kind::kOption, &r.kmeans.metric, codec<Metric>());
  f("kmeans.device", Kind::kString, &r.kmeans.device);
  f("kmeans.max_points", Kind::kInt64, &r.kmeans.max_points);
  f("kmeans.holdout", Kind::kDouble, &r.kmeans.holdout);
  f("eval.texts", Kind::kPathList, &r.eval.texts);
  f("eval.seq_len", Kind::kInt, &r.eval.seq_len);
  f("eval.protocol", Kind::kString, &r.eval.protocol);
  f("eval.max_windows", Kind::kInt64, &r.eval.max_windows);
  f("eval.methods", Kind::kStringList, &r.eval.methods);
  f("eval.widths", Kind::kStringList, &r.eval.widths);
  f("eval.device", Kind::kString, &r.eval.device);
  f("eval.kv_cache", Kind::kString, &r.eval.kv_cache);
  f("eval.decode_from", Kind::kInt, &r.eval.decode_from);
  f("eval.tasks", Kind::kStringList, &r.eval.tasks);
  auto& nd = r.eval.needle;
  f("eval.needle.tasks", Kind::kStringList, &nd.tasks);
  f("eval.needle.lengths", Kind::kIntList, &nd.lengths);
  f("eval.needle.depths", Kind::kDoubleList, &nd.depths);
  f("eval.needle.seed", Kind::kUInt64, &nd.seed);
  f("eval.needle.cases", Kind::kInt, &nd.cases);
  f("eval.needle.haystack", Kind::kString, &nd.haystack);
  f("eval.needle.value", Kind::kString, &nd.value);
  f("eval.needle.digits", Kind::kInt, &nd.digits);
  f("eval.needle.answer_budget", Kind::kInt, &nd.answer_budget);
  f("eval.needle.distractors", Kind::kInt, &nd.distractors);
  f("eval.needle.values", Kind::kInt, &nd.values);
  f("eval.needle.queries", Kind::kInt, &nd.queries);
  f("eval.needle.prefill_chunk", Kind::kInt, &nd.prefill_chunk);
  f("eval.needle.agreement_tokens", Kind::kInt, &nd.agreement_tokens);
  f("eval.needle.agreement_length", Kind::kInt, &nd.agreement_length);
  f("out_dir", Kind::kPath, &r.out_dir);
}

// Shorthands: "quant.bits: 1" sets keys and values to the named configuration of §3.
const std::set<std::string> kShorthands = {"quant.bits", "quant.keys.bits", "quant.values.bits"};

std::string expand_env(const std::string& s, const std::string& where) {
  std::string out;
  for (size_t i = 0; i < s.size();) {
    if (s[i] == '$' && i + 1 < s.size() && s[i + 1] == '{') {
      const size_t end = s.find('}', i);
      ANTKV_CHECK(end != std::string::npos, "{}: unterminated ${{...}} in \"{}\"", where, s);
      std::string inner = s.substr(i + 2, end - i - 2), def;
      const size_t d = inner.find(":-");
      const bool has_def = d != std::string::npos;
      if (has_def) {
        def = inner.substr(d + 2);
        inner = inner.substr(0, d);
      }
      const char* v = std::getenv(inner.c_str());
      ANTKV_CHECK((v && *v) || has_def, "{}: environment variable {} is not set (in \"{}\")", where, inner, s);
      out += (v && *v) ? std::string(v) : def;
      i = end + 1;
    } else {
      out += s[i++];
    }
  }
  return out;
}

std::string resolve_path(const std::string& p, const fs::path& base, const std::string& where) {
  if (p.empty()) return p;
  fs::path x = expand_env(p, where);
  if (x.is_relative()) x = base / x;
  return x.lexically_normal().string();
}

// yaml-cpp keeps both entries of a key written twice in one mapping; that is an error, not a silent choice.
void flatten(const YAML::Node& n, const std::string& prefix, std::map<std::string, YAML::Node>& out,
             const std::string& src) {
  if (n.IsMap()) {
    for (auto it = n.begin(); it != n.end(); ++it) {
      const std::string key = it->first.as<std::string>();
      flatten(it->second, prefix.empty() ? key : prefix + "." + key, out, src);
    }
  } else {
    ANTKV_CHECK(out.emplace(prefix, n).second, "{}: key \"{}\" is given twice", src, prefix);
  }
}

template <typename T>
T scalar_as(const YAML::Node& n, const std::string& key, const std::string& src, const char* what) {
  try {
    ANTKV_CHECK(n.IsScalar(), "{}: key \"{}\" must be {}", src, key, what);
    return n.as<T>();
  } catch (const YAML::Exception&) {
    fail("{}: key \"{}\" must be {}, got \"{}\"", src, key, what, n.IsScalar() ? n.Scalar() : "a non-scalar");
  }
}

void set_field(Kind kind, void* ptr, const OptionCodec* codec, const YAML::Node& n, const std::string& key,
               const std::string& src, const fs::path& base) {
  switch (kind) {
    case Kind::kOption: {
      const std::string v = scalar_as<std::string>(n, key, src, "a string");
      ANTKV_CHECK(codec->set(ptr, v), "{}: key \"{}\" = \"{}\" is not one of: {}", src, key, v, codec->choices());
      break;
    }
    case Kind::kString: *static_cast<std::string*>(ptr) = scalar_as<std::string>(n, key, src, "a string"); break;
    case Kind::kPath:
      *static_cast<std::string*>(ptr) = resolve_path(scalar_as<std::string>(n, key, src, "a path"), base, src + ": " + key);
      break;
    case Kind::kInt: *static_cast<int*>(ptr) = scalar_as<int>(n, key, src, "an integer"); break;
    case Kind::kInt64: *static_cast<int64_t*>(ptr) = scalar_as<int64_t>(n, key, src, "an integer"); break;
    case Kind::kUInt64: *static_cast<uint64_t*>(ptr) = scalar_as<uint64_t>(n, key, src, "a non-negative integer"); break;
    case Kind::kDouble: *static_cast<double*>(ptr) = scalar_as<double>(n, key, src, "a number"); break;
    case Kind::kBool: *static_cast<bool*>(ptr) = scalar_as<bool>(n, key, src, "true or false"); break;
    case Kind::kStringList:
    case Kind::kPathList: {
      auto& v = *static_cast<std::vector<std::string>*>(ptr);
      v.clear();
      ANTKV_CHECK(n.IsSequence() || n.IsScalar(), "{}: key \"{}\" must be a list of strings", src, key);
      if (n.IsScalar()) {
        v.push_back(n.Scalar());
      } else {
        for (const auto& e : n) v.push_back(scalar_as<std::string>(e, key, src, "a list of strings"));
      }
      if (kind == Kind::kPathList)
        for (auto& p : v) p = resolve_path(p, base, src + ": " + key);
      break;
    }
    case Kind::kIntList:
    case Kind::kDoubleList: {
      const bool ints = kind == Kind::kIntList;
      const char* what = ints ? "a list of integers" : "a list of numbers";
      ANTKV_CHECK(n.IsSequence() || n.IsScalar(), "{}: key \"{}\" must be {}", src, key, what);
      std::vector<YAML::Node> items;
      if (n.IsScalar()) items.push_back(n);
      else
        for (const auto& e : n) items.push_back(e);
      if (ints) {
        auto& v = *static_cast<std::vector<int>*>(ptr);
        v.clear();
        for (const auto& e : items) v.push_back(scalar_as<int>(e, key, src, what));
      } else {
        auto& v = *static_cast<std::vector<double>*>(ptr);
        v.clear();
        for (const auto& e : items) v.push_back(scalar_as<double>(e, key, src, what));
      }
      break;
    }
  }
}

void set_dotted(YAML::Node root, const std::string& key, const YAML::Node& value) {
  std::vector<std::string> parts;
  std::stringstream ss(key);
  for (std::string p; std::getline(ss, p, '.');) parts.push_back(p);
  std::function<void(YAML::Node, size_t)> go = [&](YAML::Node n, size_t i) {
    if (i + 1 == parts.size()) {
      n[parts[i]] = value;
      return;
    }
    if (!n[parts[i]] || !n[parts[i]].IsMap()) n[parts[i]] = YAML::Node(YAML::NodeType::Map);
    go(n[parts[i]], i + 1);
  };
  go(root, 0);
}

void validate(const Recipe& r, const std::string& src) {
  auto one_of = [&](const char* key, const std::string& v, std::initializer_list<const char*> allowed) {
    for (auto* a : allowed)
      if (v == a) return;
    std::string list;
    for (auto* a : allowed) list += (list.empty() ? "" : ", ") + std::string(a);
    fail("{}: key \"{}\" = \"{}\" is not one of: {}", src, key, v, list);
  };
  auto check = [&](bool ok, const char* key, const std::string& why) {
    ANTKV_CHECK(ok, "{}: key \"{}\" {}", src, key, why);
  };
  // counts: the bounds the command line uses too (core/limits.h)
  auto count = [&](int64_t v, const CountLimit& limit, const char* key) {
    check_count(v, limit, fmt::format("{}: key \"{}\"", src, key));
  };
  count(r.calibration.tokens, limits::kTokens, "calibration.tokens");
  count(r.calibration.seq_len, limits::kSeqLen, "calibration.seq_len");
  count(r.calibration.stride, limits::kTokenCount, "calibration.stride");
  count(r.calibration.sample_per_window, limits::kTokenCount, "calibration.sample_per_window");
  one_of("calibration.device", r.calibration.device, {"auto", "cpu", "cuda"});
  check(r.anchor.ratio >= 0 && r.anchor.ratio <= 1, "anchor.ratio", "must be in [0, 1]");
  count(r.anchor.window, limits::kTokenCount, "anchor.window");
  for (auto [key, q] : {std::pair<const char*, VqConfig>{"quant.keys", r.quant.keys}, {"quant.values", r.quant.values}}) {
    ANTKV_CHECK(q.c >= 1 && q.c <= 128, "{}: key \"{}.c\" = {} must be in [1, 128]", src, key, q.c);
    ANTKV_CHECK(q.b >= 1 && q.b <= 16, "{}: key \"{}.b\" = {} must be in [1, 16]", src, key, q.b);
  }
  count(r.kmeans.iters, limits::kIterations, "kmeans.iters");
  check(r.kmeans.tol >= 0, "kmeans.tol", "must be >= 0");
  one_of("kmeans.device", r.kmeans.device, {"auto", "cpu", "cuda"});
  count(r.kmeans.max_points, limits::kPoints, "kmeans.max_points");
  check(r.kmeans.holdout >= 0 && r.kmeans.holdout < 1, "kmeans.holdout", "must be in [0, 1)");
  count(r.eval.seq_len, limits::kSeqLen, "eval.seq_len");
  count(r.eval.max_windows, limits::kWindows, "eval.max_windows");
  one_of("eval.protocol", r.eval.protocol, {"bos_window", "single_bos"});
  one_of("eval.device", r.eval.device, {"auto", "cpu", "cuda"});
  one_of("eval.kv_cache", r.eval.kv_cache, {"simulated", "real"});
  check(r.eval.decode_from >= 0 && r.eval.decode_from < r.eval.seq_len, "eval.decode_from",
        "must be in [0, eval.seq_len)");
  check(!r.eval.methods.empty(), "eval.methods", "must list at least one method");
  check(!r.eval.tasks.empty(), "eval.tasks", "must list at least one task (ppl, needle)");
  for (const auto& t : r.eval.tasks) one_of("eval.tasks", t, {"ppl", "needle"});
  // eval.needle: the settings that need no model (lengths against max_position_embeddings, values against the
  // answer budget: lib/eval/needle_tasks.h, before any work)
  const auto& nd = r.eval.needle;
  check(!nd.tasks.empty(), "eval.needle.tasks", "must list at least one task");
  for (const auto& t : nd.tasks)
    one_of("eval.needle.tasks", t, {"passkey", "single", "multikey", "multivalue", "multiquery"});
  check(!nd.lengths.empty(), "eval.needle.lengths", "must list at least one context length");
  for (int len : nd.lengths) count(len, limits::kSeqLen, "eval.needle.lengths");
  check(!nd.depths.empty(), "eval.needle.depths", "must list at least one depth");
  for (double d : nd.depths)
    ANTKV_CHECK(d >= 0 && d <= 1, "{}: key \"eval.needle.depths\": depth {} is outside [0, 1]", src, d);
  check(nd.cases >= 1 && nd.cases <= 100000, "eval.needle.cases", "must be in [1, 100000]");
  one_of("eval.needle.haystack", nd.haystack, {"filler", "texts"});
  one_of("eval.needle.value", nd.value, {"number", "uuid"});
  check(nd.digits >= 1 && nd.digits <= 18, "eval.needle.digits", "must be in [1, 18]");
  check(nd.answer_budget >= 1 && nd.answer_budget <= 4096, "eval.needle.answer_budget", "must be in [1, 4096]");
  check(nd.distractors >= 0 && nd.distractors <= 1000, "eval.needle.distractors", "must be in [0, 1000]");
  check(nd.values >= 1 && nd.values <= 100, "eval.needle.values", "must be in [1, 100]");
  check(nd.queries >= 1 && nd.queries <= 100, "eval.needle.queries", "must be in [1, 100]");
  count(nd.prefill_chunk, limits::kTokenCount, "eval.needle.prefill_chunk");
  count(nd.agreement_tokens, limits::kTokenCount, "eval.needle.agreement_tokens");
  count(nd.agreement_length, limits::kTokenCount, "eval.needle.agreement_length");
}

Recipe build(const YAML::Node& file_root, const std::string& src, const fs::path& base,
             const std::vector<std::string>& overrides) {
  // Flatten the file and the overrides into dotted keys; check every key against the schema.
  std::map<std::string, YAML::Node> file_keys, override_keys;
  if (file_root && !file_root.IsNull()) {
    ANTKV_CHECK(file_root.IsMap(), "{}: a recipe must be a YAML mapping", src);
    flatten(file_root, "", file_keys, src);
  }
  for (const auto& o : overrides) {
    const size_t eq = o.find('=');
    ANTKV_CHECK(eq != std::string::npos && eq > 0, "--set \"{}\": expected key=value", o);
    YAML::Node v;
    try {
      v = YAML::Load(o.substr(eq + 1));
    } catch (const YAML::Exception& e) {
      fail("--set \"{}\": value is not valid YAML: {}", o, e.what());
    }
    override_keys[o.substr(0, eq)] = v;
  }
  std::set<std::string> known(kShorthands);
  Recipe probe;
  for_each_field(probe, [&](const char* key, Kind, void*, const OptionCodec*) { known.insert(key); });
  auto check_known = [&](const std::map<std::string, YAML::Node>& keys, const std::string& where) {
    for (auto& [k, v] : keys)
      ANTKV_CHECK(known.count(k), "{}: unknown key \"{}\" (the known keys are listed in recipes/README.md)", where, k);
  };
  check_known(file_keys, src);
  check_known(override_keys, "--set");

  Recipe r;
  r.source = src;
  auto apply = [&](const std::map<std::string, YAML::Node>& keys, const std::string& where, const fs::path& dir) {
    // shorthands first, so that explicit c/b in the same source win
    for (auto [short_key, targets] : {std::pair<const char*, int>{"quant.bits", 3}, {"quant.keys.bits", 1},
                                      {"quant.values.bits", 2}}) {
      auto it = keys.find(short_key);
      if (it == keys.end()) continue;
      const double bits = scalar_as<double>(it->second, short_key, where, "a number of bits");
      VqConfig q;
      try {
        q = vq_config_for_bits(bits);
      } catch (const Error& e) {
        fail("{}: key \"{}\": {}", where, short_key, e.what());
      }
      if (targets & 1) r.quant.keys = q;
      if (targets & 2) r.quant.values = q;
    }
    for_each_field(r, [&](const char* key, Kind kind, void* ptr, const OptionCodec* c) {
      auto it = keys.find(key);
      if (it != keys.end()) set_field(kind, ptr, c, it->second, key, where, dir);
    });
  };
  apply(file_keys, src, base);
  apply(override_keys, "--set", fs::current_path());
  validate(r, src.empty() ? "recipe" : src);
  r.eval.methods = expand_method_widths(r.eval.methods, r.eval.widths, src.empty() ? "recipe" : src);
  for (const auto& m : r.eval.methods) {  // every method checked when the recipe is read, before any work
    try {
      parse_method(m, r);
    } catch (const Error& e) {
      fail("{}: key \"eval.methods\": {}", src.empty() ? "recipe" : src, e.what());
    }
  }
  if (r.out_dir.empty()) r.out_dir = (fs::current_path() / "runs" / r.name).lexically_normal().string();
  return r;
}

}  // namespace

Recipe Recipe::load(const std::string& path, const std::vector<std::string>& overrides) {
  ANTKV_CHECK(fs::is_regular_file(path), "{}: recipe file not found", path);
  YAML::Node root;
  try {
    // one document: a second one (after "---") would otherwise be ignored without a word
    std::ifstream in(path);
    const std::vector<YAML::Node> docs = YAML::LoadAll(in);
    ANTKV_CHECK(docs.size() <= 1, "{}: holds {} YAML documents (separated by \"---\"); a recipe is one document", path,
                docs.size());
    if (!docs.empty()) root = docs[0];
  } catch (const YAML::Exception& e) {
    fail("{}: not valid YAML: {}", path, e.what());
  }
  return build(root, path, fs::absolute(path).parent_path(), overrides);
}

Recipe Recipe::defaults_with(const std::vector<std::string>& overrides) {
  return build(YAML::Node(), "", fs::current_path(), overrides);
}

std::string Recipe::to_yaml() const {
  YAML::Node root(YAML::NodeType::Map);
  Recipe copy = *this;
  for_each_field(copy, [&](const char* key, Kind kind, void* ptr, const OptionCodec* c) {
    YAML::Node v;
    switch (kind) {
      case Kind::kOption: v = std::string(c->get(ptr)); break;
      case Kind::kString: case Kind::kPath: v = *static_cast<std::string*>(ptr); break;
      case Kind::kInt: v = *static_cast<int*>(ptr); break;
      case Kind::kInt64: v = *static_cast<int64_t*>(ptr); break;
      case Kind::kUInt64: v = *static_cast<uint64_t*>(ptr); break;
      case Kind::kDouble: v = *static_cast<double*>(ptr); break;
      case Kind::kBool: v = *static_cast<bool*>(ptr); break;
      case Kind::kStringList: case Kind::kPathList:
        v = YAML::Node(YAML::NodeType::Sequence);
        for (auto& s : *static_cast<std::vector<std::string>*>(ptr)) v.push_back(s);
        break;
      case Kind::kIntList:
        v = YAML::Node(YAML::NodeType::Sequence);
        for (int x : *static_cast<std::vector<int>*>(ptr)) v.push_back(x);
        break;
      case Kind::kDoubleList:
        v = YAML::Node(YAML::NodeType::Sequence);
        for (double x : *static_cast<std::vector<double>*>(ptr)) v.push_back(x);
        break;
    }
    set_dotted(root, key, v);
  });
  YAML::Emitter out;
  out << root;
  return std::string(out.c_str()) + "\n";
}

std::vector<std::string> Recipe::known_keys() {
  std::vector<std::string> keys;
  Recipe probe;
  for_each_field(probe, [&](const char* key, Kind, void*, const OptionCodec*) { keys.emplace_back(key); });
  keys.insert(keys.end(), kShorthands.begin(), kShorthands.end());
  return keys;
}

std::string resolve_recipe_devices(Recipe& r, const std::vector<std::string>& keys) {
  std::vector<DeviceRequest> req;
  std::vector<std::string*> fields;
  for (const auto& k : keys) {
    std::string* f = k == "calibration.device" ? &r.calibration.device
                     : k == "kmeans.device"    ? &r.kmeans.device
                     : k == "eval.device"      ? &r.eval.device
                                               : nullptr;
    ANTKV_CHECK(f, "resolve_recipe_devices: \"{}\" is not a device key", k);
    req.push_back({k, *f});
    fields.push_back(f);
  }
  const DeviceSelection s = select_devices(req, r.source.empty() ? "recipe" : r.source);
  for (size_t i = 0; i < fields.size(); ++i) *fields[i] = s.devices[i];
  return s.line;
}

}  // namespace antkv
