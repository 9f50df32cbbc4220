#include "quant/method_options.h"

#include "core/error.h"

namespace antkv {

template <>
const std::vector<OptionSpelling<MethodKind>>& option_spellings() {
  static const std::vector<OptionSpelling<MethodKind>> v = {{MethodKind::kFp16, "fp16"},
                                                            {MethodKind::kUniform, "uniform"},
                                                            {MethodKind::kVq, "vq"},
                                                            {MethodKind::kAntkv, "antkv"},
                                                            {MethodKind::kRsq, "rsq"}};
  return v;
}

template <>
const std::vector<OptionSpelling<KeyRope>>& option_spellings() {
  static const std::vector<OptionSpelling<KeyRope>> v = {
      {KeyRope::kPost, "post"}, {KeyRope::kPre, "pre"}, {KeyRope::kCommute, "commute"}};
  return v;
}

template <>
const std::vector<OptionSpelling<Gain>>& option_spellings() {
  static const std::vector<OptionSpelling<Gain>> v = {{Gain::kOff, "off"}, {Gain::kKeys, "k"}, {Gain::kKeysValues, "kv"}};
  return v;
}

template <>
const std::vector<OptionSpelling<Norm>>& option_spellings() {
  static const std::vector<OptionSpelling<Norm>> v = {{Norm::kFp16, "fp16"}, {Norm::kFp8, "fp8"}};
  return v;
}

template <>
const std::vector<OptionSpelling<Rotate>>& option_spellings() {
  static const std::vector<OptionSpelling<Rotate>> v = {{Rotate::kOff, "off"}, {Rotate::kPca, "pca"}};
  return v;
}

template <>
const std::vector<OptionSpelling<Metric>>& option_spellings() {
  static const std::vector<OptionSpelling<Metric>> v = {{Metric::kPlain, "plain"}, {Metric::kTask, "task"}};
  return v;
}

template <>
const std::vector<OptionSpelling<Weighting>>& option_spellings() {
  static const std::vector<OptionSpelling<Weighting>> v = {{Weighting::kAnchor, "anchor"}, {Weighting::kNone, "none"}};
  return v;
}

template <>
const std::vector<OptionSpelling<AnchorTensors>>& option_spellings() {
  static const std::vector<OptionSpelling<AnchorTensors>> v = {{AnchorTensors::kKeysValues, "kv"},
                                                               {AnchorTensors::kKeys, "k"},
                                                               {AnchorTensors::kValues, "v"},
                                                               {AnchorTensors::kOff, "off"},
                                                               {AnchorTensors::kKeysValues, "on", true}};
  return v;
}

template <>
const std::vector<OptionSpelling<Promote>>& option_spellings() {
  static const std::vector<OptionSpelling<Promote>> v = {{Promote::kOn, "on"}, {Promote::kOff, "off"}};
  return v;
}

template <>
const std::vector<OptionSpelling<AnchorScoreKind>>& option_spellings() {
  // the names are anchor/anchor_scores.cpp's, so that calibration dumps and methods spell them alike
  static const std::vector<OptionSpelling<AnchorScoreKind>> v = [] {
    std::vector<OptionSpelling<AnchorScoreKind>> out;
    for (auto k : {AnchorScoreKind::kErrorBound, AnchorScoreKind::kAttentionMass, AnchorScoreKind::kKeyBound,
                   AnchorScoreKind::kRandom, AnchorScoreKind::kRecent})
      out.push_back({k, anchor_score_kind_name(k)});
    return out;
  }();
  return v;
}

void throw_bad_option(const std::string& where, const char* key, const std::string& choices, const std::string& got) {
  fail("{}: {} is {}, got \"{}\"", where, key, choices, got);
}

bool score_is_attention_sum(AnchorScoreKind k) {
  return k == AnchorScoreKind::kErrorBound || k == AnchorScoreKind::kAttentionMass || k == AnchorScoreKind::kKeyBound;
}

}  // namespace antkv
