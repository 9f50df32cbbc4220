// Decode attention over a vector-quantized KV cache, and the quantize kernel that fills it (design note §3,
// §6). One new query token per sequence attends to its whole context: the quantized tokens (b-bit codes
// per group of c channels, ~1 bit per channel) and the FP16 tokens (anchors and the newest window), all in
// one softmax. Keys are post-RoPE (the design's default: lookup tables), or pre-RoPE (pre_rope: dequantize,
// rotate at the token's position, dot; a kernel of its own, warp per token).
//
// ---- configurations (closed set) -------------------------------------------------------------------------
//   c2b8 = 4 bits/channel, c4b8 = 2, c8b8 = 1, c16b12 = 0.75, c16b8 = 0.5, c16b6 = 0.375 (design note §3's
//   configurations); head_dim 128 or 64. Keys and values each have their own codebooks, and may each have their
//   own configuration (QuantDecodeParams::value_config). Anything else is an antkv::Error. c2b8 and c4b8 (64 / 32
//   groups: lookup tables of 16K / 8K entries per head would not fit in shared memory) always take the
//   dequantize-dot kernel of pre-RoPE keys, without the rotation for post-RoPE keys; so do keys and values of
//   different configurations (each tensor's widths read at run time).
//
// ---- cache layout, per layer ------------------------------------------------------------------------------
// G = n_heads / n_kv_heads, NG = head_dim / c groups, K = 2^b centroids, R = NG * b / 8 bytes per token
// (an integer for every configuration: 64, 32, 16, 12, 8, 6 bytes at head_dim 128; 32, 16, 8, 6, 4, 3 at 64).
//  codes     k_codes, v_codes: uint8 [batch, n_kv_heads, quant_capacity, R]. Per (sequence, KV head), a
//            compacted stream of the quantized tokens in slots 0 .. n_quant[b]-1 (the order of tokens does
//            not matter to attention; anchors and window tokens are not in it). Slot t holds one record of
//            R bytes with NG tightly packed b-bit codes, little-endian (bit i*b of the record is the lowest
//            bit of its i-th code), in an XOR-SWIZZLED group order: the i-th code of slot t is the code of group
//            i ^ (t mod NG). (The decode kernel gives slot t to lane t mod 32; the swizzle makes the lanes of a
//            warp read NG different groups' lookup tables and bins at once, so shared memory serves a warp's
//            lookups and bin updates without bank conflicts, and a lookup address is one logic op of the code
//            and a per-lane constant.) pack_codes / unpack_codes below convert [n, NG] int32 codes.
//  codebooks k_centroids, v_centroids: fp16 [n_kv_heads, NG, K, c] (the layer's codebooks of §7, rounded to
//            fp16; the CPU reference dequantizes with the same fp16-rounded values).
//  anchors   anchor_k, anchor_v: fp16 [batch, n_kv_heads, anchor_capacity, head_dim], slots 0 ..
//            n_anchor[b]-1; anchor_pos: int32 [batch, n_kv_heads, anchor_capacity] their token positions
//            (bookkeeping for the cache manager; attention does not read them).
//  window    window_k, window_v: fp16 [batch, n_kv_heads, window_capacity, head_dim], slots 0 ..
//            n_window[b]-1 (the newest tokens, any slot order, e.g. a ring).
//  Each token of a sequence's context is in exactly one of: the code stream, the anchors, the window; the
//  counts n_quant / n_anchor / n_window are per sequence (the anchor budget ceil(rho*T) is the same for every
//  KV head). Slots past the counts are never read (they may hold anything, NaN included).
//
// ---- decode kernel ---------------------------------------------------------------------------------------
// Flash-decoding: grid (split, KV head x query-head tile, sequence). A block (256 threads, or 512 when only
// one block fits on a multiprocessor) takes HT = 4, 2 or 1 query
// heads of one KV head (all G heads share each code read when G <= 4); for its stretch of the code stream it
//  - builds LUT[code][group][head] = (q_group . centroid) * scale * log2(e) in shared memory (fp32; fp16
//    for c16b12, whose 4096-entry tables would not fit in fp32, or when lut_half is set), so a token's score
//    is the sum over groups of LUT[code][group];
//  - accumulates each token's weight exp2(score - m) into value bins[code][head][group] in shared memory
//    (u32 fixed point: shared-memory integer atomics are native, float ones are not; weights are scaled so
//    that the largest is 2^14..2^16 and dithered before truncation, so the rounding is unbiased; m is raised
//    per tile of 1024 tokens when a score would overflow, rescaling the bins), then multiplies the bins by the
//    value centroids once at the end;
//  - takes a share of the sequence's FP16 tokens (anchors, then window) on CUDA cores, online softmax;
// and writes its unnormalized output, max and sum; a reduction kernel (log-sum-exp merge) combines the
// splits. Outputs bf16 like flash_decode.
#pragma once
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

#include "core/error.h"

namespace antkv::cuda {

// The closed set of (c, b) codebook configurations the compressed cache's kernels are instantiated for (not the
// recipe's free VqConfig {c, b}: a method's configuration maps to one of these or is refused).
enum class VqKernelConfig { kC8B8, kC16B12, kC16B8, kC16B6, kC4B8, kC2B8 };

struct VqKernelConfigInfo {
  int c = 0;          // channels per group
  int b = 0;          // bits per code
  const char* name = "";
};

inline VqKernelConfigInfo vq_kernel_config_info(VqKernelConfig cfg) {
  switch (cfg) {
    case VqKernelConfig::kC8B8: return {8, 8, "c8b8"};
    case VqKernelConfig::kC16B12: return {16, 12, "c16b12"};
    case VqKernelConfig::kC16B8: return {16, 8, "c16b8"};
    case VqKernelConfig::kC16B6: return {16, 6, "c16b6"};
    case VqKernelConfig::kC4B8: return {4, 8, "c4b8"};
    case VqKernelConfig::kC2B8: return {2, 8, "c2b8"};
  }
  fail("unknown VQ configuration {}", static_cast<int>(cfg));
}
// The closed set, widest first.
inline constexpr VqKernelConfig kVqKernelConfigs[] = {VqKernelConfig::kC2B8, VqKernelConfig::kC4B8, VqKernelConfig::kC8B8,
                                          VqKernelConfig::kC16B12, VqKernelConfig::kC16B8, VqKernelConfig::kC16B6};
// Whether decode scores post-RoPE keys from lookup tables (else: dequantize, dot).
inline bool vq_uses_lut(VqKernelConfig cfg) { return vq_kernel_config_info(cfg).c >= 8; }
inline VqKernelConfig parse_vq_kernel_config(const std::string& name) {
  for (VqKernelConfig c : kVqKernelConfigs)
    if (name == vq_kernel_config_info(c).name) return c;
  fail("unknown VQ configuration '{}' (c2b8, c4b8, c8b8, c16b12, c16b8 or c16b6)", name);
}
inline void check_vq_shape(int head_dim, VqKernelConfig cfg) {
  (void)vq_kernel_config_info(cfg);
  ANTKV_CHECK(head_dim == 64 || head_dim == 128, "quantized KV cache: head_dim {} is not supported (64 or 128)",
              head_dim);
}
inline int vq_groups(int head_dim, VqKernelConfig cfg) { return head_dim / vq_kernel_config_info(cfg).c; }
inline int vq_centroid_count(VqKernelConfig cfg) { return 1 << vq_kernel_config_info(cfg).b; }
// Bytes of one token's record (all groups of one KV head).
inline int vq_record_bytes(int head_dim, VqKernelConfig cfg) { return vq_groups(head_dim, cfg) * vq_kernel_config_info(cfg).b / 8; }

// ---- packing (host) --------------------------------------------------------------------------------------
// codes: int32 [n, NG] in natural group order, of the n consecutive stream slots first_slot .. first_slot+n-1
// -> out: uint8 [n, R] (the swizzled, tightly packed records described above). Codes outside [0, 2^b) are an
// antkv::Error.
inline void pack_codes(const int32_t* codes, int64_t n, int64_t first_slot, int head_dim, VqKernelConfig cfg, uint8_t* out) {
  check_vq_shape(head_dim, cfg);
  ANTKV_CHECK(n >= 0 && first_slot >= 0, "pack_codes: bad range");
  const int ng = vq_groups(head_dim, cfg), nb = vq_kernel_config_info(cfg).b, rb = vq_record_bytes(head_dim, cfg);
  for (int64_t r = 0; r < n; ++r) {
    const int sw = static_cast<int>((first_slot + r) % ng);
    uint8_t* rec = out + r * rb;
    for (int i = 0; i < rb; ++i) rec[i] = 0;
    for (int i = 0; i < ng; ++i) {
      const int32_t code = codes[r * ng + (i ^ sw)];
      ANTKV_CHECK(code >= 0 && code < (1 << nb), "pack_codes: code {} of token {} is outside [0, {})", code, r,
                  1 << nb);
      for (int bit = 0; bit < nb; ++bit)
        if ((code >> bit) & 1) {
          const int at = i * nb + bit;
          rec[at >> 3] = static_cast<uint8_t>(rec[at >> 3] | (1u << (at & 7)));
        }
    }
  }
}

// The inverse: records of slots first_slot .. first_slot+n-1 -> codes int32 [n, NG] in natural group order.
inline void unpack_codes(const uint8_t* packed, int64_t n, int64_t first_slot, int head_dim, VqKernelConfig cfg, int32_t* codes) {
  check_vq_shape(head_dim, cfg);
  ANTKV_CHECK(n >= 0 && first_slot >= 0, "unpack_codes: bad range");
  const int ng = vq_groups(head_dim, cfg), nb = vq_kernel_config_info(cfg).b, rb = vq_record_bytes(head_dim, cfg);
  for (int64_t r = 0; r < n; ++r) {
    const int sw = static_cast<int>((first_slot + r) % ng);
    const uint8_t* rec = packed + r * rb;
    for (int i = 0; i < ng; ++i) {
      int32_t code = 0;
      for (int bit = 0; bit < nb; ++bit) {
        const int at = i * nb + bit;
        code |= static_cast<int32_t>((rec[at >> 3] >> (at & 7)) & 1u) << bit;
      }
      codes[r * ng + (i ^ sw)] = code;
    }
  }
}

}  // namespace antkv::cuda

#ifdef ANTKV_HAVE_CUDA
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels/attention/flash_attention.h"
#include "kernels/runtime/ops.h"

namespace antkv::cuda {

// ---- decode ---------------------------------------------------------------------------------------------
struct QuantDecodeParams {
  VqKernelConfig config = VqKernelConfig::kC8B8;  // the keys' (and, unless value_config is set, the values')
  // The values' configuration when it differs from the keys' (kbits != vbits, e.g. per-layer widths lkbits /
  // lvbits): decode then runs the dequantize-dot kernel with each tensor's widths read at run time (the lookup
  // tables and value bins of the split kernel are one configuration's), as it does for a coded transform on
  // c2b8 / c4b8. Codes and codebooks of each tensor are laid out as above with its own NG, 2^b, R.
  std::optional<VqKernelConfig> value_config;
  int batch = 0, n_heads = 0, n_kv_heads = 0, head_dim = 0;
  const bf16* q = nullptr;             // [batch, n_heads, head_dim], post-RoPE (the runtime's bf16 q)
  const uint8_t* k_codes = nullptr;    // [batch, n_kv_heads, quant_capacity, R] (layout above)
  const uint8_t* v_codes = nullptr;    // [batch, n_kv_heads, quant_capacity, R]
  const __half* k_centroids = nullptr; // [n_kv_heads, NG, 2^b, c]
  const __half* v_centroids = nullptr; // [n_kv_heads, NG, 2^b, c]
  const __half* anchor_k = nullptr;    // [batch, n_kv_heads, anchor_capacity, head_dim] (null if anchor_capacity 0)
  const __half* anchor_v = nullptr;    // [batch, n_kv_heads, anchor_capacity, head_dim]
  const int32_t* anchor_pos = nullptr; // [batch, n_kv_heads, anchor_capacity] (documentation of the layout; not read)
  const __half* window_k = nullptr;    // [batch, n_kv_heads, window_capacity, head_dim] (null if window_capacity 0)
  const __half* window_v = nullptr;    // [batch, n_kv_heads, window_capacity, head_dim]
  const int32_t* n_quant = nullptr;    // [batch] (device): quantized tokens per sequence, <= quant_capacity
  const int32_t* n_anchor = nullptr;   // [batch] (device): <= anchor_capacity
  const int32_t* n_window = nullptr;   // [batch] (device): <= window_capacity
  int quant_capacity = 0, anchor_capacity = 0, window_capacity = 0;
  bf16* out = nullptr;                 // [batch, n_heads, head_dim]
  float* lse = nullptr;                // [batch, n_heads] natural log-sum-exp of the scaled scores, or null
  // [batch, n_heads, anchor_capacity + window_capacity] or null: the scaled score q.k * scale of each FP16 token
  // f (anchors f < n_anchor, then window slot f - n_anchor), which the decode-time anchor rule needs (it then
  // reads only the values again, not the keys). Entries f >= n_anchor + n_window are not written.
  float* fp16_logits = nullptr;
  float* workspace = nullptr;          // quant_decode_workspace_floats(batch, n_heads, head_dim, n_splits)
  int64_t workspace_floats = 0;
  int n_splits = 0, split_len = 0;     // from plan_quant_decode(): code-stream slots per split
  float scale = 0.f;                   // usually 1/sqrt(head_dim)
  bool lut_half = false;               // fp16 lookup tables (always on for c16b12)
  // Pre-RoPE keys (key_rope: pre): the code stream's keys are dequantized, rotated to code_pos[slot] and dotted
  // with q (no lookup tables; lut_half ignored). Anchors and window hold post-RoPE keys as always.
  bool pre_rope = false;
  const int32_t* code_pos = nullptr;   // [batch, n_kv_heads, quant_capacity] token position of each code slot
  const float* inv_freq = nullptr;     // [head_dim / 2] RoPE inverse frequencies (the runtime's rope_inv_freq)
  // Gain-shape and rotated codes (gain=k|kv, rotate=pca; the lookup-table configurations c8b8, c16b*). A quantized
  // key is k = k_mean + R_k^T (ks_t u_t) and a value v = v_mean + R_v^T (vs_t u_t), u the concatenated centroids
  // of the codes and ks/vs one fp16 scale per token (the stored norm over |u|). So a score is
  // q.k = q.k_mean + ks_t (R_k q).u_t: the lookup tables are built from q_rot = R_k q, scaled by ks_t, plus
  // q_mean; value bins weigh p_t vs_t and are rotated back once per (sequence, head) in the reduction:
  // out = (sum_fp16 p v + (sum_quant p) v_mean + R_v^T sum_quant p vs u) / sum p. Any null field: that part is
  // off (identity basis, zero mean, scale 1). Its own instantiation of the split kernel (the plain one is
  // unchanged). Measured (H100, LLaMA-3-8B shape, 128K, attention of all 32 layers): vq:bits=1,gain=kv,rotate=pca
  // 2.25 ms/step at batch 1 and 16.0 at 16, against plain vq:bits=1's 1.53 and 12.7 (the scales add 1/8 of the
  // code bytes; the rest is the kernel's extra work and register spills).
  const float* q_rot = nullptr;        // [batch, n_heads, head_dim]: R_k q (fp32), the lookup tables' query
  const float* q_mean = nullptr;       // [batch, n_heads]: q . k_mean
  const __half* k_scale = nullptr;     // [batch, n_kv_heads, quant_capacity]: ks of each code slot
  const __half* v_scale = nullptr;     // [batch, n_kv_heads, quant_capacity]: vs of each code slot
  const float* v_rotation = nullptr;   // [n_kv_heads, head_dim, head_dim]: R_v, row-major (row i: basis vector i)
  const float* v_mean = nullptr;       // [n_kv_heads, head_dim]
  // Pre-RoPE keys with a basis (rotate=pca, key_rope=pre): RoPE does not commute with R_k, so the query cannot be
  // rotated once (q_rot, q_mean stay null); the dequantize-rotate-dot kernel maps each token's coded key back,
  // k = k_mean + R_k^T (ks_t u_t) (R_k staged in shared memory, a d x d product per token and KV head), then
  // rotates it to code_pos and dots. Values as above. Without k_rotation / k_mean (gain=k|kv only): k = ks_t u_t.
  const float* k_rotation = nullptr;   // [n_kv_heads, head_dim, head_dim]: R_k, row-major (pre_rope only)
  const float* k_mean = nullptr;       // [n_kv_heads, head_dim] (pre_rope only)
  bool coded_transform() const {
    return q_rot || q_mean || k_scale || v_scale || v_rotation || v_mean || k_rotation || k_mean;
  }
};

struct QuantDecodePlan {
  int n_splits = 1;
  int split_len = 1024;      // a multiple of quant_decode_tile(); at most 32768 (the bins' overflow bound)
  int heads_per_block = 1;   // HT
  int blocks_per_sm = 1;     // occupancy of the split kernel
};
constexpr int kMaxQuantSplits = 1024;
// Slots per tile of the split kernel (1024): split lengths are multiples of it.
int quant_decode_tile();
// Splits the longest code stream (max_quant_len slots) so that the grid is about `waves` waves of resident
// blocks. A plan is valid for any sequence whose n_quant <= n_splits * split_len (else the output is NaN).
// coded: the coded-transform kernel's occupancy (QuantDecodeParams::coded_transform()).
QuantDecodePlan plan_quant_decode(int batch, int n_heads, int n_kv_heads, int head_dim, VqKernelConfig cfg,
                                  int64_t max_quant_len, bool lut_half = false, int waves = 1, bool coded = false);
// coded_transform: QuantDecodeParams::coded_transform() (one more [rows, splits, head_dim] region: the quantized
// tokens' value sums in the coded basis).
int64_t quant_decode_workspace_floats(int batch, int n_heads, int head_dim, int n_splits, bool coded_transform = false);
// The most splits plan_quant_decode gives `batch` sequences at any length up to max_quant_len (workspaces
// sized once; a shorter stream may get more splits than a longer one after rounding the split length).
int quant_decode_max_splits(int batch, int n_heads, int n_kv_heads, int head_dim, VqKernelConfig cfg, int64_t max_quant_len,
                            bool lut_half = false, int waves = 1, bool coded = false);
void quant_decode(QuantDecodeParams p, cudaStream_t stream);

// ---- quantize ---------------------------------------------------------------------------------------------
// Nearest centroid (squared L2 summed channel by channel in fp32 without FMA contraction, as vq_encode does, so
// the codes equal the CPU's; ties to the lowest index) for each of n_tokens new K or V vectors of every KV
// head, written as packed records into the code stream: token i of sequence seq_index[i] goes to slot
// slot[i] of each head's stream (or slot_per_head[i][h]). Rows whose seq_index or slot is out of range are
// skipped (codes_out -1).
// search_centroids (metric=task): the nearest of these fp32 centroids (L^T c, [n_kv_heads, NG, 2^b, c]) to x
// (already mapped by L^T) is taken instead, and the codes stand for `centroids` (the original-space ones).
// norms (gain): per (token, KV head) the fp16-rounded norm of the vector before normalization; the kernel then
// writes scales[seq][h][slot] = fp16(norm / |u|), u the concatenated fp16 centroids of the codes (0 when |u| = 0).
struct QuantizeParams {
  VqKernelConfig config = VqKernelConfig::kC8B8;
  int n_tokens = 0, n_kv_heads = 0, head_dim = 0;
  const void* x = nullptr;             // [n_tokens, n_kv_heads, head_dim] of x_type, row stride x_row_stride
  ElemType x_type = ElemType::kF16;    // kF16, kBF16 or kF32
  int64_t x_row_stride = 0;            // elements between tokens (>= n_kv_heads * head_dim)
  const __half* centroids = nullptr;   // [n_kv_heads, NG, 2^b, c]
  const int32_t* seq_index = nullptr;  // [n_tokens] (device)
  const int32_t* slot = nullptr;       // [n_tokens] (device)
  const int32_t* slot_per_head = nullptr;  // [n_tokens, n_kv_heads] (device) or null: slots per KV head (a
                                           // stream without that head's anchors), instead of slot
  uint8_t* codes = nullptr;            // [batch, n_kv_heads, capacity, R]
  int batch = 0, capacity = 0;
  int32_t* codes_out = nullptr;        // [n_tokens, n_kv_heads, NG] natural group order, or null
  const float* search_centroids = nullptr;  // [n_kv_heads, NG, 2^b, c] or null (metric=task)
  const float* norms = nullptr;        // [n_tokens, n_kv_heads] or null (gain)
  __half* scales = nullptr;            // [batch, n_kv_heads, capacity] (with norms)
};
void quantize_kv(QuantizeParams p, cudaStream_t stream);

}  // namespace antkv::cuda
#endif  // ANTKV_HAVE_CUDA
