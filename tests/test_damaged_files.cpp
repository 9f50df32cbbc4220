// Damaged HDF5 files: calibration dumps and codebook files written by our own writers, then damaged at
// chosen places (an attribute, the superblock, a dataset's header, a dataset's data, the end of the file) or at
// random bytes. Every load either fails with one line "<file>: <object>: damaged or not an antkv file (...)" or
// gives exactly the undamaged file's contents; HDF5 prints nothing itself and nothing crashes. Also: the same
// calibration inputs give the same dump bytes (a dump's content hash names it in its codebooks' fingerprint).
#include <H5Cpp.h>
#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <thread>

#include "calibrate/calibrate.h"
#include "core/atomic_file.h"
#include "core/error.h"
#include "core/hash.h"
#include "core/text_file.h"
#include "io/calib_dump.h"
#include "io/codebooks.h"
#include "model/checkpoint.h"
#include "recipe/recipe.h"
#include "runtime/cpu_runtime.h"
#include "tokenizer/tokenizer.h"
#include "test_support.h"

using namespace antkv;
namespace fs = std::filesystem;
using Catch::Matchers::Contains;

namespace {

constexpr const char* kDamaged = "damaged or not an antkv file";

std::string bytes_of(const std::string& path) { return read_file(path); }
void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
}

// A small dump: 2 layers, 2 KV heads, head_dim 8, 96 tokens in 3 windows, with the metric=task statistics.
// deflate 1: the partial chunks compress, so the file is small and random damage mostly hits metadata.
std::string small_dump(const std::string& path) {
  const int layers = 2, kv = 2, d = 8, n = 96;
  CalibDumpWriter w(path, layers, kv, d, 1);
  std::vector<int32_t> toks(n), pos(n), win(n);
  for (int i = 0; i < n; ++i) toks[i] = 7 * i % 50, pos[i] = i % 32, win[i] = i / 32;
  w.append_tokens(n, toks.data(), pos.data(), win.data());
  for (int l = 0; l < layers; ++l) {
    std::vector<float> k(size_t(n) * kv * d), v(k.size()), s(size_t(n) * kv);
    for (size_t i = 0; i < k.size(); ++i) k[i] = std::sin(0.1f * i + l), v[i] = std::cos(0.07f * i - l);
    for (size_t i = 0; i < s.size(); ++i) s[i] = 1.0f + 0.5f * float(i % 5);
    w.append_layer(l, n, k.data(), v.data(), s.data(), s.data(), s.data());
    std::vector<float> sq(size_t(kv) * d * d);
    for (size_t i = 0; i < sq.size(); ++i) sq[i] = 0.25f * float(i % 9) + l;
    w.set_query_moment(l, sq);
  }
  CalibMeta m;
  m.model = "synthetic-model";
  m.config_hash = "synthetic";
  m.key_rope = "post";
  m.anchor_score = "error_bound";
  m.version = "test";
  m.fingerprint = "fp";
  m.tokens = n;
  m.seq_len = 32;
  m.windows = 3;
  m.num_layers = layers;
  m.num_kv_heads = kv;
  m.head_dim = d;
  w.finish(m);
  return path;
}

// A small codebook file: 2 layers, 2 KV heads, head_dim 8, c4b2 keys and values.
CodebookSet small_set() {
  CodebookSet s;
  CodebookMeta& m = s.meta;
  m.config_hash = "synthetic";
  m.calib_hash = "h";
  m.key_rope = "post";
  m.weighting = "anchor";
  m.trainer = "test";
  m.version = "test";
  m.fingerprint = "fp";
  m.key_c = m.value_c = 4;
  m.key_b = m.value_b = 2;
  m.num_layers = 2;
  m.num_kv_heads = 2;
  m.head_dim = 8;
  for (auto* side : {&s.keys, &s.values}) {
    side->resize(2);
    for (int l = 0; l < 2; ++l) {
      LayerCodebooks& cb = (*side)[l];
      cb.centroids.resize(2 * 2 * 4 * 4);
      for (size_t i = 0; i < cb.centroids.size(); ++i) cb.centroids[i] = std::sin(0.3f * i + l);
      cb.objective = {1.5, 2.5, 3.5, 4.5};
      cb.iterations = {3, 4, 5, 6};
      cb.reseeded = {0, 1, 0, 2};
      cb.error_norm = {0.125f, 0.25f};
    }
  }
  return s;
}

std::string small_codebooks(const std::string& path) {
  write_codebooks(path, small_set());
  return path;
}

// Everything a dump holds, read through the reader (what training would see).
struct DumpContents {
  CalibMeta meta;
  std::vector<int32_t> tokens, positions, windows;
  std::vector<std::vector<float>> arrays;  // per layer: keys, values, S_K, S_V, anchor_score, query_moment
  bool operator==(const DumpContents& o) const {
    const auto meta_text = [](const CalibMeta& m) {
      return fmt::format("{}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}", m.model, m.config_hash, m.recipe,
                         m.key_rope, m.anchor_score, m.text, m.text_hash, m.version, m.fingerprint, m.tokens, m.seq_len,
                         m.windows, m.seed, m.num_layers, m.num_kv_heads, m.head_dim, m.sample_per_window,
                         m.kv_compression);
    };
    return meta_text(meta) == meta_text(o.meta) && tokens == o.tokens && positions == o.positions &&
           windows == o.windows && arrays == o.arrays;
  }
};

DumpContents load_dump(const std::string& path) {
  CalibDumpReader r(path);
  DumpContents c;
  c.meta = r.meta();
  c.tokens = r.tokens();
  c.positions = r.positions();
  c.windows = r.windows();
  const int64_t n = r.n_tokens(), kv = r.meta().num_kv_heads, d = r.meta().head_dim;
  for (int l = 0; l < r.meta().num_layers; ++l) {
    std::vector<float> k(size_t(n * kv * d)), v(k.size());
    r.read_keys(l, 0, n, k.data());
    r.read_values(l, 0, n, v.data());
    c.arrays.push_back(k);
    c.arrays.push_back(v);
    for (const char* s : {"S_K", "S_V", "anchor_score"}) {
      std::vector<float> x(size_t(n * kv));
      r.read_scores(l, s, 0, n, x.data());
      c.arrays.push_back(x);
    }
    if (r.has_query_moment()) c.arrays.push_back(r.read_query_moment(l));
  }
  return c;
}

bool same_codebooks(const CodebookSet& a, const CodebookSet& b) {
  const auto meta_text = [](const CodebookMeta& m) {
    return fmt::format("{}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}", m.config_hash, m.calib_hash, m.recipe,
                       m.key_rope, m.weighting, m.trainer, m.version, m.fingerprint, m.key_c, m.key_b, m.value_c,
                       m.value_b, m.num_layers, m.num_kv_heads, m.head_dim, m.exclude_anchors, m.gain + m.rotate,
                       m.metric);
  };
  if (meta_text(a.meta) != meta_text(b.meta) || a.keys.size() != b.keys.size()) return false;
  for (size_t l = 0; l < a.keys.size(); ++l)
    for (auto [x, y] : {std::pair{&a.keys[l], &b.keys[l]}, std::pair{&a.values[l], &b.values[l]}})
      if (x->centroids != y->centroids || x->objective != y->objective || x->iterations != y->iterations ||
          x->reseeded != y->reseeded || x->error_norm != y->error_norm || x->rotation != y->rotation ||
          x->mean != y->mean || x->metric != y->metric)
        return false;
  return true;
}

// Offset of the value of scalar attribute `name` in the raw file: the attribute message (versions 1 to 3) that
// holds the name, past its datatype and dataspace.
size_t attribute_value_offset(const std::string& bytes, const std::string& name) {
  const size_t at = bytes.find(name + std::string(1, '\0'));
  REQUIRE(at != std::string::npos);
  REQUIRE(bytes.find(name + std::string(1, '\0'), at + 1) == std::string::npos);  // one place only
  const auto u16 = [&](size_t p) { return size_t(uint8_t(bytes[p])) | size_t(uint8_t(bytes[p + 1])) << 8; };
  const auto pad8 = [](size_t x) { return (x + 7) / 8 * 8; };
  if (at >= 9 && bytes[at - 9] == 3 && u16(at - 7) == name.size() + 1)  // version 3: no padding
    return at + u16(at - 7) + u16(at - 5) + u16(at - 3);
  REQUIRE(at >= 8);
  REQUIRE(u16(at - 6) == name.size() + 1);
  if (bytes[at - 8] == 2) return at + u16(at - 6) + u16(at - 4) + u16(at - 2);
  REQUIRE(bytes[at - 8] == 1);  // version 1: each part padded to 8 bytes
  return at + pad8(u16(at - 6)) + pad8(u16(at - 4)) + pad8(u16(at - 2));
}

// File address of an object's header, and of the first stored chunk of a dataset (its size in *size).
haddr_t object_header_address(const std::string& path, const std::string& object) {
  H5::H5File f(path, H5F_ACC_RDONLY);
  H5O_info_t info;
  REQUIRE(H5Oget_info_by_name(f.getId(), object.c_str(), &info, H5P_DEFAULT) >= 0);
  return info.addr;
}
haddr_t first_chunk_address(const std::string& path, const std::string& dataset, hsize_t* size) {
  H5::H5File f(path, H5F_ACC_RDONLY);
  H5::DataSet ds = f.openDataSet(dataset);
  H5::DataSpace space = ds.getSpace();
  haddr_t addr = 0;
  unsigned mask = 0;
  std::vector<hsize_t> offset(static_cast<size_t>(space.getSimpleExtentNdims()));
  REQUIRE(H5Dget_chunk_info(ds.getId(), space.getId(), 0, offset.data(), &mask, &addr, size) >= 0);
  return addr;
}

// The message of the antkv::Error that f throws ("" when it throws none); any other exception fails the test.
template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// Checks a load's failure: one line naming the file and the object, with the words that say what happened.
void check_damage_message(const std::string& msg, const std::string& path, const std::string& object) {
  INFO(msg);
  CHECK_THAT(msg, Contains(path + ": " + object) && Contains(kDamaged));
  CHECK(msg.find('\n') == std::string::npos);
}

// Rewrites one /meta attribute through HDF5 (a file whose checksums are right but whose value is wrong, as a file
// written by a buggy or foreign writer, or an older file without checksums, would be).
void rewrite_attr(const std::string& path, const std::string& name, const H5::DataType& type, const void* value,
                  size_t string_size = 0) {
  H5::H5File f(path, H5F_ACC_RDWR);
  H5::Group g = f.openGroup("meta");
  g.removeAttr(name);
  if (string_size) {
    H5::StrType t(H5::PredType::C_S1, string_size);
    g.createAttribute(name, t, H5::DataSpace(H5S_SCALAR)).write(t, value);
  } else {
    g.createAttribute(name, type, H5::DataSpace(H5S_SCALAR)).write(type, value);
  }
}

// Captures what the process writes to stderr while alive (HDF5 must print nothing itself).
class StderrCapture {
 public:
  explicit StderrCapture(const std::string& file) : file_(file) {
    std::fflush(stderr);
    saved_ = dup(2);
    const int fd = ::open(file.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    dup2(fd, 2);
    ::close(fd);
  }
  std::string finish() {
    if (saved_ >= 0) {
      std::fflush(stderr);
      dup2(saved_, 2);
      ::close(saved_);
      saved_ = -1;
    }
    return read_file(file_);
  }
  ~StderrCapture() { finish(); }

 private:
  std::string file_;
  int saved_ = -1;
};

}  // namespace

TEST_CASE("damaged dump: an attribute, the superblock, a dataset header, data, truncation - one line each", "[io]") {
  const std::string dir = test::temp_dir();
  const std::string good = small_dump(dir + "/good.h5");
  const std::string bytes = bytes_of(good);
  const DumpContents expected = load_dump(good);
  const auto damaged_copy = [&](const std::string& name, const std::function<void(std::string&)>& damage) {
    std::string b = bytes;
    damage(b);
    write_bytes(dir + "/" + name, b);
    return dir + "/" + name;
  };

  SECTION("/meta num_layers reads 0 after one changed byte") {
    const std::string p = damaged_copy("num_layers.h5", [&](std::string& b) {
      b[attribute_value_offset(b, "num_layers")] = 0;  // 2 -> 0
    });
    check_damage_message(error_of([&] { load_dump(p); }), p, "/meta");
  }
  SECTION("the superblock: its signature, its sizes") {
    const std::string p = damaged_copy("signature.h5", [](std::string& b) { b[1] ^= 0x20; });
    const std::string msg = error_of([&] { load_dump(p); });
    check_damage_message(msg, p, "superblock");
    CHECK_THAT(msg, Contains("not an HDF5 file"));
    const std::string q = damaged_copy("superblock.h5", [](std::string& b) { b[13] ^= 0x01; });
    check_damage_message(error_of([&] { load_dump(q); }), q, "superblock");
  }
  SECTION("the header of /layer_1/keys") {
    const haddr_t at = object_header_address(good, "/layer_1/keys");
    const std::string p = damaged_copy("header.h5", [&](std::string& b) { b[at + 24] ^= 0x04; });
    check_damage_message(error_of([&] { load_dump(p); }), p, "/layer_1/keys");
  }
  SECTION("the data of /layer_1/values: the Fletcher32 checksum") {
    hsize_t size = 0;
    const haddr_t at = first_chunk_address(good, "/layer_1/values", &size);
    const std::string p = damaged_copy("data.h5", [&](std::string& b) { b[at + size / 2] ^= 0x10; });
    CalibDumpReader r(p);  // the metadata is intact
    std::vector<float> v(size_t(96) * 2 * 8);
    const std::string msg = error_of([&] { r.read_values(1, 0, 96, v.data()); });
    check_damage_message(msg, p, "/layer_1/values");
    CHECK_THAT(msg, Contains("Fletcher32"));
    std::vector<float> k(v.size());  // the other arrays still read
    r.read_keys(1, 0, 96, k.data());
    CHECK(k == expected.arrays[6]);  // layer 1 keys (layer 0: keys, values, S_K, S_V, anchor_score, query_moment)
  }
  SECTION("truncated") {
    for (size_t keep : {size_t(0), size_t(100), bytes.size() / 2, bytes.size() - 1}) {
      const std::string p = damaged_copy("truncated-" + std::to_string(keep) + ".h5", [&](std::string& b) { b.resize(keep); });
      INFO("kept " << keep << " of " << bytes.size() << " bytes");
      check_damage_message(error_of([&] { load_dump(p); }), p, "superblock");
    }
  }
  SECTION("values that read cleanly but are wrong: counts, enums, sizes against the datasets") {
    const std::string p = dir + "/values.h5";
    const int64_t zero = 0, three = 3, many = int64_t{1} << 50, fewer = 95;
    fs::copy_file(good, p);
    rewrite_attr(p, "num_layers", H5::PredType::NATIVE_INT64, &zero);
    CHECK(error_of([&] { load_dump(p); }) ==
          p + ": /meta num_layers: damaged or not an antkv file (reads 0, expected 1 to 1024)");
    write_bytes(p, bytes);
    rewrite_attr(p, "num_layers", H5::PredType::NATIVE_INT64, &three);
    CHECK(error_of([&] { load_dump(p); }) ==
          p + ": /meta num_layers: damaged or not an antkv file (reads 3, but the file holds 2 layer groups)");
    write_bytes(p, bytes);
    rewrite_attr(p, "head_dim", H5::PredType::NATIVE_INT64, &many);
    check_damage_message(error_of([&] { load_dump(p); }), p, "/meta head_dim");
    write_bytes(p, bytes);
    rewrite_attr(p, "tokens", H5::PredType::NATIVE_INT64, &fewer);
    CHECK(error_of([&] { load_dump(p); }) ==
          p + ": /tokens: damaged or not an antkv file (shape [96], expected [95])");
    write_bytes(p, bytes);
    rewrite_attr(p, "key_rope", H5::PredType::C_S1, "", 1);
    CHECK(error_of([&] { load_dump(p); }) ==
          p + ": /meta key_rope: damaged or not an antkv file (reads \"\", expected post|pre)");
    write_bytes(p, bytes);
    rewrite_attr(p, "config_hash", H5::PredType::NATIVE_INT64, &three);
    CHECK(error_of([&] { load_dump(p); }) ==
          p + ": /meta config_hash: damaged or not an antkv file (not a string)");
    write_bytes(p, bytes);
    {
      H5::H5File f(p, H5F_ACC_RDWR);
      f.unlink("layer_1/S_V");
    }
    CHECK(error_of([&] { load_dump(p); }) == p + ": /layer_1/S_V: damaged or not an antkv file (missing)");
  }
}

TEST_CASE("damaged codebook file: an attribute, the superblock, a dataset header, data, truncation - one line each",
          "[io]") {
  const std::string dir = test::temp_dir();
  const std::string good = small_codebooks(dir + "/good.h5");
  const std::string bytes = bytes_of(good);
  const CodebookSet expected = read_codebooks(good);
  REQUIRE(same_codebooks(expected, small_set()));
  const auto damaged_copy = [&](const std::string& name, const std::function<void(std::string&)>& damage) {
    std::string b = bytes;
    damage(b);
    write_bytes(dir + "/" + name, b);
    return dir + "/" + name;
  };
  // before: 0 layers read as an empty set (and `antkv-eval run` ended in std::bad_alloc on other values)
  const std::string a = damaged_copy("num_layers.h5", [&](std::string& b) { b[attribute_value_offset(b, "num_layers")] = 0; });
  check_damage_message(error_of([&] { read_codebooks(a); }), a, "/meta");
  const std::string s = damaged_copy("superblock.h5", [](std::string& b) { b[20] ^= 0x40; });
  check_damage_message(error_of([&] { read_codebooks(s); }), s, "superblock");
  const haddr_t at = object_header_address(good, "/layer_0/value_centroids");
  const std::string h = damaged_copy("header.h5", [&](std::string& b) { b[at + 30] ^= 0x01; });
  check_damage_message(error_of([&] { read_codebooks(h); }), h, "/layer_0/value_centroids");
  hsize_t size = 0;
  const haddr_t c = first_chunk_address(good, "/layer_1/key_centroids", &size);
  const std::string d = damaged_copy("data.h5", [&](std::string& b) { b[c + 5] ^= 0x80; });
  const std::string msg = error_of([&] { read_codebooks(d); });
  check_damage_message(msg, d, "/layer_1/key_centroids");
  CHECK_THAT(msg, Contains("Fletcher32"));
  const std::string t = damaged_copy("truncated.h5", [&](std::string& b) { b.resize(b.size() * 2 / 3); });
  check_damage_message(error_of([&] { read_codebooks(t); }), t, "superblock");

  const std::string p = dir + "/values.h5";
  const int64_t big = 40;
  write_bytes(p, bytes);
  rewrite_attr(p, "key_b", H5::PredType::NATIVE_INT64, &big);  // 2^40 centroids: refused before any allocation
  CHECK(error_of([&] { read_codebooks(p); }) == p + ": /meta key_b: damaged or not an antkv file (reads 40, expected 1 to 16)");
  write_bytes(p, bytes);
  rewrite_attr(p, "weighting", H5::PredType::C_S1, "anchox", 6);
  CHECK(error_of([&] { read_codebooks(p); }) ==
        p + ": /meta weighting: damaged or not an antkv file (reads \"anchox\", expected anchor|none)");
  write_bytes(p, bytes);
  {
    H5::H5File f(p, H5F_ACC_RDWR);
    f.unlink("layer_1/value_objective");  // datasets the reader once read without checking their shape
    const hsize_t dims[2] = {2, 1};
    const double x[2] = {1, 2};
    f.createDataSet("layer_1/value_objective", H5::PredType::IEEE_F64LE, H5::DataSpace(2, dims))
        .write(x, H5::PredType::NATIVE_DOUBLE);
  }
  CHECK(error_of([&] { read_codebooks(p); }) ==
        p + ": /layer_1/value_objective: damaged or not an antkv file (shape [2, 1], expected [2, 2])");
}

TEST_CASE("damaged files, fuzzed: random bytes of a dump and a codebook file - a clean error or the same contents",
          "[io]") {
  const std::string dir = test::temp_dir();
  const std::string dump = small_dump(dir + "/dump.h5"), books = small_codebooks(dir + "/books.h5");
  const DumpContents dump_expected = load_dump(dump);
  const CodebookSet books_expected = read_codebooks(books);
  const std::string dump_bytes = bytes_of(dump), books_bytes = bytes_of(books);
  StderrCapture capture(dir + "/stderr.txt");  // HDF5 must print nothing itself
  int failed = 0, same = 0;
  const int seeds = 1000;  // 2000 loads: a few seconds on one core
  for (int seed = 0; seed < seeds; ++seed)
    for (int which = 0; which < 2; ++which) {
      std::mt19937 rng(static_cast<unsigned>(seed * 2 + which));
      std::string b = which == 0 ? dump_bytes : books_bytes;
      const int flips = 1 + static_cast<int>(rng() % 3);
      std::string what;
      for (int i = 0; i < flips; ++i) {
        const size_t at = rng() % b.size();
        const auto mask = static_cast<char>(1 + rng() % 255);
        b[at] ^= mask;
        what += fmt::format(" {}^{:#x}", at, static_cast<unsigned>(static_cast<uint8_t>(mask)));
      }
      if (seed % 10 == 9) {  // and now and then a truncation
        b.resize(rng() % b.size());
        what += fmt::format(" cut at {}", b.size());
      }
      const std::string p = fmt::format("{}/fuzz-{}-{}.h5", dir, seed, which);
      write_bytes(p, b);
      std::string msg;
      bool identical = false;
      try {
        identical = which == 0 ? load_dump(p) == dump_expected : same_codebooks(read_codebooks(p), books_expected);
      } catch (const Error& e) {
        msg = e.what();
      }
      INFO((which == 0 ? "dump" : "codebooks") << " seed " << seed << ":" << what << ": " << msg);
      if (!msg.empty()) {
        ++failed;
        REQUIRE_THAT(msg, Contains(p + ": ") && Contains(kDamaged));
        REQUIRE(msg.find('\n') == std::string::npos);
      } else {
        ++same;
        REQUIRE(identical);
      }
      fs::remove(p);
    }
  const std::string printed = capture.finish();
  CHECK(printed.empty());
  // no file, group, dataset or attribute left open by a failed load
  CHECK(H5Fget_obj_count(H5F_OBJ_ALL, H5F_OBJ_FILE | H5F_OBJ_DATASET | H5F_OBJ_GROUP | H5F_OBJ_ATTR) == 0);
  CHECK(failed > seeds);  // most damage is caught (the rest hit unused bytes)
  WARN(failed << " damaged loads failed cleanly, " << same << " read the undamaged contents");
}

TEST_CASE("damaged dump through antkv-train-codebook: exit 1, one error line naming the file", "[io]") {
  const std::string dir = test::temp_dir();
  const std::string good = small_dump(dir + "/good.h5");
  const std::string recipe = dir + "/r.yaml";
  std::ofstream(recipe) << "name: t\nquant:\n  keys: {c: 4, b: 2}\n  values: {c: 4, b: 2}\nkmeans:\n  iters: 2\n"
                           "  device: cpu\n";
  const haddr_t header = object_header_address(good, "/layer_1/keys");
  struct Case {
    std::string name, object;
    std::function<void(std::string&)> damage;
  };
  const std::vector<Case> cases = {
      // before: exit 0, "96 calibration tokens, 0 codebooks"
      {"num_layers", "/meta", [](std::string& b) { b[attribute_value_offset(b, "num_layers")] = 0; }},
      // a damaged object stays in HDF5's cache until exit: the library must still close quietly
      {"header", "/layer_1/keys", [&](std::string& b) { b[header + 24] ^= 0x04; }},
  };
  for (const auto& c : cases) {
    const std::string dump = dir + "/" + c.name + ".h5", out = dir + "/" + c.name + "-cb.h5";
    std::string b = bytes_of(good);
    c.damage(b);
    write_bytes(dump, b);
    const std::string err = dir + "/stderr.txt";
    const int st = std::system((std::string("OMP_NUM_THREADS=1 ") + ANTKV_TRAIN_CODEBOOK_PATH + " --recipe " + recipe +
                                " --calib " + dump + " --out " + out + " -q > /dev/null 2> " + err).c_str());
    const std::string msg = read_file(err);
    INFO(c.name << ": " << msg);
    REQUIRE(WIFEXITED(st));
    CHECK(WEXITSTATUS(st) == 1);
    const size_t at = msg.find("error: ");
    REQUIRE(at != std::string::npos);
    CHECK(msg.find("error: ", at + 1) == std::string::npos);
    CHECK_THAT(msg.substr(at), Contains(dump + ": " + c.object) && Contains(kDamaged));
    CHECK(msg.find('\n', at) == msg.size() - 1);  // the error is one line, and the last
    CHECK_FALSE(fs::exists(out));
  }
}

TEST_CASE("a dump written before checksums (earliest HDF5 format, no Fletcher32, time stamps) still reads", "[io]") {
  // What the writer made before: HDF5's default (earliest) format, datasets without the checksum filter (K/V
  // chunked, the token arrays chunked with deflate), object times tracked, a /meta created time stamp.
  const std::string path = test::temp_dir() + "/old.h5";
  const int n = 40, kv = 2, d = 4;
  std::vector<int32_t> ids(n);
  for (int i = 0; i < n; ++i) ids[i] = 3 * i;
  std::vector<uint16_t> half(size_t(n) * kv * d);
  for (size_t i = 0; i < half.size(); ++i) half[i] = static_cast<uint16_t>(0x3c00 + i);  // 1.0 and up
  std::vector<float> score(size_t(n) * kv, 2.0f);
  {
    H5::H5File f(path, H5F_ACC_TRUNC);
    const auto put = [](H5::Group& g, const std::string& name, const H5::DataType& type, std::vector<hsize_t> dims,
                        const void* data, bool chunked, bool deflate) {
      H5::DSetCreatPropList props;
      if (chunked) {
        props.setChunk(static_cast<int>(dims.size()), dims.data());
        if (deflate) props.setShuffle(), props.setDeflate(1);
      }
      g.createDataSet(name, type, H5::DataSpace(static_cast<int>(dims.size()), dims.data()), props).write(data, type);
    };
    H5::Group root = f.openGroup("/");
    for (const char* name : {"tokens", "positions", "window"})
      put(root, name, H5::PredType::NATIVE_INT32, {hsize_t(n)}, ids.data(), true, true);
    const H5::FloatType half_type = [] {
      H5::FloatType t(H5::PredType::IEEE_F32LE);
      t.setFields(15, 10, 5, 0, 10);
      t.setSize(2);
      t.setEbias(15);
      return t;
    }();
    H5::Group layer = f.createGroup("layer_0");
    put(layer, "keys", half_type, {hsize_t(n), hsize_t(kv), hsize_t(d)}, half.data(), true, false);
    put(layer, "values", half_type, {hsize_t(n), hsize_t(kv), hsize_t(d)}, half.data(), false, false);
    for (const char* name : {"S_K", "S_V", "anchor_score"})
      put(layer, name, H5::PredType::NATIVE_FLOAT, {hsize_t(n), hsize_t(kv)}, score.data(), false, false);
    H5::Group meta = f.createGroup("meta");
    const auto str = [&](const char* name, const std::string& v) {
      H5::StrType t(H5::PredType::C_S1, std::max<size_t>(1, v.size()));
      meta.createAttribute(name, t, H5::DataSpace(H5S_SCALAR)).write(t, v.empty() ? std::string(1, '\0') : v);
    };
    const auto num = [&](const char* name, int64_t v) {
      meta.createAttribute(name, H5::PredType::STD_I64LE, H5::DataSpace(H5S_SCALAR)).write(H5::PredType::NATIVE_INT64, &v);
    };
    for (const auto& [k, v] : std::vector<std::pair<const char*, std::string>>{
             {"kind", "antkv-calibration"}, {"model", "m"}, {"config_hash", "old"}, {"recipe", ""}, {"key_rope", "pre"},
             {"anchor_score", "attention_mass"}, {"text", ""}, {"text_hash", ""}, {"version", "0.1"},
             {"created", "2026-01-01T00:00:00Z"}})
      str(k, v);
    for (const auto& [k, v] : std::vector<std::pair<const char*, int64_t>>{
             {"tokens", n}, {"seq_len", 20}, {"windows", 2}, {"seed", 1}, {"num_layers", 1}, {"num_kv_heads", kv},
             {"head_dim", d}})
      num(k, v);
  }
  CalibDumpReader r(path);
  CHECK(r.meta().config_hash == "old");
  CHECK(r.meta().key_rope == "pre");
  CHECK(r.meta().kv_compression == "shuffle+deflate-1");  // files before the attribute
  CHECK(r.tokens() == ids);
  std::vector<uint16_t> back(half.size());
  r.read_values_half(0, 0, n, back.data());
  CHECK(back == half);
  r.read_keys_half(0, 0, n, back.data());
  CHECK(back == half);
  std::vector<float> s(score.size());
  r.read_scores(0, "anchor_score", 0, n, s.data());
  CHECK(s == score);
  CHECK_FALSE(r.has_query_moment());
}

TEST_CASE("same calibration inputs, same dump bytes (the dump's hash names its codebooks)", "[io][shared]") {
  const std::string model = test::model_dir("stories260K");
  const Checkpoint ckpt = Checkpoint::open(model);
  const Tokenizer tok = Tokenizer::from_file(ckpt.tokenizer_path());
  const std::string dir = test::temp_dir();
  const std::string text = dir + "/calib.txt";
  std::ofstream(text) << read_file(test::shared_path("data/books-calib.txt")).substr(0, 6000);
  const Recipe recipe = Recipe::defaults_with({"model=" + model, "calibration.sample_per_window=16"});
  const auto plan = plan_calibration(tok.encode(read_text_file(text), true), 256, 64, 0);
  const auto calibrate = [&](const std::string& out) {
    CpuRuntime rt(ckpt, CpuRuntimeOptions{});
    CalibrationOptions co;
    co.recipe = &recipe;
    co.out_path = out;
    co.model_dir = model;
    co.text_path = text;
    co.version = "test";
    co.fingerprint = "fp";
    co.progress = false;
    run_calibration(rt, tok, plan, co);
  };
  calibrate(dir + "/a.h5");
  std::this_thread::sleep_for(std::chrono::milliseconds(1100));  // a time stamp in seconds would now differ
  calibrate(dir + "/b.h5");
  CHECK(CalibDumpReader(dir + "/a.h5").n_tokens() > 0);
  CHECK(hash_file(dir + "/a.h5") == hash_file(dir + "/b.h5"));
  CHECK(bytes_of(dir + "/a.h5") == bytes_of(dir + "/b.h5"));
  // codebook files likewise
  write_codebooks(dir + "/a-cb.h5", small_set());
  std::this_thread::sleep_for(std::chrono::milliseconds(1100));
  write_codebooks(dir + "/b-cb.h5", small_set());
  CHECK(bytes_of(dir + "/a-cb.h5") == bytes_of(dir + "/b-cb.h5"));
}

TEST_CASE("antkv-eval run: a recomputed dump keeps its codebooks, a damaged codebook file is recomputed", "[io][shared]") {
  const std::string dir = test::temp_dir();
  const auto text_head = [&](const std::string& name, const std::string& shared, size_t bytes) {
    const std::string p = dir + "/" + name;
    std::ofstream(p, std::ios::binary) << read_file(test::shared_path(shared)).substr(0, bytes);
    return p;
  };
  const std::string recipe = dir + "/r.yaml";
  std::ofstream(recipe) << "name: t\nmodel: " << test::model_dir("stories260K") << "\ncalibration:\n  text: "
                        << text_head("calib.txt", "data/books-calib.txt", 40000)
                        << "\n  tokens: 2048\n  seq_len: 128\n  device: cpu\nquant:\n  bits: 1\nkmeans:\n  iters: 2\n"
                        << "  device: cpu\neval:\n  texts: [" << text_head("valid.txt", "data/books-valid.txt", 8000)
                        << "]\n  seq_len: 128\n  max_windows: 1\n  device: cpu\n  methods: [fp16, vq:bits=1]\nout_dir: "
                        << dir << "/run\n";
  const auto run = [&] {
    const std::string err = dir + "/stderr.txt";
    const int st = std::system((std::string("OMP_NUM_THREADS=2 ") + ANTKV_EVAL_PATH + " run --recipe " + recipe +
                                " -q > /dev/null 2> " + err).c_str());
    const std::string msg = read_file(err);
    INFO(msg);
    REQUIRE(WIFEXITED(st));
    REQUIRE(WEXITSTATUS(st) == 0);
    return msg;
  };
  run();
  const std::string calib = dir + "/run/calib-post.h5";
  std::string books;
  for (const auto& e : fs::directory_iterator(dir + "/run/codebooks"))
    if (e.path().extension() == ".h5") books = e.path().string();
  REQUIRE(!books.empty());
  const std::string calib_bytes = bytes_of(calib), books_bytes = bytes_of(books);

  // the dump recomputed from the same inputs: the same bytes, so its codebooks are reused (before: retrained,
  // "calibration dump (content) differs")
  fs::remove(calib);
  std::string msg = run();
  CHECK_THAT(msg, Contains("computing " + calib + ": not made yet") && Contains("reusing " + books));
  CHECK(bytes_of(calib) == calib_bytes);
  CHECK(bytes_of(books) == books_bytes);

  // a codebook file whose /meta num_layers reads 0: recomputed, saying why (before: 0 layers read back)
  std::string b = books_bytes;
  b[attribute_value_offset(b, "num_layers")] = 0;
  write_bytes(books, b);
  msg = run();
  CHECK_THAT(msg, Contains("computing " + books + ": the existing file is unreadable (" + books + ": /meta") &&
                      Contains(kDamaged));
  CHECK(read_codebooks(books).meta.num_layers > 0);
}
