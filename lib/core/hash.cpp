#include "core/hash.h"

#include <xxhash.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <memory>
#include <vector>

#include "core/error.h"

namespace antkv {
namespace {
std::string to_hex(XXH128_hash_t h) {
  return fmt::format("{:016x}{:016x}", static_cast<unsigned long long>(h.high64),
                     static_cast<unsigned long long>(h.low64));
}
}  // namespace

std::string hash_bytes(std::string_view bytes) { return to_hex(XXH3_128bits(bytes.data(), bytes.size())); }

std::string hash_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  ANTKV_CHECK(in.good(), "{}: cannot open: {}", path, std::strerror(errno));
  std::unique_ptr<XXH3_state_t, decltype(&XXH3_freeState)> st(XXH3_createState(), XXH3_freeState);
  XXH3_128bits_reset(st.get());
  std::vector<char> buf(1 << 20);
  while (in) {
    in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    XXH3_128bits_update(st.get(), buf.data(), static_cast<size_t>(in.gcount()));
  }
  return to_hex(XXH3_128bits_digest(st.get()));
}

}  // namespace antkv
