// Torch glue of the CUDA ewc_fused kernels: checks, grouping by (param, anchor, fisher) dtypes, a workspace
// of one double per block of the whole op, one launch sequence per group and one final reduction, all on the
// current stream. Registers forgetkern_cuda::ewc_fused.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "forgetkern/ewc_penalty.h"
#include "glue_utils.h"
#include "launchers.h"

namespace forgetkern {
namespace cuda {
namespace {

at::Tensor ewc_fused_cuda(at::TensorList params, at::TensorList anchors, at::TensorList fishers,
                          at::TensorList grads, double lam, bool write_grad, bool accumulate) {
  static const char* op = "forgetkern_cuda::ewc_fused";
  TORCH_CHECK(!params.empty(), op, ": params must not be empty");
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
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(params[0].device().index()).stream();

  bool any_double = false;
  DtypeGroups<std::tuple<DType, DType, DType>> groups;
  for (size_t t = 0; t < params.size(); ++t) {
    const DType p = to_dtype(params[t].scalar_type(), op, "params");
    any_double = any_double || p == DType::Float64;
    const std::tuple<DType, DType, DType> key{p, to_dtype(anchors[t].scalar_type(), op, "anchors"),
                                              to_dtype(fishers[t].scalar_type(), op, "fishers")};
    if (params[t].numel() > 0) groups[key].push_back(t);
  }

  at::Tensor out = at::empty({}, params[0].options().dtype(any_double ? at::kDouble : at::kFloat));
  int64_t slots = 0;
  for (const auto& [key, idx] : groups) {
    const auto numels = gather_numels(params, idx);
    slots += ewc_workspace_slots(static_cast<int64_t>(idx.size()), numels.data());
  }
  at::Tensor workspace = at::empty({slots > 0 ? slots : 1}, params[0].options().dtype(at::kDouble));
  double* ws = workspace.data_ptr<double>();
  int64_t offset = 0;
  for (const auto& [key, idx] : groups) {
    const int64_t n = static_cast<int64_t>(idx.size());
    const auto p_ptrs = gather_ptrs<const void*>(params, idx);
    const auto a_ptrs = gather_ptrs<const void*>(anchors, idx);
    const auto f_ptrs = gather_ptrs<const void*>(fishers, idx);
    const auto g_ptrs = write_grad ? gather_ptrs<void*>(grads, idx) : std::vector<void*>(idx.size(), nullptr);
    const auto numels = gather_numels(params, idx);
    C10_CUDA_CHECK(ewc_fused_launch(n, p_ptrs.data(), a_ptrs.data(), f_ptrs.data(), g_ptrs.data(), numels.data(),
                                    std::get<0>(key), std::get<1>(key), std::get<2>(key), mode, lam, ws, offset,
                                    stream));
    offset += ewc_workspace_slots(n, numels.data());
  }
  C10_CUDA_CHECK(ewc_finalize_launch(ws, slots, lam, out.data_ptr(), any_double, stream));
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace forgetkern

TORCH_LIBRARY_FRAGMENT(forgetkern_cuda, m) {
  m.def(
      "ewc_fused(Tensor[] params, Tensor[] anchors, Tensor[] fishers, Tensor(a!)[] grads, float lam, "
      "bool write_grad, bool accumulate) -> Tensor");
}

TORCH_LIBRARY_IMPL(forgetkern_cuda, CUDA, m) {
  m.impl("ewc_fused", &forgetkern::cuda::ewc_fused_cuda);
}
