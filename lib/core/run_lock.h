// A run folder is owned by one run at a time: RunFolderLock holds DIR/antkv-run.lock (an flock on it, the
// owner's pid and host written inside) from construction to destruction, so two `antkv-eval run` (or
// `ppl --recipe`) into the same folder cannot mix their dumps, codebooks and results. A second run fails
// with one line naming the lock and the pid holding it. The kernel drops the flock when its process dies, so
// the lock file of a killed run is stale: the next run takes it over (and says so). The destructor removes
// the file: on success, on error and after SIGINT/SIGTERM (core/interrupt.h unwinds the stack).
#pragma once
#include <string>

namespace antkv {

class RunFolderLock {
 public:
  // Creates dir when missing. Throws antkv::Error when another process holds the lock.
  explicit RunFolderLock(const std::string& dir);
  ~RunFolderLock();
  RunFolderLock(const RunFolderLock&) = delete;
  RunFolderLock& operator=(const RunFolderLock&) = delete;

  const std::string& path() const { return path_; }
  static constexpr const char* kFileName = "antkv-run.lock";

 private:
  std::string path_;
  int fd_ = -1;
};

}  // namespace antkv
