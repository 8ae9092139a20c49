// LoRA linear: math shared by the CUDA kernels (csrc/cuda/lora_linear.cu), the CPU dropout kernel
// (csrc/cpu/lora_dropout.cpp) and host code, plus the launcher ABI.
// No torch headers (included by .cu files compiled by nvcc alone).
//
// Dropout keep mask: a counter-based hash of (key, row, col), bit-identical to the PyTorch reference
// (forgetkern/reference/lora_linear.py: keep_mask) and the Triton kernels (forgetkern/triton/_dropout.py):
//   rh = mix32(key + row * 0x9E3779B9);  h = mix32(rh + col * 0x85EBCA77);  keep = (h >> 8) >= threshold
// with uint32 wrap-around arithmetic; threshold = floor(p * 2^24 + 0.5), so P(keep) = 1 - threshold / 2^24.
#pragma once

#include <cstdint>

#include "forgetkern/common.h"

namespace forgetkern {

FK_INLINE uint32_t lora_mix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x21F0AAADu;
  h ^= h >> 15;
  h *= 0x735A2D97u;
  return h ^ (h >> 15);
}

FK_INLINE uint32_t lora_row_hash(uint32_t key, uint32_t row) { return lora_mix32(key + row * 0x9E3779B9u); }

FK_INLINE uint32_t lora_elem_hash(uint32_t row_hash, uint32_t col) { return lora_mix32(row_hash + col * 0x85EBCA77u); }

FK_INLINE bool lora_keep(uint32_t row_hash, uint32_t col, int32_t threshold) {
  return static_cast<int32_t>(lora_elem_hash(row_hash, col) >> 8) >= threshold;
}

FK_INLINE int32_t lora_keep_threshold(double p) {
  const double t = p * 16777216.0 + 0.5;
  return static_cast<int32_t>(t);  // t >= 0.5: truncation is floor
}

// 1 / (1 - p) (0 for p >= 1): in double for float64 data, rounded once to float for the other dtypes (as torch
// rounds a Python-float factor for float32/float16/bfloat16 tensors).
FK_INLINE double lora_keep_scale_f64(double p) { return p >= 1.0 ? 0.0 : 1.0 / (1.0 - p); }

FK_INLINE float lora_keep_scale(double p) { return static_cast<float>(lora_keep_scale_f64(p)); }

// One dropped-out value in compute type C (float, or double for float64 data): v * scale if kept, else +0.
// A 16-bit result is v * scale rounded once to storage (+0 stays +0), as torch's (v * scale).masked_fill_(~keep, 0).
template <typename C>
FK_INLINE C lora_drop_value(bool keep, C v, C scale) {
  return keep ? fk_mul(v, scale) : C(0);
}

// Dropout applied to one GEMM operand (or to the output): element (row, col) of x is kept iff lora_keep(...).
struct LoraDrop {
  uint32_t key = 0;
  int32_t threshold = 0;   // 0: keep everything
  float scale = 1.0f;      // 1 / (1 - p) for kept elements
  int32_t enabled = 0;
};

FK_INLINE float lora_drop_apply(const LoraDrop& d, float v, uint32_t row, uint32_t col) {
  return lora_drop_value(lora_keep(lora_row_hash(d.key, row), col, d.threshold), v, d.scale);
}

// ---- launcher ABI: the rank-r kernels of the CUDA backend (csrc/cuda/lora_linear.cu) -----------------------
// The big frozen GEMMs (x W^T + b in the forward, dy W in the backward) are cuBLAS calls made by the glue
// (csrc/cuda/lora_linear.cpp, through ATen); these kernels do only the rank-r work, punica/S-LoRA style:
// "shrink" (a [M, r] product for many adapters in one launch), "expand" (a rank-r update added in place into the
// cuBLAS output) and the dropout-masked dA product. Dropout masks are regenerated from (key, row, col) inside the
// kernels, never stored. Scalings and dropout parameters travel in these structs (kernel arguments): no host to
// device copy per call. Elements are addressed as ptr + i * stride0 + j * stride1 (element strides); every
// product accumulates in fp32 and is rounded once to the storage dtype.
constexpr int kLoraMaxItems = 16;  // work items per launch (the glue launches again for more)
constexpr int kLoraShrinkRank = 64;  // a shrink item covers at most this many ranks (the glue splits larger ones)

// shrink, per item t: out[i, out_col + j] = scale * sum_c op(in)[i, c] * w(j, c)   (i < m, j < rank, c < k)
//   op(in) = drop(in) rounded to storage (as the reference rounds drop(x) before its GEMM) if drop.enabled.
//   forward xa: in = x, w = A_k (j, c) at j * K + c, scale 1, drop_k;
//   backward g: in = dy of adapter k's layer, w = B_k (j, n) at n * r + j, scale s_k, no dropout.
struct LoraShrinkItem {
  const void* in = nullptr;
  int64_t ld_in = 0, k = 0;
  const void* w = nullptr;
  int64_t w_sj = 0, w_sc = 0;
  int32_t rank = 0, out_col = 0;
  float scale = 1.0f;
  LoraDrop drop;
};

struct LoraShrink {
  int64_t m = 0;
  void* out = nullptr;
  int64_t ld_out = 0;
  int32_t n = 0;
  LoraShrinkItem item[kLoraMaxItems];
};

// expand: out[i, q] = out[i, q] + sum_t drop_t(scale_t * sum_j in[i, in_col_t + j] * w_t(j, q))   (q < qn)
//   drop_t (if enabled) on the output element (i, q): the dx term of an adapter with dropout.
//   forward y += s_k xa_k B_k^T: w = B_k (j, q) at q * r + j; backward dx += drop_k(g_k A_k): w = A_k at j * K + q.
struct LoraExpandItem {
  const void* w = nullptr;
  int64_t w_sj = 0, w_sq = 0;
  int32_t rank = 0, in_col = 0;
  float scale = 1.0f;
  LoraDrop drop;
};

struct LoraExpand {
  int64_t m = 0, q = 0;
  const void* in = nullptr;
  int64_t ld_in = 0;
  void* out = nullptr;
  int64_t ld_out = 0;
  int32_t n = 0;
  LoraExpandItem item[kLoraMaxItems];
};

// dA of an adapter with dropout, split over row ranges: ws[s, j, c] = sum_{i in rows of split s}
// g[i, g_col + j] * drop(x)[i, c] (fp32 workspace [splits, rank, k]; drop(x) rounded to storage), rows of split
// s: [s * rows_per_split, min(m, (s + 1) * rows_per_split)). The glue sums the splits in a fixed order.
struct LoraDropTGemm {
  int64_t m = 0, k = 0;
  const void* g = nullptr;
  int64_t ld_g = 0;
  int32_t g_col = 0, rank = 0;
  const void* x = nullptr;
  int64_t ld_x = 0;
  LoraDrop drop;
  float* ws = nullptr;
  int32_t splits = 1;
  int64_t rows_per_split = 0;
};

// Launch on `stream` (a cudaStream_t). Return 0 on success, else a cudaError_t value.
int lora_shrink_launch(const LoraShrink& p, DType dtype, void* stream);
int lora_expand_launch(const LoraExpand& p, DType dtype, void* stream);
int lora_drop_tgemm_launch(const LoraDropTGemm& p, DType dtype, void* stream);

}  // namespace forgetkern
