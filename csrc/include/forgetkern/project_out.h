// Shared definitions of the low-rank projection project_out_ (CUDA kernels and their torch glue; no torch
// headers).
//
// Per layer, both sides are one computation on the view Y (L x n) of X whose rows are indexed by the basis'
// rows (the basis U is L x k, any strides):
//   side="left":  X (L x n),  Y = X,    strides (n, 1)     X <- X - U (U^T X)
//   side="right": X (n x L),  Y = X^T,  strides (1, L)     X <- X - (X V) V^T  ==  Y <- Y - V (V^T Y)
// Columns of Y are independent: C = U^T Y (k x n) column j needs only Y column j, so one CUDA block owns
// (layer, kProjTileN columns of Y) and needs no other block (no cross-block reduction at all). The math runs in
// float32 for float32 / float16 / bfloat16 storage (fp32 accumulation), the result is rounded once to X's
// dtype. float64 layers and layers with k > kProjMaxK are not handled by the CUDA kernel (the op routes them).
#pragma once

#include <cstdint>

#include "forgetkern/common.h"

namespace forgetkern {

constexpr int kProjMaxK = 128;   // basis columns the kernel keeps in shared memory (C = U^T Y: k x kProjTileN)
constexpr int kProjTileN = 32;   // columns of Y per block
constexpr int kProjTileL = 32;   // rows of Y (and U) per shared-memory slab
constexpr int kProjThreads = 256;
constexpr int kProjMaxLayers = 64;  // layers per launch (the table travels in the kernel arguments)

// One layer as the glue describes it (plain values: built on the host, copied into the kernel arguments).
struct ProjLayer {
  void* x;
  const void* u;
  int32_t L, n, k;      // Y is L x n, U is L x k
  int32_t s_l, s_n;     // strides of Y (elements)
  int32_t s_ul, s_uk;   // strides of U (elements)
};

// The Y view of a contiguous X of shape (rows x cols) for a side (left: Y = X; right: Y = X^T).
FK_HD inline void proj_view(bool left, int32_t rows, int32_t cols, int32_t* L, int32_t* n, int32_t* s_l,
                            int32_t* s_n) {
  if (left) {
    *L = rows; *n = cols; *s_l = cols; *s_n = 1;
  } else {
    *L = cols; *n = rows; *s_l = 1; *s_n = cols;
  }
}

FK_HD constexpr int32_t proj_tiles(int32_t n) { return (n + kProjTileN - 1) / kProjTileN; }

}  // namespace forgetkern
