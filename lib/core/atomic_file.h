// Outputs are written to "<path>.tmp-<pid>" and renamed over <path> only by commit(): an interrupted or
// failed run never leaves a file that looks complete. The destructor removes an uncommitted temp file.
#pragma once
#include <string>

namespace antkv {

class AtomicFile {
 public:
  explicit AtomicFile(std::string final_path);
  ~AtomicFile();
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  const std::string& temp_path() const { return temp_path_; }
  const std::string& final_path() const { return final_path_; }
  void commit();  // rename temp -> final; throws antkv::Error on failure

 private:
  std::string final_path_, temp_path_;
  bool committed_ = false;
};

// Writes text to path atomically.
void write_file_atomic(const std::string& path, const std::string& contents);
std::string read_file(const std::string& path);

}  // namespace antkv
