// ewc_delta_w on CUDA: EWC penalty of LoRA updates s B A and its factor gradients, never materialising B A
// (math in csrc/include/forgetkern/ewc_delta_w.h and forgetkern/ops/ewc_delta_w.py).
//
// Tile kernel: one block per row of a work table (layer, row chunk of kEdwChunk rows, column tile of BN
// columns). The block stages its A tile (r x BN) in shared memory once, then per BM-row tile stages B's rows
// (BM x r), recomputes d = B A (k ascending, IEEE add/multiply, no FMA), reads F once, keeps g = F * d in shared
// memory, accumulates sum(g * d) per thread and the chunk's B^T g (r x BN) in registers, and writes the row
// tile's g A^T (BM x r) into its own workspace slot. At the end it writes its B^T g partial and its penalty
// partial s^2 * sum (a fixed-shape block tree, double) into their own slots.
// Reduce kernel: one block per gradient tile adds that tile's partials in slot order (chunks for dA, column
// tiles for dB), scales by C(s^2 lam) and adds into the gradient, rounded once. Finalize: one block sums the
// penalty partials in a fixed order. No float atomics anywhere: bitwise reproducible run to run.
#include <cuda_runtime.h>

#include <cstdint>

#include "device_utils.cuh"
#include "forgetkern/ewc_delta_w.h"
#include "launchers.h"

namespace forgetkern {
namespace cuda {
namespace {

constexpr int kEdwBM = 32;
constexpr int kEdwMaxRank = 64;
constexpr int kEdwChunk = 8 * kEdwBM;

template <typename C>
struct EdwTile {
  static constexpr int kBN = sizeof(C) == 8 ? 32 : 64;  // shared memory: A, B, g tiles under 48 KiB
  static constexpr int kAPer = kEdwMaxRank * kBN / kCudaBlockThreads;  // dA entries per thread
  static constexpr int kBPer = kEdwBM * kEdwMaxRank / kCudaBlockThreads;  // dB entries per thread
  static constexpr int kEPer = kEdwBM * kBN / kCudaBlockThreads;  // g entries per thread
  static_assert(kAPer * kCudaBlockThreads == kEdwMaxRank * kBN && kBPer * kCudaBlockThreads == kEdwBM * kEdwMaxRank &&
                    kEPer * kCudaBlockThreads == kEdwBM * kBN,
                "the tiles must split evenly over the block's threads");
};

template <typename S, typename F>
__global__ void __launch_bounds__(kCudaBlockThreads)
    edw_tile_kernel(const EdwTileRow* __restrict__ table, const double* __restrict__ s2s,
                    typename ComputeOf<S>::type* __restrict__ ws_a, typename ComputeOf<S>::type* __restrict__ ws_b,
                    double* __restrict__ partials, bool write_grad) {
  using C = typename ComputeOf<S>::type;
  using T = EdwTile<C>;
  constexpr int BN = T::kBN;
  __shared__ C s_a[kEdwMaxRank][BN + 1];  // + 1: the g A^T loop reads a column per warp (no bank conflicts)
  __shared__ C s_b[kEdwBM][kEdwMaxRank];
  __shared__ C s_g[kEdwBM][BN];
  const EdwTileRow w = table[blockIdx.x];
  const S* __restrict__ a = static_cast<const S*>(w.a);
  const S* __restrict__ b = static_cast<const S*>(w.b);
  const F* __restrict__ f = static_cast<const F*>(w.f);
  const int t = threadIdx.x;
  const int64_t r = w.r;
  for (int idx = t; idx < kEdwMaxRank * BN; idx += kCudaBlockThreads) {
    const int k = idx / BN, j = idx % BN;
    const int64_t col = w.n0 + j;
    s_a[k][j] = (k < r && col < w.n_in) ? load_as<C>(a[k * w.n_in + col]) : C(0);
  }
  C acc_a[T::kAPer];
#pragma unroll
  for (int q = 0; q < T::kAPer; ++q) acc_a[q] = C(0);
  C pen = C(0);
  for (int64_t m0 = w.m_start; m0 < w.m_end; m0 += kEdwBM) {
    __syncthreads();  // the previous tile's readers of s_b / s_g are done (and s_a is staged)
    for (int idx = t; idx < kEdwBM * kEdwMaxRank; idx += kCudaBlockThreads) {
      const int i = idx / kEdwMaxRank, k = idx % kEdwMaxRank;
      const int64_t row = m0 + i;
      s_b[i][k] = (k < r && row < w.n_out) ? load_as<C>(b[row * r + k]) : C(0);
    }
    __syncthreads();
#pragma unroll
    for (int q = 0; q < T::kEPer; ++q) {
      const int idx = t + q * kCudaBlockThreads;
      const int i = idx / BN, j = idx % BN;
      const int64_t row = m0 + i, col = w.n0 + j;
      C d = C(0);
      for (int64_t k = 0; k < r; ++k) d = fk_add(d, fk_mul(s_b[i][k], s_a[k][j]));
      const C g = (row < w.n_out && col < w.n_in) ? edw_g<C>(f[row * w.n_in + col], d) : C(0);
      pen = fk_add(pen, edw_term(g, d));
      s_g[i][j] = g;
    }
    if (!write_grad) continue;
    __syncthreads();
#pragma unroll
    for (int q = 0; q < T::kAPer; ++q) {  // B^T g of this row tile, i ascending
      const int idx = t + q * kCudaBlockThreads;
      const int k = idx / BN, j = idx % BN;
      if (k < r) {
        C s = C(0);
        for (int i = 0; i < kEdwBM; ++i) s = fk_add(s, fk_mul(s_b[i][k], s_g[i][j]));
        acc_a[q] = fk_add(acc_a[q], s);
      }
    }
    C* __restrict__ slot_b = ws_b + w.wsb_base + ((m0 / kEdwBM) * w.wsb_mstride);
#pragma unroll
    for (int q = 0; q < T::kBPer; ++q) {  // g A^T of this row tile, j ascending
      const int idx = t + q * kCudaBlockThreads;
      const int i = idx / kEdwMaxRank, k = idx % kEdwMaxRank;
      C s = C(0);
      if (k < r) {
        for (int j = 0; j < BN; ++j) s = fk_add(s, fk_mul(s_g[i][j], s_a[k][j]));
      }
      slot_b[idx] = s;
    }
  }
  if (write_grad) {
    C* __restrict__ slot_a = ws_a + w.wsa_slot;
#pragma unroll
    for (int q = 0; q < T::kAPer; ++q) slot_a[t + q * kCudaBlockThreads] = acc_a[q];
  }
  pen = block_sum(pen);
  if (t == 0) partials[blockIdx.x] = fk_mul(static_cast<double>(pen), s2s[w.layer]);
}

// One block per gradient tile (rows x cols elements at g + base, row stride ld): the sum of n_parts partial
// tiles (stride elements apart; each tile rows x cols row-major) in slot order, times coef, added into g.
template <typename S>
__global__ void __launch_bounds__(kCudaBlockThreads)
    edw_reduce_kernel(const EdwReduceRow* __restrict__ table, const double* __restrict__ s2s, double lam,
                      const typename ComputeOf<S>::type* __restrict__ ws) {
  using C = typename ComputeOf<S>::type;
  const EdwReduceRow w = table[blockIdx.x];
  S* __restrict__ g = static_cast<S*>(w.g);
  const C coef = static_cast<C>(s2s[w.layer] * lam);
  for (int64_t idx = threadIdx.x; idx < w.rows * w.cols; idx += kCudaBlockThreads) {
    const int64_t i = idx / w.cols, j = idx % w.cols;
    if (i >= w.nrows || j >= w.ncols) continue;
    C acc = C(0);
    for (int64_t p = 0; p < w.n_parts; ++p) acc = fk_add(acc, ws[w.ws_off + p * w.stride + idx]);
    S* __restrict__ dst = g + w.base + i * w.ld + j;
    *dst = edw_grad_add<C>(*dst, acc, coef);
  }
}

__global__ void __launch_bounds__(kCudaBlockThreads)
    edw_finalize_kernel(const double* __restrict__ partials, int64_t n, double lam, void* out, bool out_double) {
  double v = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kCudaBlockThreads) v = fk_add(v, partials[i]);
  v = block_sum(v);
  if (threadIdx.x == 0) {
    if (out_double) {
      *static_cast<double*>(out) = edw_finalize<double>(v, lam);
    } else {
      *static_cast<float*>(out) = edw_finalize<float>(v, lam);
    }
  }
}

}  // namespace

int edw_block_n(DType factor_dtype) {
  return factor_dtype == DType::Float64 ? EdwTile<double>::kBN : EdwTile<float>::kBN;
}
int edw_block_m() { return kEdwBM; }
int edw_chunk_m() { return kEdwChunk; }
int edw_max_rank() { return kEdwMaxRank; }

cudaError_t ewc_delta_w_launch(const EdwTileRow* tiles, int64_t n_tiles, const EdwReduceRow* red_a,
                               int64_t n_red_a, const EdwReduceRow* red_b, int64_t n_red_b, const double* s2s,
                               DType factor_dtype, DType fisher_dtype, double lam, void* ws_a, void* ws_b,
                               double* partials, bool write_grad, cudaStream_t stream) {
  cudaError_t err = cudaErrorInvalidValue;
  if (n_tiles <= 0) return cudaSuccess;
  dispatch_dtype<true>(factor_dtype, [&](auto s_tag) {
    dispatch_dtype<true>(fisher_dtype, [&](auto f_tag) {
      using S = decltype(s_tag);
      using F = decltype(f_tag);
      using C = typename ComputeOf<S>::type;
      edw_tile_kernel<S, F><<<static_cast<unsigned>(n_tiles), kCudaBlockThreads, 0, stream>>>(
          tiles, s2s, static_cast<C*>(ws_a), static_cast<C*>(ws_b), partials, write_grad);
      err = cudaGetLastError();
      if (err != cudaSuccess || !write_grad) return;
      if (n_red_a > 0) {
        edw_reduce_kernel<S><<<static_cast<unsigned>(n_red_a), kCudaBlockThreads, 0, stream>>>(
            red_a, s2s, lam, static_cast<const C*>(ws_a));
      }
      if (n_red_b > 0) {
        edw_reduce_kernel<S><<<static_cast<unsigned>(n_red_b), kCudaBlockThreads, 0, stream>>>(
            red_b, s2s, lam, static_cast<const C*>(ws_b));
      }
      err = cudaGetLastError();
    });
  });
  return err;
}

cudaError_t ewc_delta_w_finalize_launch(const double* partials, int64_t n, double lam, void* out, bool out_double,
                                        cudaStream_t stream) {
  edw_finalize_kernel<<<1, kCudaBlockThreads, 0, stream>>>(partials, n, lam, out, out_double);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace forgetkern
