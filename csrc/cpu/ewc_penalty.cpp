// ewc_fused on CPU: EWC penalty lam/2 * sum F (theta - theta*)^2 and, optionally, its gradient lam * F * d
// written or added into grads, in one pass (math in csrc/include/forgetkern/ewc_penalty.h). OpenMP over a flat
// list of chunks; each chunk writes its partial sum, and the partials are added in chunk order, so the result
// does not depend on the number of threads. The chunk kernels exist once per instruction set (cpu_isa.h); the
// op picks one set per call, and the penalty's summation order is the same in all of them.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "cpu_isa.h"
#include "forgetkern/ewc_penalty.h"
#include "isa_tile.h"
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

// One tile of n elements: term[i] = F d^2 and, for the gradient modes, g[i] written or accumulated. P, A, F
// are the types the loop reads (fp32 for staged fp16 tiles), C the compute type of the parameter.
template <int MODE, typename C, typename P, typename A, typename F>
FK_INLINE void ewc_run(const P* __restrict p, const A* __restrict a, const F* __restrict f, P* __restrict g,
                       C lam, int64_t n, C* __restrict term) {
  if constexpr (MODE == kEwcPenaltyOnly) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const C d = ewc_diff<C>(p[i], a[i]);
      term[i] = ewc_term(ewc_fd(f[i], d), d);
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const C d = ewc_diff<C>(p[i], a[i]);
      const C fd = ewc_fd(f[i], d);
      term[i] = ewc_term(fd, d);
      g[i] = MODE == kEwcGradAccumulate ? ewc_grad_accumulate(g[i], fd, lam) : ewc_grad_write<P>(fd, lam);
    }
  }
}

// Terms are summed in C per tile of kTile elements (lane_sum: fixed order, vectorised), the tile sums in
// double: short float sums keep the rounding error of the penalty near that of a pairwise sum.
template <typename Isa, int MODE, typename P, typename A, typename F>
FK_INLINE double ewc_chunk(const EwcPtrs& ptrs, int64_t begin, int64_t end, double lam_d) {
  using C = typename ComputeOf<P>::type;
  const C lam = static_cast<C>(lam_d);
  Stage<Isa, P> ps;
  Stage<Isa, A> as;
  Stage<Isa, F> fs;
  Stage<Isa, P> gs;
  alignas(64) C term[kTile];
  double sum = 0.0;
  for (int64_t b = begin; b < end; b += kTile) {
    const int64_t n = end - b < kTile ? end - b : kTile;
    const auto* p = ps.in(static_cast<const P*>(ptrs.param) + b, n);
    const auto* a = as.in(static_cast<const A*>(ptrs.anchor) + b, n);
    const auto* f = fs.in(static_cast<const F*>(ptrs.fisher) + b, n);
    if constexpr (MODE == kEwcPenaltyOnly) {
      ewc_run<MODE, C>(p, a, f, gs.out(nullptr), lam, n, term);
    } else {
      P* grad = static_cast<P*>(ptrs.grad) + b;
      ewc_run<MODE, C>(p, a, f, MODE == kEwcGradAccumulate ? gs.inout(grad, n) : gs.out(grad), lam, n, term);
      gs.flush(grad, n);
    }
    sum += static_cast<double>(lane_sum(term, n));
  }
  return sum;
}

// The same kernel compiled once per instruction set.
template <int MODE, typename P, typename A, typename F>
double ewc_chunk_baseline(const EwcPtrs& ptrs, int64_t begin, int64_t end, double lam) {
  return ewc_chunk<IsaBaseline, MODE, P, A, F>(ptrs, begin, end, lam);
}
#if FK_CPU_X86
template <int MODE, typename P, typename A, typename F>
FK_TARGET_AVX2 double ewc_chunk_avx2(const EwcPtrs& ptrs, int64_t begin, int64_t end, double lam) {
  return ewc_chunk<IsaAvx2, MODE, P, A, F>(ptrs, begin, end, lam);
}
template <int MODE, typename P, typename A, typename F>
FK_TARGET_AVX512 double ewc_chunk_avx512(const EwcPtrs& ptrs, int64_t begin, int64_t end, double lam) {
  return ewc_chunk<IsaAvx512, MODE, P, A, F>(ptrs, begin, end, lam);
}
#endif

template <int MODE, typename P, typename A, typename F>
EwcChunkFn pick_for_isa(CpuIsa isa) {
  return FK_ISA_PICK(isa, ewc_chunk, MODE, P, A, F);
}

EwcChunkFn pick_kernel(CpuIsa isa, int mode, c10::ScalarType param, c10::ScalarType anchor,
                       c10::ScalarType fisher) {
  EwcChunkFn fn = nullptr;
  dispatch_float(param, "ewc_fused: params", [&](auto p) {
    dispatch_float(anchor, "ewc_fused: anchors", [&](auto a) {
      dispatch_float(fisher, "ewc_fused: fishers", [&](auto f) {
        using P = decltype(p);
        using A = decltype(a);
        using F = decltype(f);
        fn = mode == kEwcPenaltyOnly ? pick_for_isa<kEwcPenaltyOnly, P, A, F>(isa)
             : mode == kEwcGradWrite ? pick_for_isa<kEwcGradWrite, P, A, F>(isa)
                                     : pick_for_isa<kEwcGradAccumulate, P, A, F>(isa);
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
  const CpuIsa isa = active_cpu_isa();
  const int mode = !write_grad ? kEwcPenaltyOnly : accumulate ? kEwcGradAccumulate : kEwcGradWrite;
  const size_t n = params.size();
  bool any_double = false;
  std::vector<int64_t> numels(n);
  std::vector<EwcChunkFn> fns(n);
  std::vector<EwcPtrs> ptrs(n);
  for (size_t t = 0; t < n; ++t) {
    numels[t] = params[t].numel();
    any_double = any_double || params[t].scalar_type() == at::kDouble;
    fns[t] = pick_kernel(isa, mode, params[t].scalar_type(), anchors[t].scalar_type(),
                         fishers[t].scalar_type());
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
