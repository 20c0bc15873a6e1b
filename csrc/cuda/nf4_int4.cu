// CUDA kernels of the 4-bit weight ops, see nf4_int4.h. Only CUDA headers: compiles standalone with
// nvcc -c -std=c++17 for sm_80 / sm_90. Products and sums use __fmul_rn / __fadd_rn where the result must
// equal bitsandbytes' dequantization bit for bit (nvcc would otherwise contract them into FMAs).
#include <cstdint>

#include "nf4_int4.h"
#include "runtime.h"
#include "vec.h"

namespace lorabench::cuda {
namespace {

// The 16 NF4 values (QLoRA sec. 3), bitsandbytes' fp32 table.
__device__ const float kNF4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,
    -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,
    0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,
    0.7229568362236023f, 1.0f};

__device__ __forceinline__ float group_scale(const Q4Params& p, int64_t g) {
  if (p.scale_q8 == nullptr) return p.scale[g];
  return __fadd_rn(__fmul_rn(p.code2[p.scale_q8[g]], p.scale2[g >> 8]), *p.offset);
}

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// The 16-entry table in shared memory (divergent indices would serialise on the constant cache).
__device__ __forceinline__ void load_lut(const Q4Params& p, float* lut) {
  if (threadIdx.x < 16) lut[threadIdx.x] = p.int_codes ? float(threadIdx.x) : kNF4[threadIdx.x];
  __syncthreads();
}

// One thread per byte (two weights; group is even, so both share a scale).
template <typename T>
__global__ void dequantize_kernel(Q4Params p, T* out, int64_t n) {
  __shared__ float lut[16];
  load_lut(p, lut);
  const int64_t byte = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t i = 2 * byte;
  if (i >= n) return;
  const uint8_t b = p.packed[byte];
  const int64_t g = i / p.group;
  const float s = group_scale(p, g);
  float w0 = __fmul_rn(lut[b >> 4], s), w1 = __fmul_rn(lut[b & 15], s);
  if (p.zero != nullptr) {
    w0 = __fadd_rn(w0, p.zero[g]);
    w1 = __fadd_rn(w1, p.zero[g]);
  }
  out[i] = from_float<T>(w0);
  if (i + 1 < n) out[i + 1] = from_float<T>(w1);
}

// x[k0 .. k0 + 32) of one row as fp32: eight (fp32) or four (bf16 / fp16) 16-byte loads when the row is
// 16-byte aligned (vec_x, checked on the host), else 32 scalar loads.
template <typename T>
__device__ __forceinline__ void load_x32(const T* __restrict__ src, bool vec_x, float* dst) {
  if (vec_x) {
    constexpr int n = VecWidth<T>::value;
#pragma unroll
    for (int v = 0; v < 32 / n; ++v) load16(src + v * n, dst + v * n);
  } else {
#pragma unroll
    for (int i = 0; i < 32; ++i) dst[i] = to_float<T>(src[i]);
  }
}

// One warp per output row; each lane reads 16 bytes (32 weights, one group since group % 32 == 0 and
// the 32 weights start at a multiple of 32) per step, so the packed row is streamed once, coalesced, and
// the matching 32 x values of each batch row as 16-byte vectors (bitsandbytes' kgemm_4bit_inference_naive
// loads x the same way): a lane's x reads are contiguous, not scalar loads 32 weights apart.
template <typename T, int NB>
__global__ void gemv_kernel(Q4Params p, const T* __restrict__ x, int64_t ldx, bool vec_x, float* __restrict__ out,
                            int64_t ldo) {
  __shared__ float lut[16];
  load_lut(p, lut);
  const int warps = blockDim.x / 32;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * warps + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (n >= p.N) return;
  const int64_t K = p.K;
  const uint4* row = reinterpret_cast<const uint4*>(p.packed + n * (K / 2));
  float acc[NB];
#pragma unroll
  for (int b = 0; b < NB; ++b) acc[b] = 0.f;
  for (int64_t c = lane; c < K / 32; c += 32) {
    const uint4 v = __ldg(row + c);
    const int64_t g = (n * K + c * 32) / p.group;
    const float s = group_scale(p, g);
    const uint32_t words[4] = {v.x, v.y, v.z, v.w};
    float w[32];  // the 32 decoded weights, element k0 + i in w[i]
#pragma unroll
    for (int wi = 0; wi < 4; ++wi) {
#pragma unroll
      for (int by = 0; by < 4; ++by) {
        const uint32_t b8 = (words[wi] >> (8 * by)) & 0xffu;
        const float w0 = lut[b8 >> 4], w1 = lut[b8 & 15u];
        w[wi * 8 + by * 2] = w0;
        w[wi * 8 + by * 2 + 1] = w1;
      }
    }
    const float z = p.zero != nullptr ? p.zero[g] : 0.f;
#pragma unroll
    for (int b = 0; b < NB; ++b) {
      float xv[32];
      load_x32(x + b * ldx + c * 32, vec_x, xv);
      float part = 0.f, xsum = 0.f;
#pragma unroll
      for (int i = 0; i < 32; i += 2) {
        part = fmaf(w[i + 1], xv[i + 1], fmaf(w[i], xv[i], part));
        xsum += xv[i] + xv[i + 1];
      }
      acc[b] = fmaf(part, s, fmaf(xsum, z, acc[b]));
    }
  }
#pragma unroll
  for (int b = 0; b < NB; ++b) {
    float v = acc[b];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == 0) out[b * ldo + n] = v;
  }
}

template <typename T>
void launch_dequantize(const Q4Params& p, void* out) {
  const int64_t n = p.N * p.K;
  const int64_t bytes = (n + 1) / 2;
  const int threads = 256;
  const int64_t blocks = (bytes + threads - 1) / threads;
  launch_kernel(dequantize_kernel<T>, dim3(static_cast<unsigned>(blocks)), dim3(threads), 0,
                static_cast<cudaStream_t>(p.stream), p, static_cast<T*>(out), n);
}

template <typename T, int NB>
void launch_gemv_nb(const Q4Params& p, const T* x, int64_t ldx, float* out, int64_t ldo) {
  const int warps = 4;
  const int64_t blocks = (p.N + warps - 1) / warps;
  // 16-byte x loads need every row start aligned: the base and the row stride (K % 32 == 0 makes ldx = K
  // a multiple of 16 bytes; a view at an odd offset is not); otherwise the same kernel loads x by scalars.
  const bool vec_x = aligned16(x) && (ldx * static_cast<int64_t>(sizeof(T))) % 16 == 0;
  launch_kernel(gemv_kernel<T, NB>, dim3(static_cast<unsigned>(blocks)), dim3(warps * 32), 0,
                static_cast<cudaStream_t>(p.stream), p, x, ldx, vec_x, out, ldo);
}

template <typename T>
void launch_gemv(const Q4Params& p, const void* xv, int64_t ldx, int64_t B, float* out, int64_t ldo) {
  const T* x = static_cast<const T*>(xv);
  // One launch per kMaxGemvBatch rows, so the packed weight is streamed once for any batch up to 8
  // (batches 5-7 used to take 2-3 launches of 4, 2 and 1 rows, each reading the whole weight).
  for (int64_t b = 0; b < B; b += kMaxGemvBatch) {
    const T* xb = x + b * ldx;
    float* ob = out + b * ldo;
    switch (B - b < kMaxGemvBatch ? B - b : kMaxGemvBatch) {
      case 1: launch_gemv_nb<T, 1>(p, xb, ldx, ob, ldo); break;
      case 2: launch_gemv_nb<T, 2>(p, xb, ldx, ob, ldo); break;
      case 3: launch_gemv_nb<T, 3>(p, xb, ldx, ob, ldo); break;
      case 4: launch_gemv_nb<T, 4>(p, xb, ldx, ob, ldo); break;
      case 5: launch_gemv_nb<T, 5>(p, xb, ldx, ob, ldo); break;
      case 6: launch_gemv_nb<T, 6>(p, xb, ldx, ob, ldo); break;
      case 7: launch_gemv_nb<T, 7>(p, xb, ldx, ob, ldo); break;
      default: launch_gemv_nb<T, 8>(p, xb, ldx, ob, ldo); break;
    }
  }
}

}  // namespace

void q4_dequantize_cuda(const Q4Params& p, void* out, DType dtype) {
  switch (dtype) {
    case DType::kFloat32: launch_dequantize<float>(p, out); break;
    case DType::kBFloat16: launch_dequantize<__nv_bfloat16>(p, out); break;
    case DType::kFloat16: launch_dequantize<__half>(p, out); break;
    case DType::kFloat64: break;  // no fp64 kernel: the binding dequantizes to fp32 and converts
  }
}

void q4_gemv_cuda(const Q4Params& p, const void* x, int64_t ldx, DType dtype, int64_t B, float* out, int64_t ldo) {
  switch (dtype) {
    case DType::kFloat32: launch_gemv<float>(p, x, ldx, B, out, ldo); break;
    case DType::kBFloat16: launch_gemv<__nv_bfloat16>(p, x, ldx, B, out, ldo); break;
    case DType::kFloat16: launch_gemv<__half>(p, x, ldx, B, out, ldo); break;
    case DType::kFloat64: break;  // no fp64 kernel: the binding takes the dequantize path for fp64 x
  }
}

}  // namespace lorabench::cuda
