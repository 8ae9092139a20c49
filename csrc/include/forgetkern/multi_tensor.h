// Multi-tensor apply: chunk bookkeeping shared by the CPU and CUDA kernels (no torch headers).
//
// CPU: the tensors are cut into chunks of kCpuChunk elements (empty tensors skipped); one flat list of chunks is
// processed by an OpenMP loop, each chunk writing its own partial result, combined in chunk order.
//
// CUDA: one thread block per chunk of kCudaChunk elements. A launch carries, by value in the kernel
// arguments (under the 4 KiB parameter limit), up to max_tensors(DEPTH) tensors (DEPTH pointers each) and a
// table of up to kMaxBlocksPerLaunch blocks -> (tensor slot, chunk index). multi_tensor_apply() fills the table
// and calls `launch(meta, num_blocks)` whenever the table or the tensor slots are full, until all chunks are
// covered; a tensor cut between two launches continues in slot 0 of the next one. meta.block_offset counts
// the blocks of the earlier launches, so block b of a launch owns global slot block_offset + b of a workspace
// (per-block partial sums, reduced afterwards in slot order: deterministic).
#pragma once

#include <cstdint>

#include "forgetkern/common.h"

namespace forgetkern {

constexpr int64_t kCpuChunk = 32768;
constexpr int64_t kCudaChunk = 65536;
constexpr int kCudaBlockThreads = 512;
constexpr int kCudaVec = 4;  // elements per vector access
constexpr int kMaxBlocksPerLaunch = 320;

FK_HD constexpr int max_tensors(int depth) {
  return depth == 1 ? 110 : depth == 2 ? 64 : depth == 3 ? 48 : depth == 4 ? 36 : 30;
}

template <int DEPTH>
struct TensorListMeta {
  void* addresses[DEPTH][max_tensors(DEPTH)];
  int64_t numel[max_tensors(DEPTH)];
  int64_t block_offset;
  int32_t block_to_chunk[kMaxBlocksPerLaunch];
  unsigned char block_to_tensor[kMaxBlocksPerLaunch];
};
static_assert(sizeof(TensorListMeta<1>) < 4000, "kernel parameter limit");
static_assert(sizeof(TensorListMeta<2>) < 4000, "kernel parameter limit");
static_assert(sizeof(TensorListMeta<3>) < 4000, "kernel parameter limit");
static_assert(sizeof(TensorListMeta<4>) < 4000, "kernel parameter limit");

// Number of chunks (= CUDA blocks, = workspace slots) over the tensors of a list.
inline int64_t count_chunks(int64_t n, const int64_t* numels, int64_t chunk) {
  int64_t total = 0;
  for (int64_t t = 0; t < n; ++t) total += ceil_div(numels[t], chunk);
  return total;
}

// lists[d][t]: pointer of tensor t in list d (d < DEPTH). Returns the first error `launch` returned (an
// integer-like code where 0 means success, e.g. cudaError_t), or 0.
template <int DEPTH, typename Launch>
auto multi_tensor_apply(int64_t n, void* const* const* lists, const int64_t* numels, Launch&& launch)
    -> decltype(launch(TensorListMeta<DEPTH>{}, 0)) {
  using Result = decltype(launch(TensorListMeta<DEPTH>{}, 0));
  TensorListMeta<DEPTH> meta{};
  meta.block_offset = 0;
  int64_t last = -1;
  for (int64_t t = 0; t < n; ++t) {
    if (numels[t] > 0) last = t;
  }
  int slots = 0;
  int blocks = 0;
  for (int64_t t = 0; t <= last; ++t) {
    if (numels[t] <= 0) continue;
    int slot = slots++;
    for (int d = 0; d < DEPTH; ++d) meta.addresses[d][slot] = lists[d][t];
    meta.numel[slot] = numels[t];
    const int64_t chunks = ceil_div(numels[t], kCudaChunk);
    for (int64_t c = 0; c < chunks; ++c) {
      meta.block_to_tensor[blocks] = static_cast<unsigned char>(slot);
      meta.block_to_chunk[blocks] = static_cast<int32_t>(c);
      ++blocks;
      const bool tensor_done = c == chunks - 1;
      const bool full = blocks == kMaxBlocksPerLaunch || (tensor_done && (slots == max_tensors(DEPTH) || t == last));
      if (!full) continue;
      const Result err = launch(meta, blocks);
      if (err != Result{}) return err;
      meta.block_offset += blocks;
      blocks = 0;
      if (tensor_done) {
        slots = 0;
      } else {  // the tensor goes on in the next launch, from slot 0
        for (int d = 0; d < DEPTH; ++d) meta.addresses[d][0] = meta.addresses[d][slot];
        meta.numel[0] = meta.numel[slot];
        slot = 0;
        slots = 1;
      }
    }
  }
  return Result{};
}

}  // namespace forgetkern
