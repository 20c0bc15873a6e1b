// CUDA kernels of BGMV / SGMV (Punica arXiv 2310.18547, S-LoRA arXiv 2311.03285). Only CUDA headers:
// compiled standalone by nvcc on machines without a GPU (CI), launched from csrc/multi_lora_ops.cpp
// through csrc/cuda/bgmv.h.
//
// BGMV (a slot per token, decode): the shrink gives each block one token and 1 or 4 rows of A[l] and
// splits `in` across the block's threads with 16-byte loads of x and A, reduced by warp shuffles and
// shared memory (as Punica's bgmv_shrink); where tokens x rows make few blocks (batch 1 at rank 16:
// 16), `in` is also split across blocks, whose partial sums a second pass adds in a fixed order
// (deterministic). The expand gives each output feature a group of `lanes` threads that split the rank
// with 16-byte loads of B's row; consecutive groups take consecutive features, so a warp's B reads and
// its writes of `out` are contiguous.
// SGMV (a slot per segment of tokens, prefill): a grouped GEMM. Each block takes a tile of kTileM tokens
// of one segment and a tile of the adapter's columns; the tiles of x and A (shrink) or y and B (expand)
// are staged in shared memory as fp32, so each A / B element is read once per tile of tokens instead of
// once per token. A portable shared-memory tiled GEMM: no WMMA / mma (tensor cores), which HIP-CPU (the
// CI run of these sources on the CPU) cannot build.
#include "bgmv.h"
#include "runtime.h"
#include "vec.h"

namespace lorabench::cuda {
namespace {

constexpr int kShrinkThreads = 128;  // BGMV shrink block: splits `in`
constexpr int64_t kSplitK = 1024;    // at most ceil(in / kSplitK) splits of `in` across blocks (each > 512)
constexpr int64_t kTargetBlocks = 256;  // about two blocks per SM of an H100 (132 SMs): below it, split `in`
constexpr int kExpandThreads = 128;  // BGMV expand block
constexpr int kTileM = 32;           // SGMV: tokens per tile
constexpr int kShrinkTileN = 16, kShrinkTileK = 64;  // SGMV shrink: rows of A, `in` per stage; 16 x 16 threads
constexpr int kExpandTileN = 64, kExpandTileK = 16;  // SGMV expand: outputs, rank per stage; 64 x 4 threads

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);
}

__device__ __forceinline__ int64_t valid_slot(const MultiLoraParams& p, int64_t l) {
  return (l >= 0 && l < p.n_slots) ? l : -1;
}

__device__ __forceinline__ int64_t rank_of(const MultiLoraParams& p, int64_t l) {
  const int64_t r = p.ranks[l];
  return r < 0 ? 0 : (r > p.max_rank ? p.max_rank : r);
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// ---- BGMV -------------------------------------------------------------------------------------------

// grid (tokens, ceil(max_rank / ROWS), splits): y[t, j0 .. j0 + ROWS) over in[k_begin, k_end), each x vector
// used for ROWS rows. With one split it writes y = scale * sum (eq. (3) of LoRA, shrink half); with more,
// the partial sums go to y_partial[split, t, j] for shrink_reduce_kernel.
template <typename T, int ROWS>
__global__ void bgmv_shrink_kernel(MultiLoraParams p, int64_t split_len, bool vec) {
  __shared__ float red[ROWS][kShrinkThreads / 32];
  const int64_t t = blockIdx.x;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * ROWS;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.z) * split_len;
  const int64_t k_end = k_begin + split_len < p.in_features ? k_begin + split_len : p.in_features;
  const int64_t l = valid_slot(p, p.idx[t]);
  const int64_t r = l < 0 ? 0 : rank_of(p, l);
  const int64_t rows = r - j0 < 0 ? 0 : (r - j0 > ROWS ? ROWS : r - j0);  // rows of this block under the rank
  float acc[ROWS];
#pragma unroll
  for (int i = 0; i < ROWS; ++i) acc[i] = 0.f;
  if (rows > 0) {
    const T* x = static_cast<const T*>(p.x) + t * p.x_row_stride;
    const T* a = static_cast<const T*>(p.w) + (l * p.max_rank + j0) * p.in_features;  // A[l, j0, :]
    if (vec) {  // k_begin, k_end and every row start are multiples of n elements, 16-byte aligned
      constexpr int n = VecWidth<T>::value;
      for (int64_t k = k_begin + threadIdx.x * n; k < k_end; k += kShrinkThreads * n) {
        float xv[n], av[n];
        load16(x + k, xv);
#pragma unroll
        for (int i = 0; i < ROWS; ++i) {
          if (i < rows) {
            load16(a + i * p.in_features + k, av);
#pragma unroll
            for (int e = 0; e < n; ++e) acc[i] = fmaf(xv[e], av[e], acc[i]);
          }
        }
      }
    } else {
      for (int64_t k = k_begin + threadIdx.x; k < k_end; k += kShrinkThreads) {
        const float xv = elem_to_float(x[k]);
#pragma unroll
        for (int i = 0; i < ROWS; ++i)
          if (i < rows) acc[i] = fmaf(xv, elem_to_float(a[i * p.in_features + k]), acc[i]);
      }
    }
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int i = 0; i < ROWS; ++i) {
    const float v = warp_sum(acc[i]);
    if (lane == 0) red[i][warp] = v;
  }
  __syncthreads();
  if (threadIdx.x < ROWS) {
    const int i = threadIdx.x;
    const int64_t j = j0 + i;
    if (j >= p.max_rank) return;
    float sum = 0.f;
    for (int w = 0; w < kShrinkThreads / 32; ++w) sum += red[i][w];
    if (i >= rows) sum = 0.f;  // no adapter, or a row past this adapter's rank: y = 0
    if (gridDim.z == 1) {
      p.y_out[t * p.max_rank + j] = i < rows ? p.scales[l] * sum : 0.f;
    } else {
      p.y_partial[(static_cast<int64_t>(blockIdx.z) * p.n_tokens + t) * p.max_rank + j] = sum;
    }
  }
}

// y[t, j] = scale * sum over the splits, in split order.
__global__ void shrink_reduce_kernel(MultiLoraParams p, int64_t splits) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t n = p.n_tokens * p.max_rank;
  if (e >= n) return;
  const int64_t t = e / p.max_rank, j = e % p.max_rank;
  const int64_t l = valid_slot(p, p.idx[t]);
  if (l < 0 || j >= rank_of(p, l)) {
    p.y_out[e] = 0.f;
    return;
  }
  float sum = 0.f;
  for (int64_t s = 0; s < splits; ++s) sum += p.y_partial[s * n + e];
  p.y_out[e] = p.scales[l] * sum;
}

// grid (tokens, ceil(out / (kExpandThreads / lanes))): out[t, o] += y[t, :r] . B[l, o, :r], `lanes` threads
// per o splitting the rank, reduced by xor shuffles within the group (lanes is a power of two <= 32).
template <typename T>
__global__ void bgmv_expand_kernel(MultiLoraParams p, int lanes, bool vec) {
  LORABENCH_DYNAMIC_SHARED(float, ys);  // y[t, :r]
  const int64_t t = blockIdx.x;
  const int64_t l = valid_slot(p, p.idx[t]);
  if (l < 0) return;  // uniform over the block
  const int64_t r = rank_of(p, l);
  for (int64_t j = threadIdx.x; j < r; j += blockDim.x) ys[j] = p.y_in[t * p.max_rank + j];
  __syncthreads();
  const int g = threadIdx.x % lanes;
  const int64_t o = static_cast<int64_t>(blockIdx.y) * (blockDim.x / lanes) + threadIdx.x / lanes;
  float acc = 0.f;
  if (o < p.out_features) {
    const T* b = static_cast<const T*>(p.w) + (l * p.out_features + o) * p.max_rank;  // B[l, o, :]
    if (vec) {  // max_rank % n == 0: a 16-byte load never passes the row's end (only, maybe, its rank)
      constexpr int n = VecWidth<T>::value;
      for (int64_t j = static_cast<int64_t>(g) * n; j < r; j += static_cast<int64_t>(lanes) * n) {
        float bv[n];
        load16(b + j, bv);
#pragma unroll
        for (int e = 0; e < n; ++e)
          if (j + e < r) acc = fmaf(ys[j + e], bv[e], acc);
      }
    } else {
      for (int64_t j = g; j < r; j += lanes) acc = fmaf(ys[j], elem_to_float(b[j]), acc);
    }
  }
  for (int offset = lanes / 2; offset > 0; offset /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
  if (g == 0 && o < p.out_features && r > 0) {
    T* dst = static_cast<T*>(p.out) + t * p.out_row_stride + o;
    *dst = from_float<T>(elem_to_float(*dst) + acc);
  }
}

// ---- SGMV: grouped GEMM over segments ------------------------------------------------------------------

struct Tile {
  int64_t slot, m0, m1;  // slot (-1: none) and tokens [m0, m1) of this block's tile; m0 = m1: no tile
};

// Tile blockIdx.x of the segments' tiles of kTileM tokens, in segment order (thread 0 scans the offsets;
// S is the number of requests, small). Offsets are clamped to [0, T] and to not decrease, so bad ones read
// and write nothing out of bounds (the binding zero-fills y for tokens no segment covers).
__device__ Tile find_tile(const MultiLoraParams& p) {
  __shared__ int64_t found[3];
  if (threadIdx.x == 0) {
    int64_t left = blockIdx.x;
    found[0] = -1;
    found[1] = found[2] = 0;
    int64_t prev = 0;
    for (int64_t s = 0; s < p.n_segments; ++s) {
      int64_t a = p.seg_starts[s], b = p.seg_starts[s + 1];
      a = a < prev ? prev : (a > p.n_tokens ? p.n_tokens : a);
      b = b < a ? a : (b > p.n_tokens ? p.n_tokens : b);
      prev = b;
      const int64_t tiles = (b - a + kTileM - 1) / kTileM;
      if (left < tiles) {
        found[0] = valid_slot(p, p.seg_idx[s]);
        found[1] = a + left * kTileM;
        found[2] = found[1] + kTileM < b ? found[1] + kTileM : b;
        break;
      }
      left -= tiles;
    }
  }
  __syncthreads();
  const Tile tile{found[0], found[1], found[2]};
  __syncthreads();
  return tile;
}

// grid (ceil(T / kTileM) + S, ceil(max_rank / kShrinkTileN)), 16 x 16 threads: y[m0:m1, n0:n0+16] of one
// segment = scale x[m0:m1] A[l, n0:n0+16]^T, `in` in stages of kShrinkTileK through shared memory; each
// thread two tokens (tm, tm + 16) of one row (tn).
template <typename T>
__global__ void sgmv_shrink_kernel(MultiLoraParams p) {
  __shared__ float xs[kTileM][kShrinkTileK + 1];
  __shared__ float as[kShrinkTileN][kShrinkTileK + 1];
  const Tile tile = find_tile(p);
  if (tile.m0 >= tile.m1) return;  // uniform: a block past the last tile
  const int tid = threadIdx.x, tn = tid % kShrinkTileN, tm = tid / kShrinkTileN;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kShrinkTileN;
  const int64_t r = tile.slot < 0 ? 0 : rank_of(p, tile.slot);
  float acc[2] = {0.f, 0.f};
  if (n0 < r) {  // uniform
    const T* x = static_cast<const T*>(p.x);
    const T* a = static_cast<const T*>(p.w) + tile.slot * p.max_rank * p.in_features;  // A[l]
    for (int64_t k0 = 0; k0 < p.in_features; k0 += kShrinkTileK) {
      for (int e = tid; e < kTileM * kShrinkTileK; e += kShrinkTileN * 16) {  // consecutive threads, consecutive k
        const int mm = e / kShrinkTileK, kk = e % kShrinkTileK;
        const int64_t t = tile.m0 + mm, k = k0 + kk;
        xs[mm][kk] = (t < tile.m1 && k < p.in_features) ? elem_to_float(x[t * p.x_row_stride + k]) : 0.f;
      }
      for (int e = tid; e < kShrinkTileN * kShrinkTileK; e += kShrinkTileN * 16) {
        const int nn = e / kShrinkTileK, kk = e % kShrinkTileK;
        const int64_t j = n0 + nn, k = k0 + kk;
        as[nn][kk] = (j < r && k < p.in_features) ? elem_to_float(a[j * p.in_features + k]) : 0.f;
      }
      __syncthreads();
#pragma unroll 8
      for (int kk = 0; kk < kShrinkTileK; ++kk) {
        const float av = as[tn][kk];
        acc[0] = fmaf(xs[tm][kk], av, acc[0]);
        acc[1] = fmaf(xs[tm + 16][kk], av, acc[1]);
      }
      __syncthreads();
    }
  }
  const int64_t j = n0 + tn;
  for (int i = 0; i < 2; ++i) {
    const int64_t t = tile.m0 + tm + 16 * i;
    if (t < tile.m1 && j < p.max_rank) p.y_out[t * p.max_rank + j] = j < r ? p.scales[tile.slot] * acc[i] : 0.f;
  }
}

// grid (ceil(T / kTileM) + S, ceil(out / kExpandTileN)), 64 x 4 threads: out[m0:m1, o0:o0+64] += y[m0:m1, :r]
// B[l, o0:o0+64, :r]^T, the rank in stages of kExpandTileK; each thread one output column (tn: consecutive
// threads write consecutive features) for 8 tokens (tm + 4 i).
template <typename T>
__global__ void sgmv_expand_kernel(MultiLoraParams p) {
  __shared__ float ys[kTileM][kExpandTileK + 1];
  __shared__ float bs[kExpandTileN][kExpandTileK + 1];
  const Tile tile = find_tile(p);
  if (tile.m0 >= tile.m1 || tile.slot < 0) return;  // uniform
  const int64_t r = rank_of(p, tile.slot);
  if (r == 0) return;
  const int tid = threadIdx.x, tn = tid % kExpandTileN, tm = tid / kExpandTileN;
  const int64_t o0 = static_cast<int64_t>(blockIdx.y) * kExpandTileN;
  const T* b = static_cast<const T*>(p.w) + tile.slot * p.out_features * p.max_rank;  // B[l]
  float acc[kTileM / 4];
#pragma unroll
  for (int i = 0; i < kTileM / 4; ++i) acc[i] = 0.f;
  for (int64_t k0 = 0; k0 < r; k0 += kExpandTileK) {
    for (int e = tid; e < kTileM * kExpandTileK; e += kExpandTileN * 4) {
      const int mm = e / kExpandTileK, kk = e % kExpandTileK;
      const int64_t t = tile.m0 + mm, j = k0 + kk;
      ys[mm][kk] = (t < tile.m1 && j < r) ? p.y_in[t * p.max_rank + j] : 0.f;
    }
    for (int e = tid; e < kExpandTileN * kExpandTileK; e += kExpandTileN * 4) {  // rows of B, contiguous in j
      const int nn = e / kExpandTileK, kk = e % kExpandTileK;
      const int64_t o = o0 + nn, j = k0 + kk;
      bs[nn][kk] = (o < p.out_features && j < r) ? elem_to_float(b[o * p.max_rank + j]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kExpandTileK; ++kk) {
      const float bv = bs[tn][kk];
#pragma unroll
      for (int i = 0; i < kTileM / 4; ++i) acc[i] = fmaf(ys[tm + 4 * i][kk], bv, acc[i]);
    }
    __syncthreads();
  }
  const int64_t o = o0 + tn;
  if (o >= p.out_features) return;
#pragma unroll
  for (int i = 0; i < kTileM / 4; ++i) {
    const int64_t t = tile.m0 + tm + 4 * i;
    if (t < tile.m1) {
      T* dst = static_cast<T*>(p.out) + t * p.out_row_stride + o;
      *dst = from_float<T>(elem_to_float(*dst) + acc[i]);
    }
  }
}

// ---- host side ------------------------------------------------------------------------------------------

template <typename F>
void dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(float{}); break;
    case DType::kBFloat16: f(__nv_bfloat16{}); break;
    case DType::kFloat16: f(__half{}); break;
    case DType::kFloat64: break;  // no fp64 kernel: the binding refuses it (cuda_dtype)
  }
}

int64_t elem_size(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

// Rows of A per BGMV shrink block: 4 (each x vector used four times) where tokens x rank alone make
// plenty of blocks, else 1.
int64_t shrink_rows(const MultiLoraParams& p) { return p.n_tokens * p.max_rank >= 4 * kTargetBlocks ? 4 : 1; }

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// `in` per BGMV shrink block: all of it, or (few blocks) an equal share of it over enough splits to make
// about kTargetBlocks blocks, rounded up to a multiple of 8 so that every split starts on a 16-byte vector.
int64_t shrink_split_len(const MultiLoraParams& p) {
  const int64_t blocks = p.n_tokens * cdiv(p.max_rank, shrink_rows(p));
  if (blocks >= kTargetBlocks || p.in_features <= kSplitK) return p.in_features;
  const int64_t by_in = cdiv(p.in_features, kSplitK), by_blocks = cdiv(kTargetBlocks, blocks);
  const int64_t splits = by_in < by_blocks ? by_in : by_blocks;
  return cdiv(cdiv(p.in_features, splits), 8) * 8;
}

int64_t shrink_splits(const MultiLoraParams& p) {
  return p.in_features == 0 ? 1 : cdiv(p.in_features, shrink_split_len(p));
}

void bgmv_shrink(const MultiLoraParams& p, cudaStream_t stream) {
  const int64_t rows = shrink_rows(p), splits = shrink_splits(p);
  const int64_t n = 16 / elem_size(p.dtype);  // elements per 16-byte load
  const bool vec = aligned16(p.x) && aligned16(p.w) && p.in_features % n == 0 && p.x_row_stride % n == 0;
  const int64_t split_len = shrink_split_len(p);
  const dim3 grid(static_cast<unsigned>(p.n_tokens), static_cast<unsigned>(cdiv(p.max_rank, rows)),
                  static_cast<unsigned>(splits));
  dispatch(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (rows == 4) launch_kernel(bgmv_shrink_kernel<T, 4>, grid, dim3(kShrinkThreads), 0, stream, p, split_len, vec);
    else launch_kernel(bgmv_shrink_kernel<T, 1>, grid, dim3(kShrinkThreads), 0, stream, p, split_len, vec);
  });
  if (splits > 1) {
    const int64_t n_out = p.n_tokens * p.max_rank;
    launch_kernel(shrink_reduce_kernel, dim3(static_cast<unsigned>(cdiv(n_out, 256))), dim3(256), 0, stream, p,
                  splits);
  }
}

void bgmv_expand(const MultiLoraParams& p, cudaStream_t stream) {
  const int64_t n = 16 / elem_size(p.dtype);
  int lanes = 1;  // threads per output feature: enough 16-byte loads to cover max_rank, a power of two <= 32
  while (lanes < 32 && lanes * n < p.max_rank) lanes *= 2;
  const bool vec = aligned16(p.w) && p.max_rank % n == 0;
  const dim3 grid(static_cast<unsigned>(p.n_tokens), static_cast<unsigned>(cdiv(p.out_features, kExpandThreads / lanes)));
  dispatch(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_kernel(bgmv_expand_kernel<T>, grid, dim3(kExpandThreads), p.max_rank * sizeof(float), stream, p, lanes,
                  vec);
  });
}

unsigned sgmv_tiles(const MultiLoraParams& p) {  // >= the sum over segments of ceil(length / kTileM)
  return static_cast<unsigned>(cdiv(p.n_tokens, kTileM) + p.n_segments);
}

}  // namespace

int64_t multi_lora_shrink_workspace(const MultiLoraParams& p) {
  if (p.idx == nullptr || p.n_tokens == 0 || p.max_rank == 0) return 0;
  const int64_t splits = shrink_splits(p);
  return splits > 1 ? splits * p.n_tokens * p.max_rank : 0;
}

void multi_lora_shrink_cuda(const MultiLoraParams& p) {
  if (p.n_tokens == 0 || p.max_rank == 0) return;
  auto stream = static_cast<cudaStream_t>(p.stream);
  if (p.idx != nullptr) {
    bgmv_shrink(p, stream);
    return;
  }
  if (p.n_segments == 0) return;
  const dim3 grid(sgmv_tiles(p), static_cast<unsigned>(cdiv(p.max_rank, kShrinkTileN)));
  dispatch(p.dtype, [&](auto tag) {
    launch_kernel(sgmv_shrink_kernel<decltype(tag)>, grid, dim3(kShrinkTileN * 16), 0, stream, p);
  });
}

void multi_lora_expand_cuda(const MultiLoraParams& p) {
  if (p.n_tokens == 0 || p.max_rank == 0 || p.out_features == 0) return;
  auto stream = static_cast<cudaStream_t>(p.stream);
  if (p.idx != nullptr) {
    bgmv_expand(p, stream);
    return;
  }
  if (p.n_segments == 0) return;
  const dim3 grid(sgmv_tiles(p), static_cast<unsigned>(cdiv(p.out_features, kExpandTileN)));
  dispatch(p.dtype, [&](auto tag) {
    launch_kernel(sgmv_expand_kernel<decltype(tag)>, grid, dim3(kExpandTileN * 4), 0, stream, p);
  });
}

}  // namespace lorabench::cuda
