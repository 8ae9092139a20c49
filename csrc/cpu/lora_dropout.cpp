// LoRA dropout on CPU, one row block of x at a time, in one pass (the mask: csrc/include/forgetkern/lora_linear.h):
//
//   lora_dropout(x, key, p, row0)             -> out[i, j] = keep(key, row0 + i, j) ? x[i, j] * s : 0
//   lora_dropout_add_(dst, src, key, p, row0)    dst[i, j] = dst[i, j] + (the same of src)
//
// with s = 1 / (1 - p), keep(key, row, col) = lora_keep(lora_row_hash(key, row), col, threshold(p)). Rounding is
// torch's for (v * s).masked_fill_(~keep, 0) and dst.add_(that) (forgetkern/reference/lora_linear.py, _Masker):
// x * s computed in float (double for float64) with s rounded to float, rounded once to x's dtype; the add
// computed in float (double) and rounded once again. Results are bit-identical to the reference.
//
// OpenMP over rows (blocks of at least kParallelMin elements); the column loop vectorises. The 32-bit multiplies
// of the hash have no SSE2 vector instruction (the build's x86-64 baseline), so on x86-64 the row loop is also
// compiled for AVX2 and AVX-512 and the one of active_cpu_isa() runs (cpu_isa.h: the best the CPU supports, or
// FORGETKERN_CPU_ISA).
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "cpu_isa.h"
#include "forgetkern/lora_linear.h"
#include "multi_tensor_cpu.h"

namespace forgetkern {
namespace cpu {
namespace {

constexpr int64_t kParallelMin = 1 << 15;

struct DropJob {
  const void* src;
  void* dst;
  int64_t cols;
  uint32_t key;
  uint32_t row0;  // the hash sees rows modulo 2^32
  int32_t threshold;
  double scale;
};

using RowsFn = void (*)(const DropJob& job, int64_t r_begin, int64_t r_end);

// Storage element as a plain value (float, double, or the uint16_t bits of a 16-bit format): the row loop moves
// scalars, not one-member structs, so that it vectorises.
template <typename S> struct Raw {
  using T = S;
  FK_INLINE static S wrap(T v) { return v; }
  FK_INLINE static T unwrap(S v) { return v; }
};
template <> struct Raw<fk_half> {
  using T = uint16_t;
  FK_INLINE static fk_half wrap(T v) { return fk_half{v}; }
  FK_INLINE static T unwrap(fk_half v) { return v.x; }
};
template <> struct Raw<fk_bf16> {
  using T = uint16_t;
  FK_INLINE static fk_bf16 wrap(T v) { return fk_bf16{v}; }
  FK_INLINE static T unwrap(fk_bf16 v) { return v.x; }
};

// dst[j] = drop(src[j]) for the n columns j0, j0 + 1, ... of one row (row hash rh).
template <typename S, typename T = typename Raw<S>::T, typename C = typename ComputeOf<S>::type>
FK_INLINE void drop_span(const T* __restrict__ src, T* __restrict__ dst, uint32_t j0, uint32_t n, uint32_t rh,
                         int32_t thr, C scale) {
  for (uint32_t j = 0; j < n; ++j) {
    const C v = lora_drop_value(lora_keep(rh, j0 + j, thr), load_as<C>(Raw<S>::wrap(src[j])), scale);
    dst[j] = Raw<S>::unwrap(Store<S>::from(v));
  }
}

// dst[j] = dst[j] + v[j], rounded once to storage.
template <typename S, typename T = typename Raw<S>::T, typename C = typename ComputeOf<S>::type>
FK_INLINE void add_span(T* __restrict__ dst, const T* __restrict__ v, uint32_t n) {
  for (uint32_t j = 0; j < n; ++j) {
    dst[j] = Raw<S>::unwrap(Store<S>::from(fk_add(load_as<C>(Raw<S>::wrap(dst[j])), load_as<C>(Raw<S>::wrap(v[j])))));
  }
}

// dst += drop(src) goes through a tile of drop(src) on the stack: GCC vectorises the two simple loops (drop, add)
// for every dtype, but not the fused float16 one.
constexpr uint32_t kTile = 512;

template <typename S, bool ADD>
FK_INLINE void drop_rows(const DropJob& job, int64_t r_begin, int64_t r_end) {
  using C = typename ComputeOf<S>::type;
  using T = typename Raw<S>::T;
  const C scale = static_cast<C>(job.scale);
  const uint32_t n = static_cast<uint32_t>(job.cols);
  T tile[kTile];
  for (int64_t i = r_begin; i < r_end; ++i) {
    const uint32_t rh = lora_row_hash(job.key, job.row0 + static_cast<uint32_t>(i));
    const T* src = static_cast<const T*>(job.src) + i * job.cols;
    T* dst = static_cast<T*>(job.dst) + i * job.cols;
    if (!ADD) {
      drop_span<S>(src, dst, 0, n, rh, job.threshold, scale);
      continue;
    }
    for (uint32_t j0 = 0; j0 < n; j0 += kTile) {
      const uint32_t m = n - j0 < kTile ? n - j0 : kTile;
      drop_span<S>(src + j0, tile, j0, m, rh, job.threshold, scale);
      add_span<S>(dst + j0, tile, m);
    }
  }
}

template <typename S, bool ADD>
void drop_rows_baseline(const DropJob& job, int64_t r_begin, int64_t r_end) {
  drop_rows<S, ADD>(job, r_begin, r_end);
}

#if FK_CPU_X86
template <typename S, bool ADD>
FK_TARGET_AVX2 void drop_rows_avx2(const DropJob& job, int64_t r_begin, int64_t r_end) {
  drop_rows<S, ADD>(job, r_begin, r_end);
}

template <typename S, bool ADD>
FK_TARGET_AVX512 void drop_rows_avx512(const DropJob& job, int64_t r_begin, int64_t r_end) {
  drop_rows<S, ADD>(job, r_begin, r_end);
}
#endif

template <bool ADD>
RowsFn pick_rows(c10::ScalarType dtype, const char* op) {
  RowsFn fn = nullptr;
  const CpuIsa isa = active_cpu_isa();
  dispatch_float(dtype, op, [&](auto s) { fn = FK_ISA_PICK(isa, drop_rows, decltype(s), ADD); });
  return fn;
}

void check_block(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D [rows, cols], got ", t.dim(), " dimensions; reshape to "
              "(-1, cols) first");
  const c10::ScalarType st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble, op, ": ", name,
              " has dtype ", st, "; expected float32, float16, bfloat16 or float64");
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (row-major), got strides ", t.strides(),
              "; call .contiguous() first");
  TORCH_CHECK(t.size(1) <= std::numeric_limits<int32_t>::max(), op, ": ", name, " has ", t.size(1),
              " columns, at most 2^31 - 1 are supported");
}

DropJob make_job(int64_t key, double p, int64_t row0, const char* op) {
  TORCH_CHECK(key >= 0 && key <= static_cast<int64_t>(UINT32_MAX), op, ": key must be a 32-bit key in [0, 2^32), "
              "got ", key, " (forgetkern.reference.lora_linear.dropout_keys derives them from a seed)");
  TORCH_CHECK(p >= 0.0 && p <= 1.0, op, ": p must be a dropout probability in [0, 1], got ", p);
  TORCH_CHECK(row0 >= 0, op, ": row0 (the global row index of the block's first row) must be >= 0, got ", row0);
  DropJob job{};
  job.key = static_cast<uint32_t>(key);
  job.row0 = static_cast<uint32_t>(static_cast<uint64_t>(row0));
  job.threshold = lora_keep_threshold(p);
  job.scale = lora_keep_scale_f64(p);  // drop_rows rounds it to float for non-float64 data
  return job;
}

void run(RowsFn fn, const DropJob& job, int64_t rows) {
  if (rows == 0 || job.cols == 0) return;
#pragma omp parallel for schedule(static) if (rows > 1 && rows * job.cols >= kParallelMin)
  for (int64_t i = 0; i < rows; ++i) {
    fn(job, i, i + 1);
  }
}

at::Tensor lora_dropout_cpu(const at::Tensor& x, int64_t key, double p, int64_t row0) {
  static const char* op = "forgetkern_cpu::lora_dropout";
  check_block(x, op, "x");
  DropJob job = make_job(key, p, row0, op);
  at::Tensor out = at::empty_like(x);
  job.src = x.data_ptr();
  job.dst = out.data_ptr();
  job.cols = x.size(1);
  run(pick_rows<false>(x.scalar_type(), op), job, x.size(0));
  return out;
}

void lora_dropout_add_cpu(const at::Tensor& dst, const at::Tensor& src, int64_t key, double p, int64_t row0) {
  static const char* op = "forgetkern_cpu::lora_dropout_add_";
  check_block(dst, op, "dst");
  check_block(src, op, "src");
  TORCH_CHECK(src.sizes() == dst.sizes(), op, ": src has shape ", src.sizes(), " but dst has ", dst.sizes(),
              "; they must be equal");
  TORCH_CHECK(src.scalar_type() == dst.scalar_type(), op, ": src has dtype ", src.scalar_type(), " but dst has ",
              dst.scalar_type(), "; cast src first");
  const at::MemOverlapStatus overlap = at::get_overlap_status(dst, src);
  TORCH_CHECK(overlap == at::MemOverlapStatus::No || overlap == at::MemOverlapStatus::Full, op,
              ": src and dst partially overlap in memory; pass src = dst itself or a src that shares no memory "
              "with dst (clone() it)");
  DropJob job = make_job(key, p, row0, op);
  job.src = src.data_ptr();
  job.dst = dst.data_ptr();
  job.cols = dst.size(1);
  run(pick_rows<true>(dst.scalar_type(), op), job, dst.size(0));
}

}  // namespace
}  // namespace cpu
}  // namespace forgetkern

TORCH_LIBRARY_FRAGMENT(forgetkern_cpu, m) {
  m.def("lora_dropout(Tensor x, int key, float p, int row0) -> Tensor");
  m.def("lora_dropout_add_(Tensor(a!) dst, Tensor src, int key, float p, int row0) -> ()");
}

TORCH_LIBRARY_IMPL(forgetkern_cpu, CPU, m) {
  m.impl("lora_dropout", &forgetkern::cpu::lora_dropout_cpu);
  m.impl("lora_dropout_add_", &forgetkern::cpu::lora_dropout_add_cpu);
}
