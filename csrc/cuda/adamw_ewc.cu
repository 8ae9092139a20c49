// adamw_ewc_ on CUDA: one AdamW step with the EWC penalty's gradient fused in (math in
// csrc/include/forgetkern/adamw_ewc.h, the same functions as the CPU kernel). One block per chunk of
// kCudaChunk elements (multi-tensor apply over 7 lists: p, g, m, v, vmax, p*, F); block b of the whole op
// stores its penalty partial in workspace slot b (no float atomics); the finalize kernel adds the slots in a
// fixed order. Each element reads p, g, m, v (vmax, p*, F) once and writes p, m, v (vmax) once.
#include <cuda_runtime.h>

#include <cstdint>

#include "adamw_ewc_launch.h"
#include "device_utils.cuh"
#include "forgetkern/adamw_ewc.h"
#include "forgetkern/ewc_penalty.h"
#include "forgetkern/multi_tensor.h"

namespace forgetkern {
namespace cuda {
namespace {

constexpr int kDepth = 7;
static_assert(sizeof(TensorListMeta<kDepth>) < 4000, "kernel parameter limit");

template <bool EWC, bool AMS, typename C, typename P, typename AF>
__device__ __forceinline__ C adamw_element(P& p, P g, P& m, P& v, P& x, AF a, AF f, const AdamwCoef<C>& c) {
  C gi = adamw_grad(load_as<C>(g), c);
  C term = C(0);
  if (EWC) {
    const C d = ewc_diff<C>(p, a);
    const C fd = ewc_fd(f, d);
    term = ewc_term(fd, d);
    gi = adamw_ewc_grad(gi, fd, c);
  }
  const C pi = adamw_decay(load_as<C>(p), c);
  const C mi = adamw_exp_avg(load_as<C>(m), gi, c);
  const C vi = adamw_exp_avg_sq(load_as<C>(v), gi, c);
  C vh = vi;
  if (AMS) {
    vh = adamw_max(load_as<C>(x), vi);
    x = Store<P>::from(vh);
  }
  p = Store<P>::from(adamw_param(pi, mi, vh, c));
  m = Store<P>::from(mi);
  v = Store<P>::from(vi);
  return term;
}

template <bool EWC, bool AMS, typename P, typename AF>
__global__ void __launch_bounds__(kCudaBlockThreads)
    adamw_ewc_kernel(const __grid_constant__ TensorListMeta<kDepth> meta, const AdamwCoefficients coef,
                     double* __restrict__ workspace) {
  using C = typename ComputeOf<P>::type;
  const AdamwCoef<C> c = adamw_coef_as<C>(coef);
  const BlockChunk<kDepth> ch = block_chunk(meta);
  P* __restrict__ p = static_cast<P*>(meta.addresses[0][ch.slot]) + ch.start;
  const P* __restrict__ g = static_cast<const P*>(meta.addresses[1][ch.slot]) + ch.start;
  P* __restrict__ m = static_cast<P*>(meta.addresses[2][ch.slot]) + ch.start;
  P* __restrict__ v = static_cast<P*>(meta.addresses[3][ch.slot]) + ch.start;
  P* __restrict__ x = AMS ? static_cast<P*>(meta.addresses[4][ch.slot]) + ch.start : nullptr;
  const AF* __restrict__ a = EWC ? static_cast<const AF*>(meta.addresses[5][ch.slot]) + ch.start : nullptr;
  const AF* __restrict__ f = EWC ? static_cast<const AF*>(meta.addresses[6][ch.slot]) + ch.start : nullptr;
  C acc = C(0);
  int64_t done = 0;
  if (vec_aligned(p) && vec_aligned(g) && vec_aligned(m) && vec_aligned(v) && (!AMS || vec_aligned(x)) &&
      (!EWC || (vec_aligned(a) && vec_aligned(f)))) {
    const int64_t nvec = ch.n / kCudaVec;
    for (int64_t i = threadIdx.x; i < nvec; i += kCudaBlockThreads) {
      Vec<P> pv = reinterpret_cast<const Vec<P>*>(p)[i];
      const Vec<P> gv = reinterpret_cast<const Vec<P>*>(g)[i];
      Vec<P> mv = reinterpret_cast<const Vec<P>*>(m)[i];
      Vec<P> vv = reinterpret_cast<const Vec<P>*>(v)[i];
      Vec<P> xv;
      Vec<AF> av, fv;
      if (AMS) xv = reinterpret_cast<const Vec<P>*>(x)[i];
      if (EWC) {
        av = reinterpret_cast<const Vec<AF>*>(a)[i];
        fv = reinterpret_cast<const Vec<AF>*>(f)[i];
      }
#pragma unroll
      for (int j = 0; j < kCudaVec; ++j) {
        acc = fk_add(acc, adamw_element<EWC, AMS, C>(pv.v[j], gv.v[j], mv.v[j], vv.v[j], xv.v[j],
                                                      EWC ? av.v[j] : AF{}, EWC ? fv.v[j] : AF{}, c));
      }
      reinterpret_cast<Vec<P>*>(p)[i] = pv;
      reinterpret_cast<Vec<P>*>(m)[i] = mv;
      reinterpret_cast<Vec<P>*>(v)[i] = vv;
      if (AMS) reinterpret_cast<Vec<P>*>(x)[i] = xv;
    }
    done = nvec * kCudaVec;
  }
  for (int64_t i = done + threadIdx.x; i < ch.n; i += kCudaBlockThreads) {
    P xs = AMS ? x[i] : P{};
    acc = fk_add(acc, adamw_element<EWC, AMS, C>(p[i], g[i], m[i], v[i], xs, EWC ? a[i] : AF{}, EWC ? f[i] : AF{},
                                                  c));
    if (AMS) x[i] = xs;
  }
  if (EWC) {
    acc = block_sum(acc);
    if (threadIdx.x == 0) workspace[meta.block_offset + blockIdx.x] = static_cast<double>(acc);
  }
}

__global__ void __launch_bounds__(kCudaBlockThreads)
    adamw_ewc_finalize_kernel(const double* __restrict__ workspace, int64_t slots, double lam, void* out,
                              bool out_double) {
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < slots; i += kCudaBlockThreads) s = fk_add(s, workspace[i]);
  s = block_sum(s);
  if (threadIdx.x == 0) {
    if (out_double) {
      *static_cast<double*>(out) = ewc_finalize<double>(s, lam);
    } else {
      *static_cast<float*>(out) = ewc_finalize<float>(s, lam);
    }
  }
}

template <bool EWC, bool AMS, typename P, typename AF>
cudaError_t launch(int64_t n, void* const* const* lists, const int64_t* numels, const AdamwCoefficients& coef,
                   double* workspace, int64_t workspace_offset, cudaStream_t stream) {
  return multi_tensor_apply<kDepth>(n, lists, numels, [&](TensorListMeta<kDepth> meta, int blocks) {
    meta.block_offset += workspace_offset;
    adamw_ewc_kernel<EWC, AMS, P, AF><<<blocks, kCudaBlockThreads, 0, stream>>>(meta, coef, workspace);
    return cudaGetLastError();
  });
}

}  // namespace

int64_t adamw_ewc_workspace_slots(int64_t n, const int64_t* numels) { return count_chunks(n, numels, kCudaChunk); }

cudaError_t adamw_ewc_launch(int64_t n, void* const* const* lists, const int64_t* numels, DType param_dtype,
                             DType state_dtype, bool ewc, bool amsgrad, const AdamwCoefficients& coef,
                             double* workspace, int64_t workspace_offset, cudaStream_t stream) {
  cudaError_t err = cudaErrorInvalidValue;
  dispatch_dtype<true>(param_dtype, [&](auto p_tag) {
    using P = decltype(p_tag);
    if (!ewc) {
      err = amsgrad ? launch<false, true, P, float>(n, lists, numels, coef, workspace, workspace_offset, stream)
                    : launch<false, false, P, float>(n, lists, numels, coef, workspace, workspace_offset, stream);
      return;
    }
    dispatch_dtype<true>(state_dtype, [&](auto a_tag) {
      using AF = decltype(a_tag);
      err = amsgrad ? launch<true, true, P, AF>(n, lists, numels, coef, workspace, workspace_offset, stream)
                    : launch<true, false, P, AF>(n, lists, numels, coef, workspace, workspace_offset, stream);
    });
  });
  return err;
}

cudaError_t adamw_ewc_finalize_launch(const double* workspace, int64_t slots, double lam, void* out,
                                      bool out_double, cudaStream_t stream) {
  adamw_ewc_finalize_kernel<<<1, kCudaBlockThreads, 0, stream>>>(workspace, slots, lam, out, out_double);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace forgetkern
