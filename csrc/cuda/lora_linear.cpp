// torch glue for the CUDA LoRA linear: torch.ops.forgetkern_cuda.lora_linear_fwd / lora_linear_bwd, same
// schema and semantics as forgetkern/reference/lora_linear.py.
//
// The frozen GEMMs go to cuBLAS through ATen, straight into the output buffers: y = addmm(b, x, W^T) and
// dx = dy_1 W_1 (+ dy_l W_l ...); so do the GEMMs whose long M dimension is the inner one (dB = s dy^T xa, the dA
// of adapters without dropout). The rank-r work with dropout or many adapters is the custom kernels of
// lora_linear.cu (shrink, expand, dropout-masked dA), described by plain structs whose scalings travel as kernel
// arguments: no host-to-device copy, no synchronisation per call.
#include <ATen/ATen.h>
#include <torch/library.h>
#ifndef FK_LORA_HOST_GLUE
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#define FK_LORA_GUARD(x) const c10::cuda::CUDAGuard guard_((x).device())
#define FK_LORA_STREAM(x) static_cast<void*>(c10::cuda::getCurrentCUDAStream((x).device().index()).stream())
#define FK_LORA_KEY CUDA
#define FK_LORA_NS forgetkern_cuda
#else  // host build of this glue (CPU tensors, host versions of the launchers): checks the glue without a GPU
#define FK_LORA_GUARD(x)
#define FK_LORA_STREAM(x) nullptr
#define FK_LORA_KEY CPU
#ifndef FK_LORA_NS
#define FK_LORA_NS forgetkern_cuda_host
#endif
#endif

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "forgetkern/lora_linear.h"

namespace forgetkern {
namespace cuda {
namespace {

using at::Tensor;

DType dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::Float32;
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    default: TORCH_CHECK(false, "forgetkern_cuda.lora_linear: unsupported dtype ", t.scalar_type(),
                         " (float32, float16 or bfloat16)");
  }
  return DType::Float32;
}

void check(int err, const char* what) {
  TORCH_CHECK(err == 0, "forgetkern_cuda.lora_linear: ", what, " kernel launch failed (cudaError ", err, ")");
}

LoraDrop drop(double p, int64_t key) {
  LoraDrop d;
  if (p <= 0) return d;
  d.key = static_cast<uint32_t>(key);
  d.threshold = lora_keep_threshold(p);
  d.scale = lora_keep_scale(p);
  d.enabled = 1;
  return d;
}

std::vector<int64_t> offsets(at::TensorList lora_a) {  // column of each adapter in xa / g; back() = total rank
  std::vector<int64_t> offs(lora_a.size() + 1, 0);
  for (size_t k = 0; k < lora_a.size(); ++k) offs[k + 1] = offs[k] + lora_a[k].size(0);
  return offs;
}

// Shrink items in batches of kLoraMaxItems, adapters of rank > kLoraShrinkRank split into rank chunks.
class ShrinkBatch {
 public:
  ShrinkBatch(int64_t m, Tensor& out, const Tensor& like) : like_(like) {
    p_.m = m; p_.out = out.data_ptr(); p_.ld_out = out.stride(0);
  }
  void add(const Tensor& in, const Tensor& w, int64_t w_sj, int64_t w_sc, int64_t rank, int64_t out_col,
           double scale, const LoraDrop& d) {
    const int64_t esz = static_cast<int64_t>(w.element_size());
    for (int64_t j0 = 0; j0 < rank; j0 += kLoraShrinkRank) {
      LoraShrinkItem& it = p_.item[p_.n++];
      it.in = in.data_ptr(); it.ld_in = in.stride(0); it.k = in.size(1);
      it.w = static_cast<const char*>(w.data_ptr()) + j0 * w_sj * esz; it.w_sj = w_sj; it.w_sc = w_sc;
      it.rank = static_cast<int32_t>(std::min<int64_t>(kLoraShrinkRank, rank - j0));
      it.out_col = static_cast<int32_t>(out_col + j0);
      it.scale = static_cast<float>(scale); it.drop = d;
      if (p_.n == kLoraMaxItems) flush();
    }
  }
  void flush() {
    if (p_.n > 0) check(lora_shrink_launch(p_, dtype_of(like_), FK_LORA_STREAM(like_)), "shrink");
    p_.n = 0;
  }

 private:
  LoraShrink p_;
  const Tensor& like_;
};

class ExpandBatch {
 public:
  ExpandBatch(const Tensor& in, Tensor& out, const Tensor& like) : like_(like) {
    p_.m = out.size(0); p_.q = out.size(1); p_.in = in.data_ptr(); p_.ld_in = in.stride(0);
    p_.out = out.data_ptr(); p_.ld_out = out.stride(0);
  }
  void add(const Tensor& w, int64_t w_sj, int64_t w_sq, int64_t rank, int64_t in_col, double scale,
           const LoraDrop& d) {
    if (rank == 0) return;
    LoraExpandItem& it = p_.item[p_.n++];
    it.w = w.data_ptr(); it.w_sj = w_sj; it.w_sq = w_sq;
    it.rank = static_cast<int32_t>(rank); it.in_col = static_cast<int32_t>(in_col);
    it.scale = static_cast<float>(scale); it.drop = d;
    if (p_.n == kLoraMaxItems) flush();
  }
  void flush() {
    if (p_.n > 0) check(lora_expand_launch(p_, dtype_of(like_), FK_LORA_STREAM(like_)), "expand");
    p_.n = 0;
  }

 private:
  LoraExpand p_;
  const Tensor& like_;
};

// dA = g^T drop(x) for an adapter with dropout: split over rows (enough blocks to fill the GPU, each split at
// least 256 rows; a function of the shapes only, so the result is deterministic), splits summed by at::sum.
Tensor drop_da(const Tensor& gbuf, int64_t g_col, int64_t rank, const Tensor& x, const LoraDrop& d) {
  const int64_t m = x.size(0), k = x.size(1);
  if (m == 0 || rank == 0) return at::zeros({rank, k}, x.options());
  const int64_t tiles = ((k + 63) / 64) * ((rank + 31) / 32);
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>((512 + tiles - 1) / tiles, (m + 255) / 256));
  const int64_t rows = ((m + splits - 1) / splits + 31) / 32 * 32;
  const int64_t used = (m + rows - 1) / rows;
  Tensor ws = at::empty({used, rank, k}, x.options().dtype(at::kFloat));
  LoraDropTGemm p;
  p.m = m; p.k = k; p.g = gbuf.data_ptr(); p.ld_g = gbuf.stride(0);
  p.g_col = static_cast<int32_t>(g_col); p.rank = static_cast<int32_t>(rank);
  p.x = x.data_ptr(); p.ld_x = x.stride(0); p.drop = d; p.ws = ws.data_ptr<float>();
  p.splits = static_cast<int32_t>(used); p.rows_per_split = rows;
  check(lora_drop_tgemm_launch(p, dtype_of(x), FK_LORA_STREAM(x)), "dropout dA");
  return (used == 1 ? ws.select(0, 0) : ws.sum(0)).to(x.scalar_type());
}

}  // namespace

std::tuple<std::vector<Tensor>, Tensor> lora_linear_fwd(
    const Tensor& x_in, at::TensorList weights, at::TensorList biases, at::IntArrayRef bias_layer,
    at::TensorList lora_a, at::TensorList lora_b, at::IntArrayRef layer, at::ArrayRef<double> scaling,
    at::ArrayRef<double> dropout_p, at::IntArrayRef keys) {
  FK_LORA_GUARD(x_in);
  dtype_of(x_in);
  const Tensor x = x_in.contiguous();  // the kernels read rows of x (the op layer passes it contiguous)
  const int64_t m = x.size(0), n_ad = static_cast<int64_t>(lora_a.size());
  const std::vector<int64_t> offs = offsets(lora_a);
  Tensor xa = at::empty({m, offs[n_ad]}, x.options());
  {  // shrink: xa = [drop_1(x) A_1^T | ...], every adapter in one launch (A_k (j, c) at j K + c). Adjacent
     // adapters without dropout read the same x: one item (up to 64 ranks) serves them all, x read once,
     // from their A's concatenated (a rank-sized copy); an adapter with dropout reads its own drop_k(x).
    std::vector<Tensor> keep;  // the concatenations live until the launch
    ShrinkBatch sb(m, xa, x);
    for (int64_t k = 0; k < n_ad;) {
      int64_t hi = k + 1;
      if (dropout_p[k] <= 0)
        while (hi < n_ad && dropout_p[hi] <= 0) ++hi;
      const Tensor a = hi - k == 1 ? lora_a[k]
                                   : at::cat(std::vector<Tensor>(lora_a.begin() + k, lora_a.begin() + hi), 0);
      if (hi - k > 1) keep.push_back(a);
      sb.add(x, a, a.stride(0), a.stride(1), offs[hi] - offs[k], offs[k], 1.0, drop(dropout_p[k], keys[k]));
      k = hi;
    }
    sb.flush();
  }
  std::vector<Tensor> ys;
  for (int64_t li = 0; li < static_cast<int64_t>(weights.size()); ++li) {
    const Tensor& w = weights[li];
    const Tensor* bias = nullptr;
    for (size_t i = 0; i < bias_layer.size(); ++i)
      if (bias_layer[i] == li) bias = &biases[i];
    // cuBLAS: the frozen GEMM (and the bias) into the output buffer
    Tensor y = bias != nullptr ? at::addmm(*bias, x, w.t()) : at::mm(x, w.t());
    // expand: y += s_k xa_k B_k^T in place, this layer's adapters in one launch (B_k (j, q) at q r + j)
    ExpandBatch eb(xa, y, x);
    for (int64_t k = 0; k < n_ad; ++k)
      if (layer[k] == li)
        eb.add(lora_b[k], lora_b[k].stride(1), lora_b[k].stride(0), lora_a[k].size(0), offs[k], scaling[k],
               LoraDrop{});
    eb.flush();
    ys.push_back(y);
  }
  return {ys, xa};
}

std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>> lora_linear_bwd(
    at::TensorList dys_in, const Tensor& x_in, at::TensorList weights, at::TensorList lora_a,
    at::TensorList lora_b, const Tensor& xa, at::IntArrayRef layer, at::ArrayRef<double> scaling, at::ArrayRef<double> dropout_p,
    at::IntArrayRef keys, bool need_dx, bool need_da, bool need_db) {
  FK_LORA_GUARD(x_in);
  dtype_of(x_in);
  const Tensor x = x_in.contiguous();
  std::vector<Tensor> dys;  // the kernels read rows of dy: contiguous copies where the caller's are not
  for (const Tensor& dy : dys_in) dys.push_back(dy.contiguous());
  const int64_t m = x.size(0), k_in = x.size(1), n_ad = static_cast<int64_t>(lora_a.size());
  const std::vector<int64_t> offs = offsets(lora_a);
  const Tensor empty = at::empty({0}, x.options());
  std::vector<Tensor> d_a(n_ad, empty), d_b(n_ad, empty);
  Tensor dx = empty;
  if (need_db) {  // dB_k = s_k dy^T xa_k: the inner dimension is M, a cuBLAS GEMM (then the scalar scaling)
    for (int64_t k = 0; k < n_ad; ++k)
      d_b[k] = at::mm(dys[layer[k]].t(), xa.narrow(1, offs[k], lora_a[k].size(0))).mul_(scaling[k]);
  }
  if (!(need_dx || need_da)) return {dx, d_a, d_b};
  // shrink: g = [s_1 dy B_1 | ...] (each adapter reads its own layer's dy; B_k (j, n) at n r + j)
  Tensor gbuf = at::empty({m, offs[n_ad]}, x.options());
  {
    ShrinkBatch sb(m, gbuf, x);
    for (int64_t k = 0; k < n_ad; ++k) {
      const Tensor& dy = dys[layer[k]];
      sb.add(dy, lora_b[k], lora_b[k].stride(1), lora_b[k].stride(0), lora_a[k].size(0), offs[k], scaling[k], LoraDrop{});
    }
    sb.flush();
  }
  if (need_da) {
    for (int64_t k = 0; k < n_ad; ++k) {
      const int64_t r = lora_a[k].size(0);
      d_a[k] = dropout_p[k] > 0 ? drop_da(gbuf, offs[k], r, x, drop(dropout_p[k], keys[k]))
                                : at::mm(gbuf.narrow(1, offs[k], r).t(), x);  // cuBLAS (inner dimension M)
    }
  }
  if (need_dx) {
    // cuBLAS: dx = sum_l dy_l W_l into one buffer
    if (weights.empty()) {
      dx = at::zeros({m, k_in}, x.options());
    } else {
      dx = at::mm(dys[0], weights[0]);
      for (size_t li = 1; li < weights.size(); ++li) dx.addmm_(dys[li], weights[li]);
    }
    // expand: dx += sum_k drop_k(g_k A_k) in place, every adapter in one launch (A_k (j, c) at j K + c)
    ExpandBatch eb(gbuf, dx, x);
    for (int64_t k = 0; k < n_ad; ++k)
      eb.add(lora_a[k], lora_a[k].stride(0), lora_a[k].stride(1), lora_a[k].size(0), offs[k], 1.0, drop(dropout_p[k], keys[k]));
    eb.flush();
  }
  return {dx, d_a, d_b};
}

}  // namespace cuda
}  // namespace forgetkern

TORCH_LIBRARY_FRAGMENT(FK_LORA_NS, m) {
  m.def("lora_linear_fwd(Tensor x, Tensor[] weights, Tensor[] biases, int[] bias_layer, Tensor[] lora_a, "
        "Tensor[] lora_b, int[] layer, float[] scaling, float[] dropout_p, int[] keys) -> (Tensor[], Tensor)");
  m.def("lora_linear_bwd(Tensor[] dys, Tensor x, Tensor[] weights, Tensor[] lora_a, Tensor[] lora_b, Tensor xa, "
        "int[] layer, float[] scaling, float[] dropout_p, int[] keys, bool need_dx, bool need_da, bool need_db) "
        "-> (Tensor, Tensor[], Tensor[])");
}

TORCH_LIBRARY_IMPL(FK_LORA_NS, FK_LORA_KEY, m) {
  m.impl("lora_linear_fwd", &forgetkern::cuda::lora_linear_fwd);
  m.impl("lora_linear_bwd", &forgetkern::cuda::lora_linear_bwd);
}
