// Hugging Face tokenizer.json loader and BPE tokenizer (byte-level and SentencePiece-style).
//
// Pipeline (mirrors the tokenizers crate):
//   added tokens (leftmost-longest) -> normalizer -> added tokens marked normalized -> pre-tokenizer
//   -> BPE model per pre-token -> post-processor.
// Decoding maps ids to token strings (added tokens first) and runs the decoder chain.
//
// BPE merging uses the same algorithm as the tokenizers crate (Word::merge_all): a binary heap of
// candidate merges ordered by (rank, position) over a doubly linked list of symbols, O(n log n) per
// word, so a whole document as a single word (SentencePiece style without pre-tokenizer) is fine.
// Byte-level BPE works directly on the raw bytes: the GPT-2 byte-to-unicode mapping is a bijection,
// so the vocabulary is re-keyed by raw bytes at load time and the input is never re-encoded.
#include "tokenizer/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <xxhash.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cstdio>
#include <cstring>
#include <deque>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <sstream>
#include <unordered_map>
#include <utility>

#include "core/error.h"

namespace antkv {
namespace {

using json = nlohmann::json;

// ------------------------------------------------------------------------------------------------
// UTF-8 helpers

// Length of the valid UTF-8 sequence starting at s[i] (strict: no overlongs, surrogates or code
// points above U+10FFFF), or 0 when the bytes there are not valid UTF-8.
inline size_t valid_utf8_at(const unsigned char* s, size_t n, size_t i) {
  const unsigned c = s[i];
  if (c < 0x80) return 1;
  if (c < 0xC2) return 0;
  if (c < 0xE0) return (i + 1 < n && (s[i + 1] & 0xC0) == 0x80) ? 2 : 0;
  if (c < 0xF0) {
    if (i + 2 >= n) return 0;
    const unsigned c1 = s[i + 1], c2 = s[i + 2];
    if ((c1 & 0xC0) != 0x80 || (c2 & 0xC0) != 0x80) return 0;
    if (c == 0xE0 && c1 < 0xA0) return 0;
    if (c == 0xED && c1 >= 0xA0) return 0;
    return 3;
  }
  if (c < 0xF5) {
    if (i + 3 >= n) return 0;
    const unsigned c1 = s[i + 1], c2 = s[i + 2], c3 = s[i + 3];
    if ((c1 & 0xC0) != 0x80 || (c2 & 0xC0) != 0x80 || (c3 & 0xC0) != 0x80) return 0;
    if (c == 0xF0 && c1 < 0x90) return 0;
    if (c == 0xF4 && c1 >= 0x90) return 0;
    return 4;
  }
  return 0;
}

// Number of bytes of an invalid sequence at s[i] that form one "maximal subpart" (replaced by a
// single U+FFFD, as Rust's from_utf8_lossy and Python's errors="replace" do).
inline size_t invalid_subpart_len(const unsigned char* s, size_t n, size_t i) {
  const unsigned c = s[i];
  size_t need = 0;
  unsigned lo = 0x80, hi = 0xBF;
  if (c >= 0xC2 && c < 0xE0) {
    need = 1;
  } else if (c >= 0xE0 && c < 0xF0) {
    need = 2;
    if (c == 0xE0) lo = 0xA0;
    if (c == 0xED) hi = 0x9F;
  } else if (c >= 0xF0 && c < 0xF5) {
    need = 3;
    if (c == 0xF0) lo = 0x90;
    if (c == 0xF4) hi = 0x8F;
  } else {
    return 1;
  }
  size_t k = 1;
  for (; k <= need && i + k < n; ++k) {
    const unsigned b = s[i + k];
    if (k == 1 ? (b < lo || b > hi) : ((b & 0xC0) != 0x80)) break;
  }
  return k;  // lead byte plus the continuation bytes that were valid so far
}

inline bool is_valid_utf8(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  size_t i = 0;
  while (i < n) {
    // Fast ASCII skip, 8 bytes at a time.
    while (i + 8 <= n) {
      uint64_t w;
      std::memcpy(&w, p + i, 8);
      if (w & 0x8080808080808080ull) break;
      i += 8;
    }
    if (i >= n) break;
    const size_t l = valid_utf8_at(p, n, i);
    if (l == 0) return false;
    i += l;
  }
  return true;
}

// Invalid sequences become U+FFFD (from_utf8_lossy semantics).
std::string utf8_lossy(std::string_view s) {
  if (is_valid_utf8(s)) return std::string(s);
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  std::string out;
  out.reserve(n + 16);
  size_t i = 0;
  while (i < n) {
    const size_t l = valid_utf8_at(p, n, i);
    if (l) {
      out.append(s.data() + i, l);
      i += l;
    } else {
      out += "\xEF\xBF\xBD";
      i += invalid_subpart_len(p, n, i);
    }
  }
  return out;
}

inline void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

// Decodes the (assumed valid) UTF-8 char at s[i]; returns its length.
inline size_t decode_utf8(std::string_view s, size_t i, uint32_t* cp) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  const unsigned c = p[i];
  if (c < 0x80 || i + 1 >= n) {
    *cp = c;
    return 1;
  }
  if (c < 0xE0) {
    *cp = ((c & 0x1F) << 6) | (p[i + 1] & 0x3F);
    return 2;
  }
  if (c < 0xF0 || i + 3 >= n) {
    if (i + 2 >= n) {
      *cp = c;
      return 1;
    }
    *cp = ((c & 0x0F) << 12) | ((p[i + 1] & 0x3F) << 6) | (p[i + 2] & 0x3F);
    return 3;
  }
  *cp = ((c & 0x07) << 18) | ((p[i + 1] & 0x3F) << 12) | ((p[i + 2] & 0x3F) << 6) | (p[i + 3] & 0x3F);
  return 4;
}

inline size_t utf8_char_len(std::string_view s, size_t i) {
  const unsigned c = static_cast<unsigned char>(s[i]);
  size_t l = c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
  return std::min(l, s.size() - i);
}

// Unicode White_Space (Rust's char::is_whitespace).
inline bool is_unicode_space(uint32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F ||
         cp == 0x205F || cp == 0x3000;
}

struct SvHash {
  size_t operator()(std::string_view s) const noexcept { return XXH3_64bits(s.data(), s.size()); }
};

// ------------------------------------------------------------------------------------------------
// PCRE2 regex (UTF + UCP, JIT-compiled when available).

struct MatchResources {
  pcre2_match_data* md = nullptr;
  pcre2_match_context* ctx = nullptr;
  pcre2_jit_stack* stack = nullptr;
  MatchResources() {
    md = pcre2_match_data_create(1, nullptr);
    ctx = pcre2_match_context_create(nullptr);
    stack = pcre2_jit_stack_create(32 * 1024, 16 * 1024 * 1024, nullptr);
    if (ctx && stack) pcre2_jit_stack_assign(ctx, nullptr, stack);
  }
  ~MatchResources() {
    if (md) pcre2_match_data_free(md);
    if (ctx) pcre2_match_context_free(ctx);
    if (stack) pcre2_jit_stack_free(stack);
  }
  MatchResources(const MatchResources&) = delete;
  MatchResources& operator=(const MatchResources&) = delete;
};

MatchResources& match_resources() {
  thread_local MatchResources r;
  if (!r.md || !r.ctx) throw Error("tokenizer: out of memory creating PCRE2 match data");
  return r;
}

class Regex {
 public:
  Regex(const std::string& pattern, const std::string& where) : pattern_(pattern) {
    int err = 0;
    PCRE2_SIZE off = 0;
    code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                          PCRE2_UTF | PCRE2_UCP, &err, &off, nullptr);
    if (!code_) {
      PCRE2_UCHAR buf[256];
      pcre2_get_error_message(err, buf, sizeof buf);
      fail("{}: cannot compile regex /{}/ at offset {}: {}", where, pattern, off,
           reinterpret_cast<const char*>(buf));
    }
    jit_ = pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE) == 0;
  }
  ~Regex() { pcre2_code_free(code_); }
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // Calls f(start, end) for each non-empty match, left to right, non-overlapping. The subject must
  // be valid UTF-8 (callers sanitize the input once).
  template <class F>
  void for_each_match(std::string_view subject, F&& f) const {
    MatchResources& r = match_resources();
    const auto* s = reinterpret_cast<PCRE2_SPTR>(subject.data());
    const size_t n = subject.size();
    size_t off = 0;
    while (off < n) {
      const int rc = jit_ ? pcre2_jit_match(code_, s, n, off, 0, r.md, r.ctx)
                          : pcre2_match(code_, s, n, off, PCRE2_NO_UTF_CHECK, r.md, r.ctx);
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) {
        PCRE2_UCHAR buf[256];
        pcre2_get_error_message(rc, buf, sizeof buf);
        fail("tokenizer: regex /{}/ failed: {}", pattern_, reinterpret_cast<const char*>(buf));
      }
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(r.md);
      const size_t b = ov[0], e = ov[1];
      if (e <= b) {  // empty match: not a piece; move on by one character
        off = b + (b < n ? utf8_char_len(subject, b) : 1);
        continue;
      }
      f(b, e);
      off = e;
    }
  }

  bool matches_at_start(std::string_view subject) const {
    bool found = false;
    for_each_match(subject, [&](size_t b, size_t) {
      if (b == 0) found = true;
    });
    return found;
  }

 private:
  std::string pattern_;
  pcre2_code* code_ = nullptr;
  bool jit_ = false;
};

// ------------------------------------------------------------------------------------------------
// GPT-2 byte <-> unicode mapping.

struct ByteMap {
  std::array<uint32_t, 256> byte_to_cp{};
  std::array<int16_t, 324> cp_to_byte{};  // all mapped code points are < 324
  ByteMap() {
    cp_to_byte.fill(-1);
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      const bool keep = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      byte_to_cp[b] = keep ? static_cast<uint32_t>(b) : static_cast<uint32_t>(256 + n++);
      cp_to_byte[byte_to_cp[b]] = static_cast<int16_t>(b);
    }
  }
  // Raw bytes of a byte-level token; false when a character is outside the mapping.
  bool to_bytes(std::string_view tok, std::string* out) const {
    out->clear();
    for (size_t i = 0; i < tok.size();) {
      uint32_t cp;
      i += decode_utf8(tok, i, &cp);
      if (cp >= cp_to_byte.size() || cp_to_byte[cp] < 0) return false;
      out->push_back(static_cast<char>(cp_to_byte[cp]));
    }
    return true;
  }
};

const ByteMap& byte_map() {
  static const ByteMap m;
  return m;
}

const char* kGpt2Pattern =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

// ------------------------------------------------------------------------------------------------
// Merge table: (left id, right id) -> (rank, merged id). Open addressing, linear probing.

struct MergeVal {
  int32_t rank;
  int32_t new_id;
};

class PairMap {
 public:
  void init(size_t n) {
    size_t cap = 16;
    while (cap < n * 2 + 2) cap <<= 1;
    keys_.assign(cap, kEmpty);
    vals_.assign(cap, MergeVal{0, 0});
    mask_ = cap - 1;
    shift_ = 64 - __builtin_ctzll(cap);
  }
  // Keeps the first insertion of a key (lowest rank), as the tokenizers crate does.
  void insert(int32_t a, int32_t b, MergeVal v) {
    const uint64_t k = key(a, b);
    size_t i = slot(k);
    while (keys_[i] != kEmpty) {
      if (keys_[i] == k) return;
      i = (i + 1) & mask_;
    }
    keys_[i] = k;
    vals_[i] = v;
  }
  const MergeVal* find(int32_t a, int32_t b) const {
    if (keys_.empty()) return nullptr;
    const uint64_t k = key(a, b);
    size_t i = slot(k);
    while (true) {
      const uint64_t kk = keys_[i];
      if (kk == k) return &vals_[i];
      if (kk == kEmpty) return nullptr;
      i = (i + 1) & mask_;
    }
  }

 private:
  static constexpr uint64_t kEmpty = ~0ull;
  static uint64_t key(int32_t a, int32_t b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }
  size_t slot(uint64_t k) const { return static_cast<size_t>((k * 0x9E3779B97F4A7C15ull) >> shift_); }
  std::vector<uint64_t> keys_;
  std::vector<MergeVal> vals_;
  size_t mask_ = 0;
  int shift_ = 60;
};

// ------------------------------------------------------------------------------------------------
// Pipeline pieces.

struct Piece {
  std::string_view text;
  bool at_origin;  // starts at offset 0 of the original input (Metaspace prepend_scheme "first")
};

enum class SplitBehavior { Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous };

struct SplitPattern {
  std::string literal;           // when !regex
  std::unique_ptr<Regex> regex;  // when set
  template <class F>
  void for_each_match(std::string_view s, F&& f) const {
    if (regex) {
      regex->for_each_match(s, f);
      return;
    }
    if (literal.empty()) return;
    size_t pos = 0;
    while ((pos = s.find(literal, pos)) != std::string_view::npos) {
      f(pos, pos + literal.size());
      pos += literal.size();
    }
  }
};

// The tokenizers crate's NormalizedString::split, streamed: the pattern's matches cut the piece into
// spans (match / non-match), which are folded per behavior and handed to emit(piece) in order.
template <class Emit>
void split_piece(const Piece& p, const SplitPattern& pat, SplitBehavior behavior, bool invert, Emit&& emit) {
  const std::string_view s = p.text;
  struct Pending {
    size_t b, e;
    bool match, set;
  } pend{0, 0, false, false};
  auto out = [&](size_t b, size_t e) {
    if (e > b) emit(Piece{s.substr(b, e - b), p.at_origin && b == 0});
  };
  auto span = [&](size_t b, size_t e, bool match) {
    if (invert) match = !match;
    switch (behavior) {
      case SplitBehavior::Isolated:
        out(b, e);
        break;
      case SplitBehavior::Removed:
        if (!match) out(b, e);
        break;
      case SplitBehavior::MergedWithPrevious:  // a match joins the non-match before it
        if (match && pend.set && !pend.match) {
          pend.e = e;
          pend.match = true;
        } else {
          if (pend.set) out(pend.b, pend.e);
          pend = {b, e, match, true};
        }
        break;
      case SplitBehavior::MergedWithNext:  // a match joins the non-match after it
        if (!match && pend.set && pend.match) {
          out(pend.b, e);
          pend.set = false;
        } else {
          if (pend.set) out(pend.b, pend.e);
          if (match)
            pend = {b, e, true, true};
          else
            out(b, e), pend.set = false;
        }
        break;
      case SplitBehavior::Contiguous:  // runs of the same kind join
        if (pend.set && pend.match == match) {
          pend.e = e;
        } else {
          if (pend.set) out(pend.b, pend.e);
          pend = {b, e, match, true};
        }
        break;
    }
  };
  size_t prev = 0;
  pat.for_each_match(s, [&](size_t b, size_t e) {
    if (b > prev) span(prev, b, false);
    span(b, e, true);
    prev = e;
  });
  if (prev < s.size()) span(prev, s.size(), false);
  if (pend.set) out(pend.b, pend.e);
}

struct NormStep {
  enum Kind { Prepend, Replace } kind;
  std::string a;  // Prepend: the prefix; Replace: the literal pattern
  std::string b;  // Replace: the content
  std::unique_ptr<Regex> regex;
};

enum class PrependScheme { Always, First, Never };

struct PreStep {
  enum Kind { Split, ByteLevel, Metaspace } kind;
  SplitPattern pattern;
  SplitBehavior behavior = SplitBehavior::Isolated;
  bool invert = false;
  bool add_prefix_space = false;  // ByteLevel
  bool use_regex = false;         // ByteLevel
  std::string replacement;        // Metaspace
  PrependScheme scheme = PrependScheme::Always;
  bool split = true;
};

struct DecStep {
  enum Kind { ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace } kind;
  std::string a, b;  // Replace: pattern, content; Strip: content; Metaspace: replacement
  std::unique_ptr<Regex> regex;
  size_t start = 0, stop = 0;  // Strip
  bool prepend = true;         // Metaspace: strip the leading space of the first token
};

struct PostStep {
  enum Kind { Template, NoOp } kind;
  // Template: each item is either the sequence (is_seq) or a special token's ids.
  struct Item {
    bool is_seq;
    std::vector<int32_t> ids;
  };
  std::vector<Item> items;
};

struct AddedToken {
  int32_t id;
  std::string content;  // the token's text
  std::string pattern;  // what is matched (the normalized content for normalized tokens)
  bool single_word, lstrip, rstrip, normalized, special;
};

// Leftmost-longest matcher over a small set of literal strings.
class AddedMatcher {
 public:
  void add(const AddedToken* t) {
    if (t->pattern.empty()) return;
    auto& v = by_first_[static_cast<unsigned char>(t->pattern[0])];
    v.push_back(t);
    std::stable_sort(v.begin(), v.end(), [](const AddedToken* x, const AddedToken* y) {
      return x->pattern.size() > y->pattern.size();
    });
    any_ = true;
  }
  bool empty() const { return !any_; }
  // Finds the leftmost-longest match at or after pos; returns the token or nullptr.
  const AddedToken* find(std::string_view s, size_t pos, size_t* where) const {
    for (size_t i = pos; i < s.size(); ++i) {
      const auto& v = by_first_[static_cast<unsigned char>(s[i])];
      if (v.empty()) continue;
      for (const AddedToken* t : v) {
        if (s.compare(i, t->pattern.size(), t->pattern) == 0) {
          *where = i;
          return t;
        }
      }
    }
    return nullptr;
  }

 private:
  std::array<std::vector<const AddedToken*>, 256> by_first_;
  bool any_ = false;
};

struct Segment {
  int32_t added_id;  // >= 0: an added token
  std::string_view text;
  bool at_origin;
};

const Regex& word_char_regex() {
  static const Regex re("^\\w", "tokenizer");
  return re;
}

// Splits text on added tokens (tokenizers' AddedVocabulary::split_with_indices).
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

// ------------------------------------------------------------------------------------------------
// JSON helpers.

std::string jstr(const json& j, const char* key, const std::string& def = "") {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return def;
  return it->get<std::string>();
}
bool jbool(const json& j, const char* key, bool def) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return def;
  return it->get<bool>();
}

}  // namespace

// ================================================================================================

struct Tokenizer::Impl {
  std::string src;  // file name for messages

  // Model vocabulary.
  std::vector<std::string> id_to_tok;  // model tokens (index = id); "" for gaps
  std::vector<bool> has_tok;
  std::unordered_map<std::string_view, int32_t, SvHash> tok_to_id;  // keys point into id_to_tok
  // Lookup keys used by the BPE model: raw bytes for byte-level, token strings otherwise.
  std::deque<std::string> key_store;
  std::unordered_map<std::string_view, int32_t, SvHash> key_to_id;
  std::array<int32_t, 256> byte_id{};      // byte-level: id of each single byte; else ASCII chars
  std::array<int32_t, 256> fallback_id{};  // id of "<0xNN>" or -1
  PairMap merges;
  int32_t unk_id = -1;
  bool fuse_unk = false, byte_fallback = false, ignore_merges = false;
  bool byte_level = false;

  // Added tokens.
  std::vector<AddedToken> added;
  std::unordered_map<int32_t, size_t> added_by_id;
  std::unordered_map<std::string, int32_t> added_by_content;
  AddedMatcher match_raw, match_norm;

  std::vector<NormStep> normalizer;
  std::vector<PreStep> pre;
  std::vector<DecStep> decoder;
  bool has_decoder = false;
  std::vector<PostStep> post;

  int32_t bos = -1, eos = -1, vocab_n = 0;

  // Per-word result cache (pre-tokens repeat a lot).
  static constexpr size_t kCacheMaxWord = 64, kCacheMaxEntries = 1 << 18;
  struct CacheEntry {
    uint32_t off, len;  // into cache_ids
  };
  mutable std::mutex cache_mu;
  mutable std::unordered_map<std::string_view, CacheEntry, SvHash> cache;  // keys in cache_keys
  mutable std::deque<std::string> cache_keys;
  mutable std::vector<int32_t> cache_ids;
  // Characters before which BPE never merges (see find_cut_chars); long words are cut there.
  std::vector<std::string> cut_chars;

  void load(const json& j);
  void load_model(const json& m);
  void load_added(const json& a);
  void load_normalizer(const json& n);
  void load_pre(const json& p, bool top);
  void load_decoder(const json& d);
  void load_post(const json& p);

  std::string normalize(std::string_view s) const;
  template <class Sink>
  void run_pre(size_t k, const Piece& p, Sink& sink) const;
  void bpe_word(std::string_view w, std::vector<int32_t>& out) const;
  void encode_word(std::string_view w, std::vector<int32_t>& out) const;
  void bpe_cached(std::string_view w, std::vector<int32_t>& out) const;
  void find_cut_chars();
  std::vector<std::array<int32_t, 3>> merge_list;  // (a, b, merged), only used while loading
  int32_t lookup_token(std::string_view tok) const {
    auto it = tok_to_id.find(tok);
    return it == tok_to_id.end() ? -1 : it->second;
  }
};

void Tokenizer::Impl::load(const json& j) {
  if (!j.is_object()) fail("{}: tokenizer.json must be a JSON object", src);
  auto mit = j.find("model");
  if (mit == j.end() || !mit->is_object()) fail("{}: missing \"model\" object", src);
  load_model(*mit);
  if (auto it = j.find("added_tokens"); it != j.end() && !it->is_null()) load_added(*it);
  if (auto it = j.find("normalizer"); it != j.end() && !it->is_null()) load_normalizer(*it);
  // Normalized added tokens are matched against normalized text, with normalized content.
  for (auto& t : added) t.pattern = t.normalized && !normalizer.empty() ? normalize(t.content) : t.content;
  for (const auto& t : added) {
    if (t.normalized && !normalizer.empty())
      match_norm.add(&t);
    else
      match_raw.add(&t);
  }
  if (auto it = j.find("pre_tokenizer"); it != j.end() && !it->is_null()) load_pre(*it, true);
  for (size_t i = 0; i < pre.size(); ++i) {
    if (pre[i].kind == PreStep::ByteLevel) {
      byte_level = true;
      if (i + 1 != pre.size())
        fail("{}: unsupported pre_tokenizer: steps after ByteLevel in a Sequence", src);
    }
  }
  if (auto it = j.find("decoder"); it != j.end() && !it->is_null()) {
    has_decoder = true;
    load_decoder(*it);
  }
  if (auto it = j.find("post_processor"); it != j.end() && !it->is_null()) load_post(*it);

  // Lookup keys for the model: raw bytes in byte-level mode.
  const ByteMap& bm = byte_map();
  byte_id.fill(-1);
  std::string raw;
  for (size_t id = 0; id < id_to_tok.size(); ++id) {
    if (!has_tok[id]) continue;
    const std::string& tok = id_to_tok[id];
    std::string_view key;
    if (byte_level) {
      if (!bm.to_bytes(tok, &raw)) continue;  // unreachable from byte-level text
      key_store.push_back(raw);
      key = key_store.back();
    } else {
      key = tok;
    }
    key_to_id.emplace(key, static_cast<int32_t>(id));
    if (key.size() == 1) byte_id[static_cast<unsigned char>(key[0])] = static_cast<int32_t>(id);
  }
  if (!byte_level) {
    for (int b = 0x80; b < 256; ++b) byte_id[b] = -1;  // only ASCII chars are single bytes
  }
  for (int b = 0; b < 256; ++b) {
    char buf[8];
    std::snprintf(buf, sizeof buf, "<0x%02X>", b);
    fallback_id[b] = lookup_token(buf);
  }

  if (!byte_level) find_cut_chars();
  merge_list.clear();
  merge_list.shrink_to_fit();

  // BOS from the post-processor template; EOS by convention.
  for (const auto& p : post) {
    if (p.kind != PostStep::Template) continue;
    for (const auto& item : p.items) {
      if (item.is_seq) break;
      if (!item.ids.empty() && bos < 0) bos = item.ids[0];
    }
  }
  for (const char* name : {"</s>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>"}) {
    auto it = added_by_content.find(name);
    int32_t id = it != added_by_content.end() ? it->second : lookup_token(name);
    if (id >= 0) {
      eos = id;
      break;
    }
  }
  vocab_n = static_cast<int32_t>(id_to_tok.size());
  for (const auto& t : added) vocab_n = std::max(vocab_n, t.id + 1);
}

// A character c is a cut character when it is a vocab token, no merge involves the unk or byte
// fallback tokens (whose strings differ from their text), and in every merged token each c after the
// first character follows another c. Then no symbol ever spans "x c" with x != c, so a word can be
// cut before such a c and the parts merged independently with the same result.
void Tokenizer::Impl::find_cut_chars() {
  std::vector<bool> special(id_to_tok.size(), false);
  if (unk_id >= 0) special[unk_id] = true;
  for (int32_t f : fallback_id)
    if (f >= 0) special[f] = true;
  for (const auto& mg : merge_list)
    if (special[mg[0]] || special[mg[1]]) return;
  for (const std::string& c : {std::string("\xE2\x96\x81"), std::string(" ")}) {
    if (key_to_id.find(c) == key_to_id.end()) continue;
    bool safe = true;
    for (size_t k = 0; k < merge_list.size() && safe; ++k) {
      const std::string& t = id_to_tok[merge_list[k][2]];
      for (size_t pos = t.find(c, 1); pos != std::string::npos && safe; pos = t.find(c, pos + 1))
        safe = pos >= c.size() && t.compare(pos - c.size(), c.size(), c) == 0;
    }
    if (safe) cut_chars.push_back(c);
  }
}

void Tokenizer::Impl::load_model(const json& m) {
  const std::string type = jstr(m, "type");
  if (type.empty()) {
    if (!m.contains("merges"))
      fail("{}: unsupported model: no \"type\" and no \"merges\" (only BPE is supported)", src);
  } else if (type != "BPE") {
    fail("{}: unsupported model type \"{}\" (only BPE is supported)", src, type);
  }
  auto vit = m.find("vocab");
  if (vit == m.end() || !vit->is_object()) fail("{}: model.vocab missing or not an object", src);
  auto mit = m.find("merges");
  if (mit == m.end() || !mit->is_array()) fail("{}: model.merges missing or not an array", src);
  if (auto d = m.find("dropout"); d != m.end() && !d->is_null() && d->get<double>() > 0.0)
    fail("{}: unsupported model.dropout {} (only null/0)", src, d->get<double>());
  if (!jstr(m, "continuing_subword_prefix").empty())
    fail("{}: unsupported model.continuing_subword_prefix", src);
  if (!jstr(m, "end_of_word_suffix").empty()) fail("{}: unsupported model.end_of_word_suffix", src);
  fuse_unk = jbool(m, "fuse_unk", false);
  byte_fallback = jbool(m, "byte_fallback", false);
  ignore_merges = jbool(m, "ignore_merges", false);

  int64_t max_id = -1;
  for (auto it = vit->begin(); it != vit->end(); ++it) {
    if (!it.value().is_number_integer() || it.value().get<int64_t>() < 0 ||
        it.value().get<int64_t>() > (1 << 30))
      fail("{}: model.vocab[\"{}\"] is not a valid id", src, it.key());
    max_id = std::max(max_id, it.value().get<int64_t>());
  }
  if (max_id < 0) fail("{}: model.vocab is empty", src);
  id_to_tok.assign(static_cast<size_t>(max_id + 1), std::string());
  has_tok.assign(static_cast<size_t>(max_id + 1), false);
  for (auto it = vit->begin(); it != vit->end(); ++it) {
    const auto id = static_cast<size_t>(it.value().get<int64_t>());
    id_to_tok[id] = it.key();
    has_tok[id] = true;
  }
  tok_to_id.reserve(id_to_tok.size() * 2);
  for (size_t id = 0; id < id_to_tok.size(); ++id)
    if (has_tok[id]) tok_to_id.emplace(id_to_tok[id], static_cast<int32_t>(id));

  if (auto u = m.find("unk_token"); u != m.end() && !u->is_null()) {
    unk_id = lookup_token(u->get<std::string>());
    if (unk_id < 0) fail("{}: model.unk_token \"{}\" is not in the vocab", src, u->get<std::string>());
  }

  merges.init(mit->size());
  int32_t rank = 0;
  std::string a, b;
  for (const auto& e : *mit) {
    if (e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_string()) {
      a = e[0].get<std::string>();
      b = e[1].get<std::string>();
    } else if (e.is_string()) {
      const std::string& s = e.get_ref<const std::string&>();
      const size_t sp = s.find(' ');
      if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
        fail("{}: model.merges[{}] \"{}\" is not two tokens separated by one space", src, rank, s);
      a = s.substr(0, sp);
      b = s.substr(sp + 1);
    } else {
      fail("{}: model.merges[{}] is neither [\"a\", \"b\"] nor \"a b\"", src, rank);
    }
    const int32_t ia = lookup_token(a), ib = lookup_token(b), inew = lookup_token(a + b);
    if (ia < 0 || ib < 0 || inew < 0)
      fail("{}: model.merges[{}] (\"{}\" \"{}\") uses a token missing from the vocab", src, rank, a, b);
    merges.insert(ia, ib, MergeVal{rank, inew});
    merge_list.push_back({ia, ib, inew});
    ++rank;
  }
}

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
  } else {
    fail("{}: unsupported normalizer type \"{}\"", src, type);
  }
}

void Tokenizer::Impl::load_pre(const json& p, bool top) {
  const std::string type = jstr(p, "type");
  if (type == "Sequence") {
    if (!top) fail("{}: unsupported nested pre_tokenizer Sequence", src);
    for (const auto& s : p.at("pretokenizers")) load_pre(s, false);
  } else if (type == "Split") {
    PreStep st;
    st.kind = PreStep::Split;
    const json& pat = p.at("pattern");
    if (pat.contains("Regex")) {
      st.pattern.regex = std::make_unique<Regex>(pat["Regex"].get<std::string>(), src);
    } else if (pat.contains("String")) {
      st.pattern.literal = pat["String"].get<std::string>();
    } else {
      fail("{}: pre_tokenizer Split without String/Regex pattern", src);
    }
    const std::string b = jstr(p, "behavior", "Isolated");
    if (b == "Isolated") st.behavior = SplitBehavior::Isolated;
    else if (b == "Removed") st.behavior = SplitBehavior::Removed;
    else if (b == "MergedWithPrevious") st.behavior = SplitBehavior::MergedWithPrevious;
    else if (b == "MergedWithNext") st.behavior = SplitBehavior::MergedWithNext;
    else if (b == "Contiguous") st.behavior = SplitBehavior::Contiguous;
    else fail("{}: unsupported Split behavior \"{}\"", src, b);
    st.invert = jbool(p, "invert", false);
    pre.push_back(std::move(st));
  } else if (type == "ByteLevel") {
    PreStep st;
    st.kind = PreStep::ByteLevel;
    st.add_prefix_space = jbool(p, "add_prefix_space", true);
    st.use_regex = jbool(p, "use_regex", true);
    if (st.use_regex) st.pattern.regex = std::make_unique<Regex>(kGpt2Pattern, src);
    pre.push_back(std::move(st));
  } else if (type == "Metaspace") {
    PreStep st;
    st.kind = PreStep::Metaspace;
    st.replacement = jstr(p, "replacement", "\xE2\x96\x81");
    if (st.replacement.empty() || utf8_char_len(st.replacement, 0) != st.replacement.size())
      fail("{}: Metaspace replacement must be one character", src);
    const std::string scheme = jstr(p, "prepend_scheme");
    if (scheme.empty()) st.scheme = jbool(p, "add_prefix_space", true) ? PrependScheme::Always : PrependScheme::Never;
    else if (scheme == "always") st.scheme = PrependScheme::Always;
    else if (scheme == "first") st.scheme = PrependScheme::First;
    else if (scheme == "never") st.scheme = PrependScheme::Never;
    else fail("{}: unsupported Metaspace prepend_scheme \"{}\"", src, scheme);
    st.split = jbool(p, "split", true);
    st.pattern.literal = st.replacement;
    pre.push_back(std::move(st));
  } else {
    fail("{}: unsupported pre_tokenizer type \"{}\"", src, type);
  }
}

void Tokenizer::Impl::load_decoder(const json& d) {
  const std::string type = jstr(d, "type");
  DecStep st;
  if (type == "Sequence") {
    for (const auto& s : d.at("decoders")) load_decoder(s);
    return;
  } else if (type == "ByteLevel") {
    st.kind = DecStep::ByteLevel;
  } else if (type == "Replace") {
    st.kind = DecStep::Replace;
    st.b = jstr(d, "content");
    const json& pat = d.at("pattern");
    if (pat.contains("String")) st.a = pat["String"].get<std::string>();
    else if (pat.contains("Regex")) st.regex = std::make_unique<Regex>(pat["Regex"].get<std::string>(), src);
    else fail("{}: decoder Replace without String/Regex pattern", src);
  } else if (type == "ByteFallback") {
    st.kind = DecStep::ByteFallback;
  } else if (type == "Fuse") {
    st.kind = DecStep::Fuse;
  } else if (type == "Strip") {
    st.kind = DecStep::Strip;
    st.a = jstr(d, "content", " ");
    st.start = d.value("start", size_t{0});
    st.stop = d.value("stop", size_t{0});
  } else if (type == "Metaspace") {
    st.kind = DecStep::Metaspace;
    st.a = jstr(d, "replacement", "\xE2\x96\x81");
    const std::string scheme = jstr(d, "prepend_scheme");
    st.prepend = scheme.empty() ? jbool(d, "add_prefix_space", true) : scheme != "never";
  } else {
    fail("{}: unsupported decoder type \"{}\"", src, type);
  }
  decoder.push_back(std::move(st));
}

void Tokenizer::Impl::load_post(const json& p) {
  const std::string type = jstr(p, "type");
  if (type == "Sequence") {
    for (const auto& s : p.at("processors")) load_post(s);
  } else if (type == "ByteLevel") {
    post.push_back({PostStep::NoOp, {}});
  } else if (type == "TemplateProcessing") {
    PostStep st{PostStep::Template, {}};
    const json& specials = p.contains("special_tokens") ? p["special_tokens"] : json::object();
    for (const auto& item : p.at("single")) {
      if (item.contains("Sequence")) {
        st.items.push_back({true, {}});
      } else if (item.contains("SpecialToken")) {
        const std::string name = item["SpecialToken"].at("id").get<std::string>();
        if (!specials.contains(name))
          fail("{}: post_processor template uses special token \"{}\" missing from special_tokens", src, name);
        std::vector<int32_t> ids;
        for (const auto& x : specials[name].at("ids")) ids.push_back(x.get<int32_t>());
        st.items.push_back({false, std::move(ids)});
      } else {
        fail("{}: unsupported post_processor template item {}", src, item.dump());
      }
    }
    post.push_back(std::move(st));
  } else if (type == "RobertaProcessing" || type == "BertProcessing") {
    PostStep st{PostStep::Template, {}};
    st.items.push_back({false, {p.at("cls").at(1).get<int32_t>()}});
    st.items.push_back({true, {}});
    st.items.push_back({false, {p.at("sep").at(1).get<int32_t>()}});
    post.push_back(std::move(st));
  } else {
    fail("{}: unsupported post_processor type \"{}\"", src, type);
  }
}

std::string Tokenizer::Impl::normalize(std::string_view s) const {
  std::string cur(s), next;
  for (const auto& st : normalizer) {
    if (st.kind == NormStep::Prepend) {
      if (!cur.empty()) cur.insert(0, st.a);
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

// Runs pre-tokenizer steps k.. on one piece, depth first, handing the final pieces to sink.
template <class Sink>
void Tokenizer::Impl::run_pre(size_t k, const Piece& p, Sink& sink) const {
  if (p.text.empty()) return;
  if (k == pre.size()) {
    sink(p);
    return;
  }
  const PreStep& st = pre[k];
  auto next = [&](const Piece& q) { run_pre(k + 1, q, sink); };
  switch (st.kind) {
    case PreStep::Split:
      split_piece(p, st.pattern, st.behavior, st.invert, next);
      break;
    case PreStep::ByteLevel: {
      std::string tmp;
      Piece q = p;
      if (st.add_prefix_space && q.text[0] != ' ') {
        tmp.reserve(q.text.size() + 1);
        tmp += ' ';
        tmp += q.text;
        q.text = tmp;
      }
      if (st.use_regex)
        split_piece(q, st.pattern, SplitBehavior::Isolated, false, next);
      else
        next(q);
      break;
    }
    case PreStep::Metaspace: {
      std::string s;
      s.reserve(p.text.size() + 8);
      for (char c : p.text) {
        if (c == ' ')
          s += st.replacement;
        else
          s += c;
      }
      const bool prepend =
          st.scheme == PrependScheme::Always || (st.scheme == PrependScheme::First && p.at_origin);
      if (prepend && s.compare(0, st.replacement.size(), st.replacement) != 0) s.insert(0, st.replacement);
      const Piece q{s, p.at_origin};
      if (st.split)
        split_piece(q, st.pattern, SplitBehavior::MergedWithNext, false, next);
      else
        next(q);
      break;
    }
  }
}

// One word through the BPE model (tokenizers' BPE::merge_word + Word::merge_all).
void Tokenizer::Impl::bpe_word(std::string_view w, std::vector<int32_t>& out) const {
  struct Sym {
    int32_t id, prev, next, len;
  };
  struct Cand {
    int32_t rank, pos, new_id;
  };
  thread_local std::vector<Sym> syms;
  thread_local std::vector<Cand> heap;
  syms.clear();
  heap.clear();

  auto add = [&](int32_t id, int32_t len) {
    const int32_t n = static_cast<int32_t>(syms.size());
    syms.push_back({id, n - 1, -1, len});
    if (n > 0) syms[n - 1].next = n;
  };
  // Unknown characters: byte fallback, else the unk token (fused if asked), else dropped.
  int32_t unk_len = 0;  // pending unk, 0 = none
  auto unknown = [&](std::string_view s) {
    if (byte_fallback) {
      bool ok = true;
      for (char c : s) ok = ok && fallback_id[static_cast<unsigned char>(c)] >= 0;
      if (ok) {
        for (char c : s) add(fallback_id[static_cast<unsigned char>(c)], 1);
        return;
      }
    }
    if (unk_id >= 0) {
      if (unk_len > 0 && !fuse_unk) add(unk_id, unk_len), unk_len = 0;
      unk_len += static_cast<int32_t>(s.size());
    }
  };
  auto known = [&](int32_t id, int32_t len) {
    if (unk_len > 0) add(unk_id, unk_len), unk_len = 0;
    add(id, len);
  };

  if (byte_level) {
    const ByteMap& bm = byte_map();
    for (size_t i = 0; i < w.size(); ++i) {
      const auto c = static_cast<unsigned char>(w[i]);
      if (byte_id[c] >= 0) {
        known(byte_id[c], 1);
      } else {
        std::string ch;
        append_utf8(ch, bm.byte_to_cp[c]);
        unknown(ch);  // the tokenizers crate sees the mapped character here
      }
    }
  } else {
    for (size_t i = 0; i < w.size();) {
      const auto c = static_cast<unsigned char>(w[i]);
      if (c < 0x80) {
        if (byte_id[c] >= 0)
          known(byte_id[c], 1);
        else
          unknown(w.substr(i, 1));
        ++i;
        continue;
      }
      const size_t l = utf8_char_len(w, i);
      auto it = key_to_id.find(w.substr(i, l));
      if (it != key_to_id.end())
        known(it->second, static_cast<int32_t>(l));
      else
        unknown(w.substr(i, l));
      i += l;
    }
  }
  if (unk_len > 0) add(unk_id, unk_len);

  auto worse = [](const Cand& a, const Cand& b) {  // heap top = lowest rank, then leftmost
    return a.rank != b.rank ? a.rank > b.rank : a.pos > b.pos;
  };
  const int32_t n = static_cast<int32_t>(syms.size());
  for (int32_t i = 0; i + 1 < n; ++i) {
    if (const MergeVal* m = merges.find(syms[i].id, syms[i + 1].id)) heap.push_back({m->rank, i, m->new_id});
  }
  std::make_heap(heap.begin(), heap.end(), worse);
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), worse);
    const Cand top = heap.back();
    heap.pop_back();
    Sym& cur = syms[top.pos];
    if (cur.len == 0 || cur.next < 0) continue;
    const int32_t next_pos = cur.next;
    const Sym right = syms[next_pos];
    const MergeVal* m = merges.find(cur.id, right.id);
    if (!m || m->new_id != top.new_id) continue;  // stale entry
    cur.id = top.new_id;
    cur.len += right.len;
    cur.next = right.next;
    syms[next_pos].len = 0;
    if (right.next >= 0) syms[right.next].prev = top.pos;
    if (cur.prev >= 0) {
      if (const MergeVal* mp = merges.find(syms[cur.prev].id, cur.id)) {
        heap.push_back({mp->rank, cur.prev, mp->new_id});
        std::push_heap(heap.begin(), heap.end(), worse);
      }
    }
    if (cur.next >= 0) {
      if (const MergeVal* mn = merges.find(cur.id, syms[cur.next].id)) {
        heap.push_back({mn->rank, top.pos, mn->new_id});
        std::push_heap(heap.begin(), heap.end(), worse);
      }
    }
  }
  for (int32_t i = n > 0 ? 0 : -1; i >= 0; i = syms[i].next) out.push_back(syms[i].id);
}

void Tokenizer::Impl::encode_word(std::string_view w, std::vector<int32_t>& out) const {
  if (ignore_merges) {  // the whole pre-token is a token: no merging
    auto it = key_to_id.find(w);
    if (it != key_to_id.end()) {
      out.push_back(it->second);
      return;
    }
  }
  if (w.size() <= kCacheMaxWord || cut_chars.empty()) {
    bpe_cached(w, out);
    return;
  }
  // A long word (SentencePiece style: the whole text is one word) is cut before each cut character
  // that follows a different character; no merge crosses such a cut, so the result is the same as
  // merging the whole word, and the chunks are cached like pre-tokens.
  size_t start = 0;
  for (size_t i = 1; i < w.size(); ++i) {
    for (const auto& c : cut_chars) {
      if (w[i] == c[0] && w.compare(i, c.size(), c) == 0 &&
          (i < c.size() || w.compare(i - c.size(), c.size(), c) != 0)) {
        bpe_cached(w.substr(start, i - start), out);
        start = i;
        break;
      }
    }
  }
  bpe_cached(w.substr(start), out);
}

void Tokenizer::Impl::bpe_cached(std::string_view w, std::vector<int32_t>& out) const {
  if (w.size() > kCacheMaxWord) {
    bpe_word(w, out);
    return;
  }
  {
    std::lock_guard<std::mutex> lk(cache_mu);
    auto it = cache.find(w);
    if (it != cache.end()) {
      out.insert(out.end(), cache_ids.begin() + it->second.off,
                 cache_ids.begin() + it->second.off + it->second.len);
      return;
    }
  }
  const size_t before = out.size();
  bpe_word(w, out);
  std::lock_guard<std::mutex> lk(cache_mu);
  if (cache.size() >= kCacheMaxEntries || cache_ids.size() > (size_t{1} << 24)) {
    cache.clear();
    cache_keys.clear();
    cache_ids.clear();
  }
  if (cache.count(w)) return;
  cache_keys.emplace_back(w);
  const auto off = static_cast<uint32_t>(cache_ids.size());
  cache_ids.insert(cache_ids.end(), out.begin() + static_cast<std::ptrdiff_t>(before), out.end());
  cache.emplace(cache_keys.back(), CacheEntry{off, static_cast<uint32_t>(out.size() - before)});
}

// ================================================================================================

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

Tokenizer Tokenizer::from_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) fail("{}: cannot open tokenizer file", path);
  std::ostringstream ss;
  ss << f.rdbuf();
  if (f.bad()) fail("{}: cannot read tokenizer file", path);
  return from_json_string(ss.str(), path);
}

Tokenizer Tokenizer::from_json_string(const std::string& text, const std::string& source_name) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    std::string msg = e.what();
    std::replace(msg.begin(), msg.end(), '\n', ' ');
    fail("{}: invalid JSON: {}", source_name, msg);
  }
  auto impl = std::make_unique<Impl>();
  impl->src = source_name;
  try {
    impl->load(j);
  } catch (const json::exception& e) {
    std::string msg = e.what();
    std::replace(msg.begin(), msg.end(), '\n', ' ');
    fail("{}: malformed tokenizer.json: {}", source_name, msg);
  }
  return Tokenizer(std::move(impl));
}

std::vector<int32_t> Tokenizer::encode(std::string_view input, bool add_special) const {
  const Impl& m = *impl_;
  std::string sanitized;
  std::string_view text = input;
  if (!is_valid_utf8(input)) {
    sanitized = utf8_lossy(input);
    text = sanitized;
  }
  std::vector<Segment> segs, segs2;
  split_on_added(text, true, m.match_raw, segs);
  std::deque<std::string> arena;
  if (!m.normalizer.empty()) {
    for (const auto& s : segs) {
      if (s.added_id >= 0) {
        segs2.push_back(s);
        continue;
      }
      arena.push_back(m.normalize(s.text));
      split_on_added(arena.back(), s.at_origin, m.match_norm, segs2);
    }
    segs.swap(segs2);
  }
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 8);
  auto sink = [&](const Piece& p) { m.encode_word(p.text, ids); };
  for (const auto& s : segs) {
    if (s.added_id >= 0)
      ids.push_back(s.added_id);
    else
      m.run_pre(0, Piece{s.text, s.at_origin}, sink);
  }
  if (!add_special) return ids;
  for (const auto& st : m.post) {
    if (st.kind != PostStep::Template) continue;
    std::vector<int32_t> out;
    out.reserve(ids.size() + 4);
    for (const auto& item : st.items) {
      if (item.is_seq)
        out.insert(out.end(), ids.begin(), ids.end());
      else
        out.insert(out.end(), item.ids.begin(), item.ids.end());
    }
    ids.swap(out);
  }
  return ids;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids, bool skip_special) const {
  const Impl& m = *impl_;
  std::vector<std::string> toks;
  toks.reserve(ids.size());
  for (int32_t id : ids) {
    auto it = m.added_by_id.find(id);
    if (it != m.added_by_id.end()) {
      const AddedToken& t = m.added[it->second];
      if (skip_special && t.special) continue;
      toks.push_back(t.pattern);  // normalized tokens decode as their normalized content (as HF does)
      continue;
    }
    if (id < 0 || static_cast<size_t>(id) >= m.id_to_tok.size() || !m.has_tok[id]) continue;
    toks.push_back(m.id_to_tok[id]);
  }
  if (!m.has_decoder) {
    std::string out;
    for (size_t i = 0; i < toks.size(); ++i) {
      if (i) out += ' ';
      out += toks[i];
    }
    return out;
  }
  const ByteMap& bm = byte_map();
  std::vector<std::string> next;
  for (const auto& st : m.decoder) {
    next.clear();
    switch (st.kind) {
      case DecStep::ByteLevel: {
        std::string bytes, raw;
        for (const auto& t : toks) {
          if (bm.to_bytes(t, &raw))
            bytes += raw;
          else
            bytes += t;
        }
        next.push_back(utf8_lossy(bytes));
        break;
      }
      case DecStep::Replace:
        for (const auto& t : toks) {
          std::string o;
          size_t prev = 0;
          auto repl = [&](size_t b, size_t e) {
            o.append(t, prev, b - prev);
            o += st.b;
            prev = e;
          };
          if (st.regex) {
            st.regex->for_each_match(t, repl);
          } else if (!st.a.empty()) {
            size_t pos;
            while ((pos = t.find(st.a, prev)) != std::string::npos) repl(pos, pos + st.a.size());
          }
          o.append(t, prev, std::string::npos);
          next.push_back(std::move(o));
        }
        break;
      case DecStep::ByteFallback: {
        std::string pending;
        auto flush = [&] {
          if (pending.empty()) return;
          if (is_valid_utf8(pending)) {
            next.push_back(pending);
          } else {
            for (size_t i = 0; i < pending.size(); ++i) next.push_back("\xEF\xBF\xBD");
          }
          pending.clear();
        };
        for (const auto& t : toks) {
          if (t.size() == 6 && t.compare(0, 3, "<0x") == 0 && t[5] == '>' && std::isxdigit(static_cast<unsigned char>(t[3])) &&
              std::isxdigit(static_cast<unsigned char>(t[4]))) {
            pending.push_back(static_cast<char>(std::stoi(t.substr(3, 2), nullptr, 16)));
          } else {
            flush();
            next.push_back(t);
          }
        }
        flush();
        break;
      }
      case DecStep::Fuse: {
        std::string all;
        for (const auto& t : toks) all += t;
        next.push_back(std::move(all));
        break;
      }
      case DecStep::Strip:
        for (const auto& t : toks) {
          size_t b = 0, e = t.size();
          for (size_t k = 0; k < st.start && b < e && t.compare(b, st.a.size(), st.a) == 0; ++k) b += st.a.size();
          for (size_t k = 0; k < st.stop && e >= b + st.a.size() && t.compare(e - st.a.size(), st.a.size(), st.a) == 0; ++k)
            e -= st.a.size();
          next.push_back(t.substr(b, e - b));
        }
        break;
      case DecStep::Metaspace:
        for (size_t i = 0; i < toks.size(); ++i) {
          std::string o;
          const std::string& t = toks[i];
          size_t prev = 0, pos;
          while ((pos = t.find(st.a, prev)) != std::string::npos) {
            o.append(t, prev, pos - prev);
            o += ' ';
            prev = pos + st.a.size();
          }
          o.append(t, prev, std::string::npos);
          if (i == 0 && st.prepend && !o.empty() && o[0] == ' ') o.erase(0, 1);
          next.push_back(std::move(o));
        }
        break;
    }
    toks.swap(next);
  }
  std::string out;
  for (const auto& t : toks) out += t;
  return out;
}

int32_t Tokenizer::vocab_size() const { return impl_->vocab_n; }
int32_t Tokenizer::bos_id() const { return impl_->bos; }
int32_t Tokenizer::eos_id() const { return impl_->eos; }

int32_t Tokenizer::token_to_id(std::string_view token) const {
  auto it = impl_->added_by_content.find(std::string(token));
  if (it != impl_->added_by_content.end()) return it->second;
  return impl_->lookup_token(token);
}

std::string Tokenizer::id_to_token(int32_t id) const {
  auto it = impl_->added_by_id.find(id);
  if (it != impl_->added_by_id.end()) return impl_->added[it->second].content;
  if (id < 0 || static_cast<size_t>(id) >= impl_->id_to_tok.size() || !impl_->has_tok[id]) return "";
  return impl_->id_to_tok[id];
}

}  // namespace antkv
