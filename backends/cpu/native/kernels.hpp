// Panel GEMM kernels for the expert weights, one set per ISA.
//
// Weight layout (repacked at load time by kt_backends.cpu.native.pack): a matrix of M
// output rows and K inputs is stored as ceil(M/16) panels; panel p holds rows
// [16p, 16p+16) input-major, so one input step of a panel is 16 consecutive values:
//   bf16: uint16 [P][K][16]
//   int8: int8   [P][K/2][16][2] (input pairs of a row together), one float scale per row  scale [P*16],
//         or with group g > 0 (g < K, a multiple of 4, at most 256) one per (group, row)  scale [P][K/g][16]
//   int4: uint16 [P][K/4][16]: per 4 inputs (4q..4q+3) of a panel, 16 words; word 2l+e holds
//         code(row l + 8h, input 4q + 2s + e) in its nibble h + 2s (h, s, e in {0, 1}), so a
//         shift and a mask give a madd_epi16 operand (8 rows x one input pair) with no shuffle;
//         per (group, row) scale and zero point                  scale/zero [P][K/g][16]
//         (symmetric int4 has no zero array: codes are biased by 8; groups are multiples of 4)
//   fp8:  uint8  [P][K][16] float8 e4m3 bytes, per (group, row) scale  scale [P][K/g][16]
//   w8a8: int8   [P][K/4][16][4] (4 consecutive inputs of a row together, the order the
//         integer dot-product instructions read), one float scale per row  scale [P*16]
// panel_gemm computes out[i][j] = sum_k X[i][k] * W[16p + j][k] for n rows of X;
// panel_gemm_q8 the same for w8a8 from int8 rows Xq with a scale per row; the AVX2 int8 and
// int4 kernels take X as int16 rows (scale amax/32767 per row: relative error ~1e-5) so the
// codes multiply as integers (madd_epi16) instead of being converted to floats one by one.
#pragma once
#include <cstddef>
#include <cstdint>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>
#include "aligned.hpp"  // lvector: vectors on 64-byte lines for tile and 512-bit loads
#include "elem_convert.hpp"  // fp8 / bf16 / fp16 -> float

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__) || defined(_M_IX86)
#define KT_X86 1
#include <immintrin.h>
#endif

#if defined(_MSC_VER) && !defined(__clang__)
#define KT_TARGET(x)  // MSVC compiles intrinsics of any ISA without per-function flags
#else
#define KT_TARGET(x) __attribute__((target(x)))
#endif
// Unrolls the loop that follows completely (a register block's loads and stores: GCC 12 at -O3 left
// the loop that loads 12 sums a loop, and then kept every sum on the stack)
#if defined(__clang__)
#define KT_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define KT_UNROLL _Pragma("GCC unroll 16")
#else
#define KT_UNROLL
#endif

namespace kt {

enum Format : int { FMT_BF16 = 0, FMT_INT8 = 1, FMT_INT4 = 2, FMT_FP8 = 3, FMT_W8A8 = 4 };
constexpr int NR = 16;  // rows per panel
constexpr int KB = 256; // input block kept hot in L1 while token tiles sweep it
#ifndef KT_PREFETCH
#define KT_PREFETCH 2048  // bytes ahead in a panel stream that the kernels prefetch (1024 on an AMX Xeon, one-token MoE: 8% slower; 4096: 6% slower)
#endif

struct Weight {
  int fmt;
  int64_t M, K;
  int group;            // int4 / fp8 / grouped int8 group size along K (int8: 0 or K = one scale per row)
  const void* data;     // this expert's panels
  const float* scale;   // int8, w8a8: [P*16]; int4, fp8, grouped int8: [P][K/g][16]
  const float* zero;    // int4 asymmetric, grouped int8 (GGUF Q5_1 / Q5_K / Q2_K): [P][K/g][16];
                        // null = symmetric (int4: 8, int8: 0)
  // grouped int8 and int4: the scales (int4: and zero points) in fp16, [P][K/g][16] halves, instead
  // of `scale` / `zero` (GGUF Q8_0's and Q4_0's exactly, quantize's): half the bytes a token streams
  const uint16_t* scale16 = nullptr;
  const uint16_t* zero16 = nullptr;
};

// Whether a format and group may keep its group scales (and zero points) in fp16 (Weight::scale16)
inline bool f16_params_ok(int fmt, int64_t group, int64_t K) {
  return fmt == FMT_INT4 || (fmt == FMT_INT8 && group > 0 && group < K);
}
// Whether a format and group may carry zero points (value = (code - zero) * scale): int4, and
// grouped int8 (the exact form of GGUF's Q5_1 / Q5_K / Q2_K blocks, x = d*q - m per group)
inline bool zeros_ok(int fmt, int64_t group, int64_t K) { return f16_params_ok(fmt, group, K); }
// Whether this weight carries zero points (int4: else 8; int8: else 0)
inline bool has_zeros(const Weight& w) { return w.zero || w.zero16; }
// The zero point a weight without zero points implies
inline float implied_zero(const Weight& w) { return w.fmt == FMT_INT4 ? 8.f : 0.f; }

// group scale i (an index into [P][K/g][16]) of a weight, whichever width it is stored in
inline float group_scale(const Weight& w, int64_t i) { return w.scale16 ? fp16_to_f32(w.scale16[i]) : w.scale[i]; }
// zero point i, likewise (none: implied_zero)
inline float group_zero(const Weight& w, int64_t i) {
  return w.zero16 ? fp16_to_f32(w.zero16[i]) : w.zero ? w.zero[i] : implied_zero(w);
}

// int8 with a scale per (group, row) rather than one per row
inline bool int8_grouped(const Weight& w) { return w.fmt == FMT_INT8 && w.group > 0 && w.group < w.K; }

// ---------------------------------------------------------------- generic (any CPU)
#include "kernels_generic.inc"

// ---------------------------------------------------------------- AVX2 + FMA (+ F16C for fp8)
#ifdef KT_X86
KT_TARGET("avx2,fma,f16c") inline __m256 load_bf16x8(const uint16_t* p) {
  __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

KT_TARGET("avx2,fma,f16c") inline __m256 load8(const uint16_t* p) { return load_bf16x8(p); }
// 8 group scales from index i (group_scale's), fp16 or float32
KT_TARGET("avx2,fma,f16c") inline __m256 group_scales8(const Weight& w, int64_t i) {
  return w.scale16 ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.scale16 + i)))
                   : _mm256_loadu_ps(w.scale + i);
}
// 8 zero points from index i (group_zero's)
KT_TARGET("avx2,fma,f16c") inline __m256 group_zeros8(const Weight& w, int64_t i) {
  if (w.zero16) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.zero16 + i)));
  return w.zero ? _mm256_loadu_ps(w.zero + i) : _mm256_set1_ps(implied_zero(w));
}

// Up to 4 rows of X against one panel over inputs [k0, k1); acc[i][0..1] hold 16 outputs.
// T is the stored element (bf16 bits or int8 codes).
template <int MR, typename T>
KT_TARGET("avx2,fma,f16c") inline void tile_rows(const T* wp, const float* X, int64_t ldx, int64_t k0, int64_t k1,
                                            __m256 (&acc)[4][2]) {
  for (int64_t k = k0; k < k1; ++k) {
    const T* row = wp + k * NR;
    _mm_prefetch(reinterpret_cast<const char*>(row) + KT_PREFETCH, _MM_HINT_T0);
    __m256 w0 = load8(row), w1 = load8(row + 8);
    for (int i = 0; i < MR; ++i) {
      __m256 x = _mm256_broadcast_ss(X + i * ldx + k);
      acc[i][0] = _mm256_fmadd_ps(x, w0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(x, w1, acc[i][1]);
    }
  }
}

// Activations as int16 for the int8 / int4 kernels (see the header comment).
struct X16 {
  const int16_t* q;     // [n][ldx]
  const float* scale;   // [n]
  const int32_t* gsum;  // [n][K/group]: sum of q over each group (int4, int8 with zero points)
  int64_t ldx, ldg;
};

// 16 e4m3 codes -> two vectors of 2^-8 their values (rows 0-7, 8-15), exact: the sign, exponent and
// mantissa shifted into fp16's places (subnormals come out right), then F16C
KT_TARGET("avx2,fma,f16c") inline void fp8x16_avx2(const uint8_t* p, __m256& lo, __m256& hi) {
  const __m256i h = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i bits = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(h, _mm256_set1_epi16(0x7F)), 7),
                                       _mm256_slli_epi16(_mm256_and_si256(h, _mm256_set1_epi16(0x80)), 8));
  lo = _mm256_cvtph_ps(_mm256_castsi256_si128(bits));
  hi = _mm256_cvtph_ps(_mm256_extracti128_si256(bits, 1));
}

// fp8 over one group: e4m3 bytes -> fp16 bits (sign, then exponent and mantissa shifted
// into place; subnormals come out right), F16C converts, the 2^8 bias gap goes into the scale.
template <int MR>
KT_TARGET("avx2,fma,f16c") inline void tile_f8_group(const uint8_t* wp, const float* X, int64_t ldx, int64_t k0,
                                                     int g, const float* s, __m256 (&acc)[4][2]) {
  __m256 ga[4][2];
  for (int i = 0; i < MR; ++i) ga[i][0] = ga[i][1] = _mm256_setzero_ps();
  // Two inputs per step: each byte as the high half of a 16-bit word, shifted right one with the
  // sign copied, bit 14 cleared = the same fp16 bits, with in-lane shuffles only. The
  // unpacks' lane order gives (k, rows 0-7), (k, 8-15), (k+1, 0-7), (k+1, 8-15).
  const __m256i zero = _mm256_setzero_si256(), keep = _mm256_set1_epi16(static_cast<short>(0xBFFF));
  int64_t k = k0;
  for (; k + 2 <= k0 + g; k += 2) {
    if ((k & 3) == 0) _mm_prefetch(reinterpret_cast<const char*>(wp + k * NR) + KT_PREFETCH, _MM_HINT_T0);
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + k * NR));
    const __m256i lo = _mm256_and_si256(_mm256_srai_epi16(_mm256_unpacklo_epi8(zero, b), 1), keep);
    const __m256i hi = _mm256_and_si256(_mm256_srai_epi16(_mm256_unpackhi_epi8(zero, b), 1), keep);
    const __m256 w00 = _mm256_cvtph_ps(_mm256_castsi256_si128(lo)), w01 = _mm256_cvtph_ps(_mm256_castsi256_si128(hi));
    const __m256 w10 = _mm256_cvtph_ps(_mm256_extracti128_si256(lo, 1)), w11 = _mm256_cvtph_ps(_mm256_extracti128_si256(hi, 1));
    for (int i = 0; i < MR; ++i) {
      const __m256 x0 = _mm256_broadcast_ss(X + i * ldx + k), x1 = _mm256_broadcast_ss(X + i * ldx + k + 1);
      ga[i][0] = _mm256_fmadd_ps(x1, w10, _mm256_fmadd_ps(x0, w00, ga[i][0]));
      ga[i][1] = _mm256_fmadd_ps(x1, w11, _mm256_fmadd_ps(x0, w01, ga[i][1]));
    }
  }
  for (; k < k0 + g; ++k) {  // an odd group's last input
    if ((k & 3) == 0) _mm_prefetch(reinterpret_cast<const char*>(wp + k * NR) + KT_PREFETCH, _MM_HINT_T0);
    __m256 w0, w1;
    fp8x16_avx2(wp + k * NR, w0, w1);
    for (int i = 0; i < MR; ++i) {
      __m256 x = _mm256_broadcast_ss(X + i * ldx + k);
      ga[i][0] = _mm256_fmadd_ps(x, w0, ga[i][0]);
      ga[i][1] = _mm256_fmadd_ps(x, w1, ga[i][1]);
    }
  }
  const __m256 bias = _mm256_set1_ps(256.f);
  __m256 s0 = _mm256_mul_ps(_mm256_loadu_ps(s), bias), s1 = _mm256_mul_ps(_mm256_loadu_ps(s + 8), bias);
  for (int i = 0; i < MR; ++i) {
    acc[i][0] = _mm256_fmadd_ps(ga[i][0], s0, acc[i][0]);
    acc[i][1] = _mm256_fmadd_ps(ga[i][1], s1, acc[i][1]);
  }
}

// The int8 / int4 / w8a8 kernels: *_avx2, and *_avxvnni where the compiler knows AVX-VNNI
// (GCC 11+, Clang 12+; MSVC: not yet). kt_cpu.cpp uses the latter on CPUs that have it.
#define KT_INT_TARGET KT_TARGET("avx2,fma,f16c")
#define KT_INT(name) name##_avx2
#define KT_I8_MR 3
#define KT_DPWSSD(acc, a, b) _mm256_add_epi32(acc, _mm256_madd_epi16(a, b))
#define KT_DPBUSD(acc, u, s) \
  _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)))
#include "kernels_int_avx2.inc"
#undef KT_INT_TARGET
#undef KT_INT
#undef KT_I8_MR
#undef KT_DPWSSD
#undef KT_DPBUSD

#if (defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11)
#define KT_HAVE_AVXVNNI 1
#ifndef KT_AVXVNNI  // tests/native/simd_emulated.cpp sets it to compile these under SIMDe
#define KT_AVXVNNI KT_TARGET("avxvnni,avx2,fma,f16c")
#endif
#define KT_INT_TARGET KT_AVXVNNI
#define KT_INT(name) name##_avxvnni
#define KT_I8_MR 4
#define KT_DPWSSD(acc, a, b) _mm256_dpwssd_avx_epi32(acc, a, b)
#define KT_DPBUSD(acc, u, s) _mm256_dpbusd_avx_epi32(acc, u, s)
#include "kernels_int_avx2.inc"
#undef KT_INT_TARGET
#undef KT_INT
#undef KT_I8_MR
#undef KT_DPWSSD
#undef KT_DPBUSD
#endif

template <int MR>
KT_TARGET("avx2,fma,f16c") inline void rows_avx2(const Weight& w, int64_t p, const float* X, int64_t ldx, float* out) {
  __m256 acc[4][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  if (w.fmt == FMT_BF16) {
    const uint16_t* wp = static_cast<const uint16_t*>(w.data) + p * w.K * NR;
    tile_rows<MR>(wp, X, ldx, 0, w.K, acc);
  } else if (w.fmt == FMT_FP8) {
    const uint8_t* wp = static_cast<const uint8_t*>(w.data) + p * w.K * NR;
    const int64_t G = w.K / w.group;
    for (int64_t g = 0; g < G; ++g)
      tile_f8_group<MR>(wp, X, ldx, g * w.group, w.group, w.scale + (p * G + g) * NR, acc);
  }
  for (int i = 0; i < MR; ++i) {
    _mm256_storeu_ps(out + i * NR, acc[i][0]);
    _mm256_storeu_ps(out + i * NR + 8, acc[i][1]);
  }
}

#include "panel_f32_avx2.inc"  // panel_bf16_f32_avx2, panel_fp8_f32_avx2

KT_TARGET("avx2,fma,f16c") inline void panel_gemm_avx2(const Weight& w, int64_t p, const float* X, int64_t ldx, int64_t n,
                                                  float* out) {
  if (w.fmt == FMT_BF16 && n >= kPanelF32Rows) return panel_bf16_f32_avx2(w, p, X, ldx, n, out);
  // fp8 groups of 16+: each group flushes its sums through memory (one MoE layer T=512, Zen 3: g8 1.075x,
  // g16 0.90x, g32 0.80x, g64 0.75x, g128 0.71x of tile_f8_group)
  if (w.fmt == FMT_FP8 && w.group >= 16 && n >= kPanelF32Rows) return panel_fp8_f32_avx2(w, p, X, ldx, n, out);
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) rows_avx2<4>(w, p, X + i * ldx, ldx, out + i * NR);
  switch (n - i) {
    case 3: rows_avx2<3>(w, p, X + i * ldx, ldx, out + i * NR); break;
    case 2: rows_avx2<2>(w, p, X + i * ldx, ldx, out + i * NR); break;
    case 1: rows_avx2<1>(w, p, X + i * ldx, ldx, out + i * NR); break;
    default: break;
  }
}

#include "dense_rows_avx2.inc"  // dense_rows_avx2, dense_quad_avx2, dense_pair_avx2

// e^x, x = n ln2 + r with |r| <= ln2/2 and e^r by its Taylor series to r^6 (relative error
// < 1e-7 over the clamped range, which keeps 2^n a normal float).
KT_TARGET("avx2,fma,f16c") inline __m256 exp_avx2(__m256 x) {
  // (the bound first: MAXPS / MINPS return their second operand when either is NaN, so NaN stays NaN)
  x = _mm256_min_ps(_mm256_set1_ps(88.0f), _mm256_max_ps(_mm256_set1_ps(-87.0f), x));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln2 in two parts (exact n * hi)
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.f / 720.f);
  for (float c : {1.f / 120.f, 1.f / 24.f, 1.f / 6.f, 0.5f, 1.f, 1.f}) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// out[0..16) = silu(g) * u = g / (1 + e^-g) * u: the MoE's activation for one panel's 16 outputs, for
// n rows of 16: g, u rows 16 apart, out rows ldo apart (a call a block of rows: callers built
// without AVX2 cannot inline it)
KT_TARGET("avx2,fma,f16c") inline void silu_mul16_avx2(const float* g, const float* u, int64_t n, float* out, int64_t ldo) {
  for (int64_t r = 0; r < n; ++r)
    for (int h = 0; h < 16; h += 8) {
      const __m256 gv = _mm256_loadu_ps(g + r * 16 + h);
      const __m256 den = _mm256_add_ps(_mm256_set1_ps(1.f), exp_avx2(_mm256_sub_ps(_mm256_setzero_ps(), gv)));
      _mm256_storeu_ps(out + r * ldo + h, _mm256_mul_ps(_mm256_div_ps(gv, den), _mm256_loadu_ps(u + r * 16 + h)));
    }
}

// One row of quantize_rows (kt_cpu.cpp): codes in [-qmax, qmax] of x / (amax / qmax), rounded
// half to even by the same IEEE division and rounding as the scalar loop, so the codes are
// identical; Q is int16_t or int8_t. Returns the scale.
template <typename Q>
KT_TARGET("avx2,fma,f16c") inline float quantize_row_avx2(const float* x, int64_t ld, int64_t K, float qmax, Q* q) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const int64_t K8 = K / 8 * 8;
  __m256 m = _mm256_setzero_ps();
  for (int64_t k = 0; k < K8; k += 8) m = _mm256_max_ps(m, _mm256_and_ps(_mm256_loadu_ps(x + k), absmask));
  float lanes[8], amax = 0.f;
  _mm256_storeu_ps(lanes, m);
  for (float v : lanes) amax = std::max(amax, v);
  for (int64_t j = K8; j < K; ++j) amax = std::max(amax, std::fabs(x[j]));
  const float s = std::max(amax, 1e-30f) / qmax;
  const __m256 vs = _mm256_set1_ps(s), hi = _mm256_set1_ps(qmax), lo = _mm256_set1_ps(-qmax);
  for (int64_t k = 0; k < K8; k += 8) {
    const __m256 r = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x + k), vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i v = _mm256_cvtps_epi32(_mm256_min_ps(hi, _mm256_max_ps(lo, r)));
    const __m128i h = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    if (sizeof(Q) == 2) _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), h);
    else _mm_storel_epi64(reinterpret_cast<__m128i*>(q + k), _mm_packs_epi16(h, h));
  }
  for (int64_t j = K8; j < K; ++j) q[j] = static_cast<Q>(std::min(qmax, std::max(-qmax, std::nearbyint(x[j] / s))));
  for (int64_t j = K; j < ld; ++j) q[j] = 0;
  return s;
}

// Streaming read of n floats (memory-bandwidth probe): returns their sum so nothing is elided.
KT_TARGET("avx2,fma,f16c") inline float stream_sum_avx2(const float* a, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    s0 = _mm256_add_ps(s0, _mm256_loadu_ps(a + i));
    s1 = _mm256_add_ps(s1, _mm256_loadu_ps(a + i + 8));
    s2 = _mm256_add_ps(s2, _mm256_loadu_ps(a + i + 16));
    s3 = _mm256_add_ps(s3, _mm256_loadu_ps(a + i + 24));
  }
  __m256 s = _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3));
  float tmp[8];
  _mm256_storeu_ps(tmp, s);
  float r = 0;
  for (float v : tmp) r += v;
  for (; i < n; ++i) r += a[i];
  return r;
}
#endif  // KT_X86

inline void dense_pair_generic(const uint16_t* w0, const uint16_t* w1, const float* X, int64_t n, int64_t K,
                               float* o0, float* o1, int64_t ldo) {
  for (int64_t i = 0; i < n; ++i) {
    double a0 = 0, a1 = 0;
    for (int64_t k = 0; k < K; ++k) {
      a0 += static_cast<double>(X[i * K + k]) * bf16_to_f32(w0[k]);
      a1 += static_cast<double>(X[i * K + k]) * bf16_to_f32(w1[k]);
    }
    o0[i * ldo] = static_cast<float>(a0);
    o1[i * ldo] = static_cast<float>(a1);
  }
}

inline float stream_sum_generic(const float* a, int64_t n) {
  float r0 = 0, r1 = 0, r2 = 0, r3 = 0;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    r0 += a[i];
    r1 += a[i + 1];
    r2 += a[i + 2];
    r3 += a[i + 3];
  }
  for (; i < n; ++i) r0 += a[i];
  return r0 + r1 + r2 + r3;
}

}  // namespace kt
