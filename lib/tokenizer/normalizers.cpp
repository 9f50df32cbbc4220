// Normalizers: Prepend, Replace (literal or regex), NFC and NFD. Canonical normalization is utf8proc's
// (Debian libutf8proc-dev), the Unicode algorithm the tokenizers crate runs through unicode-normalization.
#include <utf8proc.h>

#include <cstdlib>

#include "tokenizer/tokenizer_impl.h"

namespace antkv {

using namespace tok;  // the stage types of tokenizer_impl.h
namespace {

// NFC when compose, else NFD. ASCII text is already normalized and is returned as is. The input is
// valid UTF-8 (encode repairs it first); a NUL byte is an ordinary character here (no NULLTERM).
std::string canonical_normalize(const std::string& s, bool compose) {
  bool ascii = true;
  for (char c : s) ascii = ascii && static_cast<unsigned char>(c) < 0x80;
  if (ascii) return s;
  utf8proc_uint8_t* dst = nullptr;
  const auto options =
      static_cast<utf8proc_option_t>(UTF8PROC_STABLE | (compose ? UTF8PROC_COMPOSE : UTF8PROC_DECOMPOSE));
  const utf8proc_ssize_t n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(s.data()),
                                          static_cast<utf8proc_ssize_t>(s.size()), &dst, options);
  if (n < 0) fail("tokenizer: {} normalization failed: {}", compose ? "NFC" : "NFD", utf8proc_errmsg(n));
  std::string out(reinterpret_cast<const char*>(dst), static_cast<size_t>(n));
  std::free(dst);
  return out;
}

}  // namespace

void Tokenizer::Impl::load_normalizer(const json& n) {
  const std::string type = jstr(n, "type");
  if (type == "Sequence") {
    for (const auto& s : n.at("normalizers")) load_normalizer(s);
  } else if (type == "Prepend") {
    normalizer.push_back({NormStep::Prepend, jstr(n, "prepend"), "", nullptr});
  } else if (type == "Replace") {
    NormStep st{NormStep::Replace, "", jstr(n, "content"), nullptr};
    const json& pat = n.at("pattern");
    if (pat.contains("String")) {
      st.a = pat["String"].get<std::string>();
    } else if (pat.contains("Regex")) {
      st.regex = std::make_unique<Regex>(pat["Regex"].get<std::string>(), src);
    } else {
      fail("{}: normalizer Replace without String/Regex pattern", src);
    }
    normalizer.push_back(std::move(st));
  } else if (type == "NFC" || type == "NFD") {
    normalizer.push_back({type == "NFC" ? NormStep::NFC : NormStep::NFD, "", "", nullptr});
  } else {
    fail("{}: unsupported normalizer type \"{}\"", src, type);
  }
}

std::string Tokenizer::Impl::normalize(std::string_view s) const {
  std::string cur(s), next;
  for (const auto& st : normalizer) {
    if (st.kind == NormStep::Prepend) {
      if (!cur.empty()) cur.insert(0, st.a);
    } else if (st.kind == NormStep::NFC || st.kind == NormStep::NFD) {
      cur = canonical_normalize(cur, st.kind == NormStep::NFC);
    } else if (st.regex) {
      next.clear();
      size_t prev = 0;
      st.regex->for_each_match(cur, [&](size_t b, size_t e) {
        next.append(cur, prev, b - prev);
        next += st.b;
        prev = e;
      });
      next.append(cur, prev, std::string::npos);
      cur.swap(next);
    } else if (!st.a.empty()) {
      if (cur.find(st.a) == std::string::npos) continue;
      next.clear();
      next.reserve(cur.size() + cur.size() / 4);
      size_t prev = 0, pos;
      while ((pos = cur.find(st.a, prev)) != std::string::npos) {
        next.append(cur, prev, pos - prev);
        next += st.b;
        prev = pos + st.a.size();
      }
      next.append(cur, prev, std::string::npos);
      cur.swap(next);
    }
  }
  return cur;
}

}  // namespace antkv
