// Torch glue of the CUDA fisher_accumulate_ kernels: checks, grouping by (fisher dtype, grad dtype), one
// multi-tensor launch sequence per group on the current stream. Registers forgetkern_cuda::fisher_accumulate_.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <utility>

#include "glue_utils.h"
#include "launchers.h"

namespace forgetkern {
namespace cuda {
namespace {

at::Tensor fisher_accumulate_cuda(at::TensorList fishers, at::TensorList grads, double decay, double scale) {
  static const char* op = "forgetkern_cuda::fisher_accumulate_";
  TORCH_CHECK(!fishers.empty(), op, ": fishers must not be empty");
  check_list(fishers, fishers, op, "fishers");
  check_list(grads, fishers, op, "grads");
  const c10::cuda::CUDAGuard guard(fishers[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(fishers[0].device().index()).stream();

  DtypeGroups<std::pair<DType, DType>> groups;
  for (size_t t = 0; t < fishers.size(); ++t) {
    const DType f = to_dtype(fishers[t].scalar_type(), op, "fishers");
    const DType g = to_dtype(grads[t].scalar_type(), op, "grads");
    TORCH_CHECK(f != DType::Float16, op, ": fishers[", t, "] is float16; Fisher state must be float32, "
                "bfloat16 or float64");
    if (fishers[t].numel() > 0) groups[{f, g}].push_back(t);
  }

  at::Tensor found = at::empty({}, fishers[0].options().dtype(at::kFloat));
  C10_CUDA_CHECK(cudaMemsetAsync(found.data_ptr(), 0, sizeof(float), stream));
  for (const auto& [key, idx] : groups) {
    const auto f_ptrs = gather_ptrs<void*>(fishers, idx);
    const auto g_ptrs = gather_ptrs<const void*>(grads, idx);
    const auto numels = gather_numels(fishers, idx);
    C10_CUDA_CHECK(fisher_accumulate_launch(static_cast<int64_t>(idx.size()), f_ptrs.data(), g_ptrs.data(),
                                            numels.data(), key.first, key.second, decay, scale,
                                            found.data_ptr<float>(), stream));
  }
  return found;
}

}  // namespace
}  // namespace cuda
}  // namespace forgetkern

TORCH_LIBRARY_FRAGMENT(forgetkern_cuda, m) {
  m.def("fisher_accumulate_(Tensor(a!)[] fishers, Tensor[] grads, float decay, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(forgetkern_cuda, CUDA, m) {
  m.impl("fisher_accumulate_", &forgetkern::cuda::fisher_accumulate_cuda);
}
