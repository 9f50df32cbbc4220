// Decode attention over the compressed cache for RoPE-commuting keys (key_rope=commute, docs/METHODS.md;
// quant/vq.h rope_pair_order). The code stream holds pre-RoPE keys coded in RoPE pair order: a key group of c
// channels is c/2 whole RoPE pairs, so its codeword is c/2 complex numbers w_j (real parts first in the codebook,
// then imaginary parts) and the key at position p, after RoPE, is w_j e^{i p theta_j} per pair j. With the query's
// pairs u_j = q_j + i q_{j+d/2}, the score is Re sum_j conj(u_j) w_j e^{i p theta_j}. Values, anchors, window and the
// layout are quant_decode.h's (QuantDecodeParams with pre_rope, code_pos and inv_freq set); anchors and window hold
// post-RoPE keys. gain=k|kv (k_scale, v_scale): a key's scale commutes with RoPE, so it multiplies the token's score
// after the lookups, and a value's weighs the token's softmax weight in the value pass (the denominator takes the
// plain weight); no basis (rotate=pca mixes the RoPE pairs: parse_method refuses it with commute).
//
// The angle: p theta_j exactly (fp32 p and theta_j, their product carried as the fp32 product plus its rounding
// error, reduced to [-pi, pi]), where the runtime's RoPE (and quant_decode's pre-RoPE kernel) rounds p theta_j to
// fp32 first, as transformers does: the two differ by at most half an fp32 ulp of the angle (2^-8 rad below p = 128K
// for the fastest pair, less for the others), the angle's own fp32 tolerance.
//
// Kernel: one block of 512 threads per (split, KV head, sequence), one block per multiprocessor, takes all G query
// heads of the KV head, so each token's e^{i p theta_j} and its codeword reads are shared by the G heads. Both
// codebooks of the KV head are staged in shared memory (the key one as complex (re, im) per pair). Per tile of 512
// code slots:
//  - scores, thread per slot: its key and value codes staged in shared memory (group-major), then a rolled loop over
//    the groups: per pair j of the group, the codeword w_j turned by e^{i p theta_j}, dotted with u_j of every head
//    (u in shared memory, heads innermost: one 16-byte broadcast load per two heads). The turn, where shared memory
//    has room (every configuration and GQA group but c8b8 / c16b8 / c4b8 at G = 8 and c2b8 at G > 1, head_dim 128):
//    a warp whose 32 slots hold positions in [base, base + 32), base its first slot's (a compressed cache's stream:
//    increasing positions, gaps where anchors left it), takes e^{i (p - base) theta_j} from a table [d/2][32] built
//    once per block and dots with its own copy of the query turned back by its base, u_j e^{-i base theta_j} (rebuilt
//    per tile: d/64 sine/cosine pairs per lane), since Re conj(u) w e^{i p theta} = Re conj(u e^{-i base theta})
//    (w e^{i (p - base) theta}); any other warp (positions out of order or spread wider) computes the sine/cosine of
//    each pair's whole angle (64 per slot at head_dim 128, the fast __sincosf after the reduction);
//  - online softmax per head over the tile (block max, one rescale per tile);
//  - values, thread per (channel pair, token class): the value centroids of the staged codes, weights of the G heads
//    in one broadcast load.
// FP16 tokens (anchors, then window; split s takes the s-th ceil(n / n_splits) of them) go through the same
// passes with their fp16 rows. The split records (o, m, l in log2 units) are merged by a reduction kernel
// (split_combine.cuh), as quant_decode's.
// History (H100, vq:bits=1 at the LLaMA-3-8B shape, 128K, attention per step B1 / B16; kernels/NOTES.md): the first
// version (256 threads, 2 blocks per multiprocessor, the score pass fully unrolled over the groups, value centroids
// through L1/L2) 22.2 / 351 ms, against 27.4 / 432 ms for key_rope=pre and 1.53 / 12.7 ms for post-RoPE keys; the
// second (512 threads, a sine/cosine pair per RoPE pair and slot) 7.54 ms at B1; the table turn: NOTES.md.
//
// Why not the query-codeword table T[code][pair] = conj(u_j) w_{code, j} of every head: it holds 2^b x d/2 complex
// entries per query head (c8b8, head_dim 128: 256 x 64 x 4 bytes fp16 = 64 KB per head, 256 KB for the G = 4
// heads of a LLaMA-3-8B group), beyond shared memory, and with G heads per token it needs G table reads per pair
// where the codebook needs one read and a complex multiply shared by the heads. A codebook is head_dim x 2^b fp16
// per KV head: 64 KB for every b = 8 configuration at head_dim 128 (32 KB at 64, 16 KB for c16b6), so the key and
// value codebooks fit together (with the staging, at most ~213 KB per block: c2b8, G = 8); c16b12's (1 MB each)
// does not, so commute decode refuses it.
#pragma once
#include "kernels/attention/quant_decode.h"

#ifdef ANTKV_HAVE_CUDA
#include <cuda_runtime.h>

namespace antkv::cuda {

// Slots per tile of the split kernel (512): split lengths are multiples of it.
int commute_decode_tile();
// Whether commute_decode runs configuration cfg (all but c16b12, whose key codebook does not fit in shared memory).
bool commute_decode_supports(VqKernelConfig cfg);
// The split plan (split_len a multiple of commute_decode_tile(); n_splits <= commute_decode_max_splits, at most one
// wave of blocks when the stream is long enough) for the longest stream.
QuantDecodePlan plan_commute_decode(int batch, int n_heads, int n_kv_heads, int head_dim, VqKernelConfig cfg,
                                    int64_t max_quant_len);
// The most splits plan_commute_decode gives `batch` sequences at any length (workspaces sized once).
int commute_decode_max_splits(int batch, int n_heads, int n_kv_heads, int head_dim, VqKernelConfig cfg);
// p as for quant_decode with pre_rope, code_pos and inv_freq set; p.k_centroids are the pair-ordered codebooks;
// k_scale / v_scale as quant_decode's (or null); the basis fields must be null.
// G = n_heads / n_kv_heads must be 1, 2, 4 or 8; head_dim 64 or 128.
void commute_decode(const QuantDecodeParams& p, cudaStream_t stream);

// Rows of kv_heads x head_dim floats into or out of RoPE pair order per head (quant/vq.h rope_pair_order; order:
// device [head_dim]): to_pairs: out[h][i] = in[h][order[i]], else out[h][order[i]] = in[h][i]. in and out must not
// overlap; strides in floats.
void permute_pair_order(const float* in, int64_t in_stride, float* out, int64_t out_stride, int n_rows, int kv_heads,
                        int head_dim, const int32_t* order, bool to_pairs, cudaStream_t stream);

}  // namespace antkv::cuda
#endif  // ANTKV_HAVE_CUDA
