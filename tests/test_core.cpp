// Core utilities: atomic output files, hashing, progress formatting, interruption.
#include <filesystem>
#include <fstream>

#include "core/atomic_file.h"
#include "core/error.h"
#include "core/hash.h"
#include "core/progress.h"
#include "test_support.h"

using namespace antkv;
namespace fs = std::filesystem;

TEST_CASE("AtomicFile: nothing at the final path until commit - temp removed when abandoned", "[core]") {
  const std::string dir = test::temp_dir();
  const std::string path = dir + "/out.json";
  {
    AtomicFile f(path);
    std::ofstream(f.temp_path()) << "partial";
    CHECK_FALSE(fs::exists(path));
  }  // abandoned (an exception or an interrupt unwinds through here)
  CHECK_FALSE(fs::exists(path));
  CHECK(fs::is_empty(dir));
  write_file_atomic(path, "done\n");
  CHECK(read_file(path) == "done\n");
  CHECK_THROWS_WITH(write_file_atomic(dir + "/no/such/dir/x", "y"), Catch::Contains("no/such/dir"));
}

TEST_CASE("hashes are stable and content-sensitive - XXH3-128 known answers", "[core]") {
  // Known answers: the empty input is xxHash's documented XXH128 value (high64 99AA06D3014798D8, low64
  // 6001C324468D497F); "abc" and "antkv" from the xxhsum tool (Debian xxhash 0.8.1: printf abc | xxhsum -H2).
  CHECK(hash_bytes("") == "99aa06d3014798d86001c324468d497f");
  CHECK(hash_bytes("abc") == "06b05ab6733a618578af5f94892f3950");
  CHECK(hash_bytes("antkv") == "1f80f68332811f92ba1e1961b889f21b");
  CHECK(hash_bytes("abc") == hash_bytes("abc"));
  CHECK(hash_bytes("abc") != hash_bytes("abd"));
  CHECK(hash_bytes("abc").size() == 32);
  const std::string dir = test::temp_dir();
  write_file_atomic(dir + "/f", "abc");
  CHECK(hash_file(dir + "/f") == hash_bytes("abc"));
  // a file over the 1 MiB read buffer: the streaming digest equals the one-shot hash
  std::string big(2500000, '\0');
  for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>((i * 2654435761u) >> 13);
  write_file_atomic(dir + "/big", big);
  CHECK(hash_file(dir + "/big") == hash_bytes(big));
  CHECK(hash_file(dir + "/big") != hash_bytes(big.substr(1)));
}

TEST_CASE("durations format as h:mm:ss", "[core]") {
  CHECK(format_duration(0) == "0:00:00");
  CHECK(format_duration(3725.4) == "1:02:05");
  CHECK(format_duration(-1) == "?");
}

TEST_CASE("test names survive CTest registration (no semicolons)", "[core]") {
  // catch_discover_tests splits names at ';' into names that match nothing: such a test would pass unseen.
  for (const auto& tc : Catch::getRegistryHub().getTestCaseRegistry().getAllTests())
    CHECK(tc.name.find(';') == std::string::npos);
}
