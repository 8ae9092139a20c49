// torch glue for the CUDA LoRA linear: torch.ops.forgetkern_cuda.lora_linear_fwd / lora_linear_bwd, same
// schema and semantics as forgetkern/reference/lora_linear.py. Each product is one LoraGemm launch
// (csrc/cuda/lora_linear.cu); this file only allocates outputs, concatenates the small adapter matrices of
// adjacent adapters (rank-sized copies) and describes the operands by pointer and strides.
#include <ATen/ATen.h>
#include <torch/library.h>
#ifndef FK_LORA_HOST_GLUE
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#define FK_LORA_GUARD(x) const c10::cuda::CUDAGuard guard_((x).device())
#define FK_LORA_STREAM(x) static_cast<void*>(c10::cuda::getCurrentCUDAStream((x).device().index()).stream())
#define FK_LORA_KEY CUDA
#else  // host build of this glue (CPU tensors, a host lora_gemm_launch): checks the operand descriptions
#define FK_LORA_GUARD(x)
#define FK_LORA_STREAM(x) nullptr
#define FK_LORA_KEY CPU
#endif

#include <cstdint>
#include <tuple>
#include <utility>
#include <vector>

#include "forgetkern/lora_linear.h"

namespace forgetkern {
namespace cuda {
namespace {

using at::Tensor;
using Runs = std::vector<std::pair<int64_t, int64_t>>;

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

void run(const LoraGemm& g, const Tensor& like) {
  if (g.m <= 0 || g.q <= 0) return;
  const int err = lora_gemm_launch(g, dtype_of(like), FK_LORA_STREAM(like));
  TORCH_CHECK(err == 0, "forgetkern_cuda.lora_linear: kernel launch failed (cudaError ", err, ")");
}

LoraOperand opnd(const Tensor& t, int64_t s0, int64_t s1) { return LoraOperand{t.data_ptr(), s0, s1}; }

LoraDrop drop(double p, int64_t key) {
  LoraDrop d;
  d.key = static_cast<uint32_t>(key);
  d.threshold = lora_keep_threshold(p);
  d.scale = lora_keep_scale(p);
  d.enabled = 1;
  return d;
}

struct Plan {
  std::vector<int64_t> offs;  // column offset of each adapter in xa / g (offs[n] = total rank)
  Runs by_layer, plain;       // runs of adjacent adapters: same layer / all without dropout
};

Plan plan(at::TensorList lora_a, at::IntArrayRef layer, at::ArrayRef<double> dropout_p) {
  Plan p;
  const int64_t n = static_cast<int64_t>(lora_a.size());
  p.offs.assign(n + 1, 0);
  for (int64_t k = 0; k < n; ++k) {
    p.offs[k + 1] = p.offs[k] + lora_a[k].size(0);
    if (!p.by_layer.empty() && layer[p.by_layer.back().first] == layer[k]) p.by_layer.back().second = k + 1;
    else p.by_layer.emplace_back(k, k + 1);
    if (dropout_p[k] <= 0) {
      if (!p.plain.empty() && p.plain.back().second == k) p.plain.back().second = k + 1;
      else p.plain.emplace_back(k, k + 1);
    }
  }
  return p;
}

Tensor cat(at::TensorList ts, int64_t lo, int64_t hi, int64_t dim) {
  if (hi - lo == 1) return ts[lo];
  return at::cat(std::vector<Tensor>(ts.begin() + lo, ts.begin() + hi), dim);
}

Tensor colscale(at::TensorList lora_a, at::ArrayRef<double> scaling, const std::vector<int64_t>& ks,
                const Tensor& like) {
  std::vector<float> v;
  for (int64_t k : ks) v.insert(v.end(), static_cast<size_t>(lora_a[k].size(0)), static_cast<float>(scaling[k]));
  Tensor host = at::empty({static_cast<int64_t>(v.size())}, at::TensorOptions().dtype(at::kFloat));
  std::copy(v.begin(), v.end(), host.data_ptr<float>());
  return host.to(like.device());
}

std::vector<int64_t> range(int64_t lo, int64_t hi) {
  std::vector<int64_t> r;
  for (int64_t k = lo; k < hi; ++k) r.push_back(k);
  return r;
}

}  // namespace

std::tuple<std::vector<Tensor>, Tensor> lora_linear_fwd(
    const Tensor& x, at::TensorList weights, at::TensorList biases, at::IntArrayRef bias_layer,
    at::TensorList lora_a, at::TensorList lora_b, at::IntArrayRef layer, at::ArrayRef<double> scaling,
    at::ArrayRef<double> dropout_p, at::IntArrayRef keys) {
  FK_LORA_GUARD(x);
  const int64_t m = x.size(0), k_in = x.size(1), n_ad = static_cast<int64_t>(lora_a.size());
  const Plan p = plan(lora_a, layer, dropout_p);
  const int64_t r_all = p.offs[n_ad];
  Tensor xa = at::empty({m, r_all}, x.options());
  for (const auto& run_ : p.plain) {  // x [A_lo | ... | A_hi-1]^T: one GEMM for the adapters without dropout
    const Tensor a = cat(lora_a, run_.first, run_.second, 0);
    LoraGemm g;
    g.m = m; g.q = a.size(0); g.nseg = 1;
    g.seg[0].a = opnd(x, k_in, 1); g.seg[0].b = opnd(a, 1, k_in); g.seg[0].k = k_in;
    g.c = xa.narrow(1, p.offs[run_.first], g.q).data_ptr(); g.ldc = r_all;
    run(g, x);
  }
  for (int64_t k = 0; k < n_ad; ++k) {
    if (dropout_p[k] <= 0) continue;
    LoraGemm g;
    g.m = m; g.q = lora_a[k].size(0); g.nseg = 1;
    g.seg[0].a = opnd(x, k_in, 1); g.seg[0].b = opnd(lora_a[k], 1, k_in); g.seg[0].k = k_in;
    g.seg[0].a_drop = drop(dropout_p[k], keys[k]);
    g.c = xa.narrow(1, p.offs[k], g.q).data_ptr(); g.ldc = r_all;
    run(g, x);
  }
  std::vector<Tensor> ys;
  for (int64_t li = 0; li < static_cast<int64_t>(weights.size()); ++li) {
    const Tensor& w = weights[li];
    std::vector<int64_t> ks;
    std::vector<Tensor> cols;
    for (const auto& run_ : p.by_layer) {
      if (layer[run_.first] != li || p.offs[run_.second] == p.offs[run_.first]) continue;
      cols.push_back(xa.narrow(1, p.offs[run_.first], p.offs[run_.second] - p.offs[run_.first]));
      for (int64_t k = run_.first; k < run_.second; ++k) ks.push_back(k);
    }
    Tensor y = at::empty({m, w.size(0)}, x.options());
    LoraGemm g;
    g.m = m; g.q = w.size(0); g.nseg = 1;
    g.seg[0].a = opnd(x, k_in, 1); g.seg[0].b = opnd(w, 1, k_in); g.seg[0].k = k_in;
    Tensor xa_l, b_cat, scale;
    if (!ks.empty()) {  // second segment: (xa * s) B^T, accumulated into the same tile
      xa_l = cols.size() == 1 ? cols[0] : at::cat(cols, 1);
      std::vector<Tensor> bs;
      for (int64_t k : ks) bs.push_back(lora_b[k]);
      b_cat = bs.size() == 1 ? bs[0] : at::cat(bs, 1);
      scale = colscale(lora_a, scaling, ks, x);
      g.nseg = 2;
      g.seg[1].a = opnd(xa_l, xa_l.stride(0), 1); g.seg[1].b = opnd(b_cat, 1, b_cat.size(1));
      g.seg[1].k = xa_l.size(1); g.seg[1].a_colscale = scale.data_ptr<float>();
    }
    for (size_t i = 0; i < bias_layer.size(); ++i)
      if (bias_layer[i] == li) g.bias = biases[i].data_ptr();
    g.c = y.data_ptr(); g.ldc = w.size(0);
    run(g, x);
    ys.push_back(y);
  }
  return {ys, xa};
}

std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>> lora_linear_bwd(
    at::TensorList dys, const Tensor& x, at::TensorList weights, at::TensorList lora_a, at::TensorList lora_b,
    const Tensor& xa, at::IntArrayRef layer, at::ArrayRef<double> scaling, at::ArrayRef<double> dropout_p,
    at::IntArrayRef keys, bool need_dx, bool need_da, bool need_db) {
  FK_LORA_GUARD(x);
  const int64_t m = x.size(0), k_in = x.size(1), n_ad = static_cast<int64_t>(lora_a.size());
  const Plan p = plan(lora_a, layer, dropout_p);
  const int64_t r_all = p.offs[n_ad];
  const Tensor empty = at::empty({0}, x.options());
  std::vector<Tensor> d_a(n_ad, empty), d_b(n_ad, empty);
  Tensor dx = empty;
  if (need_db) {  // dB = s * dy^T xa, per run of adjacent adapters of one layer
    for (const auto& run_ : p.by_layer) {
      const Tensor& dy = dys[layer[run_.first]];
      const int64_t r = p.offs[run_.second] - p.offs[run_.first], n = dy.size(1);
      Tensor out = at::empty({n, r}, x.options());
      const Tensor scale = colscale(lora_a, scaling, range(run_.first, run_.second), x);
      LoraGemm g;
      g.m = n; g.q = r; g.nseg = 1;
      g.seg[0].a = opnd(dy, 1, n); g.seg[0].b = opnd(xa.narrow(1, p.offs[run_.first], r), r_all, 1);
      g.seg[0].k = m; g.out_colscale = scale.data_ptr<float>();
      g.c = out.data_ptr(); g.ldc = r;
      if (m == 0) out.zero_(); else run(g, x);
      for (int64_t k = run_.first; k < run_.second; ++k)
        d_b[k] = run_.second - run_.first == 1 ? out
                 // a copy, never a view of out: with one output row the slice is contiguous already
                 : out.narrow(1, p.offs[k] - p.offs[run_.first], lora_a[k].size(0)).clone(at::MemoryFormat::Contiguous);
    }
  }
  if (!(need_dx || need_da)) return {dx, d_a, d_b};
  Tensor gbuf = at::empty({m, r_all}, x.options());  // g = s * dy B, the scaled rank-r products
  for (const auto& run_ : p.by_layer) {
    const int64_t r = p.offs[run_.second] - p.offs[run_.first];
    if (r == 0) continue;
    const Tensor& dy = dys[layer[run_.first]];
    const Tensor b_cat = cat(lora_b, run_.first, run_.second, 1);
    const Tensor scale = colscale(lora_a, scaling, range(run_.first, run_.second), x);
    LoraGemm g;
    g.m = m; g.q = r; g.nseg = 1;
    g.seg[0].a = opnd(dy, dy.size(1), 1); g.seg[0].b = opnd(b_cat, r, 1); g.seg[0].k = dy.size(1);
    g.out_colscale = scale.data_ptr<float>();
    g.c = gbuf.narrow(1, p.offs[run_.first], r).data_ptr(); g.ldc = r_all;
    run(g, x);
  }
  if (need_da) {  // dA = g^T drop(x)
    for (int64_t k = 0; k < n_ad; ++k) d_a[k] = at::empty_like(lora_a[k]);
    auto da_gemm = [&](int64_t lo, int64_t hi, const Tensor& out, const LoraDrop* d) {
      LoraGemm g;
      g.m = out.size(0); g.q = k_in; g.nseg = 1;
      g.seg[0].a = opnd(gbuf.narrow(1, p.offs[lo], p.offs[hi] - p.offs[lo]), 1, r_all);
      g.seg[0].b = opnd(x, k_in, 1); g.seg[0].k = m;
      if (d != nullptr) g.seg[0].b_drop = *d;
      g.c = out.data_ptr(); g.ldc = k_in;
      if (m == 0) out.zero_(); else run(g, x);
    };
    for (const auto& run_ : p.plain) {
      Tensor out = at::empty({p.offs[run_.second] - p.offs[run_.first], k_in}, x.options());
      da_gemm(run_.first, run_.second, out, nullptr);
      for (int64_t k = run_.first; k < run_.second; ++k)
        d_a[k] = run_.second - run_.first == 1 ? out
                 : out.narrow(0, p.offs[k] - p.offs[run_.first], lora_a[k].size(0)).clone();
    }
    for (int64_t k = 0; k < n_ad; ++k) {
      if (dropout_p[k] <= 0) continue;
      const LoraDrop d = drop(dropout_p[k], keys[k]);
      da_gemm(k, k + 1, d_a[k], &d);
    }
  }
  if (need_dx) {  // dx = sum_l dy_l W_l + [g_plain] [A_plain] in segmented launches, then masked dropout terms
    dx = at::empty({m, k_in}, x.options());
    std::vector<LoraSegment> segs;
    std::vector<Tensor> keep_alive;
    for (size_t li = 0; li < weights.size(); ++li) {
      LoraSegment s;
      s.a = opnd(dys[li], dys[li].size(1), 1); s.b = opnd(weights[li], k_in, 1); s.k = weights[li].size(0);
      segs.push_back(s);
    }
    for (const auto& run_ : p.plain) {
      const int64_t r = p.offs[run_.second] - p.offs[run_.first];
      if (r == 0) continue;
      keep_alive.push_back(cat(lora_a, run_.first, run_.second, 0));
      LoraSegment s;
      s.a = opnd(gbuf.narrow(1, p.offs[run_.first], r), r_all, 1); s.b = opnd(keep_alive.back(), k_in, 1); s.k = r;
      segs.push_back(s);
    }
    for (size_t i = 0; i < segs.size(); i += kLoraMaxSegments) {
      LoraGemm g;
      g.m = m; g.q = k_in; g.accumulate = i > 0;
      for (size_t j = i; j < segs.size() && j < i + kLoraMaxSegments; ++j) g.seg[g.nseg++] = segs[j];
      g.c = dx.data_ptr(); g.ldc = k_in;
      run(g, x);
    }
    for (int64_t k = 0; k < n_ad; ++k) {
      if (dropout_p[k] <= 0 || lora_a[k].size(0) == 0) continue;
      LoraGemm g;
      g.m = m; g.q = k_in; g.nseg = 1; g.accumulate = 1;
      g.seg[0].a = opnd(gbuf.narrow(1, p.offs[k], lora_a[k].size(0)), r_all, 1);
      g.seg[0].b = opnd(lora_a[k], k_in, 1); g.seg[0].k = lora_a[k].size(0);
      g.out_drop = drop(dropout_p[k], keys[k]);
      g.c = dx.data_ptr(); g.ldc = k_in;
      run(g, x);
    }
  }
  return {dx, d_a, d_b};
}

}  // namespace cuda
}  // namespace forgetkern

TORCH_LIBRARY_FRAGMENT(forgetkern_cuda, m) {
  m.def("lora_linear_fwd(Tensor x, Tensor[] weights, Tensor[] biases, int[] bias_layer, Tensor[] lora_a, "
        "Tensor[] lora_b, int[] layer, float[] scaling, float[] dropout_p, int[] keys) -> (Tensor[], Tensor)");
  m.def("lora_linear_bwd(Tensor[] dys, Tensor x, Tensor[] weights, Tensor[] lora_a, Tensor[] lora_b, Tensor xa, "
        "int[] layer, float[] scaling, float[] dropout_p, int[] keys, bool need_dx, bool need_da, bool need_db) "
        "-> (Tensor, Tensor[], Tensor[])");
}

TORCH_LIBRARY_IMPL(forgetkern_cuda, FK_LORA_KEY, m) {
  m.impl("lora_linear_fwd", &forgetkern::cuda::lora_linear_fwd);
  m.impl("lora_linear_bwd", &forgetkern::cuda::lora_linear_bwd);
}
