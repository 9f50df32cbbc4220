// The needle evaluation's greedy decoding on the GPU runtime (antkv-eval needle with eval.device cuda): the FP16
// answers against the CPU reference runtime's, chunked prefill against one prefill, and antkv's answers through the
// simulated GPU quantizer and the real compressed cache against the CPU cache's, on antkv-ref-18m.
#include "test_support.h"
#include "gpu_test_support.h"

#ifdef ANTKV_HAVE_CUDA
#include <fmt/format.h>

#include <filesystem>

#include "eval/compare.h"
#include "eval/needle_eval.h"
#include "eval/needle_tasks.h"
#include "kernels/runtime/method_runtime_factory.h"
#include "model/checkpoint.h"
#include "quant/method.h"
#include "runtime/cpu_runtime.h"
#include "tokenizer/tokenizer.h"

using namespace antkv;

TEST_CASE("needle on the GPU: FP16 greedy answers agree with the CPU runtime's, chunked prefill = one prefill",
          "[gpu][needle][shared]") {
  SKIP_WITHOUT_GPU();
  Checkpoint ckpt = Checkpoint::open(test::model_dir("antkv-ref-18m"));
  const Tokenizer tok = Tokenizer::from_file(ckpt.tokenizer_path());
  NeedleSettings s;
  s.tasks = {NeedleTask::kPasskey, NeedleTask::kMultiKey};
  s.lengths = {701, 1999};  // odd lengths; 1999 + the answer fits max_position_embeddings 2048
  s.depths = {0, 0.33, 1};
  s.cases = 1;
  s.seed = 11;
  s.answer_budget = 12;
  const auto cases = make_needle_cases(s, tok, needle_filler_text());
  const Recipe r = Recipe::defaults_with({});
  const MethodSpec fp16 = parse_method("fp16", r);
  auto cpu = cpu_method_runtime_factory(ckpt)(fp16, nullptr);
  GpuRuntimeOptions go;
  go.max_context = 2048;
  auto gpu = gpu_method_runtime_factory(ckpt, go)(fp16, nullptr);
  double share_cpu = 0, share_chunk = 0;
  int first_token_same = 0;
  for (const auto& c : cases) {
    const auto ref = greedy_generate(*cpu, c.prompt_ids, s.answer_budget, 0);
    const auto whole = greedy_generate(*gpu, c.prompt_ids, s.answer_budget, 0);
    const auto chunked = greedy_generate(*gpu, c.prompt_ids, s.answer_budget, 251);
    share_cpu += generation_agreement(ref, whole).share_equal / cases.size();
    share_chunk += generation_agreement(whole, chunked).share_equal / cases.size();
    first_token_same += ref[0] == whole[0] ? 1 : 0;
  }
  // bf16 weights, activations and cache on the GPU against fp32/fp16 on the CPU: greedy tokens differ only where
  // two logits nearly tie, and a flip changes the rest of that answer; 90% of the answer tokens equal leaves room
  // for about one flipped answer in the 12 cases. Chunked prefill on the GPU reorders bf16 sums only.
  test::report_measured("needle gpu: 1 - share of fp16 answer tokens equal to the CPU's", 1 - share_cpu, 0.1);
  test::report_measured("needle gpu: 1 - share of answer tokens equal, chunked vs one prefill", 1 - share_chunk, 0.1);
  CHECK(1 - share_cpu < 0.1);
  CHECK(1 - share_chunk < 0.1);
  CHECK(first_token_same >= static_cast<int>(cases.size()) - 1);
}

TEST_CASE("needle on the GPU: antkv answers through the simulated quantizer and the real cache against the CPU cache",
          "[gpu][needle][shared]") {
  SKIP_WITHOUT_GPU();
  Checkpoint ckpt = Checkpoint::open(test::model_dir("antkv-ref-18m"));
  const Tokenizer tok = Tokenizer::from_file(ckpt.tokenizer_path());
  // codebooks as antkv-eval run makes them (CPU calibration on one window, a few k-means iterations)
  const std::string dir = test::temp_dir();
  const Recipe r = Recipe::defaults_with(
      {"model=" + test::model_dir("antkv-ref-18m"), "calibration.text=" + test::shared_path("data/books-calib.txt"),
       "calibration.tokens=2047", "calibration.seq_len=2048", "calibration.device=cpu", "kmeans.device=cpu",
       "kmeans.iters=4", "kmeans.max_points=2048", "quant.bits=1", "eval.methods=[\"antkv:bits=1,ratio=0.05\"]",
       "out_dir=" + dir});
  PipelineOptions po;
  po.recipe = &r;
  po.ckpt = &ckpt;
  po.tok = &tok;
  po.progress = false;
  po.make_calibration_runtime = [&ckpt]() -> std::unique_ptr<Runtime> {
    CpuRuntimeOptions co;
    co.kv_dtype = KvDType::kF32;
    return std::make_unique<CpuRuntime>(ckpt, co);
  };
  prepare_codebooks(po);
  const MethodSpec m = parse_method(r.eval.methods[0], r);
  auto books = load_method_codebooks({m}, (std::filesystem::path(dir) / "codebooks").string(), &ckpt);
  const auto cb = books.at(m.codebook_key());

  NeedleSettings s;
  s.tasks = {NeedleTask::kPasskey, NeedleTask::kSingle};
  s.lengths = {333, 1501};  // odd lengths; the answers' tokens stay in the decode window (128)
  s.depths = {0, 0.5, 1};
  s.cases = 1;
  s.seed = 5;
  s.answer_budget = 12;
  const auto cases = make_needle_cases(s, tok, needle_filler_text());
  GpuRuntimeOptions go;
  go.max_context = 1501;
  auto cpu = cpu_method_runtime_factory(ckpt)(m, cb);
  auto sim = gpu_method_runtime_factory(ckpt, go, false)(m, cb);
  auto real = gpu_method_runtime_factory(ckpt, go, true)(m, cb);
  double sim_cpu = 0, real_cpu = 0, real_sim = 0;
  for (const auto& c : cases) {
    const auto a = greedy_generate(*cpu, c.prompt_ids, s.answer_budget, 0);
    const auto b = greedy_generate(*sim, c.prompt_ids, s.answer_budget, 0);
    const auto d = greedy_generate(*real, c.prompt_ids, s.answer_budget, 0);  // one prefill, then codes decoded
    sim_cpu += generation_agreement(a, b).share_equal / cases.size();
    real_cpu += generation_agreement(a, d).share_equal / cases.size();
    real_sim += generation_agreement(b, d).share_equal / cases.size();
  }
  // The real cache reads the same codes and anchors as the simulated one (its prefill's attention is the simulated
  // path's): their answers must agree (measured on an H100, 2026-12-07: 0.007 of the answer tokens differ; bound: one
  // flipped answer in the 12 cases). Against the CPU cache no bound is set: antkv-ref-18m does not retrieve, so its
  // answers are free text, and a bf16 change of a K/V value that moves it to another centroid flips a greedy token
  // where logits nearly tie, after which the rest of that answer differs (measured: 0.60 of the tokens differ for both
  // GPU paths; FP16, above, matches the CPU exactly). Reported, not checked.
  WARN(fmt::format("needle gpu antkv: 1 - share of answer tokens equal to the CPU cache's: simulated {:.3f}, real {:.3f}",
                   1 - sim_cpu, 1 - real_cpu));
  test::report_measured("needle gpu antkv: 1 - share of answer tokens equal, real vs simulated", 1 - real_sim, 0.1);
  CHECK(1 - real_sim < 0.1);
}

#endif
