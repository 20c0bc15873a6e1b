// CPU kernels of group-wise asymmetric int4 (QA-LoRA arXiv 2309.14717 eq. (1)), see lorabench/ops/int4.py.
#pragma once
#include <cstdint>

namespace lorabench::cpu {

// w (N, K) fp32 -> packed (N, K/2) (element 2i in the high nibble), scales and zeros (N, K/group):
// scale = (max - min) / 15 (1 for a constant group), zero = min, q = clamp(round((w - zero) / scale), 0, 15).
void int4_quantize(const float* w, int64_t N, int64_t K, int64_t group, uint8_t* packed, float* scales,
                   float* zeros);

// out (N, K) = q * scale + zero (fp32, two roundings as the reference).
void int4_dequantize(const uint8_t* packed, const float* scales, const float* zeros, int64_t N, int64_t K,
                     int64_t group, float* out);

}  // namespace lorabench::cpu
