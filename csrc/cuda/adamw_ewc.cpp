// Torch glue of the CUDA adamw_ewc_ kernels: checks, grouping by (param, anchor/Fisher) dtypes, a workspace
// of one double per block of the whole op (EWC only), one launch sequence per group and one final reduction,
// all on the current stream. Registers forgetkern_cuda::adamw_ewc_.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "adamw_ewc_launch.h"
#include "glue_utils.h"

namespace forgetkern {
namespace cuda {
namespace {

at::Tensor adamw_ewc_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                          at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList anchors,
                          at::TensorList fishers, double lr, double beta1, double beta2, double eps,
                          double weight_decay, double step, double lam, bool amsgrad, bool maximize) {
  static const char* op = "forgetkern_cuda::adamw_ewc_";
  TORCH_CHECK(!params.empty(), op, ": params must not be empty");
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
  bool any_double = false;
  DtypeGroups<std::tuple<DType, DType>> groups;
  for (size_t t = 0; t < params.size(); ++t) {
    const auto dt = params[t].scalar_type();
    TORCH_CHECK(grads[t].scalar_type() == dt && exp_avgs[t].scalar_type() == dt &&
                    exp_avg_sqs[t].scalar_type() == dt && (!amsgrad || max_exp_avg_sqs[t].scalar_type() == dt),
                op, ": grads, exp_avgs, exp_avg_sqs and max_exp_avg_sqs [", t, "] must have the dtype of params[",
                t, "]");
    TORCH_CHECK(!ewc || anchors[t].scalar_type() == fishers[t].scalar_type(), op, ": anchors[", t,
                "] and fishers[", t, "] must have one dtype");
    const DType p = to_dtype(dt, op, "params");
    any_double = any_double || p == DType::Float64;
    const DType s = ewc ? to_dtype(anchors[t].scalar_type(), op, "anchors") : p;
    if (params[t].numel() > 0) groups[{p, s}].push_back(t);
  }
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(params[0].device().index()).stream();
  const AdamwCoefficients coef = adamw_coefficients(lr, beta1, beta2, eps, weight_decay, step, lam, maximize);
  const auto out_opts = params[0].options().dtype(any_double ? at::kDouble : at::kFloat);
  if (!ewc) {
    for (const auto& [key, idx] : groups) {
      const int64_t n = static_cast<int64_t>(idx.size());
      std::vector<void*> l[7];
      l[0] = gather_ptrs<void*>(params, idx);
      l[1] = gather_ptrs<void*>(grads, idx);
      l[2] = gather_ptrs<void*>(exp_avgs, idx);
      l[3] = gather_ptrs<void*>(exp_avg_sqs, idx);
      l[4] = amsgrad ? gather_ptrs<void*>(max_exp_avg_sqs, idx) : std::vector<void*>(idx.size(), nullptr);
      l[5] = l[6] = std::vector<void*>(idx.size(), nullptr);
      void* const* lists[7] = {l[0].data(), l[1].data(), l[2].data(), l[3].data(), l[4].data(), l[5].data(),
                               l[6].data()};
      const auto numels = gather_numels(params, idx);
      C10_CUDA_CHECK(adamw_ewc_launch(n, lists, numels.data(), std::get<0>(key), std::get<1>(key), false, amsgrad,
                                      coef, nullptr, 0, stream));
    }
    return at::zeros({}, out_opts);
  }
  int64_t slots = 0;
  for (const auto& [key, idx] : groups) {
    const auto numels = gather_numels(params, idx);
    slots += adamw_ewc_workspace_slots(static_cast<int64_t>(idx.size()), numels.data());
  }
  at::Tensor workspace = at::empty({slots > 0 ? slots : 1}, params[0].options().dtype(at::kDouble));
  double* ws = workspace.data_ptr<double>();
  int64_t offset = 0;
  for (const auto& [key, idx] : groups) {
    const int64_t n = static_cast<int64_t>(idx.size());
    std::vector<void*> l[7];
    l[0] = gather_ptrs<void*>(params, idx);
    l[1] = gather_ptrs<void*>(grads, idx);
    l[2] = gather_ptrs<void*>(exp_avgs, idx);
    l[3] = gather_ptrs<void*>(exp_avg_sqs, idx);
    l[4] = amsgrad ? gather_ptrs<void*>(max_exp_avg_sqs, idx) : std::vector<void*>(idx.size(), nullptr);
    l[5] = gather_ptrs<void*>(anchors, idx);
    l[6] = gather_ptrs<void*>(fishers, idx);
    void* const* lists[7] = {l[0].data(), l[1].data(), l[2].data(), l[3].data(), l[4].data(), l[5].data(),
                             l[6].data()};
    const auto numels = gather_numels(params, idx);
    C10_CUDA_CHECK(adamw_ewc_launch(n, lists, numels.data(), std::get<0>(key), std::get<1>(key), true, amsgrad,
                                    coef, ws, offset, stream));
    offset += adamw_ewc_workspace_slots(n, numels.data());
  }
  at::Tensor out = at::empty({}, out_opts);
  C10_CUDA_CHECK(adamw_ewc_finalize_launch(ws, slots, lam, out.data_ptr(), any_double, stream));
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace forgetkern

TORCH_LIBRARY_FRAGMENT(forgetkern_cuda, m) {
  m.def(
      "adamw_ewc_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] max_exp_avg_sqs, Tensor[] anchors, Tensor[] fishers, float lr, float beta1, float beta2, "
      "float eps, float weight_decay, float step, float lam, bool amsgrad, bool maximize) -> Tensor");
}

TORCH_LIBRARY_IMPL(forgetkern_cuda, CUDA, m) {
  m.impl("adamw_ewc_", &forgetkern::cuda::adamw_ewc_cuda);
}
