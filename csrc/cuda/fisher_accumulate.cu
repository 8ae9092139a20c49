// fisher_accumulate_ on CUDA: F <- decay * F + scale * g^2 over lists of tensors, one block per chunk of
// kCudaChunk elements (multi-tensor apply, csrc/include/forgetkern/multi_tensor.h). Math in
// csrc/include/forgetkern/fisher_accumulate.h. Non-finite gradient elements leave F unchanged and set *found.
#include <cuda_runtime.h>

#include <cstdint>

#include "device_utils.cuh"
#include "forgetkern/fisher_accumulate.h"
#include "forgetkern/multi_tensor.h"
#include "launchers.h"

namespace forgetkern {
namespace cuda {
namespace {

template <typename F, typename G>
__global__ void __launch_bounds__(kCudaBlockThreads)
    fisher_accumulate_kernel(const __grid_constant__ TensorListMeta<2> meta, typename ComputeOf<F>::type decay,
                             typename ComputeOf<F>::type scale, float* __restrict__ found) {
  using C = typename ComputeOf<F>::type;
  const BlockChunk<2> c = block_chunk(meta);
  F* __restrict__ f = static_cast<F*>(meta.addresses[0][c.slot]) + c.start;
  const G* __restrict__ g = static_cast<const G*>(meta.addresses[1][c.slot]) + c.start;
  int nonfinite = 0;
  int64_t done = 0;
  if (vec_aligned(f) && vec_aligned(g)) {
    const int64_t nvec = c.n / kCudaVec;
    for (int64_t i = threadIdx.x; i < nvec; i += kCudaBlockThreads) {
      Vec<F> fv = reinterpret_cast<const Vec<F>*>(f)[i];
      const Vec<G> gv = reinterpret_cast<const Vec<G>*>(g)[i];
#pragma unroll
      for (int j = 0; j < kCudaVec; ++j) fv.v[j] = fisher_element<C>(fv.v[j], gv.v[j], decay, scale, nonfinite);
      reinterpret_cast<Vec<F>*>(f)[i] = fv;
    }
    done = nvec * kCudaVec;
  }
  for (int64_t i = done + threadIdx.x; i < c.n; i += kCudaBlockThreads) {
    f[i] = fisher_element<C>(f[i], g[i], decay, scale, nonfinite);
  }
  if (nonfinite != 0) *found = 1.0f;  // every writer stores the same value
}

}  // namespace

cudaError_t fisher_accumulate_launch(int64_t n, void* const* fishers, const void* const* grads,
                                     const int64_t* numels, DType fisher_dtype, DType grad_dtype, double decay,
                                     double scale, float* found, cudaStream_t stream) {
  cudaError_t err = cudaErrorInvalidValue;
  dispatch_dtype<false>(fisher_dtype, [&](auto f_tag) {
    dispatch_dtype<true>(grad_dtype, [&](auto g_tag) {
      using F = decltype(f_tag);
      using G = decltype(g_tag);
      using C = typename ComputeOf<F>::type;
      void* const* lists[2] = {fishers, const_cast<void* const*>(grads)};
      err = multi_tensor_apply<2>(n, lists, numels, [&](const TensorListMeta<2>& meta, int blocks) {
        fisher_accumulate_kernel<F, G><<<blocks, kCudaBlockThreads, 0, stream>>>(
            meta, static_cast<C>(decay), static_cast<C>(scale), found);
        return cudaGetLastError();
      });
    });
  });
  return err;
}

}  // namespace cuda
}  // namespace forgetkern
