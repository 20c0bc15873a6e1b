// NF4 quantize / dequantize on CPU, see nf4.h. Multi-threaded over blocks; the arithmetic mirrors
// bitsandbytes' reference step by step (reciprocal then multiply for full blocks, division for the
// partial last block, nearest code with ties to the lower one) so the bytes are identical.
// Products and sums are rounded separately (w = q * s + z, absmax = code * absmax2 + offset), as the
// references and bitsandbytes do: GCC would otherwise contract them into FMAs in C++ mode.
#pragma GCC optimize("fp-contract=off")
#include "nf4.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "nf4_int4_gemv.h"

namespace lorabench::cpu {

namespace {
// Index of the nearest NF4 value, ties to the lower: the number of midpoints strictly below s
// (torch.bucketize with right=False, as bitsandbytes).
inline uint8_t nf4_code_of(float s, const float* mid) {
  uint8_t q = 0;
  for (int i = 0; i < 15; ++i) q += mid[i] < s;
  return q;
}
}  // namespace

void nf4_quantize(const float* x, int64_t n, int64_t blocksize, uint8_t* packed, float* absmax) {
  float mid[15];
  for (int i = 0; i < 15; ++i) mid[i] = (kNF4Code[i] + kNF4Code[i + 1]) / 2;
  const int64_t blocks = (n + blocksize - 1) / blocksize;
  const int64_t full = n / blocksize;
  // blocksize is even, so a block never shares a byte with the next one.
  at::parallel_for(0, blocks, std::max<int64_t>(1, 32768 / blocksize), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i0 = b * blocksize, i1 = std::min(n, i0 + blocksize);
      float am = 0.f;
      for (int64_t i = i0; i < i1; ++i) am = std::max(am, std::fabs(x[i]));
      const bool partial = b >= full;
      if (partial) am = std::max(am, 1e-38f);  // the partial block stores its clamped absmax
      absmax[b] = am;
      const float r = 1.0f / std::max(am, 1e-38f);
      for (int64_t i = i0; i < i1; i += 2) {
        uint8_t q[2] = {7, 7};  // an odd tail pads with 0.0, NF4 code 7
        for (int k = 0; k < 2 && i + k < i1; ++k) {
          const float s = partial ? x[i + k] / am : x[i + k] * r;
          q[k] = nf4_code_of(std::min(std::max(s, -1.0f), 1.0f), mid);
        }
        packed[i / 2] = static_cast<uint8_t>((q[0] << 4) | q[1]);
      }
    }
  });
}

void nf4_decode_absmax(const uint8_t* q, const float* absmax2, const float* code2, float offset, int64_t n_blocks,
                       float* absmax) {
  for (int64_t i = 0; i < n_blocks; ++i) {
    const float s = code2[q[i]] * absmax2[i >> 8];
    absmax[i] = s + offset;
  }
}

void nf4_dequantize(const uint8_t* packed, const float* absmax, int64_t n, int64_t blocksize, float* out) {
  const int64_t blocks = (n + blocksize - 1) / blocksize;
  at::parallel_for(0, blocks, std::max<int64_t>(1, 32768 / blocksize), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float s = absmax[b];
      const int64_t i0 = b * blocksize, i1 = std::min(n, i0 + blocksize);
      for (int64_t i = i0; i < i1; ++i) {
        const uint8_t byte = packed[i >> 1];
        out[i] = kNF4Code[(i & 1) ? (byte & 15) : (byte >> 4)] * s;
      }
    }
  });
}

}  // namespace lorabench::cpu
