// The merge_task_vectors CPU kernels (csrc/cpu/merge_task_vectors.cpp says what they do), shared by the op's
// translation unit and merge_task_vectors_dare.cpp, which instantiates DARE's kernels (three instruction sets of
// every consensus and dtype pair: most of the instantiations) so that the two compile in parallel.
#pragma once

#include <cstdint>
#include <type_traits>

#include "cpu_isa.h"
#include "forgetkern/merge_task_vectors.h"
#include "multi_tensor_cpu.h"

namespace forgetkern {
namespace cpu {
namespace merge_detail {

constexpr int64_t kTile = 256;

struct MergeParams {
  int64_t n;             // tasks
  const double* weights; // N
  bool subtract_base;
  bool sign_weighted;
  int normalize;
  int32_t drop_threshold;
  double scale;          // DARE rescale factor (1 when not rescaling)
  double lin_div;        // divisor without election
  double lam;
};

struct MergeJob {
  const void* base;
  const void* const* inputs;  // N pointers
  void* out;
  const void* thr;            // N thresholds (compute type), or null
  const uint32_t* keys;       // N keys, or null
  uint64_t offset;
};

using MergeChunkFn = void (*)(const MergeParams& prm, const MergeJob& job, int64_t begin, int64_t end);

// Accumulators of one tile, one array per field (struct of arrays: the task loop vectorises).
template <typename C>
struct TileAcc {
  alignas(64) C total[kTile];
  alignas(64) C vote[kTile];
  alignas(64) C pos[kTile];
  alignas(64) C neg[kTile];
  alignas(64) C pos_div[kTile];
  alignas(64) C neg_div[kTile];
};

// One task's tile into the accumulators: prune, weight, accumulate (merge_task_vectors.h, element by element).
// The flags are template parameters so that the loop has no branch left but selects.
template <int PRUNE, int CONSENSUS, int NORM, bool SIGNW, bool SUB, typename C, typename X>
FK_INLINE void task_tile(const X* __restrict x, const C* __restrict bt, TileAcc<C>& a, int64_t m, C w, C thr,
                         uint32_t key, uint64_t i0, int32_t drop_thr, C scale) {
  for (int64_t j = 0; j < m; ++j) {
    C tau = load_as<C>(x[j]);
    if (SUB) tau = fk_sub(tau, bt[j]);
    C v = tau;
    if (PRUNE == kMergePruneMagnitude) v = merge_prune_magnitude(tau, thr);
    if (PRUNE == kMergePruneRandom) {
      v = merge_prune_random(merge_dare_keep(key, i0 + static_cast<uint64_t>(j), drop_thr), tau, scale);
    }
    const C wv = fk_mul(v, w);
    if (CONSENSUS == kMergeConsensusNone) {
      a.total[j] = fk_add(a.total[j], wv);
      continue;
    }
    const C u = SIGNW ? wv : v;
    const bool gt = u > C(0), lt = u < C(0);
    a.vote[j] = fk_add(a.vote[j], CONSENSUS == kMergeConsensusTotal ? u : (gt ? C(1) : lt ? C(-1) : C(0)));
    a.pos[j] = fk_add(a.pos[j], gt ? wv : C(0));
    a.neg[j] = fk_add(a.neg[j], lt ? wv : C(0));
    if (NORM == kMergeNormCount) {
      a.pos_div[j] = fk_add(a.pos_div[j], gt ? C(1) : C(0));
      a.neg_div[j] = fk_add(a.neg_div[j], lt ? C(1) : C(0));
    } else if (NORM == kMergeNormWeight) {
      a.pos_div[j] = fk_add(a.pos_div[j], gt ? w : C(0));
      a.neg_div[j] = fk_add(a.neg_div[j], lt ? w : C(0));
    }
  }
}

template <int PRUNE, int CONSENSUS, int NORM, bool SIGNW, typename C, typename X>
FK_INLINE void task_tile_sub(bool sub, const X* x, const C* bt, TileAcc<C>& a, int64_t m, C w, C thr, uint32_t key,
                             uint64_t i0, int32_t drop_thr, C scale) {
  if (sub) {
    task_tile<PRUNE, CONSENSUS, NORM, SIGNW, true>(x, bt, a, m, w, thr, key, i0, drop_thr, scale);
  } else {
    task_tile<PRUNE, CONSENSUS, NORM, SIGNW, false>(x, bt, a, m, w, thr, key, i0, drop_thr, scale);
  }
}

template <int PRUNE, int CONSENSUS, typename B, typename X>
FK_INLINE void merge_chunk(const MergeParams& prm, const MergeJob& job, int64_t begin, int64_t end) {
  using C = typename std::conditional<std::is_same<B, double>::value || std::is_same<X, double>::value, double,
                                      float>::type;
  const B* base = static_cast<const B*>(job.base);
  B* out = static_cast<B*>(job.out);
  const C lam = static_cast<C>(prm.lam);
  const C lin_div = static_cast<C>(prm.lin_div);
  const C scale = static_cast<C>(prm.scale);
  alignas(64) C bt[kTile];
  TileAcc<C> acc;
  for (int64_t b0 = begin; b0 < end; b0 += kTile) {
    const int64_t m = end - b0 < kTile ? end - b0 : kTile;
    for (int64_t j = 0; j < m; ++j) {
      bt[j] = load_as<C>(base[b0 + j]);
      acc.total[j] = acc.vote[j] = acc.pos[j] = acc.neg[j] = acc.pos_div[j] = acc.neg_div[j] = C(0);
    }
    for (int64_t k = 0; k < prm.n; ++k) {
      const X* x = static_cast<const X*>(job.inputs[k]) + b0;
      const C w = static_cast<C>(prm.weights[k]);
      const C thr = PRUNE == kMergePruneMagnitude ? static_cast<const C*>(job.thr)[k] : C(0);
      const uint32_t key = PRUNE == kMergePruneRandom ? job.keys[k] : 0u;
      const uint64_t i0 = job.offset + static_cast<uint64_t>(b0);
      const bool sub = prm.subtract_base;
      const int32_t dt = prm.drop_threshold;
      if (CONSENSUS == kMergeConsensusNone) {
        task_tile_sub<PRUNE, CONSENSUS, kMergeNormNone, false>(sub, x, bt, acc, m, w, thr, key, i0, dt, scale);
      } else if (prm.normalize == kMergeNormCount) {
        if (prm.sign_weighted) {
          task_tile_sub<PRUNE, CONSENSUS, kMergeNormCount, true>(sub, x, bt, acc, m, w, thr, key, i0, dt, scale);
        } else {
          task_tile_sub<PRUNE, CONSENSUS, kMergeNormCount, false>(sub, x, bt, acc, m, w, thr, key, i0, dt, scale);
        }
      } else if (prm.normalize == kMergeNormWeight) {
        if (prm.sign_weighted) {
          task_tile_sub<PRUNE, CONSENSUS, kMergeNormWeight, true>(sub, x, bt, acc, m, w, thr, key, i0, dt, scale);
        } else {
          task_tile_sub<PRUNE, CONSENSUS, kMergeNormWeight, false>(sub, x, bt, acc, m, w, thr, key, i0, dt, scale);
        }
      } else {
        if (prm.sign_weighted) {
          task_tile_sub<PRUNE, CONSENSUS, kMergeNormNone, true>(sub, x, bt, acc, m, w, thr, key, i0, dt, scale);
        } else {
          task_tile_sub<PRUNE, CONSENSUS, kMergeNormNone, false>(sub, x, bt, acc, m, w, thr, key, i0, dt, scale);
        }
      }
    }
    for (int64_t j = 0; j < m; ++j) {
      MergeAcc<C> a{acc.total[j], acc.vote[j], acc.pos[j], acc.neg[j], acc.pos_div[j], acc.neg_div[j]};
      out[b0 + j] = Store<B>::from(merge_finalize<CONSENSUS>(a, bt[j], prm.normalize, lin_div, lam));
    }
  }
}

// The kernel compiled once per instruction set. Only DARE's needs the wider ones: its hash multiplies 32-bit
// integers, which SSE2 (the build's baseline) cannot do in vectors; the other variants run the baseline build.
template <int PRUNE, int CONSENSUS, typename B, typename X>
void merge_chunk_baseline(const MergeParams& prm, const MergeJob& job, int64_t begin, int64_t end) {
  merge_chunk<PRUNE, CONSENSUS, B, X>(prm, job, begin, end);
}
#if FK_CPU_X86
template <int PRUNE, int CONSENSUS, typename B, typename X>
FK_TARGET_AVX2 void merge_chunk_avx2(const MergeParams& prm, const MergeJob& job, int64_t begin, int64_t end) {
  merge_chunk<PRUNE, CONSENSUS, B, X>(prm, job, begin, end);
}
template <int PRUNE, int CONSENSUS, typename B, typename X>
FK_TARGET_AVX512 void merge_chunk_avx512(const MergeParams& prm, const MergeJob& job, int64_t begin, int64_t end) {
  merge_chunk<PRUNE, CONSENSUS, B, X>(prm, job, begin, end);
}
#endif

template <int PRUNE, typename B, typename X>
MergeChunkFn pick_consensus(CpuIsa isa, int consensus) {
  if constexpr (PRUNE == kMergePruneRandom) {
    return consensus == kMergeConsensusNone    ? FK_ISA_PICK(isa, merge_chunk, PRUNE, kMergeConsensusNone, B, X)
           : consensus == kMergeConsensusTotal ? FK_ISA_PICK(isa, merge_chunk, PRUNE, kMergeConsensusTotal, B, X)
                                               : FK_ISA_PICK(isa, merge_chunk, PRUNE, kMergeConsensusFrequency, B, X);
  } else {  // the baseline build only (if constexpr: no AVX copies of these are instantiated)
    (void)isa;
    return consensus == kMergeConsensusNone    ? &merge_chunk_baseline<PRUNE, kMergeConsensusNone, B, X>
           : consensus == kMergeConsensusTotal ? &merge_chunk_baseline<PRUNE, kMergeConsensusTotal, B, X>
                                               : &merge_chunk_baseline<PRUNE, kMergeConsensusFrequency, B, X>;
  }
}

// DARE's chunk kernel for (B, X) at the active instruction set: defined in merge_task_vectors_dare.cpp for every
// pair of dispatch_float's types.
template <typename B, typename X>
MergeChunkFn pick_dare(CpuIsa isa, int consensus);

}  // namespace merge_detail
}  // namespace cpu
}  // namespace forgetkern
