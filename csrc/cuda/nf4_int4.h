// CUDA launchers of the 4-bit weight ops (NF4 of QLoRA arXiv 2305.14314, group-wise int4 of QA-LoRA
// arXiv 2309.14717). C++-only header: no torch, no CUDA types, so the torch binding
// (csrc/quant_ops.cpp) includes it and nf4_int4.cu compiles alone with nvcc.
//
// Both formats: the weight flattened row-major, two codes per byte (element 2i in the high nibble),
// w_i = lut[q_i] * scale[i / group] + zero[i / group] with lut = NF4 (zero = nullptr) or lut[q] = q (int4).
// For int4 the group index i / group equals row * (K / group) + col / group because K % group == 0.
#pragma once
#include <cstdint>

#include "dtype.h"

namespace lorabench::cuda {

struct Q4Params {
  const uint8_t* packed = nullptr;    // (ceil(n/2),) bytes
  int64_t N = 0, K = 0;               // rows, columns (n = N * K)
  int64_t group = 64;                 // elements per scale (NF4 blocksize / int4 group size), even
  const float* scale = nullptr;       // (n / group) fp32, or nullptr with double quantization:
  const uint8_t* scale_q8 = nullptr;  //   scale_i = code2[q_i] * scale2[i / 256] + *offset
  const float* scale2 = nullptr;
  const float* code2 = nullptr;
  const float* offset = nullptr;      // device pointer to one float (no host synchronisation)
  const float* zero = nullptr;        // (n / group) fp32 additive offsets (int4), nullptr for NF4
  bool int_codes = false;
  void* stream = nullptr;             // cudaStream_t
};

// out (N * K values of `dtype`) = the dense weight, fp32 arithmetic then cast.
void q4_dequantize_cuda(const Q4Params& p, void* out, DType dtype);

// out[b, n] (fp32, row stride ldo) = sum_k x[b, k] w[n, k] for b < B <= kMaxGemvBatch; x of `dtype`
// with row stride ldx and unit column stride. Needs K % 32 == 0 (16-byte loads of 32 weights) and
// 16-byte aligned packed rows. One warp per output row; x is read by 16-byte vectors where its rows are
// 16-byte aligned, by scalars otherwise.
constexpr int64_t kMaxGemvBatch = 8;
void q4_gemv_cuda(const Q4Params& p, const void* x, int64_t ldx, DType dtype, int64_t B, float* out, int64_t ldo);

}  // namespace lorabench::cuda
