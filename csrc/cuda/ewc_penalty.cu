// ewc_fused on CUDA: EWC penalty lam/2 * sum F (theta - theta*)^2 and, optionally, its gradient lam * F * d
// written or added into grads, in one pass over memory (math in csrc/include/forgetkern/ewc_penalty.h).
// One block per chunk of kCudaChunk elements (multi-tensor apply); block b of the whole op stores its partial
// sum in workspace slot b (no float atomics); ewc_finalize_kernel adds the slots in a fixed order.
#include <cuda_runtime.h>

#include <cstdint>

#include "device_utils.cuh"
#include "forgetkern/ewc_penalty.h"
#include "forgetkern/multi_tensor.h"
#include "launchers.h"

namespace forgetkern {
namespace cuda {
namespace {

template <int MODE, typename P, typename A, typename F>
__global__ void __launch_bounds__(kCudaBlockThreads)
    ewc_fused_kernel(const __grid_constant__ TensorListMeta<ewc_depth(MODE)> meta,
                     typename ComputeOf<P>::type lam, double* __restrict__ workspace) {
  using C = typename ComputeOf<P>::type;
  constexpr bool kGrad = MODE != kEwcPenaltyOnly;
  const BlockChunk<ewc_depth(MODE)> c = block_chunk(meta);
  const P* __restrict__ p = static_cast<const P*>(meta.addresses[0][c.slot]) + c.start;
  const A* __restrict__ a = static_cast<const A*>(meta.addresses[1][c.slot]) + c.start;
  const F* __restrict__ f = static_cast<const F*>(meta.addresses[2][c.slot]) + c.start;
  P* __restrict__ g = kGrad ? static_cast<P*>(meta.addresses[kGrad ? 3 : 0][c.slot]) + c.start : nullptr;
  C acc = C(0);
  int64_t done = 0;
  if (vec_aligned(p) && vec_aligned(a) && vec_aligned(f) && (!kGrad || vec_aligned(g))) {
    const int64_t nvec = c.n / kCudaVec;
    for (int64_t i = threadIdx.x; i < nvec; i += kCudaBlockThreads) {
      const Vec<P> pv = reinterpret_cast<const Vec<P>*>(p)[i];
      const Vec<A> av = reinterpret_cast<const Vec<A>*>(a)[i];
      const Vec<F> fv = reinterpret_cast<const Vec<F>*>(f)[i];
      Vec<P> gv;
      if (MODE == kEwcGradAccumulate) gv = reinterpret_cast<const Vec<P>*>(g)[i];
#pragma unroll
      for (int j = 0; j < kCudaVec; ++j) {
        const C d = ewc_diff<C>(pv.v[j], av.v[j]);
        const C fd = ewc_fd(fv.v[j], d);
        acc = fk_add(acc, ewc_term(fd, d));
        if (MODE == kEwcGradAccumulate) gv.v[j] = ewc_grad_accumulate(gv.v[j], fd, lam);
        if (MODE == kEwcGradWrite) gv.v[j] = ewc_grad_write<P>(fd, lam);
      }
      if (kGrad) reinterpret_cast<Vec<P>*>(g)[i] = gv;
    }
    done = nvec * kCudaVec;
  }
  for (int64_t i = done + threadIdx.x; i < c.n; i += kCudaBlockThreads) {
    const C d = ewc_diff<C>(p[i], a[i]);
    const C fd = ewc_fd(f[i], d);
    acc = fk_add(acc, ewc_term(fd, d));
    if (MODE == kEwcGradAccumulate) g[i] = ewc_grad_accumulate(g[i], fd, lam);
    if (MODE == kEwcGradWrite) g[i] = ewc_grad_write<P>(fd, lam);
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) workspace[meta.block_offset + blockIdx.x] = static_cast<double>(acc);
}

// One block: thread t adds slots t, t + blockDim, ... in order, then a fixed-shape tree over the threads.
__global__ void __launch_bounds__(kCudaBlockThreads)
    ewc_finalize_kernel(const double* __restrict__ workspace, int64_t slots, double lam, void* out,
                        bool out_double) {
  double v = 0.0;
  for (int64_t i = threadIdx.x; i < slots; i += kCudaBlockThreads) v = fk_add(v, workspace[i]);
  v = block_sum(v);
  if (threadIdx.x == 0) {
    if (out_double) {
      *static_cast<double*>(out) = ewc_finalize<double>(v, lam);
    } else {
      *static_cast<float*>(out) = ewc_finalize<float>(v, lam);
    }
  }
}

template <int MODE, typename P, typename A, typename F>
cudaError_t launch_mode(int64_t n, void* const* const* lists, const int64_t* numels, double lam,
                        double* workspace, int64_t workspace_offset, cudaStream_t stream) {
  using C = typename ComputeOf<P>::type;
  constexpr int kDepth = ewc_depth(MODE);
  return multi_tensor_apply<kDepth>(n, lists, numels, [&](TensorListMeta<kDepth> meta, int blocks) {
    meta.block_offset += workspace_offset;
    ewc_fused_kernel<MODE, P, A, F><<<blocks, kCudaBlockThreads, 0, stream>>>(meta, static_cast<C>(lam),
                                                                             workspace);
    return cudaGetLastError();
  });
}

}  // namespace

int64_t ewc_workspace_slots(int64_t n, const int64_t* numels) { return count_chunks(n, numels, kCudaChunk); }

cudaError_t ewc_fused_launch(int64_t n, const void* const* params, const void* const* anchors,
                             const void* const* fishers, void* const* grads, const int64_t* numels,
                             DType param_dtype, DType anchor_dtype, DType fisher_dtype, int mode, double lam,
                             double* workspace, int64_t workspace_offset, cudaStream_t stream) {
  if (mode != kEwcPenaltyOnly && mode != kEwcGradWrite && mode != kEwcGradAccumulate) return cudaErrorInvalidValue;
  void* const* lists[4] = {const_cast<void* const*>(params), const_cast<void* const*>(anchors),
                           const_cast<void* const*>(fishers), grads};
  cudaError_t err = cudaErrorInvalidValue;
  dispatch_dtype<true>(param_dtype, [&](auto p_tag) {
    dispatch_dtype<true>(anchor_dtype, [&](auto a_tag) {
      dispatch_dtype<true>(fisher_dtype, [&](auto f_tag) {
        using P = decltype(p_tag);
        using A = decltype(a_tag);
        using F = decltype(f_tag);
        switch (mode) {
          case kEwcPenaltyOnly:
            err = launch_mode<kEwcPenaltyOnly, P, A, F>(n, lists, numels, lam, workspace, workspace_offset, stream);
            break;
          case kEwcGradWrite:
            err = launch_mode<kEwcGradWrite, P, A, F>(n, lists, numels, lam, workspace, workspace_offset, stream);
            break;
          default:
            err = launch_mode<kEwcGradAccumulate, P, A, F>(n, lists, numels, lam, workspace, workspace_offset,
                                                           stream);
        }
      });
    });
  });
  return err;
}

cudaError_t ewc_finalize_launch(const double* workspace, int64_t slots, double lam, void* out, bool out_double,
                                cudaStream_t stream) {
  ewc_finalize_kernel<<<1, kCudaBlockThreads, 0, stream>>>(workspace, slots, lam, out, out_double);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace forgetkern
