#include "core/atomic_file.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <random>
#include <sstream>

#include "core/error.h"

namespace fs = std::filesystem;

namespace antkv {
namespace {

std::mutex g_mutex;
std::map<std::string, std::string> g_live;  // temporary -> final path

std::string random_suffix() {
  static std::mutex m;
  static std::mt19937_64 rng{std::random_device{}() ^ (static_cast<uint64_t>(getpid()) << 32)};
  std::lock_guard<std::mutex> lock(m);
  return fmt::format("{:08x}", static_cast<uint32_t>(rng()));
}

std::string folder_of(const std::string& path) {
  const fs::path p = fs::path(path).parent_path();
  return p.empty() ? "." : p.string();
}

// fsync a file or folder by path; returns errno or 0.
int fsync_path(const std::string& path, bool folder) {
  const int fd = ::open(path.c_str(), (folder ? O_RDONLY | O_DIRECTORY : O_RDONLY) | O_CLOEXEC);
  if (fd < 0) return errno;
  int err = 0;
  if (::fsync(fd) != 0 && !(folder && (errno == EINVAL || errno == EROFS))) err = errno;
  if (::close(fd) != 0 && err == 0) err = errno;
  return err;
}

// "<name>.tmp-<pid>..." -> pid, or -1 when the name does not follow the pattern.
long temp_pid(const std::string& file_name, const std::string& base) {
  const std::string prefix = base + ".tmp-";
  if (file_name.size() <= prefix.size() || file_name.compare(0, prefix.size(), prefix) != 0) return -1;
  size_t i = prefix.size(), j = i;
  while (j < file_name.size() && std::isdigit(static_cast<unsigned char>(file_name[j]))) ++j;
  if (j == i || (j < file_name.size() && file_name[j] != '-')) return -1;
  return std::stol(file_name.substr(i, j - i));
}

bool process_alive(long pid) { return pid > 0 && (::kill(static_cast<pid_t>(pid), 0) == 0 || errno == EPERM); }

void handle_stale(const fs::path& p, long pid, std::vector<std::string>& notes) {
  if (pid == static_cast<long>(getpid())) return;
  if (process_alive(pid)) {
    notes.push_back(fmt::format("{}: temporary output of running process {}, left alone", p.string(), pid));
    return;
  }
  std::error_code ec;
  if (fs::remove(p, ec))
    notes.push_back(fmt::format("removed {}, the temporary output of an interrupted run (process {})", p.string(), pid));
  else
    notes.push_back(fmt::format("{}: temporary output of an interrupted run (process {}); cannot remove it: {}",
                                p.string(), pid, ec.message()));
}

}  // namespace

void check_output_name(const std::string& final_path) {
  const std::string name = fs::path(final_path).filename().string();
  ANTKV_CHECK(name.size() <= kMaxOutputNameBytes, "{}: the file name is {} bytes; an output's name may have at most {} "
              "(the file system's 255 less 24 for the suffix of its temporary, .tmp-<pid>-<random>)", final_path,
              name.size(), kMaxOutputNameBytes);
}

AtomicFile::AtomicFile(std::string final_path)
    : final_path_(std::move(final_path)),
      temp_path_(final_path_ + ".tmp-" + std::to_string(static_cast<long>(getpid())) + "-" + random_suffix()) {
  check_output_name(final_path_);
  std::lock_guard<std::mutex> lock(g_mutex);
  g_live[temp_path_] = final_path_;
}

AtomicFile::~AtomicFile() {
  if (!committed_) ::unlink(temp_path_.c_str());
  std::lock_guard<std::mutex> lock(g_mutex);
  g_live.erase(temp_path_);
}

void AtomicFile::commit() {
  if (const int err = fsync_path(temp_path_, false))
    fail("{}: cannot write: {} (fsync of {})", final_path_, std::strerror(err), temp_path_);
  if (std::rename(temp_path_.c_str(), final_path_.c_str()) != 0)
    fail("{}: cannot rename {} into place: {}", final_path_, temp_path_, std::strerror(errno));
  committed_ = true;
  if (const int err = fsync_path(folder_of(final_path_), true))
    fail("{}: written, but syncing its folder failed: {}", final_path_, std::strerror(err));
}

void write_file_atomic(const std::string& path, const std::string& contents) {
  AtomicFile f(path);
  f.write(contents);
  f.commit();
}

void AtomicFile::write(const std::string& contents) {
  const std::string& path = final_path_;
  const int fd = ::open(temp_path_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
  if (fd < 0) fail("{}: cannot create: {} ({})", path, std::strerror(errno), temp_path_);
  const char* p = contents.data();
  size_t left = contents.size();
  int err = 0;
  while (left > 0) {
    const ssize_t n = ::write(fd, p, left);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      err = n < 0 ? errno : EIO;
      break;
    }
    p += n, left -= static_cast<size_t>(n);
  }
  if (err == 0 && ::fsync(fd) != 0) err = errno;
  if (::close(fd) != 0 && err == 0) err = errno;
  if (err)
    fail("{}: cannot write: {} ({} of {} bytes written)", path, std::strerror(err), contents.size() - left,
         contents.size());
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  ANTKV_CHECK(in.good(), "{}: cannot open: {}", path, std::strerror(errno));
  std::ostringstream ss;
  ss << in.rdbuf();
  ANTKV_CHECK(!in.bad(), "{}: cannot read: {}", path, std::strerror(errno));
  return ss.str();
}

std::string output_name(const std::string& path) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_live.find(path);
  return it == g_live.end() ? path : it->second;
}

std::vector<std::string> remove_stale_temporaries(const std::string& final_path) {
  std::vector<std::string> notes;
  const std::string base = fs::path(final_path).filename().string();
  std::error_code ec;
  for (fs::directory_iterator it(folder_of(final_path), ec), end; !ec && it != end; it.increment(ec)) {
    const long pid = temp_pid(it->path().filename().string(), base);
    if (pid > 0) handle_stale(it->path(), pid, notes);
  }
  return notes;
}

std::vector<std::string> remove_stale_temporaries_in(const std::string& folder) {
  std::vector<std::string> notes;
  std::error_code ec;
  for (fs::recursive_directory_iterator it(folder, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    const size_t at = name.rfind(".tmp-");
    if (at == std::string::npos || at == 0) continue;
    const long pid = temp_pid(name, name.substr(0, at));
    if (pid > 0) handle_stale(it->path(), pid, notes);
  }
  return notes;
}

}  // namespace antkv
