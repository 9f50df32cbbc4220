// A progress line for long work: "label  done/total unit  rate unit/s  ETA h:mm:ss" on stderr,
// redrawn in place on a terminal and printed at most every few seconds otherwise (logs stay short).
#pragma once
#include <chrono>
#include <cstdint>
#include <string>

namespace antkv {

class Progress {
 public:
  Progress(std::string label, int64_t total, std::string unit, bool enabled = true);
  ~Progress();
  void advance(int64_t n = 1, const std::string& extra = "");
  void finish(const std::string& extra = "");
  double elapsed_seconds() const;

 private:
  void draw(bool final, const std::string& extra);
  std::string label_, unit_;
  int64_t total_, done_ = 0, drawn_done_ = -1;
  bool enabled_, tty_, finished_ = false;
  std::chrono::steady_clock::time_point start_, last_draw_;
};

std::string format_duration(double seconds);

}  // namespace antkv
