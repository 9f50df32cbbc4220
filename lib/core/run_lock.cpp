#include "core/run_lock.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>

#include "core/error.h"

namespace fs = std::filesystem;

namespace antkv {
namespace {

std::string host_name() {
  char buf[256] = {0};
  if (::gethostname(buf, sizeof(buf) - 1) != 0) return "unknown-host";
  return buf;
}

std::string read_fd(int fd) {
  std::string s;
  char buf[256];
  if (::lseek(fd, 0, SEEK_SET) < 0) return s;
  for (ssize_t n; (n = ::read(fd, buf, sizeof(buf))) > 0;) s.append(buf, static_cast<size_t>(n));
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s;
}

// "pid 1234 on host-a" from the lock's content "1234 host-a" (or the raw content when it is not of that form)
std::string describe_owner(const std::string& content) {
  const size_t sp = content.find(' ');
  if (content.empty()) return "an unknown process (the lock file is empty)";
  if (sp == std::string::npos) return "process " + content;
  return "process " + content.substr(0, sp) + " on " + content.substr(sp + 1);
}

}  // namespace

RunFolderLock::RunFolderLock(const std::string& dir) : path_((fs::path(dir) / kFileName).string()) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  ANTKV_CHECK(!ec, "{}: cannot create the run folder: {}", dir, ec.message());
  // An flock on a file that another run unlinked in the meantime locks nothing: open, lock, and check that the
  // path still names the locked file; otherwise try again with the new file.
  for (int attempt = 0; attempt < 100; ++attempt) {
    const int fd = ::open(path_.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    ANTKV_CHECK(fd >= 0, "{}: cannot create the run folder's lock: {}", path_, std::strerror(errno));
    if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
      const int err = errno;
      const std::string owner = read_fd(fd);
      ::close(fd);
      ANTKV_CHECK(err != EWOULDBLOCK, "{}: the run folder is in use by {} (lock {}); wait for that run to end, or "
                  "give another --out", dir, describe_owner(owner), path_);
      fail("{}: cannot lock {}: {}", dir, path_, std::strerror(err));
    }
    struct stat locked {}, named {};
    if (::fstat(fd, &locked) != 0 || ::stat(path_.c_str(), &named) != 0 || locked.st_ino != named.st_ino ||
        locked.st_dev != named.st_dev) {
      ::close(fd);
      continue;
    }
    const std::string previous = read_fd(fd);
    if (!previous.empty())  // written by a run that ended without removing it (killed): its flock died with it
      std::fprintf(stderr, "%s: taking over the stale lock of %s, which is no longer running\n", path_.c_str(),
                   describe_owner(previous).c_str());
    const std::string mine = std::to_string(static_cast<long>(::getpid())) + " " + host_name() + "\n";
    if (::ftruncate(fd, 0) != 0 || ::pwrite(fd, mine.data(), mine.size(), 0) != static_cast<ssize_t>(mine.size())) {
      const int err = errno;
      ::unlink(path_.c_str());
      ::close(fd);
      fail("{}: cannot write the run folder's lock: {}", path_, std::strerror(err));
    }
    fd_ = fd;
    return;
  }
  fail("{}: cannot lock the run folder: its lock file keeps being replaced", path_);
}

RunFolderLock::~RunFolderLock() {
  if (fd_ < 0) return;
  ::unlink(path_.c_str());  // while still locked: no other run can hold this file when it disappears
  ::close(fd_);
}

}  // namespace antkv
