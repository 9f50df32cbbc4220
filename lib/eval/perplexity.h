// Perplexity by the window protocols of the design note (§5). The text is tokenized once (BOS first);
//   bos_window (default, llama.cpp): window c = [BOS] + ids[1 + c(s-1), 1 + (c+1)(s-1))
//   single_bos (GPTQ/KIVI papers):   window c = ids[c s, (c+1) s)
// Each window's NLL is summed over its s-1 predicted positions; ppl = exp(total / count).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "runtime/runtime.h"

namespace antkv {

enum class WindowProtocol { kBosWindow, kSingleBos };
WindowProtocol parse_window_protocol(const std::string& s);  // "bos_window" | "single_bos"
const char* window_protocol_name(WindowProtocol p);

// Number of full windows of the stream `n_ids` long.
int64_t count_windows(int64_t n_ids, int seq_len, WindowProtocol p);
// Text tokens after the last full window: never scored (a shorter window would be scored with less context
// than the others and skew the perplexity), and said so by windows_line().
int64_t remainder_tokens(int64_t n_ids, int seq_len, WindowProtocol p);
// One line for the log: "books-test.txt: 812345 tokens, 3 of 396 windows of 2048 (eval.max_windows)" or
// "...: 396 windows of 2048; the last 1234 tokens (less than a window) are not scored".
std::string windows_line(const std::string& label, int64_t n_ids, int seq_len, WindowProtocol p, int64_t first_window,
                         int64_t max_windows);
// Window c (seq_len ids). ids[0] must be BOS for kBosWindow.
std::vector<int32_t> make_window(const std::vector<int32_t>& ids, int32_t bos_id, int seq_len,
                                 WindowProtocol p, int64_t c);

struct PerplexityOptions {
  int seq_len = 2048;
  WindowProtocol protocol = WindowProtocol::kBosWindow;
  int64_t first_window = 0;
  int64_t max_windows = -1;  // <0: all
  bool progress = true;
  std::string progress_label = "ppl";
  // A window longer than this is prefilled in chunks of this many tokens (each chunk attends to the whole
  // cached past; the NLL is computed chunk by chunk, so [seq_len, vocab] logits never exist). Quantized
  // caches treat each chunk as a prefill of its own (anchors are selected per chunk, as a server prefilling
  // a long prompt in chunks would). <= 0: the whole window in one forward().
  int prefill_chunk = 8192;
  // > 0: tokens [0, decode_from) of each window are prefilled (in prefill_chunk chunks), then every further
  // token is one forward() of one token (teacher-forced decode: what a server's decode steps see).
  int decode_from = 0;
  // How the user sets seq_len (named in errors): "--seq-len" or "eval.seq_len".
  std::string seq_len_name = "--seq-len";
  // The text the ids come from (named in errors: a text too short for one window).
  std::string text_name = "the text";
};


struct PerplexityResult {
  WindowProtocol protocol = WindowProtocol::kBosWindow;
  int seq_len = 0;
  int decode_from = 0;               // the options' decode_from (0: windows prefilled)
  int64_t first_window = 0;
  int64_t windows = 0;               // evaluated
  int64_t windows_available = 0;     // in the whole text
  int64_t predicted_tokens = 0;      // windows * (seq_len - 1)
  double nll_total = 0;
  double ppl = 0;
  std::vector<double> nll_per_window;
  double seconds = 0;
  double tokens_per_second = 0;      // forward tokens (windows * seq_len) per second
};

PerplexityResult evaluate_perplexity(Runtime& rt, const std::vector<int32_t>& ids, int32_t bos_id,
                                     const PerplexityOptions& opts);

}  // namespace antkv
