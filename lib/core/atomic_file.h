// The output discipline: every file a command writes goes to "<path>.tmp-<pid>-<random>" in the same
// folder and is renamed over <path> only by commit(), after it was fsynced; every write, flush, fsync,
// close and rename is checked, and a failure is one antkv::Error line with the OS reason. An interrupted or
// failed run never leaves a file under the final name, and the previous file stays intact. The destructor
// removes an uncommitted temporary (it never throws). Temporaries of killed runs (the pattern above) are
// found by remove_stale_temporaries().
#pragma once
#include <string>
#include <vector>

namespace antkv {

// The longest file name an output may have: NAME_MAX (255) less the 24 bytes of the temporary's suffix
// ".tmp-<pid up to 10 digits>-<8 hex>". Longer names are refused by check_output_name (called by AtomicFile and
// OutputCheck) with one line naming the limit, instead of failing on the temporary's name.
constexpr size_t kMaxOutputNameBytes = 255 - 24;
void check_output_name(const std::string& final_path);

class AtomicFile {
 public:
  explicit AtomicFile(std::string final_path);
  ~AtomicFile();
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  const std::string& temp_path() const { return temp_path_; }
  const std::string& final_path() const { return final_path_; }
  // Writes contents to the temporary (created exclusively), every write checked, fsynced and closed.
  void write(const std::string& contents);
  // fsync the temporary, rename it over the final path, fsync the folder; throws antkv::Error on failure
  // (the temporary is then removed by the destructor and the previous file is untouched).
  void commit();

 private:
  std::string final_path_, temp_path_;
  bool committed_ = false;
};

// Writes contents to path atomically (temporary + fsync + rename), every step checked.
void write_file_atomic(const std::string& path, const std::string& contents);
std::string read_file(const std::string& path);

// The final path when `path` is the temporary of a live AtomicFile, else path (for error messages).
std::string output_name(const std::string& path);

// Temporaries "<name>.tmp-<pid>[-...]" next to `final_path` (or every such file in `folder`) left by
// runs that no longer exist are removed; those of live processes are left alone. Returns one line per
// file found, saying which was done (the caller prints them).
std::vector<std::string> remove_stale_temporaries(const std::string& final_path);
std::vector<std::string> remove_stale_temporaries_in(const std::string& folder);

}  // namespace antkv
