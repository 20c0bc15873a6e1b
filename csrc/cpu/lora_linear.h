// CPU helpers of the fused LoRA / DoRA linear ops (csrc/lora_ops.cpp holds the op bodies).
//
// The GEMMs of LoRA go to BLAS through ATen (at::addmm with beta = 1 accumulates the low-rank
// product into the base output in place: no temporary, no extra pass over y). What BLAS cannot
// fuse lives here: DoRA's row norms, its output epilogue and its gradient prologue, each one
// pass over memory with at::parallel_for and loops the compiler vectorises (-O3 -march=native).
// Accumulation type: float for fp32/bf16/fp16, double for fp64.
#pragma once

#include <ATen/ATen.h>

namespace lorabench::cpu {

// norm[j] = sqrt(||W_j||^2 + sum_k B_jk (2 s WA_jk + s^2 BG_jk)) = ||W_j + s (BA)_j||  (DoRA eq. (5))
// weight (out, in) any float dtype; a = A (r, in), wa = W A^T, bg = B (A A^T), b = B (out, r): acc dtype.
// A row whose sum falls under `cancellation` x (||W_j||^2 + s^2 ||(BA)_j||^2) lost digits to
// cancellation: it is recomputed from the formed row W_j + s B_j A (that row only).
void dora_norm(const at::Tensor& weight, const at::Tensor& a, const at::Tensor& wa, const at::Tensor& bg,
               const at::Tensor& b, double scale, double cancellation, at::Tensor& norm);

// y[t, j] = (accumulate ? y[t, j] : 0) + g[j] * u[t, j] + bias[j]; y and u contiguous (tokens, out).
void dora_epilogue(at::Tensor& y, const at::Tensor& u, const at::Tensor& g,
                   const c10::optional<at::Tensor>& bias, bool accumulate);

// du[t, j] = dy[t, j] * g[j];  dm[j] = sum_t dy[t, j] u[t, j] / norm[j]  (d y / d m = u / ||.||_c)
void dora_grad(const at::Tensor& dy, const at::Tensor& u, const at::Tensor& g, const at::Tensor& norm,
               at::Tensor& du, at::Tensor& dm);

}  // namespace lorabench::cpu
