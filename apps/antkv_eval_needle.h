// `antkv-eval needle` and the needle task of `antkv-eval run` (eval.tasks: [.., needle]): the glue between the
// recipe, the checkpoint, the methods' runtimes and the outputs in <out_dir>/needle (eval/needle_eval.h).
#pragma once
#include <string>
#include <vector>

#include "eval/compare.h"
#include "eval/needle_tasks.h"

namespace antkv {

// What is decided before any work: the settings checked against the model and every case generated (a bad setting
// is a one-line error here, before calibration, codebooks or runtimes).
struct NeedlePlan {
  std::vector<NeedleCase> cases;
  std::string haystack;
};
NeedlePlan plan_needle(const Recipe& r, const Checkpoint& ckpt, const Tokenizer& tok);

// The results folder of the needle task (<out_dir>/needle).
std::string needle_results_dir(const Recipe& r);

// Runs every case with every method (codebooks from <out_dir>/codebooks) and writes results.{json,csv,txt} to
// needle_results_dir; prints the table and the heatmap command.
void run_needle(const NeedlePlan& plan, const Recipe& r, const Checkpoint& ckpt, const Tokenizer& tok,
                const MethodRuntimeFactory& make_runtime, bool progress);

}  // namespace antkv
