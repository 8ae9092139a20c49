// Torch-side helpers of the CUDA glue (.cpp only): argument checks, dtype mapping, dtype grouping.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <map>
#include <vector>

#include "forgetkern/common.h"

namespace forgetkern {
namespace cuda {

inline DType to_dtype(c10::ScalarType t, const char* op, const char* name) {
  switch (t) {
    case c10::ScalarType::Float: return DType::Float32;
    case c10::ScalarType::Half: return DType::Float16;
    case c10::ScalarType::BFloat16: return DType::BFloat16;
    case c10::ScalarType::Double: return DType::Float64;
    default: TORCH_CHECK(false, op, ": ", name, " has unsupported dtype ", t);
  }
}

// Safety net under the Python-side validation: parallel lists of contiguous tensors of equal numel, all on
// the device of ref[0].
inline void check_list(at::TensorList xs, at::TensorList ref, const char* op, const char* name) {
  TORCH_CHECK(xs.size() == ref.size(), op, ": ", name, " has ", xs.size(), " tensors, expected ", ref.size());
  for (size_t i = 0; i < xs.size(); ++i) {
    TORCH_CHECK(xs[i].is_cuda() && xs[i].device() == ref[0].device(), op, ": ", name, "[", i,
                "] must be a CUDA tensor on ", ref[0].device(), ", got ", xs[i].device());
    TORCH_CHECK(xs[i].is_contiguous(), op, ": ", name, "[", i, "] must be contiguous");
    TORCH_CHECK(xs[i].numel() == ref[i].numel(), op, ": ", name, "[", i, "] has ", xs[i].numel(),
                " elements, expected ", ref[i].numel());
  }
}

// Indices of the non-empty tensors, grouped by a dtype key; std::map keeps the group order deterministic.
template <typename Key>
using DtypeGroups = std::map<Key, std::vector<size_t>>;

// Gathers data pointers of xs at the indices of one group (T = void* or const void*).
template <typename T>
std::vector<T> gather_ptrs(at::TensorList xs, const std::vector<size_t>& idx) {
  std::vector<T> out(idx.size());
  for (size_t k = 0; k < idx.size(); ++k) out[k] = static_cast<T>(xs[idx[k]].data_ptr());
  return out;
}

inline std::vector<int64_t> gather_numels(at::TensorList xs, const std::vector<size_t>& idx) {
  std::vector<int64_t> out(idx.size());
  for (size_t k = 0; k < idx.size(); ++k) out[k] = xs[idx[k]].numel();
  return out;
}

}  // namespace cuda
}  // namespace forgetkern
