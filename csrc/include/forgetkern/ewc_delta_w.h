// Math of ewc_delta_w (EWC penalty of LoRA updates s B A, never materialising B A), shared by the CPU and CUDA
// kernels. Per layer, A (r x in), B (out x r), Fisher F (out x in), C = double for float64 factors, else float:
//
//   d[o,j]  = sum_k B[o,k] * A[k,j]            k ascending, one IEEE multiply and add per step (no FMA)
//   g[o,j]  = C(F[o,j]) * d[o,j]
//   term    = g * d                             penalty = R( sum_i s_i^2 * sum(term) ) * R(lam / 2)
//   gB[o,k] = sum_j g[o,j] * A[k,j]             grads_b[o,k] <- S( C(grads_b[o,k]) + coef * gB[o,k] )
//   gA[k,j] = sum_o B[o,k] * g[o,j]             grads_a[k,j] <- S( C(grads_a[k,j]) + coef * gA[k,j] )
//   coef    = C(s_i^2 * lam)                    (rounded once from double)
//
// S rounds once to the factors' dtype, R to the result dtype (float64 if any factor is float64). The sums over
// j and o run in a fixed order that depends on the shapes only (CPU: row blocks of a layer, column tiles of
// kEdwTile, 16 interleaved lanes per tile; the row-block partials of gA are added in block order), so the
// result is deterministic and independent of the number of threads.
#pragma once

#include "forgetkern/common.h"

namespace forgetkern {

constexpr int64_t kEdwLanes = 16;  // interleaved partial sums of a row's gB dot products

// d[j] = sum_k b[k] * a[k * lda + j] for j < n, k ascending. a: the tile of A (row stride lda).
template <typename C>
FK_INLINE void edw_row_product(const C* __restrict b, const C* __restrict a, int64_t lda, int64_t r, int64_t n,
                               C* __restrict d) {
  for (int64_t j = 0; j < n; ++j) d[j] = C(0);
  for (int64_t k = 0; k < r; ++k) {
    const C bk = b[k];
    const C* __restrict ak = a + k * lda;
    for (int64_t j = 0; j < n; ++j) d[j] = fk_add(d[j], fk_mul(bk, ak[j]));
  }
}

template <typename C, typename F>
FK_INLINE C edw_g(F f, C d) {
  return fk_mul(load_as<C>(f), d);
}

template <typename C>
FK_INLINE C edw_term(C g, C d) {
  return fk_mul(g, d);
}

// sum_j g[j] * a[j] over n (a multiple of kEdwLanes; padding zeros): lane l sums j = l, l + 16, ... in order,
// then the lanes are added pairwise (l + w into l for w = 8, 4, 2, 1).
template <typename C>
FK_INLINE C edw_lane_dot(const C* __restrict g, const C* __restrict a, int64_t n) {
  C lanes[kEdwLanes] = {};
  for (int64_t i = 0; i < n; i += kEdwLanes) {
    for (int64_t l = 0; l < kEdwLanes; ++l) lanes[l] = fk_add(lanes[l], fk_mul(g[i + l], a[i + l]));
  }
  for (int64_t w = kEdwLanes / 2; w > 0; w /= 2) {
    for (int64_t l = 0; l < w; ++l) lanes[l] = fk_add(lanes[l], lanes[l + w]);
  }
  return lanes[0];
}

// sum_j x[j] over n (a multiple of kEdwLanes; padding zeros), in the lane order of edw_lane_dot.
template <typename C>
FK_INLINE C edw_lane_sum(const C* __restrict x, int64_t n) {
  C lanes[kEdwLanes] = {};
  for (int64_t i = 0; i < n; i += kEdwLanes) {
    for (int64_t l = 0; l < kEdwLanes; ++l) lanes[l] = fk_add(lanes[l], x[i + l]);
  }
  for (int64_t w = kEdwLanes / 2; w > 0; w /= 2) {
    for (int64_t l = 0; l < w; ++l) lanes[l] = fk_add(lanes[l], lanes[l + w]);
  }
  return lanes[0];
}

// part[j] += bk * g[j]: one row's contribution to gA (a row of the block partial).
template <typename C>
FK_INLINE void edw_axpy(C bk, const C* __restrict g, int64_t n, C* __restrict part) {
  for (int64_t j = 0; j < n; ++j) part[j] = fk_add(part[j], fk_mul(bk, g[j]));
}

// A gradient element: the old value plus coef times the reduced sum, rounded once to storage S.
template <typename C, typename S>
FK_INLINE S edw_grad_add(S g, C acc, C coef) {
  return Store<S>::from(fk_add(load_as<C>(g), fk_mul(coef, acc)));
}

// The final scaling of the (double) sum of s_i^2 * sum(term) into the result dtype R.
template <typename R>
FK_INLINE R edw_finalize(double sum, double lam) {
  return fk_mul(static_cast<R>(sum), static_cast<R>(lam * 0.5));
}

}  // namespace forgetkern
