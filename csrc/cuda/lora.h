// CUDA kernels of the fused LoRA / DoRA linear ops: params structs of raw pointers and sizes, and
// host launchers. C++ only (no CUDA or torch types), so csrc/lora_ops.cpp can include it and
// lora.cu compiles standalone with nvcc.
//
// The GEMMs of LoRA run in cuBLAS through ATen in the binding (addmm with beta = 1 accumulates the
// low-rank product into the base output in place); these kernels are DoRA's row norms, output
// epilogue and gradient prologue. All tensors are contiguous row-major. Accumulation ("acc") is
// float for fp32/fp16/bf16 and double for fp64.
#pragma once

#include <cstdint>

#include "dtype.h"

namespace lorabench::cuda {

// norm[j] = sqrt(||W_j||^2 + sum_k B_jk (2 s WA_jk + s^2 BG_jk)); a, wa, bg, b, norm are acc-typed.
// Rows where that sum is under cancellation x (||W_j||^2 + s^2 ||(BA)_j||^2) are recomputed from the
// formed row W_j + s B_j A.
struct DoraNormParams {
  const void* weight;  // (out, in), dtype
  const void* a;       // (r, in) = A
  const void* wa;      // (out, r) = W A^T
  const void* bg;      // (out, r) = B (A A^T)
  const void* b;       // (out, r) = B
  void* norm;          // (out,)
  int64_t out, in, rank;
  double scale;
  double cancellation;
  DType dtype;
};

// y[t, j] = (accumulate ? y[t, j] : 0) + g[j] * u[t, j] + bias[j]   (bias may be null)
struct DoraEpilogueParams {
  void* y;             // (tokens, out), dtype
  const void* u;       // (tokens, out), dtype
  const void* g;       // (out,), acc
  const void* bias;    // (out,), dtype, or nullptr
  int64_t tokens, out;
  bool accumulate;
  DType dtype;
};

// du[t, j] = dy[t, j] g[j];  dm[j] = sum_t dy[t, j] u[t, j] / norm[j]
// A 2-D grid: blocks of 32 columns x kDoraGradTokens tokens; with more than one block of tokens, each
// writes its partial sums to `partial` and a second pass adds them in block order (deterministic).
struct DoraGradParams {
  const void* dy;      // (tokens, out), dtype
  const void* u;       // (tokens, out), dtype
  const void* g;       // (out,), acc
  const void* norm;    // (out,), acc
  void* du;            // (tokens, out), dtype
  void* dm;            // (out,), acc
  int64_t tokens, out;
  DType dtype;
  void* partial = nullptr;  // dora_grad_workspace(p) acc-typed elements, or nullptr when that is 0
};
// Elements (of the acc type: float, or double for fp64) of p.partial the gradient kernel needs.
int64_t dora_grad_workspace(const DoraGradParams& p);

// Each returns 0 on success or the cudaError_t of the launch; stream is a cudaStream_t.
int launch_dora_norm(const DoraNormParams& p, void* stream);
int launch_dora_epilogue(const DoraEpilogueParams& p, void* stream);
int launch_dora_grad(const DoraGradParams& p, void* stream);
const char* error_string(int code);

}  // namespace lorabench::cuda
