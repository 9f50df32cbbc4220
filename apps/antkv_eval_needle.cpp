#include "antkv_eval_needle.h"

#include <cstdio>
#include <filesystem>

#include "core/atomic_file.h"
#include "core/error.h"
#include "eval/needle_eval.h"
#include "eval/needle_results.h"
#include "model/checkpoint.h"
#include "tokenizer/tokenizer.h"

namespace fs = std::filesystem;

namespace antkv {

NeedlePlan plan_needle(const Recipe& r, const Checkpoint& ckpt, const Tokenizer& tok) {
  const NeedleSettings s = needle_settings(r);
  check_needle_settings(s, ckpt.config());
  NeedlePlan p;
  p.haystack = needle_haystack_text(r);
  p.cases = make_needle_cases(s, tok, p.haystack);
  for (const auto& c : p.cases) check_token_ids(c.prompt_ids, ckpt, "the needle prompts (eval.needle)");
  return p;
}

std::string needle_results_dir(const Recipe& r) { return (fs::path(r.out_dir) / "needle").string(); }

void run_needle(const NeedlePlan& plan, const Recipe& r, const Checkpoint& ckpt, const Tokenizer& tok,
                const MethodRuntimeFactory& make_runtime, bool progress) {
  std::vector<MethodSpec> methods;
  for (const auto& s : r.eval.methods) methods.push_back(parse_method(s, r));
  NeedleEvalOptions o;
  o.recipe = &r;
  o.cases = plan.cases;
  o.make_runtime = make_runtime;
  o.codebooks = load_method_codebooks(methods, (fs::path(r.out_dir) / "codebooks").string(), &ckpt);
  o.tok = &tok;
  o.haystack = plan.haystack;
  o.progress = progress;
  if (progress)
    std::fprintf(stderr, "needle: %zu cases x %zu methods (eval.needle: %zu tasks, %zu lengths, %zu depths, %d per cell)\n",
                 plan.cases.size(), methods.size(), r.eval.needle.tasks.size(), r.eval.needle.lengths.size(),
                 r.eval.needle.depths.size(), r.eval.needle.cases);
  const NeedleReport rep = evaluate_needle(o);
  const std::string dir = needle_results_dir(r);
  fs::create_directories(dir);
  const std::string table = needle_results_table(rep);
  // all three complete before any gets its final name
  AtomicFile json_file((fs::path(dir) / "results.json").string()), csv((fs::path(dir) / "results.csv").string()),
      txt((fs::path(dir) / "results.txt").string());
  json_file.write(needle_results_json(rep, r) + "\n");
  csv.write(needle_results_csv(rep));
  txt.write(table);
  json_file.commit();
  csv.commit();
  txt.commit();
  std::printf("%sneedle results: %s/results.{json,csv,txt}\n", table.c_str(), dir.c_str());
  std::printf("heatmaps: /usr/bin/python3 scripts/plot_needle.py %s/results.json  (writes %s/heatmap-*.png)\n",
              dir.c_str(), dir.c_str());
}

}  // namespace antkv
