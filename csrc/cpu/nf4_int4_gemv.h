// CPU kernels shared by the 4-bit linear ops (NF4 of QLoRA arXiv 2305.14314, group-wise int4 of QA-LoRA
// arXiv 2309.14717): both store two 4-bit codes per byte (element 2i in the high nibble) and dequantize
// as w = lut[q] * scale(group) + zero(group); NF4: lut = the NF4 code book, zero = 0; int4: lut[q] = q.
//
// Kernel order. One 32-byte load holds 64 consecutive weights of a row and is decoded into 8 vectors of
// 8 floats without putting the weights back in order: int4 reads nibble j of the 8 int32 lanes (shift,
// mask, int->float; the GEMV masks in place and takes 2^(4j) into its permuted input); NF4 looks up the 4 bytes of each fp32 code with in-lane byte shuffles (pshufb) and
// interleaves them (lane-crossing permutes were the bottleneck). The input is permuted once per call
// (permute_input) into the matching order, so the packed weights are streamed once and never unpacked to
// memory. Inputs are validated by the binding (csrc/quant_ops.cpp).
#pragma once
#include <cstdint>

namespace lorabench::cpu {

extern const float kNF4Code[16];

struct Q4Weight {
  const uint8_t* packed = nullptr;  // (N, K/2) row-major
  int64_t N = 0, K = 0;             // K % 64 == 0
  int64_t group = 64;               // elements per scale along a row: a power of two >= 32 dividing K
  const float* scale = nullptr;     // (N * K / group) fp32, or nullptr with double quantization:
  const uint8_t* scale_q8 = nullptr;  //   8-bit codes, scale = code2[q] * scale2[i / 256] + offset
  const float* scale2 = nullptr;
  const float* code2 = nullptr;
  float offset = 0.f;
  const float* zero = nullptr;      // (N * K / group) additive offsets (int4), nullptr for NF4
  bool int_codes = false;           // true: lut[q] = q (int4); false: NF4 code book

  inline float group_scale(int64_t g) const {
    if (scale_q8 == nullptr) return scale[g];
    const float s = code2[scale_q8[g]] * scale2[g >> 8];  // two roundings, as bitsandbytes
    return s + offset;
  }
};

// x (B, K) fp32 with row stride ldx -> x_perm (B, K) contiguous in the kernel order of the format.
// gemv: the input of q4_gemv, whose int4 decode (AVX2) wants slot j < 7 of each chunk scaled by 2^(-4j)
// (exact); otherwise (q4_dequantize_rows + GEMM) unscaled.
void permute_input(const float* x, int64_t B, int64_t K, int64_t ldx, bool int_codes, bool gemv, float* x_perm);

// out[b, n] = sum_k x[b, k] w[n, k] for b < B (any B; best for B <= 16), n < N; x_perm from permute_input
// (gemv = true),
// xsum (B, K/group) the per-group sums of x (int4 only, else nullptr); out (B, N) with row stride ldo.
// Multi-threaded over rows with at::parallel_for.
void q4_gemv(const Q4Weight& w, const float* x_perm, const float* xsum, int64_t B, float* out, int64_t ldo);

// Rows [n0, n1) dequantized in kernel order into buf ((n1 - n0), K) fp32; multi-threaded.
void q4_dequantize_rows(const Q4Weight& w, int64_t n0, int64_t n1, float* buf);

}  // namespace lorabench::cpu
