#include "eval/fingerprint.h"

#include <cstdio>
#include <filesystem>
#include <map>
#include <sstream>

#include "core/error.h"

namespace antkv {
namespace {
constexpr const char* kHeader = "antkv-fingerprint-2";

bool parse(const std::string& s, std::vector<std::pair<std::string, std::string>>& out) {
  std::istringstream in(s);
  std::string line;
  if (!std::getline(in, line) || line != kHeader) return false;
  while (std::getline(in, line)) {
    const size_t eq = line.find('=');
    if (eq == std::string::npos) return false;
    out.emplace_back(line.substr(0, eq), line.substr(eq + 1));
  }
  return true;
}

std::string shorten(const std::string& v) {
  if (v.empty()) return "(none)";
  return v.size() > 16 ? v.substr(0, 12) + ".." : v;
}
}  // namespace

std::string make_fingerprint(const std::vector<std::pair<std::string, std::string>>& fields) {
  std::string s = kHeader;
  for (const auto& [k, v] : fields) {
    ANTKV_CHECK(k.find_first_of("=\n") == std::string::npos && v.find('\n') == std::string::npos,
                "fingerprint field \"{}\" contains '=' or a newline", k);
    s += "\n" + k + "=" + v;
  }
  return s;
}

std::string fingerprint_difference(const std::string& stored, const std::string& wanted) {
  if (stored == wanted) return "";
  std::vector<std::pair<std::string, std::string>> a, b;
  if (stored.empty()) return "it records no fingerprint (made by antkv-calibrate / antkv-train-codebook directly, or an older antkv)";
  if (!parse(stored, a)) return "its fingerprint is of an older antkv version";
  if (!parse(wanted, b)) return "the fingerprints differ";
  std::map<std::string, std::string> have(a.begin(), a.end());
  std::string diff;
  for (const auto& [k, v] : b) {
    auto it = have.find(k);
    std::string d;
    if (it == have.end()) d = fmt::format("{} is not in the file", k);
    else if (it->second != v) d = fmt::format("{} differs ({} in the file, {} now)", k, shorten(it->second), shorten(v));
    if (!d.empty()) diff += (diff.empty() ? "" : "; ") + d;
  }
  return diff.empty() ? "the fingerprints differ" : diff;
}

const char* const kModelContentField = "model content (XXH3-128 of config, every safetensors byte, tokenizer.json)";

std::string fingerprint_field(const std::string& fingerprint, const std::string& field) {
  std::vector<std::pair<std::string, std::string>> fields;
  if (!parse(fingerprint, fields)) return "";
  for (const auto& [k, v] : fields)
    if (k == field) return v;
  return "";
}

void check_same_weights(const std::string& file, const std::string& stored, const std::string& model_hash,
                        const std::string& model_dir, bool allow_other) {
  const std::string recorded = fingerprint_field(stored, kModelContentField);
  if (!recorded.empty() && recorded == model_hash) return;
  const std::string what =
      recorded.empty()
          ? fmt::format("{}: does not record the weights it was made from (made by an older antkv), so it cannot be "
                        "checked against {}", file, model_dir)
          : fmt::format("{}: made from other weights than {}: model content {} in the file, {} now", file, model_dir,
                        shorten(recorded), shorten(model_hash));
  if (!allow_other) fail("{} (remake it, or pass --allow-other-weights to use it anyway)", what);
  std::fprintf(stderr, "warning: %s; used anyway (--allow-other-weights)\n", what.c_str());
}

ReuseDecision decide_reuse(const std::string& path, const std::string& wanted, bool force,
                           const std::function<std::string(const std::string&)>& read_fingerprint) {
  ReuseDecision d;
  if (force) {
    d.message = fmt::format("computing {}: --force", path);
    return d;
  }
  if (!std::filesystem::exists(path)) {
    d.message = fmt::format("computing {}: not made yet", path);
    return d;
  }
  std::string stored;
  try {
    stored = read_fingerprint(path);
  } catch (const Error& e) {
    d.message = fmt::format("computing {}: the existing file is unreadable ({})", path, e.what());
    return d;
  }
  const std::string diff = fingerprint_difference(stored, wanted);
  d.reuse = diff.empty();
  d.message = d.reuse ? fmt::format("reusing {} (every input matches)", path)
                      : fmt::format("computing {}: the existing file was made from other inputs: {}", path, diff);
  return d;
}

}  // namespace antkv
