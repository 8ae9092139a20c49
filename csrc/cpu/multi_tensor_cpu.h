// CPU multi-tensor helpers: the flat chunk list and dtype -> storage type dispatch (torch-side, CPU only).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <vector>

#include "forgetkern/common.h"
#include "forgetkern/multi_tensor.h"

namespace forgetkern {
namespace cpu {

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

// Chunks of at most kCpuChunk elements over the tensors' numels, in tensor order; empty tensors yield none.
inline std::vector<Chunk> make_chunks(const std::vector<int64_t>& numels) {
  std::vector<Chunk> out;
  out.reserve(static_cast<size_t>(count_chunks(static_cast<int64_t>(numels.size()), numels.data(), kCpuChunk)));
  for (size_t t = 0; t < numels.size(); ++t) {
    for (int64_t b = 0; b < numels[t]; b += kCpuChunk) {
      out.push_back(Chunk{static_cast<int64_t>(t), b, b + kCpuChunk < numels[t] ? b + kCpuChunk : numels[t]});
    }
  }
  return out;
}

// Calls fn(S{}) with S the storage type of `t`; any float dtype (float32/float16/bfloat16/float64).
template <typename Fn>
void dispatch_float(c10::ScalarType t, const char* what, Fn&& fn) {
  switch (t) {
    case c10::ScalarType::Float: fn(float{}); return;
    case c10::ScalarType::Double: fn(double{}); return;
    case c10::ScalarType::Half: fn(fk_half{}); return;
    case c10::ScalarType::BFloat16: fn(fk_bf16{}); return;
    default: TORCH_CHECK(false, what, ": unsupported dtype ", t, " (expected float32/float16/bfloat16/float64)");
  }
}

// State dtypes (Fisher estimates that are updated in place): float32/bfloat16/float64.
template <typename Fn>
void dispatch_state(c10::ScalarType t, const char* what, Fn&& fn) {
  switch (t) {
    case c10::ScalarType::Float: fn(float{}); return;
    case c10::ScalarType::Double: fn(double{}); return;
    case c10::ScalarType::BFloat16: fn(fk_bf16{}); return;
    default: TORCH_CHECK(false, what, ": unsupported dtype ", t, " (expected float32/bfloat16/float64)");
  }
}

// Safety net under the Python-side validation: parallel lists of contiguous CPU tensors of equal numel.
inline void check_list(at::TensorList xs, at::TensorList ref, const char* op, const char* name) {
  TORCH_CHECK(xs.size() == ref.size(), op, ": ", name, " has ", xs.size(), " tensors, expected ", ref.size());
  for (size_t i = 0; i < xs.size(); ++i) {
    TORCH_CHECK(xs[i].device().is_cpu(), op, ": ", name, "[", i, "] must be a CPU tensor");
    TORCH_CHECK(xs[i].is_contiguous(), op, ": ", name, "[", i, "] must be contiguous");
    TORCH_CHECK(xs[i].numel() == ref[i].numel(), op, ": ", name, "[", i, "] has ", xs[i].numel(),
                " elements, expected ", ref[i].numel());
  }
}

}  // namespace cpu
}  // namespace forgetkern
