// Launcher ABI of the CUDA adamw_ewc_ kernels (no torch headers; shared by adamw_ewc.cu and its glue).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "forgetkern/adamw_ewc.h"
#include "forgetkern/common.h"

namespace forgetkern {
namespace cuda {

// Workspace slots (doubles) adamw_ewc_ needs for tensors of these sizes (one per chunk of every tensor).
int64_t adamw_ewc_workspace_slots(int64_t n, const int64_t* numels);

// One dtype group: lists[0..6] = params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs (null entries without
// amsgrad), anchors, fishers (null entries without EWC). Penalty partials of the blocks go to
// workspace[workspace_offset ...] when ewc.
cudaError_t adamw_ewc_launch(int64_t n, void* const* const* lists, const int64_t* numels, DType param_dtype,
                             DType state_dtype, bool ewc, bool amsgrad, const AdamwCoefficients& coef,
                             double* workspace, int64_t workspace_offset, cudaStream_t stream);

// out = R(sum of the slots in a fixed order) * R(lam / 2) (R: float32, or float64 when out_double).
cudaError_t adamw_ewc_finalize_launch(const double* workspace, int64_t slots, double lam, void* out,
                                      bool out_double, cudaStream_t stream);

}  // namespace cuda
}  // namespace forgetkern
