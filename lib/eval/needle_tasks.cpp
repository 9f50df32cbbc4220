#include "eval/needle_tasks.h"

#include <algorithm>
#include <cmath>
#include <filesystem>

#include "core/error.h"
#include "core/text_file.h"
#include "tokenizer/tokenizer.h"

namespace fs = std::filesystem;

namespace antkv {

NeedleTask parse_needle_task(const std::string& s) {
  if (s == "passkey") return NeedleTask::kPasskey;
  if (s == "single") return NeedleTask::kSingle;
  if (s == "multikey") return NeedleTask::kMultiKey;
  if (s == "multivalue") return NeedleTask::kMultiValue;
  if (s == "multiquery") return NeedleTask::kMultiQuery;
  fail("unknown needle task \"{}\" (expected passkey, single, multikey, multivalue or multiquery)", s);
}

const char* needle_task_name(NeedleTask t) {
  switch (t) {
    case NeedleTask::kPasskey: return "passkey";
    case NeedleTask::kSingle: return "single";
    case NeedleTask::kMultiKey: return "multikey";
    case NeedleTask::kMultiValue: return "multivalue";
    case NeedleTask::kMultiQuery: return "multiquery";
  }
  return "?";
}

NeedleSettings needle_settings(const Recipe& r) {
  const auto& n = r.eval.needle;
  NeedleSettings s;
  for (const auto& t : n.tasks) s.tasks.push_back(parse_needle_task(t));
  s.lengths = n.lengths;
  s.depths = n.depths;
  s.seed = n.seed;
  s.cases = n.cases;
  s.uuid_values = n.value == "uuid";
  s.digits = n.digits;
  s.answer_budget = n.answer_budget;
  s.distractors = n.distractors;
  s.values = n.values;
  s.queries = n.queries;
  s.agreement_tokens = n.agreement_tokens;
  s.agreement_length = n.agreement_length;
  s.source = r.source.empty() ? "recipe" : r.source;
  return s;
}

void check_needle_settings(const NeedleSettings& s, const ModelConfig& cfg) {
  ANTKV_CHECK(!s.tasks.empty() && !s.lengths.empty() && !s.depths.empty() && s.cases >= 1,
              "{}: eval.needle needs at least one task, length, depth and case", s.source);
  for (double d : s.depths)
    ANTKV_CHECK(d >= 0 && d <= 1, "{}: key \"eval.needle.depths\": depth {} is outside [0, 1]", s.source, d);
  ANTKV_CHECK(s.answer_budget >= 1, "{}: key \"eval.needle.answer_budget\" must be at least 1", s.source);
  for (int len : s.lengths) {
    ANTKV_CHECK(len > s.answer_budget, "{}: key \"eval.needle.lengths\": length {} leaves no prompt after the answer "
                "budget of {} tokens (eval.needle.answer_budget)", s.source, len, s.answer_budget);
    check_window_length(cfg, len, fmt::format("{}: key \"eval.needle.lengths\": length", s.source));
  }
  if (s.agreement_tokens > 0) {
    const int len = s.agreement_length > 0 ? s.agreement_length : *std::max_element(s.lengths.begin(), s.lengths.end());
    ANTKV_CHECK(len > s.agreement_tokens, "{}: key \"eval.needle.agreement_tokens\" = {} leaves no prompt in the "
                "agreement context of {} tokens (eval.needle.agreement_length)", s.source, s.agreement_tokens, len);
    check_window_length(cfg, len, fmt::format("{}: key \"eval.needle.agreement_length\": length", s.source));
  }
}

std::string needle_filler_text() {
  return "The river runs past the old mill and the fields are green. The hills are quiet in the evening. "
         "A small boat rests by the shore. Here we go again, there and back. ";
}

std::string needle_haystack_text(const Recipe& r) {
  const auto& n = r.eval.needle;
  if (n.haystack == "filler") return needle_filler_text();
  const std::string src = r.source.empty() ? "recipe" : r.source;
  ANTKV_CHECK(!r.eval.texts.empty(), "{}: eval.needle.haystack is texts, but eval.texts lists no text", src);
  std::string all;
  for (const auto& t : r.eval.texts) {
    ANTKV_CHECK(fs::is_regular_file(t), "{}: evaluation text not found (eval.texts, the needle haystack)", t);
    if (!all.empty()) all += "\n\n";
    all += read_text_file(t);
  }
  return all;
}

namespace {

// SplitMix64: the same numbers on every platform (std distributions are implementation-defined).
class CaseRng {
 public:
  explicit CaseRng(uint64_t seed) : s_(seed) {}
  uint64_t next() {
    uint64_t z = (s_ += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }
  uint64_t below(uint64_t n) { return n == 0 ? 0 : next() % n; }

 private:
  uint64_t s_;
};

uint64_t mix(uint64_t h, uint64_t v) {
  CaseRng r(h ^ (v + 0x632be59bd9b4e019ULL + (h << 6) + (h >> 2)));
  return r.next();
}

// Keys of keyed needles: an adjective and a noun (distinct within a case).
const char* const kAdjectives[] = {"amber",  "brave",  "calm",   "dusty",  "eager", "faint",  "gentle", "hollow",
                                   "icy",    "jolly",  "keen",   "lively", "misty", "noble",  "olive",  "proud",
                                   "quiet",  "rapid",  "silver", "tidy",   "urban", "vivid",  "wild",   "young"};
const char* const kNouns[] = {"anchor", "badger", "candle", "desert", "engine", "falcon", "garden", "harbor",
                              "island", "jacket", "kettle", "lantern", "meadow", "needle", "orchard", "pepper",
                              "quarry", "ribbon", "saddle", "tunnel", "violin", "walnut", "yarrow", "zephyr"};

std::string make_key(CaseRng& rng) {
  return fmt::format("{}-{}", kAdjectives[rng.below(std::size(kAdjectives))], kNouns[rng.below(std::size(kNouns))]);
}

std::string make_number(CaseRng& rng, int digits) {
  std::string s(1, static_cast<char>('1' + rng.below(9)));
  for (int i = 1; i < digits; ++i) s += static_cast<char>('0' + rng.below(10));
  return s;
}

std::string make_uuid(CaseRng& rng) {
  static const char* hex = "0123456789abcdef";
  std::string s;
  for (int part : {8, 4, 4, 4, 12}) {
    if (!s.empty()) s += '-';
    for (int i = 0; i < part; ++i) s += hex[rng.below(16)];
  }
  return s;
}

std::string join(const std::vector<std::string>& v, const std::string& sep) {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) s += (i ? sep : "") + v[i];
  return s;
}

// The text pieces of one case: the needles (the asked one first), the question, the values.
struct CaseText {
  std::string intro, question;
  std::vector<std::string> needles;  // needles[0] is placed at the depth; the rest at random positions
  std::vector<std::string> values;
};

CaseText case_text(NeedleTask task, const NeedleSettings& s, CaseRng& rng) {
  CaseText c;
  auto value = [&]() { return s.uuid_values ? make_uuid(rng) : make_number(rng, s.digits); };
  auto keyed = [](const std::string& key, const std::string& v) {
    return fmt::format(" One of the special magic numbers for {} is: {}. ", key, v);
  };
  // distinct keys for one case
  std::vector<std::string> keys;
  auto new_key = [&]() {
    for (int tries = 0;; ++tries) {
      std::string k = make_key(rng);
      if (std::find(keys.begin(), keys.end(), k) == keys.end() || tries > 1000) {
        keys.push_back(k);
        return k;
      }
    }
  };
  switch (task) {
    case NeedleTask::kPasskey: {
      const std::string v = make_number(rng, s.digits);
      c.intro = "There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
                "I will quiz you about the pass key.\n";
      c.needles = {fmt::format(" The pass key is {}. Remember it. {} is the pass key. ", v, v)};
      c.question = "\nWhat is the pass key? The pass key is";
      c.values = {v};
      break;
    }
    case NeedleTask::kSingle:
    case NeedleTask::kMultiKey: {
      const std::string key = new_key(), v = value();
      c.needles = {keyed(key, v)};
      if (task == NeedleTask::kMultiKey)
        for (int i = 0; i < s.distractors; ++i) c.needles.push_back(keyed(new_key(), value()));
      c.question = fmt::format("\nWhat is the special magic number for {} mentioned in the provided text? The special "
                               "magic number for {} mentioned in the provided text is", key, key);
      c.values = {v};
      break;
    }
    case NeedleTask::kMultiValue: {
      const std::string key = new_key();
      for (int i = 0; i < s.values; ++i) {
        c.values.push_back(value());
        c.needles.push_back(keyed(key, c.values.back()));
      }
      c.question = fmt::format("\nWhat are all the special magic numbers for {} mentioned in the provided text? The "
                               "special magic numbers for {} mentioned in the provided text are", key, key);
      break;
    }
    case NeedleTask::kMultiQuery: {
      std::vector<std::string> asked;
      for (int i = 0; i < s.queries; ++i) {
        asked.push_back(new_key());
        c.values.push_back(value());
        c.needles.push_back(keyed(asked.back(), c.values.back()));
      }
      const std::string list = join(asked, ", ");
      c.question = fmt::format("\nWhat are the special magic numbers for {} mentioned in the provided text? The "
                               "special magic numbers for {} mentioned in the provided text are", list, list);
      break;
    }
  }
  if (c.intro.empty())
    c.intro = "Some special magic numbers are hidden within the following text. Make sure to memorize them. I will "
              "quiz you about the numbers afterwards.\n";
  return c;
}

}  // namespace

std::vector<NeedleCase> make_needle_cases(const NeedleSettings& s, const Tokenizer& tok, const std::string& haystack) {
  const std::vector<int32_t> hay = tok.encode(haystack, /*add_special=*/false);
  ANTKV_CHECK(!hay.empty(), "{}: the needle haystack is empty (eval.needle.haystack)", s.source);
  // the model's BOS handling: the prefix the tokenizer's post-processor puts before a text
  std::vector<int32_t> prefix;
  if (tok.bos_id() >= 0) {
    const auto probe = tok.encode("x", true);
    if (!probe.empty() && probe[0] == tok.bos_id()) prefix.push_back(tok.bos_id());
  }
  std::vector<NeedleCase> out;
  for (size_t ti = 0; ti < s.tasks.size(); ++ti)
    for (size_t li = 0; li < s.lengths.size(); ++li)
      for (size_t di = 0; di < s.depths.size(); ++di)
        for (int ci = 0; ci < s.cases; ++ci) {
          const NeedleTask task = s.tasks[ti];
          const int length = s.lengths[li];
          const double depth = s.depths[di];
          // a case depends on the seed and its own coordinates only (not on which other cells are listed)
          uint64_t h = mix(s.seed, static_cast<uint64_t>(task));
          h = mix(h, static_cast<uint64_t>(length));
          h = mix(h, static_cast<uint64_t>(std::llround(depth * 1e6)));
          h = mix(h, static_cast<uint64_t>(ci));
          CaseRng rng(h);
          const CaseText ct = case_text(task, s, rng);
          NeedleCase c;
          c.task = task;
          c.length = length;
          c.depth = depth;
          c.index = ci;
          c.values = ct.values;
          c.expected = join(ct.values, ", ");
          // the answer as the question's continuation (a tokenizer may merge the space into the first digit)
          const auto q_ids = tok.encode(ct.question, false);
          const auto qa_ids = tok.encode(ct.question + " " + c.expected, false);
          if (qa_ids.size() > q_ids.size() && std::equal(q_ids.begin(), q_ids.end(), qa_ids.begin()))
            c.answer_ids.assign(qa_ids.begin() + static_cast<long>(q_ids.size()), qa_ids.end());
          else
            c.answer_ids = tok.encode(" " + c.expected, false);
          ANTKV_CHECK(static_cast<int>(c.answer_ids.size()) <= s.answer_budget,
                      "{}: key \"eval.needle.answer_budget\" = {} is shorter than the {} answer \"{}\" ({} tokens); give "
                      "at least {}", s.source, s.answer_budget, needle_task_name(task), c.expected, c.answer_ids.size(),
                      c.answer_ids.size());
          const auto intro = tok.encode(ct.intro, false);
          std::vector<std::vector<int32_t>> needles;
          size_t needle_tokens = 0;
          for (const auto& n : ct.needles) {
            needles.push_back(tok.encode(n, false));
            needle_tokens += needles.back().size();
          }
          const int64_t prompt_len = length - s.answer_budget;
          const int64_t fixed = static_cast<int64_t>(prefix.size() + intro.size() + q_ids.size() + needle_tokens);
          ANTKV_CHECK(prompt_len >= fixed, "{}: key \"eval.needle.lengths\": length {} is too short for task {}: its "
                      "intro, needles and question take {} tokens and the answer budget {}; give at least {}",
                      s.source, length, needle_task_name(task), fixed, s.answer_budget, fixed + s.answer_budget);
          const int64_t hay_len = prompt_len - fixed;
          // haystack tokens from a seeded offset, wrapping around
          std::vector<int32_t> doc;
          doc.reserve(static_cast<size_t>(prompt_len));
          const uint64_t off = rng.below(hay.size());
          for (int64_t i = 0; i < hay_len; ++i) doc.push_back(hay[(off + static_cast<uint64_t>(i)) % hay.size()]);
          // the asked needle goes at token `at` of the document of the haystack and the other needles
          const int64_t others = static_cast<int64_t>(needle_tokens - needles[0].size());
          const auto at = static_cast<int64_t>(std::llround(depth * static_cast<double>(hay_len + others)));
          // the other needles at random haystack positions, none of them across `at` (drawn again when one is)
          std::vector<int64_t> where(needles.size(), 0);  // haystack tokens before needle k (k >= 1)
          auto straddles = [&]() {
            std::vector<size_t> order(needles.size() - 1);
            for (size_t k = 0; k < order.size(); ++k) order[k] = k + 1;
            std::stable_sort(order.begin(), order.end(), [&](size_t x, size_t y) { return where[x] < where[y]; });
            int64_t before = 0;  // needle tokens before the current one
            for (size_t k : order) {
              const int64_t start = where[k] + before, len = static_cast<int64_t>(needles[k].size());
              if (start < at && at < start + len) return true;
              before += len;
            }
            return false;
          };
          bool placed = false;
          for (int attempt = 0; attempt < 64 && !placed; ++attempt) {
            for (size_t k = 1; k < needles.size(); ++k) where[k] = static_cast<int64_t>(rng.below(hay_len + 1));
            placed = !straddles();
          }
          // a haystack hardly longer than the needles: all of them after `at` (or before it)
          for (int64_t w : {hay_len, int64_t{0}})
            if (!placed) {
              for (size_t k = 1; k < needles.size(); ++k) where[k] = w;
              placed = !straddles();
            }
          ANTKV_CHECK(placed, "{}: key \"eval.needle.lengths\": length {} leaves too little haystack for the {} "
                      "needles of task {}", s.source, length, needles.size(), needle_task_name(task));
          // inserted from the last haystack position to the first, so that earlier positions stay valid
          std::vector<size_t> order(needles.size() - 1);
          for (size_t k = 0; k < order.size(); ++k) order[k] = k + 1;
          std::stable_sort(order.begin(), order.end(), [&](size_t x, size_t y) { return where[x] > where[y]; });
          for (size_t k : order) doc.insert(doc.begin() + where[k], needles[k].begin(), needles[k].end());
          doc.insert(doc.begin() + at, needles[0].begin(), needles[0].end());
          c.prompt_ids = prefix;
          c.prompt_ids.insert(c.prompt_ids.end(), intro.begin(), intro.end());
          c.document_begin = static_cast<int>(c.prompt_ids.size());
          c.needle_position = static_cast<int>(c.prompt_ids.size() + at);
          c.prompt_ids.insert(c.prompt_ids.end(), doc.begin(), doc.end());
          c.document_end = static_cast<int>(c.prompt_ids.size());
          c.prompt_ids.insert(c.prompt_ids.end(), q_ids.begin(), q_ids.end());
          c.needle_ids = needles[0];
          ANTKV_CHECK(static_cast<int64_t>(c.prompt_ids.size()) == prompt_len, "needle case: prompt of {} tokens, "
                      "expected {}", c.prompt_ids.size(), prompt_len);
          out.push_back(std::move(c));
        }
  return out;
}

}  // namespace antkv
