// Torch glue of the CUDA merge_task_vectors kernel: checks, grouping of the tensors by (base, input) dtypes,
// one launch sequence per group on the current stream (pointers, keys, weights and scalars travel in the
// kernel arguments: no host-to-device copy, no synchronisation). Same schema and semantics as
// forgetkern_cpu::merge_task_vectors. Registers forgetkern_cuda::merge_task_vectors.
//
// Magnitude thresholds are an input (T * N values, tensor-major): on CUDA tensors the op computes them with
// torch.kthvalue on the device (forgetkern/ops/merge_task_vectors.py _thresholds); here they are only cast to
// each tensor's compute type, on the device.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "forgetkern/merge_task_vectors.h"
#include "glue_utils.h"
#include "launchers.h"

namespace forgetkern {
namespace cuda {
namespace {

std::vector<at::Tensor> merge_task_vectors_cuda(at::TensorList base, at::TensorList inputs,
                                                at::ArrayRef<double> weights, const at::Tensor& thresholds,
                                                at::IntArrayRef keys, at::IntArrayRef offsets, int64_t prune,
                                                double p, bool rescale, int64_t consensus, bool sign_weighted,
                                                int64_t normalize, double lam, bool subtract_base) {
  static const char* op = "forgetkern_cuda::merge_task_vectors";
  const int64_t T = static_cast<int64_t>(base.size());
  const int64_t N = static_cast<int64_t>(weights.size());
  TORCH_CHECK(N >= 1, op, ": weights is empty");
  TORCH_CHECK(N <= kMergeMaxTasks, op, ": merges at most ", kMergeMaxTasks, " task vectors in one call, got ", N,
              "; merge them in groups, or use forgetkern.use_backend(\"torch\")");
  TORCH_CHECK(static_cast<int64_t>(inputs.size()) == T * N, op, ": inputs has ", inputs.size(),
              " tensors, expected T * N = ", T * N);
  TORCH_CHECK(static_cast<int64_t>(offsets.size()) == T, op, ": offsets has ", offsets.size(), " entries");
  TORCH_CHECK(prune >= 0 && prune <= 2 && consensus >= 0 && consensus <= 2 && normalize >= 0 && normalize <= 2,
              op, ": bad prune / consensus / normalize code");
  if (prune == kMergePruneRandom) {
    TORCH_CHECK(static_cast<int64_t>(keys.size()) == T * N, op, ": keys has ", keys.size(), " entries");
  }
  std::vector<at::Tensor> outs;
  outs.reserve(static_cast<size_t>(T));
  if (T == 0) return outs;
  const c10::Device device = base[0].device();
  TORCH_CHECK(base[0].is_cuda(), op, ": base[0] must be a CUDA tensor, got ", device);
  if (prune == kMergePruneMagnitude) {
    TORCH_CHECK(thresholds.device() == device && thresholds.is_contiguous() && thresholds.numel() == T * N, op,
                ": thresholds must be a contiguous tensor of T * N values on ", device);
    TORCH_CHECK(thresholds.scalar_type() == at::kFloat || thresholds.scalar_type() == at::kDouble, op,
                ": thresholds must be float32 or float64, got ", thresholds.scalar_type());
  }
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();

  // per tensor: dtypes, checks, output
  DtypeGroups<std::tuple<DType, DType>> groups;
  bool any_float_thr = false, any_double_thr = false;
  std::vector<uint8_t> is_double(static_cast<size_t>(T));
  for (int64_t t = 0; t < T; ++t) {
    const at::Tensor& b = base[t];
    TORCH_CHECK(b.device() == device && b.is_contiguous(), op, ": base[", t, "] must be a contiguous tensor on ",
                device, ", got ", b.device());
    const c10::ScalarType xt = inputs[t * N].scalar_type();
    for (int64_t k = 0; k < N; ++k) {
      const at::Tensor& x = inputs[t * N + k];
      TORCH_CHECK(x.device() == device && x.is_contiguous() && x.numel() == b.numel(), op, ": inputs[", t * N + k,
                  "] must be a contiguous tensor on ", device, " with base[", t, "]'s numel");
      TORCH_CHECK(x.scalar_type() == xt, op, ": the inputs of tensor ", t, " must share one dtype");
    }
    outs.push_back(at::empty_like(b, at::MemoryFormat::Contiguous));
    const DType bd = to_dtype(b.scalar_type(), op, "base");
    const DType xd = to_dtype(xt, op, "inputs");
    is_double[t] = bd == DType::Float64 || xd == DType::Float64;
    (is_double[t] ? any_double_thr : any_float_thr) = true;
    if (b.numel() > 0) groups[{bd, xd}].push_back(static_cast<size_t>(t));
  }

  // thresholds in each tensor's compute type (device casts, as the CPU kernel's .to())
  at::Tensor thr_f, thr_d;
  if (prune == kMergePruneMagnitude) {
    if (any_float_thr) thr_f = thresholds.to(at::kFloat).contiguous();
    if (any_double_thr) thr_d = thresholds.to(at::kDouble).contiguous();
  }

  std::vector<double> w(weights.begin(), weights.end());
  double wsum = 0.0;
  for (double v : w) wsum += v;
  MergeLaunchParams prm{};
  prm.n_tasks = N;
  prm.weights = w.data();
  prm.prune = static_cast<int>(prune);
  prm.consensus = static_cast<int>(consensus);
  prm.normalize = static_cast<int>(normalize);
  prm.sign_weighted = sign_weighted;
  prm.subtract_base = subtract_base;
  prm.drop_threshold = lora_keep_threshold(p);
  prm.scale_f64 = rescale ? lora_keep_scale_f64(p) : 1.0;
  // the rescale factor is rounded to float for float compute, as torch rounds a Python float
  prm.scale_f32 = rescale ? static_cast<double>(lora_keep_scale(p)) : 1.0;
  prm.lin_div = normalize == kMergeNormCount ? static_cast<double>(N) : (std::fabs(wsum) >= 1e-8 ? wsum : 1.0);
  prm.lam = lam;

  std::vector<uint32_t> key32;
  for (const auto& [key, idx] : groups) {
    const int64_t n = static_cast<int64_t>(idx.size());
    std::vector<const void*> b_ptrs(idx.size()), x_ptrs(idx.size() * static_cast<size_t>(N)), t_ptrs;
    std::vector<void*> o_ptrs(idx.size());
    std::vector<int64_t> numels(idx.size());
    std::vector<uint64_t> offs(idx.size());
    key32.assign(prune == kMergePruneRandom ? idx.size() * static_cast<size_t>(N) : 0, 0u);
    if (prune == kMergePruneMagnitude) t_ptrs.resize(idx.size());
    for (size_t j = 0; j < idx.size(); ++j) {
      const int64_t t = static_cast<int64_t>(idx[j]);
      b_ptrs[j] = base[t].data_ptr();
      o_ptrs[j] = outs[static_cast<size_t>(t)].data_ptr();
      numels[j] = base[t].numel();
      TORCH_CHECK(offsets[t] >= 0, op, ": offsets[", t, "] must be >= 0, got ", offsets[t]);
      offs[j] = static_cast<uint64_t>(offsets[t]);
      for (int64_t k = 0; k < N; ++k) {
        x_ptrs[j * static_cast<size_t>(N) + static_cast<size_t>(k)] = inputs[t * N + k].data_ptr();
        if (prune == kMergePruneRandom) {
          key32[j * static_cast<size_t>(N) + static_cast<size_t>(k)] = static_cast<uint32_t>(keys[t * N + k]);
        }
      }
      if (prune == kMergePruneMagnitude) {
        const at::Tensor& thr = is_double[t] ? thr_d : thr_f;
        t_ptrs[j] = static_cast<const char*>(thr.data_ptr()) + t * N * static_cast<int64_t>(thr.element_size());
      }
    }
    C10_CUDA_CHECK(merge_task_vectors_launch(n, b_ptrs.data(), x_ptrs.data(), o_ptrs.data(), numels.data(),
                                             offs.data(), key32.empty() ? nullptr : key32.data(),
                                             t_ptrs.empty() ? nullptr : t_ptrs.data(), std::get<0>(key),
                                             std::get<1>(key), prm, stream));
  }
  return outs;
}

}  // namespace
}  // namespace cuda
}  // namespace forgetkern

TORCH_LIBRARY_FRAGMENT(forgetkern_cuda, m) {
  m.def(
      "merge_task_vectors(Tensor[] base, Tensor[] inputs, float[] weights, Tensor thresholds, int[] keys, "
      "int[] offsets, int prune, float p, bool rescale, int consensus, bool sign_weighted, int normalize, "
      "float lam, bool subtract_base) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(forgetkern_cuda, CUDA, m) {
  m.impl("merge_task_vectors", &forgetkern::cuda::merge_task_vectors_cuda);
}
