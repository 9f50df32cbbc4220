#include "core/text_file.h"

#include "core/atomic_file.h"
#include "core/error.h"

namespace antkv {

size_t first_invalid_utf8(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  size_t i = 0;
  while (i < n) {
    const unsigned c = p[i];
    if (c == 0) return i;
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t len;
    unsigned lo = 0x80, hi = 0xBF;  // allowed range of the second byte (no overlongs, surrogates, > U+10FFFF)
    if (c >= 0xC2 && c <= 0xDF) len = 2;
    else if (c == 0xE0) len = 3, lo = 0xA0;
    else if (c >= 0xE1 && c <= 0xEC) len = 3;
    else if (c == 0xED) len = 3, hi = 0x9F;
    else if (c >= 0xEE && c <= 0xEF) len = 3;
    else if (c == 0xF0) len = 4, lo = 0x90;
    else if (c >= 0xF1 && c <= 0xF3) len = 4;
    else if (c == 0xF4) len = 4, hi = 0x8F;
    else return i;
    if (i + len > n) return i;
    if (p[i + 1] < lo || p[i + 1] > hi) return i;
    for (size_t k = 2; k < len; ++k)
      if (p[i + k] < 0x80 || p[i + k] > 0xBF) return i;
    i += len;
  }
  return std::string_view::npos;
}

std::string read_text_file(const std::string& path) {
  std::string text = read_file(path);
  const auto* b = reinterpret_cast<const unsigned char*>(text.data());
  if (text.size() >= 2 && ((b[0] == 0xFF && b[1] == 0xFE) || (b[0] == 0xFE && b[1] == 0xFF)))
    fail("{}: not UTF-8 text: it starts with a UTF-16 byte-order mark (convert it, e.g. iconv -f UTF-16 -t UTF-8)",
         path);
  const size_t bad = first_invalid_utf8(text);
  if (bad != std::string_view::npos) {
    if (b[bad] == 0)
      fail("{}: not UTF-8 text: NUL byte at byte offset {} (UTF-16 or a binary file?)", path, bad);
    fail("{}: not UTF-8 text: invalid byte 0x{:02x} at byte offset {}", path, static_cast<unsigned>(b[bad]), bad);
  }
  return text;
}

}  // namespace antkv
