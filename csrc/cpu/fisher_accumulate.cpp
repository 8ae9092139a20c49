// fisher_accumulate_ on CPU: F <- decay * F + scale * g^2 over lists of tensors (math in
// csrc/include/forgetkern/fisher_accumulate.h), OpenMP over a flat list of chunks. The chunk kernels exist
// once per instruction set (cpu_isa.h); the op picks one set per call.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "cpu_isa.h"
#include "forgetkern/fisher_accumulate.h"
#include "isa_tile.h"
#include "multi_tensor_cpu.h"

namespace forgetkern {
namespace cpu {
namespace {

// Updates elements [begin, end) of one (fisher, grad) pair; returns 1 if a gradient element was not finite.
using FisherChunkFn = int (*)(void* fisher, const void* grad, int64_t begin, int64_t end, double decay,
                              double scale);

// F <- update over n elements; G is the grad type the loop reads (fp32 for a staged fp16 tile). Returns the
// number of non-finite gradient elements.
template <typename C, typename F, typename G>
FK_INLINE int fisher_run(F* __restrict f, const G* __restrict g, int64_t n, C decay, C scale) {
  int nonfinite = 0;  // count (n <= kCpuChunk, no overflow)
#pragma omp simd reduction(+ : nonfinite)
  for (int64_t i = 0; i < n; ++i) {
    f[i] = fisher_element<C>(f[i], g[i], decay, scale, nonfinite);
  }
  return nonfinite;
}

template <typename Isa, typename F, typename G>
FK_INLINE int fisher_chunk(void* fisher, const void* grad, int64_t begin, int64_t end, double decay_d,
                           double scale_d) {
  using C = typename ComputeOf<F>::type;
  F* f = static_cast<F*>(fisher) + begin;
  const G* g = static_cast<const G*>(grad) + begin;
  const C decay = static_cast<C>(decay_d);
  const C scale = static_cast<C>(scale_d);
  const int64_t n = end - begin;
  int nonfinite = 0;
  if constexpr (Stage<Isa, G>::kStaged) {  // fp16 grads: converted per tile
    Stage<Isa, G> gs;
    for (int64_t b = 0; b < n; b += kTile) {
      const int64_t m = n - b < kTile ? n - b : kTile;
      nonfinite += fisher_run<C>(f + b, gs.in(g + b, m), m, decay, scale);
    }
  } else {
    nonfinite = fisher_run<C>(f, g, n, decay, scale);
  }
  return nonfinite != 0 ? 1 : 0;
}

// The same kernel compiled once per instruction set.
template <typename F, typename G>
int fisher_chunk_baseline(void* f, const void* g, int64_t begin, int64_t end, double decay, double scale) {
  return fisher_chunk<IsaBaseline, F, G>(f, g, begin, end, decay, scale);
}
#if FK_CPU_X86
template <typename F, typename G>
FK_TARGET_AVX2 int fisher_chunk_avx2(void* f, const void* g, int64_t begin, int64_t end, double decay,
                                     double scale) {
  return fisher_chunk<IsaAvx2, F, G>(f, g, begin, end, decay, scale);
}
template <typename F, typename G>
FK_TARGET_AVX512 int fisher_chunk_avx512(void* f, const void* g, int64_t begin, int64_t end, double decay,
                                         double scale) {
  return fisher_chunk<IsaAvx512, F, G>(f, g, begin, end, decay, scale);
}
#endif

FisherChunkFn pick_kernel(CpuIsa isa, c10::ScalarType fisher, c10::ScalarType grad) {
  FisherChunkFn fn = nullptr;
  dispatch_state(fisher, "fisher_accumulate_: fishers", [&](auto f) {
    dispatch_float(grad, "fisher_accumulate_: grads", [&](auto g) {
      fn = FK_ISA_PICK(isa, fisher_chunk, decltype(f), decltype(g));
    });
  });
  return fn;
}

at::Tensor fisher_accumulate_cpu(at::TensorList fishers, at::TensorList grads, double decay, double scale) {
  static const char* op = "forgetkern_cpu::fisher_accumulate_";
  check_list(fishers, fishers, op, "fishers");
  check_list(grads, fishers, op, "grads");
  const CpuIsa isa = active_cpu_isa();
  const size_t n = fishers.size();
  std::vector<int64_t> numels(n);
  std::vector<FisherChunkFn> fns(n);
  std::vector<void*> fptr(n);
  std::vector<const void*> gptr(n);
  for (size_t t = 0; t < n; ++t) {
    numels[t] = fishers[t].numel();
    fns[t] = pick_kernel(isa, fishers[t].scalar_type(), grads[t].scalar_type());
    fptr[t] = numels[t] ? fishers[t].data_ptr() : nullptr;
    gptr[t] = numels[t] ? grads[t].data_ptr() : nullptr;
  }
  const std::vector<Chunk> chunks = make_chunks(numels);
  const int64_t nchunks = static_cast<int64_t>(chunks.size());
  int nonfinite = 0;
#pragma omp parallel for schedule(dynamic) reduction(| : nonfinite) if (nchunks > 1)
  for (int64_t c = 0; c < nchunks; ++c) {
    const Chunk& ch = chunks[c];
    nonfinite |= fns[ch.tensor](fptr[ch.tensor], gptr[ch.tensor], ch.begin, ch.end, decay, scale);
  }
  at::Tensor found = at::empty({}, at::TensorOptions().dtype(at::kFloat).device(at::kCPU));
  *found.data_ptr<float>() = nonfinite ? 1.0f : 0.0f;
  return found;
}

}  // namespace
}  // namespace cpu
}  // namespace forgetkern

TORCH_LIBRARY_FRAGMENT(forgetkern_cpu, m) {
  m.def("fisher_accumulate_(Tensor(a!)[] fishers, Tensor[] grads, float decay, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(forgetkern_cpu, CPU, m) {
  m.impl("fisher_accumulate_", &forgetkern::cpu::fisher_accumulate_cpu);
}
