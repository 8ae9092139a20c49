// DARE's merge_task_vectors kernels (merge_task_vectors_kernels.h), instantiated here for every consensus, dtype
// pair and instruction set: a translation unit of their own, compiled in parallel with the op's.
#include "merge_task_vectors_kernels.h"

namespace forgetkern {
namespace cpu {
namespace merge_detail {

template <typename B, typename X>
MergeChunkFn pick_dare(CpuIsa isa, int consensus) {
  return pick_consensus<kMergePruneRandom, B, X>(isa, consensus);
}

#define FK_MERGE_DARE_X(B)                                    \
  template MergeChunkFn pick_dare<B, float>(CpuIsa, int);     \
  template MergeChunkFn pick_dare<B, double>(CpuIsa, int);    \
  template MergeChunkFn pick_dare<B, fk_half>(CpuIsa, int);   \
  template MergeChunkFn pick_dare<B, fk_bf16>(CpuIsa, int);
FK_MERGE_DARE_X(float)
FK_MERGE_DARE_X(double)
FK_MERGE_DARE_X(fk_half)
FK_MERGE_DARE_X(fk_bf16)
#undef FK_MERGE_DARE_X

}  // namespace merge_detail
}  // namespace cpu
}  // namespace forgetkern
