// PCRE2 regular expressions for the tokenizer's Split/Replace patterns and the GPT-2 pre-tokenizer
// (UTF + UCP, so \p{L}, \s and \w follow Unicode; JIT-compiled when available).
#pragma once
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <string>
#include <string_view>

#include "core/error.h"
#include "tokenizer/utf8.h"

namespace antkv::tok {

// Per-thread match data and JIT stack (defined in regex.cpp).
struct MatchResources {
  pcre2_match_data* md = nullptr;
  pcre2_match_context* ctx = nullptr;
  pcre2_jit_stack* stack = nullptr;
  MatchResources();
  ~MatchResources();
  MatchResources(const MatchResources&) = delete;
  MatchResources& operator=(const MatchResources&) = delete;
};
MatchResources& match_resources();

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

}  // namespace antkv::tok
