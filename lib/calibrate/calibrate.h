// Calibration: runs the runtime over windows of calibration text and streams every layer's K/V and
// anchor scores (S_K, S_V, AnS; design note §2) into the HDF5 dump of §7, window by window.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "anchor/anchor_scores.h"
#include "recipe/recipe.h"
#include "runtime/runtime.h"

namespace antkv {

class Tokenizer;

// Computes S_K, S_V of one layer of one window (CPU or GPU implementation).
using AnchorScoreFn = std::function<void(const AnchorScoreArgs&, float* s_k, float* s_v)>;

struct CalibrationPlan {
  std::vector<int32_t> ids;      // the tokenized text, BOS first
  int64_t text_tokens_used = 0;  // text tokens covered by the windows
  int seq_len = 0;
  int stride = 0;
  int64_t windows = 0;
  int64_t dropped_tokens = 0;    // text tokens of a last window too short to use (see plan_calibration)
  // BOS + up to seq_len-1 text tokens; bos < 0 (a tokenizer without BOS, ids[0] is text): the text token
  // before them instead, so that windows are still seq_len long
  std::vector<int32_t> window(int64_t c, int32_t bos) const;
};
// Windows of `tokens` text tokens: window c starts at text token c*stride (bos_window layout). A last window
// with fewer than half a window's text tokens (e.g. 4096 tokens in windows of 2048: a third window of 2) is
// dropped, its tokens counted in dropped_tokens; a single window is kept however short.
// The text (text_name in errors) must give at least min_text_tokens tokens after BOS: codebooks of 2^b centroids
// need 2^b calibration tokens (calibration_min_tokens), so a shorter text is refused here, not by k-means later.
CalibrationPlan plan_calibration(std::vector<int32_t> ids, int64_t tokens, int seq_len, int stride,
                                 const std::string& text_name = "calibration text", int64_t min_text_tokens = 1);
// The fewest calibration text tokens codebooks of the recipe's quant.keys / quant.values (2^b centroids) train on.
int64_t calibration_min_tokens(const Recipe& r);
// "calibration: 16376 text tokens in 8 windows of 2048 (the last 8 tokens, less than half a window, are left out)"
std::string calibration_plan_line(const CalibrationPlan& p);

struct LayerSummary {
  double top1_share_attention = 0;   // share of S_V (attention mass) held by the top 1% of tokens
  double top1_share_anchor = 0;      // share of the anchor score held by its top 1%
  double sink_share_attention = 0;   // share of S_V on position 0
  std::vector<std::pair<int32_t, int64_t>> top_anchor_positions;  // (position, count) most frequent
  std::vector<std::pair<int32_t, int64_t>> top_anchor_tokens;     // (token id, count) most frequent
  std::vector<float> key_channel_mean_abs, value_channel_mean_abs;  // [kv_heads * d]
};

struct CalibrationResult {
  int64_t windows = 0, tokens_run = 0, tokens_stored = 0;
  double seconds = 0, tokens_per_second = 0;
  // where the time went: forward passes (+ device stage) on the calling thread, the host half (statistics,
  // HDF5 writes) on the worker, the calling thread waiting for the worker, the final close of the file
  double forward_seconds = 0, host_seconds = 0, write_seconds = 0, stall_seconds = 0, finish_seconds = 0;
  int64_t bytes_stored = 0;  // K/V and score bytes appended to the dump
  bool device_path = false;
  std::vector<LayerSummary> layers;
};

// One layer of one window as the dump stores it, on the host (all T tokens of the window):
struct CalibLayerHost {
  const uint16_t* keys = nullptr;    // [T, kv_heads, d] fp16 bits, pre- or post-RoPE as the recipe's key_rope
  const uint16_t* values = nullptr;  // [T, kv_heads, d] fp16 bits
  const float* s_k = nullptr;        // [T, kv_heads]
  const float* s_v = nullptr;        // [T, kv_heads]
  // The window's query second moment for metric=task: [kv_heads, d, d], sum over the window's T tokens and the KV
  // head's G query heads of q q^T (post-RoPE q). Null: not computed (the dump then has no /query_moment).
  const float* q_moment = nullptr;
};

// The device half of calibration on a GPU runtime (kernels/calibrate/calib_stage.h): for each layer of a
// window, on the runtime's stream and without waiting, the anchor-score pass (S_K, S_V), K and V converted
// to fp16, and asynchronous copies of all of it into pinned host memory of one of two window slots. When
// the runtime's forward() returns (it synchronizes its stream), the slot's data are on the host, and the
// host half (anchor combination, summary statistics, the HDF5 writes) runs on a worker thread while the GPU
// runs the next window into the other slot.
class CalibDeviceStage {
 public:
  virtual ~CalibDeviceStage() = default;
  static constexpr int kSlots = 2;
  // Enqueues layer a.layer of the window going to `slot` (0 or 1). pre_rope: store the pre-RoPE keys.
  virtual void enqueue(const DeviceLayerActivations& a, bool pre_rope, int slot) = 0;
  // The host copy of (layer, slot) once its copies completed (waits for them).
  virtual CalibLayerHost host(int layer, int slot) = 0;
  // Where time went so far (seconds of the host's wall clock spent waiting in host()).
  virtual double wait_seconds() const { return 0; }
};
// cfg: the model; max_tokens: the longest window.
using CalibDeviceStageFactory = std::function<std::unique_ptr<CalibDeviceStage>(const ModelConfig& cfg, int max_tokens)>;

struct CalibrationOptions {
  const Recipe* recipe = nullptr;
  std::string out_path;          // the (temporary) HDF5 file to write
  std::string model_dir, text_path, version;
  AnchorScoreFn anchor_fn;       // default: anchor_scores_cpu (host path)
  // With a GPU runtime: the device path (anchor_fn is not used then). Null: the host path, where the
  // runtime hands host copies of every layer's activations and everything runs on the calling thread.
  CalibDeviceStageFactory device_stage;
  std::string fingerprint;       // stored in /meta
  bool progress = true;
};

class Checkpoint;
// metric=task statistics (dump /layer_{l}/query_moment and /oproj_gram; quant/method.h):
// out [n_kv_heads, d, d] = sum over tokens t and the KV head's G query heads of q q^T; q: [T, n_heads * d] rows
// with row stride `stride` (elements).
void query_moment(const float* q, int T, int n_heads, int n_kv_heads, int d, int64_t stride, std::vector<float>& out);
// [n_kv_heads, d, d]: sum over the KV head's G query heads g of W_o,g^T W_o,g (W_o,g: o_proj's d columns of head g).
std::vector<float> oproj_gram(const Checkpoint& ckpt, int layer);

CalibrationResult run_calibration(Runtime& rt, const Tokenizer& tok, const CalibrationPlan& plan,
                                  const CalibrationOptions& opts);

// The summary as JSON text (per layer), with token ids decoded.
std::string calibration_summary_json(const CalibrationResult& r, const Tokenizer& tok);

}  // namespace antkv
