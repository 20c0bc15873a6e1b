// The one runtime header of the .cu files: CUDA's runtime and types under nvcc, or ROCm's HIP-CPU
// (../shared/third_party/hip-cpu, each GPU thread a fiber on the CPU) through csrc/hipcpu/cuda_compat.h
// when LORABENCH_HIPCPU is defined (the test-only build of tests/kernels/hipcpu.py). Kernels launch
// through launch_kernel and declare dynamic shared memory with LORABENCH_DYNAMIC_SHARED, so one source
// builds both ways without rewriting `<<<...>>>`.
#pragma once

#if defined(LORABENCH_HIPCPU)
#include "../hipcpu/cuda_compat.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <cstddef>

namespace lorabench::cuda {

// kernel<<<grid, block, smem, stream>>>(args...), or HIP-CPU's launch of the same kernel.
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                   Args&&... args) {
#if defined(LORABENCH_HIPCPU)
  hipLaunchKernelGGL(kernel, grid, block, static_cast<std::uint32_t>(smem), stream, static_cast<Params>(args)...);
#else
  kernel<<<grid, block, smem, stream>>>(static_cast<Params>(args)...);
#endif
}

}  // namespace lorabench::cuda

// `extern __shared__ T name[]`: the block's dynamic shared memory (the launch's smem bytes).
#if defined(LORABENCH_HIPCPU)
#define LORABENCH_DYNAMIC_SHARED(T, name) HIP_DYNAMIC_SHARED(T, name)
#else
#define LORABENCH_DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#endif
