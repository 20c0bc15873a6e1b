// CUDA kernels of the fused LoRA / DoRA linear ops (DoRA: arXiv 2402.09353). See lora.h.
// Includes only CUDA headers: compiles standalone with nvcc for sm_80 / sm_90.
#include "lora.h"
#include "runtime.h"

namespace lorabench::cuda {
namespace {

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename T> __device__ __forceinline__ typename Acc<T>::type to_acc(T v) { return static_cast<typename Acc<T>::type>(v); }
template <> __device__ __forceinline__ float to_acc<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_acc<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(typename Acc<T>::type v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename A> __device__ __forceinline__ A warp_sum(A v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum of v over the block (blockDim.x == kNormThreads); every thread gets the total.
constexpr int kNormThreads = 256;
template <typename A>
__device__ A block_sum(A v, A* scratch) {
  v = warp_sum(v);
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
  __syncthreads();
  A total = 0;
  for (int w = 0; w < kNormThreads / 32; ++w) total += scratch[w];
  __syncthreads();  // scratch is reused by the next call
  return total;
}

// One block per output row j: ||W_j||^2 by a block reduction, then the rank-r terms; a row where the
// expansion cancels is recomputed from the formed row W_j + s B_j A (that row only).
template <typename T>
__global__ void dora_norm_kernel(DoraNormParams p) {
  using A = typename Acc<T>::type;
  __shared__ A scratch[kNormThreads / 32];
  const int64_t j = blockIdx.x;
  const T* w = static_cast<const T*>(p.weight) + j * p.in;
  const A* a = static_cast<const A*>(p.a);
  const A* wa = static_cast<const A*>(p.wa) + j * p.rank;
  const A* bg = static_cast<const A*>(p.bg) + j * p.rank;
  const A* b = static_cast<const A*>(p.b) + j * p.rank;
  const A s = static_cast<A>(p.scale);
  A w_sq = 0, cross = 0, ba_sq = 0;
  for (int64_t i = threadIdx.x; i < p.in; i += blockDim.x) {
    const A v = to_acc(w[i]);
    w_sq += v * v;
  }
  for (int64_t k = threadIdx.x; k < p.rank; k += blockDim.x) {
    cross += b[k] * wa[k];
    ba_sq += b[k] * bg[k];
  }
  w_sq = block_sum(w_sq, scratch);
  cross = block_sum(cross, scratch);
  ba_sq = block_sum(ba_sq, scratch);
  A sq = w_sq + 2 * s * cross + s * s * ba_sq;
  if (sq < static_cast<A>(p.cancellation) * (w_sq + s * s * ba_sq)) {  // uniform across the block
    A exact = 0;
    for (int64_t i = threadIdx.x; i < p.in; i += blockDim.x) {
      A v = to_acc(w[i]);
      for (int64_t k = 0; k < p.rank; ++k) v += s * b[k] * a[k * p.in + i];
      exact += v * v;
    }
    sq = block_sum(exact, scratch);
  }
  if (threadIdx.x == 0) static_cast<A*>(p.norm)[j] = sqrt(sq > A(0) ? sq : A(0));
}

template <typename T>
__global__ void dora_epilogue_kernel(DoraEpilogueParams p) {
  using A = typename Acc<T>::type;
  const int64_t n = p.tokens * p.out;
  T* y = static_cast<T*>(p.y);
  const T* u = static_cast<const T*>(p.u);
  const A* g = static_cast<const A*>(p.g);
  const T* bias = static_cast<const T*>(p.bias);
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t j = e % p.out;
    A v = g[j] * to_acc(u[e]);
    if (bias) v += to_acc(bias[j]);
    if (p.accumulate) v += to_acc(y[e]);
    y[e] = from_acc<T>(v);
  }
}

// Block (x, y) of 32 x 8 threads: columns 32 x .. 32 x + 31 over tokens [y tpb, (y + 1) tpb), tpb =
// tokens_per_block; its 8 rows of threads stride over those tokens, then a shared-memory reduction in row
// order gives the block's sum for the 32 columns: dm itself when the grid has one block of tokens, else a
// partial sum for dora_grad_reduce_kernel. du is written in the same pass.
template <typename T>
__global__ void dora_grad_kernel(DoraGradParams p, int64_t tokens_per_block) {
  using A = typename Acc<T>::type;
  const int64_t j = blockIdx.x * 32 + threadIdx.x;
  const int64_t t_begin = static_cast<int64_t>(blockIdx.y) * tokens_per_block;
  const int64_t t_end = t_begin + tokens_per_block < p.tokens ? t_begin + tokens_per_block : p.tokens;
  const T* dy = static_cast<const T*>(p.dy);
  const T* u = static_cast<const T*>(p.u);
  T* du = static_cast<T*>(p.du);
  A acc = 0;
  if (j < p.out) {
    const A gj = static_cast<const A*>(p.g)[j];
    for (int64_t t = t_begin + threadIdx.y; t < t_end; t += blockDim.y) {
      const A d = to_acc(dy[t * p.out + j]);
      du[t * p.out + j] = from_acc<T>(d * gj);
      acc += d * to_acc(u[t * p.out + j]);
    }
  }
  __shared__ A part[8][33];
  part[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && j < p.out) {
    for (int r = 1; r < blockDim.y; ++r) acc += part[r][threadIdx.x];
    if (gridDim.y == 1) static_cast<A*>(p.dm)[j] = acc / static_cast<const A*>(p.norm)[j];
    else static_cast<A*>(p.partial)[static_cast<int64_t>(blockIdx.y) * p.out + j] = acc;
  }
}

// dm[j] = (sum of the token blocks' partial sums, in block order) / norm[j].
template <typename T>
__global__ void dora_grad_reduce_kernel(DoraGradParams p, int64_t blocks) {
  using A = typename Acc<T>::type;
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (j >= p.out) return;
  const A* partial = static_cast<const A*>(p.partial);
  A acc = 0;
  for (int64_t b = 0; b < blocks; ++b) acc += partial[b * p.out + j];
  static_cast<A*>(p.dm)[j] = acc / static_cast<const A*>(p.norm)[j];
}

// Tokens per block of the gradient kernel: kDoraGradTokens (8 per row of threads), more only where the
// grid's y dimension (at most 65535) would overflow.
constexpr int64_t kDoraGradTokens = 64;
int64_t grad_tokens_per_block(int64_t tokens) {
  const int64_t min_tpb = (tokens + 65534) / 65535;
  const int64_t tpb = min_tpb > kDoraGradTokens ? min_tpb : kDoraGradTokens;
  return (tpb + 7) / 8 * 8;
}
int64_t grad_token_blocks(int64_t tokens) {
  const int64_t tpb = grad_tokens_per_block(tokens);
  return tokens == 0 ? 1 : (tokens + tpb - 1) / tpb;
}

template <typename F>
int dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(float{}); break;
    case DType::kFloat64: f(double{}); break;
    case DType::kFloat16: f(__half{}); break;
    case DType::kBFloat16: f(__nv_bfloat16{}); break;
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int launch_dora_norm(const DoraNormParams& p, void* stream) {
  if (p.out == 0) return 0;
  return dispatch(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_kernel(dora_norm_kernel<T>, dim3((unsigned)p.out), dim3(kNormThreads), 0, static_cast<cudaStream_t>(stream), p);
  });
}

int launch_dora_epilogue(const DoraEpilogueParams& p, void* stream) {
  const int64_t n = p.tokens * p.out;
  if (n == 0) return 0;
  const int64_t blocks = (n + 255) / 256 < 65535 * 8 ? (n + 255) / 256 : 65535 * 8;
  return dispatch(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_kernel(dora_epilogue_kernel<T>, dim3((unsigned)blocks), dim3(256), 0, static_cast<cudaStream_t>(stream), p);
  });
}

int64_t dora_grad_workspace(const DoraGradParams& p) {
  const int64_t blocks = grad_token_blocks(p.tokens);
  return blocks > 1 ? blocks * p.out : 0;
}

int launch_dora_grad(const DoraGradParams& p, void* stream) {
  if (p.out == 0) return 0;
  const int64_t blocks = grad_token_blocks(p.tokens);
  if (blocks > 1 && p.partial == nullptr) return static_cast<int>(cudaErrorInvalidValue);
  const dim3 block(32, 8);
  const dim3 grid((unsigned)((p.out + 31) / 32), (unsigned)blocks);
  auto s = static_cast<cudaStream_t>(stream);
  return dispatch(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_kernel(dora_grad_kernel<T>, grid, block, 0, s, p, grad_tokens_per_block(p.tokens));
    if (blocks > 1)
      launch_kernel(dora_grad_reduce_kernel<T>, dim3((unsigned)((p.out + 255) / 256)), dim3(256), 0, s, p, blocks);
  });
}

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace lorabench::cuda
