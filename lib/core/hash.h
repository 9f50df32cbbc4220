// Content hashes (XXH3-128, hex) for provenance: the model config hash stored in every output, the
// calibration file hash stored in codebooks. Not cryptographic; they detect mismatched inputs.
#pragma once
#include <string>
#include <string_view>

namespace antkv {

std::string hash_bytes(std::string_view bytes);
std::string hash_file(const std::string& path);  // streams the file

}  // namespace antkv
