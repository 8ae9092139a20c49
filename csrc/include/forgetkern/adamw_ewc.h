// Per-element math of adamw_ewc_ (AdamW with the EWC penalty gradient fused in), shared by the CPU and CUDA
// kernels. No torch headers.
//
//   C = double when the parameter is float64, else float. The host computes the step's coefficients once, in
//   double, exactly as torch.optim.AdamW's single-tensor path does (adamw_coefficients), and rounds each to C.
//
//   g    = sign * C(grad)                               sign = -1 when maximize, else +1
//   EWC (when anchors and Fishers are given):
//   d    = C(param) - C(anchor);  fd = C(fisher) * d
//   g    = g + fd * lam                                 (the penalty's gradient; always a penalty, see below)
//   term = fd * d                                       penalty = R(sum of term) * R(lam / 2)
//   p    = C(param) * decay                             decay = C(1 - lr * weight_decay)  (decoupled)
//   m    = m + w * (g - m)        if w < 0.5 else  g - (g - m) * (1 - w)       w = C(1 - beta1)  (torch lerp)
//   v    = v * beta2 + (c2 * g) * g                     c2 = C(1 - beta2)
//   vmax = max(vmax, v)  (amsgrad; NaN propagates);     vhat = amsgrad ? vmax : v
//   den  = sqrt(vhat) / bc2_sqrt + eps                  bc2_sqrt = C(sqrt(1 - beta2^step))
//   p    = p + (neg_step_size * m) / den                neg_step_size = C(-lr / (1 - beta1^step))
//   stored: param, exp_avg, exp_avg_sq (, max_exp_avg_sq), each rounded ONCE to its dtype.
//
// maximize: the sign flips the task gradient only; the EWC term stays a penalty (pulls towards the anchor),
// i.e. the step descends on  -task_objective + penalty.
// Every operation is one IEEE operation in this order (no FMA contraction; device: __fadd_rn etc.).
#pragma once

#include "forgetkern/common.h"

#if !defined(__CUDA_ARCH__)
#include <cmath>
#endif

namespace forgetkern {

// Scalar coefficients of one step (host, double), rounded to C by the caller.
struct AdamwCoefficients {
  double decay, w, one_minus_w, beta2, c2, neg_step_size, bc2_sqrt, eps, lam, sign;
  bool lerp_small;
};

#if !defined(__CUDA_ARCH__)
inline AdamwCoefficients adamw_coefficients(double lr, double beta1, double beta2, double eps,
                                            double weight_decay, double step, double lam, bool maximize) {
  AdamwCoefficients c;
  c.decay = 1.0 - lr * weight_decay;
  c.w = 1.0 - beta1;
  c.one_minus_w = 0.0;  // set in C by adamw_coef_as (torch computes 1 - weight in the compute type)
  c.beta2 = beta2;
  c.c2 = 1.0 - beta2;
  const double bc1 = 1.0 - std::pow(beta1, step);
  const double bc2 = 1.0 - std::pow(beta2, step);
  c.neg_step_size = -(lr / bc1);
  c.bc2_sqrt = std::pow(bc2, 0.5);  // Python's bc2 ** 0.5
  c.eps = eps;
  c.lam = lam;
  c.sign = maximize ? -1.0 : 1.0;
  c.lerp_small = false;
  return c;
}
#endif

template <typename C>
struct AdamwCoef {
  C decay, w, one_minus_w, beta2, c2, neg_step_size, bc2_sqrt, eps, lam, sign;
  bool lerp_small;
};

template <typename C>
FK_INLINE AdamwCoef<C> adamw_coef_as(const AdamwCoefficients& d) {
  AdamwCoef<C> c;
  c.decay = static_cast<C>(d.decay);
  c.w = static_cast<C>(d.w);
  c.one_minus_w = static_cast<C>(1) - c.w;
  c.beta2 = static_cast<C>(d.beta2);
  c.c2 = static_cast<C>(d.c2);
  c.neg_step_size = static_cast<C>(d.neg_step_size);
  c.bc2_sqrt = static_cast<C>(d.bc2_sqrt);
  c.eps = static_cast<C>(d.eps);
  c.lam = static_cast<C>(d.lam);
  c.sign = static_cast<C>(d.sign);
  c.lerp_small = (c.w < 0 ? -c.w : c.w) < static_cast<C>(0.5);  // torch's is_lerp_weight_small
  return c;
}

FK_INLINE float adamw_div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
FK_INLINE double adamw_div(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __ddiv_rn(a, b);
#else
  return a / b;
#endif
}
FK_INLINE float adamw_sqrt(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return __builtin_sqrtf(a);  // correctly rounded; vectorised (the build passes -fno-math-errno)
#endif
}
FK_INLINE double adamw_sqrt(double a) {
#if defined(__CUDA_ARCH__)
  return __dsqrt_rn(a);
#else
  return __builtin_sqrt(a);
#endif
}

// The steps of one element (plain values in and out: keeps the CPU simd loops vectorisable).
template <typename C>
FK_INLINE C adamw_grad(C g, const AdamwCoef<C>& c) {
  return fk_mul(g, c.sign);
}

template <typename C>
FK_INLINE C adamw_ewc_grad(C g, C fd, const AdamwCoef<C>& c) {
  return fk_add(g, fk_mul(fd, c.lam));
}

template <typename C>
FK_INLINE C adamw_decay(C p, const AdamwCoef<C>& c) {
  return fk_mul(p, c.decay);
}

template <typename C>
FK_INLINE C adamw_exp_avg(C m, C g, const AdamwCoef<C>& c) {
  const C diff = fk_sub(g, m);
  const C small = fk_add(m, fk_mul(c.w, diff));
  const C large = fk_sub(g, fk_mul(diff, c.one_minus_w));
  return c.lerp_small ? small : large;
}

template <typename C>
FK_INLINE C adamw_exp_avg_sq(C v, C g, const AdamwCoef<C>& c) {
  return fk_add(fk_mul(v, c.beta2), fk_mul(fk_mul(c.c2, g), g));
}

// torch.maximum: NaN in either operand gives NaN.
template <typename C>
FK_INLINE C adamw_max(C a, C b) {
  return (a != a) ? a : (b != b) ? b : (a > b ? a : b);
}

template <typename C>
FK_INLINE C adamw_param(C p, C m, C vhat, const AdamwCoef<C>& c) {
  const C den = fk_add(adamw_div(adamw_sqrt(vhat), c.bc2_sqrt), c.eps);
  return fk_add(p, adamw_div(fk_mul(c.neg_step_size, m), den));
}

}  // namespace forgetkern
