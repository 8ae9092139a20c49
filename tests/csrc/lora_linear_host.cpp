// Host versions of the CUDA LoRA launchers (csrc/include/forgetkern/lora_linear.h), for checking the torch glue
// csrc/cuda/lora_linear.cpp without a GPU: compiled together with it under -DFK_LORA_HOST_GLUE
// (tests/test_lora_linear_cuda_glue.py). Same definitions as the kernels of csrc/cuda/lora_linear.cu, element by
// element: the same operands, dropout (regenerated from the hash, drop(x) rounded to storage), fp32 accumulation,
// scaling and one rounding per output; only the order of the fp32 sums differs from the kernels' tiles.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "forgetkern/lora_linear.h"

namespace forgetkern {
namespace {

template <typename S>
float ld(const void* p, int64_t i) { return to_float(static_cast<const S*>(p)[i]); }

template <typename S>
float dropped(const LoraDrop& d, float v, int64_t row, int64_t col) {
  return to_float(Store<S>::from(lora_drop_apply(d, v, static_cast<uint32_t>(row), static_cast<uint32_t>(col))));
}

template <typename S>
void shrink(const LoraShrink& p) {
  for (int t = 0; t < p.n; ++t) {
    const LoraShrinkItem& it = p.item[t];
    for (int64_t i = 0; i < p.m; ++i)
      for (int j = 0; j < it.rank; ++j) {
        float acc = 0.0f;
        for (int64_t c = 0; c < it.k; ++c) {
          float v = ld<S>(it.in, i * it.ld_in + c);
          if (it.drop.enabled) v = dropped<S>(it.drop, v, i, c);
          acc += v * ld<S>(it.w, j * it.w_sj + c * it.w_sc);
        }
        static_cast<S*>(p.out)[i * p.ld_out + it.out_col + j] = Store<S>::from(fk_mul(acc, it.scale));
      }
  }
}

template <typename S>
void expand(const LoraExpand& p) {
  for (int64_t i = 0; i < p.m; ++i)
    for (int64_t q = 0; q < p.q; ++q) {
      float tot = 0.0f;
      for (int t = 0; t < p.n; ++t) {
        const LoraExpandItem& it = p.item[t];
        float acc = 0.0f;
        for (int j = 0; j < it.rank; ++j)
          acc += ld<S>(p.in, i * p.ld_in + it.in_col + j) * ld<S>(it.w, j * it.w_sj + q * it.w_sq);
        float c = fk_mul(acc, it.scale);
        if (it.drop.enabled) c = lora_drop_apply(it.drop, c, static_cast<uint32_t>(i), static_cast<uint32_t>(q));
        tot = fk_add(tot, c);
      }
      S* dst = static_cast<S*>(p.out) + i * p.ld_out + q;
      *dst = Store<S>::from(fk_add(to_float(*dst), tot));
    }
}

template <typename S>
void drop_tgemm(const LoraDropTGemm& p) {
  for (int s = 0; s < p.splits; ++s) {
    const int64_t r0 = s * p.rows_per_split, r1 = std::min(p.m, r0 + p.rows_per_split);
    for (int j = 0; j < p.rank; ++j)
      for (int64_t c = 0; c < p.k; ++c) {
        float acc = 0.0f;
        for (int64_t i = r0; i < r1; ++i)
          acc += ld<S>(p.g, i * p.ld_g + p.g_col + j) * dropped<S>(p.drop, ld<S>(p.x, i * p.ld_x + c), i, c);
        p.ws[(static_cast<int64_t>(s) * p.rank + j) * p.k + c] = acc;
      }
  }
}

template <template <typename> class F, typename P>
int dispatch(DType dtype, const P& p) {
  switch (dtype) {
    case DType::Float32: F<float>::run(p); return 0;
    case DType::Float16: F<fk_half>::run(p); return 0;
    case DType::BFloat16: F<fk_bf16>::run(p); return 0;
    default: return 1;
  }
}

template <typename S> struct Shrink { static void run(const LoraShrink& p) { shrink<S>(p); } };
template <typename S> struct Expand { static void run(const LoraExpand& p) { expand<S>(p); } };
template <typename S> struct DropT { static void run(const LoraDropTGemm& p) { drop_tgemm<S>(p); } };

}  // namespace

int lora_shrink_launch(const LoraShrink& p, DType dtype, void*) {
  return p.n > kLoraMaxItems ? 1 : dispatch<Shrink>(dtype, p);
}
int lora_expand_launch(const LoraExpand& p, DType dtype, void*) {
  return p.n > kLoraMaxItems ? 1 : dispatch<Expand>(dtype, p);
}
int lora_drop_tgemm_launch(const LoraDropTGemm& p, DType dtype, void*) { return dispatch<DropT>(dtype, p); }

}  // namespace forgetkern
