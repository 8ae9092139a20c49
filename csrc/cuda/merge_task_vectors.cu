// merge_task_vectors on CUDA: one pass over the N inputs of every tensor (math in
// csrc/include/forgetkern/merge_task_vectors.h, shared with the CPU kernel).
//
// Multi-tensor launch: a launch carries, by value in its kernel arguments (under the 4 KiB limit), up to
// kMergeMaxJobs tensors of one dtype group, their base / out / N input pointers (kMergeMaxSlots in all), the N
// DARE keys of each, the N weights and the scalars; no table is copied to the device per call. One block per
// chunk of one tensor. Float compute: kMergeChunk elements per block, a thread owns W = 4 consecutive elements at
// a time (128-bit loads of float32, 64-bit of 16-bit dtypes) when every pointer of the tensor is aligned, a
// scalar loop otherwise and for the tail. Double compute: one element per thread, kMergeThreads per block (see
// MergeTypes: zero spills). A thread loads the base once, then for k = 0..N-1 task k's
// values, prunes, weights and accumulates (merge_accumulate: one IEEE operation at a time, no contraction into
// FMA: fk_add / fk_mul are __fadd_rn / __fmul_rn, the divisions IEEE), and stores b + lam * delta / div once.
// Each element depends only on its own inputs: bit-identical to the CPU kernel and to the reference.
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "device_utils.cuh"
#include "forgetkern/merge_task_vectors.h"
#include "launchers.h"

namespace forgetkern {
namespace cuda {
namespace {

constexpr int kMergeThreads = 256;
constexpr int64_t kMergeChunk = 16384;  // float compute: a multiple of kMergeThreads * W
constexpr int kMergeMaxJobs = 24;
constexpr int kMergeMaxSlots = 168;    // pointers: base, out, N inputs per tensor

struct MergeJobMeta {
  int64_t numel;
  uint64_t offset;     // flat index of element 0 (DARE hash)
  const void* thr;     // N thresholds (compute type) or null
  int64_t block0;      // first block of this tensor in the launch
  int32_t slot0;       // ptrs[slot0] = base, ptrs[slot0 + 1] = out, ptrs[slot0 + 2 + k] = input k
  int32_t pad;
};

struct MergeMeta {
  void* ptrs[kMergeMaxSlots];
  uint32_t keys[kMergeMaxSlots];  // parallel to ptrs (the input slots' keys)
  MergeJobMeta jobs[kMergeMaxJobs];
  double weights[kMergeMaxTasks];
  double scale, lin_div, lam;
  int32_t n_tasks, n_jobs, drop_threshold, normalize;
  bool sign_weighted, subtract_base, frequency;
};
static_assert(sizeof(MergeMeta) < 4000, "kernel parameter limit");

template <typename T, int W>
struct alignas(sizeof(T) * W) VecN {
  T v[W];
};

template <typename T, int W>
FK_INLINE bool vecn_aligned(const T* p) {
  return (reinterpret_cast<uintptr_t>(p) % sizeof(VecN<T, W>)) == 0;
}

// One task's value of one element into the accumulators (the CPU kernel's task_tile, element by element).
template <int PRUNE, bool ELECT, typename C, typename X>
FK_INLINE void merge_task(const MergeMeta& m, MergeAcc<C>& a, X xv, C b, C w, C thr, C scale,
                                           uint32_t key, uint64_t gi) {
  C tau = load_as<C>(xv);
  if (m.subtract_base) tau = fk_sub(tau, b);
  C v = tau;
  if (PRUNE == kMergePruneMagnitude) v = merge_prune_magnitude(tau, thr);
  if (PRUNE == kMergePruneRandom) v = merge_prune_random(merge_dare_keep(key, gi, m.drop_threshold), tau, scale);
  if (!ELECT) {
    merge_accumulate<kMergeConsensusNone>(a, v, w, false, kMergeNormNone);
  } else if (m.frequency) {
    merge_accumulate<kMergeConsensusFrequency>(a, v, w, m.sign_weighted, m.normalize);
  } else {
    merge_accumulate<kMergeConsensusTotal>(a, v, w, m.sign_weighted, m.normalize);
  }
}

template <typename B, typename X, bool ELECT>
struct MergeTypes {
  using C = typename std::conditional<std::is_same<B, double>::value || std::is_same<X, double>::value, double,
                                      float>::type;
  static constexpr int kNarrow = sizeof(B) < sizeof(X) ? static_cast<int>(sizeof(B)) : static_cast<int>(sizeof(X));
  // float compute: 16 bytes of the narrower dtype, at most 4 elements per thread and access, kMergeChunk
  // elements per block. Double compute: one element per thread, one block of kMergeThreads elements. The IEEE
  // division of the finalisation has a called slow path; every value live across that call beyond the few
  // registers the call preserves is spilled, and only with a single element per thread (nothing left to do
  // after the call but the store) does no double kernel spill.
  static constexpr bool kOne = std::is_same<C, double>::value;
  static constexpr int W = kOne ? 1 : (16 / kNarrow > 4 ? 4 : 16 / kNarrow);
  static constexpr int64_t kChunk = kOne ? kMergeThreads : kMergeChunk;
};

// Block `blk`, thread `tid` of a launch (host-callable: tests/csrc/merge_task_vectors_host.cu runs the blocks of
// the launch plan on the CPU and checks them against the per-element math).
template <int PRUNE, bool ELECT, typename B, typename X>
FK_INLINE void merge_block(const MergeMeta& m, int64_t blk, int tid) {
  using C = typename MergeTypes<B, X, ELECT>::C;
  constexpr int W = MergeTypes<B, X, ELECT>::W;
  constexpr int kElect = ELECT ? kMergeConsensusTotal : kMergeConsensusNone;
  int j = 0;
  while (j + 1 < m.n_jobs && m.jobs[j + 1].block0 <= blk) ++j;
  const MergeJobMeta& job = m.jobs[j];
  constexpr int64_t kChunk = MergeTypes<B, X, ELECT>::kChunk;
  const int64_t start = (blk - job.block0) * kChunk;
  const int64_t rest = job.numel - start;
  const int n = static_cast<int>(rest < kChunk ? rest : kChunk);  // 32-bit indices below
  const int ntask = m.n_tasks;
  const B* __restrict__ base = static_cast<const B*>(m.ptrs[job.slot0]) + start;
  B* __restrict__ out = static_cast<B*>(m.ptrs[job.slot0 + 1]) + start;
  const C* thr = static_cast<const C*>(job.thr);
  const C scale = static_cast<C>(m.scale);
  const C lin_div = static_cast<C>(m.lin_div);
  const C lam = static_cast<C>(m.lam);
  const uint64_t g0 = job.offset + static_cast<uint64_t>(start);

  if (MergeTypes<B, X, ELECT>::kOne) {
    const int i = tid;
    if (i < n) {
      const C b = load_as<C>(base[i]);
      MergeAcc<C> acc;
      merge_acc_init(acc);
      for (int k = 0; k < ntask; ++k) {
        const X* x = static_cast<const X*>(m.ptrs[job.slot0 + 2 + k]) + start;
        const C t = PRUNE == kMergePruneMagnitude ? thr[k] : C(0);
        merge_task<PRUNE, ELECT>(m, acc, x[i], b, static_cast<C>(m.weights[k]), t, scale, m.keys[job.slot0 + 2 + k],
                                 g0 + static_cast<uint64_t>(i));
      }
      out[i] = Store<B>::from(merge_finalize<kElect>(acc, b, m.normalize, lin_div, lam));
    }
    return;
  }
  bool aligned = vecn_aligned<B, W>(base) && vecn_aligned<B, W>(out);
  for (int k = 0; k < ntask; ++k) {
    aligned = aligned && vecn_aligned<X, W>(static_cast<const X*>(m.ptrs[job.slot0 + 2 + k]) + start);
  }
  int done = 0;
  if (aligned) {
    const int nvec = n / W;
    for (int i = tid; i < nvec; i += kMergeThreads) {
      const VecN<B, W> bv = reinterpret_cast<const VecN<B, W>*>(base)[i];
      C b[W];
      MergeAcc<C> acc[W];
#pragma unroll
      for (int e = 0; e < W; ++e) {
        b[e] = load_as<C>(bv.v[e]);
        merge_acc_init(acc[e]);
      }
      const uint64_t gi = g0 + static_cast<uint64_t>(i) * W;
#pragma unroll 1
      for (int k = 0; k < ntask; ++k) {
        const X* x = static_cast<const X*>(m.ptrs[job.slot0 + 2 + k]) + start;
        const VecN<X, W> xv = reinterpret_cast<const VecN<X, W>*>(x)[i];
        const C w = static_cast<C>(m.weights[k]);
        const C t = PRUNE == kMergePruneMagnitude ? thr[k] : C(0);
        const uint32_t key = m.keys[job.slot0 + 2 + k];
#pragma unroll
        for (int e = 0; e < W; ++e) {
          merge_task<PRUNE, ELECT>(m, acc[e], xv.v[e], b[e], w, t, scale, key, gi + static_cast<uint64_t>(e));
        }
      }
      VecN<B, W> ov;
#pragma unroll
      for (int e = 0; e < W; ++e) {
        ov.v[e] = Store<B>::from(merge_finalize<kElect>(acc[e], b[e], m.normalize, lin_div, lam));
      }
      reinterpret_cast<VecN<B, W>*>(out)[i] = ov;
    }
    done = nvec * W;
  }
#pragma unroll 1
  for (int i = done + tid; i < n; i += kMergeThreads) {
    const C b = load_as<C>(base[i]);
    MergeAcc<C> acc;
    merge_acc_init(acc);
    for (int k = 0; k < ntask; ++k) {
      const X* x = static_cast<const X*>(m.ptrs[job.slot0 + 2 + k]) + start;
      const C w = static_cast<C>(m.weights[k]);
      const C t = PRUNE == kMergePruneMagnitude ? thr[k] : C(0);
      merge_task<PRUNE, ELECT>(m, acc, x[i], b, w, t, scale, m.keys[job.slot0 + 2 + k],
                               g0 + static_cast<uint64_t>(i));
    }
    out[i] = Store<B>::from(merge_finalize<kElect>(acc, b, m.normalize, lin_div, lam));
  }
}

template <int PRUNE, bool ELECT, typename B, typename X>
__global__ void __launch_bounds__(kMergeThreads) merge_task_vectors_kernel(const __grid_constant__ MergeMeta m) {
  merge_block<PRUNE, ELECT, B, X>(m, blockIdx.x, static_cast<int>(threadIdx.x));
}

// Fills the launch tables and calls launch(meta, blocks) for each launch (the arguments of launchers.h).
template <int PRUNE, bool ELECT, typename B, typename X, typename Launch>
cudaError_t plan_launches(int64_t n, const void* const* base, const void* const* inputs, void* const* out,
                          const int64_t* numels, const uint64_t* offsets, const uint32_t* keys,
                          const void* const* thresholds, const MergeLaunchParams& prm, Launch&& launch) {
  using C = typename MergeTypes<B, X, ELECT>::C;
  const int64_t N = prm.n_tasks;
  MergeMeta m{};
  for (int64_t k = 0; k < N; ++k) m.weights[k] = prm.weights[k];
  m.scale = std::is_same<C, double>::value ? prm.scale_f64 : prm.scale_f32;
  m.lin_div = prm.lin_div;
  m.lam = prm.lam;
  m.n_tasks = static_cast<int32_t>(N);
  m.drop_threshold = prm.drop_threshold;
  m.normalize = prm.normalize;
  m.sign_weighted = prm.sign_weighted;
  m.subtract_base = prm.subtract_base;
  m.frequency = prm.consensus == kMergeConsensusFrequency;
  constexpr int64_t kMaxGrid = 0x7FFFFFFF;
  int jobs = 0;
  int slots = 0;
  int64_t blocks = 0;
  auto flush = [&]() -> cudaError_t {
    if (jobs == 0) return cudaSuccess;
    m.n_jobs = jobs;
    const cudaError_t err = launch(m, blocks);
    jobs = 0;
    slots = 0;
    blocks = 0;
    return err;
  };
  for (int64_t t = 0; t < n; ++t) {
    if (numels[t] <= 0) continue;
    const int64_t nb = ceil_div(numels[t], MergeTypes<B, X, ELECT>::kChunk);
    if (nb > kMaxGrid) return cudaErrorInvalidValue;
    if (jobs == kMergeMaxJobs || slots + N + 2 > kMergeMaxSlots || blocks + nb > kMaxGrid) {
      const cudaError_t err = flush();
      if (err != cudaSuccess) return err;
    }
    MergeJobMeta& job = m.jobs[jobs++];
    job.numel = numels[t];
    job.offset = offsets[t];
    job.thr = thresholds != nullptr ? thresholds[t] : nullptr;
    job.block0 = blocks;
    job.slot0 = slots;
    m.ptrs[slots] = const_cast<void*>(base[t]);
    m.ptrs[slots + 1] = out[t];
    for (int64_t k = 0; k < N; ++k) {
      m.ptrs[slots + 2 + k] = const_cast<void*>(inputs[t * N + k]);
      m.keys[slots + 2 + k] = keys != nullptr ? keys[t * N + k] : 0u;
    }
    slots += static_cast<int>(N + 2);
    blocks += nb;
  }
  return flush();
}

#ifndef FK_MERGE_HOST_ONLY
template <int PRUNE, bool ELECT, typename B, typename X>
cudaError_t launch_typed(int64_t n, const void* const* base, const void* const* inputs, void* const* out,
                         const int64_t* numels, const uint64_t* offsets, const uint32_t* keys,
                         const void* const* thresholds, const MergeLaunchParams& prm, cudaStream_t stream) {
  return plan_launches<PRUNE, ELECT, B, X>(n, base, inputs, out, numels, offsets, keys, thresholds, prm,
                                           [&](const MergeMeta& m, int64_t blocks) {
                                             merge_task_vectors_kernel<PRUNE, ELECT, B, X>
                                                 <<<static_cast<unsigned int>(blocks), kMergeThreads, 0, stream>>>(m);
                                             return cudaGetLastError();
                                           });
}

template <typename B, typename X>
cudaError_t launch_modes(int64_t n, const void* const* base, const void* const* inputs, void* const* out,
                         const int64_t* numels, const uint64_t* offsets, const uint32_t* keys,
                         const void* const* thresholds, const MergeLaunchParams& prm, cudaStream_t stream) {
  const bool elect = prm.consensus != kMergeConsensusNone;
#define FK_MERGE_LAUNCH(P, E) \
  launch_typed<P, E, B, X>(n, base, inputs, out, numels, offsets, keys, thresholds, prm, stream)
  switch (prm.prune) {
    case kMergePruneNone: return elect ? FK_MERGE_LAUNCH(kMergePruneNone, true) : FK_MERGE_LAUNCH(kMergePruneNone, false);
    case kMergePruneMagnitude:
      return elect ? FK_MERGE_LAUNCH(kMergePruneMagnitude, true) : FK_MERGE_LAUNCH(kMergePruneMagnitude, false);
    default:
      return elect ? FK_MERGE_LAUNCH(kMergePruneRandom, true) : FK_MERGE_LAUNCH(kMergePruneRandom, false);
  }
#undef FK_MERGE_LAUNCH
}
#endif  // FK_MERGE_HOST_ONLY

}  // namespace

#ifndef FK_MERGE_HOST_ONLY
cudaError_t merge_task_vectors_launch(int64_t n, const void* const* base, const void* const* inputs,
                                      void* const* out, const int64_t* numels, const uint64_t* offsets,
                                      const uint32_t* keys, const void* const* thresholds, DType base_dtype,
                                      DType input_dtype, const MergeLaunchParams& prm, cudaStream_t stream) {
  if (prm.n_tasks < 1 || prm.n_tasks > kMergeMaxTasks || prm.n_tasks + 2 > kMergeMaxSlots) {
    return cudaErrorInvalidValue;
  }
  if (prm.prune < kMergePruneNone || prm.prune > kMergePruneRandom) return cudaErrorInvalidValue;
  if (prm.prune == kMergePruneRandom && keys == nullptr) return cudaErrorInvalidValue;
  if (prm.prune == kMergePruneMagnitude && thresholds == nullptr) return cudaErrorInvalidValue;
  cudaError_t err = cudaErrorInvalidValue;
  dispatch_dtype<true>(base_dtype, [&](auto b_tag) {
    dispatch_dtype<true>(input_dtype, [&](auto x_tag) {
      err = launch_modes<decltype(b_tag), decltype(x_tag)>(n, base, inputs, out, numels, offsets, keys,
                                                           thresholds, prm, stream);
    });
  });
  return err;
}
#endif

}  // namespace cuda
}  // namespace forgetkern
