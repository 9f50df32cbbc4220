// The outputs of the needle evaluation (eval/needle_eval.h): the table printed on stdout (per method, task and
// length: the accuracy at each depth), results.json (every cell, every case's answer, the generation agreement)
// and results.csv (one row per method, task, length and depth, with its accuracy).
#pragma once
#include <string>

#include "eval/needle_eval.h"

namespace antkv {

std::string needle_results_table(const NeedleReport& rep);
std::string needle_results_json(const NeedleReport& rep, const Recipe& recipe);
std::string needle_results_csv(const NeedleReport& rep);

}  // namespace antkv
