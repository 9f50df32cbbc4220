// Synthetic long-context retrieval cases (needle in a haystack), generated from a seed in the spirit of RULER's
// NIAH family: passkey (a number in filler), single (one keyed needle, number or UUID-like value), multikey
// (distractor needles with other keys), multivalue (several values under the asked key, all asked) and multiquery
// (several keys asked at once). Prompts are plain text assembled from token pieces, so that the needle's token
// position is exact:
//   [BOS when the tokenizer adds one] intro  document  question
// where the document is the haystack (a repeated filler text, or the recipe's eval texts from a seeded offset)
// with the needles inserted: first every needle that is not the asked one at seeded random token positions,
// then the asked needle at token round(depth * document tokens so far) of that document (depth 0: right after
// the intro, 1: right before the question). A case's context length is its prompt plus the answer budget (the
// greedy tokens decoded), so a length of max_position_embeddings fits the model.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "model/model_config.h"
#include "recipe/recipe.h"

namespace antkv {

class Tokenizer;

enum class NeedleTask { kPasskey, kSingle, kMultiKey, kMultiValue, kMultiQuery };
NeedleTask parse_needle_task(const std::string& s);  // passkey | single | multikey | multivalue | multiquery
const char* needle_task_name(NeedleTask t);

struct NeedleSettings {
  std::vector<NeedleTask> tasks;
  std::vector<int> lengths;        // context lengths (prompt + answer budget)
  std::vector<double> depths;      // fractions in [0, 1]
  uint64_t seed = 0;
  int cases = 1;                   // per task, length and depth
  bool uuid_values = false;        // single/multi* values: UUID-like (8-4-4-4-12 hex) instead of numbers
  int digits = 5;                  // digits of number values and passkeys
  int answer_budget = 16;          // greedy tokens decoded per case
  int distractors = 3, values = 2, queries = 2;
  int agreement_tokens = 0, agreement_length = 0;  // generation agreement (eval/needle_eval.h); 0 tokens: off
  std::string source = "recipe";   // named in errors (the recipe file)
};
// From the recipe's eval.needle block.
NeedleSettings needle_settings(const Recipe& r);

// The checks that need the model but no tokenization: every depth in [0, 1], every length above the answer budget
// and at most max_position_embeddings (and a sliding window), the agreement context likewise. One-line errors naming
// the recipe key.
void check_needle_settings(const NeedleSettings& s, const ModelConfig& cfg);

// The haystack text: the filler (haystack: filler) or the eval texts joined by blank lines (haystack: texts).
std::string needle_filler_text();
std::string needle_haystack_text(const Recipe& r);

struct NeedleCase {
  NeedleTask task = NeedleTask::kPasskey;
  int length = 0;                   // context length (prompt + answer budget)
  double depth = 0;
  int index = 0;                    // case within its (task, length, depth) cell
  std::vector<int32_t> prompt_ids;  // length - answer_budget tokens
  std::vector<std::string> values;  // the expected values (several for multivalue / multiquery)
  std::string expected;             // the values joined by ", ": the answer the prompt asks for
  std::vector<int32_t> answer_ids;  // the expected answer's tokens as the prompt's continuation
  int needle_position = 0;          // token index in prompt_ids where the asked needle starts
  int document_begin = 0, document_end = 0;  // the document (haystack and every needle) is prompt_ids[begin, end)
  std::vector<int32_t> needle_ids;  // the asked needle's tokens (prompt_ids[needle_position ...])
};

// Every case of the settings (task-major, then length, depth, case), deterministic per seed: a case depends only on
// the seed, its task, length, depth and index. Errors (one line, before any model work): a length too short for
// the intro, needles and question; an expected answer longer than the answer budget; an empty haystack.
std::vector<NeedleCase> make_needle_cases(const NeedleSettings& s, const Tokenizer& tok, const std::string& haystack);

}  // namespace antkv
