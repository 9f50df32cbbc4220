// Reading evaluation and calibration text: it must be UTF-8 (the tokenizers' input). Invalid UTF-8, a
// NUL byte (UTF-16 or a binary file) or a UTF-16/32 byte-order mark is an error naming the file and the
// byte offset, instead of a perplexity over nonsense tokens.
#pragma once
#include <cstddef>
#include <string>
#include <string_view>

namespace antkv {

// Offset of the first byte that is not part of valid UTF-8 (or is NUL), or npos when all is valid.
size_t first_invalid_utf8(std::string_view s);
// read_file + the check above; throws antkv::Error "<path>: not UTF-8 text: ... at byte offset N".
std::string read_text_file(const std::string& path);

}  // namespace antkv
