#include "core/atomic_file.h"

#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

#include "core/error.h"

namespace antkv {

AtomicFile::AtomicFile(std::string final_path)
    : final_path_(std::move(final_path)),
      temp_path_(final_path_ + ".tmp-" + std::to_string(static_cast<long>(getpid()))) {}

AtomicFile::~AtomicFile() {
  if (!committed_) std::remove(temp_path_.c_str());
}

void AtomicFile::commit() {
  if (std::rename(temp_path_.c_str(), final_path_.c_str()) != 0)
    fail("{}: cannot rename {} into place: {}", final_path_, temp_path_, std::strerror(errno));
  committed_ = true;
}

void write_file_atomic(const std::string& path, const std::string& contents) {
  AtomicFile f(path);
  {
    std::ofstream out(f.temp_path(), std::ios::binary);
    ANTKV_CHECK(out.good(), "{}: cannot open for writing: {}", f.temp_path(), std::strerror(errno));
    out << contents;
    out.flush();
    ANTKV_CHECK(out.good(), "{}: write failed", f.temp_path());
  }
  f.commit();
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  ANTKV_CHECK(in.good(), "{}: cannot open: {}", path, std::strerror(errno));
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace antkv
