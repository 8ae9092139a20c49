// merge_task_vectors on CPU: one pass over the N inputs of every tensor (math in
// csrc/include/forgetkern/merge_task_vectors.h). OpenMP over a flat list of chunks (kCpuChunk elements of one
// tensor); inside a chunk, tiles of kTile elements: the base tile is read once, each task's tile once into
// per-element accumulators that stay in L1, then the tile of the output is written once. Each element's result
// depends only on its inputs (no reduction across elements), so it is the same for any number of threads and
// bit-identical to the reference (same IEEE operations in the same order; -ffp-contract=off). DARE's kernels also
// exist for AVX2 / AVX-512 (cpu_isa.h: the hash's 32-bit multiplies vectorise there), with the same results.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "merge_task_vectors_kernels.h"

namespace forgetkern {
namespace cpu {
namespace {

using namespace merge_detail;

template <typename B, typename X>
MergeChunkFn pick_typed(CpuIsa isa, int prune, int consensus) {
  if (prune == kMergePruneNone) return pick_consensus<kMergePruneNone, B, X>(isa, consensus);
  if (prune == kMergePruneMagnitude) return pick_consensus<kMergePruneMagnitude, B, X>(isa, consensus);
  return pick_dare<B, X>(isa, consensus);
}

std::vector<at::Tensor> merge_task_vectors_cpu(at::TensorList base, at::TensorList inputs,
                                               at::ArrayRef<double> weights, const at::Tensor& thresholds,
                                               at::IntArrayRef keys, at::IntArrayRef offsets, int64_t prune,
                                               double p, bool rescale, int64_t consensus, bool sign_weighted,
                                               int64_t normalize, double lam, bool subtract_base) {
  static const char* op = "forgetkern_cpu::merge_task_vectors";
  const int64_t T = static_cast<int64_t>(base.size());
  const int64_t N = static_cast<int64_t>(weights.size());
  TORCH_CHECK(N >= 1, op, ": weights is empty");
  TORCH_CHECK(static_cast<int64_t>(inputs.size()) == T * N, op, ": inputs has ", inputs.size(),
              " tensors, expected T * N = ", T * N);
  TORCH_CHECK(static_cast<int64_t>(offsets.size()) == T, op, ": offsets has ", offsets.size(), " entries");
  TORCH_CHECK(prune >= 0 && prune <= 2 && consensus >= 0 && consensus <= 2 && normalize >= 0 && normalize <= 2,
              op, ": bad prune / consensus / normalize code");
  if (prune == kMergePruneRandom) {
    TORCH_CHECK(static_cast<int64_t>(keys.size()) == T * N, op, ": keys has ", keys.size(), " entries");
  }
  if (prune == kMergePruneMagnitude) {
    TORCH_CHECK(thresholds.device().is_cpu() && thresholds.is_contiguous() && thresholds.numel() == T * N, op,
                ": thresholds must be a contiguous CPU tensor of T * N values");
  }
  const CpuIsa isa = active_cpu_isa();
  std::vector<at::Tensor> outs;
  outs.reserve(T);
  std::vector<const void*> in_ptrs(static_cast<size_t>(T * N));
  std::vector<uint32_t> key32(keys.size());
  for (size_t i = 0; i < keys.size(); ++i) key32[i] = static_cast<uint32_t>(keys[i]);
  std::vector<double> w(weights.begin(), weights.end());
  double wsum = 0.0;
  for (double v : w) wsum += v;
  MergeParams prm{N, w.data(), subtract_base, sign_weighted, static_cast<int>(normalize),
                  lora_keep_threshold(p), rescale ? lora_keep_scale_f64(p) : 1.0,
                  normalize == kMergeNormCount ? static_cast<double>(N) : (std::fabs(wsum) >= 1e-8 ? wsum : 1.0),
                  lam};
  // the rescale factor is rounded to float for float compute, as torch rounds a Python float
  const double scale_f = rescale ? static_cast<double>(lora_keep_scale(p)) : 1.0;
  std::vector<MergeJob> jobs(static_cast<size_t>(T));
  std::vector<MergeChunkFn> fns(static_cast<size_t>(T));
  std::vector<int64_t> numels(static_cast<size_t>(T));
  std::vector<uint8_t> is_double(static_cast<size_t>(T));
  std::vector<at::Tensor> thr_c(static_cast<size_t>(T));
  for (int64_t t = 0; t < T; ++t) {
    const at::Tensor& b = base[t];
    TORCH_CHECK(b.device().is_cpu() && b.is_contiguous(), op, ": base[", t, "] must be a contiguous CPU tensor");
    const c10::ScalarType xt = inputs[t * N].scalar_type();
    for (int64_t k = 0; k < N; ++k) {
      const at::Tensor& x = inputs[t * N + k];
      TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.numel() == b.numel(), op, ": inputs[", t * N + k,
                  "] must be a contiguous CPU tensor with base[", t, "]'s numel");
      TORCH_CHECK(x.scalar_type() == xt, op, ": the inputs of tensor ", t, " must share one dtype");
      in_ptrs[static_cast<size_t>(t * N + k)] = x.data_ptr();
    }
    outs.push_back(at::empty_like(b, at::MemoryFormat::Contiguous));
    numels[t] = b.numel();
    is_double[t] = b.scalar_type() == at::kDouble || xt == at::kDouble;
    MergeChunkFn fn = nullptr;
    dispatch_float(b.scalar_type(), "merge_task_vectors: base", [&](auto bv) {
      dispatch_float(xt, "merge_task_vectors: inputs", [&](auto xv) {
        fn = pick_typed<decltype(bv), decltype(xv)>(isa, static_cast<int>(prune), static_cast<int>(consensus));
      });
    });
    fns[t] = fn;
    const void* thr = nullptr;
    if (prune == kMergePruneMagnitude) {
      thr_c[t] = thresholds.narrow(0, t * N, N).to(is_double[t] ? at::kDouble : at::kFloat).contiguous();
      thr = thr_c[t].data_ptr();
    }
    jobs[t] = MergeJob{b.data_ptr(), in_ptrs.data() + t * N, outs.back().data_ptr(), thr,
                       prune == kMergePruneRandom ? key32.data() + t * N : nullptr,
                       static_cast<uint64_t>(offsets[t])};
  }
  MergeParams prm_f = prm;
  prm_f.scale = scale_f;
  const std::vector<Chunk> chunks = make_chunks(numels);
  const int64_t nchunks = static_cast<int64_t>(chunks.size());
#pragma omp parallel for schedule(dynamic) if (nchunks > 1)
  for (int64_t c = 0; c < nchunks; ++c) {
    const Chunk& ch = chunks[c];
    fns[ch.tensor](is_double[ch.tensor] ? prm : prm_f, jobs[ch.tensor], ch.begin, ch.end);
  }
  return outs;
}

// |tau| of one (tensor, task) pair into `scratch` (compute type C), then the k-th largest by nth_element.
template <typename C, typename B, typename X>
C kth_largest_abs(const B* base, const X* x, int64_t n, int64_t k, bool subtract, std::vector<C>& scratch) {
  scratch.resize(static_cast<size_t>(n));
  for (int64_t j = 0; j < n; ++j) {
    C tau = load_as<C>(x[j]);
    if (subtract) tau = fk_sub(tau, load_as<C>(base[j]));
    scratch[static_cast<size_t>(j)] = merge_abs(tau);
  }
  auto nth = scratch.begin() + (n - k);
  std::nth_element(scratch.begin(), nth, scratch.end());
  return *nth;
}

// Magnitude thresholds of TIES / magnitude prune: for every (tensor t, task k) the k-th largest |tau| with
// k = int(density * numel) (exact selection, equal to torch.kthvalue(|tau|, numel - k + 1)); 0 when k >= numel,
// +inf when k == 0. OpenMP over the (tensor, task) pairs, one scratch buffer per thread.
at::Tensor merge_magnitude_thresholds_cpu(at::TensorList base, at::TensorList inputs, int64_t n_tasks, double density,
                                          bool subtract_base) {
  static const char* op = "forgetkern_cpu::merge_magnitude_thresholds";
  const int64_t T = static_cast<int64_t>(base.size());
  TORCH_CHECK(n_tasks >= 1 && static_cast<int64_t>(inputs.size()) == T * n_tasks, op, ": inputs has ",
              inputs.size(), " tensors, expected T * n_tasks = ", T * n_tasks);
  bool any_double = false;
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(base[t].device().is_cpu() && base[t].is_contiguous(), op, ": base[", t, "] must be contiguous CPU");
    any_double = any_double || base[t].scalar_type() == at::kDouble;
    for (int64_t k = 0; k < n_tasks; ++k) {
      const at::Tensor& x = inputs[t * n_tasks + k];
      TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.numel() == base[t].numel(), op, ": inputs[",
                  t * n_tasks + k, "] must be contiguous CPU with base[", t, "]'s numel");
      any_double = any_double || x.scalar_type() == at::kDouble;
    }
  }
  at::Tensor out = at::empty({T * n_tasks}, at::TensorOptions().dtype(any_double ? at::kDouble : at::kFloat));
  const int64_t pairs = T * n_tasks;
#pragma omp parallel if (pairs > 1)
  {
    std::vector<float> sf;
    std::vector<double> sd;
#pragma omp for schedule(dynamic)
    for (int64_t i = 0; i < pairs; ++i) {
      const int64_t t = i / n_tasks;
      const at::Tensor& b = base[t];
      const at::Tensor& x = inputs[i];
      const int64_t n = b.numel();
      const int64_t kk = density >= 1.0 ? n : static_cast<int64_t>(density * static_cast<double>(n));
      const bool dbl = b.scalar_type() == at::kDouble || x.scalar_type() == at::kDouble;
      double thr;
      if (kk >= n) {
        thr = 0.0;
      } else if (kk <= 0) {
        thr = std::numeric_limits<double>::infinity();
      } else {
        thr = 0.0;
        dispatch_float(b.scalar_type(), "merge_magnitude_thresholds: base", [&](auto bv) {
          dispatch_float(x.scalar_type(), "merge_magnitude_thresholds: inputs", [&](auto xv) {
            using B = decltype(bv);
            using X = decltype(xv);
            const B* bp = static_cast<const B*>(b.data_ptr());
            const X* xp = static_cast<const X*>(x.data_ptr());
            thr = dbl ? kth_largest_abs<double>(bp, xp, n, kk, subtract_base, sd)
                      : static_cast<double>(kth_largest_abs<float>(bp, xp, n, kk, subtract_base, sf));
          });
        });
      }
      if (any_double) {
        out.data_ptr<double>()[i] = thr;
      } else {
        out.data_ptr<float>()[i] = static_cast<float>(thr);
      }
    }
  }
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace forgetkern

TORCH_LIBRARY_FRAGMENT(forgetkern_cpu, m) {
  m.def(
      "merge_task_vectors(Tensor[] base, Tensor[] inputs, float[] weights, Tensor thresholds, int[] keys, "
      "int[] offsets, int prune, float p, bool rescale, int consensus, bool sign_weighted, int normalize, "
      "float lam, bool subtract_base) -> Tensor[]");
  m.def(
      "merge_magnitude_thresholds(Tensor[] base, Tensor[] inputs, int n_tasks, float density, bool subtract_base) "
      "-> Tensor");
}

TORCH_LIBRARY_IMPL(forgetkern_cpu, CPU, m) {
  m.impl("merge_task_vectors", &forgetkern::cpu::merge_task_vectors_cpu);
  m.impl("merge_magnitude_thresholds", &forgetkern::cpu::merge_magnitude_thresholds_cpu);
}
