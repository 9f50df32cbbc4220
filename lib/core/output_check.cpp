#include "core/output_check.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>

#include "core/atomic_file.h"
#include "core/error.h"

namespace fs = std::filesystem;

namespace antkv {
namespace {
std::string canonical_or_self(const std::string& p) {
  std::error_code ec;
  const fs::path c = fs::weakly_canonical(fs::absolute(p), ec);
  return ec ? p : c.string();
}
}  // namespace

bool same_file(const std::string& a, const std::string& b) {
  struct stat sa {}, sb {};
  if (::stat(a.c_str(), &sa) == 0 && ::stat(b.c_str(), &sb) == 0)
    return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
  return canonical_or_self(a) == canonical_or_self(b);
}

void check_writable_folder(const std::string& dir_in, const std::string& what) {
  const std::string dir = dir_in.empty() ? "." : dir_in;
  std::error_code ec;
  if (!fs::exists(dir, ec)) {
    fs::create_directories(dir, ec);
    ANTKV_CHECK(!ec, "{}: cannot create the output folder ({}): {}", dir, what, ec.message());
  }
  ANTKV_CHECK(fs::is_directory(dir, ec), "{}: not a folder ({})", dir, what);
  const std::string probe = (fs::path(dir) / ".antkv-write-probe").string() + ".tmp-" + std::to_string(getpid()) + "-probe";
  const int fd = ::open(probe.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  ANTKV_CHECK(fd >= 0, "{}: cannot write in this folder ({}): {}", dir, what, std::strerror(errno));
  const ssize_t n = ::write(fd, "x", 1);
  const int err = n == 1 ? 0 : errno;
  ::close(fd);
  ::unlink(probe.c_str());
  ANTKV_CHECK(err == 0, "{}: cannot write in this folder ({}): {}", dir, what, std::strerror(err));
}

void OutputCheck::input(const std::string& path, const std::string& what) {
  if (!path.empty()) inputs_.push_back({path, what, false});
}

void OutputCheck::input_folder(const std::string& dir, const std::string& what) {
  std::error_code ec;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec))
    if (it->is_regular_file(ec)) inputs_.push_back({it->path().string(), what, false});
}

void OutputCheck::output(const std::string& path, const std::string& what, bool force) {
  outputs_.push_back({path, what, force});
}

void OutputCheck::output_folder(const std::string& dir, const std::string& what) { folders_.push_back({dir, what, false}); }

void OutputCheck::check() const {
  for (size_t i = 0; i < outputs_.size(); ++i) {
    const Entry& o = outputs_[i];
    ANTKV_CHECK(!o.path.empty(), "{}: empty output path", o.what);
    check_output_name(o.path);
    std::error_code ec;
    ANTKV_CHECK(!fs::is_directory(o.path, ec), "{}: is a folder ({} must be a file)", o.path, o.what);
    for (const Entry& in : inputs_)
      ANTKV_CHECK(!same_file(o.path, in.path), "{}: the output ({}) is also an input ({}); choose another output path",
                  o.path, o.what, in.what);
    for (size_t j = 0; j < i; ++j)
      ANTKV_CHECK(!same_file(o.path, outputs_[j].path), "{}: two outputs of this run ({} and {}) are the same file",
                  o.path, outputs_[j].what, o.what);
    ANTKV_CHECK(o.force || !fs::exists(o.path, ec), "{}: already exists (use --force to overwrite) ({})", o.path,
                o.what);
    const fs::path parent = fs::absolute(o.path).parent_path();
    ANTKV_CHECK(fs::is_directory(parent, ec), "{}: output folder {} does not exist ({})", o.path, parent.string(), o.what);
    check_writable_folder(parent.string(), o.what);
    for (const auto& note : remove_stale_temporaries(o.path)) std::fprintf(stderr, "%s\n", note.c_str());
  }
  for (const Entry& f : folders_) {
    for (const Entry& in : inputs_)
      ANTKV_CHECK(!same_file(f.path, in.path), "{}: the output folder ({}) is an input ({})", f.path, f.what, in.what);
    check_writable_folder(f.path, f.what);
    for (const auto& note : remove_stale_temporaries_in(f.path)) std::fprintf(stderr, "%s\n", note.c_str());
  }
}

}  // namespace antkv
