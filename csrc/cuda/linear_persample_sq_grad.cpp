// torch glue of the CUDA linear_persample_sq_grad_ kernel: torch.ops.forgetkern_cuda.linear_persample_sq_grad_,
// same schema and semantics as forgetkern/reference/linear_persample_sq_grad.py. Checks the (already
// validated) arguments, makes the feature dimension contiguous, plans the sample split, allocates the split
// workspace and the non-finite flag, and launches on the current stream (csrc/cuda/linear_persample_sq_grad.cu).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "forgetkern/linear_persample_sq_grad.h"

namespace forgetkern {
namespace cuda {
namespace {

constexpr const char* kOp = "forgetkern_cuda::linear_persample_sq_grad_";

DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::Float32;
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    default: TORCH_CHECK(false, kOp, ": ", name, " has unsupported dtype ", t.scalar_type());
  }
  return DType::Float32;
}

at::Tensor linear_persample_sq_grad_cuda(at::Tensor fisher, const at::Tensor& x_in, const at::Tensor& g_in,
                                         const c10::optional<at::Tensor>& mask, double scale, bool token_level) {
  TORCH_CHECK(fisher.is_cuda() && x_in.device() == fisher.device() && g_in.device() == fisher.device(), kOp,
              ": fisher, x and grad_out must be on one CUDA device");
  TORCH_CHECK(fisher.dim() == 2 && fisher.is_contiguous(), kOp, ": fisher must be a contiguous [out, in] tensor");
  TORCH_CHECK(x_in.dim() == 3 && g_in.dim() == 3 && x_in.size(0) == g_in.size(0) && x_in.size(1) == g_in.size(1),
              kOp, ": x and grad_out must be [N, T, in] and [N, T, out]");
  TORCH_CHECK(fisher.size(0) == g_in.size(2) && fisher.size(1) == x_in.size(2), kOp,
              ": fisher must be [out, in] = [grad_out.size(2), x.size(2)]");
  TORCH_CHECK(x_in.scalar_type() == g_in.scalar_type(), kOp, ": x and grad_out must have the same dtype");
  TORCH_CHECK(fisher.scalar_type() == at::kFloat || fisher.scalar_type() == at::kBFloat16, kOp,
              ": fisher must be float32 or bfloat16 on this backend");
  const c10::cuda::CUDAGuard guard(fisher.device());
  at::Tensor found = at::zeros({}, fisher.options().dtype(at::kFloat));
  const at::Tensor x = x_in.stride(2) == 1 ? x_in : x_in.contiguous();
  const at::Tensor g = g_in.stride(2) == 1 ? g_in : g_in.contiguous();

  PsgArgs a;
  a.n = x.size(0);
  a.t = x.size(1);
  a.d_out = fisher.size(0);
  a.d_in = fisher.size(1);
  if (a.n == 0 || a.t == 0 || fisher.numel() == 0) return found;
  at::Tensor m;
  if (mask.has_value()) {
    TORCH_CHECK(mask->dim() == 2 && mask->size(0) == a.n && mask->size(1) == a.t, kOp, ": mask must be [N, T]");
    m = (mask->scalar_type() == at::kBool ? *mask : mask->ne(0)).to(at::kByte).contiguous();
    a.mask = m.data_ptr<uint8_t>();
    a.mask_sn = m.stride(0);
  }
  a.fisher = fisher.data_ptr();
  a.fisher_dtype = dtype_of(fisher, "fisher");
  a.x = x.data_ptr();
  a.g = g.data_ptr();
  a.in_dtype = dtype_of(x, "x");
  a.x_sn = x.stride(0);
  a.x_st = x.stride(1);
  a.g_sn = g.stride(0);
  a.g_st = g.stride(1);
  a.scale = static_cast<float>(scale);
  a.token = token_level || a.t == 1;  // one token: G_n^2 = (g_n^2)(x_n^2)^T, the squared-operand path
  a.found = found.data_ptr<float>();
  a.splits = psg_plan_splits(a.n, a.d_out, a.d_in);
  at::Tensor ws;
  if (a.splits > 1) {
    ws = at::empty({a.splits, a.d_out, a.d_in}, fisher.options().dtype(at::kFloat));
    a.workspace = ws.data_ptr<float>();
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(fisher.device().index()).stream();
  const int err = psg_launch(a, static_cast<void*>(stream));
  TORCH_CHECK(err == 0, kOp, ": kernel launch failed (cudaError ", err, ")");
  return found;
}

}  // namespace
}  // namespace cuda
}  // namespace forgetkern

TORCH_LIBRARY_FRAGMENT(forgetkern_cuda, m) {
  m.def("linear_persample_sq_grad_(Tensor(a!) fisher, Tensor x, Tensor grad_out, Tensor? mask, float scale, "
        "bool token_level) -> Tensor");
}

TORCH_LIBRARY_IMPL(forgetkern_cuda, CUDA, m) {
  m.impl("linear_persample_sq_grad_", &forgetkern::cuda::linear_persample_sq_grad_cuda);
}
