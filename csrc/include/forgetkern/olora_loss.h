// Shared definitions of the O-LoRA orthogonality loss olora_loss (CUDA kernels and their torch glue; no torch
// headers). Math (forgetkern/ops/olora_loss.py), per layer with A_past (p x K) and A (r x K), both row-major:
//
//   P    = A_past A^T                    (p x r, accumulated in float32 whatever the storage dtype)
//   loss = sum over layers and entries of olora_term(P)      |P| (l1) or P^2 (fro2)
//   dA   = S^T A_past,  S = olora_seed(P, g)                  sign(P) g (l1) or (2 P) g (fro2); g = dL/dloss
//
// CUDA: the forward is one block per (layer, kOloraTileP x kOloraTileR tile of P); it streams A_past and A
// along K in kOloraTileK slabs staged in shared memory, and either stores the tile's sum in its own workspace
// slot (summed afterwards in slot order: deterministic, no atomics) or, for the backward, the tile of S in a
// float32 scratch. The backward's second kernel is one block per (layer, kOloraTileR rows of dA, kOloraGradK
// columns): dA_tile = sum over p slabs of S^T A_past, rounded once to A's dtype (layers with p = 0 get zeros).
#pragma once

#include <cstdint>

#include "forgetkern/common.h"

namespace forgetkern {

constexpr int kOloraTileP = 32;
constexpr int kOloraTileR = 32;
constexpr int kOloraTileK = 32;
constexpr int kOloraGradK = 64;
constexpr int kOloraThreads = 256;
constexpr int kOloraMaxLayers = 64;  // layers per launch (the table travels in the kernel arguments)

enum OloraNorm : int { kOloraL1 = 0, kOloraFro2 = 1 };

struct OloraLayer {
  const void* past;  // p x K
  const void* cur;   // r x K
  void* grad;        // r x K (backward only)
  int32_t p, r, K;
  int64_t s_off;     // offset of this layer's S (p x r, row-major) in the float32 scratch (backward only)
};

FK_HD constexpr int32_t olora_ceil(int32_t a, int32_t b) { return (a + b - 1) / b; }
FK_HD constexpr int32_t olora_fwd_tiles(int32_t p, int32_t r) {
  return olora_ceil(p, kOloraTileP) * olora_ceil(r, kOloraTileR);
}
FK_HD constexpr int32_t olora_grad_tiles(int32_t r, int32_t K) {
  return olora_ceil(r, kOloraTileR) * olora_ceil(K, kOloraGradK);
}

// One entry of P: its term of the loss.
template <int NORM>
FK_INLINE float olora_term(float v) {
  return NORM == kOloraL1 ? (v < 0.0f ? -v : v) : v * v;
}

// One entry of S = dloss/dP times the incoming gradient g (the subgradient of |.| at 0 is 0).
template <int NORM>
FK_INLINE float olora_seed(float v, float g) {
  if (NORM == kOloraL1) return v > 0.0f ? g : v < 0.0f ? -g : 0.0f;
  return (2.0f * v) * g;
}

}  // namespace forgetkern
