// LoRA linear on CUDA: one tiled, segmented GEMM with a fused epilogue (see LoraGemm in lora_linear.h).
//
// Every product of the op is an instance (the glue in lora_linear.cpp builds them):
//   forward  y  = [x | xa*s] [W ; B]^T + bias          (2 segments: base and LoRA into ONE output buffer)
//            xa = drop(x) A^T                           (dropout applied to the A operand as it is staged)
//   backward g  = s * dy B,  dB = s * dy^T xa,  dA = g^T drop(x),
//            dx = sum_l dy_l W_l + [g_1 | ...] [A_1 ; ...]  (segments), + drop_k(g_k A_k) per dropout adapter
//
// Tiles: 64x64 output per block, K step 32, 128 threads. 16-bit inputs: operands staged in shared memory as
// fp16/bf16 and multiplied with WMMA 16x16x16 (tensor cores, fp32 accumulation); fp32 inputs: the same staging
// with a 4x8 register tile of FMAs per thread. The accumulator goes through shared memory to the epilogue,
// which applies column scale, bias, output dropout and accumulation in fp32 and rounds once.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "forgetkern/lora_linear.h"
#include "wmma_tile.cuh"

namespace forgetkern {
namespace {

using cuda::WarpAcc;

constexpr int BM = 64, BN = 64, BK = 32, THREADS = 128;
constexpr int LDA = BK + 8, LDB = BN + 8, LDC = BN + 4;  // padded leading dims (multiples of 8 / 4 for WMMA)

template <typename S>
__device__ __forceinline__ float load_f(const void* p, int64_t idx) {
  return to_float(static_cast<const S*>(p)[idx]);
}

// Stage the A tile [BM x BK] and the B tile [BK x BN] of segment `sg` at k0 into shared memory (storage S).
template <typename S>
__device__ __forceinline__ void stage(const LoraSegment& sg, int64_t m, int64_t q, int64_t row0, int64_t col0,
                                      int64_t k0, S* as, S* bs) {
  const int t = threadIdx.x;
#pragma unroll 4
  for (int e = t; e < BM * BK; e += THREADS) {
    const int i = e / BK, kk = e % BK;
    const int64_t gi = row0 + i, gk = k0 + kk;
    float v = 0.0f;
    if (gi < m && gk < sg.k) {
      v = load_f<S>(sg.a.ptr, gi * sg.a.s0 + gk * sg.a.s1);
      if (sg.a_colscale != nullptr) v = fk_mul(v, sg.a_colscale[gk]);
      if (sg.a_drop.enabled) v = lora_drop_apply(sg.a_drop, v, static_cast<uint32_t>(gi), static_cast<uint32_t>(gk));
    }
    as[i * LDA + kk] = Store<S>::from(v);
  }
#pragma unroll 4
  for (int e = t; e < BK * BN; e += THREADS) {
    const int kk = e / BN, j = e % BN;
    const int64_t gk = k0 + kk, gq = col0 + j;
    float v = 0.0f;
    if (gk < sg.k && gq < q) {
      v = load_f<S>(sg.b.ptr, gk * sg.b.s0 + gq * sg.b.s1);
      if (sg.b_drop.enabled) v = lora_drop_apply(sg.b_drop, v, static_cast<uint32_t>(gk), static_cast<uint32_t>(gq));
    }
    bs[kk * LDB + j] = Store<S>::from(v);
  }
}

template <typename S>
__global__ void __launch_bounds__(THREADS, 1) lora_gemm_kernel(const LoraGemm g) {
  constexpr bool kMma = !std::is_same<S, float>::value;
  __shared__ __align__(32) S as[BM * LDA];
  __shared__ __align__(32) S bs[BK * LDB];
  __shared__ __align__(32) float cs[BM * LDC];
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * BM, col0 = static_cast<int64_t>(blockIdx.y) * BN;
  const int t = threadIdx.x, warp = t / 32;

  if constexpr (kMma) {
    WarpAcc acc[2][2];
    cuda::warp_tile_zero(acc);
    const int wr = (warp / 2) * 32, wc = (warp % 2) * 32;  // this warp's 32x32 sub-tile
#pragma unroll 1
    for (int s = 0; s < g.nseg; ++s) {
      for (int64_t k0 = 0; k0 < g.seg[s].k; k0 += BK) {
        stage<S>(g.seg[s], g.m, g.q, row0, col0, k0, as, bs);
        __syncthreads();
        cuda::warp_tile_mma<BK, true>(acc, as, LDA, bs, LDB, wr, wc);
        __syncthreads();
      }
    }
    cuda::warp_tile_store(cs, LDC, wr, wc, acc);
  } else {
    float acc[4][8];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;
    const int tr = (t / 8) * 4, tc = (t % 8) * 8;
#pragma unroll 1
    for (int s = 0; s < g.nseg; ++s) {
      for (int64_t k0 = 0; k0 < g.seg[s].k; k0 += BK) {
        stage<S>(g.seg[s], g.m, g.q, row0, col0, k0, as, bs);
        __syncthreads();
#pragma unroll 8
        for (int kk = 0; kk < BK; ++kk) {
          float a[4], b[8];
#pragma unroll
          for (int i = 0; i < 4; ++i) a[i] = as[(tr + i) * LDA + kk];
#pragma unroll
          for (int j = 0; j < 8; ++j) b[j] = bs[kk * LDB + tc + j];
#pragma unroll
          for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        __syncthreads();
      }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) cs[(tr + i) * LDC + tc + j] = acc[i][j];
  }
  __syncthreads();

  // fused epilogue: column scale, bias, output dropout, accumulate; one rounding to the storage dtype
  S* c = static_cast<S*>(g.c);
  for (int e = t; e < BM * BN; e += THREADS) {
    const int i = e / BN, j = e % BN;
    const int64_t gi = row0 + i, gq = col0 + j;
    if (gi >= g.m || gq >= g.q) continue;
    const float colscale = g.out_colscale != nullptr ? g.out_colscale[gq] : 1.0f;
    const float bias = g.bias != nullptr ? load_f<S>(g.bias, gq) : 0.0f;
    S* dst = c + gi * g.ldc + gq;
    const float old = g.accumulate ? to_float(*dst) : 0.0f;
    *dst = Store<S>::from(lora_epilogue(cs[i * LDC + j], colscale, bias, g.out_drop, static_cast<uint32_t>(gi),
                                        static_cast<uint32_t>(gq), old));
  }
}

template <typename S>
int launch(const LoraGemm& g, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((g.m + BM - 1) / BM), static_cast<unsigned>((g.q + BN - 1) / BN));
  lora_gemm_kernel<S><<<grid, THREADS, 0, stream>>>(g);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int lora_gemm_launch(const LoraGemm& g, DType dtype, void* stream) {
  if (g.m <= 0 || g.q <= 0) return 0;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::Float32: return launch<float>(g, s);
    case DType::Float16: return launch<fk_half>(g, s);
    case DType::BFloat16: return launch<fk_bf16>(g, s);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // namespace forgetkern
