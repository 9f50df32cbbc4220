// Checks a command's outputs before any work starts: each output's folder exists and is writable (a
// probe file is created and removed), an existing output is replaced only with --force, and no output is
// one of the inputs or another output (compared as canonical paths, through symlinks and hard links).
// Stale temporaries of killed runs next to each output are removed (or reported when their process lives).
#pragma once
#include <string>
#include <vector>

namespace antkv {

class OutputCheck {
 public:
  // `what` names the option in messages, e.g. "--calib".
  void input(const std::string& path, const std::string& what);
  // Every regular file directly inside dir (a checkpoint folder) is an input.
  void input_folder(const std::string& dir, const std::string& what);
  void output(const std::string& path, const std::string& what, bool force);
  // A folder the command writes into (created when missing; must be writable).
  void output_folder(const std::string& dir, const std::string& what);
  // Throws antkv::Error with the first problem; prints a line to stderr per stale temporary handled.
  void check() const;

 private:
  struct Entry {
    std::string path, what;
    bool force = false;
  };
  std::vector<Entry> inputs_, outputs_, folders_;
};

// Whether a and b name the same file (same device and inode when both exist, else the same canonical path).
bool same_file(const std::string& a, const std::string& b);
// Creates dir (and parents) if needed and proves it writable by creating and removing a probe file.
void check_writable_folder(const std::string& dir, const std::string& what);

}  // namespace antkv
