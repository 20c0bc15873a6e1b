// The low-rank products of a LoRA path (arXiv 2106.09685) in the orientation BLAS is fast at on CPU.
// Shared by the fused LoRA / DoRA ops (csrc/lora_ops.cpp) and the 4-bit linear ops' LoRA path
// (csrc/quant_ops.cpp: QLoRA arXiv 2305.14314, QA-LoRA arXiv 2309.14717).
//
// BLAS (MKL in torch 2.13, one thread, Zen 3) is slow at products with few output columns:
//   dB = s dy^T xa (out, r): 1.9 ms against 0.32 ms for (xa^T dy)^T at 512 tokens, out 1536, rank 8, and
//     167 ms against 12 ms at 4096 tokens, out 4096, rank 8; 1.1-1.8x at rank 16, about even at 64; at
//     1 token the direct form is faster (5 vs 15 us). grad_b takes the transposed form from 256 tokens at
//     every rank, or from 16 tokens at rank <= 8.
//   a (m, k) @ b (k, n) with n = rank <= 8 (dy B, x A^T): dy B took 1.05 ms against 0.30 ms for
//     (B^T dy^T)^T at 512 tokens, out 1536, rank 8; x A^T 0.17 against 0.12 ms at in 576 (about even at
//     rank 16). narrow_mm takes it transposed from 128 rows, then makes it contiguous (m x n: small).
// Both sides of each switch are tested (tests/kernels/test_lora_linear.py, test_dora_linear.py,
// test_quant_backward_orientations in tests/kernels/test_nf4.py).
#pragma once
#include <ATen/ATen.h>

namespace lorabench {

inline at::Tensor narrow_mm(const at::Tensor& a, const at::Tensor& b) {
  if (a.is_cpu() && b.size(1) <= 8 && a.size(0) >= 128) return at::mm(b.t(), a.t()).t().contiguous();
  return at::mm(a, b);
}

// s dy^T xa, (out, r)
inline at::Tensor grad_b(const at::Tensor& dy, const at::Tensor& xa, double scale) {
  const int64_t tokens = dy.size(0), rank = xa.size(1);
  if (dy.is_cpu() && (tokens >= 256 || (rank <= 8 && tokens >= 16)))
    return at::mm(xa.t(), dy).t().contiguous().mul_(scale);
  return at::mm(dy.t(), xa).mul_(scale);
}

}  // namespace lorabench
