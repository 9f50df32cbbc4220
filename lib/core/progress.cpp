#include "core/progress.h"

#include <fmt/format.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>

namespace antkv {

std::string format_duration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  auto t = static_cast<int64_t>(s + 0.5);
  return fmt::format("{}:{:02}:{:02}", t / 3600, (t / 60) % 60, t % 60);
}

Progress::Progress(std::string label, int64_t total, std::string unit, bool enabled)
    : label_(std::move(label)), unit_(std::move(unit)), total_(total), enabled_(enabled),
      tty_(isatty(fileno(stderr)) != 0), start_(std::chrono::steady_clock::now()), last_draw_(start_) {}

Progress::~Progress() {
  if (enabled_ && tty_ && !finished_ && done_ > 0) std::fputc('\n', stderr);
}

double Progress::elapsed_seconds() const {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
}

void Progress::advance(int64_t n, const std::string& extra) {
  done_ += n;
  auto now = std::chrono::steady_clock::now();
  double since = std::chrono::duration<double>(now - last_draw_).count();
  if (since >= (tty_ ? 0.2 : 5.0) || done_ == total_) {
    last_draw_ = now;
    draw(false, extra);
  }
}

void Progress::finish(const std::string& extra) {
  if (finished_) return;
  finished_ = true;
  if (tty_ || drawn_done_ != done_) draw(true, extra);  // a log already has the final count
}

void Progress::draw(bool final, const std::string& extra) {
  if (!enabled_) return;
  drawn_done_ = done_;
  double el = elapsed_seconds();
  double rate = el > 0 ? done_ / el : 0.0;
  double eta = rate > 0 ? (total_ - done_) / rate : NAN;
  std::string line = fmt::format("[{}] {}/{} {}  {:.1f} {}/s  elapsed {}  ETA {}{}{}", label_, done_,
                                 total_, unit_, rate, unit_, format_duration(el),
                                 final ? "0:00:00" : format_duration(eta), extra.empty() ? "" : "  ", extra);
  if (tty_)
    std::fprintf(stderr, "\r\033[K%s%s", line.c_str(), final ? "\n" : "");
  else
    std::fprintf(stderr, "%s\n", line.c_str());
  std::fflush(stderr);
}

}  // namespace antkv
