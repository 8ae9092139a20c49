// A warp's 32x32 output tile on tensor cores (WMMA 16x16x16, fp16/bf16 in, fp32 accumulate), shared by the
// segmented LoRA GEMM (lora_linear.cu) and the per-sample squared-gradient GEMM (linear_persample_sq_grad.cu):
//
//   acc[i][j] (16x16, i, j in {0, 1})  +=  A[wr + 16 i .., k] * B[k, wc + 16 j ..]   over k in one staged BK slice
//
// A and B are staged in shared memory by the caller: B row-major [BK][ldb]; A row-major [rows][lda]
// (A_ROW_MAJOR) or column-major [BK][lda] (element (r, k) at k * lda + r). nvcc only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include "forgetkern/common.h"

namespace forgetkern {
namespace cuda {

template <typename S> struct WmmaType;
template <> struct WmmaType<fk_half> { using type = __half; };
template <> struct WmmaType<fk_bf16> { using type = __nv_bfloat16; };

using WarpAcc = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;

__device__ __forceinline__ void warp_tile_zero(WarpAcc (&acc)[2][2]) {
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.0f);
}

// acc += A[wr.., kslice] B[kslice, wc..] over one staged BK-deep slice (BK a multiple of 16).
template <int BK, bool A_ROW_MAJOR, typename S>
__device__ __forceinline__ void warp_tile_mma(WarpAcc (&acc)[2][2], const S* as, int lda, const S* bs, int ldb,
                                              int wr, int wc) {
  namespace wm = nvcuda::wmma;
  using T = typename WmmaType<S>::type;
  using ALayout = typename std::conditional<A_ROW_MAJOR, wm::row_major, wm::col_major>::type;
#pragma unroll
  for (int kk = 0; kk < BK; kk += 16) {
    wm::fragment<wm::matrix_a, 16, 16, 16, T, ALayout> fa[2];
    wm::fragment<wm::matrix_b, 16, 16, 16, T, wm::row_major> fb[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const S* p = A_ROW_MAJOR ? as + (wr + i * 16) * lda + kk : as + kk * lda + wr + i * 16;
      wm::load_matrix_sync(fa[i], reinterpret_cast<const T*>(p), lda);
    }
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wm::load_matrix_sync(fb[j], reinterpret_cast<const T*>(bs + kk * ldb + wc + j * 16), ldb);
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wm::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
  }
}

// cs[wr + r][wc + c] = acc (row-major, leading dimension ldc, fp32 in shared memory).
__device__ __forceinline__ void warp_tile_store(float* cs, int ldc, int wr, int wc, const WarpAcc (&acc)[2][2]) {
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      nvcuda::wmma::store_matrix_sync(cs + (wr + i * 16) * ldc + wc + j * 16, acc[i][j], ldc,
                                      nvcuda::wmma::mem_row_major);
}

}  // namespace cuda
}  // namespace forgetkern
