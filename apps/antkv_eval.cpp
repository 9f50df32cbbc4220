// antkv-eval: perplexity with a chosen KV cache on a Hugging Face LLaMA-family checkpoint (CPU or CUDA).
//   antkv-eval ppl --model DIR --text FILE [--seq-len 2048] [--protocol bos_window|single_bos]
//                  [--max-windows N] [--device cpu|cuda] [--json out.json]
#include <CLI/CLI.hpp>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <omp.h>

#include "core/atomic_file.h"
#include "core/error.h"
#include "core/hash.h"
#include "core/interrupt.h"
#include "core/system_info.h"
#include "eval/perplexity.h"
#include "model/checkpoint.h"
#include "runtime/cpu_runtime.h"
#include "tokenizer/tokenizer.h"
#ifdef ANTKV_HAVE_CUDA
#include "kernels/gpu_runtime.h"
#endif

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace antkv {
namespace {

struct PplArgs {
  std::string model, text, json_out, device = "cpu", kv_dtype = "fp16", protocol;
  int seq_len = 2048, threads = 0;
  bool window_bos = true, quiet = false;
  int64_t max_windows = -1, first_window = 0;
};

std::unique_ptr<Runtime> make_runtime(const Checkpoint& ckpt, const PplArgs& a) {
  if (a.device == "cpu") {
    CpuRuntimeOptions o;
    o.threads = a.threads;
    o.kv_dtype = parse_kv_dtype(a.kv_dtype);
    return std::make_unique<CpuRuntime>(ckpt, o);
  }
  if (a.device == "cuda") {
#ifdef ANTKV_HAVE_CUDA
    return make_gpu_runtime(ckpt);
#else
    fail("--device cuda: this antkv-eval was built without CUDA (configure with nvcc available)");
#endif
  }
  fail("--device must be cpu or cuda, got \"{}\"", a.device);
}

int run_ppl(const PplArgs& a) {
  const WindowProtocol protocol = !a.protocol.empty() ? parse_window_protocol(a.protocol)
                                  : a.window_bos     ? WindowProtocol::kBosWindow
                                                     : WindowProtocol::kSingleBos;
  ANTKV_CHECK(fs::is_regular_file(a.text), "{}: text file not found", a.text);
  Checkpoint ckpt = Checkpoint::open(a.model);
  Tokenizer tok = Tokenizer::from_file(ckpt.tokenizer_path());
  auto rt = make_runtime(ckpt, a);

  const auto t_tok = std::chrono::steady_clock::now();
  const std::string text = read_file(a.text);
  const std::vector<int32_t> ids = tok.encode(text, /*add_special=*/true);
  const double tok_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_tok).count();
  if (!a.quiet)
    std::fprintf(stderr, "%s: %zu tokens (tokenized in %.1f s), model %s on %s\n", a.text.c_str(), ids.size(),
                 tok_seconds, a.model.c_str(), rt->device_name().c_str());
  if (protocol == WindowProtocol::kBosWindow)
    ANTKV_CHECK(!ids.empty() && ids[0] == tok.bos_id(),
                "{}: the tokenizer adds no BOS token; use --protocol single_bos", ckpt.tokenizer_path());

  PerplexityOptions o;
  o.seq_len = a.seq_len;
  o.protocol = protocol;
  o.max_windows = a.max_windows;
  o.first_window = a.first_window;
  o.progress = !a.quiet;
  const PerplexityResult r = evaluate_perplexity(*rt, ids, tok.bos_id(), o);

  std::printf("model %s  text %s  protocol %s  seq_len %d  windows %lld/%lld  ppl %.4f  (%.1f tokens/s on %s, %.1f s)\n",
              a.model.c_str(), fs::path(a.text).filename().c_str(), window_protocol_name(protocol), a.seq_len,
              static_cast<long long>(r.windows), static_cast<long long>(r.windows_available), r.ppl,
              r.tokens_per_second, rt->device_name().c_str(), r.seconds);
  if (!a.json_out.empty()) {
    json j;
    j["tool"] = "antkv-eval ppl";
    j["version"] = ANTKV_VERSION;
    j["timestamp"] = utc_timestamp();
    j["model"] = {{"dir", a.model}, {"model_type", ckpt.config().model_type},
                  {"config_hash", ckpt.config().config_hash}};
    j["text"] = {{"path", a.text}, {"bytes", text.size()}, {"tokens", ids.size()}};
    j["hardware"] = {{"device", rt->device_name()}, {"cpu", cpu_model_name()}};
    j["cache"] = {{"method", "fp16"}, {"kv_dtype", a.device == "cpu" ? a.kv_dtype : "bf16"}};
    j["protocol"] = window_protocol_name(protocol);
    j["seq_len"] = a.seq_len;
    j["first_window"] = r.first_window;
    j["windows"] = r.windows;
    j["windows_available"] = r.windows_available;
    j["predicted_tokens"] = r.predicted_tokens;
    j["nll_total"] = r.nll_total;
    j["ppl"] = r.ppl;
    j["nll_per_window"] = r.nll_per_window;
    j["seconds"] = r.seconds;
    j["tokens_per_second"] = r.tokens_per_second;
    write_file_atomic(a.json_out, j.dump(1) + "\n");
  }
  return 0;
}

}  // namespace
}  // namespace antkv

int main(int argc, char** argv) {
  using namespace antkv;
  CLI::App app{"antkv-eval: evaluate LLaMA-family models with full-precision and quantized KV caches"};
  app.require_subcommand(1);
  PplArgs p;
  auto* ppl = app.add_subcommand("ppl", "perplexity of a checkpoint on a text, by the windows of design note §5");
  ppl->add_option("--model", p.model, "Hugging Face checkpoint directory (config.json, model.safetensors, tokenizer.json)")
      ->required();
  ppl->add_option("--text", p.text, "UTF-8 text file to evaluate")->required();
  ppl->add_option("--seq-len", p.seq_len, "window length in tokens")->capture_default_str()->check(CLI::Range(2, 1 << 24));
  ppl->add_flag("--window-bos,!--no-window-bos", p.window_bos,
                "bos_window protocol (BOS + seq_len-1 text tokens per window; default) or single_bos");
  ppl->add_option("--protocol", p.protocol, "bos_window | single_bos (overrides --window-bos)")
      ->check(CLI::IsMember({"bos_window", "single_bos"}));
  ppl->add_option("--max-windows", p.max_windows, "evaluate at most N windows (quick runs); default all");
  ppl->add_option("--first-window", p.first_window, "index of the first window to evaluate")->capture_default_str();
  ppl->add_option("--device", p.device, "cpu | cuda")->capture_default_str()->check(CLI::IsMember({"cpu", "cuda"}));
  ppl->add_option("--kv-dtype", p.kv_dtype, "CPU cache storage: fp16 | bf16 | fp32")
      ->capture_default_str()->check(CLI::IsMember({"fp16", "bf16", "fp32"}));
  ppl->add_option("--threads", p.threads, "CPU threads (0 = all cores)")->capture_default_str();
  ppl->add_option("--json", p.json_out, "write the result (with per-window NLL) to this JSON file");
  ppl->add_flag("--quiet,-q", p.quiet, "no progress line");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  install_interrupt_handler();
  try {
    if (*ppl) return run_ppl(p);
  } catch (const Interrupted&) {
    std::fprintf(stderr, "antkv-eval: interrupted; no output written\n");
    return 130;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "antkv-eval: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
