// The GPU anchor-score pass (kernels/anchor/anchor_scores.h) behind the host AnchorScoreFn interface of
// calibration (calibrate/calibrate.h).
#pragma once
#include "calibrate/calibrate.h"

namespace antkv {

// anchor_scores_gpu behind the host fp32 AnchorScoreFn interface (antkv-calibrate on the GPU): uploads q/k/v,
// runs both passes on a stream of its own with a reusable workspace, downloads S_K/S_V. Device buffers grow
// to the largest window seen and are kept (shared by copies of the returned function; calls are serialized).
AnchorScoreFn gpu_anchor_score_fn();

}  // namespace antkv
