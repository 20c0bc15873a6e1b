// 4-bit GEMV / dequantization kernels, see nf4_int4_gemv.h. AVX2 through the compiler (-march=native)
// with a portable scalar fallback of the same kernel order.
// Products and sums are rounded separately (w = q * s + z, absmax = code * absmax2 + offset), as the
// references and bitsandbytes do: GCC would otherwise contract them into FMAs in C++ mode.
#pragma GCC optimize("fp-contract=off")
#include "nf4_int4_gemv.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

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

// Element of the chunk held by slot (j, e), e the float lane of the j-th decoded vector (see decode_chunk).
//  int4 (nibble planes): vector j holds nibble j of the 8 int32 lanes, element 8e + (j ^ 1).
//  NF4 (byte tables): vectors 0-3 hold the high nibbles, 4-7 the low ones, of bytes 16 (e / 4) + 4 (j % 4) + e % 4.
inline int chunk_elem(bool int_codes, int j, int e) {
  if (int_codes) return 8 * e + (j ^ 1);
  const int byte = 16 * (e / 4) + 4 * (j % 4) + e % 4;
  return 2 * byte + (j >= 4);
}

// log2 of the group size (a power of two): the per-chunk group index is a shift, not a division.
inline int group_shift(int64_t group) { return __builtin_ctzll(static_cast<unsigned long long>(group)); }

// The scales of row n: the stored fp32 array, or (double quantization, QLoRA sec. 3) decoded into buf
// (G floats) as code2[q] * scale2[i / 256] + offset, two roundings as bitsandbytes. Used by the
// dequantize-tiles path and the scalar fallback; the AVX2 GEMV decodes them in its chunk loop instead
// (chunk_scale_vec_dq).
inline const float* row_scales(const Q4Weight& w, int64_t n, int64_t G, float* buf) {
  if (w.scale_q8 == nullptr) return w.scale + n * G;
  for (int64_t g = 0; g < G; ++g) buf[g] = w.group_scale(n * G + g);
  return buf;
}

// Scale (and zero) of the chunk's lanes from the row's arrays: one value for group >= 64; for group 32,
// lanes 0-3 hold the first 32 weights and lanes 4-7 the next 32 (in both kernel orders).
inline void chunk_scales(const Q4Weight& w, const float* srow, const float* zrow, int64_t c, int gshift, float s[2],
                         float z[2]) {
  const int64_t g0 = (c * kChunk) >> gshift;
  s[0] = srow[g0];
  s[1] = w.group == 32 ? srow[g0 + 1] : s[0];
  z[0] = zrow ? zrow[g0] : 0.f;
  z[1] = zrow ? (w.group == 32 ? zrow[g0 + 1] : z[0]) : 0.f;
}

inline float code_of(const Q4Weight& w, const uint8_t* chunk, int elem) {
  const uint8_t b = chunk[elem >> 1];
  const unsigned q = (elem & 1) ? (b & 15u) : (b >> 4);
  return w.int_codes ? float(q) : kNF4Code[q];
}

#ifdef LB_Q4_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The four byte planes of the NF4 table: table[i] holds byte i of the 16 fp32 values, in both lanes.
struct NF4Tables {
  __m256i t[4];
  NF4Tables() {
    alignas(32) uint8_t b[4][32];
    for (int q = 0; q < 16; ++q) {
      uint32_t bits;
      std::memcpy(&bits, &kNF4Code[q], 4);
      for (int i = 0; i < 4; ++i) b[i][q] = b[i][q + 16] = static_cast<uint8_t>(bits >> (8 * i));
    }
    for (int i = 0; i < 4; ++i) t[i] = _mm256_load_si256(reinterpret_cast<const __m256i*>(b[i]));
  }
};

// 32 nibble indices (one per byte) -> 32 exact fp32 NF4 values in 4 vectors, with in-lane shuffles only:
// four byte look-ups (pshufb) and two rounds of interleaving assemble each value's 4 bytes.
inline void expand_nf4(__m256i idx, const NF4Tables& T, __m256* f) {
  const __m256i b0 = _mm256_shuffle_epi8(T.t[0], idx), b1 = _mm256_shuffle_epi8(T.t[1], idx);
  const __m256i b2 = _mm256_shuffle_epi8(T.t[2], idx), b3 = _mm256_shuffle_epi8(T.t[3], idx);
  const __m256i l01 = _mm256_unpacklo_epi8(b0, b1), h01 = _mm256_unpackhi_epi8(b0, b1);
  const __m256i l23 = _mm256_unpacklo_epi8(b2, b3), h23 = _mm256_unpackhi_epi8(b2, b3);
  f[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(l01, l23));
  f[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(l01, l23));
  f[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(h01, h23));
  f[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(h01, h23));
}

// The 64 weights of a chunk, unscaled, as 8 vectors in kernel order (chunk_elem).
template <bool INT>
inline void decode_chunk(__m256i v, const NF4Tables& T, __m256 q[8]) {
  if constexpr (INT) {  // nibble planes: shift, mask, int -> float
    for (int j = 0; j < 8; ++j)
      q[j] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, 4 * j), _mm256_set1_epi32(15)));
  } else {
    const __m256i m = _mm256_set1_epi8(15);
    expand_nf4(_mm256_and_si256(_mm256_srli_epi16(v, 4), m), T, q);  // high nibbles: even elements
    expand_nf4(_mm256_and_si256(v, m), T, q + 4);                     // low nibbles: odd elements
  }
}

// The GEMV's int4 decode (gemv_rows): nibble j < 7 is masked in place, (v & 15 << 4j) = q 2^(4j) as an
// int32, and converted exactly (4 significant bits); the input of slot j was scaled by 2^(-4j) in
// permute_input (gemv = true), so the product q 2^(4j) x 2^(-4j) rounds exactly as q x (powers of two
// commute with rounding while x 2^(-24) stays normal, |x| >= 2^-102). Nibble 7 is v >> 28 (no mask).
// That drops 7 of the 8 shifts per 64 weights, which share the two shuffle/shift pipes with nothing
// else here: mask (any vector pipe) + convert + FMA per 8 weights.
template <bool INT>
inline void decode_chunk_gemv(__m256i v, const NF4Tables& T, __m256 q[8]) {
  if constexpr (INT) {
#pragma GCC unroll 7
    for (int j = 0; j < 7; ++j) q[j] = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15 << (4 * j))));
    q[7] = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 28));
  } else {
    decode_chunk<false>(v, T, q);
  }
}

// Scale vector of chunk c: one broadcast value for group >= 64; for group 32, lanes 0-3 hold the first
// group's scale and lanes 4-7 the next one's (both kernel orders put elements 0-31 in lanes 0-3).
template <bool G32>
inline __m256 chunk_scale_vec(const float* srow, int64_t c, int cshift) {
  if constexpr (G32) {
    return _mm256_blend_ps(_mm256_broadcast_ss(srow + 2 * c), _mm256_broadcast_ss(srow + 2 * c + 1), 0xF0);
  } else {
    return _mm256_broadcast_ss(srow + (c >> cshift));
  }
}

// The same from double-quantized scales, decoded in the chunk loop (row base index `base`): two scalar
// loads and two scalar FP ops per 64 weights, on ports the shuffle-bound NF4 decode leaves idle.
// Decoding a row's scales in a loop of their own before its chunks cost 10-18% of a 4096 x 4096
// batch-1 GEMV (1534 against 1351 us without double quantization; with a gather, 1504 against 1363);
// in the chunk loop, 1492 against 1465 (one thread, CPU time, best of 7, 29 Nov 2026).
template <bool G32>
inline __m256 chunk_scale_vec_dq(const Q4Weight& w, int64_t base, int64_t c, int cshift) {
  if constexpr (G32) {
    return _mm256_setr_m128(_mm_set1_ps(w.group_scale(base + 2 * c)), _mm_set1_ps(w.group_scale(base + 2 * c + 1)));
  } else {
    return _mm256_set1_ps(w.group_scale(base + (c >> cshift)));
  }
}

// sum_g zero(g) * xsum(g) over a row's G groups (int4's zero points): 8 groups per FMA into acc, the
// remaining G % 8 into the returned scalar.
inline float zero_dot(const float* zr, const float* xs, int64_t G, __m256& acc) {
  int64_t g = 0;
  for (; g + 8 <= G; g += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(zr + g), _mm256_loadu_ps(xs + g), acc);
  float tail = 0.f;
  for (; g < G; ++g) tail += zr[g] * xs[g];
  return tail;
}

// NB batch rows at once over rows [n0, n1): the weights are decoded once per NB inputs.
// Per chunk: t_b = sum_j q_j * x_b,j (unscaled, two FMA chains for one input row), then
// racc_b += t_b * scale; the int4 zero points enter once per row as sum_g zero(g) * xsum_b(g).
// sbuf: G floats of scratch for the row's decoded scales (double quantization).
template <bool INT, int NB, bool G32, bool DQ>
void gemv_rows(const Q4Weight& w, const float* xp, const float* xsum, float* out, int64_t ldo, int64_t n0,
               int64_t n1) {
  const int64_t K = w.K, chunks = K / kChunk, G = K / w.group;
  const int cshift = G32 ? 0 : group_shift(w.group) - 6;  // chunk -> group: c >> cshift
  const NF4Tables T;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.packed + n * (K / 2);
    const float* srow = DQ ? nullptr : w.scale + n * G;
    if (n + 1 < n1) _mm_prefetch(reinterpret_cast<const char*>(w.packed + (n + 1) * (K / 2)), _MM_HINT_T0);
    __m256 racc[NB];
    for (int b = 0; b < NB; ++b) racc[b] = _mm256_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c) {
      const __m256 sv = DQ ? chunk_scale_vec_dq<G32>(w, n * G, c, cshift) : chunk_scale_vec<G32>(srow, c, cshift);
      __m256 q[8];
      decode_chunk_gemv<INT>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + c * (kChunk / 2))), T, q);
      const float* xc = xp + c * kChunk;
      if constexpr (NB == 1) {
        __m256 a0 = _mm256_mul_ps(q[0], _mm256_loadu_ps(xc));
        __m256 a1 = _mm256_mul_ps(q[1], _mm256_loadu_ps(xc + 8));
#pragma GCC unroll 8
        for (int j = 2; j < 8; j += 2) {
          a0 = _mm256_fmadd_ps(q[j], _mm256_loadu_ps(xc + j * 8), a0);
          a1 = _mm256_fmadd_ps(q[j + 1], _mm256_loadu_ps(xc + j * 8 + 8), a1);
        }
        racc[0] = _mm256_fmadd_ps(_mm256_add_ps(a0, a1), sv, racc[0]);
      } else {
        __m256 acc[NB];
        for (int b = 0; b < NB; ++b) acc[b] = _mm256_mul_ps(q[0], _mm256_loadu_ps(xc + b * K));
#pragma GCC unroll 8
        for (int j = 1; j < 8; ++j)
          for (int b = 0; b < NB; ++b) acc[b] = _mm256_fmadd_ps(q[j], _mm256_loadu_ps(xc + b * K + j * 8), acc[b]);
        for (int b = 0; b < NB; ++b) racc[b] = _mm256_fmadd_ps(acc[b], sv, racc[b]);
      }
    }
    for (int b = 0; b < NB; ++b) {
      __m256 r = racc[b];
      const float tail = INT ? zero_dot(w.zero + n * G, xsum + b * G, G, r) : 0.f;
      out[b * ldo + n] = hsum(r) + tail;
    }
  }
}
#endif

// Portable fallback, same kernel order and accumulation structure.
void gemv_rows_scalar(const Q4Weight& w, const float* xp, const float* xsum, int64_t B, float* out, int64_t ldo,
                      int64_t n0, int64_t n1) {
  const int64_t K = w.K, chunks = K / kChunk, G = K / w.group;
  const int gshift = group_shift(w.group);
  std::vector<float> sbuf(G);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.packed + n * (K / 2);
    const float* srow = row_scales(w, n, G, sbuf.data());
    const float* zrow = w.zero ? w.zero + n * G : nullptr;
    for (int64_t b = 0; b < B; ++b) {
      const float* x = xp + b * K;
      float r = 0.f;
      for (int64_t c = 0; c < chunks; ++c) {
        float s[2], z[2];
        chunk_scales(w, srow, zrow, c, gshift, s, z);
        float part[2] = {0.f, 0.f};
        for (int j = 0; j < 8; ++j)
          for (int e = 0; e < 8; ++e)
            part[e >= 4] += code_of(w, row + c * (kChunk / 2), chunk_elem(w.int_codes, j, e)) * x[c * kChunk + j * 8 + e];
        r += part[0] * s[0] + part[1] * s[1];
      }
      if (w.int_codes)
        for (int64_t g = 0; g < G; ++g) r += w.zero[n * G + g] * xsum[b * G + g];
      out[b * ldo + n] = r;
    }
  }
}

#ifdef LB_Q4_AVX2
template <bool INT, bool G32, bool DQ>
void gemv_tiles(const Q4Weight& w, const float* xp, const float* xsum, int64_t B, float* out, int64_t ldo,
                int64_t n0, int64_t n1) {
  const int64_t G = w.K / w.group;
  // Sub-tiles of rows keep the packed rows in L1/L2 while every batch block reads them.
  const int64_t tile = B == 1 ? n1 - n0 : 32;
  for (int64_t t0 = n0; t0 < n1; t0 += tile) {
    const int64_t t1 = std::min(n1, t0 + tile);
    int64_t b = 0;
    for (; b + 4 <= B; b += 4)
      gemv_rows<INT, 4, G32, DQ>(w, xp + b * w.K, xsum ? xsum + b * G : nullptr, out + b * ldo, ldo, t0, t1);
    for (; b + 2 <= B; b += 2)
      gemv_rows<INT, 2, G32, DQ>(w, xp + b * w.K, xsum ? xsum + b * G : nullptr, out + b * ldo, ldo, t0, t1);
    for (; b < B; ++b)
      gemv_rows<INT, 1, G32, DQ>(w, xp + b * w.K, xsum ? xsum + b * G : nullptr, out + b * ldo, ldo, t0, t1);
  }
}
#endif

template <bool INT>
void gemv_dispatch(const Q4Weight& w, const float* xp, const float* xsum, int64_t B, float* out, int64_t ldo,
                   int64_t n0, int64_t n1) {
#ifdef LB_Q4_AVX2
  const bool dq = w.scale_q8 != nullptr;
  if (w.group == 32)
    dq ? gemv_tiles<INT, true, true>(w, xp, xsum, B, out, ldo, n0, n1)
       : gemv_tiles<INT, true, false>(w, xp, xsum, B, out, ldo, n0, n1);
  else
    dq ? gemv_tiles<INT, false, true>(w, xp, xsum, B, out, ldo, n0, n1)
       : gemv_tiles<INT, false, false>(w, xp, xsum, B, out, ldo, n0, n1);
#else
  gemv_rows_scalar(w, xp, xsum, B, out, ldo, n0, n1);
#endif
}
}  // namespace

void permute_input(const float* x, int64_t B, int64_t K, int64_t ldx, bool int_codes, bool gemv, float* x_perm) {
  float slot_scale[8];  // the GEMV's int4 decode leaves nibble j < 7 at 2^(4j) (decode_chunk_gemv)
  for (int j = 0; j < 8; ++j) slot_scale[j] = 1.f;
#ifdef LB_Q4_AVX2
  if (gemv && int_codes)
    for (int j = 0; j < 7; ++j) slot_scale[j] = std::ldexp(1.f, -4 * j);
#endif
  at::parallel_for(0, B, std::max<int64_t>(1, 32768 / std::max<int64_t>(K, 1)), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t c = 0; c < K; c += kChunk)
        for (int j = 0; j < 8; ++j)
          for (int e = 0; e < 8; ++e)
            x_perm[b * K + c + j * 8 + e] = x[b * ldx + c + chunk_elem(int_codes, j, e)] * slot_scale[j];
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
  const int gshift = group_shift(w.group);
  at::parallel_for(n0, n1, grain_rows(K), [&](int64_t r0, int64_t r1) {
#ifdef LB_Q4_AVX2
    const NF4Tables T;
#endif
    const int64_t G = K >> gshift;
    std::vector<float> sbuf(G);
    for (int64_t n = r0; n < r1; ++n) {
      const uint8_t* row = w.packed + n * (K / 2);
      const float* srow = row_scales(w, n, G, sbuf.data());
      const float* zrow = w.zero ? w.zero + n * G : nullptr;
      float* dst = buf + (n - n0) * K;
      for (int64_t c = 0; c < chunks; ++c) {
        float s[2], z[2];
        chunk_scales(w, srow, zrow, c, gshift, s, z);
#ifdef LB_Q4_AVX2
        const __m256 sv = _mm256_setr_ps(s[0], s[0], s[0], s[0], s[1], s[1], s[1], s[1]);
        const __m256 zv = _mm256_setr_ps(z[0], z[0], z[0], z[0], z[1], z[1], z[1], z[1]);
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + c * (kChunk / 2)));
        __m256 q[8];
        if (w.int_codes)
          decode_chunk<true>(v, T, q);
        else
          decode_chunk<false>(v, T, q);
        // q * s + z with two roundings, as the int4 reference (no FMA contraction)
        for (int j = 0; j < 8; ++j)
          _mm256_storeu_ps(dst + c * kChunk + j * 8, _mm256_add_ps(_mm256_mul_ps(q[j], sv), zv));
#else
        for (int j = 0; j < 8; ++j)
          for (int e = 0; e < 8; ++e) {
            const float p = code_of(w, row + c * (kChunk / 2), chunk_elem(w.int_codes, j, e)) * s[e >= 4];
            dst[c * kChunk + j * 8 + e] = p + z[e >= 4];
          }
#endif
      }
    }
  });
}

}  // namespace lorabench::cpu
