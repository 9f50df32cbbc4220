// The typed values of the method options and the recipe keys that set their defaults (docs/METHODS.md says what
// each means). Each enum has one table of spellings (method_options.cpp): parsing, printing, file attributes and
// error messages all read it, so a value is spelled in one place.
#pragma once
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "anchor/anchor_scores.h"

namespace antkv {

enum class MethodKind { kFp16, kUniform, kVq, kAntkv, kRsq };  // fp16 | uniform | vq | antkv | rsq
// keys quantized after (post) or before (pre) RoPE; commute: before RoPE, with groups of whole RoPE pairs so that a
// codeword (c/2 complex numbers) commutes with the rotation (docs/METHODS.md, quant/vq.h rope_pair_order)
enum class KeyRope { kPost, kPre, kCommute };
enum class Gain { kOff, kKeys, kKeysValues };                   // off | k | kv: norm stored, direction quantized
enum class Norm { kFp16, kFp8 };                                // fp16 | fp8 (E4M3): how gain= stores each norm
enum class Rotate { kOff, kPca };                               // off | pca: coded in a learned centered basis
enum class Metric { kPlain, kTask };                            // plain | task: k-means and assignment metric
enum class Weighting { kAnchor, kNone };                        // anchor | none: k-means weights
enum class AnchorTensors { kOff, kKeys, kValues, kKeysValues }; // off | k | v | kv (on = kv): what anchors keep FP16
enum class Promote { kAuto, kOn, kOff };  // decode-time anchors: auto = on when the score is a sum over attention

// One spelling of one value; a value may have several (the first is the one printed).
template <typename E>
struct OptionSpelling {
  E value;
  const char* name;
  bool alias = false;  // accepted, never printed nor listed ("on" for anchors=kv)
};

// Every spelling of E's values, in documented order. Specialized for each enum above and AnchorScoreKind.
template <typename E>
const std::vector<OptionSpelling<E>>& option_spellings();

// The printed name of a value ("kv" for Gain::kKeysValues).
template <typename E>
const char* option_name(E v) {
  for (const auto& s : option_spellings<E>())
    if (s.value == v && !s.alias) return s.name;
  return "?";
}

// The value spelled `s`, or nullopt.
template <typename E>
std::optional<E> find_option(std::string_view s) {
  for (const auto& sp : option_spellings<E>())
    if (s == sp.name) return sp.value;
  return std::nullopt;
}

// Every printed spelling of E ({"off", "k", "kv"}): what a file attribute of that option may hold.
template <typename E>
std::vector<std::string> option_names() {
  std::vector<std::string> out;
  for (const auto& s : option_spellings<E>())
    if (!s.alias) out.emplace_back(s.name);
  return out;
}

// "off, k or kv": the spellings for an error message.
template <typename E>
std::string option_choices() {
  std::vector<const char*> names;
  for (const auto& s : option_spellings<E>())
    if (!s.alias) names.push_back(s.name);
  std::string out;
  for (size_t i = 0; i < names.size(); ++i) out += (i == 0 ? "" : i + 1 == names.size() ? " or " : ", ") + std::string(names[i]);
  return out;
}

[[noreturn]] void throw_bad_option(const std::string& where, const char* key, const std::string& choices,
                                   const std::string& got);

// The value spelled `s`; otherwise an antkv::Error "<where>: <key> is <choices>, got \"<s>\"".
template <typename E>
E parse_option(std::string_view s, const std::string& where, const char* key) {
  if (auto v = find_option<E>(s)) return *v;
  throw_bad_option(where, key, option_choices<E>(), std::string(s));
}

// The keys a calibration dump holds for a key placement: commute trains on the same pre-RoPE keys as pre.
inline KeyRope dump_key_rope(KeyRope k) { return k == KeyRope::kPost ? KeyRope::kPost : KeyRope::kPre; }

// Whether decode steps can re-rank anchors with this score: it must be a sum over attention rows (not random/recent).
bool score_is_attention_sum(AnchorScoreKind k);

}  // namespace antkv
