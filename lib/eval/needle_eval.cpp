#include "eval/needle_eval.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <map>
#include <tuple>

#include "core/error.h"
#include "core/interrupt.h"
#include "core/progress.h"
#include "quant/method_support.h"
#include "tokenizer/tokenizer.h"

namespace antkv {

namespace {

int32_t argmax_checked(const std::vector<float>& logits, int step) {
  ANTKV_CHECK(!logits.empty(), "greedy decoding: the runtime returned no logits");
  int32_t best = 0;
  for (size_t i = 0; i < logits.size(); ++i) {
    if (!std::isfinite(logits[i]))
      throw NonFinite(fmt::format("greedy decoding, step {}: logit {} is not finite ({})", step, i, logits[i]));
    if (logits[i] > logits[static_cast<size_t>(best)]) best = static_cast<int32_t>(i);
  }
  return best;
}

bool is_word_char(char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_'; }

// `value` occurs in `text` with no letter, digit, '-' or '_' right before or after it.
bool contains_word(const std::string& text, const std::string& value) {
  if (value.empty()) return false;
  for (size_t p = text.find(value); p != std::string::npos; p = text.find(value, p + 1)) {
    const bool left = p == 0 || !is_word_char(text[p - 1]);
    const size_t e = p + value.size();
    // a sentence's final '.' or ',' ends the value; "-" continuing a UUID does not
    const bool right = e == text.size() || !is_word_char(text[e]);
    if (left && right) return true;
  }
  return false;
}

}  // namespace

std::vector<int32_t> greedy_generate(Runtime& rt, const std::vector<int32_t>& prompt, int n_new, int prefill_chunk,
                                     int32_t stop_id) {
  ANTKV_CHECK(!prompt.empty(), "greedy decoding: empty prompt");
  ANTKV_CHECK(n_new >= 1, "greedy decoding: {} new tokens asked", n_new);
  rt.reset();
  const int n = static_cast<int>(prompt.size());
  const int chunk = prefill_chunk > 0 ? prefill_chunk : n;
  ForwardResult res;
  for (int p0 = 0; p0 < n; p0 += chunk) {
    check_interrupted();
    ForwardRequest req;
    req.tokens = prompt.data() + p0;
    req.n_tokens = std::min(chunk, n - p0);
    req.logits = p0 + req.n_tokens == n ? LogitsMode::kLast : LogitsMode::kNone;
    rt.forward(req, res);
  }
  std::vector<int32_t> out;
  out.push_back(argmax_checked(res.logits, 0));
  while (static_cast<int>(out.size()) < n_new && !(stop_id >= 0 && out.back() == stop_id)) {
    check_interrupted();
    ForwardRequest req;
    req.tokens = &out.back();
    req.n_tokens = 1;
    req.logits = LogitsMode::kLast;
    rt.forward(req, res);
    out.push_back(argmax_checked(res.logits, static_cast<int>(out.size())));
  }
  return out;
}

NeedleScore score_needle_answer(const std::vector<std::string>& values, const std::vector<int32_t>& answer_ids,
                                const std::vector<int32_t>& generated, const std::string& text) {
  NeedleScore s;
  int found = 0;
  for (const auto& v : values) found += contains_word(text, v) ? 1 : 0;
  s.value_share = values.empty() ? 0 : static_cast<double>(found) / static_cast<double>(values.size());
  s.exact = !values.empty() && found == static_cast<int>(values.size());
  int equal = 0;
  for (size_t i = 0; i < answer_ids.size() && i < generated.size(); ++i) equal += answer_ids[i] == generated[i] ? 1 : 0;
  s.token_share = answer_ids.empty() ? 0 : static_cast<double>(equal) / static_cast<double>(answer_ids.size());
  return s;
}

Agreement generation_agreement(const std::vector<int32_t>& reference, const std::vector<int32_t>& generated) {
  Agreement a;
  a.tokens = static_cast<int>(reference.size());
  a.first_divergence = a.tokens;
  int equal = 0;
  for (int i = 0; i < a.tokens; ++i) {
    const bool same = i < static_cast<int>(generated.size()) && generated[static_cast<size_t>(i)] == reference[static_cast<size_t>(i)];
    equal += same ? 1 : 0;
    if (!same && a.first_divergence == a.tokens) a.first_divergence = i;
  }
  a.share_equal = a.tokens ? static_cast<double>(equal) / a.tokens : 0;
  return a;
}

int needle_max_context(const Recipe& r) {
  const auto& n = r.eval.needle;
  int m = *std::max_element(n.lengths.begin(), n.lengths.end());
  if (n.agreement_tokens > 0) m = std::max(m, n.agreement_length > 0 ? n.agreement_length : m);
  return m;
}

namespace {

// The agreement prompt: BOS (when the tokenizer adds one) and the haystack's first tokens (repeated when short),
// length - tokens long.
std::vector<int32_t> agreement_prompt(const Tokenizer& tok, const std::string& haystack, int prompt_len) {
  std::vector<int32_t> ids = tok.encode(haystack, true);
  ANTKV_CHECK(!ids.empty(), "generation agreement: the haystack text is empty");
  const size_t specials = ids.size() > 1 && tok.bos_id() >= 0 && ids[0] == tok.bos_id() ? 1 : 0;
  std::vector<int32_t> p(ids.begin(), ids.begin() + static_cast<long>(specials));
  const size_t body = ids.size() - specials;
  ANTKV_CHECK(body > 0, "generation agreement: the haystack text has no tokens");
  for (size_t i = 0; static_cast<int>(p.size()) < prompt_len; ++i) p.push_back(ids[specials + i % body]);
  return p;
}

}  // namespace

NeedleReport evaluate_needle(const NeedleEvalOptions& o) {
  ANTKV_CHECK(o.recipe && o.make_runtime && o.tok, "evaluate_needle: recipe, runtime factory and tokenizer needed");
  const Recipe& r = *o.recipe;
  const auto& nd = r.eval.needle;
  std::vector<MethodSpec> methods;
  for (const auto& s : r.eval.methods) methods.push_back(parse_method(s, r));
  const int32_t eos = o.tok->eos_id();
  NeedleReport rep;
  const int64_t total = static_cast<int64_t>(methods.size() * o.cases.size());
  Progress progress("needle", total, "cases", o.progress);
  int64_t correct = 0, done = 0;
  auto runtime_for = [&](const MethodSpec& m) {
    std::shared_ptr<const CodebookSet> cb;
    if (m.needs_codebooks()) {
      auto it = o.codebooks.find(m.codebook_key());
      ANTKV_CHECK(it != o.codebooks.end(), "method {}: its codebooks were not loaded", m.text);
      cb = it->second;
    }
    return o.make_runtime(m, cb);
  };
  // the path each method runs (the packed uniform cache and the compressed vq/antkv cache under eval.kv_cache: real);
  // the real caches take one prefill chunk into an empty sequence (kernels/runtime/gpu_runtime.h)
  auto kv_cache_of = [&](const MethodSpec& m) { return eval_kv_cache(m, r.eval.device, r.eval.kv_cache); };
  auto chunk_of = [&](const MethodSpec& m) { return kv_cache_of(m) == "real" ? 0 : nd.prefill_chunk; };

  for (const auto& m : methods) {
    auto rt = runtime_for(m);
    if (rep.device.empty()) rep.device = rt->device_name();
    // (task, length, depth) -> cases of this method, in the order the cases come
    std::vector<NeedleCaseResult> mine;
    for (const auto& c : o.cases) {
      const auto t0 = std::chrono::steady_clock::now();
      const auto gen = greedy_generate(*rt, c.prompt_ids, nd.answer_budget, chunk_of(m), eos);
      NeedleCaseResult cr;
      cr.method = m.text;
      cr.task = c.task;
      cr.length = c.length;
      cr.depth = c.depth;
      cr.index = c.index;
      cr.answer = o.tok->decode(gen, /*skip_special=*/true);
      cr.score = score_needle_answer(c.values, c.answer_ids, gen, cr.answer);
      cr.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      correct += cr.score.exact ? 1 : 0;
      ++done;
      progress.advance(1, fmt::format("{}  accuracy so far {:.1f}%", m.text, 100.0 * correct / done));
      mine.push_back(cr);
    }
    // cells in the order of first appearance
    std::vector<std::tuple<int, int, double>> order;
    std::map<std::tuple<int, int, double>, NeedleCell> cells;
    for (const auto& cr : mine) {
      const auto key = std::make_tuple(static_cast<int>(cr.task), cr.length, cr.depth);
      auto it = cells.find(key);
      if (it == cells.end()) {
        order.push_back(key);
        NeedleCell cell;
        cell.method = m;
        cell.kv_cache = kv_cache_of(m);
        cell.task = cr.task;
        cell.length = cr.length;
        cell.depth = cr.depth;
        it = cells.emplace(key, cell).first;
      }
      NeedleCell& cell = it->second;
      cell.cases += 1;
      cell.accuracy += cr.score.exact ? 1 : 0;
      cell.value_share += cr.score.value_share;
      cell.token_share += cr.score.token_share;
      cell.seconds_per_case += cr.seconds;
    }
    for (const auto& key : order) {
      NeedleCell cell = cells.at(key);
      cell.accuracy /= cell.cases;
      cell.value_share /= cell.cases;
      cell.token_share /= cell.cases;
      cell.seconds_per_case /= cell.cases;
      rep.cells.push_back(cell);
    }
    rep.cases.insert(rep.cases.end(), mine.begin(), mine.end());
  }
  progress.finish(fmt::format("accuracy {:.1f}%", total ? 100.0 * correct / total : 0.0));

  if (nd.agreement_tokens > 0) {
    const int len = needle_max_context(r);
    const int prompt_len = len - nd.agreement_tokens;
    ANTKV_CHECK(prompt_len >= 1, "{}: eval.needle.agreement_tokens {} leaves no prompt in a context of {}",
                r.source.empty() ? "recipe" : r.source, nd.agreement_tokens, len);
    const auto prompt = agreement_prompt(*o.tok, o.haystack, prompt_len);
    // fp16's continuation is the reference, whether or not fp16 is among the methods
    std::vector<int32_t> reference;
    Progress ap("agreement", static_cast<int64_t>(methods.size()) + 1, "methods", o.progress);
    {
      auto rt = runtime_for(parse_method("fp16", r));
      reference = greedy_generate(*rt, prompt, nd.agreement_tokens, nd.prefill_chunk);
      ap.advance(1, "fp16");
    }
    for (const auto& m : methods) {
      auto rt = runtime_for(m);
      const auto gen = m.kind == MethodKind::kFp16 ? reference
                                                   : greedy_generate(*rt, prompt, nd.agreement_tokens, chunk_of(m));
      AgreementRow row;
      row.method = m;
      row.kv_cache = kv_cache_of(m);
      row.prompt_length = prompt_len;
      row.agreement = generation_agreement(reference, gen);
      row.continuation = o.tok->decode(gen, true);
      rep.agreement.push_back(row);
      ap.advance(1, m.text);
    }
    ap.finish();
  }
  return rep;
}

}  // namespace antkv
