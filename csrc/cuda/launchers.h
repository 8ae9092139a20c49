// Host launchers of the CUDA kernels (defined in csrc/cuda/*.cu, called by the torch glue in csrc/cuda/*.cpp).
// Plain C++: raw pointers, element counts, dtype enums and a stream; no torch types cross this boundary.
// Each list argument holds `n` pointers (one per tensor, parallel lists); tensors with numel 0 are skipped.
// Every launcher returns the first CUDA error it saw (cudaSuccess otherwise).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "forgetkern/common.h"

namespace forgetkern {
namespace cuda {

// One dtype group of fisher_accumulate_: fishers[t] (state dtype) <- decay * F + scale * g^2. `found` is a
// device float set to 1.0f when a non-finite gradient element is seen (zeroed by the caller).
cudaError_t fisher_accumulate_launch(int64_t n, void* const* fishers, const void* const* grads,
                                     const int64_t* numels, DType fisher_dtype, DType grad_dtype, double decay,
                                     double scale, float* found, cudaStream_t stream);

// Workspace slots (doubles) ewc_fused needs for tensors of these sizes (one per chunk of every tensor).
int64_t ewc_workspace_slots(int64_t n, const int64_t* numels);

// One dtype group of ewc_fused. `mode` is an EwcMode (grads may be null in kEwcPenaltyOnly). Block partial sums
// go to workspace[workspace_offset ...]; the caller advances the offset by ewc_workspace_slots() per group.
cudaError_t ewc_fused_launch(int64_t n, const void* const* params, const void* const* anchors,
                             const void* const* fishers, void* const* grads, const int64_t* numels,
                             DType param_dtype, DType anchor_dtype, DType fisher_dtype, int mode, double lam,
                             double* workspace, int64_t workspace_offset, cudaStream_t stream);

// Sums workspace[0 .. slots) in a fixed order and writes lam/2 * sum to *out (a double if out_double, else a
// float). slots may be 0 (then *out = 0).
cudaError_t ewc_finalize_launch(const double* workspace, int64_t slots, double lam, void* out, bool out_double,
                                cudaStream_t stream);

// merge_task_vectors: the scalars of one call (math in csrc/include/forgetkern/merge_task_vectors.h).
struct MergeLaunchParams {
  int64_t n_tasks;         // N (1 .. kMergeMaxTasks)
  const double* weights;   // N weights (host)
  int prune;               // kMergePrune*
  int consensus;           // kMergeConsensus*
  int normalize;           // kMergeNorm*
  bool sign_weighted;
  bool subtract_base;
  int32_t drop_threshold;  // lora_keep_threshold(p)
  double scale_f64;        // DARE rescale in double compute (1 when not rescaling)
  double scale_f32;        // the same rounded to float (float compute)
  double lin_div;          // divisor without election
  double lam;
};

// Most tasks the CUDA merge takes in one call (weights and pointers travel in the kernel arguments).
constexpr int64_t kMergeMaxTasks = 64;

// One dtype group of merge_task_vectors: n tensors with base dtype `base_dtype`, inputs of `input_dtype`.
// inputs: n * N device pointers (tensor-major); keys: n * N DARE keys (or null unless prune is random);
// thresholds: n device pointers to each tensor's N thresholds in the compute type (or null unless prune is
// magnitude); offsets: the flat element offsets of the DARE index. Tensors with numel 0 are skipped.
cudaError_t merge_task_vectors_launch(int64_t n, const void* const* base, const void* const* inputs,
                                      void* const* out, const int64_t* numels, const uint64_t* offsets,
                                      const uint32_t* keys, const void* const* thresholds, DType base_dtype,
                                      DType input_dtype, const MergeLaunchParams& prm, cudaStream_t stream);

}  // namespace cuda
}  // namespace forgetkern

namespace forgetkern {
namespace cuda {

// ewc_delta_w (csrc/cuda/ewc_delta_w.cu). One row of the tile work table: a block handles rows
// [m_start, m_end) (a multiple of edw_block_m() apart from the layer's end) of columns [n0, n0 + BN) of one
// layer; its B^T g partial (edw_max_rank() x BN, compute type) goes to ws_a[wsa_slot ...], the g A^T partial of
// its row tile m (edw_block_m() x edw_max_rank()) to ws_b[wsb_base + (m0 / BM) * wsb_mstride ...].
struct EdwTileRow {
  const void* a;
  const void* b;
  const void* f;
  int64_t n_out, n_in, r, m_start, m_end, n0, wsa_slot, wsb_base, wsb_mstride, layer;
};

// One gradient tile: g[base + i * ld + j] (i < nrows, j < ncols) += C(s2s[layer] * lam) * sum over p < n_parts
// of ws[ws_off + p * stride + i * cols + j] (p ascending); rows x cols is the partial tiles' shape.
struct EdwReduceRow {
  void* g;
  int64_t ws_off, n_parts, stride, base, ld, nrows, ncols, rows, cols, layer;
};

int edw_block_n(DType factor_dtype);  // columns per tile (depends on the compute type)
int edw_block_m();                    // rows per row tile
int edw_chunk_m();                    // rows per block (a multiple of edw_block_m())
int edw_max_rank();                   // the largest rank (the partials are padded to it)

// One dtype group: the tile kernel over the device tables `tiles` (and, with write_grad, the two reduce
// kernels over red_a / red_b). ws_a / ws_b hold compute-type (float, or double for float64 factors) partials;
// partials[k] receives tile k's s^2 * sum(g * d) (double). s2s: s_i^2 per layer index (device doubles).
cudaError_t ewc_delta_w_launch(const EdwTileRow* tiles, int64_t n_tiles, const EdwReduceRow* red_a,
                               int64_t n_red_a, const EdwReduceRow* red_b, int64_t n_red_b, const double* s2s,
                               DType factor_dtype, DType fisher_dtype, double lam, void* ws_a, void* ws_b,
                               double* partials, bool write_grad, cudaStream_t stream);

// *out = R(sum of partials[0 .. n) in a fixed order) * R(lam / 2), R = double if out_double else float.
cudaError_t ewc_delta_w_finalize_launch(const double* partials, int64_t n, double lam, void* out, bool out_double,
                                        cudaStream_t stream);

}  // namespace cuda
}  // namespace forgetkern
