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

// ---- launcher ABI: one segmented GEMM ---------------------------------------------------------------------
// C[M, Q] = (accumulate ? C : 0) + epi( sum_s opA_s[M, K_s] @ opB_s[K_s, Q] )
// Operand element (i, k) lives at ptr + i * s0 + k * s1 (elements, any strides). Segment options:
//   a_colscale[k]: opA(i, k) * a_colscale[k] (fp32), the LoRA scaling on xa columns in the forward;
//   a_drop: dropout on opA(i, k) = x(row_base + i, k);  b_drop: on opB(k, q) = x(k, q).
// Epilogue, in fp32 on the accumulator: * out_colscale[q], + bias[q], then out_drop on (row_base + i, q),
// then + C (accumulate), rounded once to the storage dtype.
struct LoraOperand {
  const void* ptr = nullptr;
  int64_t s0 = 0, s1 = 0;
};

struct LoraSegment {
  LoraOperand a, b;
  int64_t k = 0;
  const float* a_colscale = nullptr;
  LoraDrop a_drop, b_drop;
};

constexpr int kLoraMaxSegments = 6;

struct LoraGemm {
  int64_t m = 0, q = 0;
  int32_t nseg = 0;
  LoraSegment seg[kLoraMaxSegments];
  void* c = nullptr;
  int64_t ldc = 0;
  const void* bias = nullptr;          // [Q], storage dtype
  const float* out_colscale = nullptr; // [Q]
  LoraDrop out_drop;
  int32_t accumulate = 0;
};

// Epilogue on one fp32 accumulator value (shared by the CUDA kernels and testable on the host).
FK_INLINE float lora_epilogue(float acc, float colscale, float bias, const LoraDrop& out_drop, uint32_t row,
                              uint32_t col, float old) {
  float v = fk_add(fk_mul(acc, colscale), bias);
  if (out_drop.enabled) v = lora_drop_apply(out_drop, v, row, col);
  return fk_add(v, old);
}

// Launches the GEMM on `stream` (a cudaStream_t). Returns 0 on success, else a cudaError_t value.
int lora_gemm_launch(const LoraGemm& g, DType dtype, void* stream);

}  // namespace forgetkern
