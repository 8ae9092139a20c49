// Torch glue of the CUDA project_out_ kernel: checks (a safety net under forgetkern/ops/project_out.py), the Y
// view of every layer, grouping by (X dtype, U dtype), one launch sequence per group on the current stream. The
// layer table is plain host data copied into the kernel arguments: no device allocation, no copy, no sync.
// Registers forgetkern_cuda::project_out_.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "forgetkern/project_out.h"
#include "glue_utils.h"
#include "project_out_launch.h"

namespace forgetkern {
namespace cuda {
namespace {

bool fits_i32(int64_t v) { return v >= 0 && v <= std::numeric_limits<int32_t>::max(); }

void project_out_cuda(at::TensorList tensors, at::TensorList bases, const std::string& side) {
  static const char* op = "forgetkern_cuda::project_out_";
  TORCH_CHECK(side == "left" || side == "right", op, ": side must be 'left' or 'right', got '", side, "'");
  TORCH_CHECK(tensors.size() == bases.size(), op, ": tensors has ", tensors.size(), " entries but bases has ",
              bases.size());
  if (tensors.empty()) return;
  const bool left = side == "left";
  const at::Device device = tensors[0].device();
  std::vector<at::Tensor> keep;  // bases copied to a contiguous layout (strides beyond int32), alive until launch
  DtypeGroups<std::pair<DType, DType>> groups;
  std::vector<ProjLayer> layers(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& x = tensors[i];
    at::Tensor u = bases[i];
    TORCH_CHECK(x.is_cuda() && x.device() == device && u.is_cuda() && u.device() == device, op, ": tensors[", i,
                "] and bases[", i, "] must be CUDA tensors on ", device);
    TORCH_CHECK(x.dim() == 2 && u.dim() == 2, op, ": tensors[", i, "] and bases[", i, "] must be 2-D");
    TORCH_CHECK(x.is_contiguous(), op, ": tensors[", i, "] must be contiguous (it is written in place)");
    TORCH_CHECK(u.size(0) == x.size(left ? 0 : 1), op, ": bases[", i, "] has ", u.size(0), " rows, expected ",
                x.size(left ? 0 : 1));
    TORCH_CHECK(u.size(1) <= kProjMaxK, op, ": bases[", i, "] has ", u.size(1), " columns; the CUDA kernel keeps at "
                "most ", kProjMaxK, " in shared memory (the op routes larger bases to another backend)");
    TORCH_CHECK(fits_i32(x.size(0)) && fits_i32(x.size(1)), op, ": tensors[", i, "] is too large for the kernel");
    if (x.numel() == 0 || u.size(1) == 0) continue;
    if (!fits_i32(u.stride(0)) || !fits_i32(u.stride(1))) {
      u = u.contiguous();
      keep.push_back(u);
    }
    ProjLayer& ly = layers[i];
    ly.x = x.data_ptr();
    ly.u = u.data_ptr();
    proj_view(left, static_cast<int32_t>(x.size(0)), static_cast<int32_t>(x.size(1)), &ly.L, &ly.n, &ly.s_l,
              &ly.s_n);
    ly.k = static_cast<int32_t>(u.size(1));
    ly.s_ul = static_cast<int32_t>(u.stride(0));
    ly.s_uk = static_cast<int32_t>(u.stride(1));
    groups[{to_dtype(x.scalar_type(), op, "tensors"), to_dtype(u.scalar_type(), op, "bases")}].push_back(i);
  }
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  for (const auto& [key, idx] : groups) {
    TORCH_CHECK(key.first != DType::Float64 && key.second != DType::Float64, op,
                ": float64 runs on the torch backend (the CUDA kernel computes in float32)");
    std::vector<ProjLayer> group(idx.size());
    for (size_t g = 0; g < idx.size(); ++g) group[g] = layers[idx[g]];
    C10_CUDA_CHECK(project_out_launch(static_cast<int64_t>(group.size()), group.data(), key.first, key.second,
                                      stream));
  }
}

}  // namespace
}  // namespace cuda
}  // namespace forgetkern

TORCH_LIBRARY_FRAGMENT(forgetkern_cuda, m) {
  m.def("project_out_(Tensor(a!)[] tensors, Tensor[] bases, str side) -> ()");
}

TORCH_LIBRARY_IMPL(forgetkern_cuda, CUDA, m) {
  m.impl("project_out_", &forgetkern::cuda::project_out_cuda);
}
