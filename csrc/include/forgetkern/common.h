// Shared scalar helpers for the CPU (C++) and CUDA kernels. No torch headers: this file is included by .cu
// sources compiled by nvcc alone.
//
// * FK_HD marks functions callable from host and device code.
// * Storage types: float, double, fk_half (IEEE binary16 bits), fk_bf16 (bfloat16 bits).
// * Conversions to/from the 16-bit formats are done on the bits, identically on host and device:
//   half/bf16 -> float is exact (a signalling half NaN becomes a quiet float NaN); float -> half/bf16 rounds
//   to nearest, ties to even (RNE). Both directions equal c10::Half / c10::BFloat16 bit for bit on all inputs
//   (checked exhaustively over the 2^32 floats). NaN -> half 0x7E00 | sign, bf16 0x7FC0 (sign dropped, as c10).
//   The CPU kernels for AVX2 / AVX-512 convert fp16 runs with F16C instructions instead, with the same results
//   (csrc/cpu/isa_tile.h).
// * fk_add / fk_mul are single IEEE operations that are never fused into an FMA (device: __fadd_rn etc.;
//   host: the build passes -ffp-contract=off), so the CPU, the CUDA kernels and the PyTorch reference (which
//   evaluates one op at a time) round the same intermediate values.
#pragma once

#include <cstdint>
#if !defined(__CUDA_ARCH__)
#include <cstring>
#endif

#if defined(__CUDACC__)
#define FK_HD __host__ __device__
#define FK_INLINE __host__ __device__ __forceinline__
#else
#define FK_HD
#define FK_INLINE inline __attribute__((always_inline))
#endif

namespace forgetkern {

// Element types the kernels know. The numeric values are part of the launcher ABI (glue <-> .cu).
enum class DType : int32_t { Float32 = 0, Float16 = 1, BFloat16 = 2, Float64 = 3 };

struct alignas(2) fk_half { uint16_t x; };
struct alignas(2) fk_bf16 { uint16_t x; };

// ---- bit casts -------------------------------------------------------------------------------------------
FK_INLINE uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

FK_INLINE float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

FK_INLINE uint64_t double_bits(double d) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint64_t>(__double_as_longlong(d));
#else
  uint64_t u;
  std::memcpy(&u, &d, sizeof(u));
  return u;
#endif
}

// ---- classification ----------------------------------------------------------------------------------------
// Finite = exponent field not all ones. Bitwise, so it is exact under any floating-point mode.
FK_INLINE bool is_finite(float f) { return (float_bits(f) & 0x7F800000u) != 0x7F800000u; }
FK_INLINE bool is_finite(double d) {  // the exponent lives in the high word (32-bit ops vectorise on SSE2)
  return (static_cast<uint32_t>(double_bits(d) >> 32) & 0x7FF00000u) != 0x7FF00000u;
}

// ---- unfused arithmetic ------------------------------------------------------------------------------------
FK_INLINE float fk_add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
FK_INLINE float fk_sub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
FK_INLINE float fk_mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
FK_INLINE double fk_add(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
FK_INLINE double fk_sub(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}
FK_INLINE double fk_mul(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

// ---- 16-bit formats <-> float ------------------------------------------------------------------------------
FK_INLINE float bf16_bits_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

FK_INLINE uint16_t float_to_bf16_bits(float f) {
  const uint32_t u = float_bits(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;  // RNE on the dropped 16 bits
  const bool nan = static_cast<int32_t>(u & 0x7FFFFFFFu) > 0x7F800000;  // signed compare: vectorises on SSE2
  return static_cast<uint16_t>(nan ? 0x7FC0u : rounded);
}

// binary16 -> binary32, exact. Subnormal halves are renormalised by one exact float subtraction of two normal
// numbers (no float denormals involved, so flush-to-zero modes cannot change the result).
FK_INLINE float half_bits_to_float(uint16_t h) {
  const uint32_t shifted_exp = 0x7C00u << 13;
  uint32_t o = (static_cast<uint32_t>(h) & 0x7FFFu) << 13;
  const uint32_t exp = o & shifted_exp;
  o += (127u - 15u) << 23;  // rebias the exponent
  if (exp == shifted_exp) {
    o += (128u - 16u) << 23;  // inf / nan: exponent all ones, payload kept, NaN made quiet (as c10)
    o |= (o & 0x007FFFFFu) != 0 ? 0x00400000u : 0u;
  } else if (exp == 0) {
    o += 1u << 23;  // subnormal: value = 2^-14 * (1 + m / 2^10) - 2^-14
    o = float_bits(fk_sub(bits_float(o), bits_float(113u << 23)));
  }
  return bits_float(o | ((static_cast<uint32_t>(h) & 0x8000u) << 16));
}

// binary32 -> binary16, round to nearest even; overflow -> inf; NaN -> 0x7E00 (quiet) with the sign.
// Branch-free (the three candidates are computed and selected, so CPU loops vectorise):
// * |f| >= 2^16: inf or nan (values in [65520, 2^16) reach inf through the normal case's rounding carry);
// * |f| < 2^-14: the result is a half subnormal or zero, rounded by one float addition of a magic constant
//   (hardware RNE; a float-denormal input is below half the smallest half subnormal, so flushing it gives the
//   same 0);
// * otherwise a normal half: rebias the exponent and round the 13 dropped mantissa bits to nearest even.
FK_INLINE uint16_t float_to_half_bits(float f) {
  const uint32_t u = float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7FFFFFFFu;
  const int32_t as = static_cast<int32_t>(a);  // non-negative: signed compares are exact (and vectorise)
  const uint32_t special = as > 0x7F800000 ? 0x7E00u : 0x7C00u;
  const float magic = bits_float(((127u - 15u) + (23u - 10u) + 1u) << 23);  // 0.5
  const uint32_t subnormal = float_bits(fk_add(bits_float(a), magic)) - float_bits(magic);
  const uint32_t normal = (a + (static_cast<uint32_t>(15 - 127) << 23) + 0xFFFu + ((a >> 13) & 1u)) >> 13;
  const uint32_t o = as >= static_cast<int32_t>((127u + 16u) << 23) ? special
                     : as < static_cast<int32_t>(113u << 23)         ? subnormal
                                                                     : normal;
  return static_cast<uint16_t>(o | sign);
}

// ---- typed load / store -----------------------------------------------------------------------------------
// load_as<C>(storage value) -> compute type C (float or double); Store<S>::from(C) rounds once to storage S.
FK_INLINE float to_float(float v) { return v; }
FK_INLINE float to_float(double v) { return static_cast<float>(v); }
FK_INLINE float to_float(fk_half v) { return half_bits_to_float(v.x); }
FK_INLINE float to_float(fk_bf16 v) { return bf16_bits_to_float(v.x); }
FK_INLINE double to_double(float v) { return static_cast<double>(v); }
FK_INLINE double to_double(double v) { return v; }
FK_INLINE double to_double(fk_half v) { return static_cast<double>(half_bits_to_float(v.x)); }
FK_INLINE double to_double(fk_bf16 v) { return static_cast<double>(bf16_bits_to_float(v.x)); }

template <typename C> struct Loader;
template <> struct Loader<float> {
  template <typename S> FK_INLINE static float load(S v) { return to_float(v); }
};
template <> struct Loader<double> {
  template <typename S> FK_INLINE static double load(S v) { return to_double(v); }
};
template <typename C, typename S> FK_INLINE C load_as(S v) { return Loader<C>::load(v); }

template <typename S> struct Store;
template <> struct Store<float> {
  FK_INLINE static float from(float v) { return v; }
  FK_INLINE static float from(double v) { return static_cast<float>(v); }
};
template <> struct Store<double> {
  FK_INLINE static double from(float v) { return static_cast<double>(v); }
  FK_INLINE static double from(double v) { return v; }
};
// The ops never round double results to 16 bits (double math implies float64 storage); the double overloads
// below exist for completeness and round twice (double -> float -> 16 bits).
template <> struct Store<fk_half> {
  FK_INLINE static fk_half from(float v) { return fk_half{float_to_half_bits(v)}; }
  FK_INLINE static fk_half from(double v) { return from(static_cast<float>(v)); }
};
template <> struct Store<fk_bf16> {
  FK_INLINE static fk_bf16 from(float v) { return fk_bf16{float_to_bf16_bits(v)}; }
  FK_INLINE static fk_bf16 from(double v) { return from(static_cast<float>(v)); }
};

// Compute type of an op whose "leading" tensor has storage S: double for float64, float otherwise.
template <typename S> struct ComputeOf { using type = float; };
template <> struct ComputeOf<double> { using type = double; };

FK_INLINE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace forgetkern
