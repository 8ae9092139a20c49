// LoRA linear on CUDA: the rank-r kernels (the launch ABI is in csrc/include/forgetkern/lora_linear.h).
//
// The design of punica / S-LoRA / vLLM's SGMV LoRA kernels: the big frozen GEMMs (y = x W^T + b, dx = dy W)
// are cuBLAS calls made by the glue (lora_linear.cpp); only the rank-r work is custom, where fusion pays:
//   shrink  xa = [drop_1(x) A_1^T | drop_2(x) A_2^T | ...]     all adapters in one launch (one block column per
//           g  = [s_1 dy B_1 | s_2 dy B_2 | ...]               work item), the dropout mask hashed in the kernel
//   expand  y  += sum_k s_k xa_k B_k^T                          in place into the cuBLAS output
//           dx += sum_k drop_k(g_k A_k)                         the mask applied to each adapter's term
//   dA of an adapter with dropout: g_k^T drop_k(x), split over rows into an fp32 workspace (fixed-order sum)
// (dB = s dy^T xa and the dA of adapters without dropout are GEMMs with the long M dimension inside: cuBLAS.)
//
// Every kernel stages its operands in shared memory as fp32 and runs FMAs on a register tile (256 threads,
// 8 outputs per thread). At rank r the rank-r work moves O(M (K + N)) bytes for O(M r (K + N)) flops: it is
// bound by memory, so tensor cores would not make it faster; the kernels read x (or dy) once per work item.
#include <cuda_runtime.h>

#include <cstdint>

#include "forgetkern/lora_linear.h"

namespace forgetkern {
namespace {

constexpr int kThreads = 256;

template <typename S>
__device__ __forceinline__ float load_f(const void* p, int64_t idx) {
  return to_float(static_cast<const S*>(p)[idx]);
}

// drop(v) rounded to storage S and back: the value the reference's GEMM sees for an element of drop(x).
template <typename S>
__device__ __forceinline__ float dropped(const LoraDrop& d, float v, int64_t row, int64_t col) {
  return to_float(Store<S>::from(lora_drop_apply(d, v, static_cast<uint32_t>(row), static_cast<uint32_t>(col))));
}

// ---- shrink: block (row tile, item); tile 32 rows x 64 ranks, K step 32 --------------------------------------
constexpr int SH_BM = 32, SH_BR = kLoraShrinkRank, SH_BK = 32;

template <typename S>
__global__ void __launch_bounds__(kThreads, 2) lora_shrink_kernel(const LoraShrink p) {
  __shared__ float xs[SH_BM][SH_BK + 1];
  __shared__ float ws[SH_BR][SH_BK + 1];
  const LoraShrinkItem& it = p.item[blockIdx.y];
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * SH_BM;
  const int t = threadIdx.x, tr = t / 8, tj = t % 8;  // this thread: row tr, ranks tj + 8 u
  const bool drop = it.drop.enabled != 0;
  const bool w_c_fast = it.w_sc == 1;
  float acc[8];
#pragma unroll
  for (int u = 0; u < 8; ++u) acc[u] = 0.0f;
#pragma unroll 1
  for (int64_t k0 = 0; k0 < it.k; k0 += SH_BK) {
#pragma unroll 4
    for (int e = t; e < SH_BM * SH_BK; e += kThreads) {
      const int i = e / SH_BK, c = e % SH_BK;
      const int64_t gi = row0 + i, gc = k0 + c;
      float v = 0.0f;
      if (gi < p.m && gc < it.k) {
        v = load_f<S>(it.in, gi * it.ld_in + gc);
        if (drop) v = dropped<S>(it.drop, v, gi, gc);
      }
      xs[i][c] = v;
    }
#pragma unroll 4
    for (int e = t; e < SH_BR * SH_BK; e += kThreads) {
      // consecutive threads walk the operand's unit-stride dimension (coalesced loads)
      const int j = w_c_fast ? e / SH_BK : e % SH_BR, c = w_c_fast ? e % SH_BK : e / SH_BR;
      const int64_t gc = k0 + c;
      ws[j][c] = (j < it.rank && gc < it.k) ? load_f<S>(it.w, j * it.w_sj + gc * it.w_sc) : 0.0f;
    }
    __syncthreads();
#pragma unroll 8
    for (int c = 0; c < SH_BK; ++c) {
      const float a = xs[tr][c];
#pragma unroll
      for (int u = 0; u < 8; ++u) acc[u] = fmaf(a, ws[tj + 8 * u][c], acc[u]);
    }
    __syncthreads();
  }
  const int64_t gi = row0 + tr;
  if (gi >= p.m) return;
  S* out = static_cast<S*>(p.out) + gi * p.ld_out + it.out_col;
#pragma unroll
  for (int u = 0; u < 8; ++u) {
    const int j = tj + 8 * u;
    if (j < it.rank) out[j] = Store<S>::from(fk_mul(acc[u], it.scale));
  }
}

// ---- expand: block (row tile, column tile); tile 32 rows x 64 columns, rank step 32 --------------------------
constexpr int EX_BM = 32, EX_BN = 64, EX_BR = 32;

template <typename S>
__global__ void __launch_bounds__(kThreads, 2) lora_expand_kernel(const LoraExpand p) {
  __shared__ float ins[EX_BM][EX_BR + 1];
  __shared__ float wsm[EX_BR][EX_BN + 1];
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * EX_BM, col0 = static_cast<int64_t>(blockIdx.y) * EX_BN;
  const int t = threadIdx.x, tx = t % 32, ty = t / 32;  // this thread: rows ty + 8 u, columns tx + 32 v
  float tot[4][2];
#pragma unroll
  for (int u = 0; u < 4; ++u) tot[u][0] = tot[u][1] = 0.0f;
#pragma unroll 1
  for (int n = 0; n < p.n; ++n) {
    const LoraExpandItem& it = p.item[n];
    const bool w_q_fast = it.w_sq == 1;
    float acc[4][2];
#pragma unroll
    for (int u = 0; u < 4; ++u) acc[u][0] = acc[u][1] = 0.0f;
#pragma unroll 1
    for (int j0 = 0; j0 < it.rank; j0 += EX_BR) {
#pragma unroll 4
      for (int e = t; e < EX_BM * EX_BR; e += kThreads) {
        const int i = e / EX_BR, j = e % EX_BR;
        const int64_t gi = row0 + i;
        ins[i][j] = (gi < p.m && j0 + j < it.rank) ? load_f<S>(p.in, gi * p.ld_in + it.in_col + j0 + j) : 0.0f;
      }
#pragma unroll 4
      for (int e = t; e < EX_BR * EX_BN; e += kThreads) {
        const int j = w_q_fast ? e / EX_BN : e % EX_BR, q = w_q_fast ? e % EX_BN : e / EX_BR;
        const int64_t gq = col0 + q;
        wsm[j][q] = (j0 + j < it.rank && gq < p.q)
                        ? load_f<S>(it.w, static_cast<int64_t>(j0 + j) * it.w_sj + gq * it.w_sq) : 0.0f;
      }
      __syncthreads();
#pragma unroll 8
      for (int j = 0; j < EX_BR; ++j) {
        const float b0 = wsm[j][tx], b1 = wsm[j][tx + 32];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const float a = ins[ty + 8 * u][j];
          acc[u][0] = fmaf(a, b0, acc[u][0]);
          acc[u][1] = fmaf(a, b1, acc[u][1]);
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int u = 0; u < 4; ++u)
#pragma unroll
      for (int v = 0; v < 2; ++v) {
        float c = fk_mul(acc[u][v], it.scale);
        if (it.drop.enabled)
          c = lora_drop_apply(it.drop, c, static_cast<uint32_t>(row0 + ty + 8 * u),
                              static_cast<uint32_t>(col0 + tx + 32 * v));
        tot[u][v] = fk_add(tot[u][v], c);
      }
  }
  S* out = static_cast<S*>(p.out);
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const int64_t gi = row0 + ty + 8 * u;
    if (gi >= p.m) continue;
#pragma unroll
    for (int v = 0; v < 2; ++v) {
      const int64_t gq = col0 + tx + 32 * v;
      if (gq >= p.q) continue;
      S* dst = out + gi * p.ld_out + gq;
      *dst = Store<S>::from(fk_add(to_float(*dst), tot[u][v]));
    }
  }
}

// ---- dA with dropout: block (column tile of K, rank tile, row split); tile 32 ranks x 64 columns, M step 32 ---
constexpr int DT_BM = 32, DT_BR = 32, DT_BN = 64;

template <typename S>
__global__ void __launch_bounds__(kThreads, 2) lora_drop_tgemm_kernel(const LoraDropTGemm p) {
  __shared__ float gs[DT_BM][DT_BR + 1];
  __shared__ float xs[DT_BM][DT_BN + 1];
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * DT_BN;
  const int j0 = static_cast<int>(blockIdx.y) * DT_BR;
  const int64_t r_begin = static_cast<int64_t>(blockIdx.z) * p.rows_per_split;
  const int64_t r_end = r_begin + p.rows_per_split < p.m ? r_begin + p.rows_per_split : p.m;
  const int t = threadIdx.x, tx = t % 32, ty = t / 32;  // this thread: ranks j0 + ty + 8 u, columns tx + 32 v
  float acc[4][2];
#pragma unroll
  for (int u = 0; u < 4; ++u) acc[u][0] = acc[u][1] = 0.0f;
#pragma unroll 1
  for (int64_t i0 = r_begin; i0 < r_end; i0 += DT_BM) {
#pragma unroll 4
    for (int e = t; e < DT_BM * DT_BR; e += kThreads) {
      const int i = e / DT_BR, j = e % DT_BR;
      const int64_t gi = i0 + i;
      gs[i][j] = (gi < r_end && j0 + j < p.rank) ? load_f<S>(p.g, gi * p.ld_g + p.g_col + j0 + j) : 0.0f;
    }
#pragma unroll 4
    for (int e = t; e < DT_BM * DT_BN; e += kThreads) {
      const int i = e / DT_BN, c = e % DT_BN;
      const int64_t gi = i0 + i, gc = c0 + c;
      xs[i][c] = (gi < r_end && gc < p.k) ? dropped<S>(p.drop, load_f<S>(p.x, gi * p.ld_x + gc), gi, gc) : 0.0f;
    }
    __syncthreads();
#pragma unroll 8
    for (int i = 0; i < DT_BM; ++i) {
      const float b0 = xs[i][tx], b1 = xs[i][tx + 32];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const float a = gs[i][ty + 8 * u];
        acc[u][0] = fmaf(a, b0, acc[u][0]);
        acc[u][1] = fmaf(a, b1, acc[u][1]);
      }
    }
    __syncthreads();
  }
  float* ws = p.ws + static_cast<int64_t>(blockIdx.z) * p.rank * p.k;
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const int j = j0 + ty + 8 * u;
    if (j >= p.rank) continue;
#pragma unroll
    for (int v = 0; v < 2; ++v) {
      const int64_t gc = c0 + tx + 32 * v;
      if (gc < p.k) ws[j * p.k + gc] = acc[u][v];
    }
  }
}

unsigned blocks(int64_t n, int64_t tile) { return static_cast<unsigned>((n + tile - 1) / tile); }

template <typename Fn>
int dispatch(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::Float32: fn(float{}); break;
    case DType::Float16: fn(fk_half{}); break;
    case DType::BFloat16: fn(fk_bf16{}); break;
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int lora_shrink_launch(const LoraShrink& p, DType dtype, void* stream) {
  if (p.m <= 0 || p.n <= 0) return 0;
  const dim3 grid(blocks(p.m, SH_BM), static_cast<unsigned>(p.n));
  return dispatch(dtype, [&](auto s) {
    lora_shrink_kernel<decltype(s)><<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  });
}

int lora_expand_launch(const LoraExpand& p, DType dtype, void* stream) {
  if (p.m <= 0 || p.q <= 0 || p.n <= 0) return 0;
  const dim3 grid(blocks(p.m, EX_BM), blocks(p.q, EX_BN));
  return dispatch(dtype, [&](auto s) {
    lora_expand_kernel<decltype(s)><<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  });
}

int lora_drop_tgemm_launch(const LoraDropTGemm& p, DType dtype, void* stream) {
  if (p.m <= 0 || p.k <= 0 || p.rank <= 0) return 0;
  const dim3 grid(blocks(p.k, DT_BN), blocks(p.rank, DT_BR), static_cast<unsigned>(p.splits));
  return dispatch(dtype, [&](auto s) {
    lora_drop_tgemm_kernel<decltype(s)><<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  });
}

}  // namespace forgetkern
