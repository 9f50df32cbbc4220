// Flash-decoding over a bf16 KV cache arena [batch, n_kv_heads, capacity, head_dim], one kernel per step.
// One block of 4 warps per (split, kv head, sequence). The group's G <= 16 query heads are the rows of one
// 16-row tensor-core tile, so every K/V tile is read from memory once for all of them. 64-key K/V tiles
// stream through a kStages-deep cp.async pipeline; each warp takes 16 keys of a tile (S = Q K^T and
// O += P V on mma.sync m16n8k16) with its own online softmax; the 4 warps are merged in shared memory and
// the split's unnormalized O, max and sum go to the workspace. The last block of each (sequence, kv head)
// to finish (a counter per pair) combines all its splits: no second kernel, whose launch, wait for the whole
// grid and ramp-up were the fixed cost that held short contexts at batch 1 below the bandwidth target.
// Slots at or past seq_lens[b] are never read (cp.async zero-fills them).
#include <algorithm>
#include <cmath>

#include "kernels/common/cuda_check.h"
#include "kernels/common/device_utils.cuh"
#include "kernels/attention/flash_attention.h"
#include "kernels/attention/split_combine.cuh"
#include "kernels/runtime/ops.h"

namespace antkv::cuda {
namespace {

using namespace dev;

constexpr int kTile = 64;  // keys per pipeline stage
constexpr int kWarps = 4;
constexpr int kThreadsFD = kWarps * 32;
constexpr int kMinSplitLen = 256;

template <int D>
constexpr int decode_stages() { return D == 128 ? 3 : 4; }

template <int D>
constexpr int decode_smem_bytes() {
  const int pipe = (16 * D + decode_stages<D>() * 2 * kTile * D) * static_cast<int>(sizeof(bf16));
  const int merge = kWarps * 16 * (D + 2) * static_cast<int>(sizeof(float));
  const int combine = split_combine_smem_floats(16, kMaxDecodeSplits) * static_cast<int>(sizeof(float));
  return std::max(pipe, std::max(merge, combine));
}

// workspace layout: O partials [batch * n_heads, n_splits, D] then (m, l) pairs [batch * n_heads, n_splits, 2]
template <int D>
__global__ void __launch_bounds__(kThreadsFD) flash_decode_split_kernel(const FlashDecodeParams p) {
  constexpr int CH = D / 8;
  constexpr int NST = decode_stages<D>();
  extern __shared__ __align__(128) unsigned char smem_raw[];
  bf16* sQ = reinterpret_cast<bf16*>(smem_raw);  // [16][D]
  bf16* sK = sQ + 16 * D;                        // [NST][kTile][D]
  bf16* sV = sK + NST * kTile * D;               // [NST][kTile][D]

  const int split = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int G = p.n_heads / p.n_kv_heads;
  // Launched as a programmatic dependent (see launch_decode): this block may be scheduled while the
  // previous kernel of the stream finishes, so it waits for that kernel's completion and memory before
  // touching anything; it lets the next kernel be scheduled the same way as soon as its own blocks run.
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
  const int len = p.seq_lens[b];
  const int64_t bh0 = static_cast<int64_t>(b) * p.n_heads + kvh * G;  // first query head of the group
  if (len < 1 || len > p.capacity || static_cast<int64_t>(p.n_splits) * p.split_len < len) {
    // a bad length, or a plan made for a shorter context: make it visible instead of dropping keys
    if (split == 0)
      for (int idx = tid; idx < G * D; idx += kThreadsFD) {
        p.out[bh0 * D + idx] = __float2bfloat16_rn(NAN);
        if (p.lse && idx % D == 0) p.lse[bh0 + idx / D] = NAN;
      }
    return;
  }
  const int n_valid = (len + p.split_len - 1) / p.split_len;  // splits holding keys (<= n_splits)
  const int k0 = split * p.split_len;
  const int k1 = min(k0 + p.split_len, len);
  if (k0 >= k1) return;  // past the end: not counted, never combined
  const int n_tiles = (k1 - k0 + kTile - 1) / kTile;

  const int64_t head_off = (static_cast<int64_t>(b) * p.n_kv_heads + kvh) * p.capacity * D;
  const bf16* kbase = p.k_cache + head_off;
  const bf16* vbase = p.v_cache + head_off;

  // Q rows g < G: query heads kvh*G + g of sequence b; rows >= G are zero
  const bf16* qbase = p.q + (static_cast<int64_t>(b) * p.n_heads + kvh * G) * D;
  for (int idx = tid; idx < 16 * CH; idx += kThreadsFD) {
    const int r = idx / CH, c = idx % CH;
    const bool valid = r < G;
    cp_async_16(sQ + swz<D>(r, c), qbase + (valid ? r : 0) * D + c * 8, valid);
  }
  auto load_tile = [&](int tile, int stage) {
    const int kb = k0 + tile * kTile;
    bf16* dk = sK + stage * kTile * D;
    bf16* dv = sV + stage * kTile * D;
#pragma unroll 4
    for (int idx = tid; idx < kTile * CH; idx += kThreadsFD) {
      const int r = idx / CH, c = idx % CH;
      const int key = kb + r;
      const bool valid = key < k1;
      const int64_t off = static_cast<int64_t>(valid ? key : k0) * D + c * 8;
      cp_async_16(dk + swz<D>(r, c), kbase + off, valid);
      cp_async_16(dv + swz<D>(r, c), vbase + off, valid);
    }
  };
#pragma unroll
  for (int st = 0; st < NST - 1; ++st) {
    if (st < n_tiles) load_tile(st, st);
    cp_async_commit();  // the Q load rides in group 0
  }

  const float sl = p.scale * 1.4426950408889634f;
  uint32_t qf[D / 16][4];
  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY};
  float l_run[2] = {0.f, 0.f};

  for (int j = 0; j < n_tiles; ++j) {
    cp_async_wait<NST - 2>();
    __syncthreads();  // tile j has landed for every thread; stage (j-1) % NST is free again
    if (j + NST - 1 < n_tiles) load_tile(j + NST - 1, (j + NST - 1) % NST);
    cp_async_commit();
    if (j == 0) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk)
        ldmatrix_x4(qf[kk], sQ + swz<D>(lane & 15, kk * 2 + (lane >> 4)));
    }
    const int stage = j % NST;
    const bf16* tk = sK + stage * kTile * D + warp * 16 * D;  // this warp's 16 keys (rows of the tile)
    const bf16* tv = sV + stage * kTile * D + warp * 16 * D;
    const int kw = k0 + j * kTile + warp * 16;  // first key of this warp's slice
    if (kw >= k1) continue;                     // the slice is past the end (last tile only)

    float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t bb[4];
      // swizzle uses the row index within the tile: warp*16 + r keeps (row & 7) == (r & 7)
      ldmatrix_x4(bb, tk + swz<D>(((lane >> 4) << 3) + (lane & 7), kk * 2 + ((lane >> 3) & 1)));
      mma_bf16_16816(s[0], qf[kk], bb[0], bb[1]);
      mma_bf16_16816(s[1], qf[kk], bb[2], bb[3]);
    }
    if (kw + 16 > k1) {
#pragma unroll
      for (int nb = 0; nb < 2; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (kw + nb * 8 + (lane & 3) * 2 + (e & 1) >= k1) s[nb][e] = -INFINITY;
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = fmaxf(fmaxf(s[0][2 * r], s[0][2 * r + 1]), fmaxf(s[1][2 * r], s[1][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m_run[r], mx * sl);  // finite: key kw < k1 is always valid
      const float alpha = exp2f(m_run[r] - m_new);
      m_run[r] = m_new;
      float rs = 0.f;
#pragma unroll
      for (int nb = 0; nb < 2; ++nb) {
        s[nb][2 * r] = exp2f(s[nb][2 * r] * sl - m_new);
        s[nb][2 * r + 1] = exp2f(s[nb][2 * r + 1] * sl - m_new);
        rs += s[nb][2 * r] + s[nb][2 * r + 1];
      }
      l_run[r] = l_run[r] * alpha + rs;
#pragma unroll
      for (int nd = 0; nd < D / 8; ++nd) {
        o[nd][2 * r] *= alpha;
        o[nd][2 * r + 1] *= alpha;
      }
    }
    uint32_t a[4];
    a[0] = pack_bf16(s[0][0], s[0][1]);
    a[1] = pack_bf16(s[0][2], s[0][3]);
    a[2] = pack_bf16(s[1][0], s[1][1]);
    a[3] = pack_bf16(s[1][2], s[1][3]);
#pragma unroll
    for (int nd2 = 0; nd2 < D / 16; ++nd2) {
      uint32_t bb[4];
      ldmatrix_x4_trans(bb, tv + swz<D>((((lane >> 3) & 1) << 3) + (lane & 7), nd2 * 2 + (lane >> 4)));
      mma_bf16_16816(o[2 * nd2], a, bb[0], bb[1]);
      mma_bf16_16816(o[2 * nd2 + 1], a, bb[2], bb[3]);
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the pipeline buffers are reused for the merge

  // merge the 4 warps: sO [warp][16][D] fp32, sML [warp][16][2]
  float* sO = reinterpret_cast<float*>(smem_raw);
  float* sML = sO + kWarps * 16 * D;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = l_run[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int row = (lane >> 2) + r * 8;
    float* orow = sO + (warp * 16 + row) * D;
#pragma unroll
    for (int nd = 0; nd < D / 8; ++nd) {
      const int c = nd * 8 + (lane & 3) * 2;
      orow[c] = o[nd][2 * r];
      orow[c + 1] = o[nd][2 * r + 1];
    }
    if ((lane & 3) == 0) {
      sML[(warp * 16 + row) * 2] = m_run[r];
      sML[(warp * 16 + row) * 2 + 1] = l;
    }
  }
  __syncthreads();
  float* wo = p.workspace;
  float* wml = p.workspace + static_cast<int64_t>(p.batch) * p.n_heads * p.n_splits * D;
  for (int idx = tid; idx < G * D; idx += kThreadsFD) {
    const int g = idx / D, c = idx % D;
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) M = fmaxf(M, sML[(w * 16 + g) * 2]);
    float acc = 0.f, L = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float mw = sML[(w * 16 + g) * 2];
      const float f = mw == -INFINITY ? 0.f : exp2f(mw - M);  // a warp with no keys has m = -inf
      acc += f * sO[(w * 16 + g) * D + c];
      L += f * sML[(w * 16 + g) * 2 + 1];
    }
    const int64_t slot = (bh0 + g) * p.n_splits + split;
    wo[slot * D + c] = acc;
    if (c == 0) {
      wml[slot * 2] = M;
      wml[slot * 2 + 1] = L;
    }
  }

  // Count this split done; the last of the pair's n_valid splits combines them. The fence before the count
  // publishes this block's partials device-wide (threadFenceReduction pattern); the last block resets the
  // counter, so every launch leaves the counters zero.
  __shared__ int s_last;
  __threadfence();
  __syncthreads();
  if (tid == 0) {
    uint32_t* counter = p.split_counters + static_cast<int64_t>(b) * p.n_kv_heads + kvh;
    const uint32_t done_before = atomicAdd(counter, 1u);
    s_last = done_before + 1 == static_cast<uint32_t>(n_valid);
    if (s_last) atomicExch(counter, 0u);
  }
  __syncthreads();
  if (!s_last) return;
  __threadfence();

  // combine the pair's n_valid splits (the same step as the quantized decode's; split_combine.cuh)
  combine_splits<D, kThreadsFD>(p.workspace, static_cast<int64_t>(p.batch) * p.n_heads, p.n_splits, bh0, G, n_valid,
                                reinterpret_cast<float*>(smem_raw), p.out, p.lse);
}

template <int D>
void set_decode_smem_attr() {
  static const bool done = [] {
    ANTKV_CUDA_CHECK(cudaFuncSetAttribute(flash_decode_split_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          decode_smem_bytes<D>()));
    return true;
  }();
  (void)done;
}

template <int D>
int resident_blocks() {
  static const int n = [] {
    set_decode_smem_attr<D>();
    int per_sm = 0;
    ANTKV_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, flash_decode_split_kernel<D>, kThreadsFD,
                                                                    decode_smem_bytes<D>()));
    ANTKV_CHECK(per_sm >= 1, "flash_decode: the split kernel does not fit on a multiprocessor");
    return per_sm * device_sm_count();
  }();
  return n;
}

template <int D>
void launch_decode(const FlashDecodeParams& p, cudaStream_t stream) {
  set_decode_smem_attr<D>();
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(p.n_splits, p.n_kv_heads, p.batch);
  cfg.blockDim = dim3(kThreadsFD);
  cfg.dynamicSmemBytes = decode_smem_bytes<D>();
  cfg.stream = stream;
  // programmatic stream serialization: the kernel's blocks are scheduled while the previous kernel drains
  // (they wait in-kernel with griddepcontrol.wait before any memory access)
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  ANTKV_CUDA_CHECK(cudaLaunchKernelEx(&cfg, flash_decode_split_kernel<D>, p));
  ANTKV_LAUNCH_CHECK(D == 64 ? "flash_decode_split_kernel<64>" : "flash_decode_split_kernel<128>");
}

}  // namespace

int decode_resident_blocks(int head_dim) {
  switch (head_dim) {
    case 64: return resident_blocks<64>();
    case 128: return resident_blocks<128>();
    default: fail("flash_decode: head_dim {} is not supported (64 or 128)", head_dim);
  }
}

DecodePlan plan_flash_decode(int batch, int n_kv_heads, int max_len, int head_dim, int waves) {
  ANTKV_CHECK(batch > 0 && n_kv_heads > 0 && max_len > 0 && waves > 0, "plan_flash_decode: bad sizes");
  // (sequence, kv head) units each split into n_splits blocks; grid ~ waves x resident blocks
  const int64_t units = static_cast<int64_t>(batch) * n_kv_heads;
  const int64_t want = static_cast<int64_t>(waves) * decode_resident_blocks(head_dim);
  const int64_t n_splits = std::clamp<int64_t>(want / units, 1, kMaxDecodeSplits);
  int64_t split_len = (max_len + n_splits - 1) / n_splits;
  split_len = std::max<int64_t>(kMinSplitLen, (split_len + kTile - 1) / kTile * kTile);
  DecodePlan plan;
  plan.split_len = static_cast<int>(split_len);
  plan.n_splits = static_cast<int>((max_len + split_len - 1) / split_len);
  return plan;
}

int64_t decode_counter_count(int batch, int n_kv_heads) { return static_cast<int64_t>(batch) * n_kv_heads; }

int64_t decode_workspace_floats(int batch, int n_heads, int head_dim) {
  return static_cast<int64_t>(batch) * n_heads * kMaxDecodeSplits * (head_dim + 2);
}

void flash_decode(FlashDecodeParams p, cudaStream_t stream) {
  ANTKV_CHECK(p.q && p.k_cache && p.v_cache && p.seq_lens && p.out && p.workspace && p.split_counters,
              "flash_decode: null pointer");
  ANTKV_CHECK(p.n_heads > 0 && p.n_kv_heads > 0 && p.n_heads % p.n_kv_heads == 0,
              "flash_decode: n_heads {} must be a multiple of n_kv_heads {}", p.n_heads, p.n_kv_heads);
  ANTKV_CHECK(p.n_heads / p.n_kv_heads <= 16, "flash_decode: GQA group {} > 16 is not supported",
              p.n_heads / p.n_kv_heads);
  ANTKV_CHECK(p.batch > 0 && p.batch <= 65535 && p.n_kv_heads <= 65535 && p.capacity > 0, "flash_decode: bad sizes");
  ANTKV_CHECK(p.n_splits >= 1 && p.n_splits <= kMaxDecodeSplits && p.split_len > 0 && p.split_len % kTile == 0,
              "flash_decode: bad split plan ({} splits of {} keys)", p.n_splits, p.split_len);
  ANTKV_CHECK(static_cast<int64_t>(p.n_splits) * p.split_len >= 1,
              "flash_decode: bad split plan");
  ANTKV_CHECK(p.workspace_floats >= static_cast<int64_t>(p.batch) * p.n_heads * p.n_splits * (p.head_dim + 2),
              "flash_decode: workspace of {} floats is too small", p.workspace_floats);
  ANTKV_CHECK(reinterpret_cast<uintptr_t>(p.q) % 16 == 0 && reinterpret_cast<uintptr_t>(p.k_cache) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(p.v_cache) % 16 == 0,
              "flash_decode: q and the caches must be 16-byte aligned");
  ANTKV_CHECK(reinterpret_cast<uintptr_t>(p.workspace) % 16 == 0, "flash_decode: the workspace must be 16-byte aligned");
  switch (p.head_dim) {
    case 64: launch_decode<64>(p, stream); break;
    case 128: launch_decode<128>(p, stream); break;
    default: fail("flash_decode: head_dim {} is not supported (64 or 128)", p.head_dim);
  }
}

}  // namespace antkv::cuda
