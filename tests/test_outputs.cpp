// Outputs you can trust: every command's outputs under faults and bad input. The fault tests run
// the real commands as child processes with a file-size limit (RLIMIT_FSIZE via `ulimit -f`, SIGXFSZ
// ignored, so writes past it fail with EFBIG; no root needed) on stories260K, and check: exit 1 (not a
// crash), a one-line error with the OS reason, no final file, no temporary left, the previous file intact.
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <thread>

#include "core/atomic_file.h"
#include "core/output_check.h"
#include "core/text_file.h"
#include "eval/compare.h"
#include "eval/fingerprint.h"
#include "io/calib_dump.h"
#include "io/codebooks.h"

#include <H5Cpp.h>
#include "test_support.h"

using namespace antkv;
namespace fs = std::filesystem;
using Catch::Matchers::Contains;

namespace {

struct CliResult {
  bool exited = false;  // false: killed by a signal (a crash)
  int code = -1;        // exit status, or the signal
  std::string err;      // stderr
  // lines saying "error:" (one expected; the run command also says what it computes or reuses)
  int error_lines() const {
    int n = 0;
    for (size_t at = err.find("error:"); at != std::string::npos; at = err.find("error:", at + 1)) ++n;
    return n;
  }
};

// Runs `command` through sh with stderr captured; fsize_kib > 0 limits the size of files it writes.
CliResult run_sh(const std::string& command, long fsize_kib = 0) {
  const std::string err = test::temp_dir() + "/stderr.txt";
  // one thread: these runs are tiny, and OpenMP threads on a busy 2-core machine are 10x slower
  std::string cmd = "{ export OMP_NUM_THREADS=1; ";
  if (fsize_kib > 0) cmd += "ulimit -f " + std::to_string(fsize_kib) + "; trap \"\" XFSZ; ";
  cmd += command + " ; } > /dev/null 2> " + err;
  const int st = std::system(cmd.c_str());
  CliResult r;
  r.exited = WIFEXITED(st);
  r.code = r.exited ? WEXITSTATUS(st) : WTERMSIG(st);
  r.err = read_file(err);
  return r;
}

std::string eval_bin() { return ANTKV_EVAL_PATH; }
std::string calibrate_bin() { return ANTKV_CALIBRATE_PATH; }
std::string train_bin() { return ANTKV_TRAIN_CODEBOOK_PATH; }

// No file in dir whose name holds ".tmp-" (no temporary left behind).
bool no_temporaries(const std::string& dir) {
  for (const auto& e : fs::recursive_directory_iterator(dir))
    if (e.path().filename().string().find(".tmp-") != std::string::npos) return false;
  return true;
}

// The first `bytes` of a shared text, as dir/name (tokenizing whole books would dominate the tests' time).
std::string text_head(const std::string& dir, const std::string& name, const std::string& shared, size_t bytes) {
  const std::string p = dir + "/" + name;
  std::ofstream(p, std::ios::binary) << read_file(test::shared_path(shared)).substr(0, bytes);
  return p;
}

// A small recipe on stories260K (a few seconds for the whole pipeline).
std::string small_recipe(const std::string& dir, const std::string& model, const std::string& extra = "") {
  const std::string p = dir + "/r.yaml";
  std::ofstream(p) << "name: t\nmodel: " << model << "\ncalibration:\n  text: "
                   << text_head(dir, "calib.txt", "data/books-calib.txt", 40000)
                   << "\n  tokens: 2048\n  seq_len: 128\n  device: cpu\nquant:\n  bits: 1\nkmeans:\n  iters: 2\n"
                   << "  device: cpu\neval:\n  texts: [" << text_head(dir, "valid.txt", "data/books-valid.txt", 8000)
                   << "]\n  seq_len: 128\n  max_windows: 1\n  device: cpu\n  methods: [fp16, vq:bits=1]\nout_dir: "
                   << dir << "/run\n"
                   << extra;
  return p;
}

// stories260K copied into dir/name with weight `index` of `tensor` (F32) multiplied by `factor` (NaN: set).
std::string patched_model(const std::string& dir, const std::string& name, const std::string& tensor, size_t index,
                          float factor) {
  const std::string src = test::model_dir("stories260K"), dst = dir + "/" + name;
  fs::create_directories(dst);
  for (const char* f : {"config.json", "tokenizer.json", "model.safetensors"}) fs::copy_file(src + "/" + f, dst + "/" + f);
  if (fs::exists(src + "/tokenizer_config.json")) fs::copy_file(src + "/tokenizer_config.json", dst + "/tokenizer_config.json");
  std::string bytes = read_file(dst + "/model.safetensors");
  uint64_t header = 0;
  std::memcpy(&header, bytes.data(), 8);
  const std::string h = bytes.substr(8, header);
  const size_t at = h.find("\"" + tensor + "\"");
  REQUIRE(at != std::string::npos);
  const size_t offs = h.find("data_offsets", at);
  const size_t begin = std::stoull(h.substr(h.find('[', offs) + 1));
  float v = 0;
  const size_t pos = 8 + header + begin + 4 * index;
  std::memcpy(&v, bytes.data() + pos, 4);
  v = std::isnan(factor) ? NAN : v * factor;
  std::memcpy(&bytes[pos], &v, 4);
  std::ofstream(dst + "/model.safetensors", std::ios::binary) << bytes;
  return dst;
}

}  // namespace

TEST_CASE("text input: invalid UTF-8, UTF-16 and binary are errors with the byte offset", "[outputs]") {
  CHECK(first_invalid_utf8("plain ascii") == std::string_view::npos);
  CHECK(first_invalid_utf8("caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80") == std::string_view::npos);
  CHECK(first_invalid_utf8("ab\xff") == 2);
  CHECK(first_invalid_utf8("ab\xc3") == 2);              // truncated sequence
  CHECK(first_invalid_utf8("\xc0\xaf") == 0);            // overlong
  CHECK(first_invalid_utf8("x\xed\xa0\x80") == 1);       // UTF-16 surrogate
  CHECK(first_invalid_utf8("x\xf4\x90\x80\x80") == 1);   // > U+10FFFF
  CHECK(first_invalid_utf8(std::string_view("a\0b", 3)) == 1);
  const std::string dir = test::temp_dir();
  std::ofstream(dir + "/bad.txt", std::ios::binary) << "hello \xff world";
  std::ofstream(dir + "/u16.txt", std::ios::binary) << std::string("\xff\xfeh\0i\0", 6);
  std::ofstream(dir + "/bin.txt", std::ios::binary) << std::string("ELF\0\1\2", 6);
  CHECK_THROWS_WITH(read_text_file(dir + "/bad.txt"), Contains("bad.txt: not UTF-8 text") && Contains("byte offset 6"));
  CHECK_THROWS_WITH(read_text_file(dir + "/u16.txt"), Contains("UTF-16 byte-order mark"));
  CHECK_THROWS_WITH(read_text_file(dir + "/bin.txt"), Contains("NUL byte at byte offset 3"));
}

TEST_CASE("fingerprints: equal inputs reuse, any differing field is named", "[outputs]") {
  const std::string a = make_fingerprint({{"model", "abc"}, {"calibration.tokens", "4096"}, {"seed", "0"}});
  const std::string b = make_fingerprint({{"model", "abd"}, {"calibration.tokens", "4096"}, {"seed", "1"}});
  CHECK(fingerprint_difference(a, a).empty());
  CHECK_THAT(fingerprint_difference(a, b), Contains("model differs (abc in the file, abd now)") &&
                                               Contains("seed differs (0 in the file, 1 now)"));
  CHECK_THAT(fingerprint_difference("0123abcd", a), Contains("older"));
  CHECK_THAT(fingerprint_difference("", a), Contains("records no fingerprint"));
  const std::string dir = test::temp_dir();
  auto read = [&](const std::string& p) { return read_file(p); };
  CHECK_THAT(decide_reuse(dir + "/none", a, false, read).message, Contains("not made yet"));
  std::ofstream(dir + "/f") << a;
  CHECK(decide_reuse(dir + "/f", a, false, read).reuse);
  CHECK_FALSE(decide_reuse(dir + "/f", a, true, read).reuse);
  const auto d = decide_reuse(dir + "/f", b, false, read);
  CHECK_FALSE(d.reuse);
  CHECK_THAT(d.message, Contains("model differs"));
  CHECK_THAT(decide_reuse(dir + "/f", a, false, [](const std::string&) -> std::string { antkv::fail("broken"); }).message,
             Contains("unreadable (broken)"));
}

TEST_CASE("output checks: input == output, two equal outputs, existing side files, unwritable folders", "[outputs]") {
  const std::string dir = test::temp_dir();
  std::ofstream(dir + "/in.h5") << "input";
  fs::create_symlink(dir + "/in.h5", dir + "/link.h5");
  fs::create_hard_link(dir + "/in.h5", dir + "/hard.h5");
  auto check = [&](const std::string& out, const std::string& side, bool force) {
    OutputCheck c;
    c.input(dir + "/in.h5", "--calib");
    c.output(out, "--out", force);
    c.output(side, "--report", force);
    c.check();
  };
  CHECK_THROWS_WITH(check(dir + "/in.h5", dir + "/r.json", true), Contains("is also an input (--calib)"));
  CHECK_THROWS_WITH(check(dir + "/o.h5", dir + "/link.h5", true), Contains("(--report) is also an input (--calib)"));
  CHECK_THROWS_WITH(check(dir + "/./hard.h5", dir + "/r.json", true), Contains("is also an input"));
  CHECK_THROWS_WITH(check(dir + "/o.h5", dir + "/../" + fs::path(dir).filename().string() + "/o.h5", true),
                    Contains("two outputs of this run (--out and --report) are the same file"));
  std::ofstream(dir + "/r.json") << "old";
  CHECK_THROWS_WITH(check(dir + "/o.h5", dir + "/r.json", false), Contains("r.json: already exists (use --force"));
  CHECK_NOTHROW(check(dir + "/o.h5", dir + "/r.json", true));
  CHECK_THROWS_WITH(check(dir + "/no/such/o.h5", dir + "/r.json", true), Contains("does not exist"));
  CHECK_THROWS_WITH(check(dir + "/o.h5", "/proc/r.json", true), Contains("/proc: cannot write in this folder"));
  CHECK(no_temporaries(dir));
}

TEST_CASE("temporaries of killed runs are removed, those of live processes left alone", "[outputs]") {
  const std::string dir = test::temp_dir();
  const pid_t child = fork();
  if (child == 0) _exit(0);
  waitpid(child, nullptr, 0);  // a pid that no longer runs
  const std::string dead = dir + "/x.h5.tmp-" + std::to_string(child) + "-0badc0de";
  const std::string live = dir + "/x.h5.tmp-" + std::to_string(getppid()) + "-0badc0de";
  std::ofstream(dead) << "half";
  std::ofstream(live) << "half";
  std::ofstream(dir + "/x.h5.tmp-notapid") << "not ours";
  const auto notes = remove_stale_temporaries(dir + "/x.h5");
  REQUIRE(notes.size() == 2);
  CHECK_FALSE(fs::exists(dead));
  CHECK(fs::exists(live));
  CHECK(fs::exists(dir + "/x.h5.tmp-notapid"));
  std::string all = notes[0] + "\n" + notes[1];
  CHECK_THAT(all, Contains("removed " + dead) && Contains("running process"));
}

namespace {
// Runs f in a child process whose files may not grow past limit_bytes (SIGXFSZ ignored: writes fail with
// EFBIG); returns the child's error message, or "" when f did not throw. The child ends with exit(), so
// HDF5's teardown at exit runs as in a real command: a crash there fails the test.
std::string in_limited_child(size_t limit_bytes, const std::function<void()>& f, int* status) {
  int fds[2];
  REQUIRE(pipe(fds) == 0);
  const pid_t pid = fork();
  if (pid == 0) {
    close(fds[0]);
    signal(SIGXFSZ, SIG_IGN);
    rlimit rl{limit_bytes, limit_bytes};
    setrlimit(RLIMIT_FSIZE, &rl);
    std::string msg;
    try {
      f();
    } catch (const std::exception& e) {
      msg = e.what();
    }
    if (!msg.empty() && write(fds[1], msg.data(), msg.size()) < 0) std::exit(3);
    close(fds[1]);
    std::exit(7);
  }
  close(fds[1]);
  std::string msg;
  char buf[512];
  for (ssize_t n; (n = read(fds[0], buf, sizeof(buf))) > 0;) msg.append(buf, static_cast<size_t>(n));
  close(fds[0]);
  waitpid(pid, status, 0);
  return msg;
}
}  // namespace

TEST_CASE("HDF5 writers past a file-size limit: one error line with the OS reason, no crash at exit", "[outputs]") {
  // Before: H5Dclose/H5Fclose failures printed by destructors, then a SIGSEGV in HDF5's teardown at exit.
  CodebookSet s;
  s.meta.key_c = s.meta.value_c = 2;
  s.meta.key_b = s.meta.value_b = 4;
  s.meta.num_layers = 2;
  s.meta.num_kv_heads = 2;
  s.meta.head_dim = 64;
  s.meta.key_rope = "post";  // the reader accepts known values only
  s.meta.weighting = "anchor";
  for (auto* v : {&s.keys, &s.values}) {
    v->resize(2);
    for (auto& l : *v) {
      l.centroids.resize(2 * 32 * 16 * 2);
      for (size_t i = 0; i < l.centroids.size(); ++i) l.centroids[i] = std::sin(0.37f * i);  // incompressible
      l.objective.assign(64, 1.0);
      l.iterations.assign(64, 3);
      l.reseeded.assign(64, 0);
      l.error_norm.assign(2, 0.1f);
    }
  }
  const std::string dir = test::temp_dir();
  int st = 0;
  std::string msg = in_limited_child(8192, [&] { write_codebooks(dir + "/cb.h5", s); }, &st);
  CHECK(WIFEXITED(st));
  CHECK(WEXITSTATUS(st) == 7);
  CHECK_THAT(msg, Contains(dir + "/cb.h5: cannot write: File too large (writing"));
  msg = in_limited_child(64 << 10, [&] {
    CalibDumpWriter w(dir + "/c.h5", 2, 2, 64);
    std::vector<int32_t> ids(600, 1);
    std::vector<float> kv(600 * 2 * 64), sc(600 * 2, 1.0f);
    for (size_t i = 0; i < kv.size(); ++i) kv[i] = std::sin(0.37f * i);
    for (int i = 0; i < 20; ++i) {
      w.append_tokens(600, ids.data(), ids.data(), ids.data());
      for (int l = 0; l < 2; ++l) w.append_layer(l, 600, kv.data(), kv.data(), sc.data(), sc.data(), sc.data());
    }
    w.finish(CalibMeta{});
  }, &st);
  CHECK(WIFEXITED(st));
  CHECK(WEXITSTATUS(st) == 7);
  CHECK_THAT(msg, Contains(dir + "/c.h5: cannot write: File too large"));
  // without a limit, the same file round-trips
  write_codebooks(dir + "/cb.h5", s);
  CHECK(read_codebooks(dir + "/cb.h5").meta.head_dim == 64);
  CHECK(read_codebooks(dir + "/cb.h5").keys[1].centroids == s.keys[1].centroids);
  // a missing dataset is named, and HDF5 prints nothing itself
  {
    H5::H5File f(dir + "/cb.h5", H5F_ACC_RDWR);
    f.unlink("layer_1/value_objective");
  }
  CHECK_THROWS_WITH(read_codebooks(dir + "/cb.h5"),
                    dir + "/cb.h5: /layer_1/value_objective: damaged or not an antkv file (missing)");
}

TEST_CASE("CLI fault: file-size limit on every command's outputs - exit 1, one line, old file intact",
          "[outputs][cli][shared]") {
  const std::string dir = test::temp_dir();
  const std::string recipe = small_recipe(dir, test::model_dir("stories260K"));
  const std::string calib = dir + "/c.h5", cb = dir + "/cb.h5", json = dir + "/p.json";
  REQUIRE(run_sh(calibrate_bin() + " --recipe " + recipe + " --out " + calib + " -q").code == 0);
  REQUIRE(run_sh(train_bin() + " --recipe " + recipe + " --calib " + calib + " --out " + cb + " -q").code == 0);
  const std::string ppl = eval_bin() + " ppl --model " + test::model_dir("stories260K") + " --text " +
                          dir + "/valid.txt --seq-len 128 --max-windows 20 -q --json " + json;
  REQUIRE(run_sh(ppl).code == 0);
  const std::string calib_before = read_file(calib), cb_before = read_file(cb), json_before = read_file(json);

  struct Case {
    std::string name, command, final_path;
    long limit_kib;
  };
  const std::vector<Case> cases = {
      {"calibrate, new", calibrate_bin() + " --recipe " + recipe + " --out " + dir + "/new.h5 -q", dir + "/new.h5", 100},
      {"calibrate --force", calibrate_bin() + " --recipe " + recipe + " --out " + calib + " --force -q", "", 100},
      {"train-codebook, new", train_bin() + " --recipe " + recipe + " --calib " + calib + " --out " + dir + "/new-cb.h5 -q",
       dir + "/new-cb.h5", 20},
      {"train-codebook --force", train_bin() + " --recipe " + recipe + " --calib " + calib + " --out " + cb + " --force -q",
       "", 20},
      {"ppl --json --force", ppl + " --force", "", 1},
      {"run", eval_bin() + " run --recipe " + recipe + " -q", dir + "/run/calib-post.h5", 100},
  };
  for (const auto& c : cases) {
    INFO(c.name);
    const CliResult r = run_sh(c.command, c.limit_kib);
    INFO(r.err);
    CHECK(r.exited);
    CHECK(r.code == 1);
    CHECK(r.error_lines() == 1);
    CHECK_THAT(r.err, !Contains("H5"));  // nothing printed by HDF5 or its destructors
    CHECK_THAT(r.err, Contains("cannot write: File too large"));
    if (!c.final_path.empty()) CHECK_FALSE(fs::exists(c.final_path));
    CHECK(no_temporaries(dir));
  }
  CHECK(read_file(calib) == calib_before);
  CHECK(read_file(cb) == cb_before);
  CHECK(read_file(json) == json_before);
  CHECK_FALSE(fs::exists(dir + "/run/results.json"));
  CHECK_FALSE(fs::exists(dir + "/new.h5.summary.json"));
}

TEST_CASE("CLI: side outputs follow --force, and never overwrite an input or another output", "[outputs][cli][shared]") {
  const std::string dir = test::temp_dir();
  const std::string recipe = small_recipe(dir, test::model_dir("stories260K"));
  const std::string calib = dir + "/c.h5";
  REQUIRE(run_sh(calibrate_bin() + " --recipe " + recipe + " --out " + calib + " -q").code == 0);
  const std::string before = read_file(calib);
  CliResult r = run_sh(train_bin() + " --recipe " + recipe + " --calib " + calib + " --out " + dir + "/cb.h5 --report " + calib + " -q");
  CHECK(r.code == 1);
  CHECK_THAT(r.err, Contains("c.h5: the output (--report) is also an input (--calib)"));
  r = run_sh(train_bin() + " --recipe " + recipe + " --calib " + calib + " --out " + calib + " --force -q");
  CHECK(r.code == 1);
  CHECK_THAT(r.err, Contains("the output (--out) is also an input (--calib)"));
  fs::create_symlink(calib, dir + "/alias.h5");
  r = run_sh(train_bin() + " --recipe " + recipe + " --calib " + dir + "/alias.h5 --out " + calib + " --force -q");
  CHECK(r.code == 1);
  CHECK(read_file(calib) == before);
  std::ofstream(dir + "/s.json") << "keep";
  r = run_sh(calibrate_bin() + " --recipe " + recipe + " --out " + dir + "/c2.h5 --summary " + dir + "/s.json -q");
  CHECK(r.code == 1);
  CHECK_THAT(r.err, Contains("s.json: already exists (use --force to overwrite) (--summary)"));
  CHECK(read_file(dir + "/s.json") == "keep");
  CHECK_FALSE(fs::exists(dir + "/c2.h5"));
  r = run_sh(eval_bin() + " ppl --model " + test::model_dir("stories260K") + " --text " + dir + "/valid.txt --json " +
             dir + "/s.json -q");
  CHECK(r.code == 1);
  CHECK_THAT(r.err, Contains("already exists"));
  // the output folder is checked before the work, not after
  r = run_sh(train_bin() + " --recipe " + recipe + " --calib " + calib + " --out /proc/cb.h5 -q");
  CHECK(r.code == 1);
  CHECK_THAT(r.err, Contains("cannot write in this folder"));
}

TEST_CASE("CLI run: reuse only on a full match - other weights, text or recipe field recompute, saying why",
          "[outputs][cli][shared]") {
  const std::string dir = test::temp_dir();
  const std::string recipe = small_recipe(dir, test::model_dir("stories260K"));
  const std::string run = eval_bin() + " run --recipe " + recipe + " -q";
  CliResult r = run_sh(run);
  INFO(r.err);
  REQUIRE(r.code == 0);
  CHECK_THAT(r.err, Contains("calib-post.h5: not made yet"));
  r = run_sh(run);
  CHECK(r.code == 0);
  CHECK_THAT(r.err, Contains("reusing " + dir + "/run/calib-post.h5") && Contains("reusing " + dir + "/run/codebooks/"));
  // the same architecture and config, one weight different
  const std::string other = patched_model(dir, "other", "model.layers.1.self_attn.k_proj.weight", 3, 1.5f);
  r = run_sh(run + " --set model=" + other);
  CHECK(r.code == 0);
  CHECK_THAT(r.err, Contains("computing " + dir + "/run/calib-post.h5") &&
                        Contains("model content (XXH3-128 of config, every safetensors byte, tokenizer.json) differs"));
  CHECK_THAT(r.err, Contains("calibration dump (content) differs"));
  // another calibration text (same path, other content)
  std::ofstream(dir + "/calib.txt", std::ios::app) << "one more line of text.\n";
  r = run_sh(run);
  CHECK(r.code == 0);
  CHECK_THAT(r.err, Contains("calibration.text (content) differs"));
  r = run_sh(run + " --set kmeans.seed=5");
  CHECK(r.code == 0);
  CHECK_THAT(r.err, Contains("reusing " + dir + "/run/calib-post.h5") && Contains("kmeans.seed differs (0 in the file, 5 now)"));
}

// metric=task needs the dump's query moments and o_proj Grams: a dump made before them (the same fingerprint) is
// recalibrated by `run`, and refused with a clear error by antkv-train-codebook.
TEST_CASE("CLI run: metric=task recalibrates a dump without the metric statistics", "[outputs][cli][shared]") {
  const std::string dir = test::temp_dir();
  const std::string recipe = small_recipe(dir, test::model_dir("stories260K"));
  const std::string run = eval_bin() + " run --recipe " + recipe + " -q";
  CliResult r = run_sh(run);
  INFO(r.err);
  REQUIRE(r.code == 0);
  const std::string calib = dir + "/run/calib-post.h5";
  {  // the dump rewritten as an older version wrote it: everything but /query_moment and /oproj_gram
    CalibDumpReader in(calib);
    REQUIRE(in.has_query_moment());
    REQUIRE(in.has_oproj_gram());
    const CalibMeta m = in.meta();
    const int64_t N = in.n_tokens(), row = m.num_kv_heads * m.head_dim;
    const std::string old = dir + "/old.h5";
    CalibDumpWriter w(old, static_cast<int>(m.num_layers), static_cast<int>(m.num_kv_heads), static_cast<int>(m.head_dim));
    const auto toks = in.tokens(), pos = in.positions(), win = in.windows();
    w.append_tokens(static_cast<int>(N), toks.data(), pos.data(), win.data());
    for (int l = 0; l < m.num_layers; ++l) {
      std::vector<uint16_t> k(N * row), v(N * row);
      std::vector<float> sk(N * m.num_kv_heads), sv(sk.size()), an(sk.size());
      in.read_keys_half(l, 0, N, k.data());
      in.read_values_half(l, 0, N, v.data());
      in.read_scores(l, "S_K", 0, N, sk.data());
      in.read_scores(l, "S_V", 0, N, sv.data());
      in.read_scores(l, "anchor_score", 0, N, an.data());
      w.append_layer_f16(l, static_cast<int>(N), k.data(), v.data(), sk.data(), sv.data(), an.data());
    }
    w.finish(m);
    fs::rename(old, calib);
  }
  CHECK_FALSE(CalibDumpReader(calib).has_query_moment());
  r = run_sh(train_bin() + " --recipe " + recipe + " --calib " + calib + " --out " + dir + "/cb.h5 --set kmeans.metric=task -q");
  CHECK(r.code == 1);
  CHECK_THAT(r.err, Contains("no /layer_{l}/query_moment") && Contains("recalibrate"));
  CHECK_FALSE(fs::exists(dir + "/cb.h5"));
  r = run_sh(run);  // plain methods: the old dump is still good
  CHECK(r.code == 0);
  CHECK_THAT(r.err, Contains("reusing " + calib));
  r = run_sh(run + " --set 'eval.methods=[fp16,\"vq:bits=1,metric=task\"]'");
  CHECK(r.code == 0);
  CHECK_THAT(r.err, Contains("computing " + calib) && Contains("no metric=task statistics"));
  CHECK(CalibDumpReader(calib).has_query_moment());
  CHECK(fs::exists(dir + "/run/codebooks/k-c8b8_v-c8b8_none_all_post_mtask.h5"));
}

TEST_CASE("CLI: NaN weights stop calibration and ppl naming layer, tensor and window", "[outputs][cli][shared]") {
  const std::string dir = test::temp_dir();
  const std::string model = patched_model(dir, "nan", "model.layers.2.self_attn.k_proj.weight", 5, NAN);
  const std::string recipe = small_recipe(dir, model);
  CliResult r = run_sh(calibrate_bin() + " --recipe " + recipe + " --out " + dir + "/c.h5 -q");
  CHECK(r.code == 1);
  CHECK_THAT(r.err, Contains("calibration window 0: layer 2 keys are not finite") &&
                        Contains("tensor \"model.layers.2.self_attn.k_proj.weight\"") && Contains("element 5 = nan"));
  CHECK_FALSE(fs::exists(dir + "/c.h5"));
  r = run_sh(eval_bin() + " ppl --model " + model + " --text " + dir + "/valid.txt --seq-len 128 --max-windows 2 -q");
  CHECK(r.code == 1);
  CHECK_THAT(r.err, Contains("window 0: the NLL is not finite") && Contains("model.layers.2.self_attn.k_proj.weight"));
  CHECK(no_temporaries(dir));
}

TEST_CASE("CLI: zero windows is an error, dPPL without fp16 is n/a, invalid UTF-8 text is an error",
          "[outputs][cli][shared]") {
  const std::string dir = test::temp_dir();
  const std::string model = test::model_dir("stories260K");
  const std::string recipe = small_recipe(dir, model);
  CliResult r = run_sh(eval_bin() + " ppl --model " + model + " --text " + dir + "/valid.txt --max-windows 0 -q");
  CHECK(r.code == 1);
  CHECK_THAT(r.err, Contains("--max-windows = 0 is out of range: give 1..4294967296, or -1 for every window"));
  for (const char* cmd : {" ppl", " diagnose", " run"}) {  // the recipe is refused before any stage runs
    r = run_sh(eval_bin() + cmd + " --recipe " + recipe + " --set eval.max_windows=0 -q");
    CHECK(r.code == 1);
    CHECK_THAT(r.err, Contains("key \"eval.max_windows\" = 0 is out of range: give 1..4294967296, or -1"));
  }
  CHECK_FALSE(fs::exists(dir + "/run"));
  std::ofstream(dir + "/bad.txt", std::ios::binary) << "The text \xc3\x28 goes on.";
  r = run_sh(eval_bin() + " ppl --model " + model + " --text " + dir + "/bad.txt --seq-len 4 -q");
  CHECK(r.code == 1);
  CHECK_THAT(r.err, Contains("bad.txt: not UTF-8 text: invalid byte 0xc3 at byte offset 9"));

  MethodResult a;
  a.method = parse_method("uniform:bits=4,group=128", Recipe::defaults_with({}));
  a.text = "t.txt";
  a.ppl.ppl = 12.5;
  a.delta_ppl = NAN;
  const std::string table = results_table({a});
  CHECK_THAT(table, Contains("n/a"));
  CHECK_THAT(table, !Contains("nan"));
  CHECK_THAT(results_csv({a}), !Contains("nan"));
}

TEST_CASE("CLI: SIGTERM and SIGHUP leave no final file - a killed run's temporary is removed by the next run",
          "[outputs][cli][shared]") {
  const std::string dir = test::temp_dir();
  const std::string recipe = small_recipe(dir, test::model_dir("stories260K"), "");
  // a longer text, so that the run is still going when the signal comes
  const std::string text = "calibration.text=" + text_head(dir, "long.txt", "data/books-calib.txt", 1000000);
  const std::string out = dir + "/c.h5";
  for (int sig : {SIGTERM, SIGHUP, SIGKILL}) {
    INFO("signal " << sig);
    const pid_t pid = fork();
    if (pid == 0) {
      const std::string tokens = "calibration.tokens=400000";
      setenv("OMP_NUM_THREADS", "1", 1);
      if (!freopen((dir + "/child-stderr.txt").c_str(), "w", stderr)) _exit(126);
      execl(calibrate_bin().c_str(), calibrate_bin().c_str(), "--recipe", recipe.c_str(), "--out", out.c_str(), "--set",
            tokens.c_str(), "--set", text.c_str(), "-q", static_cast<char*>(nullptr));
      _exit(127);
    }
    bool started = false;  // wait until the temporary exists
    for (int i = 0; i < 1000 && !started; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      for (const auto& e : fs::directory_iterator(dir)) started |= e.path().filename().string().rfind("c.h5.tmp-", 0) == 0;
    }
    REQUIRE(started);
    kill(pid, sig);
    int st = 0;
    waitpid(pid, &st, 0);
    CHECK_FALSE(fs::exists(out));
    if (sig != SIGKILL) {  // handled like Ctrl-C
      CHECK_THAT(read_file(dir + "/child-stderr.txt"), Contains("interrupted; no output written"));
      CHECK(WIFEXITED(st));
      CHECK(WEXITSTATUS(st) == 128 + sig);
      CHECK(no_temporaries(dir));
    } else {
      CHECK_FALSE(no_temporaries(dir));  // SIGKILL cannot be handled: the next run cleans up
      const CliResult r = run_sh(calibrate_bin() + " --recipe " + recipe + " --out " + out + " --set calibration.tokens=200 -q");
      CHECK(r.code == 0);
      CHECK_THAT(r.err, Contains("the temporary output of an interrupted run (process " + std::to_string(pid) + ")"));
      CHECK(no_temporaries(dir));
      CHECK(fs::exists(out));
    }
  }
}
