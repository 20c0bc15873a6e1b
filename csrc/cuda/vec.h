// 16-byte vector loads shared by the kernels (the GEMV's x, BGMV's x / A / B rows): one uint4 load
// of 16 / sizeof(T) elements, converted to fp32. CUDA-side header: include after runtime.h. The caller
// checks alignment on the host (aligned16) and keeps a scalar path for what is not aligned.
#pragma once

#include <cstdint>
#include <cstring>

namespace lorabench::cuda {

// Elements of T in one 16-byte load: 4 fp32, 8 bf16 / fp16.
template <typename T> struct VecWidth { static constexpr int value = static_cast<int>(16 / sizeof(T)); };

__device__ __forceinline__ float elem_to_float(float v) { return v; }
__device__ __forceinline__ float elem_to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float elem_to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// dst[0..n) = src[0..n) as fp32, n = VecWidth<T>; src must be 16-byte aligned.
template <typename T>
__device__ __forceinline__ void load16(const T* __restrict__ src, float* dst) {
  constexpr int n = VecWidth<T>::value;
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(src));
  T e[n];
  memcpy(e, &raw, 16);
#pragma unroll
  for (int i = 0; i < n; ++i) dst[i] = elem_to_float(e[i]);
}

inline bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

}  // namespace lorabench::cuda
