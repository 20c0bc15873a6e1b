// 4-bit GEMV / dequantization kernels, see nf4_int4_gemv.h. AVX2 through the compiler (-march=native)
// with a portable scalar fallback of the same kernel order.
// Products and sums are rounded separately (w = q * s + z, absmax = code * absmax2 + offset), as the
// references and bitsandbytes do: GCC would otherwise contract them into FMAs in C++ mode.
#pragma GCC optimize("fp-contract=off")
#include "nf4_int4_gemv.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LB_Q4_AVX2 1
#endif

namespace lorabench::cpu {

// The 16 NF4 values (QLoRA sec. 3), bitsandbytes' fp32 table, exactly.
alignas(32) const float kNF4Code[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,
    -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,
    0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,
    0.7229568362236023f, 1.0f};

namespace {
constexpr int64_t kChunk = 64;  // weights per 32-byte load

// Rows per task: at least ~32k weights, so small layers stay on one thread (waking the pool costs more).
inline int64_t grain_rows(int64_t K) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(K, 1)); }

// Element of the chunk held by nibble j of lane l (see the header): 8l + (j ^ 1).
inline int chunk_elem(int j, int l) { return 8 * l + (j ^ 1); }

// Scale of each of the 8 lanes of chunk c of row n: one value for group >= 64, two for group 32.
inline void chunk_scales(const Q4Weight& w, int64_t n, int64_t c, float s[2], float z[2]) {
  const int64_t G = w.K / w.group;
  const int64_t g0 = n * G + (c * kChunk) / w.group;
  s[0] = w.group_scale(g0);
  s[1] = w.group == 32 ? w.group_scale(g0 + 1) : s[0];
  z[0] = w.zero ? w.zero[g0] : 0.f;
  z[1] = w.zero ? (w.group == 32 ? w.zero[g0 + 1] : z[0]) : 0.f;
}

inline float lut_value(const Q4Weight& w, unsigned q) { return w.int_codes ? float(q) : kNF4Code[q]; }

#ifdef LB_Q4_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The 8 weights of nibble j of the chunk v (kernel order), before scaling.
template <bool INT>
inline __m256 decode(__m256i v, int j, __m256 lut_lo, __m256 lut_hi) {
  const __m256i idx = _mm256_and_si256(_mm256_srli_epi32(v, 4 * j), _mm256_set1_epi32(15));
  if constexpr (INT) {
    return _mm256_cvtepi32_ps(idx);
  } else {  // 16-entry table = two 8-entry permutes, blended on bit 3 of the index
    const __m256 lo = _mm256_permutevar8x32_ps(lut_lo, idx);
    const __m256 hi = _mm256_permutevar8x32_ps(lut_hi, idx);
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
  }
}

// NB batch rows at once over rows [n0, n1): the weights are decoded once per NB inputs.
// Per chunk: acc_b += sum_j decode_j * x_b,j (unscaled), then row_acc_b += acc_b * scale.
template <bool INT, int NB>
void gemv_rows(const Q4Weight& w, const float* xp, const float* xsum, float* out, int64_t ldo, int64_t n0,
               int64_t n1) {
  const int64_t K = w.K, chunks = K / kChunk, G = K / w.group;
  const __m256 lut_lo = _mm256_loadu_ps(kNF4Code), lut_hi = _mm256_loadu_ps(kNF4Code + 8);
  constexpr int NA = NB == 1 ? 4 : (NB == 2 ? 2 : 1);  // independent FMA chains per input row
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.packed + n * (K / 2);
    __m256 racc[NB];
    for (int b = 0; b < NB; ++b) racc[b] = _mm256_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c) {
      float s[2], z[2];
      chunk_scales(w, n, c, s, z);
      const __m256 sv = _mm256_setr_ps(s[0], s[0], s[0], s[0], s[1], s[1], s[1], s[1]);
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + c * (kChunk / 2)));
      __m256 acc[NB][NA];
      for (int b = 0; b < NB; ++b)
        for (int a = 0; a < NA; ++a) acc[b][a] = _mm256_setzero_ps();
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {
        const __m256 q = decode<INT>(v, j, lut_lo, lut_hi);
        for (int b = 0; b < NB; ++b) {
          const __m256 xv = _mm256_loadu_ps(xp + b * K + c * kChunk + j * 8);
          acc[b][j % NA] = _mm256_fmadd_ps(q, xv, acc[b][j % NA]);
        }
      }
      for (int b = 0; b < NB; ++b) {
        __m256 t = acc[b][0];
        for (int a = 1; a < NA; ++a) t = _mm256_add_ps(t, acc[b][a]);
        racc[b] = _mm256_fmadd_ps(t, sv, racc[b]);
      }
    }
    for (int b = 0; b < NB; ++b) {
      float r = hsum(racc[b]);
      if (INT) {  // sum_k zero(g) x_k = sum_g zero(g) * xsum(g)
        const float* zr = w.zero + n * G;
        const float* xs = xsum + b * G;
        for (int64_t g = 0; g < G; ++g) r += zr[g] * xs[g];
      }
      out[b * ldo + n] = r;
    }
  }
}
#endif

// Portable fallback, same kernel order and accumulation structure.
template <bool INT>
void gemv_rows_scalar(const Q4Weight& w, const float* xp, const float* xsum, int64_t B, float* out, int64_t ldo,
                      int64_t n0, int64_t n1) {
  const int64_t K = w.K, chunks = K / kChunk, G = K / w.group;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.packed + n * (K / 2);
    for (int64_t b = 0; b < B; ++b) {
      const float* x = xp + b * K;
      float r = 0.f;
      for (int64_t c = 0; c < chunks; ++c) {
        float s[2], z[2];
        chunk_scales(w, n, c, s, z);
        float part[2] = {0.f, 0.f};
        for (int l = 0; l < 8; ++l) {
          uint32_t v;
          std::memcpy(&v, row + c * (kChunk / 2) + 4 * l, 4);
          for (int j = 0; j < 8; ++j) part[l >= 4] += lut_value(w, (v >> (4 * j)) & 15u) * x[c * kChunk + j * 8 + l];
        }
        r += part[0] * s[0] + part[1] * s[1];
      }
      if (INT)
        for (int64_t g = 0; g < G; ++g) r += w.zero[n * G + g] * xsum[b * G + g];
      out[b * ldo + n] = r;
    }
  }
}

template <bool INT>
void gemv_dispatch(const Q4Weight& w, const float* xp, const float* xsum, int64_t B, float* out, int64_t ldo,
                   int64_t n0, int64_t n1) {
#ifdef LB_Q4_AVX2
  const int64_t G = w.K / w.group;
  // Sub-tiles of rows keep the packed rows in L1/L2 while every batch block reads them.
  for (int64_t t0 = n0; t0 < n1; t0 += 32) {
    const int64_t t1 = std::min(n1, t0 + 32);
    int64_t b = 0;
    for (; b + 4 <= B; b += 4) gemv_rows<INT, 4>(w, xp + b * w.K, xsum ? xsum + b * G : nullptr, out + b * ldo, ldo, t0, t1);
    for (; b + 2 <= B; b += 2) gemv_rows<INT, 2>(w, xp + b * w.K, xsum ? xsum + b * G : nullptr, out + b * ldo, ldo, t0, t1);
    for (; b < B; ++b) gemv_rows<INT, 1>(w, xp + b * w.K, xsum ? xsum + b * G : nullptr, out + b * ldo, ldo, t0, t1);
  }
#else
  gemv_rows_scalar<INT>(w, xp, xsum, B, out, ldo, n0, n1);
#endif
}
}  // namespace

void permute_input(const float* x, int64_t B, int64_t K, int64_t ldx, float* x_perm) {
  at::parallel_for(0, B, std::max<int64_t>(1, 32768 / std::max<int64_t>(K, 1)), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t c = 0; c < K; c += kChunk)
        for (int j = 0; j < 8; ++j)
          for (int l = 0; l < 8; ++l) x_perm[b * K + c + j * 8 + l] = x[b * ldx + c + chunk_elem(j, l)];
  });
}

void q4_gemv(const Q4Weight& w, const float* x_perm, const float* xsum, int64_t B, float* out, int64_t ldo) {
  at::parallel_for(0, w.N, grain_rows(w.K), [&](int64_t n0, int64_t n1) {
    if (w.int_codes)
      gemv_dispatch<true>(w, x_perm, xsum, B, out, ldo, n0, n1);
    else
      gemv_dispatch<false>(w, x_perm, xsum, B, out, ldo, n0, n1);
  });
}

void q4_dequantize_rows(const Q4Weight& w, int64_t n0, int64_t n1, float* buf) {
  const int64_t K = w.K, chunks = K / kChunk;
  at::parallel_for(n0, n1, grain_rows(K), [&](int64_t r0, int64_t r1) {
#ifdef LB_Q4_AVX2
    const __m256 lut_lo = _mm256_loadu_ps(kNF4Code), lut_hi = _mm256_loadu_ps(kNF4Code + 8);
#endif
    for (int64_t n = r0; n < r1; ++n) {
      const uint8_t* row = w.packed + n * (K / 2);
      float* dst = buf + (n - n0) * K;
      for (int64_t c = 0; c < chunks; ++c) {
        float s[2], z[2];
        chunk_scales(w, n, c, s, z);
#ifdef LB_Q4_AVX2
        const __m256 sv = _mm256_setr_ps(s[0], s[0], s[0], s[0], s[1], s[1], s[1], s[1]);
        const __m256 zv = _mm256_setr_ps(z[0], z[0], z[0], z[0], z[1], z[1], z[1], z[1]);
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + c * (kChunk / 2)));
        for (int j = 0; j < 8; ++j) {
          const __m256 q = w.int_codes ? decode<true>(v, j, lut_lo, lut_hi) : decode<false>(v, j, lut_lo, lut_hi);
          // q * s + z with two roundings, as the int4 reference (no FMA contraction)
          _mm256_storeu_ps(dst + c * kChunk + j * 8, _mm256_add_ps(_mm256_mul_ps(q, sv), zv));
        }
#else
        for (int l = 0; l < 8; ++l) {
          uint32_t v;
          std::memcpy(&v, row + c * (kChunk / 2) + 4 * l, 4);
          for (int j = 0; j < 8; ++j) {
            const float p = lut_value(w, (v >> (4 * j)) & 15u) * s[l >= 4];
            dst[c * kChunk + j * 8 + l] = p + z[l >= 4];
          }
        }
#endif
      }
    }
  });
}

}  // namespace lorabench::cpu
