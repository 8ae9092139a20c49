// ewc_delta_w on CPU: penalty lam/2 sum_i s_i^2 sum F (B A)^2 and, optionally, its gradients added into
// grads_a / grads_b (math in csrc/include/forgetkern/ewc_delta_w.h), never allocating out x in.
//
// Work items are (layer, block of rows): OpenMP over them, each item walking its rows tile by tile over the
// columns (kEdwTile wide): per row it forms d = B[o,:] A[:, tile] from the factors (converted to C once per
// call: factor-sized copies), reads F once, adds F d^2 to its penalty sum, the row's gB dot products to its own
// rows of grads_b (exclusive: no race) and B[o,k] g to the block's r x in partial of gA. The partials of a
// layer's row blocks are then added in block order into grads_a. Row blocks depend on the shapes only (at most
// kEdwMaxBlocks per layer), layers are processed in waves whose partials fit kEdwWaveBytes; penalty partials
// are added in item order: the result does not depend on the number of threads. The item kernels exist once
// per instruction set (cpu_isa.h), with the same operation order in all.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/ArrayRef.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu_isa.h"
#include "forgetkern/ewc_delta_w.h"
#include "isa_tile.h"
#include "multi_tensor_cpu.h"

namespace forgetkern {
namespace cpu {
namespace {

constexpr int64_t kEdwTile = 256;        // columns per tile (a multiple of kEdwLanes)
constexpr int64_t kEdwRowsMin = 32;      // rows per block, at least (amortises the tile copy of A)
constexpr int64_t kEdwMaxBlocks = 16;    // row blocks per layer, at most (bounds the gA partials)
constexpr int64_t kEdwWaveBytes = int64_t(64) << 20;  // gA partials of one wave of layers
static_assert(kEdwTile % kEdwLanes == 0, "a tile holds whole lane groups");

struct EdwLayer {
  const void* fisher;   // out x in, storage F
  const void* a;        // r x in, C (converted copy)
  const void* b;        // out x r, C (converted copy)
  void* grad_b;         // out x r, storage S (the factors' dtype)
  void* part;           // nblocks x r x in, C: gA partials of the row blocks (write_grad only)
  int64_t out, in, r, rows_per_block, nblocks;
  double s2;            // s^2
  double coef;          // s^2 * lam
};

struct EdwItem {
  int64_t layer, block;
};

// One row block of one layer; returns sum(F d^2) of its rows (unscaled).
using EdwItemFn = double (*)(const EdwLayer& L, int64_t block, bool write_grad);

template <typename Isa, typename C, typename F, typename S>
FK_INLINE double edw_item(const EdwLayer& L, int64_t block, bool write_grad) {
  const int64_t r = L.r, in = L.in;
  const int64_t o0 = block * L.rows_per_block;
  const int64_t o1 = std::min(L.out, o0 + L.rows_per_block);
  const C* a = static_cast<const C*>(L.a);
  const C* b = static_cast<const C*>(L.b);
  const F* f = static_cast<const F*>(L.fisher);
  C* part = write_grad ? static_cast<C*>(L.part) + block * r * in : nullptr;
  std::vector<C> at(static_cast<size_t>(r * kEdwTile));             // A[:, tile], zero padded
  std::vector<C> gb(write_grad ? static_cast<size_t>((o1 - o0) * r) : 0, C(0));
  alignas(64) C d[kEdwTile];
  alignas(64) C g[kEdwTile];
  alignas(64) C term[kEdwTile];
  if (write_grad) std::fill(part, part + r * in, C(0));
  double sum = 0.0;
  for (int64_t j0 = 0; j0 < in; j0 += kEdwTile) {
    const int64_t n = std::min(kEdwTile, in - j0);
    const int64_t np = ceil_div(n, kEdwLanes) * kEdwLanes;
    for (int64_t k = 0; k < r; ++k) {
      C* row = at.data() + k * kEdwTile;
      std::copy(a + k * in + j0, a + k * in + j0 + n, row);
      std::fill(row + n, row + np, C(0));
    }
    for (int64_t o = o0; o < o1; ++o) {
      const C* bo = b + o * r;
      const F* fo = f + o * in + j0;
      edw_row_product<C>(bo, at.data(), kEdwTile, r, np, d);
      for (int64_t j = 0; j < n; ++j) {
        g[j] = edw_g<C>(fo[j], d[j]);
        term[j] = edw_term(g[j], d[j]);
      }
      for (int64_t j = n; j < np; ++j) g[j] = term[j] = C(0);
      sum += static_cast<double>(edw_lane_sum<C>(term, np));
      if (write_grad) {
        C* gbo = gb.data() + (o - o0) * r;
        for (int64_t k = 0; k < r; ++k) {
          gbo[k] = fk_add(gbo[k], edw_lane_dot<C>(g, at.data() + k * kEdwTile, np));
          edw_axpy<C>(bo[k], g, n, part + k * in + j0);
        }
      }
    }
  }
  if (write_grad) {
    S* gout = static_cast<S*>(L.grad_b);
    const C coef = static_cast<C>(L.coef);
    for (int64_t o = o0; o < o1; ++o) {
      for (int64_t k = 0; k < r; ++k) {
        gout[o * r + k] = edw_grad_add<C>(gout[o * r + k], gb[(o - o0) * r + k], coef);
      }
    }
  }
  return sum;
}

// The same kernel compiled once per instruction set.
template <typename C, typename F, typename S>
double edw_item_baseline(const EdwLayer& L, int64_t block, bool write_grad) {
  return edw_item<IsaBaseline, C, F, S>(L, block, write_grad);
}
#if FK_CPU_X86
template <typename C, typename F, typename S>
FK_TARGET_AVX2 double edw_item_avx2(const EdwLayer& L, int64_t block, bool write_grad) {
  return edw_item<IsaAvx2, C, F, S>(L, block, write_grad);
}
template <typename C, typename F, typename S>
FK_TARGET_AVX512 double edw_item_avx512(const EdwLayer& L, int64_t block, bool write_grad) {
  return edw_item<IsaAvx512, C, F, S>(L, block, write_grad);
}
#endif

EdwItemFn pick_item(CpuIsa isa, c10::ScalarType factor, c10::ScalarType fisher) {
  EdwItemFn fn = nullptr;
  dispatch_float(factor, "ewc_delta_w: lora_a", [&](auto s) {
    dispatch_float(fisher, "ewc_delta_w: fishers", [&](auto f) {
      using S = decltype(s);
      using F = decltype(f);
      using C = typename ComputeOf<S>::type;
      fn = FK_ISA_PICK(isa, edw_item, C, F, S);
    });
  });
  return fn;
}

// grads_a[k, j] (elements [begin, end) of r x in) += coef * sum over the layer's row blocks, in block order.
template <typename C, typename S>
void edw_reduce_a(const EdwLayer& L, S* grad_a, int64_t begin, int64_t end) {
  const C* part = static_cast<const C*>(L.part);
  const int64_t stride = L.r * L.in;
  const C coef = static_cast<C>(L.coef);
  for (int64_t e = begin; e < end; ++e) {
    C acc = part[e];
    for (int64_t blk = 1; blk < L.nblocks; ++blk) acc = fk_add(acc, part[blk * stride + e]);
    grad_a[e] = edw_grad_add<C>(grad_a[e], acc, coef);
  }
}

using EdwReduceFn = void (*)(const EdwLayer& L, void* grad_a, int64_t begin, int64_t end);

template <typename S>
void edw_reduce_a_erased(const EdwLayer& L, void* grad_a, int64_t begin, int64_t end) {
  edw_reduce_a<typename ComputeOf<S>::type, S>(L, static_cast<S*>(grad_a), begin, end);
}

EdwReduceFn pick_reduce(c10::ScalarType factor) {
  EdwReduceFn fn = nullptr;
  dispatch_float(factor, "ewc_delta_w: lora_a", [&](auto s) { fn = &edw_reduce_a_erased<decltype(s)>; });
  return fn;
}

at::Tensor ewc_delta_w_cpu(at::TensorList lora_a, at::TensorList lora_b, at::TensorList fishers,
                           c10::ArrayRef<double> scaling, double lam, at::TensorList grads_a, at::TensorList grads_b,
                           bool write_grad) {
  static const char* op = "forgetkern_cpu::ewc_delta_w";
  const size_t n = lora_a.size();
  TORCH_CHECK(lora_b.size() == n && fishers.size() == n && scaling.size() == n, op,
              ": lora_a, lora_b, fishers and scaling must have the same length");
  if (write_grad) {
    TORCH_CHECK(grads_a.size() == n && grads_b.size() == n, op, ": grads_a and grads_b must have ", n, " tensors");
  }
  const CpuIsa isa = active_cpu_isa();
  bool any_double = false;
  std::vector<EdwLayer> layers;
  std::vector<EdwItemFn> item_fns;
  std::vector<EdwReduceFn> reduce_fns;
  std::vector<void*> grad_a_ptrs;
  std::vector<at::Tensor> keep;  // converted factors, alive until the end of the call
  layers.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& a = lora_a[i];
    const at::Tensor& b = lora_b[i];
    const at::Tensor& f = fishers[i];
    TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && f.dim() == 2, op, ": layer ", i, ": expected 2-D tensors");
    TORCH_CHECK(b.size(1) == a.size(0) && f.size(0) == b.size(0) && f.size(1) == a.size(1), op, ": layer ", i,
                ": shapes do not chain: B ", b.sizes(), ", A ", a.sizes(), ", F ", f.sizes());
    TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu() && f.device().is_cpu(), op, ": layer ", i,
                ": CPU tensors expected");
    TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": layer ", i, ": lora_a and lora_b dtypes differ");
    TORCH_CHECK(f.is_contiguous(), op, ": fishers[", i, "] must be contiguous");
    if (write_grad) {
      TORCH_CHECK(grads_a[i].sizes() == a.sizes() && grads_a[i].scalar_type() == a.scalar_type() &&
                      grads_a[i].is_contiguous() && grads_a[i].device().is_cpu(),
                  op, ": grads_a[", i, "] must be a contiguous CPU tensor shaped and typed like lora_a[", i, "]");
      TORCH_CHECK(grads_b[i].sizes() == b.sizes() && grads_b[i].scalar_type() == b.scalar_type() &&
                      grads_b[i].is_contiguous() && grads_b[i].device().is_cpu(),
                  op, ": grads_b[", i, "] must be a contiguous CPU tensor shaped and typed like lora_b[", i, "]");
    }
    const bool dbl = a.scalar_type() == at::kDouble;
    any_double = any_double || dbl;
    const int64_t out = b.size(0), in = a.size(1), r = a.size(0);
    if (out == 0 || in == 0 || r == 0) continue;  // B A = 0: no penalty, zero gradients (nothing to add)
    const auto ct = dbl ? at::kDouble : at::kFloat;
    keep.push_back(a.to(ct).contiguous());
    keep.push_back(b.to(ct).contiguous());
    EdwLayer L{};
    L.fisher = f.data_ptr();
    L.a = keep[keep.size() - 2].data_ptr();
    L.b = keep.back().data_ptr();
    L.grad_b = write_grad ? grads_b[i].data_ptr() : nullptr;
    L.out = out;
    L.in = in;
    L.r = r;
    L.nblocks = std::min(kEdwMaxBlocks, ceil_div(out, kEdwRowsMin));
    L.rows_per_block = ceil_div(out, L.nblocks);
    L.nblocks = ceil_div(out, L.rows_per_block);
    L.s2 = scaling[i] * scaling[i];
    L.coef = L.s2 * lam;
    layers.push_back(L);
    item_fns.push_back(pick_item(isa, a.scalar_type(), f.scalar_type()));
    reduce_fns.push_back(pick_reduce(a.scalar_type()));
    grad_a_ptrs.push_back(write_grad ? grads_a[i].data_ptr() : nullptr);
  }
  double total = 0.0;
  const int64_t nl = static_cast<int64_t>(layers.size());
  for (int64_t l0 = 0; l0 < nl;) {
    // a wave: consecutive layers whose gA partials fit kEdwWaveBytes (at least one layer)
    int64_t l1 = l0;
    int64_t bytes = 0;
    std::vector<int64_t> offsets;
    while (l1 < nl) {
      const EdwLayer& L = layers[l1];
      const int64_t esize = keep[2 * l1].element_size();
      const int64_t need = write_grad ? L.nblocks * L.r * L.in * esize : 0;
      if (l1 > l0 && bytes + need > kEdwWaveBytes) break;
      offsets.push_back(bytes);
      bytes += ceil_div(need, 64) * 64;  // each layer's partials 64-byte aligned
      ++l1;
    }
    at::Tensor ws = at::empty({std::max<int64_t>(bytes, 1)}, at::TensorOptions().dtype(at::kByte));
    std::vector<EdwItem> items;
    for (int64_t l = l0; l < l1; ++l) {
      layers[l].part = write_grad ? static_cast<void*>(ws.data_ptr<uint8_t>() + offsets[l - l0]) : nullptr;
      for (int64_t blk = 0; blk < layers[l].nblocks; ++blk) items.push_back(EdwItem{l, blk});
    }
    const int64_t nitems = static_cast<int64_t>(items.size());
    std::vector<double> partial(items.size());
#pragma omp parallel for schedule(dynamic) if (nitems > 1)
    for (int64_t it = 0; it < nitems; ++it) {
      const EdwItem& item = items[it];
      partial[it] = item_fns[item.layer](layers[item.layer], item.block, write_grad);
    }
    for (int64_t it = 0; it < nitems; ++it) {  // item order: deterministic
      total += partial[it] * layers[items[it].layer].s2;
    }
    if (write_grad) {
      // gA: chunks of every layer's r x in, each reduced over the layer's blocks in block order
      std::vector<Chunk> chunks;
      for (int64_t l = l0; l < l1; ++l) {
        const int64_t numel = layers[l].r * layers[l].in;
        for (int64_t e = 0; e < numel; e += kCpuChunk) chunks.push_back(Chunk{l, e, std::min(numel, e + kCpuChunk)});
      }
      const int64_t nchunks = static_cast<int64_t>(chunks.size());
#pragma omp parallel for schedule(dynamic) if (nchunks > 1)
      for (int64_t c = 0; c < nchunks; ++c) {
        const Chunk& ch = chunks[c];
        reduce_fns[ch.tensor](layers[ch.tensor], grad_a_ptrs[ch.tensor], ch.begin, ch.end);
      }
    }
    l0 = l1;
  }
  at::Tensor out = at::empty({}, at::TensorOptions().dtype(any_double ? at::kDouble : at::kFloat).device(at::kCPU));
  if (any_double) {
    *out.data_ptr<double>() = edw_finalize<double>(total, lam);
  } else {
    *out.data_ptr<float>() = edw_finalize<float>(total, lam);
  }
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace forgetkern

TORCH_LIBRARY_FRAGMENT(forgetkern_cpu, m) {
  m.def(
      "ewc_delta_w(Tensor[] lora_a, Tensor[] lora_b, Tensor[] fishers, float[] scaling, float lam, "
      "Tensor(a!)[] grads_a, Tensor(b!)[] grads_b, bool write_grad) -> Tensor");
}

TORCH_LIBRARY_IMPL(forgetkern_cpu, CPU, m) {
  m.impl("ewc_delta_w", &forgetkern::cpu::ewc_delta_w_cpu);
}
