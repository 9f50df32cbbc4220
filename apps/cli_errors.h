// Command-line usage errors like every other error: one line "<tool>: error: <what> (see <tool> --help)" on
// stderr and exit status 2 (CLI11's own handler prints two lines and exits 105-109). --help and --version
// still print their text and exit 0.
#pragma once
#include <CLI/CLI.hpp>

#include <cstdio>
#include <string>

namespace antkv {

inline int exit_on_usage_error(const CLI::App& app, const CLI::ParseError& e, const std::string& tool) {
  if (e.get_exit_code() == static_cast<int>(CLI::ExitCodes::Success)) return app.exit(e);  // --help
  std::string what = e.what();
  for (char& c : what)
    if (c == '\n' || c == '\r') c = ' ';
  while (!what.empty() && what.back() == ' ') what.pop_back();
  std::fprintf(stderr, "%s: error: %s (see %s --help)\n", tool.c_str(), what.c_str(), tool.c_str());
  return 2;
}

// The names of app's subcommands, "a, b, c", for a message.
inline std::string subcommand_names(const CLI::App& app) {
  std::string s;
  for (const CLI::App* sub : app.get_subcommands({})) s += (s.empty() ? "" : ", ") + sub->get_name();
  return s;
}

// The first argument when it is not an option nor one of the app's subcommands ("" otherwise): CLI11 would
// answer it with "A subcommand is required".
inline std::string unknown_subcommand(const CLI::App& app, int argc, char** argv) {
  if (argc < 2 || argv[1][0] == '-') return "";
  for (const CLI::App* sub : app.get_subcommands({}))
    if (sub->check_name(argv[1])) return "";
  return argv[1];
}

}  // namespace antkv
