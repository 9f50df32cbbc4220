// antkv-train-codebook's pipeline: for every layer, KV head and channel group, a codebook of 2^b
// centroids in R^c for keys and for values (design note §3-4), trained by weighted k-means on a
// calibration dump: keys weighted by S_K, values by S_V (each normalized to mean 1 per layer and head),
// anchor tokens (top ratio of each window by anchor score, and position 0) left out when asked.
#pragma once
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "io/codebooks.h"
#include "kmeans/kmeans.h"
#include "recipe/recipe.h"

namespace antkv {

using KMeansFactory = std::function<std::unique_ptr<KMeansTrainer>(const KMeansParams&)>;

struct QuantErrorReport {
  double mse = 0;            // mean over held-out tokens and heads of |x - x_hat|^2 / d
  double relative = 0;       // sum |x - x_hat|^2 / sum |x|^2
  double weighted_relative = 0;  // the same weighted by the sensitivities S_K (keys) or S_V (values)
  int64_t tokens = 0;
};

struct LayerTrainReport {
  QuantErrorReport keys, values;
  double seconds = 0;
};

struct TrainCodebooksOptions {
  const Recipe* recipe = nullptr;
  std::string calib_path;
  std::string expected_config_hash;  // the recipe model's; a dump of another model is an error
  KMeansFactory make_trainer;        // default: make_kmeans_cpu
  std::string trainer_name = "faiss-cpu";
  std::string version;
  std::string fingerprint;           // stored in /meta
  bool progress = true;
};

struct TrainCodebooksResult {
  CodebookSet codebooks;
  std::vector<LayerTrainReport> layers;
  double seconds = 0;
  // where the time went: reading the dump (on a prefetch thread, overlapped with training; wait_read is
  // what the training thread waited for it), gathering/converting the batches and choosing rows, the
  // k-means (upload, train, download), the held-out error
  double read_seconds = 0, wait_read_seconds = 0, prepare_seconds = 0, kmeans_seconds = 0, heldout_seconds = 0;
  int64_t calibration_tokens = 0;
};

TrainCodebooksResult train_codebooks(const TrainCodebooksOptions& opts);

class CalibDumpReader;
// metric=task (quant/method.h): the full d x d metric of each KV head of one layer, [kv_heads, d, d] (double) in the
// original basis: keys the dump's query_moment (pre-RoPE dumps: the rotation-invariant pair-averaged diagonal),
// values its oproj_gram. Errors clearly when the dump lacks them.
std::vector<double> task_metric(const CalibDumpReader& dump, int layer, bool keys);
std::string train_report_json(const TrainCodebooksResult& r);

}  // namespace antkv
