// Causal flash attention for prefill (FlashAttention-2 style): one block of 4 warps per (64-query tile,
// query head); each warp owns 16 query rows. K/V tiles of 64 keys stream through shared memory with
// cp.async, double-buffered; S = Q K^T and O += P V run on the tensor cores (mma.sync m16n8k16, bf16 in,
// fp32 accumulate) with an online softmax in the log2 domain. Returns O (bf16) and the row log-sum-exp.
#include <cmath>

#include "kernels/common/cuda_check.h"
#include "kernels/common/device_utils.cuh"
#include "kernels/attention/flash_attention.h"
#include "kernels/runtime/ops.h"

namespace antkv::cuda {
namespace {

using namespace dev;

constexpr int kBM = 64;       // query rows per block
constexpr int kBN = 64;       // keys per tile
constexpr int kWarps = 4;
constexpr int kThreadsFA = kWarps * 32;

template <int D>
constexpr int prefill_smem_bytes() {
  return (kBM * D + 4 * kBN * D) * static_cast<int>(sizeof(bf16));  // Q + 2 stages of K and V
}

template <int D>
__global__ void __launch_bounds__(kThreadsFA) flash_prefill_kernel(const FlashPrefillParams p) {
  constexpr int CH = D / 8;  // 16-byte chunks per row
  extern __shared__ __align__(128) unsigned char smem_raw[];
  bf16* sQ = reinterpret_cast<bf16*>(smem_raw);
  bf16* sK = sQ + kBM * D;       // [2][kBN * D]
  bf16* sV = sK + 2 * kBN * D;   // [2][kBN * D]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int n_qt = (p.n_q + kBM - 1) / kBM;
  const int qt = n_qt - 1 - static_cast<int>(blockIdx.x);  // the longest rows first
  const int h = blockIdx.y;
  const int kvh = h / (p.n_heads / p.n_kv_heads);
  const int q0 = qt * kBM;
  const int past = p.n_kv - p.n_q;
  const int kv_end = min(p.n_kv, past + q0 + kBM);
  const int n_tiles = (kv_end + kBN - 1) / kBN;

  const bf16* kbase = p.k + static_cast<int64_t>(kvh) * p.k_head_stride;
  const bf16* vbase = p.v + static_cast<int64_t>(kvh) * p.v_head_stride;

  // Q tile
  for (int idx = tid; idx < kBM * CH; idx += kThreadsFA) {
    const int r = idx / CH, c = idx % CH;
    const int row = q0 + r;
    const bool valid = row < p.n_q;
    const bf16* src = p.q + static_cast<int64_t>(valid ? row : 0) * p.q_row_stride + h * D + c * 8;
    cp_async_16(sQ + swz<D>(r, c), src, valid);
  }
  auto load_kv = [&](int tile, int stage) {
    const int kb = tile * kBN;
    bf16* dk = sK + stage * kBN * D;
    bf16* dv = sV + stage * kBN * D;
    for (int idx = tid; idx < kBN * CH; idx += kThreadsFA) {
      const int r = idx / CH, c = idx % CH;
      const int key = kb + r;
      const bool valid = key < p.n_kv;
      const int64_t kk = valid ? key : 0;
      cp_async_16(dk + swz<D>(r, c), kbase + kk * p.k_row_stride + c * 8, valid);
      cp_async_16(dv + swz<D>(r, c), vbase + kk * p.v_row_stride + c * 8, valid);
    }
  };
  load_kv(0, 0);
  cp_async_commit();

  const float sl = p.scale * 1.4426950408889634f;  // scores to log2 units
  uint32_t qf[D / 16][4];
  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY};
  float l_run[2] = {0.f, 0.f};
  const int row_a = warp * 16 + (lane >> 2);  // this thread's rows in the tile: row_a, row_a + 8
  const int qpos_a = past + q0 + row_a;       // their absolute positions

  for (int j = 0; j < n_tiles; ++j) {
    if (j + 1 < n_tiles) load_kv(j + 1, (j + 1) & 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    if (j == 0) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk)
        ldmatrix_x4(qf[kk], sQ + swz<D>(warp * 16 + (lane & 15), kk * 2 + (lane >> 4)));
    }
    const bf16* tk = sK + (j & 1) * kBN * D;
    const bf16* tv = sV + (j & 1) * kBN * D;

    // S = Q K^T (16 x 64 per warp)
    float s[kBN / 8][4];
#pragma unroll
    for (int nb = 0; nb < kBN / 8; ++nb) s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int nb2 = 0; nb2 < kBN / 16; ++nb2) {
        uint32_t b[4];
        ldmatrix_x4(b, tk + swz<D>(nb2 * 16 + ((lane >> 4) << 3) + (lane & 7), kk * 2 + ((lane >> 3) & 1)));
        mma_bf16_16816(s[2 * nb2], qf[kk], b[0], b[1]);
        mma_bf16_16816(s[2 * nb2 + 1], qf[kk], b[2], b[3]);
      }
    }
    // mask: keys past n_kv, or past the row's own position (only tiles that reach the diagonal)
    const int kb = j * kBN;
    if (kb + kBN - 1 > past + q0 + warp * 16 || kb + kBN > p.n_kv) {
#pragma unroll
      for (int nb = 0; nb < kBN / 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = kb + nb * 8 + (lane & 3) * 2 + (e & 1);
          const int qpos = qpos_a + ((e >> 1) << 3);
          if (key > qpos || key >= p.n_kv) s[nb][e] = -INFINITY;
        }
    }
    // online softmax (rows r = 0: row_a, r = 1: row_a + 8)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int nb = 0; nb < kBN / 8; ++nb) mx = fmaxf(mx, fmaxf(s[nb][2 * r], s[nb][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m_run[r], mx * sl);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      const float alpha = exp2f(m_run[r] - m_use);
      m_run[r] = m_new;
      float rs = 0.f;
#pragma unroll
      for (int nb = 0; nb < kBN / 8; ++nb) {
        s[nb][2 * r] = exp2f(s[nb][2 * r] * sl - m_use);
        s[nb][2 * r + 1] = exp2f(s[nb][2 * r + 1] * sl - m_use);
        rs += s[nb][2 * r] + s[nb][2 * r + 1];
      }
      l_run[r] = l_run[r] * alpha + rs;
#pragma unroll
      for (int nd = 0; nd < D / 8; ++nd) {
        o[nd][2 * r] *= alpha;
        o[nd][2 * r + 1] *= alpha;
      }
    }
    // O += P V
#pragma unroll
    for (int t = 0; t < kBN / 16; ++t) {
      uint32_t a[4];
      a[0] = pack_bf16(s[2 * t][0], s[2 * t][1]);
      a[1] = pack_bf16(s[2 * t][2], s[2 * t][3]);
      a[2] = pack_bf16(s[2 * t + 1][0], s[2 * t + 1][1]);
      a[3] = pack_bf16(s[2 * t + 1][2], s[2 * t + 1][3]);
#pragma unroll
      for (int nd2 = 0; nd2 < D / 16; ++nd2) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, tv + swz<D>(t * 16 + (((lane >> 3) & 1) << 3) + (lane & 7), nd2 * 2 + (lane >> 4)));
        mma_bf16_16816(o[2 * nd2], a, b[0], b[1]);
        mma_bf16_16816(o[2 * nd2 + 1], a, b[2], b[3]);
      }
    }
    __syncthreads();  // the stage just read is refilled by the next iteration's load
  }

  // epilogue: finish the row sums over the quad, normalize, store O and the LSE
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = l_run[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int row = q0 + row_a + r * 8;
    const float inv = 1.f / l;
    if (row < p.n_q) {
      bf16* orow = p.out + static_cast<int64_t>(row) * p.o_row_stride + h * D;
#pragma unroll
      for (int nd = 0; nd < D / 8; ++nd) {
        const int c = nd * 8 + (lane & 3) * 2;
        *reinterpret_cast<__nv_bfloat162*>(orow + c) =
            __floats2bfloat162_rn(o[nd][2 * r] * inv, o[nd][2 * r + 1] * inv);
      }
      if (p.lse && (lane & 3) == 0)
        p.lse[static_cast<int64_t>(h) * p.n_q + row] = (m_run[r] + log2f(l)) * 0.6931471805599453f;
    }
  }
}

template <int D>
void launch_prefill(const FlashPrefillParams& p, cudaStream_t stream) {
  constexpr int smem = prefill_smem_bytes<D>();
  static bool attr_set = false;  // per instantiation; the attribute is per device function
  if (!attr_set) {
    ANTKV_CUDA_CHECK(cudaFuncSetAttribute(flash_prefill_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    attr_set = true;
  }
  const dim3 grid((p.n_q + kBM - 1) / kBM, p.n_heads);
  flash_prefill_kernel<D><<<grid, kThreadsFA, smem, stream>>>(p);
  ANTKV_LAUNCH_CHECK(D == 64 ? "flash_prefill_kernel<64>" : "flash_prefill_kernel<128>");
}

}  // namespace

void flash_prefill(FlashPrefillParams p, cudaStream_t stream) {
  ANTKV_CHECK(p.q && p.k && p.v && p.out, "flash_prefill: null pointer");
  ANTKV_CHECK(p.n_heads > 0 && p.n_kv_heads > 0 && p.n_heads % p.n_kv_heads == 0,
              "flash_prefill: n_heads {} must be a multiple of n_kv_heads {}", p.n_heads, p.n_kv_heads);
  ANTKV_CHECK(p.n_q >= 0 && p.n_kv >= p.n_q, "flash_prefill: n_kv {} < n_q {}", p.n_kv, p.n_q);
  ANTKV_CHECK(p.n_heads <= 65535, "flash_prefill: too many heads ({})", p.n_heads);
  const int64_t strides[] = {p.q_row_stride, p.o_row_stride, p.k_row_stride, p.k_head_stride, p.v_row_stride,
                             p.v_head_stride};
  for (int64_t s : strides) ANTKV_CHECK(s % 8 == 0 && s >= 0, "flash_prefill: strides must be multiples of 8 elements");
  ANTKV_CHECK(reinterpret_cast<uintptr_t>(p.q) % 16 == 0 && reinterpret_cast<uintptr_t>(p.k) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(p.v) % 16 == 0,
              "flash_prefill: q/k/v must be 16-byte aligned");
  if (p.n_q == 0) return;
  switch (p.head_dim) {
    case 64: launch_prefill<64>(p, stream); break;
    case 128: launch_prefill<128>(p, stream); break;
    default: fail("flash_prefill: head_dim {} is not supported (64 or 128)", p.head_dim);
  }
}

}  // namespace antkv::cuda
