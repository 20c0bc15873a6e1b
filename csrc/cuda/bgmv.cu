// CUDA kernels of BGMV / SGMV (Punica arXiv 2310.18547, S-LoRA arXiv 2311.03285): one thread
// block per token, the token's slot read from idx (BGMV) or found by binary search in the segment
// offsets (SGMV). Shrink: one warp per row j < rank of A[l] (a dot product over `in`, reduced with
// shuffles). Expand: y[t, :r] staged in shared memory, one thread per output feature.
// Only CUDA headers: compiled standalone by nvcc on machines without a GPU (CI), launched from
// csrc/multi_lora_ops.cpp through csrc/cuda/bgmv.h.
#include "bgmv.h"
#include "runtime.h"

namespace lorabench::cuda {
namespace {

constexpr int kWarps = 8;            // rows of A per shrink block
constexpr int kExpandThreads = 256;  // outputs per expand block

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);
}

// Slot of token t (-1: none). SGMV: the segment s with seg_starts[s] <= t < seg_starts[s+1].
__device__ __forceinline__ int64_t slot_of(const MultiLoraParams& p, int64_t t) {
  int64_t l = -1;
  if (p.idx != nullptr) {
    l = p.idx[t];
  } else {
    int64_t lo = 0, hi = p.n_segments;  // invariant: seg_starts[lo] <= t < seg_starts[hi]
    while (hi - lo > 1) {
      const int64_t mid = (lo + hi) / 2;
      if (p.seg_starts[mid] <= t) lo = mid; else hi = mid;
    }
    l = p.seg_idx[lo];
  }
  return (l >= 0 && l < p.n_slots) ? l : -1;
}

__device__ __forceinline__ int64_t rank_of(const MultiLoraParams& p, int64_t l) {
  const int64_t r = p.ranks[l];
  return r < 0 ? 0 : (r > p.max_rank ? p.max_rank : r);
}

template <typename T>
__global__ void shrink_kernel(MultiLoraParams p) {
  const int64_t t = blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t j = static_cast<int64_t>(blockIdx.y) * kWarps + warp;
  if (j >= p.max_rank) return;
  const int64_t l = slot_of(p, t);
  float* dst = p.y_out + t * p.max_rank + j;
  if (l < 0 || j >= rank_of(p, l)) {  // no adapter, or a row past this adapter's rank: y = 0
    if (lane == 0) *dst = 0.f;
    return;
  }
  const T* x = static_cast<const T*>(p.x) + t * p.x_row_stride;
  const T* a = static_cast<const T*>(p.w) + (l * p.max_rank + j) * p.in_features;  // A[l, j, :]
  float acc = 0.f;
  for (int64_t k = lane; k < p.in_features; k += 32) acc += to_float(x[k]) * to_float(a[k]);
  for (int offset = 16; offset > 0; offset /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
  if (lane == 0) *dst = p.scales[l] * acc;  // eq. (3) of LoRA, shrink half
}

template <typename T>
__global__ void expand_kernel(MultiLoraParams p) {
  LORABENCH_DYNAMIC_SHARED(float, ys);  // y[t, :r]
  const int64_t t = blockIdx.x;
  const int64_t l = slot_of(p, t);
  if (l < 0) return;
  const int64_t r = rank_of(p, l);
  for (int64_t j = threadIdx.x; j < r; j += blockDim.x) ys[j] = p.y_in[t * p.max_rank + j];
  __syncthreads();
  const int64_t o = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (o >= p.out_features || r == 0) return;
  const T* b = static_cast<const T*>(p.w) + (l * p.out_features + o) * p.max_rank;  // B[l, o, :]
  float acc = 0.f;
  for (int64_t j = 0; j < r; ++j) acc += ys[j] * to_float(b[j]);
  T* dst = static_cast<T*>(p.out) + t * p.out_row_stride + o;
  *dst = from_float<T>(to_float(*dst) + acc);
}

template <template <typename> class K>
void launch(const MultiLoraParams& p, dim3 grid, dim3 block, size_t smem) {
  auto stream = static_cast<cudaStream_t>(p.stream);
  switch (p.dtype) {
    case DType::kFloat32: K<float>::run(p, grid, block, smem, stream); break;
    case DType::kBFloat16: K<__nv_bfloat16>::run(p, grid, block, smem, stream); break;
    case DType::kFloat16: K<__half>::run(p, grid, block, smem, stream); break;
    case DType::kFloat64: break;  // no fp64 kernel: the binding refuses it (cuda_dtype)
  }
}

template <typename T> struct Shrink {
  static void run(const MultiLoraParams& p, dim3 g, dim3 b, size_t smem, cudaStream_t s) {
    launch_kernel(shrink_kernel<T>, g, b, smem, s, p);
  }
};
template <typename T> struct Expand {
  static void run(const MultiLoraParams& p, dim3 g, dim3 b, size_t smem, cudaStream_t s) {
    launch_kernel(expand_kernel<T>, g, b, smem, s, p);
  }
};

}  // namespace

void multi_lora_shrink_cuda(const MultiLoraParams& p) {
  if (p.n_tokens == 0 || p.max_rank == 0) return;
  const dim3 grid(static_cast<unsigned>(p.n_tokens), static_cast<unsigned>((p.max_rank + kWarps - 1) / kWarps));
  launch<Shrink>(p, grid, dim3(kWarps * 32), 0);
}

void multi_lora_expand_cuda(const MultiLoraParams& p) {
  if (p.n_tokens == 0 || p.max_rank == 0 || p.out_features == 0) return;
  const dim3 grid(static_cast<unsigned>(p.n_tokens),
                  static_cast<unsigned>((p.out_features + kExpandThreads - 1) / kExpandThreads));
  launch<Expand>(p, grid, dim3(kExpandThreads), p.max_rank * sizeof(float));
}

}  // namespace lorabench::cuda
