// Long-context retrieval (eval/needle_tasks.h, eval/needle_eval.h, antkv-eval needle): cases deterministic per seed
// with the needle at the asked depth (token position checked), scoring on hand-made answers, bad settings as one-line
// errors before any work, chunked prefill = whole prefill for greedy decoding, a small end-to-end CLI run, and FP16
// against transformers' greedy answers on the retrieval reference model (skipped while it is absent).
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/atomic_file.h"
#include "core/error.h"
#include "eval/needle_eval.h"
#include "eval/needle_tasks.h"
#include "gpu_test_support.h"
#include "model/checkpoint.h"
#include "quant/method.h"
#include "recipe/recipe.h"
#include "runtime/cpu_runtime.h"
#include "test_support.h"
#include "tokenizer/tokenizer.h"

using namespace antkv;
namespace fs = std::filesystem;
using Catch::Matchers::Contains;

namespace {

NeedleSettings all_tasks_settings(uint64_t seed) {
  NeedleSettings s;
  s.tasks = {NeedleTask::kPasskey, NeedleTask::kSingle, NeedleTask::kMultiKey, NeedleTask::kMultiValue,
             NeedleTask::kMultiQuery};
  s.lengths = {301, 777};
  s.depths = {0, 0.1, 0.37, 0.5, 1};
  s.cases = 2;
  s.seed = seed;
  s.answer_budget = 24;
  return s;
}

size_t count_lines(const std::string& s) {
  std::stringstream ss(s);
  size_t n = 0;
  for (std::string l; std::getline(ss, l);) ++n;
  return n;
}

}  // namespace

TEST_CASE("needle cases: deterministic per seed, the needle at the asked depth (token position)", "[needle][shared]") {
  const Tokenizer tok = Tokenizer::from_file(test::model_dir("antkv-ref-18m") + "/tokenizer.json");
  for (bool uuid : {false, true}) {
    INFO("uuid values " << uuid);
    NeedleSettings s = all_tasks_settings(7);
    s.uuid_values = uuid;
    if (uuid) {  // a UUID takes ~28 tokens of this tokenizer: room for two in the answer, five in the prompt
      s.answer_budget = 80;
      s.lengths = {501, 977};
    }
    const auto a = make_needle_cases(s, tok, needle_filler_text());
    const auto b = make_needle_cases(s, tok, needle_filler_text());
    REQUIRE(a.size() == 5 * 2 * 5 * 2);
    NeedleSettings s2 = s;
    s2.seed = 8;
    const auto other = make_needle_cases(s2, tok, needle_filler_text());
    int differ = 0;
    for (size_t i = 0; i < a.size(); ++i) {
      const NeedleCase& c = a[i];
      INFO(needle_task_name(c.task) << " length " << c.length << " depth " << c.depth << " case " << c.index);
      CHECK(c.prompt_ids == b[i].prompt_ids);  // same seed: the same case
      CHECK(c.expected == b[i].expected);
      differ += c.prompt_ids != other[i].prompt_ids ? 1 : 0;
      CHECK(static_cast<int>(c.prompt_ids.size()) == c.length - s.answer_budget);
      CHECK(static_cast<int>(c.answer_ids.size()) <= s.answer_budget);
      CHECK(c.prompt_ids[0] == tok.bos_id());  // the model's BOS handling: the tokenizer adds BOS
      // the asked needle's tokens sit at needle_position, at the depth of the document
      REQUIRE(c.needle_position + c.needle_ids.size() <= c.prompt_ids.size());
      CHECK(std::equal(c.needle_ids.begin(), c.needle_ids.end(), c.prompt_ids.begin() + c.needle_position));
      const int room = c.document_end - c.document_begin - static_cast<int>(c.needle_ids.size());
      CHECK(c.needle_position == c.document_begin + static_cast<int>(std::llround(c.depth * room)));
      if (c.depth == 0) CHECK(c.needle_position == c.document_begin);
      if (c.depth == 1) CHECK(c.needle_position + static_cast<int>(c.needle_ids.size()) == c.document_end);
      // the needle holds the first expected value; every value is in the prompt
      CHECK_THAT(tok.decode(c.needle_ids), Contains(c.values[0]));
      const std::string prompt = tok.decode(c.prompt_ids, true);
      for (const auto& v : c.values) CHECK_THAT(prompt, Contains(v));
      const size_t n_values = c.task == NeedleTask::kMultiValue ? 2 : c.task == NeedleTask::kMultiQuery ? 2 : 1;
      CHECK(c.values.size() == n_values);
      if (!uuid) CHECK(c.values[0].size() == 5);
      if (uuid && c.task != NeedleTask::kPasskey) CHECK(c.values[0].size() == 36);
      CHECK(!c.answer_ids.empty());
      CHECK_THAT(tok.decode(c.answer_ids), Contains(c.values[0]));
    }
    CHECK(differ == static_cast<int>(a.size()));  // another seed: other cases
  }
  // a case depends on its own coordinates only: the same case with fewer other cells around it
  NeedleSettings one = all_tasks_settings(7);
  one.tasks = {NeedleTask::kMultiKey};
  one.lengths = {777};
  one.depths = {0.37};
  const auto single = make_needle_cases(one, tok, needle_filler_text());
  const auto all = make_needle_cases(all_tasks_settings(7), tok, needle_filler_text());
  bool found = false;
  for (const auto& c : all)
    if (c.task == NeedleTask::kMultiKey && c.length == 777 && c.depth == 0.37 && c.index == 0)
      found = c.prompt_ids == single[0].prompt_ids;
  CHECK(found);
  // the text haystack: tokens of the given text, wrapped around when short
  const auto t = make_needle_cases(one, tok, "Alice was beginning to get very tired of sitting by her sister.");
  CHECK(t[0].prompt_ids.size() == 777u - 24u);
  CHECK_THAT(tok.decode(t[0].prompt_ids), Contains("sitting by her sister"));
}

TEST_CASE("needle scoring: exact match, values found and answer tokens, on hand-made answers", "[needle]") {
  const std::vector<int32_t> ids = {11, 12};
  auto sc = score_needle_answer({"71432"}, ids, {11, 12, 5}, " 71432. Remember it.");
  CHECK(sc.exact);
  CHECK(sc.value_share == 1.0);
  CHECK(sc.token_share == 1.0);
  sc = score_needle_answer({"71432"}, ids, {11, 13}, " 714329 is it");  // a longer number is not the value
  CHECK_FALSE(sc.exact);
  CHECK(sc.value_share == 0.0);
  CHECK(sc.token_share == 0.5);
  sc = score_needle_answer({"71432"}, ids, {13, 11}, "The key is 71432");  // found later in the answer: exact
  CHECK(sc.exact);
  CHECK(sc.token_share == 0.0);  // but not at the answer's token positions
  sc = score_needle_answer({"123", "456"}, {1, 2, 3}, {1, 2, 9}, " 123, 789");  // one of two values
  CHECK_FALSE(sc.exact);
  CHECK(sc.value_share == 0.5);
  CHECK(sc.token_share == Approx(2.0 / 3));
  sc = score_needle_answer({"123", "456"}, {1}, {}, "456 and 123.");  // any order; no tokens generated
  CHECK(sc.exact);
  CHECK(sc.token_share == 0.0);
  // a UUID is one word: a prefix of a longer hyphenated string does not match
  CHECK_FALSE(score_needle_answer({"ab12-cd34"}, {1}, {1}, "ab12-cd34-ef56").exact);
  CHECK(score_needle_answer({"ab12-cd34"}, {1}, {1}, "(ab12-cd34)").exact);
  CHECK_FALSE(score_needle_answer({"5"}, {1}, {1}, "").exact);

  auto a = generation_agreement({1, 2, 3, 4}, {1, 2, 9, 4});
  CHECK(a.tokens == 4);
  CHECK(a.first_divergence == 2);
  CHECK(a.share_equal == 0.75);
  a = generation_agreement({1, 2, 3}, {1, 2, 3});
  CHECK(a.first_divergence == 3);
  CHECK(a.share_equal == 1.0);
  a = generation_agreement({1, 2, 3, 4}, {1});  // stopped early: the missing tokens differ
  CHECK(a.first_divergence == 1);
  CHECK(a.share_equal == 0.25);
}

TEST_CASE("needle settings: bad values are one-line errors naming the key", "[needle]") {
  CHECK_THROWS_WITH(Recipe::defaults_with({"eval.needle.depths=[0.5, 1.5]"}),
                    Contains("key \"eval.needle.depths\": depth 1.5 is outside [0, 1]"));
  CHECK_THROWS_WITH(Recipe::defaults_with({"eval.needle.depths=[-0.1]"}), Contains("depth -0.1 is outside [0, 1]"));
  CHECK_THROWS_WITH(Recipe::defaults_with({"eval.needle.tasks=[passkey, haystack]"}),
                    Contains("key \"eval.needle.tasks\" = \"haystack\" is not one of: passkey, single"));
  CHECK_THROWS_WITH(Recipe::defaults_with({"eval.tasks=[ppl, niah]"}), Contains("\"eval.tasks\" = \"niah\""));
  CHECK_THROWS_WITH(Recipe::defaults_with({"eval.needle.lengths=[1024, x]"}),
                    Contains("key \"eval.needle.lengths\" must be a list of integers"));
  CHECK_THROWS_WITH(Recipe::defaults_with({"eval.needle.haystack=book"}), Contains("\"eval.needle.haystack\""));
  // the model's maximum, the answer budget
  ModelConfig cfg;
  cfg.max_position_embeddings = 2048;
  NeedleSettings s = all_tasks_settings(0);
  s.lengths = {1024, 4096};
  CHECK_THROWS_WITH(check_needle_settings(s, cfg),
                    Contains("key \"eval.needle.lengths\": length 4096 exceeds the model's max_position_embeddings 2048"));
  s.lengths = {20};
  CHECK_THROWS_WITH(check_needle_settings(s, cfg), Contains("length 20 leaves no prompt after the answer budget of 24"));
  s.lengths = {2048};
  s.agreement_tokens = 16;
  s.agreement_length = 4000;
  CHECK_THROWS_WITH(check_needle_settings(s, cfg), Contains("eval.needle.agreement_length\": length 4000 exceeds"));
  s.agreement_length = 0;
  CHECK_NOTHROW(check_needle_settings(s, cfg));
  // a recipe round-trips its needle block
  const Recipe r = Recipe::defaults_with({"eval.needle.lengths=[512, 1024]", "eval.needle.depths=[0, 0.5]",
                                          "eval.tasks=[ppl, needle]"});
  const NeedleSettings rs = needle_settings(r);
  CHECK(rs.lengths == std::vector<int>{512, 1024});
  CHECK(rs.depths == std::vector<double>{0, 0.5});
  CHECK(r.eval.tasks == std::vector<std::string>{"ppl", "needle"});
  const std::string dir = test::temp_dir();
  std::ofstream(dir + "/r.yaml") << r.to_yaml();
  const Recipe back = Recipe::load(dir + "/r.yaml");
  CHECK(back.eval.needle.lengths == r.eval.needle.lengths);
  CHECK(back.eval.needle.depths == r.eval.needle.depths);
}

TEST_CASE("needle settings: a value longer than the answer budget, a too short length: errors before any work",
          "[needle][shared]") {
  const Tokenizer tok = Tokenizer::from_file(test::model_dir("antkv-ref-18m") + "/tokenizer.json");
  NeedleSettings s = all_tasks_settings(0);
  s.answer_budget = 2;
  CHECK_THROWS_WITH(make_needle_cases(s, tok, needle_filler_text()),
                    Contains("key \"eval.needle.answer_budget\" = 2 is shorter than the passkey answer"));
  s = all_tasks_settings(0);
  s.lengths = {60};
  CHECK_THROWS_WITH(make_needle_cases(s, tok, needle_filler_text()),
                    Contains("key \"eval.needle.lengths\": length 60 is too short for task passkey"));
  // through the command: one line, exit 1, nothing written
  const std::string dir = test::temp_dir();
  std::ofstream(dir + "/r.yaml") << "name: n\nmodel: " << test::model_dir("antkv-ref-18m")
                                 << "\neval:\n  device: cpu\n  methods: [fp16]\n  needle:\n    lengths: [1024]\n";
  for (const auto& [set, message] : std::vector<std::pair<std::string, std::string>>{
           {"eval.needle.lengths=[1024,4096]", "length 4096 exceeds the model's max_position_embeddings 2048"},
           {"eval.needle.answer_budget=3", "is shorter than the passkey answer"},
           {"eval.needle.depths=[0,2]", "depth 2 is outside [0, 1]"}}) {
    INFO(set);
    const auto c = test::run_without_gpu(dir, std::string(ANTKV_EVAL_PATH) + " needle --recipe r.yaml --out out --set '" + set + "'");
    INFO(c.err);
    CHECK(c.rc != 0);
    CHECK(count_lines(c.err) == 1);
    CHECK_THAT(c.err, Contains(message));
    CHECK_FALSE(fs::exists(dir + "/out"));
  }
}

TEST_CASE("needle greedy decoding: a prompt prefilled in chunks answers as one prefill", "[needle][shared]") {
  Checkpoint ckpt = Checkpoint::open(test::model_dir("stories260K"));
  const Tokenizer tok = Tokenizer::from_file(ckpt.tokenizer_path());
  NeedleSettings s = all_tasks_settings(3);
  s.tasks = {NeedleTask::kPasskey};
  s.lengths = {400};
  s.depths = {0.5};
  s.cases = 1;
  const auto cases = make_needle_cases(s, tok, needle_filler_text());
  CpuRuntimeOptions o;
  o.kv_dtype = KvDType::kF32;  // chunking changes nothing then but the order of additions
  CpuRuntime rt(ckpt, o);
  const auto whole = greedy_generate(rt, cases[0].prompt_ids, 12, 0);
  const auto chunked = greedy_generate(rt, cases[0].prompt_ids, 12, 97);
  CHECK(whole.size() == 12u);
  CHECK(whole == chunked);
  // stop at a given token: the generation ends with it
  const auto stopped = greedy_generate(rt, cases[0].prompt_ids, 12, 0, whole[3]);
  CHECK(stopped.size() <= 4u);
  CHECK(stopped.back() == whole[3]);
}

TEST_CASE("antkv-eval needle: a small run writes results.{json,csv,txt} with accuracy per method, length, depth",
          "[needle][cli][shared][slow]") {
  const std::string dir = test::temp_dir();
  // stories260K (max 512 positions): fp16 and uniform need no codebooks, so no calibration stage runs
  std::ofstream(dir + "/r.yaml") << "name: n\nmodel: " << test::model_dir("stories260K")
                                 << "\neval:\n  device: cpu\n  tasks: [needle]\n"
                                    "  methods: [fp16, \"uniform:bits=2,group=32\"]\n"
                                    "  needle:\n    tasks: [passkey, multikey]\n    lengths: [400, 512]\n    distractors: 1\n"
                                    "    depths: [0, 0.5, 1]\n    cases: 1\n    answer_budget: 12\n"
                                    "    agreement_tokens: 8\n";
  const auto c = test::run_without_gpu(dir, std::string(ANTKV_EVAL_PATH) + " needle --recipe r.yaml --out out -q");
  INFO(c.err);
  REQUIRE(c.rc == 0);
  CHECK_THAT(c.out, Contains("generation agreement with fp16"));
  const auto j = nlohmann::json::parse(read_file(dir + "/out/needle/results.json"));
  CHECK(j["tool"] == "antkv-eval needle");
  REQUIRE(j["results"].size() == 2u * 2 * 2 * 3);  // methods x tasks x lengths x depths
  for (const auto& row : j["results"]) {
    CHECK(row["accuracy"].is_number());
    CHECK(row["accuracy"].get<double>() >= 0);
    CHECK(row["accuracy"].get<double>() <= 1);
    CHECK(row["cases"] == 1);
  }
  CHECK(j["cases"].size() == 2u * 2 * 2 * 3);
  REQUIRE(j["agreement"].size() == 2u);
  CHECK(j["agreement"][0]["method"] == "fp16");
  CHECK(j["agreement"][0]["share_equal"] == 1.0);  // fp16 against itself
  const std::string csv = read_file(dir + "/out/needle/results.csv");
  CHECK_THAT(csv, Contains("method,kind,kv_cache,task,length,depth,cases,accuracy"));
  CHECK(count_lines(csv) == 1 + 2 * 2 * 2 * 3);
  CHECK(fs::exists(dir + "/out/needle/results.txt"));
  CHECK_FALSE(fs::exists(dir + "/out/results.json"));  // no ppl task
  // run with eval.tasks [ppl, needle]: both outputs
  const auto r = test::run_without_gpu(dir, std::string(ANTKV_EVAL_PATH) + " run --recipe r.yaml --out out2 -q --set "
                              "'eval.tasks=[ppl, needle]' --set 'eval.texts=[" + test::shared_path("data/books-test.txt") +
                              "]' --set eval.seq_len=256 --set eval.max_windows=1 --set eval.needle.agreement_tokens=0");
  INFO(r.err);
  REQUIRE(r.rc == 0);
  CHECK(fs::exists(dir + "/out2/results.json"));
  CHECK(fs::exists(dir + "/out2/needle/results.json"));
}

TEST_CASE("needle: FP16 reproduces transformers' greedy answers on the retrieval reference model", "[needle]") {
  const std::string model = test::source_path("data/models/antkv-retrieval-2m");
  const std::string ref = model + "/reference/needle_reference.json";
  Checkpoint ckpt = Checkpoint::open(model);
  const auto j = nlohmann::json::parse(read_file(ref));
  REQUIRE(j.contains("cases"));
  REQUIRE(!j["cases"].empty());
  // the evaluation's fp16 method, as antkv-eval needle runs it on the CPU
  auto rt_ptr = cpu_method_runtime_factory(ckpt)(parse_method("fp16", Recipe::defaults_with({})), nullptr);
  Runtime& rt = *rt_ptr;
  int equal_cases = 0, n = 0;
  for (const auto& c : j["cases"]) {
    const auto prompt = c["prompt_ids"].get<std::vector<int32_t>>();
    const auto answer = c["answer_ids"].get<std::vector<int32_t>>();
    REQUIRE(!answer.empty());
    const auto got = greedy_generate(rt, prompt, static_cast<int>(answer.size()), 8192);
    INFO("case " << n << " (" << c.value("task", std::string("?")) << ", " << prompt.size() << " prompt tokens)");
    CHECK(got == answer);
    equal_cases += got == answer ? 1 : 0;
    ++n;
  }
  test::report_measured("needle reference: cases whose greedy answer differs from transformers'",
                        static_cast<double>(n - equal_cases), 1);
}
