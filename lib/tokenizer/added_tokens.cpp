// Added (special) tokens: loading added_tokens and splitting the input on them before the normalizer
// runs (raw tokens) and after it (tokens marked normalized), as the tokenizers crate's AddedVocabulary.
#include "tokenizer/tokenizer_impl.h"

namespace antkv {

using namespace tok;  // the stage types of tokenizer_impl.h
namespace tok {
namespace {

const Regex& word_char_regex() {
  static const Regex re("^\\w", "tokenizer");
  return re;
}

}  // namespace

void split_on_added(std::string_view text, bool at_origin, const AddedMatcher& m,
                    std::vector<Segment>& out) {
  if (m.empty() || text.empty()) {
    if (!text.empty()) out.push_back({-1, text, at_origin});
    return;
  }
  size_t start_offset = 0;  // end of the previous split
  size_t pos = 0;
  while (pos < text.size()) {
    size_t b = 0;
    const AddedToken* t = m.find(text, pos, &b);
    if (!t) break;
    size_t e = b + t->pattern.size();
    pos = e;
    if (t->single_word) {
      bool start_ok = true, stop_ok = true;
      if (b > 0) {
        size_t k = b - 1;
        while (k > 0 && (static_cast<unsigned char>(text[k]) & 0xC0) == 0x80) --k;
        start_ok = !word_char_regex().matches_at_start(text.substr(k, b - k));
      }
      if (e < text.size()) stop_ok = !word_char_regex().matches_at_start(text.substr(e, utf8_char_len(text, e)));
      if (!start_ok || !stop_ok) continue;
    }
    if (t->lstrip) {
      size_t nb = b;
      while (nb > start_offset) {
        size_t k = nb - 1;
        while (k > start_offset && (static_cast<unsigned char>(text[k]) & 0xC0) == 0x80) --k;
        uint32_t cp;
        decode_utf8(text, k, &cp);
        if (!is_unicode_space(cp)) break;
        nb = k;
      }
      b = nb;
    }
    if (t->rstrip) {
      while (e < text.size()) {
        uint32_t cp;
        const size_t l = decode_utf8(text, e, &cp);
        if (!is_unicode_space(cp)) break;
        e += l;
      }
      pos = e;
    }
    if (b > start_offset) out.push_back({-1, text.substr(start_offset, b - start_offset), at_origin && start_offset == 0});
    out.push_back({t->id, text.substr(b, e - b), false});
    start_offset = e;
  }
  if (start_offset < text.size())
    out.push_back({-1, text.substr(start_offset), at_origin && start_offset == 0});
}

}  // namespace tok

void Tokenizer::Impl::load_added(const json& a) {
  if (!a.is_array()) fail("{}: added_tokens is not an array", src);
  for (const auto& t : a) {
    if (!t.is_object() || !t.contains("id") || !t.contains("content"))
      fail("{}: added_tokens entry without id/content", src);
    AddedToken at;
    const int64_t id = t["id"].get<int64_t>();
    if (id < 0 || id > (1 << 30)) fail("{}: added token id {} out of range", src, id);
    at.id = static_cast<int32_t>(id);
    at.content = t["content"].get<std::string>();
    at.single_word = jbool(t, "single_word", false);
    at.lstrip = jbool(t, "lstrip", false);
    at.rstrip = jbool(t, "rstrip", false);
    at.normalized = jbool(t, "normalized", false);
    at.special = jbool(t, "special", false);
    added_by_content[at.content] = at.id;
    added.push_back(std::move(at));
  }
  for (size_t i = 0; i < added.size(); ++i) added_by_id[added[i].id] = i;
}

}  // namespace antkv
