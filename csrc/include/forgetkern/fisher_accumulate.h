// Per-element math of fisher_accumulate_, shared by the CPU and CUDA kernels.
//
//   C = double when the Fisher state is float64, else float; decay and scale are rounded to C once.
//   g = C(grad), f = C(fisher)
//   u = S( (f * decay) + ((scale * g) * g) )      S: round once to the state dtype (RNE)
//   (scale first: scale = 0 ignores a finite g whose square alone would overflow, and a small scale keeps a
//   large g's update finite)
//   if g and u are finite:  fisher <- u
//   else:                   fisher is left unchanged (same bits) and the op's found-nonfinite flag is set
//
// u can overflow for a finite g (g = 1e20, scale = 1 in fp32: inf; or a float32 sum that rounds to bf16 inf), so the
// check is on the stored result as well as on g: a non-finite value never enters the Fisher.
//
// Every operation is a separate IEEE operation in exactly this order (no FMA contraction), which is also the
// order of forgetkern/reference/fisher_accumulate.py, so the kernels reproduce the reference bit for bit.
#pragma once

#include "forgetkern/common.h"

namespace forgetkern {

template <typename C>
FK_INLINE C fisher_update(C f, C g, C decay, C scale) {
  return fk_add(fk_mul(f, decay), fk_mul(fk_mul(scale, g), g));
}

// One element on storage types: returns the new state and adds 1 to `nonfinite` when g or the update is not
// finite.
// The update is computed unconditionally and selected, which keeps CPU loops branch-free (vectorisable).
template <typename C, typename F, typename G>
FK_INLINE F fisher_element(F f, G g, C decay, C scale, int& nonfinite) {
  const C gc = load_as<C>(g);
  const F updated = Store<F>::from(fisher_update(load_as<C>(f), gc, decay, scale));
  const bool ok = is_finite(gc) && is_finite(load_as<C>(updated));
  nonfinite += static_cast<int>(!ok);
  return ok ? updated : f;
}

}  // namespace forgetkern
