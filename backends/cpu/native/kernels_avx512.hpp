// AVX-512 (F + BW + VNNI) panel kernels: the AVX2 kernels' arithmetic with one 16-row panel
// step per zmm register. Same layouts as kernels.hpp. Picked at run time only on CPUs (and
// OSes) that have these features, and checked against the generic kernels on first use
// (kt_cpu.cpp, self_check): a disagreement logs and falls back to AVX2.
#pragma once
#include "kernels.hpp"

#include <vector>

#ifdef KT_X86
namespace kt {

#ifndef KT_AVX512  // tests/native/simd_emulated.cpp sets it to compile these under SIMDe
#define KT_AVX512 KT_TARGET("avx512f,avx512bw,avx512vnni,avx2,fma,f16c")
#endif

// The int4 code at bits 19-22 of each lane of x (other bits ignored) as (q - z) s, given s16 = 16 s
// and c = 16 s + z s: ORed onto the mantissa of 1.0 (one VPTERNLOGD) it is 1 + q/16, exact, and one
// FMA makes (1 + q/16) 16 s - c. Half the vector work of masking, converting and scaling the code.
// AVX-512F only, so the AVX-512 decoders (decode_pairs.inc) inline it as well as the AVX512-BF16 and AMX ones.
KT_AVX512 inline __m512 int4_at_bit19(__m512i x, __m512 s16, __m512 c) {
  const __m512i mantissa = _mm512_ternarylogic_epi32(x, _mm512_set1_epi32(0x00780000), _mm512_set1_epi32(0x3F800000),
                                                     0xEA);  // (x & mask) | 1.0
  return _mm512_fmsub_ps(_mm512_castsi512_ps(mantissa), s16, c);
}

// 16 fp8 e4m3 bytes -> 16 floats times 2^-8 (see tile_f8_group in kernels.hpp)
KT_AVX512 inline __m512 fp8x16_of(__m128i bytes) {
  __m256i h = _mm256_cvtepu8_epi16(bytes);
  __m256i bits = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(h, _mm256_set1_epi16(0x7F)), 7),
                                 _mm256_slli_epi16(_mm256_and_si256(h, _mm256_set1_epi16(0x80)), 8));
  return _mm512_cvtph_ps(bits);
}

// the 16 bytes of one panel step
KT_AVX512 inline __m512 fp8x16_512(const uint8_t* p) { return fp8x16_of(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

// two panel steps' 32 bytes -> lo (the first step's 16 floats) and hi, times 2^-8: fp8x16_of's bit
// steps once for both (one-token decode is as much conversion as DRAM stream)
KT_AVX512 inline void fp8x32_512(const uint8_t* p, __m512& lo, __m512& hi) {
  // sign-extended bytes: the masks below keep bits 0-7 alike (SIMDe, for the emulation harness, has no cvtepu8)
  const __m512i h = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  const __m512i bits = _mm512_or_si512(_mm512_slli_epi16(_mm512_and_si512(h, _mm512_set1_epi16(0x7F)), 7),
                                       _mm512_slli_epi16(_mm512_and_si512(h, _mm512_set1_epi16(0x80)), 8));
  lo = _mm512_cvtph_ps(_mm512_castsi512_si256(bits));
  hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(bits, 1));
}

template <typename T, typename F>
inline T bit_as(const F& f) {  // same bits, another vector type
  static_assert(sizeof(T) == sizeof(F), "bit_as: sizes differ");
  T t;
  std::memcpy(&t, &f, sizeof t);
  return t;
}

template <int MR>
KT_AVX512 inline void rows_f_avx512(const Weight& w, int64_t p, const float* X, int64_t ldx, float* out) {
  __m512 acc[4];
  for (int i = 0; i < MR; ++i) acc[i] = _mm512_setzero_ps();
  if (w.fmt == FMT_BF16 && MR == 1) {
    // one token (decode): four independent sums over k, so the loop streams weights instead of
    // waiting on one FMA chain (4-cycle latency per 32 bytes held it to ~2/3 of the bandwidth)
    const uint16_t* wp = static_cast<const uint16_t*>(w.data) + p * w.K * NR;
    __m512 s[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    int64_t k = 0;
    for (; k + 4 <= w.K; k += 4) {
      _mm_prefetch(reinterpret_cast<const char*>(wp + k * NR) + KT_PREFETCH, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(wp + k * NR) + KT_PREFETCH + 64, _MM_HINT_T0);
      for (int u = 0; u < 4; ++u) {
        __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + (k + u) * NR))), 16));
        s[u] = _mm512_fmadd_ps(_mm512_set1_ps(X[k + u]), v, s[u]);
      }
    }
    for (; k < w.K; ++k) {
      __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(
          _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + k * NR))), 16));
      s[0] = _mm512_fmadd_ps(_mm512_set1_ps(X[k]), v, s[0]);
    }
    acc[0] = _mm512_add_ps(_mm512_add_ps(s[0], s[1]), _mm512_add_ps(s[2], s[3]));
  } else if (w.fmt == FMT_BF16) {
    const uint16_t* wp = static_cast<const uint16_t*>(w.data) + p * w.K * NR;
    for (int64_t k = 0; k < w.K; ++k) {
      __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(
          _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + k * NR))), 16));
      for (int i = 0; i < MR; ++i) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(X[i * ldx + k]), v, acc[i]);
    }
  } else {  // FMT_FP8
    const uint8_t* wp = static_cast<const uint8_t*>(w.data) + p * w.K * NR;
    const int64_t G = w.K / w.group;
    for (int64_t g = 0; g < G; ++g) {
      __m512 ga[4];
      for (int i = 0; i < 4; ++i) ga[i] = _mm512_setzero_ps();
      int64_t k = g * w.group;
      if (MR == 1)  // one token (decode): four independent sums, as for bf16 above
        for (; k + 4 <= (g + 1) * w.group; k += 4) {
          if ((k & 3) == 0) _mm_prefetch(reinterpret_cast<const char*>(wp + k * NR) + KT_PREFETCH, _MM_HINT_T0);
          __m512 v[4];
          fp8x32_512(wp + k * NR, v[0], v[1]);
          fp8x32_512(wp + (k + 2) * NR, v[2], v[3]);
          for (int u = 0; u < 4; ++u) ga[u] = _mm512_fmadd_ps(_mm512_set1_ps(X[k + u]), v[u], ga[u]);
        }
      if (MR == 1) ga[0] = _mm512_add_ps(_mm512_add_ps(ga[0], ga[1]), _mm512_add_ps(ga[2], ga[3]));
      for (; k < (g + 1) * w.group; ++k) {
        __m512 v = fp8x16_512(wp + k * NR);
        for (int i = 0; i < MR; ++i) ga[i] = _mm512_fmadd_ps(_mm512_set1_ps(X[i * ldx + k]), v, ga[i]);
      }
      __m512 s = _mm512_mul_ps(_mm512_loadu_ps(w.scale + (p * G + g) * NR), _mm512_set1_ps(256.f));
      for (int i = 0; i < MR; ++i) acc[i] = _mm512_fmadd_ps(ga[i], s, acc[i]);
    }
  }
  for (int i = 0; i < MR; ++i) _mm512_storeu_ps(out + i * NR, acc[i]);
}

// a[i] += the 16 rows' int16 input pairs (k, k+1) . row i of X
template <int MR>
KT_AVX512 inline void madd_pairs_512(__m512i w, const X16& x, int64_t k, __m512i (&a)[MR]) {
  for (int i = 0; i < MR; ++i) {
    int32_t pair;
    std::memcpy(&pair, x.q + i * x.ldx + k, 4);
    a[i] = _mm512_dpwssd_epi32(a[i], w, _mm512_set1_epi32(pair));  // VPDPWSSD: madd + add, one instruction
  }
}

// 16 group scales from index i (group_scale's), fp16 or float32
KT_AVX512 inline __m512 group_scales16(const Weight& w, int64_t i) {
  if (!w.scale16) return _mm512_loadu_ps(w.scale + i);
  const __m256 lo = group_scales8(w, i), hi = group_scales8(w, i + 8);
  return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(lo)), _mm256_castps_pd(hi), 1));
}
// 16 zero points from index i (group_zero's)
KT_AVX512 inline __m512 group_zeros16(const Weight& w, int64_t i) {
  if (!w.zero16) return w.zero ? _mm512_loadu_ps(w.zero + i) : _mm512_set1_ps(implied_zero(w));
  const __m256 lo = group_zeros8(w, i), hi = group_zeros8(w, i + 8);
  return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(lo)), _mm256_castps_pd(hi), 1));
}

template <int MR>
KT_AVX512 inline void rows_x16_avx512(const Weight& w, int64_t p, const X16& x, float* out) {
  __m512 acc[MR];
  for (int i = 0; i < MR; ++i) acc[i] = _mm512_setzero_ps();
  __m512i a[MR];
  if (w.fmt == FMT_INT8) {  // int32 sums flushed every 256 inputs, or every group times its scales
    const int8_t* wp = static_cast<const int8_t*>(w.data) + p * w.K * NR;  // (and zero points: rows_i8's)
    const bool grouped = int8_grouped(w), zp = has_zeros(w);
    const int64_t step = grouped ? w.group : 256, G = grouped ? w.K / w.group : 1;
    for (int64_t k0 = 0; k0 < w.K; k0 += step) {
      for (int i = 0; i < MR; ++i) a[i] = _mm512_setzero_si512();
      for (int64_t k = k0; k < std::min<int64_t>(w.K, k0 + step); k += 2)
        madd_pairs_512<MR>(_mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + k * NR))),
                           x, k, a);
      const __m512 gs = grouped ? group_scales16(w, (p * G + k0 / w.group) * NR) : _mm512_set1_ps(1.f);
      const __m512 zz = zp ? group_zeros16(w, (p * G + k0 / w.group) * NR) : _mm512_setzero_ps();
      for (int i = 0; i < MR; ++i) {
        const __m512 xs = _mm512_set1_ps(zp ? static_cast<float>(x.gsum[i * x.ldg + k0 / w.group]) : 0.f);
        acc[i] = _mm512_fmadd_ps(_mm512_fnmadd_ps(zz, xs, _mm512_cvtepi32_ps(a[i])), gs, acc[i]);
      }
    }
    if (!grouped) {
      __m512 s = _mm512_loadu_ps(w.scale + p * NR);
      for (int i = 0; i < MR; ++i) acc[i] = _mm512_mul_ps(acc[i], s);
    }
  } else {  // FMT_INT4: the 32 bytes of 4 inputs in both halves; lanes 0-7 (rows 0-7) take
            // nibble 2s of each word, lanes 8-15 (rows 8-15) nibble 2s + 1, for input pair s
    const uint8_t* wp = static_cast<const uint8_t*>(w.data) + p * (w.K / 2) * NR;
    const int64_t G = w.K / w.group;
    const __m512i mask = _mm512_set1_epi16(0x000F);
    const __m512i sh0 = _mm512_inserti64x4(_mm512_set1_epi16(0), _mm256_set1_epi16(4), 1);
    const __m512i sh1 = _mm512_inserti64x4(_mm512_set1_epi16(8), _mm256_set1_epi16(12), 1);
    for (int64_t g = 0; g < G; ++g) {
      for (int i = 0; i < MR; ++i) a[i] = _mm512_setzero_si512();
      for (int64_t k = g * w.group; k < (g + 1) * w.group; k += 4) {
        const __m512i u = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + k * 8)));
        const __m512i n0 = _mm512_and_si512(_mm512_srlv_epi16(u, sh0), mask);
        const __m512i n1 = _mm512_and_si512(_mm512_srlv_epi16(u, sh1), mask);
        madd_pairs_512<MR>(n0, x, k, a);
        madd_pairs_512<MR>(n1, x, k + 2, a);
      }
      const __m512 s = group_scales16(w, (p * G + g) * NR), zz = group_zeros16(w, (p * G + g) * NR);
      for (int i = 0; i < MR; ++i) {
        __m512 xs = _mm512_set1_ps(static_cast<float>(x.gsum[i * x.ldg + g]));
        acc[i] = _mm512_fmadd_ps(_mm512_fnmadd_ps(zz, xs, _mm512_cvtepi32_ps(a[i])), s, acc[i]);
      }
    }
  }
  for (int i = 0; i < MR; ++i) _mm512_storeu_ps(out + i * NR, _mm512_mul_ps(acc[i], _mm512_set1_ps(x.scale[i])));
}

// w8a8 with VNNI: dpbusd takes |x| (unsigned) against w with x's sign moved onto it
template <int MR>
KT_AVX512 inline void rows_q8_avx512(const Weight& w, int64_t p, const int8_t* Xq, int64_t ldx, const float* xs,
                                     float* out) {
  __m512i acc[4];
  for (int i = 0; i < MR; ++i) acc[i] = _mm512_setzero_si512();
  const int8_t* wp = static_cast<const int8_t*>(w.data) + p * w.K * NR;
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t k4 = 0; k4 < w.K / 4; ++k4) {
    __m512i wv = _mm512_loadu_si512(wp + k4 * 64);
    for (int i = 0; i < MR; ++i) {
      int32_t four;
      std::memcpy(&four, Xq + i * ldx + 4 * k4, 4);
      __m512i xb = _mm512_set1_epi32(four);
      __m512i ws = _mm512_mask_sub_epi8(wv, _mm512_movepi8_mask(xb), zero, wv);
      acc[i] = _mm512_dpbusd_epi32(acc[i], _mm512_abs_epi8(xb), ws);
    }
  }
  __m512 s = _mm512_loadu_ps(w.scale + p * NR);
  for (int i = 0; i < MR; ++i)
    _mm512_storeu_ps(out + i * NR, _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc[i]), s), _mm512_set1_ps(xs[i])));
}

// n rows of X in tiles of 4: f(MR tag, first row)
#define KT_TILES_512(n, CALL4, CALL3, CALL2, CALL1) \
  do {                                              \
    int64_t i = 0;                                  \
    for (; i + 4 <= (n); i += 4) CALL4;             \
    switch ((n) - i) {                              \
      case 3: CALL3; break;                         \
      case 2: CALL2; break;                         \
      case 1: CALL1; break;                         \
      default: break;                               \
    }                                               \
  } while (0)

// 16 floats -> bf16, rounded to nearest even. The arithmetic shift leaves each bf16 pattern
// sign-extended, so the saturating narrowing keeps it exactly (finite inputs).
KT_AVX512 inline __m256i bf16x16_of(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  return _mm512_cvtsepi32_epi16(_mm512_srai_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16));
}
KT_AVX512 inline __m256i bf16x16(const float* x) { return bf16x16_of(_mm512_loadu_ps(x)); }

KT_AVX512 inline void panel_gemm_avx512(const Weight& w, int64_t p, const float* X, int64_t ldx, int64_t n,
                                        float* out) {
  KT_TILES_512(n, rows_f_avx512<4>(w, p, X + i * ldx, ldx, out + i * NR),
               rows_f_avx512<3>(w, p, X + i * ldx, ldx, out + i * NR),
               rows_f_avx512<2>(w, p, X + i * ldx, ldx, out + i * NR),
               rows_f_avx512<1>(w, p, X + i * ldx, ldx, out + i * NR));
}

KT_AVX512 inline X16 x16_rows(const X16& x, int64_t i) {
  return X16{x.q + i * x.ldx, x.scale + i, x.gsum ? x.gsum + i * x.ldg : nullptr, x.ldx, x.ldg};
}

// 8 rows a call while 8 are left (each decoded weight vector feeds 8 rows, not 4), then tiles of up to 4
KT_AVX512 inline void panel_gemm_x16_avx512(const Weight& w, int64_t p, const X16& x, int64_t n, float* out) {
  int64_t r0 = 0;
  for (; r0 + 8 <= n; r0 += 8) rows_x16_avx512<8>(w, p, x16_rows(x, r0), out + r0 * NR);
  const X16 xr = x16_rows(x, r0);
  float* o = out + r0 * NR;
  KT_TILES_512(n - r0, rows_x16_avx512<4>(w, p, x16_rows(xr, i), o + i * NR),
               rows_x16_avx512<3>(w, p, x16_rows(xr, i), o + i * NR),
               rows_x16_avx512<2>(w, p, x16_rows(xr, i), o + i * NR),
               rows_x16_avx512<1>(w, p, x16_rows(xr, i), o + i * NR));
}

KT_AVX512 inline void panel_gemm_q8_avx512(const Weight& w, int64_t p, const int8_t* Xq, int64_t ldx, const float* xs,
                                           int64_t n, float* out) {
  KT_TILES_512(n, rows_q8_avx512<4>(w, p, Xq + i * ldx, ldx, xs + i, out + i * NR),
               rows_q8_avx512<3>(w, p, Xq + i * ldx, ldx, xs + i, out + i * NR),
               rows_q8_avx512<2>(w, p, Xq + i * ldx, ldx, xs + i, out + i * NR),
               rows_q8_avx512<1>(w, p, Xq + i * ldx, ldx, xs + i, out + i * NR));
}

}  // namespace kt
#endif
