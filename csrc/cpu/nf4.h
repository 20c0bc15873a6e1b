// CPU kernels of NF4 quantization (QLoRA arXiv 2305.14314 sec. 3) in bitsandbytes' layout, see
// lorabench/ops/nf4.py. Raw pointers, validated by the binding (csrc/quant_ops.cpp).
#pragma once
#include <cstdint>

namespace lorabench::cpu {

// Blockwise absmax NF4 of n fp32 values (flattened weight), bit-exact with bitsandbytes' quantize_4bit:
// packed ((n + 1) / 2) bytes, element 2i in the high nibble; absmax (ceil(n / blocksize)) fp32.
void nf4_quantize(const float* x, int64_t n, int64_t blocksize, uint8_t* packed, float* absmax);

// absmax_i = code2[q_i] * absmax2[i / 256] + offset (double quantization), n_blocks values.
void nf4_decode_absmax(const uint8_t* q, const float* absmax2, const float* code2, float offset, int64_t n_blocks,
                       float* absmax);

// out_i = NF4[q_i] * absmax[i / blocksize] (fp32), n values.
void nf4_dequantize(const uint8_t* packed, const float* absmax, int64_t n, int64_t blocksize, float* out);

}  // namespace lorabench::cpu
