// ewc_fused on CPU: EWC penalty lam/2 * sum F (theta - theta*)^2 and, optionally, its gradient lam * F * d
// written or added into grads, in one pass (math in csrc/include/forgetkern/ewc_penalty.h). OpenMP over a flat
// list of chunks; each chunk writes its partial sum, and the partials are added in chunk order, so the result
// does not depend on the number of threads.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "forgetkern/ewc_penalty.h"
#include "multi_tensor_cpu.h"

namespace forgetkern {
namespace cpu {
namespace {

struct EwcPtrs {
  const void* param;
  const void* anchor;
  const void* fisher;
  void* grad;
};

// Processes elements [begin, end) of one tensor; returns the chunk's sum of penalty terms.
using EwcChunkFn = double (*)(const EwcPtrs& ptrs, int64_t begin, int64_t end, double lam);

constexpr int64_t kSumBlock = 1024;

template <int MODE, typename P, typename A, typename F>
double ewc_chunk(const EwcPtrs& ptrs, int64_t begin, int64_t end, double lam_d) {
  using C = typename ComputeOf<P>::type;
  const C lam = static_cast<C>(lam_d);
  double sum = 0.0;
  // Terms are summed in C (vectorised) over blocks of kSumBlock elements, the block sums in double: short
  // float sums keep the rounding error of the penalty near that of a pairwise sum.
  for (int64_t b = begin; b < end; b += kSumBlock) {
    const int64_t n = end - b < kSumBlock ? end - b : kSumBlock;
    const P* __restrict__ p = static_cast<const P*>(ptrs.param) + b;
    const A* __restrict__ a = static_cast<const A*>(ptrs.anchor) + b;
    const F* __restrict__ f = static_cast<const F*>(ptrs.fisher) + b;
    C acc = C(0);
    if (MODE == kEwcPenaltyOnly) {
#pragma omp simd reduction(+ : acc)
      for (int64_t i = 0; i < n; ++i) {
        const C d = ewc_diff<C>(p[i], a[i]);
        acc += ewc_term(ewc_fd(f[i], d), d);
      }
    } else {
      P* __restrict__ g = static_cast<P*>(ptrs.grad) + b;
#pragma omp simd reduction(+ : acc)
      for (int64_t i = 0; i < n; ++i) {
        const C d = ewc_diff<C>(p[i], a[i]);
        const C fd = ewc_fd(f[i], d);
        acc += ewc_term(fd, d);
        g[i] = MODE == kEwcGradAccumulate ? ewc_grad_accumulate(g[i], fd, lam) : ewc_grad_write<P>(fd, lam);
      }
    }
    sum += static_cast<double>(acc);
  }
  return sum;
}

EwcChunkFn pick_kernel(int mode, c10::ScalarType param, c10::ScalarType anchor, c10::ScalarType fisher) {
  EwcChunkFn fn = nullptr;
  dispatch_float(param, "ewc_fused: params", [&](auto p) {
    dispatch_float(anchor, "ewc_fused: anchors", [&](auto a) {
      dispatch_float(fisher, "ewc_fused: fishers", [&](auto f) {
        using P = decltype(p);
        using A = decltype(a);
        using F = decltype(f);
        fn = mode == kEwcPenaltyOnly ? &ewc_chunk<kEwcPenaltyOnly, P, A, F>
             : mode == kEwcGradWrite ? &ewc_chunk<kEwcGradWrite, P, A, F>
                                     : &ewc_chunk<kEwcGradAccumulate, P, A, F>;
      });
    });
  });
  return fn;
}

at::Tensor ewc_fused_cpu(at::TensorList params, at::TensorList anchors, at::TensorList fishers,
                         at::TensorList grads, double lam, bool write_grad, bool accumulate) {
  static const char* op = "forgetkern_cpu::ewc_fused";
  check_list(params, params, op, "params");
  check_list(anchors, params, op, "anchors");
  check_list(fishers, params, op, "fishers");
  if (write_grad) {
    check_list(grads, params, op, "grads");
    for (size_t i = 0; i < grads.size(); ++i) {
      TORCH_CHECK(grads[i].scalar_type() == params[i].scalar_type(), op, ": grads[", i, "] has dtype ",
                  grads[i].scalar_type(), " but params[", i, "] has ", params[i].scalar_type());
    }
  }
  const int mode = !write_grad ? kEwcPenaltyOnly : accumulate ? kEwcGradAccumulate : kEwcGradWrite;
  const size_t n = params.size();
  bool any_double = false;
  std::vector<int64_t> numels(n);
  std::vector<EwcChunkFn> fns(n);
  std::vector<EwcPtrs> ptrs(n);
  for (size_t t = 0; t < n; ++t) {
    numels[t] = params[t].numel();
    any_double = any_double || params[t].scalar_type() == at::kDouble;
    fns[t] = pick_kernel(mode, params[t].scalar_type(), anchors[t].scalar_type(), fishers[t].scalar_type());
    if (numels[t] == 0) continue;
    ptrs[t] = EwcPtrs{params[t].data_ptr(), anchors[t].data_ptr(), fishers[t].data_ptr(),
                      write_grad ? grads[t].data_ptr() : nullptr};
  }
  const std::vector<Chunk> chunks = make_chunks(numels);
  const int64_t nchunks = static_cast<int64_t>(chunks.size());
  std::vector<double> partial(chunks.size());
#pragma omp parallel for schedule(dynamic) if (nchunks > 1)
  for (int64_t c = 0; c < nchunks; ++c) {
    const Chunk& ch = chunks[c];
    partial[c] = fns[ch.tensor](ptrs[ch.tensor], ch.begin, ch.end, lam);
  }
  double sum = 0.0;
  for (double v : partial) sum += v;  // chunk order: deterministic
  at::Tensor out = at::empty({}, at::TensorOptions().dtype(any_double ? at::kDouble : at::kFloat).device(at::kCPU));
  if (any_double) {
    *out.data_ptr<double>() = ewc_finalize<double>(sum, lam);
  } else {
    *out.data_ptr<float>() = ewc_finalize<float>(sum, lam);
  }
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace forgetkern

TORCH_LIBRARY_FRAGMENT(forgetkern_cpu, m) {
  m.def(
      "ewc_fused(Tensor[] params, Tensor[] anchors, Tensor[] fishers, Tensor(a!)[] grads, float lam, "
      "bool write_grad, bool accumulate) -> Tensor");
}

TORCH_LIBRARY_IMPL(forgetkern_cpu, CPU, m) {
  m.impl("ewc_fused", &forgetkern::cpu::ewc_fused_cpu);
}
