// Long-context retrieval with every method (eval/needle_tasks.h gives the cases): each case runs the method's cache
// as decoding really runs it, the prompt prefilled (in chunks of prefill_chunk tokens past it), then the answer
// decoded greedily one token per forward (so vq/antkv's decode window and decode-time anchors are exercised), on
// whatever runtime the factory makes (CPU cache, GPU simulated quantizer, GPU real compressed cache).
// Scores: exact (every expected value appears in the decoded answer as a whole word), the share of the values found,
// and the share of the expected answer tokens reproduced position by position. Also generation agreement: the
// greedy continuation of N tokens after a long prompt, per method, against fp16's.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "eval/compare.h"
#include "eval/needle_tasks.h"

namespace antkv {

class Tokenizer;

// Greedy decoding: prefill `prompt` (in chunks of prefill_chunk tokens; <= 0: one forward), then n_new tokens, each
// the argmax of the last logits (ties: the lowest id), fed back one per forward. Stops after stop_id (>= 0) is
// produced (it is included). The runtime is reset first. A non-finite logit is an error (NonFinite).
std::vector<int32_t> greedy_generate(Runtime& rt, const std::vector<int32_t>& prompt, int n_new, int prefill_chunk,
                                     int32_t stop_id = -1);

struct NeedleScore {
  bool exact = false;         // every expected value found in the answer text as a whole word
  double value_share = 0;     // expected values found / values
  double token_share = 0;     // expected answer tokens equal at their position in the generated tokens
};
// values: the expected values; answer_ids: their expected tokens; generated / text: what the model produced.
NeedleScore score_needle_answer(const std::vector<std::string>& values, const std::vector<int32_t>& answer_ids,
                                const std::vector<int32_t>& generated, const std::string& text);

struct Agreement {
  int tokens = 0;             // compared
  int first_divergence = 0;   // index of the first differing token (tokens when none differs)
  double share_equal = 0;     // positions with equal tokens / tokens
};
Agreement generation_agreement(const std::vector<int32_t>& reference, const std::vector<int32_t>& generated);

struct NeedleCaseResult {
  std::string method;
  NeedleTask task = NeedleTask::kPasskey;
  int length = 0, index = 0;
  double depth = 0;
  NeedleScore score;
  std::string answer;         // the decoded answer
  double seconds = 0;
};

// One row per method, task, length and depth (the cell's cases averaged).
struct NeedleCell {
  MethodSpec method;
  std::string kv_cache = "simulated";
  NeedleTask task = NeedleTask::kPasskey;
  int length = 0;
  double depth = 0;
  int cases = 0;
  double accuracy = 0, value_share = 0, token_share = 0;
  double seconds_per_case = 0;
};

struct AgreementRow {
  MethodSpec method;
  std::string kv_cache = "simulated";
  int prompt_length = 0;
  Agreement agreement;
  std::string continuation;   // the method's continuation, decoded
};

struct NeedleReport {
  std::vector<NeedleCell> cells;
  std::vector<NeedleCaseResult> cases;
  std::vector<AgreementRow> agreement;  // empty when eval.needle.agreement_tokens is 0
  std::string device;
};

struct NeedleEvalOptions {
  const Recipe* recipe = nullptr;
  std::vector<NeedleCase> cases;           // make_needle_cases
  MethodRuntimeFactory make_runtime;
  std::map<std::string, std::shared_ptr<const CodebookSet>> codebooks;  // load_method_codebooks
  const Tokenizer* tok = nullptr;
  std::string haystack;                    // the agreement prompt's text (needle_haystack_text)
  bool progress = true;
};

// The longest sequence a runtime holds in evaluate_needle (the GPU runtimes' KV capacity).
int needle_max_context(const Recipe& r);

NeedleReport evaluate_needle(const NeedleEvalOptions& o);

}  // namespace antkv
