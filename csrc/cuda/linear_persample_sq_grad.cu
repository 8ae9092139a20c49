// linear_persample_sq_grad_ on CUDA: the per-sample weight-gradient GEMM with a "square, drop non-finite, sum
// over samples" epilogue (math in forgetkern/linear_persample_sq_grad.h).
//
// One block per 64x64 tile of F (rows: output features, columns: input features), 128 threads, and a range of
// samples (grid y = sample split). For each sample the block runs the GEMM over the sample's tokens in steps
// of 32 into a per-sample fp32 accumulator, then squares it (sample granularity) and adds the finite elements
// into a second fp32 accumulator; both live in registers, so no per-sample gradient ever reaches memory.
// Masked tokens are staged as zeros and never read.
// * 16-bit inputs, sample granularity: operands staged in shared memory in their own type (g^T as a
//   column-major A tile: the global layout), multiplied with WMMA 16x16x16 (tensor cores, fp32 accumulation);
//   both accumulators are WMMA accumulator fragments of the same shape, whose element layouts coincide, so the
//   epilogue works element by element on the fragments.
// * fp32 inputs, and token granularity (squared operands, in fp32): the same staging in fp32 with a 4x8
//   register tile of FMAs per thread.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "forgetkern/linear_persample_sq_grad.h"
#include "wmma_tile.cuh"

namespace forgetkern {
namespace {

using cuda::WarpAcc;

constexpr int BM = kPsgBM, BN = kPsgBN, BK = 32, THREADS = 128;
constexpr int LDA = BM + 8, LDB = BN + 8, LDC = BN + 4;  // padded leading dims (multiples of 8 / 4 for WMMA)
constexpr int FINISH_THREADS = 256;

// Stage the tiles of sample `n` at token t0 into shared memory (storage D: S for WMMA, float otherwise):
//   as[k][i] = g[n, t0+k, row0+i]   (A = g^T, column-major: k-th column contiguous, like g in memory)
//   bs[k][j] = x[n, t0+k, col0+j]
// squared when SQUARE. Tokens past T or masked, and features past the edges, are zeros.
template <typename S, typename D, bool SQUARE>
__device__ __forceinline__ void stage(const PsgArgs& a, int64_t n, int64_t t0, int64_t row0, int64_t col0, D* as,
                                      D* bs, bool* keep) {
  const int t = threadIdx.x;
  if (t < BK) {
    const int64_t tt = t0 + t;
    keep[t] = tt < a.t && (a.mask == nullptr || a.mask[n * a.mask_sn + tt] != 0);
  }
  __syncthreads();
  const S* g = static_cast<const S*>(a.g) + n * a.g_sn;
  const S* x = static_cast<const S*>(a.x) + n * a.x_sn;
#pragma unroll 4
  for (int e = t; e < BK * BM; e += THREADS) {
    const int k = e / BM, i = e % BM;
    const int64_t gi = row0 + i;
    float v = 0.0f;
    if (keep[k] && gi < a.d_out) v = to_float(g[(t0 + k) * a.g_st + gi]);
    if (SQUARE) v = fk_mul(v, v);
    as[k * LDA + i] = Store<D>::from(v);
  }
#pragma unroll 4
  for (int e = t; e < BK * BN; e += THREADS) {
    const int k = e / BN, j = e % BN;
    const int64_t gj = col0 + j;
    float v = 0.0f;
    if (keep[k] && gj < a.d_in) v = to_float(x[(t0 + k) * a.x_st + gj]);
    if (SQUARE) v = fk_mul(v, v);
    bs[k * LDB + j] = Store<D>::from(v);
  }
}

// Final per-element step of a block: F update (no split) or the partial into the workspace.
template <typename F>
__device__ __forceinline__ void emit(const PsgArgs& a, int64_t gi, int64_t gj, float sum, bool& ok) {
  if (gi >= a.d_out || gj >= a.d_in) return;
  const int64_t idx = gi * a.d_in + gj;
  if (a.splits > 1) {
    a.workspace[static_cast<int64_t>(blockIdx.y) * a.d_out * a.d_in + idx] = sum;
  } else {
    F* f = static_cast<F*>(a.fisher);
    f[idx] = psg_store(f[idx], sum, a.scale, ok);
  }
}

__device__ __forceinline__ void sample_range(const PsgArgs& a, int64_t* n0, int64_t* n1) {
  const int64_t per = (a.n + a.splits - 1) / a.splits;
  *n0 = static_cast<int64_t>(blockIdx.y) * per;
  *n1 = *n0 + per < a.n ? *n0 + per : a.n;
}

template <typename S, typename F>
__global__ void __launch_bounds__(THREADS) psg_wmma_kernel(const PsgArgs a) {
  __shared__ __align__(32) S as[BK * LDA];
  __shared__ __align__(32) S bs[BK * LDB];
  __shared__ __align__(32) float cs[BM * LDC];
  __shared__ bool keep[BK];
  const int64_t row0 = static_cast<int64_t>(blockIdx.x / ((a.d_in + BN - 1) / BN)) * BM;
  const int64_t col0 = static_cast<int64_t>(blockIdx.x % ((a.d_in + BN - 1) / BN)) * BN;
  const int warp = threadIdx.x / 32;
  const int wr = (warp / 2) * 32, wc = (warp % 2) * 32;  // this warp's 32x32 sub-tile
  WarpAcc acc_f[2][2];
  cuda::warp_tile_zero(acc_f);
  bool ok = true;
  int64_t n0, n1;
  sample_range(a, &n0, &n1);
#pragma unroll 1
  for (int64_t n = n0; n < n1; ++n) {
    WarpAcc acc[2][2];
    cuda::warp_tile_zero(acc);
#pragma unroll 1
    for (int64_t t0 = 0; t0 < a.t; t0 += BK) {
      stage<S, S, false>(a, n, t0, row0, col0, as, bs, keep);
      __syncthreads();
      cuda::warp_tile_mma<BK, false>(acc, as, LDA, bs, LDB, wr, wc);
      __syncthreads();
    }
    // same fragment type, same element layout: square and accumulate element by element
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int e = 0; e < acc[i][j].num_elements; ++e)
          ok &= psg_accumulate(acc_f[i][j].x[e], psg_contribution(acc[i][j].x[e], false));
  }
  cuda::warp_tile_store(cs, LDC, wr, wc, acc_f);
  __syncthreads();
#pragma unroll 4
  for (int e = threadIdx.x; e < BM * BN; e += THREADS) {
    const int i = e / BN, j = e % BN;
    emit<F>(a, row0 + i, col0 + j, cs[i * LDC + j], ok);
  }
  if (!ok) *a.found = 1.0f;  // every writer stores the same value
}

template <typename S, typename F, bool TOKEN>
__global__ void __launch_bounds__(THREADS) psg_simt_kernel(const PsgArgs a) {
  __shared__ __align__(16) float as[BK * LDA];
  __shared__ __align__(16) float bs[BK * LDB];
  __shared__ bool keep[BK];
  const int64_t row0 = static_cast<int64_t>(blockIdx.x / ((a.d_in + BN - 1) / BN)) * BM;
  const int64_t col0 = static_cast<int64_t>(blockIdx.x % ((a.d_in + BN - 1) / BN)) * BN;
  const int tr = (threadIdx.x / 8) * 4, tc = (threadIdx.x % 8) * 8;  // this thread's 4x8 outputs
  float acc_f[4][8];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc_f[i][j] = 0.0f;
  bool ok = true;
  int64_t n0, n1;
  sample_range(a, &n0, &n1);
#pragma unroll 1
  for (int64_t n = n0; n < n1; ++n) {
    float acc[4][8];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;
#pragma unroll 1
    for (int64_t t0 = 0; t0 < a.t; t0 += BK) {
      stage<S, float, TOKEN>(a, n, t0, row0, col0, as, bs, keep);
      __syncthreads();
#pragma unroll 4
      for (int k = 0; k < BK; ++k) {
        float va[4], vb[8];
#pragma unroll
        for (int i = 0; i < 4; ++i) va[i] = as[k * LDA + tr + i];
#pragma unroll
        for (int j = 0; j < 8; ++j) vb[j] = bs[k * LDB + tc + j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(va[i], vb[j], acc[i][j]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) ok &= psg_accumulate(acc_f[i][j], psg_contribution(acc[i][j], TOKEN));
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) emit<F>(a, row0 + tr + i, col0 + tc + j, acc_f[i][j], ok);
  if (!ok) *a.found = 1.0f;
}

// F += scale * sum_s workspace[s] (fixed order of s: deterministic).
template <typename F>
__global__ void __launch_bounds__(FINISH_THREADS) psg_finish_kernel(const PsgArgs a) {
  const int64_t numel = a.d_out * a.d_in;
  F* f = static_cast<F*>(a.fisher);
  bool ok = true;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * FINISH_THREADS + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * FINISH_THREADS) {
    float sum = 0.0f;
    for (int64_t s = 0; s < a.splits; ++s) sum = fk_add(sum, a.workspace[s * numel + i]);
    f[i] = psg_store(f[i], sum, a.scale, ok);
  }
  if (!ok) *a.found = 1.0f;
}

template <typename S, typename F>
int launch_typed(const PsgArgs& a, cudaStream_t stream) {
  const int64_t tiles = ((a.d_out + BM - 1) / BM) * ((a.d_in + BN - 1) / BN);
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(a.splits));
  if (a.token) {
    psg_simt_kernel<S, F, true><<<grid, THREADS, 0, stream>>>(a);
  } else if constexpr (std::is_same<S, float>::value) {
    psg_simt_kernel<S, F, false><<<grid, THREADS, 0, stream>>>(a);
  } else {
    psg_wmma_kernel<S, F><<<grid, THREADS, 0, stream>>>(a);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || a.splits <= 1) return static_cast<int>(err);
  const int64_t numel = a.d_out * a.d_in;
  int64_t blocks = (numel + FINISH_THREADS - 1) / FINISH_THREADS;
  if (blocks > 65535) blocks = 65535;
  psg_finish_kernel<F><<<static_cast<unsigned>(blocks), FINISH_THREADS, 0, stream>>>(a);
  return static_cast<int>(cudaGetLastError());
}

template <typename S>
int launch_state(const PsgArgs& a, cudaStream_t stream) {
  switch (a.fisher_dtype) {
    case DType::Float32: return launch_typed<S, float>(a, stream);
    case DType::BFloat16: return launch_typed<S, fk_bf16>(a, stream);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // namespace

int64_t psg_plan_splits(int64_t n, int64_t d_out, int64_t d_in) {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) !=
                                                 cudaSuccess) {
    return 1;
  }
  const int64_t tiles = ((d_out + BM - 1) / BM) * ((d_in + BN - 1) / BN);
  return psg_num_splits(n, tiles, d_out * d_in, sms);
}

int psg_launch(const PsgArgs& a, void* stream) {
  if (a.n <= 0 || a.t <= 0 || a.d_out <= 0 || a.d_in <= 0) return 0;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (a.in_dtype) {
    case DType::Float32: return launch_state<float>(a, s);
    case DType::Float16: return launch_state<fk_half>(a, s);
    case DType::BFloat16: return launch_state<fk_bf16>(a, s);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // namespace forgetkern
