// Raw CUDA kernels of the vessel-weighted noise loss: forward (deterministic two-pass per-sample
// reduction in float32, combined in double) and backward (one elementwise pass using loss_weight from
// step_math.h, shared with the CPU kernel). No torch headers here (see cuda_launchers.h).
#include <cstdint>

#include "dtype_util.cuh"
#include "vesselfast/cuda_launchers.h"
#include "vesselfast/step_math.h"

namespace vesselfast {
namespace cuda {
namespace {

constexpr int kPerThread = 4;
constexpr int64_t kMaxBlocksPerSample = 1024;

// Blocks per sample of the forward's first pass: a pure function of per_sample, so the reduction
// order (hence the result) never depends on the GPU or on timing.
int64_t fwd_blocks(int64_t per_sample) {
  const int64_t per_block = static_cast<int64_t>(kThreads) * kPerThread * 4;
  int64_t n = (per_sample + per_block - 1) / per_block;
  if (n < 1) n = 1;
  return n < kMaxBlocksPerSample ? n : kMaxBlocksPerSample;
}

template <typename V>
__device__ __forceinline__ V warp_sum(V v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// Sum of v over the block (kThreads threads); the result is valid in thread 0. Fixed order.
template <typename V>
__device__ __forceinline__ V block_sum(V v, V* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // smem may be reused across calls
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? smem[threadIdx.x] : V(0);
  if (warp == 0) v = warp_sum(v);
  return v;
}

// Pass 1: block (blk, b) reduces the fixed chunk [blk*chunk, min(n, (blk+1)*chunk)) of sample b into
// part[(b * nblk + blk) * 3 + {0: sum d^2, 1: sum w d^2, 2: sum w}].
template <typename T, bool W>
__global__ void __launch_bounds__(kThreads) loss_partial_kernel(const T* __restrict__ eps, const T* __restrict__ hat,
                                                                 const T* __restrict__ w, float* __restrict__ part,
                                                                 int64_t batch, int64_t n, int64_t nblk,
                                                                 int64_t chunk) {
  __shared__ float smem[kThreads / 32];
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    const int64_t lo = static_cast<int64_t>(blockIdx.x) * chunk;
    const int64_t hi = lo + chunk < n ? lo + chunk : n;
    const int64_t base = b * n;
    float d2 = 0.f, wd2 = 0.f, ws = 0.f;
    for (int64_t i = lo + threadIdx.x; i < hi; i += kThreads) {
      const float d = to_f32(eps[base + i]) - to_f32(hat[base + i]);
      d2 += d * d;
      if (W) {
        const float wi = to_f32(w[base + i]);
        wd2 += wi * d * d;
        ws += wi;
      }
    }
    d2 = block_sum(d2, smem);
    if (W) {
      wd2 = block_sum(wd2, smem);
      ws = block_sum(ws, smem);
    }
    if (threadIdx.x == 0) {
      float* p = part + (b * nblk + blockIdx.x) * 3;
      p[0] = d2;
      p[1] = wd2;
      p[2] = ws;
    }
  }
}

// Pass 2: one block per sample adds its nblk partials (in double, fixed order) and writes the loss.
__global__ void __launch_bounds__(kThreads) loss_finalize_kernel(const float* __restrict__ part,
                                                                  float* __restrict__ loss, float* __restrict__ sum_w,
                                                                  int64_t batch, int64_t n, int64_t nblk) {
  __shared__ double smem[kThreads / 32];
  for (int64_t b = blockIdx.x; b < batch; b += gridDim.x) {
    double d2 = 0, wd2 = 0, ws = 0;
    for (int64_t j = threadIdx.x; j < nblk; j += kThreads) {
      const float* p = part + (b * nblk + j) * 3;
      d2 += p[0];
      wd2 += p[1];
      ws += p[2];
    }
    d2 = block_sum(d2, smem);
    wd2 = block_sum(wd2, smem);
    ws = block_sum(ws, smem);
    if (threadIdx.x == 0) {
      loss[b] = static_cast<float>(0.5 * d2 / static_cast<double>(n) + wd2 / (ws + 1.0));
      sum_w[b] = static_cast<float>(ws);
    }
  }
}

template <typename T, bool W>
__global__ void __launch_bounds__(kThreads) loss_backward_kernel(const float* __restrict__ grad,
                                                                  const float* __restrict__ sum_w,
                                                                  const T* __restrict__ eps, const T* __restrict__ hat,
                                                                  const T* __restrict__ w, T* __restrict__ out,
                                                                  int64_t batch, int64_t n) {
  const float inv_n_half = 0.5f / static_cast<float>(n);
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    const float m2g = -2.f * grad[b];
    const float inv_wsum1 = 1.f / (sum_w[b] + 1.f);
    const int64_t base = b * n;
    const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads * kPerThread;
    for (int64_t start = static_cast<int64_t>(blockIdx.x) * kThreads * kPerThread; start < n; start += stride) {
#pragma unroll
      for (int k = 0; k < kPerThread; ++k) {
        const int64_t i = start + k * kThreads + threadIdx.x;
        if (i < n) {
          const int64_t j = base + i;
          const float d = to_f32(eps[j]) - to_f32(hat[j]);
          const float wj = W ? to_f32(w[j]) : 0.f;
          out[j] = from_f32<T>(m2g * loss_weight(wj, inv_n_half, inv_wsum1) * d);
        }
      }
    }
  }
}

unsigned batch_grid(int64_t batch) { return static_cast<unsigned>(batch < 65535 ? batch : 65535); }

template <typename T>
cudaError_t fwd_typed(const void* eps, const void* hat, const void* w, float* loss, float* sum_w, void* ws,
                      int64_t batch, int64_t n, cudaStream_t stream) {
  const int64_t nblk = fwd_blocks(n);
  const int64_t chunk = (n + nblk - 1) / nblk;
  const dim3 grid(static_cast<unsigned>(nblk), batch_grid(batch));
  float* part = static_cast<float*>(ws);
  if (w != nullptr)
    loss_partial_kernel<T, true><<<grid, kThreads, 0, stream>>>(
        static_cast<const T*>(eps), static_cast<const T*>(hat), static_cast<const T*>(w), part, batch, n, nblk, chunk);
  else
    loss_partial_kernel<T, false><<<grid, kThreads, 0, stream>>>(
        static_cast<const T*>(eps), static_cast<const T*>(hat), nullptr, part, batch, n, nblk, chunk);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  loss_finalize_kernel<<<batch_grid(batch), kThreads, 0, stream>>>(part, loss, sum_w, batch, n, nblk);
  return cudaGetLastError();
}

template <typename T>
cudaError_t bwd_typed(const float* grad, const float* sum_w, const void* eps, const void* hat, const void* w,
                      void* out, int64_t batch, int64_t n, cudaStream_t stream) {
  const dim3 grid(blocks_for(n, kPerThread), batch_grid(batch));
  if (w != nullptr)
    loss_backward_kernel<T, true><<<grid, kThreads, 0, stream>>>(grad, sum_w, static_cast<const T*>(eps),
                                                                 static_cast<const T*>(hat), static_cast<const T*>(w),
                                                                 static_cast<T*>(out), batch, n);
  else
    loss_backward_kernel<T, false><<<grid, kThreads, 0, stream>>>(grad, sum_w, static_cast<const T*>(eps),
                                                                  static_cast<const T*>(hat), nullptr,
                                                                  static_cast<T*>(out), batch, n);
  return cudaGetLastError();
}

}  // namespace

size_t vessel_loss_workspace_bytes(int64_t batch, int64_t per_sample) {
  if (batch <= 0 || per_sample <= 0) return 0;
  return static_cast<size_t>(batch * fwd_blocks(per_sample) * 3) * sizeof(float);
}

cudaError_t launch_vessel_loss_fwd(const void* eps, const void* eps_hat, const void* w, float* loss, float* sum_w,
                                   void* workspace, int64_t batch, int64_t per_sample, DType dtype,
                                   cudaStream_t stream) {
  if (batch <= 0 || per_sample <= 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32: return fwd_typed<float>(eps, eps_hat, w, loss, sum_w, workspace, batch, per_sample, stream);
    case DType::kBFloat16:
      return fwd_typed<__nv_bfloat16>(eps, eps_hat, w, loss, sum_w, workspace, batch, per_sample, stream);
    case DType::kFloat16: return fwd_typed<__half>(eps, eps_hat, w, loss, sum_w, workspace, batch, per_sample, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_vessel_loss_bwd(const float* grad, const float* sum_w, const void* eps, const void* eps_hat,
                                   const void* w, void* grad_hat, int64_t batch, int64_t per_sample, DType dtype,
                                   cudaStream_t stream) {
  if (batch <= 0 || per_sample <= 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32: return bwd_typed<float>(grad, sum_w, eps, eps_hat, w, grad_hat, batch, per_sample, stream);
    case DType::kBFloat16:
      return bwd_typed<__nv_bfloat16>(grad, sum_w, eps, eps_hat, w, grad_hat, batch, per_sample, stream);
    case DType::kFloat16: return bwd_typed<__half>(grad, sum_w, eps, eps_hat, w, grad_hat, batch, per_sample, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace vesselfast
