// Decode attention over the packed uniform (KIVI-style) cache of kernels/quant/uniform_cache.h (its layout and
// counts are described there): flash-decoding splits over the quantized key blocks, the last split also over
// the FP16 residual, merged by split_combine.cuh's combine.
//
// The tensor-core split kernel (opt-in, see kDefaultUniformDecodeKernel) runs both products on the tensor cores
// (mma.sync m16n8k16, fp16 in, fp32 accumulate), the query heads of a KV head as the mma's N (8, padded), 16
// tokens per warp per step:
//  - scores^T [16 tokens, 8 heads] = codes [16 tokens, D] x (q_c s_c)^T [D, 8 heads], + q . z per key block;
//    the 2/4-bit codes become fp16 operands in registers (the 0x6400 exponent trick: one LOP3 and one HSUB2
//    per two codes), with the channels of a 16-wide k step permuted so both halves of a register come from one
//    code word (the q_c s_c fragments use the same permutation);
//  - out^T [D, 8 heads] += codes^T [D, 16 tokens] x (p_t s_t)^T [16 tokens, 8 heads], + sum_t p_t z_t per value
//    group; two tokens' codes of a channel paired into one register by PRMT.
// Codes, scales and zero points arrive in shared memory by cp.async, three 64-token tiles in flight.
#pragma once
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "kernels/common/dtypes.h"

namespace antkv::cuda {

// Per sequence of len tokens (the same for every layer and KV head): qlen tokens have quantized values,
// k_end (= qlen rounded down to the group) quantized keys; the rest is FP16 in the residual ring.
struct UniformCounts {
  int qlen, k_end, v_end;
};
__host__ __device__ inline UniformCounts uniform_counts(int len, int group, int window) {
  const int qlen = len > window ? len - window : 0;
  return {qlen, qlen / group * group, qlen};
}

// Closed set: bits 2 or 4, group 32, 64 or 128, head_dim 64 or 128, window >= 0; anything else an
// antkv::Error naming it (`what` says who asks, e.g. the method text).
void check_uniform_shape(const std::string& what, int head_dim, int bits, int group, int window);

struct UniformDecodePlan {
  int n_splits = 1;          // splits over the quantized key blocks; the last one also takes the FP16 residual
  int split_len = 128;       // tokens per split, a multiple of 128
  int heads_per_block = 1;   // query heads of one KV head per block (min(G, 8): the mma's N)
};
UniformDecodePlan plan_uniform_decode(int batch, int n_heads, int n_kv_heads, int64_t max_kend);
// The most splits plan_uniform_decode gives `batch` sequences at any length (workspaces sized once).
int uniform_decode_max_splits(int batch, int n_heads, int n_kv_heads);
// Floats of workspace the decode needs: batch * n_heads * n_splits * (head_dim + 2).
int64_t uniform_decode_workspace_floats(int batch, int n_heads, int head_dim, int n_splits);

// Which split kernel runs the decode: the tensor-core one or the CUDA-core one (tests check both against the CPU
// reference, bench --uniform-kernel compares them on one machine).
enum class UniformDecodeKernel { kTensorCore, kCudaCore };
// The default is the CUDA-core kernel. The tensor-core one is 2.0-2.3x faster (H100, 128K, kernels/NOTES.md), but
// its fp16 operands (q s and p s rounded to fp16) moved the real cache's perplexity up to 0.96% away from the
// simulated path in the perplexity test (bar 0.5%; CUDA-core 0.02-0.38%), so it is opt-in until a more precise
// form (hi/lo fp16 operands) has been measured.
constexpr UniformDecodeKernel kDefaultUniformDecodeKernel = UniformDecodeKernel::kCudaCore;
const char* uniform_decode_kernel_name(UniformDecodeKernel k);  // "tensor-core" / "cuda-core"
// The name's kernel; anything else an antkv::Error naming the accepted names.
UniformDecodeKernel parse_uniform_decode_kernel(const std::string& name);

struct UniformDecodeParams {
  UniformDecodeKernel kernel = kDefaultUniformDecodeKernel;
  int bits = 2, group = 128, window = 0;
  int batch = 0, n_heads = 0, n_kv_heads = 0, head_dim = 0, capacity = 0;
  const bf16* q = nullptr;            // [batch, n_heads, head_dim] post-RoPE
  const uint32_t* k_codes = nullptr;  // [batch, n_kv_heads, KB * group, WPT]
  const __half2* k_sz = nullptr;      // [batch, n_kv_heads, KB, head_dim]
  const uint32_t* v_codes = nullptr;  // [batch, n_kv_heads, capacity, WPT]
  const __half2* v_sz = nullptr;      // [batch, n_kv_heads, capacity, NVG]
  const __half* ring_k = nullptr;     // [batch, n_kv_heads, R, head_dim]
  const __half* ring_v = nullptr;     // [batch, n_kv_heads, R, head_dim]
  const int32_t* lens = nullptr;      // [batch] (device) tokens per sequence, 1 .. capacity
  bf16* out = nullptr;                // [batch, n_heads, head_dim]
  float* lse = nullptr;               // [batch, n_heads] natural log-sum-exp of the scaled scores, or null
  float* workspace = nullptr;         // uniform_decode_workspace_floats(batch, n_heads, head_dim, n_splits)
  int64_t workspace_floats = 0;
  int n_splits = 1, split_len = 128;  // from plan_uniform_decode (every sequence's k_end <= n_splits * split_len)
  float scale = 0.f;
};
void uniform_decode(const UniformDecodeParams& p, cudaStream_t stream);

}  // namespace antkv::cuda
