// The anchor decisions of the KV caches, one definition for the CPU reference cache (QuantizedKvCache) and the
// simulated GPU quantizer (kernels/quant/simulated_quantizer.cu): which tokens of a prefill chunk are anchors, and
// the online rule of design note §2 (MethodSpec::promote) for a token leaving the FP16 decode window. The compressed
// cache runs the same rules on the GPU (window_append_kernel).
#pragma once
#include <cstdint>
#include <vector>

namespace antkv {

// flags: [rows, KV] anchor flags of the layer (1 = FP16 anchor); running: [rows, KV] running anchor scores;
// count: [KV] anchors per head; r: the leaving row; budget: ceil(ratio * length) anchors per head.
// Per head h: while count[h] < budget the leaving token becomes an anchor; else it takes the place of the anchor
// with the smallest running score among rows 1 .. r-1 (token 0 never; ties to the earliest row) when its own
// running score is larger. flags and count are updated. Returns, per head, the displaced row (to be quantized
// from its exact copy) or -1.
// The anchors of one prefill chunk of n tokens: per KV head, select_anchors (anchor/anchor_scores.h: token 0, the
// attention sink, always among them) when the chunk starts at position 0, else the plain top ceil(ratio * n) by score.
// score: [n, KV] anchor scores; keep: [n, KV], set to 1 at the anchors (other entries untouched).
void mark_chunk_anchors(const float* score, int n, int kv_heads, double ratio, bool starts_at_zero, uint8_t* keep);

std::vector<int64_t> decide_leaving_token(std::vector<uint8_t>& flags, const std::vector<double>& running,
                                          std::vector<int>& count, int kv_heads, int64_t r, int budget);

}  // namespace antkv
