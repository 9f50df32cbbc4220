// The device half of calibration (lib/calibrate/calibrate.h, CalibDeviceStage) on a GpuRuntime: per layer of
// a window, on the runtime's stream and without synchronizing, (1) the layer's q, post-RoPE k and v are
// packed (the anchor pass wants contiguous rows), (2) the anchor-score pass (kernels/anchor) writes S_K and
// S_V, (3) the stored keys (pre- or post-RoPE) and values are converted to fp16 on the device, and (4) all of
// it is copied asynchronously into pinned host memory of the window's slot (2 slots x layers x
// [2 T kv_dim fp16 + 2 T kv_heads fp32]; ~0.5 GB at the LLaMA-3-8B shape for 2048-token windows). A CUDA
// event per (slot, layer) marks the copies' completion; host() waits for it.
//
// Why (LLaMA-3-8B shape, H200): the host path copied fp32 q/k/v of every layer to the host synchronously,
// uploaded them again for the anchor pass, converted to fp16 on one core and deflated on one core: 222
// tokens/s against a 30K tokens/s forward.
#pragma once
#include "calibrate/calibrate.h"

namespace antkv {

// The factory for CalibrationOptions::device_stage (current CUDA device).
CalibDeviceStageFactory gpu_calib_device_stage();

}  // namespace antkv
