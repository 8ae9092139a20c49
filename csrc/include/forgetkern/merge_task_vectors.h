// Merging of task vectors (task arithmetic, TIES, DARE, DARE-TIES, magnitude prune): the per-element math
// shared by the CPU kernel (csrc/cpu/merge_task_vectors.cpp) and device code. No torch headers.
//
// Per element of one tensor with base b and N inputs x_k (math of forgetkern/ops/merge_task_vectors.py, the
// reference forgetkern/reference/merge_task_vectors.py), in compute type C (float, or double):
//   tau_k = x_k - b (subtract_base) or x_k
//   v_k   = prune(tau_k): magnitude |tau_k| >= thr_k ? tau_k : 0;  random keep_k ? tau_k * scale : 0
//   accumulate (in task order, one IEEE operation at a time): total += w_k v_k, or for the sign election
//   vote += u_k (or sign(u_k)), pos += [u_k > 0] w_k v_k, neg += [u_k < 0] w_k v_k, and the divisors,
//   with u_k = w_k v_k (sign_weighted) or v_k
//   out   = b + lam * delta / div, delta = total, or pos / neg for the elected sign (vote >= 0: positive).
// The DARE keep bit of flat element i is the LoRA dropout hash (lora_linear.h) with row = i >> 32 and
// col = i mod 2^32.
#pragma once

#include <cstdint>

#include "forgetkern/common.h"
#include "forgetkern/lora_linear.h"

namespace forgetkern {

enum : int { kMergePruneNone = 0, kMergePruneMagnitude = 1, kMergePruneRandom = 2 };
enum : int { kMergeConsensusNone = 0, kMergeConsensusTotal = 1, kMergeConsensusFrequency = 2 };
enum : int { kMergeNormNone = 0, kMergeNormCount = 1, kMergeNormWeight = 2 };

FK_INLINE bool merge_dare_keep(uint32_t key, uint64_t i, int32_t threshold) {
  return lora_keep(lora_row_hash(key, static_cast<uint32_t>(i >> 32)), static_cast<uint32_t>(i), threshold);
}

template <typename C>
FK_INLINE C merge_abs(C v) { return v < C(0) ? -v : v; }

template <typename C>
FK_INLINE C merge_prune_magnitude(C tau, C thr) { return merge_abs(tau) >= thr ? tau : C(0); }

template <typename C>
FK_INLINE C merge_prune_random(bool keep, C tau, C scale) { return keep ? fk_mul(tau, scale) : C(0); }

// Accumulators of one element over the tasks.
template <typename C>
struct MergeAcc {
  C total, vote, pos, neg, pos_div, neg_div;
};

template <typename C>
FK_INLINE void merge_acc_init(MergeAcc<C>& a) {
  a.total = a.vote = a.pos = a.neg = a.pos_div = a.neg_div = C(0);
}

// One task's pruned value v with weight w. CONSENSUS != 0 selects the sign-election accumulators.
template <int CONSENSUS, typename C>
FK_INLINE void merge_accumulate(MergeAcc<C>& a, C v, C w, bool sign_weighted, int normalize) {
  const C wv = fk_mul(v, w);
  if (CONSENSUS == kMergeConsensusNone) {
    a.total = fk_add(a.total, wv);
    return;
  }
  const C u = sign_weighted ? wv : v;
  const bool gt = u > C(0), lt = u < C(0);
  a.vote = fk_add(a.vote, CONSENSUS == kMergeConsensusTotal ? u : (gt ? C(1) : lt ? C(-1) : C(0)));
  a.pos = fk_add(a.pos, gt ? wv : C(0));
  a.neg = fk_add(a.neg, lt ? wv : C(0));
  if (normalize == kMergeNormCount) {
    a.pos_div = fk_add(a.pos_div, gt ? C(1) : C(0));
    a.neg_div = fk_add(a.neg_div, lt ? C(1) : C(0));
  } else if (normalize == kMergeNormWeight) {
    a.pos_div = fk_add(a.pos_div, gt ? w : C(0));
    a.neg_div = fk_add(a.neg_div, lt ? w : C(0));
  }
}

// b + lam * delta / div. `lin_div` is the divisor without election (N for COUNT, sum w or 1 for WEIGHT).
template <int CONSENSUS, typename C>
FK_INLINE C merge_finalize(const MergeAcc<C>& a, C b, int normalize, C lin_div, C lam) {
  C delta;
  if (CONSENSUS == kMergeConsensusNone) {
    delta = normalize == kMergeNormNone ? a.total : a.total / lin_div;
  } else {
    const bool up = a.vote >= C(0);
    delta = up ? a.pos : a.neg;
    if (normalize != kMergeNormNone) {
      C div = up ? a.pos_div : a.neg_div;
      if (normalize == kMergeNormCount) {
        div = div < C(1) ? C(1) : div;
      } else {
        div = div == C(0) ? C(1) : div;
      }
      delta = delta / div;
    }
  }
  return fk_add(b, fk_mul(delta, lam));
}

}  // namespace forgetkern
