// CUDA launchers of the multi-adapter LoRA ops (BGMV / SGMV). C++-only header: no torch, no CUDA
// types, so the torch binding (csrc/multi_lora_ops.cpp) includes it and each .cu compiles alone.
// Layout and semantics: lorabench/ops/multi_lora.py. Inputs are validated by the binding; the
// kernels treat a slot index outside [0, n_slots) as "no adapter" and clamp ranks to max_rank, so a
// bad index can never read out of bounds (the CPU binding rejects it with an error instead).
#pragma once
#include <cstdint>

#include "dtype.h"

namespace lorabench::cuda {

struct MultiLoraParams {
  DType dtype;                  // fp32, bf16 or fp16
  const void* x = nullptr;      // shrink input (T, in), unit last stride
  int64_t x_row_stride = 0;
  void* out = nullptr;          // expand output (T, out), unit last stride, updated in place
  int64_t out_row_stride = 0;
  float* y_out = nullptr;       // shrink output (T, R) fp32 contiguous: every element written (SGMV: of
                                // the tokens its segments cover; the binding zero-fills y first)
  float* y_partial = nullptr;   // BGMV shrink workspace, multi_lora_shrink_workspace(p) floats (or nullptr if 0)
  const float* y_in = nullptr;  // expand input (T, R) fp32 contiguous
  const void* w = nullptr;      // A (L, R, in) for shrink, B (L, out, R) for expand; contiguous
  const int64_t* idx = nullptr;         // (T,) slot per token (BGMV), or nullptr with segments
  const int64_t* seg_starts = nullptr;  // (S+1,) SGMV segment offsets
  const int64_t* seg_idx = nullptr;     // (S,) slot per segment
  int64_t n_segments = 0;
  const int64_t* ranks = nullptr;  // (L,)
  const float* scales = nullptr;   // (L,), shrink only
  int64_t n_tokens = 0, n_slots = 0, max_rank = 0, in_features = 0, out_features = 0;
  void* stream = nullptr;  // cudaStream_t
};

// y[t, :r] = scales[l] x[t] A[l, :r]^T, y[t, r:] = 0 (and y[t] = 0 without an adapter).
void multi_lora_shrink_cuda(const MultiLoraParams& p);
// Floats of fp32 workspace (p.y_partial) the shrink needs: > 0 when BGMV splits `in` across blocks (few
// tokens), 0 otherwise. Depends on the sizes, idx and dtype of p only.
int64_t multi_lora_shrink_workspace(const MultiLoraParams& p);
// out[t] += y[t, :r] B[l, :, :r]^T.
void multi_lora_expand_cuda(const MultiLoraParams& p);

}  // namespace lorabench::cuda
