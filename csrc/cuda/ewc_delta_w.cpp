// Torch glue of the CUDA ewc_delta_w kernels: checks, grouping by (factor, Fisher) dtypes, the work tables
// (built on the host, copied to the device asynchronously), the workspaces, one launch sequence per group and
// one final reduction, all on the current stream (no host sync). Registers forgetkern_cuda::ewc_delta_w with the
// schema of forgetkern_cpu::ewc_delta_w.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <vector>

#include "glue_utils.h"
#include "launchers.h"

namespace forgetkern {
namespace cuda {
namespace {

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Host rows -> a device tensor (through a pinned staging tensor: the copy is asynchronous on the stream).
template <typename Row>
at::Tensor to_device(const std::vector<Row>& rows, const at::TensorOptions& dev) {
  const int64_t bytes = static_cast<int64_t>(rows.size() * sizeof(Row));
  at::Tensor host = at::empty({bytes > 0 ? bytes : 1}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  if (bytes > 0) std::memcpy(host.data_ptr(), rows.data(), static_cast<size_t>(bytes));
  return host.to(dev.dtype(at::kByte), /*non_blocking=*/true);
}

at::Tensor ewc_delta_w_cuda(at::TensorList lora_a, at::TensorList lora_b, at::TensorList fishers,
                            at::ArrayRef<double> scaling, double lam, at::TensorList grads_a, at::TensorList grads_b,
                            bool write_grad) {
  static const char* op = "forgetkern_cuda::ewc_delta_w";
  TORCH_CHECK(!lora_a.empty(), op, ": lora_a must not be empty");
  TORCH_CHECK(lora_b.size() == lora_a.size() && fishers.size() == lora_a.size() &&
                  scaling.size() == lora_a.size(),
              op, ": lora_a, lora_b, fishers and scaling must have the same length");
  check_list(lora_a, lora_a, op, "lora_a");
  check_list(lora_b, lora_b, op, "lora_b");
  check_list(fishers, fishers, op, "fishers");
  if (write_grad) {
    check_list(grads_a, lora_a, op, "grads_a");
    check_list(grads_b, lora_b, op, "grads_b");
  }
  const int max_rank = edw_max_rank();
  bool any_double = false;
  DtypeGroups<std::tuple<DType, DType>> groups;
  for (size_t i = 0; i < lora_a.size(); ++i) {
    const at::Tensor &a = lora_a[i], &b = lora_b[i], &f = fishers[i];
    TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && f.dim() == 2 && b.size(1) == a.size(0) &&
                    f.size(0) == b.size(0) && f.size(1) == a.size(1),
                op, ": layer ", i, " has inconsistent shapes (A r x in, B out x r, F out x in)");
    TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": lora_a[", i, "] and lora_b[", i, "] dtypes differ");
    TORCH_CHECK(a.size(0) <= max_rank, op, ": lora_a[", i, "] has rank ", a.size(0), "; the CUDA kernel handles "
                "ranks <= ", max_rank);
    if (write_grad) {
      TORCH_CHECK(grads_a[i].scalar_type() == a.scalar_type() && grads_b[i].scalar_type() == a.scalar_type(), op,
                  ": grads_a[", i, "] / grads_b[", i, "] must have lora_a[", i, "]'s dtype");
    }
    const DType fd = to_dtype(a.scalar_type(), op, "lora_a");
    any_double = any_double || fd == DType::Float64;
    if (f.numel() > 0 && a.size(0) > 0) groups[{fd, to_dtype(f.scalar_type(), op, "fishers")}].push_back(i);
  }
  const c10::cuda::CUDAGuard guard(lora_a[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(lora_a[0].device().index()).stream();
  const at::TensorOptions dev = lora_a[0].options();
  at::Tensor out = at::empty({}, dev.dtype(any_double ? at::kDouble : at::kFloat));

  std::vector<double> s2(scaling.size());
  for (size_t i = 0; i < scaling.size(); ++i) s2[i] = scaling[i] * scaling[i];
  at::Tensor s2_dev = to_device(s2, dev);
  const int bm = edw_block_m(), chunk = edw_chunk_m();

  // every group's tables first, so the penalty partials of all groups live in one buffer
  struct Plan {
    DType factor, fisher;
    std::vector<EdwTileRow> tiles;
    std::vector<EdwReduceRow> red_a, red_b;
    int64_t wsa = 0, wsb = 0, partial_off = 0;
  };
  std::vector<Plan> plans;
  int64_t n_partials = 0;
  for (const auto& [key, idx] : groups) {
    Plan p;
    p.factor = std::get<0>(key);
    p.fisher = std::get<1>(key);
    const int64_t bn = edw_block_n(p.factor);
    for (size_t i : idx) {
      const int64_t n_out = fishers[i].size(0), n_in = fishers[i].size(1), r = lora_a[i].size(0);
      const int64_t n_ct = cdiv(n_in, bn), n_mt = cdiv(n_out, bm), n_ch = cdiv(n_out, chunk);
      const int64_t wsa0 = p.wsa, wsb0 = p.wsb;
      for (int64_t ct = 0; ct < n_ct; ++ct) {
        for (int64_t ch = 0; ch < n_ch; ++ch) {
          const int64_t m_start = ch * chunk;
          p.tiles.push_back({lora_a[i].data_ptr(), lora_b[i].data_ptr(), fishers[i].data_ptr(), n_out, n_in, r,
                             m_start, std::min(m_start + chunk, n_out), ct * bn,
                             wsa0 + (ct * n_ch + ch) * max_rank * bn, wsb0 + ct * bm * max_rank,
                             n_ct * bm * max_rank, static_cast<int64_t>(i)});
        }
        if (write_grad) {
          p.red_a.push_back({grads_a[i].data_ptr(), wsa0 + ct * n_ch * max_rank * bn, n_ch, max_rank * bn, ct * bn,
                             n_in, r, n_in - ct * bn, max_rank, bn, static_cast<int64_t>(i)});
        }
      }
      if (write_grad) {
        for (int64_t mt = 0; mt < n_mt; ++mt) {
          p.red_b.push_back({grads_b[i].data_ptr(), wsb0 + mt * n_ct * bm * max_rank, n_ct, bm * max_rank,
                             mt * bm * r, r, n_out - mt * bm, r, bm, max_rank, static_cast<int64_t>(i)});
        }
      }
      p.wsa += n_ct * n_ch * max_rank * bn;
      p.wsb += n_mt * n_ct * bm * max_rank;
    }
    p.partial_off = n_partials;
    n_partials += static_cast<int64_t>(p.tiles.size());
    plans.push_back(std::move(p));
  }
  at::Tensor partials = at::empty({n_partials > 0 ? n_partials : 1}, dev.dtype(at::kDouble));
  for (const Plan& p : plans) {
    const auto cdt = p.factor == DType::Float64 ? at::kDouble : at::kFloat;
    at::Tensor ws_a = at::empty({write_grad && p.wsa > 0 ? p.wsa : 1}, dev.dtype(cdt));
    at::Tensor ws_b = at::empty({write_grad && p.wsb > 0 ? p.wsb : 1}, dev.dtype(cdt));
    at::Tensor tiles = to_device(p.tiles, dev), red_a = to_device(p.red_a, dev), red_b = to_device(p.red_b, dev);
    C10_CUDA_CHECK(ewc_delta_w_launch(
        reinterpret_cast<const EdwTileRow*>(tiles.data_ptr()), static_cast<int64_t>(p.tiles.size()),
        reinterpret_cast<const EdwReduceRow*>(red_a.data_ptr()), static_cast<int64_t>(p.red_a.size()),
        reinterpret_cast<const EdwReduceRow*>(red_b.data_ptr()), static_cast<int64_t>(p.red_b.size()),
        reinterpret_cast<const double*>(s2_dev.data_ptr()),
        p.factor, p.fisher, lam, ws_a.data_ptr(), ws_b.data_ptr(), partials.data_ptr<double>() + p.partial_off,
        write_grad, stream));
  }
  C10_CUDA_CHECK(ewc_delta_w_finalize_launch(partials.data_ptr<double>(), n_partials, lam, out.data_ptr(),
                                             any_double, stream));
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace forgetkern

TORCH_LIBRARY_FRAGMENT(forgetkern_cuda, m) {
  m.def(
      "ewc_delta_w(Tensor[] lora_a, Tensor[] lora_b, Tensor[] fishers, float[] scaling, float lam, "
      "Tensor(a!)[] grads_a, Tensor(b!)[] grads_b, bool write_grad) -> Tensor");
}

TORCH_LIBRARY_IMPL(forgetkern_cuda, CUDA, m) {
  m.impl("ewc_delta_w", &forgetkern::cuda::ewc_delta_w_cuda);
}
