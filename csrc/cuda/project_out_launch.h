// Host launcher of the CUDA project_out_ kernel (csrc/cuda/project_out.cu, called by csrc/cuda/project_out.cpp).
// Plain C++ (no torch types), the conventions of launchers.h.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "forgetkern/common.h"
#include "forgetkern/project_out.h"

namespace forgetkern {
namespace cuda {

// One (X dtype, U dtype) group of project_out_ (float32 / float16 / bfloat16 each): layers[0 .. n) with the Y
// views of csrc/include/forgetkern/project_out.h; layers with an empty Y or k = 0 are skipped, k > kProjMaxK is
// cudaErrorInvalidValue. One launch per kProjMaxLayers layers, on `stream`, asynchronous.
cudaError_t project_out_launch(int64_t n, const ProjLayer* layers, DType x_dtype, DType u_dtype,
                               cudaStream_t stream);

}  // namespace cuda
}  // namespace forgetkern
