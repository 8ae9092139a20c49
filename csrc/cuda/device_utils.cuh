// Device-side helpers of the multi-tensor kernels (nvcc only).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "forgetkern/common.h"
#include "forgetkern/multi_tensor.h"

namespace forgetkern {
namespace cuda {

// kCudaVec consecutive elements, aligned so that one access is one (or two, for double) vector instruction.
template <typename T>
struct alignas(sizeof(T) * kCudaVec) Vec {
  T v[kCudaVec];
};

template <typename T>
__device__ __forceinline__ bool vec_aligned(const T* p) {
  return (reinterpret_cast<uintptr_t>(p) % sizeof(Vec<T>)) == 0;
}

// The (tensor slot, element range) a block of a multi-tensor launch owns.
template <int DEPTH>
struct BlockChunk {
  int slot;
  int64_t start;
  int64_t n;
};

template <int DEPTH>
__device__ __forceinline__ BlockChunk<DEPTH> block_chunk(const TensorListMeta<DEPTH>& meta) {
  BlockChunk<DEPTH> c;
  c.slot = meta.block_to_tensor[blockIdx.x];
  c.start = static_cast<int64_t>(meta.block_to_chunk[blockIdx.x]) * kCudaChunk;
  const int64_t rest = meta.numel[c.slot] - c.start;
  c.n = rest < kCudaChunk ? rest : kCudaChunk;
  return c;
}

// Sum over the block in a fixed order (shuffle tree per warp, then warp 0 over the warp sums); the result is
// valid in thread 0. Needs blockDim.x == kCudaBlockThreads.
template <typename C>
__device__ __forceinline__ C block_sum(C v) {
  constexpr int kWarps = kCudaBlockThreads / 32;
  __shared__ C warp_sums[kWarps];
  for (int o = 16; o > 0; o >>= 1) v = fk_add(v, __shfl_down_sync(0xFFFFFFFFu, v, o));
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? warp_sums[lane] : C(0);
    for (int o = 16; o > 0; o >>= 1) v = fk_add(v, __shfl_down_sync(0xFFFFFFFFu, v, o));
  }
  return v;
}

// Calls fn(S{}) for the storage type S of dtype t; returns false for a dtype the caller does not accept.
template <bool kAllowHalf, typename Fn>
inline bool dispatch_dtype(DType t, Fn&& fn) {
  switch (t) {
    case DType::Float32: fn(float{}); return true;
    case DType::Float64: fn(double{}); return true;
    case DType::BFloat16: fn(fk_bf16{}); return true;
    case DType::Float16:
      if constexpr (kAllowHalf) {
        fn(fk_half{});
        return true;
      } else {
        return false;
      }
  }
  return false;
}

}  // namespace cuda
}  // namespace forgetkern
