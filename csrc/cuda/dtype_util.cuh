// Loads/stores that widen to / narrow from float32, shared by the raw CUDA kernels.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace vesselfast {
namespace cuda {

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }

constexpr int kThreads = 256;

// Blocks along one sample for `per_sample` elements handled `per_thread` at a time, capped so that
// the grid-stride loops stay cheap on huge samples.
inline unsigned blocks_for(long long per_sample, int per_thread, unsigned cap = 65535u) {
  const long long per_block = static_cast<long long>(kThreads) * per_thread;
  long long n = (per_sample + per_block - 1) / per_block;
  if (n < 1) n = 1;
  return static_cast<unsigned>(n < cap ? n : cap);
}

}  // namespace cuda
}  // namespace vesselfast
