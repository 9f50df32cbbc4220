// The command line and run folders: run folders owned by one run at a time (a lock),
// bounds of every count a user gives (one table, core/limits.h), checkpoints whose config.json does not
// describe every tensor, provenance of dumps and codebooks in every command that reads them, and one-line
// errors that name the file. The commands run as child processes on stories260K (or a synthetic checkpoint).
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "core/atomic_file.h"
#include "core/limits.h"
#include "core/run_lock.h"
#include "core/text_file.h"
#include "model/checkpoint.h"
#include "model/model_config.h"
#include "recipe/recipe.h"
#include "synthetic_checkpoint.h"
#include "test_support.h"

using namespace antkv;
namespace fs = std::filesystem;
using Catch::Matchers::Contains;

namespace {

struct Cli {
  int code = -1;  // exit status (a signal: 128 + signal)
  std::string err;
  int lines() const {
    int n = 0;
    for (char c : err) n += c == '\n';
    return n;
  }
  int error_lines() const {  // commands may say which device they use before the error
    int n = 0;
    for (size_t at = err.find("error:"); at != std::string::npos; at = err.find("error:", at + 1)) ++n;
    return n;
  }
};

Cli run_cli(const std::string& command) {
  const std::string err = test::temp_dir() + "/stderr.txt";
  const int st = std::system(("{ export OMP_NUM_THREADS=1; " + command + " ; } > /dev/null 2> " + err).c_str());
  Cli r;
  r.code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  r.err = read_file(err);
  return r;
}

const std::string kEval = ANTKV_EVAL_PATH, kCalibrate = ANTKV_CALIBRATE_PATH, kTrain = ANTKV_TRAIN_CODEBOOK_PATH;

std::string head_of(const std::string& dir, const std::string& name, const std::string& shared, size_t bytes) {
  const std::string p = dir + "/" + name;
  std::ofstream(p, std::ios::binary) << read_file(test::shared_path(shared)).substr(0, bytes);
  return p;
}

// A small recipe on stories260K (the whole pipeline in a few seconds); `model_line` replaces "model: <dir>".
std::string small_recipe(const std::string& dir, const std::string& model_line) {
  const std::string p = dir + "/r.yaml";
  std::ofstream(p) << "name: t\n" << model_line << "\ncalibration:\n  text: "
                   << head_of(dir, "calib.txt", "data/books-calib.txt", 40000)
                   << "\n  tokens: 2048\n  seq_len: 128\n  device: cpu\nquant:\n  bits: 1\nkmeans:\n  iters: 2\n"
                   << "  device: cpu\neval:\n  texts: [" << head_of(dir, "valid.txt", "data/books-valid.txt", 8000)
                   << "]\n  seq_len: 128\n  max_windows: 1\n  device: cpu\n  methods: [fp16, vq:bits=1]\n";
  return p;
}

std::string stories() { return test::model_dir("stories260K"); }

// stories260K copied into dir/name with one weight changed in its last byte (a different checkpoint)
std::string other_weights(const std::string& dir) {
  const std::string dst = dir + "/other";
  fs::create_directories(dst);
  for (const auto& e : fs::directory_iterator(stories()))
    if (e.is_regular_file()) fs::copy_file(e.path(), dst + "/" + e.path().filename().string());
  std::string bytes = read_file(dst + "/model.safetensors");
  bytes[bytes.size() - 4] ^= 1;  // the lowest mantissa bit of the last F32 weight
  std::ofstream(dst + "/model.safetensors", std::ios::binary) << bytes;
  return dst;
}

pid_t dead_pid() {
  const pid_t child = fork();
  if (child == 0) _exit(0);
  waitpid(child, nullptr, 0);
  return child;
}

}  // namespace

TEST_CASE("run folder lock: held by one run, named in the error, stale locks taken over, removed at the end",
          "[cli_limits]") {
  const std::string dir = test::temp_dir() + "/run";
  {
    RunFolderLock held(dir);
    CHECK(fs::exists(dir + "/antkv-run.lock"));
    CHECK_THAT(read_file(dir + "/antkv-run.lock"), Contains(std::to_string(getpid()) + " "));
    CHECK_THROWS_WITH(RunFolderLock(dir), Contains(dir + ": the run folder is in use by process " +
                                                   std::to_string(getpid())) && Contains("antkv-run.lock"));
  }
  CHECK_FALSE(fs::exists(dir + "/antkv-run.lock"));  // removed by its owner
  std::ofstream(dir + "/antkv-run.lock") << dead_pid() << " somehost\n";  // left by a killed run
  { RunFolderLock taken(dir); }
  CHECK_FALSE(fs::exists(dir + "/antkv-run.lock"));
}

TEST_CASE("CLI: a second run into a locked folder fails naming the pid, a stale lock is taken over",
          "[cli_limits][cli][shared]") {
  const std::string dir = test::temp_dir();
  const std::string recipe = small_recipe(dir, "model: " + stories());
  const std::string out = dir + "/run";
  {
    RunFolderLock held(out);  // as another antkv-eval run would hold it
    for (const char* cmd : {" run", " ppl"}) {
      const Cli r = run_cli(kEval + cmd + " --recipe " + recipe + " --out " + out + " -q");
      CHECK(r.code == 1);
      CHECK(r.lines() == 1);
      CHECK_THAT(r.err, Contains("the run folder is in use by process " + std::to_string(getpid())) &&
                            Contains(out + "/antkv-run.lock"));
    }
    CHECK_FALSE(fs::exists(out + "/results.json"));
  }
  const pid_t gone = dead_pid();
  std::ofstream(out + "/antkv-run.lock") << gone << " somehost\n";
  const Cli r = run_cli(kEval + " ppl --recipe " + recipe + " --out " + out + " --set eval.methods=[fp16] -q");
  INFO(r.err);
  CHECK(r.code == 0);
  CHECK_THAT(r.err, Contains("taking over the stale lock of process " + std::to_string(gone) + " on somehost"));
  CHECK(fs::exists(out + "/results.json"));
  CHECK_FALSE(fs::exists(out + "/antkv-run.lock"));
}

TEST_CASE("CLI: SIGTERM during a run removes its lock", "[cli_limits][cli][shared]") {
  const std::string dir = test::temp_dir();
  const std::string recipe = small_recipe(dir, "model: " + stories());
  const std::string out = dir + "/run", lock = out + "/antkv-run.lock";
  const pid_t child = fork();
  if (child == 0) {
    setenv("OMP_NUM_THREADS", "1", 1);
    const std::string cmd = "exec " + kEval + " run --recipe " + recipe + " --out " + out + " -q 2> " + dir + "/err.txt";
    execl("/bin/sh", "sh", "-c", cmd.c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  for (int i = 0; i < 600 && !fs::exists(lock); ++i) usleep(50000);  // the run owns the folder
  REQUIRE(fs::exists(lock));
  CHECK_THAT(read_file(lock), Contains(std::to_string(child) + " "));
  kill(child, SIGTERM);
  int st = 0;
  waitpid(child, &st, 0);
  INFO(read_file(dir + "/err.txt"));
  REQUIRE(WIFEXITED(st));
  CHECK(WEXITSTATUS(st) == 128 + SIGTERM);
  CHECK_FALSE(fs::exists(lock));
}

TEST_CASE("counts: one bound per kind of count, for the command line and the recipe alike", "[cli_limits]") {
  CHECK_NOTHROW(check_count(0, limits::kThreads, "--threads"));
  CHECK_NOTHROW(check_count(1024, limits::kThreads, "--threads"));
  CHECK_THROWS_WITH(check_count(1025, limits::kThreads, "--threads"),
                    "--threads = 1025 is out of range: give 1..1024, or 0 for all cores");
  CHECK_THROWS_WITH(check_count(-1, limits::kThreads, "--threads"), Contains("--threads = -1 is out of range"));
  CHECK_NOTHROW(check_count(-1, limits::kWindows, "--max-windows"));
  CHECK_THROWS_WITH(check_count(-5, limits::kWindows, "--max-windows"),
                    "--max-windows = -5 is out of range: give 1..4294967296, or -1 for every window");
  CHECK_THROWS_WITH(Recipe::defaults_with({"eval.max_windows=-5"}),
                    "recipe: key \"eval.max_windows\" = -5 is out of range: give 1..4294967296, or -1 for every window");
  CHECK_THROWS_WITH(Recipe::defaults_with({"calibration.tokens=0"}),
                    Contains("key \"calibration.tokens\" = 0 is out of range: give 1..1099511627776"));
  CHECK_THROWS_WITH(Recipe::defaults_with({"eval.seq_len=1"}), Contains("key \"eval.seq_len\" = 1 is out of range"));
}

TEST_CASE("CLI: out-of-range counts are one-line errors before any work", "[cli_limits][cli][shared]") {
  const std::string dir = test::temp_dir();
  const std::string recipe = small_recipe(dir, "model: " + stories());
  const std::string ppl = kEval + " ppl --model " + stories() + " --text " + dir + "/valid.txt --seq-len 128 -q";
  struct Case {
    std::string cmd, message;
  };
  const std::vector<Case> cases = {
      {ppl + " --threads 100000", "--threads = 100000 is out of range: give 1..1024, or 0 for all cores"},
      {ppl + " --threads 20000", "--threads = 20000 is out of range"},
      {ppl + " --threads -3", "--threads = -3 is out of range"},
      {ppl + " --max-windows -5", "--max-windows = -5 is out of range: give 1..4294967296, or -1 for every window"},
      {kEval + " ppl --model " + stories() + " --text " + dir + "/valid.txt --seq-len 1 -q",
       "--seq-len = 1 is out of range: give 2..16777216"},
      {kCalibrate + " --recipe " + recipe + " --out " + dir + "/c.h5 --threads 100000 -q", "--threads = 100000"},
      {kCalibrate + " --recipe " + recipe + " --out " + dir + "/c.h5 --max-tokens 0 -q",
       "--max-tokens = 0 is out of range: give 1..1099511627776"},
      {kCalibrate + " --recipe " + recipe + " --out " + dir + "/c.h5 --max-tokens -7 -q", "--max-tokens = -7"},
      {kEval + " run --recipe " + recipe + " --out " + dir + "/run --threads 100000 -q", "--threads = 100000"},
      {kEval + " diagnose --recipe " + recipe + " --threads -2 -q", "--threads = -2"},
      {kEval + " run --recipe " + recipe + " --out " + dir + "/run --set eval.max_windows=-5 -q",
       "key \"eval.max_windows\" = -5 is out of range"},
  };
  for (const auto& c : cases) {
    INFO(c.cmd);
    const Cli r = run_cli(c.cmd);
    INFO(r.err);
    CHECK(r.code == 1);
    CHECK(r.lines() == 1);
    CHECK_THAT(r.err, Contains(c.message));
  }
  CHECK_FALSE(fs::exists(dir + "/c.h5"));
  CHECK_FALSE(fs::exists(dir + "/run"));
}

TEST_CASE("checkpoint: every tensor used, every expected tensor present with its shape, config values checked",
          "[cli_limits][model]") {
  const std::string dir = test::temp_dir();
  test::SyntheticCheckpoint sc;
  sc.layers = 3;
  sc.config_extra = R"({"num_hidden_layers": 2})";  // fewer layers than the weights hold
  const std::string fewer = test::write_synthetic_checkpoint(dir + "/fewer", sc);
  CHECK_THROWS_WITH(Checkpoint::open(fewer), Contains(fewer + ": tensor \"model.layers.2.") &&
                                                 Contains("is not used by the model config.json describes "
                                                          "(num_hidden_layers 2"));
  sc.config_extra = R"({"num_hidden_layers": 4})";  // more
  const std::string more = test::write_synthetic_checkpoint(dir + "/more", sc);
  CHECK_THROWS_WITH(Checkpoint::open(more), Contains(more + ": missing tensor \"model.layers.3."));
  // known optional tensors: rotary inv_freq buffers (per layer or model-wide), an lm_head beside tied embeddings
  sc.config_extra = "{}";
  const std::string extra = test::write_synthetic_checkpoint(dir + "/extra", sc);
  auto tensors = test::synthetic_tensors(sc);
  tensors.push_back({"model.layers.0.self_attn.rotary_emb.inv_freq", {4}, {1, 0.1f, 0.01f, 0.001f}});
  tensors.push_back({"model.rotary_emb.inv_freq", {4}, {1, 0.1f, 0.01f, 0.001f}});
  test::write_safetensors(extra + "/model.safetensors", tensors, "F32");
  CHECK_NOTHROW(Checkpoint::open(extra));
  tensors.push_back({"model.layers.0.self_attn.q_proj.bias", {32}, std::vector<float>(32, 0.5f)});  // llama: no biases
  test::write_safetensors(extra + "/model.safetensors", tensors, "F32");
  CHECK_THROWS_WITH(Checkpoint::open(extra), Contains("\"model.layers.0.self_attn.q_proj.bias\"") &&
                                                 Contains("no attention biases"));
  sc.config_extra = R"({"rope_theta": 0})";
  const std::string theta = test::write_synthetic_checkpoint(dir + "/theta", sc);
  CHECK_THROWS_WITH(Checkpoint::open(theta), Contains(theta + "/config.json: field \"rope_theta\" = 0 must be positive"));
  sc.config_extra = R"({"max_position_embeddings": 0})";
  const std::string maxpos = test::write_synthetic_checkpoint(dir + "/maxpos", sc);
  CHECK_THROWS_WITH(Checkpoint::open(maxpos),
                    Contains(maxpos + "/config.json: field \"max_position_embeddings\" = 0 is out of range"));
}

TEST_CASE("CLI: ppl --recipe, diagnose and train-codebook refuse dumps and codebooks of other weights",
          "[cli_limits][cli][shared]") {
  const std::string dir = test::temp_dir();
  const std::string recipe = small_recipe(dir, "model: " + stories());
  const std::string out = dir + "/run";
  Cli r = run_cli(kEval + " run --recipe " + recipe + " --out " + out + " -q");
  INFO(r.err);
  REQUIRE(r.code == 0);
  const std::string other = other_weights(dir);
  const std::string codebook = out + "/codebooks/k-c8b8_v-c8b8_none_all_post.h5";  // vq:bits=1
  REQUIRE(fs::exists(codebook));
  r = run_cli(kEval + " ppl --recipe " + recipe + " --out " + out + " --set model=" + other + " --force -q");
  CHECK(r.code == 1);
  CHECK(r.error_lines() == 1);
  CHECK_THAT(r.err, Contains(codebook + ": made from other weights than " + other + ": model content") &&
                        Contains("--allow-other-weights"));
  r = run_cli(kEval + " diagnose --recipe " + recipe + " --out " + out + " --set model=" + other + " -q");
  CHECK(r.code == 1);
  CHECK_THAT(r.err, Contains(codebook + ": made from other weights than " + other));
  r = run_cli(kTrain + " --recipe " + recipe + " --set model=" + other + " --calib " + out + "/calib-post.h5 --out " + dir +
              "/cb.h5 -q");
  CHECK(r.code == 1);
  CHECK_THAT(r.err, Contains(out + "/calib-post.h5: made from other weights than " + other));
  CHECK_FALSE(fs::exists(dir + "/cb.h5"));
  // with the flag: a warning, and the run goes on
  r = run_cli(kEval + " ppl --recipe " + recipe + " --out " + out + " --set model=" + other +
              " --force --allow-other-weights -q");
  CHECK(r.code == 0);
  CHECK_THAT(r.err, Contains("warning: " + codebook + ": made from other weights"));
  // the same weights: accepted by every command
  r = run_cli(kTrain + " --recipe " + recipe + " --calib " + out + "/calib-post.h5 --out " + dir + "/cb.h5 -q");
  INFO(r.err);
  CHECK(r.code == 0);
  // ppl --recipe over a run's results: only with --force; the one-model options are refused with --recipe
  r = run_cli(kEval + " ppl --recipe " + recipe + " --out " + out + " -q");
  CHECK(r.code == 1);
  CHECK_THAT(r.err, Contains(out + "/results.json: already exists (use --force to overwrite)"));
  r = run_cli(kEval + " ppl --recipe " + recipe + " --out " + out + " --model " + other + " --force -q");
  CHECK(r.code == 1);
  CHECK_THAT(r.err, Contains("ppl --recipe: --model is an option of ppl --model"));
  r = run_cli(kEval + " ppl --recipe " + recipe + " --out " + out + " --text " + dir + "/valid.txt --force -q");
  CHECK(r.code == 1);
  CHECK_THAT(r.err, Contains("ppl --recipe: --text is an option of ppl --model"));
}

TEST_CASE("CLI: usage errors are one line with exit 2, errors name the file and the key", "[cli_limits][cli][shared]") {
  const std::string dir = test::temp_dir();
  Cli r = run_cli(kEval + " frobnicate --x 1");
  CHECK(r.code == 2);
  CHECK(r.lines() == 1);
  CHECK_THAT(r.err, Contains("antkv-eval: error: unknown subcommand \"frobnicate\""));
  r = run_cli(kEval + " ppl --no-such-option");
  CHECK(r.code == 2);
  CHECK(r.lines() == 1);
  CHECK_THAT(r.err, Contains("antkv-eval: error: ") && Contains("--no-such-option"));
  r = run_cli(kEval);
  CHECK(r.code == 2);
  CHECK(r.lines() == 1);
  r = run_cli(kCalibrate + " --out x.h5");
  CHECK(r.code == 2);
  CHECK(r.lines() == 1);
  CHECK_THAT(r.err, Contains("antkv-calibrate: error: ") && Contains("--recipe"));
  r = run_cli(kTrain + " --recipe r.yaml");
  CHECK(r.code == 2);
  CHECK(r.lines() == 1);
  CHECK(run_cli(kEval + " --help").code == 0);

  // a recipe without `model`: the key is named and no folder is made
  const std::string no_model = small_recipe(dir, "");
  for (const char* cmd : {" run", " ppl"}) {
    r = run_cli(kEval + cmd + " --recipe " + no_model + " --out " + dir + "/out -q");
    CHECK(r.code == 1);
    CHECK_THAT(r.err, Contains(no_model + ": key \"model\" is not set"));
  }
  CHECK_FALSE(fs::exists(dir + "/out"));
  // a second YAML document is not ignored
  std::ofstream(dir + "/two.yaml") << "name: a\n---\nname: b\n";
  CHECK_THROWS_WITH(Recipe::load(dir + "/two.yaml"), Contains("two.yaml: holds 2 YAML documents"));

  // a text too short for one window: named (diagnose names its own key, not ppl's --seq-len)
  std::ofstream(dir + "/tiny.txt") << "Once upon a time.";
  const std::string recipe = small_recipe(dir, "model: " + stories());
  r = run_cli(kEval + " ppl --model " + stories() + " --text " + dir + "/tiny.txt --seq-len 128 -q");
  CHECK(r.code == 1);
  CHECK_THAT(r.err, Contains(dir + "/tiny.txt: ") && Contains("not enough for one window of 128 (--seq-len)"));
  r = run_cli(kEval + " diagnose --recipe " + recipe + " --text " + dir + "/tiny.txt --set eval.methods=[fp16] -q");
  CHECK(r.code == 1);
  CHECK_THAT(r.err, Contains(dir + "/tiny.txt: ") && Contains("(eval.seq_len)"));
  CHECK_THAT(r.err, !Contains("--seq-len"));
  // a 1-token or whitespace-only calibration text: refused by calibrate, naming it
  for (const char* text : {"a", "   \n\n  "}) {
    std::ofstream(dir + "/short.txt") << text;
    r = run_cli(kCalibrate + " --recipe " + recipe + " --set calibration.text=" + dir + "/short.txt --out " + dir +
                "/c.h5 -q");
    CHECK(r.code == 1);
    CHECK(r.lines() == 1);
    CHECK_THAT(r.err, Contains(dir + "/short.txt: too short for calibration"));
    CHECK_FALSE(fs::exists(dir + "/c.h5"));
  }
  // a tokenizer of another model: ids outside the vocabulary, named with the text and the tokenizer
  test::SyntheticCheckpoint sc;  // vocabulary of 64; stories260K's tokenizer has 512 tokens
  const std::string small = test::write_synthetic_checkpoint(dir + "/small", sc);
  fs::copy_file(stories() + "/tokenizer.json", small + "/tokenizer.json");
  r = run_cli(kEval + " ppl --model " + small + " --text " + dir + "/valid.txt --seq-len 128 -q");
  CHECK(r.code == 1);
  CHECK_THAT(r.err, Contains(dir + "/valid.txt: token id") && Contains(small + "/tokenizer.json") &&
                        Contains("outside the model's vocabulary of 64"));
  // an output name too long for its temporary's suffix: the limit is named
  const std::string long_name = dir + "/" + std::string(240, 'x') + ".json";
  r = run_cli(kEval + " ppl --model " + stories() + " --text " + dir + "/valid.txt --seq-len 128 --max-windows 1 --json " +
              long_name + " -q");
  CHECK(r.code == 1);
  CHECK_THAT(r.err, Contains("the file name is 245 bytes; an output's name may have at most 231"));
  CHECK_THROWS_WITH(AtomicFile(long_name), Contains("at most 231"));
}
