// fisher_accumulate_ on CPU: F <- decay * F + scale * g^2 over lists of tensors (math in
// csrc/include/forgetkern/fisher_accumulate.h), OpenMP over a flat list of chunks.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "forgetkern/fisher_accumulate.h"
#include "multi_tensor_cpu.h"

namespace forgetkern {
namespace cpu {
namespace {

// Updates elements [begin, end) of one (fisher, grad) pair; returns 1 if a gradient element was not finite.
using FisherChunkFn = int (*)(void* fisher, const void* grad, int64_t begin, int64_t end, double decay,
                              double scale);

template <typename F, typename G>
int fisher_chunk(void* fisher, const void* grad, int64_t begin, int64_t end, double decay_d, double scale_d) {
  using C = typename ComputeOf<F>::type;
  F* __restrict__ f = static_cast<F*>(fisher) + begin;
  const G* __restrict__ g = static_cast<const G*>(grad) + begin;
  const C decay = static_cast<C>(decay_d);
  const C scale = static_cast<C>(scale_d);
  const int64_t n = end - begin;
  int nonfinite = 0;  // count (n <= kCpuChunk, no overflow)
#pragma omp simd reduction(+ : nonfinite)
  for (int64_t i = 0; i < n; ++i) {
    f[i] = fisher_element<C>(f[i], g[i], decay, scale, nonfinite);
  }
  return nonfinite != 0 ? 1 : 0;
}

FisherChunkFn pick_kernel(c10::ScalarType fisher, c10::ScalarType grad) {
  FisherChunkFn fn = nullptr;
  dispatch_state(fisher, "fisher_accumulate_: fishers", [&](auto f) {
    dispatch_float(grad, "fisher_accumulate_: grads", [&](auto g) {
      fn = &fisher_chunk<decltype(f), decltype(g)>;
    });
  });
  return fn;
}

at::Tensor fisher_accumulate_cpu(at::TensorList fishers, at::TensorList grads, double decay, double scale) {
  static const char* op = "forgetkern_cpu::fisher_accumulate_";
  check_list(fishers, fishers, op, "fishers");
  check_list(grads, fishers, op, "grads");
  const size_t n = fishers.size();
  std::vector<int64_t> numels(n);
  std::vector<FisherChunkFn> fns(n);
  std::vector<void*> fptr(n);
  std::vector<const void*> gptr(n);
  for (size_t t = 0; t < n; ++t) {
    numels[t] = fishers[t].numel();
    fns[t] = pick_kernel(fishers[t].scalar_type(), grads[t].scalar_type());
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
