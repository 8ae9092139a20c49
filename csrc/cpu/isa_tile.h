// Per-ISA pieces of the CPU element loops: ISA tags, fp16 <-> fp32 conversion of runs with F16C / AVX-512, the
// staging of fp16 operands through fp32 tiles, and a lane-ordered sum. No torch headers.
//
// * Tags IsaBaseline / IsaAvx2 / IsaAvx512 are template arguments of the chunk kernels; each ISA's kernels are
//   instantiated inside functions marked with its target attribute (cpu_isa.h).
// * fp16 operands: the bit-level conversions of common.h (half_bits_to_float, float_to_half_bits) take a dozen
//   integer operations per element, so under avx2 / avx512 a chunk is processed in tiles of kTile elements and
//   each fp16 operand is converted to an fp32 tile with vcvtph2ps (results written back with vcvtps2ph, round
//   to nearest even, NaN -> 0x7E00 | sign). Both directions equal common.h bit for bit (half -> float is
//   exact; the rounding and NaN rules are the same), so the element math sees the same values. bf16 needs no
//   staging: its conversions are integer shifts, adds and selects that vectorise as written.
// * lane_sum: the sum of a tile in kLanes interleaved partial sums, added pairwise at the end; the order is
//   fixed by the code, not by the vector width the compiler picked, so every ISA gives the same bits.
#pragma once

#include <cstdint>
#include <type_traits>

#include "cpu_isa.h"
#include "forgetkern/common.h"

#if FK_CPU_X86
#include <immintrin.h>
#endif

namespace forgetkern {
namespace cpu {

constexpr int64_t kTile = 1024;  // elements per staged tile (and per float partial sum of a penalty)
constexpr int64_t kLanes = 16;   // interleaved partial sums of lane_sum
static_assert(kTile % kLanes == 0, "a tile holds whole lane groups");

struct IsaBaseline {
  static constexpr bool kHalfVec = false;  // fp16 converted element by element (common.h)
};

#if FK_CPU_X86
struct IsaAvx2 {
  static constexpr bool kHalfVec = true;

  FK_TARGET_AVX2 static void half_to_float(const fk_half* in, float* out, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i));
      _mm256_storeu_ps(out + i, _mm256_cvtph_ps(h));
    }
    for (; i < n; ++i) out[i] = half_bits_to_float(in[i].x);
  }

  FK_TARGET_AVX2 static void float_to_half(const float* in, fk_half* out, int64_t n) {
    const __m256 sign = _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(0x80000000u)));
    const __m256 qnan = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC00000));
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      __m256 x = _mm256_loadu_ps(in + i);
      // NaN -> quiet NaN without payload, sign kept: converts to 0x7E00 | sign
      const __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
      x = _mm256_blendv_ps(x, _mm256_or_ps(_mm256_and_ps(x, sign), qnan), nan);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
    }
    for (; i < n; ++i) out[i].x = float_to_half_bits(in[i]);
  }
};

struct IsaAvx512 {
  static constexpr bool kHalfVec = true;

  // 16 elements per step; the last step is masked.
  FK_TARGET_AVX512 static __mmask16 mask(int64_t left) {
    return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
  }

  FK_TARGET_AVX512 static void half_to_float(const fk_half* in, float* out, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 m = mask(n - i);
      const __m256i h = _mm256_maskz_loadu_epi16(m, in + i);
      _mm512_mask_storeu_ps(out + i, m, _mm512_maskz_cvtph_ps(m, h));
    }
  }

  FK_TARGET_AVX512 static void float_to_half(const float* in, fk_half* out, int64_t n) {
    const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
    const __m512i qnan = _mm512_set1_epi32(0x7FC00000);
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 m = mask(n - i);
      __m512 x = _mm512_maskz_loadu_ps(m, in + i);
      const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
      const __m512i quiet = _mm512_or_si512(_mm512_and_si512(_mm512_castps_si512(x), sign), qnan);
      x = _mm512_mask_blend_ps(nan, x, _mm512_castsi512_ps(quiet));
      _mm256_mask_storeu_epi16(out + i, m, _mm512_maskz_cvtps_ph(m, x, _MM_FROUND_TO_NEAREST_INT));
    }
  }
};
#endif

// The type the element loop reads for storage type S: fp32 for fp16 when the ISA converts runs, else S.
template <typename Isa, typename S>
using Staged = std::conditional_t<Isa::kHalfVec && std::is_same_v<S, fk_half>, float, S>;

// One operand of a tile: a pointer into the tensor, or (fp16 under avx2/avx512) an fp32 tile converted on the
// way in (in, inout) and back on the way out (flush after out / inout).
template <typename Isa, typename S>
struct Stage {
  using T = Staged<Isa, S>;
  static constexpr bool kStaged = !std::is_same_v<T, S>;
  alignas(64) T buf[kStaged ? kTile : 1];

  FK_INLINE const T* in(const S* src, int64_t n) {
    if constexpr (kStaged) {
      Isa::half_to_float(src, buf, n);
      return buf;
    } else {
      return src;
    }
  }
  FK_INLINE T* out(S* dst) {
    if constexpr (kStaged) {
      return buf;
    } else {
      return dst;
    }
  }
  FK_INLINE T* inout(S* dst, int64_t n) {
    in(dst, n);
    return out(dst);
  }
  FK_INLINE void flush(S* dst, int64_t n) {
    if constexpr (kStaged) Isa::float_to_half(buf, dst, n);
  }
};

// x[0] + ... + x[n-1] (n <= kTile; x has room for kTile values, x[n..] is overwritten with zeros up to the
// next multiple of kLanes): lane j sums x[j], x[j + kLanes], ... in order, then the lanes are added pairwise
// (j + w into j for w = 8, 4, 2, 1). Adding +0 changes no partial sum, so the padding leaves the result as is.
template <typename C>
FK_INLINE C lane_sum(C* x, int64_t n) {
  for (int64_t i = n; i % kLanes != 0; ++i) x[i] = C(0);
  C lanes[kLanes] = {};
  for (int64_t i = 0; i < n; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) lanes[j] = fk_add(lanes[j], x[i + j]);
  }
  for (int64_t w = kLanes / 2; w > 0; w /= 2) {
    for (int64_t j = 0; j < w; ++j) lanes[j] = fk_add(lanes[j], lanes[j + w]);
  }
  return lanes[0];
}

}  // namespace cpu
}  // namespace forgetkern
