// Host emulation of the CUDA runtime pieces the project_out_ / olora_loss kernels use, for a numeric check of
// csrc/cuda/project_out.cu and csrc/cuda/olora_loss.cu without a GPU (tests/test_cuda_emulated.py): a block is
// kernel-thread-count std::threads released together; __shared__ arrays are statics (blocks run one after
// another), __syncthreads a std::barrier, __shfl_down_sync an exchange through a static buffer (every thread of
// the block calls it, as in the kernels). Launches `k<<<blocks, threads, 0, stream>>>(args)` are rewritten by the
// test into emu_launch(blocks, threads, [&] { k(args); }).
#include <cuda_runtime_api.h>
#include <barrier>
#include <cmath>
#include <functional>
#include <thread>
#include <vector>
#include <cstring>
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define __shared__ static
struct EmuDim { unsigned x = 0, y = 0, z = 0; };
inline thread_local EmuDim threadIdx;
inline thread_local EmuDim blockIdx;
inline std::barrier<>* emu_bar = nullptr;
inline void __syncthreads() { emu_bar->arrive_and_wait(); }
inline double emu_shfl[1024];
template <typename T> T __shfl_down_sync(unsigned, T v, int o) {
  emu_shfl[threadIdx.x] = static_cast<double>(v);
  __syncthreads();
  const unsigned lane = threadIdx.x & 31;
  T r = lane + o < 32 ? static_cast<T>(emu_shfl[threadIdx.x + o]) : v;
  __syncthreads();
  return r;
}
template <typename T> T __ldg(const T* p) { return *p; }
#define cudaGetLastError() cudaSuccess
inline void emu_launch(int blocks, int threads, const std::function<void()>& body) {
  for (int b = 0; b < blocks; ++b) {
    std::barrier<> bar(threads);
    emu_bar = &bar;
    std::vector<std::thread> ts;
    for (int t = 0; t < threads; ++t)
      ts.emplace_back([&, t, b] { threadIdx.x = t; blockIdx.x = b; body(); });
    for (auto& th : ts) th.join();
  }
}
