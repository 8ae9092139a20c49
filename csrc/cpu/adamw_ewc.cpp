// adamw_ewc_ on CPU: one AdamW step over whole tensor lists with the EWC penalty's gradient lam * F * d added
// to the gradient on the fly, and the penalty lam/2 * sum F d^2 of the same d (math in
// csrc/include/forgetkern/adamw_ewc.h). Each element reads param, grad, exp_avg, exp_avg_sq (max_exp_avg_sq,
// anchor, Fisher) once and writes param, exp_avg, exp_avg_sq (max_exp_avg_sq) once. OpenMP over a flat list
// of chunks of all tensors; the penalty's chunk partials are added in chunk order (independent of the number
// of threads), with the tile / lane order of ewc_fused (csrc/cpu/ewc_penalty.cpp), so the penalty equals
// forgetkern.ewc_penalty's bit for bit. Kernels exist once per instruction set (cpu_isa.h).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "cpu_isa.h"
#include "forgetkern/adamw_ewc.h"
#include "forgetkern/ewc_penalty.h"
#include "isa_tile.h"
#include "multi_tensor_cpu.h"

namespace forgetkern {
namespace cpu {
namespace {

struct AdamwPtrs {
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;
  const void* anchor;
  const void* fisher;
};

using AdamwChunkFn = double (*)(const AdamwPtrs& ptrs, int64_t begin, int64_t end, const AdamwCoefficients& cd);

// One tile of n elements (pointer element types: the storage type, or fp32 for staged fp16 tiles).
template <bool EWC, bool AMS, typename C, typename P, typename G, typename M, typename A, typename F>
FK_INLINE void adamw_run(P* __restrict p, const G* __restrict g, M* __restrict m, M* __restrict v,
                         M* __restrict vmax, const A* __restrict a, const F* __restrict f,
                         const AdamwCoef<C>& c, int64_t n, C* __restrict term) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    C gi = adamw_grad(load_as<C>(g[i]), c);
    if constexpr (EWC) {
      const C d = ewc_diff<C>(p[i], a[i]);
      const C fd = ewc_fd(f[i], d);
      term[i] = ewc_term(fd, d);
      gi = adamw_ewc_grad(gi, fd, c);
    }
    const C pi = adamw_decay(load_as<C>(p[i]), c);
    const C mi = adamw_exp_avg(load_as<C>(m[i]), gi, c);
    const C vi = adamw_exp_avg_sq(load_as<C>(v[i]), gi, c);
    C vh = vi;
    if constexpr (AMS) {
      vh = adamw_max(load_as<C>(vmax[i]), vi);
      vmax[i] = Store<M>::from(vh);
    }
    p[i] = Store<P>::from(adamw_param(pi, mi, vh, c));
    m[i] = Store<M>::from(mi);
    v[i] = Store<M>::from(vi);
  }
}

template <typename Isa, bool EWC, bool AMS, typename P, typename AF>
FK_INLINE double adamw_chunk(const AdamwPtrs& t, int64_t begin, int64_t end, const AdamwCoefficients& cd) {
  using C = typename ComputeOf<P>::type;
  const AdamwCoef<C> c = adamw_coef_as<C>(cd);
  Stage<Isa, P> ps, gs, ms, vs, xs;
  Stage<Isa, AF> as, fs;
  alignas(64) C term[EWC ? kTile : 1];
  double sum = 0.0;
  for (int64_t b = begin; b < end; b += kTile) {
    const int64_t n = end - b < kTile ? end - b : kTile;
    P* pp = static_cast<P*>(t.param) + b;
    P* mp = static_cast<P*>(t.exp_avg) + b;
    P* vp = static_cast<P*>(t.exp_avg_sq) + b;
    P* xp = AMS ? static_cast<P*>(t.max_exp_avg_sq) + b : nullptr;
    auto* p = ps.inout(pp, n);
    const auto* g = gs.in(static_cast<const P*>(t.grad) + b, n);
    auto* m = ms.inout(mp, n);
    auto* v = vs.inout(vp, n);
    decltype(m) x = nullptr;
    if constexpr (AMS) x = xs.inout(xp, n);
    if constexpr (EWC) {
      const auto* a = as.in(static_cast<const AF*>(t.anchor) + b, n);
      const auto* f = fs.in(static_cast<const AF*>(t.fisher) + b, n);
      adamw_run<EWC, AMS, C>(p, g, m, v, x, a, f, c, n, term);
    } else {
      const float* none = nullptr;
      adamw_run<EWC, AMS, C>(p, g, m, v, x, none, none, c, n, term);
    }
    ps.flush(pp, n);
    ms.flush(mp, n);
    vs.flush(vp, n);
    if constexpr (AMS) xs.flush(xp, n);
    if constexpr (EWC) sum += static_cast<double>(lane_sum(term, n));
  }
  return sum;
}

template <bool EWC, bool AMS, typename P, typename AF>
double adamw_chunk_baseline(const AdamwPtrs& t, int64_t begin, int64_t end, const AdamwCoefficients& c) {
  return adamw_chunk<IsaBaseline, EWC, AMS, P, AF>(t, begin, end, c);
}
#if FK_CPU_X86
template <bool EWC, bool AMS, typename P, typename AF>
FK_TARGET_AVX2 double adamw_chunk_avx2(const AdamwPtrs& t, int64_t begin, int64_t end, const AdamwCoefficients& c) {
  return adamw_chunk<IsaAvx2, EWC, AMS, P, AF>(t, begin, end, c);
}
template <bool EWC, bool AMS, typename P, typename AF>
FK_TARGET_AVX512 double adamw_chunk_avx512(const AdamwPtrs& t, int64_t begin, int64_t end,
                                           const AdamwCoefficients& c) {
  return adamw_chunk<IsaAvx512, EWC, AMS, P, AF>(t, begin, end, c);
}
#endif

template <bool EWC, bool AMS, typename P, typename AF>
AdamwChunkFn pick_for_isa(CpuIsa isa) {
  return FK_ISA_PICK(isa, adamw_chunk, EWC, AMS, P, AF);
}

AdamwChunkFn pick_kernel(CpuIsa isa, bool ewc, bool ams, c10::ScalarType param, c10::ScalarType state) {
  AdamwChunkFn fn = nullptr;
  dispatch_float(param, "adamw_ewc_: params", [&](auto p) {
    using P = decltype(p);
    if (!ewc) {
      fn = ams ? pick_for_isa<false, true, P, float>(isa) : pick_for_isa<false, false, P, float>(isa);
      return;
    }
    dispatch_float(state, "adamw_ewc_: anchors", [&](auto a) {
      using AF = decltype(a);
      fn = ams ? pick_for_isa<true, true, P, AF>(isa) : pick_for_isa<true, false, P, AF>(isa);
    });
  });
  return fn;
}

at::Tensor adamw_ewc_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                         at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList anchors,
                         at::TensorList fishers, double lr, double beta1, double beta2, double eps,
                         double weight_decay, double step, double lam, bool amsgrad, bool maximize) {
  static const char* op = "forgetkern_cpu::adamw_ewc_";
  check_list(params, params, op, "params");
  check_list(grads, params, op, "grads");
  check_list(exp_avgs, params, op, "exp_avgs");
  check_list(exp_avg_sqs, params, op, "exp_avg_sqs");
  if (amsgrad) check_list(max_exp_avg_sqs, params, op, "max_exp_avg_sqs");
  const bool ewc = !anchors.empty();
  if (ewc) {
    check_list(anchors, params, op, "anchors");
    check_list(fishers, params, op, "fishers");
  }
  const size_t n = params.size();
  for (size_t i = 0; i < n; ++i) {
    const auto dt = params[i].scalar_type();
    TORCH_CHECK(grads[i].scalar_type() == dt && exp_avgs[i].scalar_type() == dt &&
                    exp_avg_sqs[i].scalar_type() == dt && (!amsgrad || max_exp_avg_sqs[i].scalar_type() == dt),
                op, ": grads, exp_avgs, exp_avg_sqs and max_exp_avg_sqs [", i, "] must have the dtype of params[",
                i, "] (", dt, ")");
    TORCH_CHECK(!ewc || anchors[i].scalar_type() == fishers[i].scalar_type(), op, ": anchors[", i,
                "] and fishers[", i, "] must have one dtype");
  }
  const CpuIsa isa = active_cpu_isa();
  const AdamwCoefficients coef = adamw_coefficients(lr, beta1, beta2, eps, weight_decay, step, lam, maximize);
  bool any_double = false;
  std::vector<int64_t> numels(n);
  std::vector<AdamwChunkFn> fns(n);
  std::vector<AdamwPtrs> ptrs(n);
  for (size_t t = 0; t < n; ++t) {
    numels[t] = params[t].numel();
    any_double = any_double || params[t].scalar_type() == at::kDouble;
    fns[t] = pick_kernel(isa, ewc, amsgrad, params[t].scalar_type(),
                         ewc ? anchors[t].scalar_type() : params[t].scalar_type());
    if (numels[t] == 0) continue;
    ptrs[t] = AdamwPtrs{params[t].data_ptr(), grads[t].data_ptr(), exp_avgs[t].data_ptr(),
                        exp_avg_sqs[t].data_ptr(), amsgrad ? max_exp_avg_sqs[t].data_ptr() : nullptr,
                        ewc ? anchors[t].data_ptr() : nullptr, ewc ? fishers[t].data_ptr() : nullptr};
  }
  const std::vector<Chunk> chunks = make_chunks(numels);
  const int64_t nchunks = static_cast<int64_t>(chunks.size());
  std::vector<double> partial(chunks.size());
#pragma omp parallel for schedule(dynamic) if (nchunks > 1)
  for (int64_t c = 0; c < nchunks; ++c) {
    const Chunk& ch = chunks[c];
    partial[c] = fns[ch.tensor](ptrs[ch.tensor], ch.begin, ch.end, coef);
  }
  double sum = 0.0;
  for (double v : partial) sum += v;  // chunk order: deterministic
  at::Tensor out = at::empty({}, at::TensorOptions().dtype(any_double ? at::kDouble : at::kFloat).device(at::kCPU));
  if (any_double) {
    *out.data_ptr<double>() = ewc ? ewc_finalize<double>(sum, lam) : 0.0;
  } else {
    *out.data_ptr<float>() = ewc ? ewc_finalize<float>(sum, lam) : 0.0f;
  }
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace forgetkern

TORCH_LIBRARY_FRAGMENT(forgetkern_cpu, m) {
  m.def(
      "adamw_ewc_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] max_exp_avg_sqs, Tensor[] anchors, Tensor[] fishers, float lr, float beta1, float beta2, "
      "float eps, float weight_decay, float step, float lam, bool amsgrad, bool maximize) -> Tensor");
}

TORCH_LIBRARY_IMPL(forgetkern_cpu, CPU, m) {
  m.impl("adamw_ewc_", &forgetkern::cpu::adamw_ewc_cpu);
}
