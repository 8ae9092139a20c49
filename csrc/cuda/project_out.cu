// project_out_ on CUDA: X <- X - U (U^T X) (left) or X <- X - (X V) V^T (right) for many layers in one launch
// per (X dtype, U dtype) pair (view Y, tiling and limits in csrc/include/forgetkern/project_out.h).
//
// Grid: one block per (layer, kProjTileN columns of Y); a table of up to kProjMaxLayers layers travels in the
// kernel arguments (no upload), block b finds its layer by a binary search over the tile prefix sums.
// Phase 1: C = U^T Y_tile (k x kProjTileN, float32) accumulated in registers over kProjTileL-row slabs of U and
// Y staged in shared memory, then stored to shared memory. Phase 2: each slab of Y is read again and
// Y - U C written once, rounded to X's dtype. Slabs are loaded and stored along the unit stride of Y (rows of X
// for both sides: coalesced); the padded shared arrays keep both access orientations free of bank conflicts.
// No reductions across blocks: deterministic.
#include <cuda_runtime.h>

#include <cstdint>

#include "forgetkern/project_out.h"
#include "project_out_launch.h"

namespace forgetkern {
namespace cuda {
namespace {

struct ProjMeta {
  ProjLayer layer[kProjMaxLayers];
  int32_t tile_start[kProjMaxLayers + 1];  // prefix sums of the tiles per layer
  int32_t count;
};
static_assert(sizeof(ProjMeta) < 4000, "kernel parameter limit");

constexpr int kRowsPerPass = kProjThreads / kProjTileN;           // 8
constexpr int kAcc = kProjMaxK / kRowsPerPass;                    // 16 accumulators per thread in phase 1
constexpr int kSlabPerThread = kProjTileL * kProjTileN / kProjThreads;  // 4 elements of a Y slab per thread

template <typename S>
__device__ __forceinline__ float ld(const S* p, int64_t i) {
  return load_as<float>(p[i]);
}

template <typename X, typename U>
__global__ void __launch_bounds__(kProjThreads) project_out_kernel(const __grid_constant__ ProjMeta meta) {
  __shared__ float us[kProjTileL][kProjMaxK + 1];       // U slab (rows l, columns kk)
  __shared__ float ys[kProjTileL][kProjTileN + 1];      // Y slab
  __shared__ float cs[kProjMaxK][kProjTileN];           // C = U^T Y_tile

  // layer of this block: the last layer whose first tile is <= blockIdx.x
  int lo = 0, hi = meta.count - 1;
  const int b = static_cast<int>(blockIdx.x);
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (meta.tile_start[mid] <= b) lo = mid; else hi = mid - 1;
  }
  const ProjLayer& ly = meta.layer[lo];
  X* __restrict__ x = static_cast<X*>(ly.x);
  const U* __restrict__ u = static_cast<const U*>(ly.u);
  const int L = ly.L, n = ly.n, k = ly.k;
  const int64_t s_l = ly.s_l, s_n = ly.s_n, s_ul = ly.s_ul, s_uk = ly.s_uk;
  const int j0 = (b - meta.tile_start[lo]) * kProjTileN;
  const bool rows_unit = s_n == 1;  // Y's unit stride runs along its columns (left) or its rows (right)
  const bool u_rows_unit = s_uk == 1;
  const int t = threadIdx.x;

  // slab element e -> (row l, column j) of the kProjTileL x kProjTileN slab, along Y's unit stride
  auto slab_lj = [&](int e, int* l, int* j) {
    if (rows_unit) { *l = e / kProjTileN; *j = e % kProjTileN; } else { *j = e / kProjTileL; *l = e % kProjTileL; }
  };
  auto load_u_slab = [&](int l0, int rows) {
    const int total = kProjTileL * k;
    for (int e = t; e < total; e += kProjThreads) {
      int l, kk;
      if (u_rows_unit) { l = e / k; kk = e % k; } else { kk = e / kProjTileL; l = e % kProjTileL; }
      us[l][kk] = l < rows ? ld(u, (l0 + l) * s_ul + kk * s_uk) : 0.0f;
    }
  };
  auto load_y_slab = [&](int l0, int rows) {
#pragma unroll
    for (int i = 0; i < kSlabPerThread; ++i) {
      int l, j;
      slab_lj(t + i * kProjThreads, &l, &j);
      ys[l][j] = (l < rows && j0 + j < n) ? ld(x, (l0 + l) * s_l + (j0 + j) * s_n) : 0.0f;
    }
  };

  // phase 1: C = U^T Y_tile; thread t owns column jc of C and rows kr + kRowsPerPass * i
  const int jc = t % kProjTileN;
  const int kr = t / kProjTileN;
  float acc[kAcc];
#pragma unroll
  for (int i = 0; i < kAcc; ++i) acc[i] = 0.0f;
  for (int l0 = 0; l0 < L; l0 += kProjTileL) {
    const int rows = L - l0 < kProjTileL ? L - l0 : kProjTileL;
    __syncthreads();  // the previous slab is consumed
    load_u_slab(l0, rows);
    load_y_slab(l0, rows);
    __syncthreads();
    for (int l = 0; l < kProjTileL; ++l) {
      const float y = ys[l][jc];
#pragma unroll
      for (int i = 0; i < kAcc; ++i) {
        if (i * kRowsPerPass < k) acc[i] = fmaf(us[l][kr + kRowsPerPass * i], y, acc[i]);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kAcc; ++i) {
    if (kr + kRowsPerPass * i < k) cs[kr + kRowsPerPass * i][jc] = acc[i];
  }

  // phase 2: Y <- Y - U C, slab by slab; thread t owns kSlabPerThread elements of the slab, along the unit stride
  for (int l0 = 0; l0 < L; l0 += kProjTileL) {
    const int rows = L - l0 < kProjTileL ? L - l0 : kProjTileL;
    __syncthreads();  // C is stored / the previous slab is consumed
    load_u_slab(l0, rows);
    load_y_slab(l0, rows);
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kSlabPerThread; ++i) {
      int l, j;
      slab_lj(t + i * kProjThreads, &l, &j);
      float uc = 0.0f;
      for (int kk = 0; kk < k; ++kk) uc = fmaf(us[l][kk], cs[kk][j], uc);
      if (l < rows && j0 + j < n) {
        x[(l0 + l) * s_l + (j0 + j) * s_n] = Store<X>::from(ys[l][j] - uc);
      }
    }
  }
}

template <typename X, typename U>
cudaError_t launch_typed(int64_t n, const ProjLayer* layers, cudaStream_t stream) {
  ProjMeta meta{};
  int64_t i = 0;
  while (i < n) {
    meta.count = 0;
    int32_t tiles = 0;
    for (; i < n && meta.count < kProjMaxLayers; ++i) {
      const ProjLayer& ly = layers[i];
      if (ly.L <= 0 || ly.n <= 0 || ly.k <= 0) continue;
      if (ly.k > kProjMaxK) return cudaErrorInvalidValue;
      const int32_t nt = proj_tiles(ly.n);
      if (static_cast<int64_t>(tiles) + nt > INT32_MAX) break;
      meta.layer[meta.count] = ly;
      meta.tile_start[meta.count] = tiles;
      ++meta.count;
      tiles += nt;
    }
    if (meta.count == 0) continue;
    meta.tile_start[meta.count] = tiles;
    project_out_kernel<X, U><<<tiles, kProjThreads, 0, stream>>>(meta);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename Fn>
bool dispatch_storage(DType t, Fn&& fn) {  // the storage types of the float32-compute kernels
  switch (t) {
    case DType::Float32: fn(float{}); return true;
    case DType::Float16: fn(fk_half{}); return true;
    case DType::BFloat16: fn(fk_bf16{}); return true;
    default: return false;
  }
}

}  // namespace

cudaError_t project_out_launch(int64_t n, const ProjLayer* layers, DType x_dtype, DType u_dtype,
                               cudaStream_t stream) {
  cudaError_t err = cudaErrorInvalidValue;
  dispatch_storage(x_dtype, [&](auto x_tag) {
    dispatch_storage(u_dtype, [&](auto u_tag) {
      err = launch_typed<decltype(x_tag), decltype(u_tag)>(n, layers, stream);
    });
  });
  return err;
}

}  // namespace cuda
}  // namespace forgetkern
