// olora_loss on CUDA: the O-LoRA orthogonality loss and its gradient over many layers, one launch sequence per
// (past dtype, cur dtype) pair (math, tiling and the two kernels' roles in csrc/include/forgetkern/olora_loss.h).
// A table of up to kOloraMaxLayers layers travels in the kernel arguments (no upload); block b finds its layer by
// a binary search over the tile prefix sums. Reductions: per thread in a fixed order, a shuffle tree per warp,
// the warp sums in order, one double slot per block, the slots added in order by one block: deterministic.
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "forgetkern/olora_loss.h"
#include "olora_loss_launch.h"

namespace forgetkern {
namespace cuda {
namespace {

struct OloraMeta {
  OloraLayer layer[kOloraMaxLayers];
  int32_t tile_start[kOloraMaxLayers + 1];
  int32_t count;
  int64_t block_offset;  // workspace slot of block 0 of this launch (forward)
};
static_assert(sizeof(OloraMeta) < 4000, "kernel parameter limit");

constexpr int kFwdRows = kOloraThreads / kOloraTileR;                        // 8 rows of the P tile per pass
constexpr int kFwdAcc = kOloraTileP / kFwdRows;                              // 4 entries of P per thread
constexpr int kSlab = kOloraTileP * kOloraTileK / kOloraThreads;             // 4 slab elements per thread
constexpr int kGradRows = kOloraThreads / kOloraGradK;                       // 4 rows of dA per pass
constexpr int kGradAcc = kOloraTileR / kGradRows;                            // 8 entries of dA per thread
constexpr int kGradSlab = kOloraTileP * kOloraGradK / kOloraThreads;         // 8 elements of A_past per thread
static_assert(kOloraTileP == kOloraTileR, "the slab loads share one mapping");

__device__ __forceinline__ int find_layer(const OloraMeta& meta, int b) {
  int lo = 0, hi = meta.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (meta.tile_start[mid] <= b) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// Sum over a block of kOloraThreads threads in a fixed order; valid in thread 0.
__device__ __forceinline__ double block_sum_fixed(double v) {
  __shared__ double warp_sums[kOloraThreads / 32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xFFFFFFFFu, v, o);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = v;
  __syncthreads();
  double s = 0.0;
  if (threadIdx.x == 0) {
    for (int w = 0; w < kOloraThreads / 32; ++w) s += warp_sums[w];
  }
  return s;
}

// P tile (layer, p0.., r0..) in registers: thread t owns column c = t % kOloraTileR of the tile and rows
// t / kOloraTileR + kFwdRows * i.
template <typename PT, typename CT>
__device__ __forceinline__ void p_tile(const OloraLayer& ly, int p0, int r0, float (&acc)[kFwdAcc]) {
  __shared__ float ap[kOloraTileP][kOloraTileK + 1];
  __shared__ float ac[kOloraTileR][kOloraTileK + 1];
  const PT* __restrict__ past = static_cast<const PT*>(ly.past);
  const CT* __restrict__ cur = static_cast<const CT*>(ly.cur);
  const int t = threadIdx.x, c = t % kOloraTileR, a = t / kOloraTileR;
  const int K = ly.K;
#pragma unroll
  for (int i = 0; i < kFwdAcc; ++i) acc[i] = 0.0f;
  for (int k0 = 0; k0 < K; k0 += kOloraTileK) {
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kSlab; ++i) {
      const int e = t + i * kOloraThreads, row = e / kOloraTileK, col = e % kOloraTileK;
      const bool kin = k0 + col < K;
      ap[row][col] = (kin && p0 + row < ly.p) ? load_as<float>(past[int64_t(p0 + row) * K + k0 + col]) : 0.0f;
      ac[row][col] = (kin && r0 + row < ly.r) ? load_as<float>(cur[int64_t(r0 + row) * K + k0 + col]) : 0.0f;
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kOloraTileK; ++kk) {
      const float y = ac[c][kk];
#pragma unroll
      for (int i = 0; i < kFwdAcc; ++i) acc[i] = fmaf(ap[a + kFwdRows * i][kk], y, acc[i]);
    }
  }
}

template <int NORM, typename PT, typename CT>
__global__ void __launch_bounds__(kOloraThreads)
    olora_fwd_kernel(const __grid_constant__ OloraMeta meta, double* __restrict__ workspace) {
  const int b = static_cast<int>(blockIdx.x);
  const int li = find_layer(meta, b);
  const OloraLayer& ly = meta.layer[li];
  const int tile = b - meta.tile_start[li];
  const int tiles_r = olora_ceil(ly.r, kOloraTileR);
  const int p0 = (tile / tiles_r) * kOloraTileP, r0 = (tile % tiles_r) * kOloraTileR;
  float acc[kFwdAcc];
  p_tile<PT, CT>(ly, p0, r0, acc);
  const int c = threadIdx.x % kOloraTileR, a = threadIdx.x / kOloraTileR;
  float s = 0.0f;
#pragma unroll
  for (int i = 0; i < kFwdAcc; ++i) {
    if (p0 + a + kFwdRows * i < ly.p && r0 + c < ly.r) s += olora_term<NORM>(acc[i]);
  }
  const double total = block_sum_fixed(static_cast<double>(s));
  if (threadIdx.x == 0) workspace[meta.block_offset + b] = total;
}

template <int NORM, typename PT, typename CT>
__global__ void __launch_bounds__(kOloraThreads)
    olora_seed_kernel(const __grid_constant__ OloraMeta meta, const float* __restrict__ grad_out,
                      float* __restrict__ scratch) {
  const int b = static_cast<int>(blockIdx.x);
  const int li = find_layer(meta, b);
  const int tile = b - meta.tile_start[li];
  const int p = meta.layer[li].p, r = meta.layer[li].r;
  const int tiles_r = olora_ceil(r, kOloraTileR);
  const int p0 = (tile / tiles_r) * kOloraTileP, r0 = (tile % tiles_r) * kOloraTileR;
  float acc[kFwdAcc];
  p_tile<PT, CT>(meta.layer[li], p0, r0, acc);
  const float g = __ldg(grad_out);
  const int c = threadIdx.x % kOloraTileR, a = threadIdx.x / kOloraTileR;
  float* __restrict__ s = scratch + meta.layer[li].s_off + int64_t(p0 + a) * r + r0 + c;
#pragma unroll
  for (int i = 0; i < kFwdAcc; ++i) {
    if (p0 + a + kFwdRows * i < p && r0 + c < r) s[int64_t(kFwdRows * i) * r] = olora_seed<NORM>(acc[i], g);
  }
}

// dA tile (layer, rows c0.., columns k0..): thread t owns column kc = t % kOloraGradK, rows
// t / kOloraGradK + kGradRows * i.
template <typename PT, typename CT>
__global__ void __launch_bounds__(kOloraThreads)
    olora_grad_kernel(const __grid_constant__ OloraMeta meta, const float* __restrict__ scratch) {
  __shared__ float ss[kOloraTileP][kOloraTileR + 1];   // S slab: rows a (past), columns c (cur)
  __shared__ float ap[kOloraTileP][kOloraGradK];       // A_past slab
  const int b = static_cast<int>(blockIdx.x);
  const int li = find_layer(meta, b);
  const OloraLayer& ly = meta.layer[li];
  const int tile = b - meta.tile_start[li];
  const int tiles_k = olora_ceil(ly.K, kOloraGradK);
  const int c0 = (tile / tiles_k) * kOloraTileR, k0 = (tile % tiles_k) * kOloraGradK;
  const PT* __restrict__ past = static_cast<const PT*>(ly.past);
  CT* __restrict__ grad = static_cast<CT*>(ly.grad);
  const int t = threadIdx.x, kc = t % kOloraGradK, cr = t / kOloraGradK;
  const int p = ly.p, r = ly.r, K = ly.K;
  float acc[kGradAcc];
#pragma unroll
  for (int i = 0; i < kGradAcc; ++i) acc[i] = 0.0f;
  for (int a0 = 0; a0 < p; a0 += kOloraTileP) {
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kSlab; ++i) {
      const int e = t + i * kOloraThreads, row = e / kOloraTileR, col = e % kOloraTileR;
      ss[row][col] = (a0 + row < p && c0 + col < r) ? scratch[ly.s_off + int64_t(a0 + row) * r + c0 + col] : 0.0f;
    }
#pragma unroll
    for (int i = 0; i < kGradSlab; ++i) {
      const int e = t + i * kOloraThreads, row = e / kOloraGradK, col = e % kOloraGradK;
      ap[row][col] = (a0 + row < p && k0 + col < K) ? load_as<float>(past[int64_t(a0 + row) * K + k0 + col]) : 0.0f;
    }
    __syncthreads();
#pragma unroll 8
    for (int a = 0; a < kOloraTileP; ++a) {
      const float x = ap[a][kc];
#pragma unroll
      for (int i = 0; i < kGradAcc; ++i) acc[i] = fmaf(ss[a][cr + kGradRows * i], x, acc[i]);
    }
  }
#pragma unroll
  for (int i = 0; i < kGradAcc; ++i) {
    const int row = c0 + cr + kGradRows * i;
    if (row < r && k0 + kc < K) grad[int64_t(row) * K + k0 + kc] = Store<CT>::from(acc[i]);
  }
}

__global__ void __launch_bounds__(kOloraThreads)
    olora_finalize_kernel(const double* __restrict__ workspace, int64_t slots, float* __restrict__ out) {
  double v = 0.0;
  for (int64_t i = threadIdx.x; i < slots; i += kOloraThreads) v += workspace[i];
  v = block_sum_fixed(v);
  if (threadIdx.x == 0) *out = static_cast<float>(v);
}

// Calls launch(meta, blocks) for consecutive batches of the layers `keep` accepts, tiles(layer) blocks each.
template <typename Keep, typename Tiles, typename Launch>
cudaError_t for_batches(int64_t n, const OloraLayer* layers, Keep keep, Tiles tiles_of, Launch launch) {
  OloraMeta meta{};
  meta.block_offset = 0;
  int64_t i = 0;
  while (i < n) {
    meta.count = 0;
    int32_t tiles = 0;
    for (; i < n && meta.count < kOloraMaxLayers; ++i) {
      if (!keep(layers[i])) continue;
      const int32_t nt = tiles_of(layers[i]);
      if (static_cast<int64_t>(tiles) + nt > INT32_MAX) break;
      meta.layer[meta.count] = layers[i];
      meta.tile_start[meta.count] = tiles;
      ++meta.count;
      tiles += nt;
    }
    if (meta.count == 0) continue;
    meta.tile_start[meta.count] = tiles;
    const cudaError_t err = launch(meta, tiles);
    if (err != cudaSuccess) return err;
    meta.block_offset += tiles;
  }
  return cudaSuccess;
}

bool has_p(const OloraLayer& ly) { return ly.p > 0 && ly.r > 0; }
bool has_grad(const OloraLayer& ly) { return ly.r > 0 && ly.K > 0; }
int32_t fwd_tiles(const OloraLayer& ly) { return olora_fwd_tiles(ly.p, ly.r); }
int32_t grad_tiles(const OloraLayer& ly) { return olora_grad_tiles(ly.r, ly.K); }

template <typename Fn>
bool dispatch_storage(DType t, Fn&& fn) {  // the storage types of the float32-compute kernels
  switch (t) {
    case DType::Float32: fn(float{}); return true;
    case DType::Float16: fn(fk_half{}); return true;
    case DType::BFloat16: fn(fk_bf16{}); return true;
    default: return false;
  }
}

template <typename Fn>
cudaError_t dispatch(DType past_dtype, DType cur_dtype, int norm, Fn&& fn) {
  if (norm != kOloraL1 && norm != kOloraFro2) return cudaErrorInvalidValue;
  cudaError_t err = cudaErrorInvalidValue;
  dispatch_storage(past_dtype, [&](auto p_tag) {
    dispatch_storage(cur_dtype, [&](auto c_tag) {
      if (norm == kOloraL1) {
        err = fn(std::integral_constant<int, kOloraL1>{}, p_tag, c_tag);
      } else {
        err = fn(std::integral_constant<int, kOloraFro2>{}, p_tag, c_tag);
      }
    });
  });
  return err;
}

}  // namespace

int64_t olora_workspace_slots(int64_t n, const OloraLayer* layers) {
  int64_t slots = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (has_p(layers[i])) slots += fwd_tiles(layers[i]);
  }
  return slots;
}

cudaError_t olora_forward_launch(int64_t n, const OloraLayer* layers, DType past_dtype, DType cur_dtype, int norm,
                                 double* workspace, int64_t workspace_offset, cudaStream_t stream) {
  return dispatch(past_dtype, cur_dtype, norm, [&](auto norm_tag, auto p_tag, auto c_tag) {
    constexpr int kNorm = decltype(norm_tag)::value;
    using PT = decltype(p_tag);
    using CT = decltype(c_tag);
    return for_batches(n, layers, has_p, fwd_tiles, [&](OloraMeta& meta, int32_t blocks) {
      meta.block_offset += workspace_offset;
      olora_fwd_kernel<kNorm, PT, CT><<<blocks, kOloraThreads, 0, stream>>>(meta, workspace);
      meta.block_offset -= workspace_offset;
      return cudaGetLastError();
    });
  });
}

cudaError_t olora_finalize_launch(const double* workspace, int64_t slots, float* out, cudaStream_t stream) {
  olora_finalize_kernel<<<1, kOloraThreads, 0, stream>>>(workspace, slots, out);
  return cudaGetLastError();
}

cudaError_t olora_backward_launch(int64_t n, const OloraLayer* layers, DType past_dtype, DType cur_dtype,
                                  int norm, const float* grad_out, float* scratch, cudaStream_t stream) {
  return dispatch(past_dtype, cur_dtype, norm, [&](auto norm_tag, auto p_tag, auto c_tag) {
    constexpr int kNorm = decltype(norm_tag)::value;
    using PT = decltype(p_tag);
    using CT = decltype(c_tag);
    cudaError_t err = for_batches(n, layers, has_p, fwd_tiles, [&](OloraMeta& meta, int32_t blocks) {
      olora_seed_kernel<kNorm, PT, CT><<<blocks, kOloraThreads, 0, stream>>>(meta, grad_out, scratch);
      return cudaGetLastError();
    });
    if (err != cudaSuccess) return err;
    // dA = S^T A_past does not depend on the norm (S carries it): one instance per dtype pair
    return for_batches(n, layers, has_grad, grad_tiles, [&](OloraMeta& meta, int32_t blocks) {
      olora_grad_kernel<PT, CT><<<blocks, kOloraThreads, 0, stream>>>(meta, scratch);
      return cudaGetLastError();
    });
  });
}

}  // namespace cuda
}  // namespace forgetkern
