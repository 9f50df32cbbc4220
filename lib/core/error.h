// Errors: every failure the user can cause is an antkv::Error with a one-line message that names the
// file (and tensor, key, ...) and what is wrong. Apps print e.what() and exit non-zero.
#pragma once
#include <fmt/format.h>

#include <stdexcept>
#include <string>

namespace antkv {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& msg) : std::runtime_error(msg) {}
};

// Thrown when the user interrupts a long run (SIGINT/SIGTERM); outputs are left untouched.
class Interrupted : public Error {
 public:
  Interrupted() : Error("interrupted") {}
};

// Thrown when a computation produced NaN or Inf; the message names the layer / tensor / window.
class NonFinite : public Error {
 public:
  explicit NonFinite(const std::string& msg) : Error(msg) {}
};

template <typename... Args>
[[noreturn]] void fail(fmt::format_string<Args...> f, Args&&... args) {
  throw Error(fmt::format(f, std::forward<Args>(args)...));
}

}  // namespace antkv

// ANTKV_CHECK(cond, "fmt", args...): throws antkv::Error with the formatted message when cond is false.
#define ANTKV_CHECK(cond, ...)          \
  do {                                  \
    if (!(cond)) ::antkv::fail(__VA_ARGS__); \
  } while (0)
