#include "eval/perplexity.h"

#include <algorithm>
#include <chrono>
#include <cmath>

#include "core/error.h"
#include "core/interrupt.h"
#include "core/progress.h"

namespace antkv {

WindowProtocol parse_window_protocol(const std::string& s) {
  if (s == "bos_window") return WindowProtocol::kBosWindow;
  if (s == "single_bos") return WindowProtocol::kSingleBos;
  fail("unknown window protocol \"{}\" (expected bos_window or single_bos)", s);
}

const char* window_protocol_name(WindowProtocol p) {
  return p == WindowProtocol::kBosWindow ? "bos_window" : "single_bos";
}

int64_t count_windows(int64_t n_ids, int seq_len, WindowProtocol p) {
  ANTKV_CHECK(seq_len >= 2, "seq_len must be at least 2, got {}", seq_len);
  if (p == WindowProtocol::kBosWindow) return n_ids > 1 ? (n_ids - 1) / (seq_len - 1) : 0;
  return n_ids / seq_len;
}

int64_t remainder_tokens(int64_t n_ids, int seq_len, WindowProtocol p) {
  const int64_t n = count_windows(n_ids, seq_len, p);
  if (p == WindowProtocol::kBosWindow) return n_ids > 1 ? (n_ids - 1) - n * (seq_len - 1) : 0;
  return n_ids - n * seq_len;
}

std::string windows_line(const std::string& label, int64_t n_ids, int seq_len, WindowProtocol p, int64_t first_window,
                         int64_t max_windows) {
  const int64_t n = count_windows(n_ids, seq_len, p);
  const int64_t used = max_windows < 0 ? n - first_window : std::min(max_windows, n - first_window);
  if (used < n)
    return fmt::format("{}: {} tokens, {} of its {} windows of {}{}", label, n_ids, used, n, seq_len,
                       first_window > 0 ? fmt::format(" (from window {})", first_window) : std::string());
  const int64_t rest = remainder_tokens(n_ids, seq_len, p);
  if (rest == 0) return fmt::format("{}: {} tokens, {} windows of {}", label, n_ids, n, seq_len);
  return fmt::format("{}: {} tokens, {} windows of {}; the last {} tokens (less than a window) are not scored", label,
                     n_ids, n, seq_len, rest);
}

std::vector<int32_t> make_window(const std::vector<int32_t>& ids, int32_t bos_id, int seq_len,
                                 WindowProtocol p, int64_t c) {
  const int64_t n = count_windows(static_cast<int64_t>(ids.size()), seq_len, p);
  ANTKV_CHECK(c >= 0 && c < n, "window {} out of range (the text has {} windows of {} tokens)", c, n, seq_len);
  std::vector<int32_t> w;
  w.reserve(static_cast<size_t>(seq_len));
  if (p == WindowProtocol::kBosWindow) {
    ANTKV_CHECK(bos_id >= 0, "the bos_window protocol needs a BOS token, and the tokenizer has none");
    w.push_back(bos_id);
    const int64_t b = 1 + c * (seq_len - 1);
    w.insert(w.end(), ids.begin() + b, ids.begin() + b + (seq_len - 1));
  } else {
    const int64_t b = c * seq_len;
    w.insert(w.end(), ids.begin() + b, ids.begin() + b + seq_len);
  }
  return w;
}

PerplexityResult evaluate_perplexity(Runtime& rt, const std::vector<int32_t>& ids, int32_t bos_id,
                                     const PerplexityOptions& o) {
  check_window_length(rt.config(), o.seq_len, o.seq_len_name);
  PerplexityResult r;
  r.protocol = o.protocol;
  r.seq_len = o.seq_len;
  r.decode_from = o.decode_from;
  r.first_window = o.first_window;
  r.windows_available = count_windows(static_cast<int64_t>(ids.size()), o.seq_len, o.protocol);
  ANTKV_CHECK(r.windows_available > 0, "{}: {} tokens, not enough for one window of {} ({})", o.text_name, ids.size(),
              o.seq_len, o.seq_len_name);
  ANTKV_CHECK(o.first_window >= 0 && o.first_window < r.windows_available,
              "first window {} out of range (the text has {} windows)", o.first_window, r.windows_available);
  ANTKV_CHECK(o.max_windows != 0, "max windows is 0: nothing to evaluate (give at least 1, or leave it out for every "
              "window)");
  const int64_t last = o.max_windows < 0 ? r.windows_available
                                         : std::min(r.windows_available, o.first_window + o.max_windows);
  ANTKV_CHECK(last > o.first_window, "no window to evaluate (max_windows {})", o.max_windows);
  Progress progress(o.progress_label, last - o.first_window, "windows", o.progress);
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<int32_t> targets(static_cast<size_t>(o.seq_len));
  ForwardResult res;
  for (int64_t c = o.first_window; c < last; ++c) {
    check_interrupted();
    const auto w = make_window(ids, bos_id, o.seq_len, o.protocol, c);
    for (int i = 0; i + 1 < o.seq_len; ++i) targets[i] = w[i + 1];
    targets[o.seq_len - 1] = -1;
    rt.reset();
    double nll = 0;
    const int chunk = o.prefill_chunk > 0 ? o.prefill_chunk : o.seq_len;
    int first_bad = -1;  // the first position whose NLL is not finite
    const int prefill_end = o.decode_from > 0 ? std::min(o.decode_from, o.seq_len) : o.seq_len;
    for (int p0 = 0; p0 < o.seq_len;) {
      const int n = p0 < prefill_end ? std::min(chunk, prefill_end - p0) : 1;
      ForwardRequest req;
      req.tokens = w.data() + p0;
      req.n_tokens = n;
      req.logits = LogitsMode::kNone;
      req.targets = targets.data() + p0;
      rt.forward(req, res);
      ANTKV_CHECK(static_cast<int>(res.nll.size()) == n, "window {}: the runtime returned {} NLL values for {} tokens",
                  c, res.nll.size(), n);
      for (int i = 0; i < n && p0 + i + 1 < o.seq_len; ++i) {
        if (first_bad < 0 && !std::isfinite(res.nll[i])) first_bad = p0 + i;
        nll += res.nll[i];
      }
      p0 += n;
    }
    if (!std::isfinite(nll))
      throw NonFinite(fmt::format("window {}: the NLL is not finite ({}; first at position {})", c, nll,
                                  first_bad < 0 ? 0 : first_bad));
    r.nll_per_window.push_back(nll);
    r.nll_total += nll;
    r.windows += 1;
    r.predicted_tokens += o.seq_len - 1;
    progress.advance(1, fmt::format("ppl {:.4f}", std::exp(r.nll_total / r.predicted_tokens)));
  }
  progress.finish(fmt::format("ppl {:.4f}", std::exp(r.nll_total / r.predicted_tokens)));
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  r.ppl = std::exp(r.nll_total / static_cast<double>(r.predicted_tokens));
  r.tokens_per_second = r.seconds > 0 ? static_cast<double>(r.windows) * o.seq_len / r.seconds : 0;
  return r;
}

}  // namespace antkv
