// Group-wise int4 quantize / dequantize on CPU, see int4.h. Multi-threaded over rows.
// Products and sums are rounded separately (w = q * s + z, absmax = code * absmax2 + offset), as the
// references and bitsandbytes do: GCC would otherwise contract them into FMAs in C++ mode.
#pragma GCC optimize("fp-contract=off")
#include "int4.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

namespace lorabench::cpu {

void int4_quantize(const float* w, int64_t N, int64_t K, int64_t group, uint8_t* packed, float* scales,
                   float* zeros) {
  const int64_t G = K / group;
  at::parallel_for(0, N, std::max<int64_t>(1, 32768 / K), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t g = 0; g < G; ++g) {
        const float* src = w + n * K + g * group;
        float lo = src[0], hi = src[0];
        for (int64_t k = 1; k < group; ++k) {
          lo = std::min(lo, src[k]);
          hi = std::max(hi, src[k]);
        }
        float s = (hi - lo) / 15.0f;
        if (s == 0.f) s = 1.f;
        scales[n * G + g] = s;
        zeros[n * G + g] = lo;
        uint8_t* dst = packed + n * (K / 2) + g * (group / 2);
        for (int64_t k = 0; k < group; k += 2) {
          const float q0 = std::min(std::max(std::nearbyint((src[k] - lo) / s), 0.f), 15.f);
          const float q1 = std::min(std::max(std::nearbyint((src[k + 1] - lo) / s), 0.f), 15.f);
          dst[k / 2] = static_cast<uint8_t>((static_cast<int>(q0) << 4) | static_cast<int>(q1));
        }
      }
    }
  });
}

void int4_dequantize(const uint8_t* packed, const float* scales, const float* zeros, int64_t N, int64_t K,
                     int64_t group, float* out) {
  const int64_t G = K / group;
  at::parallel_for(0, N, std::max<int64_t>(1, 32768 / K), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t k = 0; k < K; ++k) {
        const uint8_t byte = packed[n * (K / 2) + k / 2];
        const float q = static_cast<float>((k & 1) ? (byte & 15) : (byte >> 4));
        const float p = q * scales[n * G + k / group];
        out[n * K + k] = p + zeros[n * G + k / group];
      }
  });
}

}  // namespace lorabench::cpu
