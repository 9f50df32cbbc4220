#include "eval/needle_results.h"

#include <algorithm>
#include <map>
#include <nlohmann/json.hpp>
#include <tuple>

#include "eval/compare.h"
#include "quant/method.h"

namespace antkv {

namespace {

std::string method_label(const MethodSpec& m, const std::string& kv_cache) {
  return kv_cache == "real" ? m.text + " (real)" : m.text;
}

}  // namespace

std::string needle_results_table(const NeedleReport& rep) {
  std::vector<double> depths;
  for (const auto& c : rep.cells)
    if (std::find(depths.begin(), depths.end(), c.depth) == depths.end()) depths.push_back(c.depth);
  std::sort(depths.begin(), depths.end());
  std::string s = fmt::format("{:<40} {:<10} {:>7}", "method", "task", "length");
  for (double d : depths) s += fmt::format(" {:>6}", fmt::format("d{:.2g}", d));
  s += fmt::format(" {:>6} {:>7}\n", "mean", "tokens");
  // rows: (method label, task, length) in the order they come; the cells' accuracy per depth
  std::vector<std::tuple<std::string, int, int>> rows;
  std::map<std::tuple<std::string, int, int>, std::map<double, const NeedleCell*>> at;
  for (const auto& c : rep.cells) {
    const auto key = std::make_tuple(method_label(c.method, c.kv_cache), static_cast<int>(c.task), c.length);
    if (!at.count(key)) rows.push_back(key);
    at[key][c.depth] = &c;
  }
  for (const auto& key : rows) {
    const auto& cells = at[key];
    const NeedleCell* any = cells.begin()->second;
    s += fmt::format("{:<40} {:<10} {:>7}", std::get<0>(key).substr(0, 40), needle_task_name(any->task), any->length);
    double acc = 0, tok = 0;
    int cases = 0;
    for (double d : depths) {
      auto it = cells.find(d);
      if (it == cells.end()) {
        s += fmt::format(" {:>6}", "-");
        continue;
      }
      s += fmt::format(" {:>5.0f}%", 100 * it->second->accuracy);
      acc += it->second->accuracy * it->second->cases;
      tok += it->second->token_share * it->second->cases;
      cases += it->second->cases;
    }
    s += fmt::format(" {:>5.1f}% {:>6.1f}%\n", 100 * acc / cases, 100 * tok / cases);
  }
  if (!rep.cells.empty())
    s += fmt::format("(accuracy: exact match of the expected values over {} case(s) per cell; d<x>: needle depth; "
                     "tokens: share of the answer tokens reproduced; device {})\n", rep.cells[0].cases, rep.device);
  if (!rep.agreement.empty()) {
    s += fmt::format("\ngeneration agreement with fp16: greedy continuation of {} tokens after a {}-token prompt\n",
                     rep.agreement[0].agreement.tokens, rep.agreement[0].prompt_length);
    s += fmt::format("{:<40} {:>16} {:>12}\n", "method", "first divergence", "equal");
    for (const auto& a : rep.agreement)
      s += fmt::format("{:<40} {:>16} {:>11.1f}%\n", method_label(a.method, a.kv_cache).substr(0, 40),
                       a.agreement.first_divergence, 100 * a.agreement.share_equal);
  }
  return s;
}

std::string needle_results_json(const NeedleReport& rep, const Recipe& recipe) {
  using json = nlohmann::json;
  json j = recipe_results_header("antkv-eval needle", recipe, rep.device);
  json rows = json::array();
  for (const auto& c : rep.cells)
    rows.push_back({{"method", c.method.text}, {"kind", c.method.kind_name()}, {"kv_cache", c.kv_cache},
                    {"nominal_bits", c.method.nominal_bits()}, {"task", needle_task_name(c.task)},
                    {"length", c.length}, {"depth", c.depth}, {"cases", c.cases}, {"accuracy", c.accuracy},
                    {"value_share", c.value_share}, {"token_share", c.token_share},
                    {"seconds_per_case", c.seconds_per_case}});
  j["results"] = rows;
  json cases = json::array();
  for (const auto& c : rep.cases)
    cases.push_back({{"method", c.method}, {"task", needle_task_name(c.task)}, {"length", c.length},
                     {"depth", c.depth}, {"index", c.index}, {"exact", c.score.exact},
                     {"value_share", c.score.value_share}, {"token_share", c.score.token_share},
                     {"answer", c.answer}, {"seconds", c.seconds}});
  j["cases"] = cases;
  json agree = json::array();
  for (const auto& a : rep.agreement)
    agree.push_back({{"method", a.method.text}, {"kv_cache", a.kv_cache}, {"prompt_length", a.prompt_length},
                     {"tokens", a.agreement.tokens}, {"first_divergence", a.agreement.first_divergence},
                     {"share_equal", a.agreement.share_equal}, {"continuation", a.continuation}});
  j["agreement"] = agree;
  return j.dump(1);
}

std::string needle_results_csv(const NeedleReport& rep) {
  std::string s = "method,kind,kv_cache,task,length,depth,cases,accuracy,value_share,token_share,seconds_per_case\n";
  for (const auto& c : rep.cells)
    s += fmt::format("\"{}\",{},{},{},{},{},{},{:.6f},{:.6f},{:.6f},{:.4f}\n", c.method.text, c.method.kind_name(),
                     c.kv_cache, needle_task_name(c.task), c.length, c.depth, c.cases, c.accuracy, c.value_share,
                     c.token_share, c.seconds_per_case);
  return s;
}

}  // namespace antkv
