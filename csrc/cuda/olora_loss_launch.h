// Host launchers of the CUDA olora_loss kernels (csrc/cuda/olora_loss.cu, called by csrc/cuda/olora_loss.cpp).
// Plain C++ (no torch types), the conventions of launchers.h; dtypes float32 / float16 / bfloat16.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "forgetkern/common.h"
#include "forgetkern/olora_loss.h"

namespace forgetkern {
namespace cuda {

// Workspace slots (doubles) the forward of these layers needs (one per P tile; layers with p or r = 0: none).
int64_t olora_workspace_slots(int64_t n, const OloraLayer* layers);

// One (past dtype, cur dtype) group of the forward: tile sums to workspace[workspace_offset ...] (the caller
// advances the offset by olora_workspace_slots() per group). `norm` is an OloraNorm.
cudaError_t olora_forward_launch(int64_t n, const OloraLayer* layers, DType past_dtype, DType cur_dtype, int norm,
                                 double* workspace, int64_t workspace_offset, cudaStream_t stream);

// Sums workspace[0 .. slots) in a fixed order into *out (a float32 scalar on the device). slots may be 0.
cudaError_t olora_finalize_launch(const double* workspace, int64_t slots, float* out, cudaStream_t stream);

// One group of the backward: S = olora_seed(P, *grad_out) into scratch[layer.s_off ...] for the layers with
// p, r > 0, then layer.grad = S^T A_past (in cur's dtype; zeros where p = 0).
cudaError_t olora_backward_launch(int64_t n, const OloraLayer* layers, DType past_dtype, DType cur_dtype,
                                  int norm, const float* grad_out, float* scratch, cudaStream_t stream);

}  // namespace cuda
}  // namespace forgetkern
