// linear_persample_sq_grad_: per-element math shared by the CUDA kernels and host code, plus the launcher ABI.
// No torch headers (included by .cu files compiled by nvcc alone).
//
// For x [N, T, in], g [N, T, out] (token t of sample n counted where mask[n, t] != 0):
//   sample:  F += scale * sum_n drop_nonfinite( G_n * G_n ),   G_n = sum_t g_nt x_nt^T          [out, in]
//   token:   F += scale * sum_n drop_nonfinite( S_n ),         S_n = sum_t (g_nt * g_nt)(x_nt * x_nt)^T
// in float32 (16-bit inputs upcast before any product). An element of a sample's contribution that is inf/nan
// is dropped and sets *found = 1.0f; so does an element whose stored update overflows (it keeps its old value). With `splits` > 1 the samples are split over the grid's y dimension into
// fp32 partials workspace[s][out][in], summed in a fixed order by the finish kernel (deterministic).
#pragma once

#include <cstdint>

#include "forgetkern/common.h"

namespace forgetkern {

// Contribution of one sample's accumulated tile element: G^2 (sample) or S itself (token: already squared).
FK_INLINE float psg_contribution(float acc, bool token) { return token ? acc : fk_mul(acc, acc); }

// acc_f += c when c is finite; returns false (and leaves acc_f) when c is inf or nan.
FK_INLINE bool psg_accumulate(float& acc_f, float c) {
  if (!is_finite(c)) return false;
  acc_f = fk_add(acc_f, c);
  return true;
}

// The state update of one element: F + scale * sum (float32 math, rounded once by the caller's store).
FK_INLINE float psg_update(float f_old, float sum, float scale) { return fk_add(f_old, fk_mul(sum, scale)); }

// The stored update: F + scale * sum rounded once to F's type. A sum of finite contributions can still
// overflow (here, or in the add, or in the bf16 store): then F keeps its old value and `ok` becomes false.
template <typename F>
FK_INLINE F psg_store(F f_old, float sum, float scale, bool& ok) {
  const F u = Store<F>::from(psg_update(to_float(f_old), sum, scale));
  const bool fin = is_finite(to_float(u));
  ok = ok && fin;
  return fin ? u : f_old;
}

// Sample splits for a tile grid of `tiles` blocks on a GPU with `sms` multiprocessors: enough blocks to fill
// it twice, with an fp32 workspace of at most max(2x the state size, 16 MiB).
inline int64_t psg_num_splits(int64_t n, int64_t tiles, int64_t numel, int64_t sms) {
  const int64_t target = 2 * sms;
  if (n <= 1 || tiles >= target) return 1;
  const int64_t by_mem = (int64_t{16} << 20) / (numel * 4 > 0 ? numel * 4 : 1);
  const int64_t cap = by_mem > 2 ? by_mem : 2;
  int64_t s = (target + tiles - 1) / tiles;
  if (s > n) s = n;
  if (s > cap) s = cap;
  return s < 1 ? 1 : s;
}

// ---- launcher ABI ----------------------------------------------------------------------------------------
struct PsgArgs {
  void* fisher = nullptr;          // [out, in] contiguous, DType Float32 or BFloat16
  DType fisher_dtype = DType::Float32;
  const void* x = nullptr;         // [N, T, in], feature stride 1
  const void* g = nullptr;         // [N, T, out], feature stride 1
  DType in_dtype = DType::Float32; // of x and g: Float32, Float16 or BFloat16
  const uint8_t* mask = nullptr;   // [N, T] (row stride mask_sn), nonzero = token counts; null: all count
  int64_t mask_sn = 0;
  int64_t n = 0, t = 0, d_out = 0, d_in = 0;
  int64_t x_sn = 0, x_st = 0, g_sn = 0, g_st = 0;  // element strides of samples and tokens
  float scale = 1.0f;
  bool token = false;
  int64_t splits = 1;              // > 1: workspace holds splits * out * in floats
  float* workspace = nullptr;
  float* found = nullptr;          // device float, zeroed by the caller
};

// Tile sizes of the kernels (one block per BM x BN tile of F).
constexpr int kPsgBM = 64;
constexpr int kPsgBN = 64;

// Splits the launcher will use on the current device for these sizes (queries the multiprocessor count).
int64_t psg_plan_splits(int64_t n, int64_t d_out, int64_t d_in);

// Launches the kernel(s) on `stream` (a cudaStream_t). Returns 0 on success, else a cudaError_t value.
int psg_launch(const PsgArgs& a, void* stream);

}  // namespace forgetkern
