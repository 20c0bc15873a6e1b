// The CUDA names csrc/cuda/*.cu use, mapped onto ROCm's HIP-CPU runtime (header-only, MIT; at
// ../shared/third_party/hip-cpu), so the kernels run on the CPU, each GPU thread a fiber, in the
// test-only build (tests/kernels/hipcpu.py). Included by csrc/cuda/runtime.h when LORABENCH_HIPCPU is
// defined; never by the CUDA build.
//
// HIP-CPU's warps are 64 lanes wide: the kernels' 32-lane xor reductions map onto width-32 shuffles,
// which stay inside each 32-lane half. Its __shfl_down with a width under 64 is wrong (it compares the
// absolute lane with the width), so __shfl_down_sync is refused at compile time: reduce with xor.
#pragma once

#include <hip/hip_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>

using cudaStream_t = hipStream_t;
using cudaError_t = hipError_t;
constexpr cudaError_t cudaSuccess = hipSuccess;
constexpr cudaError_t cudaErrorInvalidValue = hipErrorInvalidValue;
inline cudaError_t cudaGetLastError() noexcept { return hipGetLastError(); }
inline const char* cudaGetErrorString(cudaError_t e) noexcept { return hipGetErrorString(e); }
inline cudaError_t cudaDeviceSynchronize() noexcept { return hipDeviceSynchronize(); }

template <typename T>
inline T __shfl_xor_sync(unsigned /*mask: every lane takes part*/, T v, int lane_mask, int width = 32) noexcept {
  return __shfl_xor(v, lane_mask, width);
}

template <typename T>
inline T __shfl_down_sync(unsigned, T, unsigned, int = 32) noexcept {
  static_assert(sizeof(T) == 0, "HIP-CPU's __shfl_down is wrong for widths under 64: reduce with __shfl_xor_sync");
  return T{};
}

// Correctly rounded single operations: the build uses -ffp-contract=off, so nothing fuses them.
inline float __fmul_rn(float a, float b) noexcept { return a * b; }
inline float __fadd_rn(float a, float b) noexcept { return a + b; }

// bfloat16: the upper half of an fp32, rounded to nearest even (as CUDA's __float2bfloat16_rn and torch).
struct __nv_bfloat16 {
  std::uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 h) noexcept {
  const std::uint32_t u = static_cast<std::uint32_t>(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) noexcept {
  if (std::isnan(f)) return {0x7fc0};
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return {static_cast<std::uint16_t>(u >> 16)};
}
inline __nv_bfloat16 __float2bfloat16(float f) noexcept { return __float2bfloat16_rn(f); }
