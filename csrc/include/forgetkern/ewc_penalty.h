// Per-element math of ewc_fused (EWC penalty and its gradient), shared by the CPU and CUDA kernels.
//
//   C = double when the parameter is float64, else float; lam is rounded to C once.
//   d    = C(param) - C(anchor)
//   fd   = C(fisher) * d
//   term = fd * d                               penalty = R(sum of term) * R(lam / 2)
//   step = fd * lam
//   grad <- S( C(grad) + step )   (write_grad and accumulate: the old gradient is read)
//   grad <- S( step )             (write_grad, no accumulate: the old gradient is not read)
//
// S rounds once to the gradient dtype (= the parameter dtype), R to the result dtype (float64 if any parameter
// is float64, else float32). Elementwise every operation is a separate IEEE operation in this order (no FMA
// contraction), the order of forgetkern/reference/ewc_penalty.py. The terms are summed in C over short runs
// (CPU: blocks of 1024 elements, each in 16 interleaved partial sums added pairwise, the same order for every
// instruction set; CUDA: per thread, then a shuffle tree per block), the run sums in double in a fixed order
// (deterministic, independent of the number of threads).
#pragma once

#include "forgetkern/common.h"

namespace forgetkern {

enum EwcMode : int { kEwcPenaltyOnly = 0, kEwcGradWrite = 1, kEwcGradAccumulate = 2 };

// Number of tensor lists an EWC mode touches (params, anchors, fishers[, grads]).
FK_HD constexpr int ewc_depth(int mode) { return mode == kEwcPenaltyOnly ? 3 : 4; }

// One element, in steps (plain values, no in/out references: keeps CPU simd loops vectorisable):
//   d = ewc_diff<C>(param, anchor); fd = ewc_fd(fisher, d); term = ewc_term(fd, d);
//   grad = ewc_grad_accumulate(grad, fd, lam)  or  grad = ewc_grad_write<P>(fd, lam)
template <typename C, typename P, typename A>
FK_INLINE C ewc_diff(P p, A a) {
  return fk_sub(load_as<C>(p), load_as<C>(a));
}

template <typename C, typename F>
FK_INLINE C ewc_fd(F f, C d) {
  return fk_mul(load_as<C>(f), d);
}

template <typename C>
FK_INLINE C ewc_term(C fd, C d) {
  return fk_mul(fd, d);
}

template <typename C, typename P>
FK_INLINE P ewc_grad_accumulate(P g, C fd, C lam) {
  return Store<P>::from(fk_add(load_as<C>(g), fk_mul(fd, lam)));
}

template <typename P, typename C>
FK_INLINE P ewc_grad_write(C fd, C lam) {
  return Store<P>::from(fk_mul(fd, lam));
}

// The final scaling of the (double) sum of all terms into the result dtype R.
template <typename R>
FK_INLINE R ewc_finalize(double sum, double lam) {
  return fk_mul(static_cast<R>(sum), static_cast<R>(lam * 0.5));
}

}  // namespace forgetkern
