// Torch glue of the CUDA olora_loss kernels: checks (a safety net under forgetkern/ops/olora_loss.py), grouping
// by (past dtype, cur dtype), on the current stream. Forward: a workspace of one double per P tile of the whole
// op, one launch sequence per group, one final fixed-order reduction into a 0-dim float32 tensor (no host sync).
// Backward: a float32 scratch for S (p x r per layer), the seed and dA kernels per group. The layer tables are
// plain host data copied into the kernel arguments (no upload). Registers forgetkern_cuda::olora_loss and
// forgetkern_cuda::olora_loss_backward.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "forgetkern/olora_loss.h"
#include "glue_utils.h"
#include "olora_loss_launch.h"

namespace forgetkern {
namespace cuda {
namespace {

struct Prepared {
  std::vector<OloraLayer> layers;
  DtypeGroups<std::pair<DType, DType>> groups;
  int64_t s_total = 0;  // floats of S over the layers (backward)
};

int norm_of(const std::string& norm, const char* op) {
  TORCH_CHECK(norm == "l1" || norm == "fro2", op, ": norm must be 'l1' or 'fro2', got '", norm, "'");
  return norm == "l1" ? kOloraL1 : kOloraFro2;
}

Prepared prepare(at::TensorList past, at::TensorList cur, const char* op) {
  TORCH_CHECK(!cur.empty(), op, ": cur must not be empty");
  TORCH_CHECK(past.size() == cur.size(), op, ": past has ", past.size(), " tensors but cur has ", cur.size());
  const at::Device device = cur[0].device();
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  Prepared out;
  out.layers.resize(cur.size());
  for (size_t i = 0; i < cur.size(); ++i) {
    const at::Tensor& p = past[i];
    const at::Tensor& c = cur[i];
    TORCH_CHECK(p.is_cuda() && p.device() == device && c.is_cuda() && c.device() == device, op, ": past[", i,
                "] and cur[", i, "] must be CUDA tensors on ", device);
    TORCH_CHECK(p.dim() == 2 && c.dim() == 2 && p.size(1) == c.size(1), op, ": past[", i, "] and cur[", i,
                "] must be 2-D with the same number of columns, got ", p.sizes(), " and ", c.sizes());
    TORCH_CHECK(p.is_contiguous() && c.is_contiguous(), op, ": past[", i, "] and cur[", i, "] must be contiguous");
    TORCH_CHECK(p.size(0) <= kMax && c.size(0) <= kMax && c.size(1) <= kMax, op, ": layer ", i,
                " is too large for the kernel");
    OloraLayer& ly = out.layers[i];
    ly.past = p.data_ptr();
    ly.cur = c.data_ptr();
    ly.grad = nullptr;
    ly.p = static_cast<int32_t>(p.size(0));
    ly.r = static_cast<int32_t>(c.size(0));
    ly.K = static_cast<int32_t>(c.size(1));
    ly.s_off = out.s_total;
    if (ly.p > 0 && ly.r > 0) out.s_total += static_cast<int64_t>(ly.p) * ly.r;
    const DType pd = to_dtype(p.scalar_type(), op, "past");
    const DType cd = to_dtype(c.scalar_type(), op, "cur");
    TORCH_CHECK(pd != DType::Float64 && cd != DType::Float64, op,
                ": float64 runs on the torch backend (the CUDA kernels compute in float32)");
    if (c.numel() > 0) out.groups[{pd, cd}].push_back(i);
  }
  return out;
}

std::vector<OloraLayer> gather(const Prepared& pr, const std::vector<size_t>& idx) {
  std::vector<OloraLayer> g(idx.size());
  for (size_t k = 0; k < idx.size(); ++k) g[k] = pr.layers[idx[k]];
  return g;
}

at::Tensor olora_loss_cuda(at::TensorList past, at::TensorList cur, const std::string& norm) {
  static const char* op = "forgetkern_cuda::olora_loss";
  const int nm = norm_of(norm, op);
  const Prepared pr = prepare(past, cur, op);
  const c10::cuda::CUDAGuard guard(cur[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(cur[0].device().index()).stream();
  int64_t slots = 0;
  for (const auto& [key, idx] : pr.groups) {
    const auto g = gather(pr, idx);
    slots += olora_workspace_slots(static_cast<int64_t>(g.size()), g.data());
  }
  at::Tensor out = at::empty({}, cur[0].options().dtype(at::kFloat));
  at::Tensor workspace = at::empty({slots > 0 ? slots : 1}, cur[0].options().dtype(at::kDouble));
  double* ws = workspace.data_ptr<double>();
  int64_t offset = 0;
  for (const auto& [key, idx] : pr.groups) {
    const auto g = gather(pr, idx);
    const int64_t n = static_cast<int64_t>(g.size());
    C10_CUDA_CHECK(olora_forward_launch(n, g.data(), key.first, key.second, nm, ws, offset, stream));
    offset += olora_workspace_slots(n, g.data());
  }
  C10_CUDA_CHECK(olora_finalize_launch(ws, slots, out.data_ptr<float>(), stream));
  return out;
}

std::vector<at::Tensor> olora_loss_backward_cuda(at::TensorList past, at::TensorList cur, const std::string& norm,
                                                 const at::Tensor& grad_out) {
  static const char* op = "forgetkern_cuda::olora_loss_backward";
  const int nm = norm_of(norm, op);
  Prepared pr = prepare(past, cur, op);
  TORCH_CHECK(grad_out.numel() == 1, op, ": grad_out must hold one value, got shape ", grad_out.sizes());
  const at::Device device = cur[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  // the kernels read the incoming gradient on the device (no host sync); a float32 CUDA scalar as autograd gives
  // is used as it is
  const at::Tensor g = (grad_out.device() == device && grad_out.scalar_type() == at::kFloat)
                           ? grad_out
                           : grad_out.to(device, at::kFloat);
  std::vector<at::Tensor> grads;
  grads.reserve(cur.size());
  for (size_t i = 0; i < cur.size(); ++i) {
    grads.push_back(at::empty_like(cur[i], at::MemoryFormat::Contiguous));
    pr.layers[i].grad = grads.back().data_ptr();
  }
  at::Tensor scratch = at::empty({pr.s_total > 0 ? pr.s_total : 1}, cur[0].options().dtype(at::kFloat));
  for (const auto& [key, idx] : pr.groups) {
    const auto gl = gather(pr, idx);
    C10_CUDA_CHECK(olora_backward_launch(static_cast<int64_t>(gl.size()), gl.data(), key.first, key.second, nm,
                                         g.data_ptr<float>(), scratch.data_ptr<float>(), stream));
  }
  return grads;
}

}  // namespace
}  // namespace cuda
}  // namespace forgetkern

TORCH_LIBRARY_FRAGMENT(forgetkern_cuda, m) {
  m.def("olora_loss(Tensor[] past, Tensor[] cur, str norm) -> Tensor");
  m.def("olora_loss_backward(Tensor[] past, Tensor[] cur, str norm, Tensor grad_out) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(forgetkern_cuda, CUDA, m) {
  m.impl("olora_loss", &forgetkern::cuda::olora_loss_cuda);
  m.impl("olora_loss_backward", &forgetkern::cuda::olora_loss_backward_cuda);
}
