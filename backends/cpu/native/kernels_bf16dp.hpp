// The AVX512-BF16 pair kernels (VDPBF16PS) for prefill on CPUs without AMX tiles (Zen 4 / 5, Cooper
// Lake), and the decoders that put a panel of any weight-only format into bf16 input pairs, the operand
// order both VDPBF16PS and AMX's TDPBF16PS multiply (kernels_amx.hpp's tile kernels call the same
// decoders). Same weight layouts as kernels.hpp. tests/native/simd_emulated.cpp compiles it under SIMDe.
#pragma once
#include "kernels_avx512.hpp"

#ifdef KT_X86
namespace kt {

// AVX512-BF16 (Zen 4, Cooper Lake): VDPBF16PS multiplies bf16 pairs into fp32 sums, twice the
// FMA path's work per instruction. For prefill rows of experts and dense projections on CPUs
// without AMX; like AMX it rounds the activations to bf16 (the MoE's inputs are bf16 hidden
// states already; the down projection's input is rounded as a bf16 model rounds it), and the
// dequantized int8 / int4 / fp8 weights too (per-row int8 codes are exact: its row scales multiply
// the sums).
// GCC 10+ / Clang 9+ know the instruction (KT_HAVE_AVX512BF16).
#if (defined(__clang__) && __clang_major__ >= 9) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 10)
#define KT_HAVE_AVX512BF16 1
#ifndef KT_AVX512BF16  // tests/native/simd_emulated.cpp sets it to compile these under SIMDe
#define KT_AVX512BF16 KT_TARGET("avx512bf16,avx512f,avx512bw,avx512vnni,avx2,fma,f16c")
#endif

// 32 floats -> 32 bf16 in the same order (lo's 16, then hi's 16), rounded to nearest even:
// VCVTNE2PS2BF16 (AVX512-BF16, which every AMX CPU has). The emulation harness (SIMDe has no
// such intrinsic) defines KT_EMULATED_CVTNE2PS and gets the same rounding from integer steps.
KT_AVX512BF16 inline __m512i bf16x32(__m512 lo, __m512 hi) {
#if defined(KT_EMULATED_CVTNE2PS)
  return _mm512_inserti64x4(_mm512_castsi256_si512(bf16x16_of(lo)), bf16x16_of(hi), 1);
#else
  return bit_as<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));
#endif
}

// Bytes ahead in a panel stream that the decoders prefetch. Farther is worse: the
// hardware prefetchers already run ahead, and lines fetched early wait in the fill buffers the tile
// loads need (one MoE layer, 2-core AMX Xeon, bench/ab_native.py, 2048 -> 512: bf16 T=128 -8%,
// T=512 -13%; int4 per row T=128 -3%, T=512 -4%; fp8, int4 g32 -1..-2%; no prefetch: int8 T=512 +6%).
// The pair kernels' decoders (panels_bf16dp_avx512) take the same. The int8 integer-tile decoder keeps
// KT_AMX_PREFETCH_INT8 (kernels_amx.hpp).
#ifndef KT_DECODE_PREFETCH
#define KT_DECODE_PREFETCH 512
#endif

// Bytes of one panel's codes (what kernels.hpp's layouts store per 16 rows)
inline int64_t panel_bytes(const Weight& w) {
  return w.fmt == FMT_BF16 ? w.K * NR * 2 : w.fmt == FMT_INT4 ? w.K * NR / 2 : w.K * NR;
}

// The 64 bytes at p as 32 words, its two 32-byte halves interleaved word by word (word 2j: the
// first half's word j, 2j + 1: the second's): bf16 rows k and k + 1 as B-tile input pairs. One
// VPERMW; two widenings, a shift and an OR before (one bf16 MoE layer T=512: 0.949-0.953 the time,
// T=128 0.94; bit-identical). The int8 quads (decode_quads_q8) read 3.3-4.2% slower with it at T=128.
KT_AVX512BF16 inline __m512i halves_interleaved(const void* p) {
  const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                         21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(order, _mm512_loadu_si512(p));
}

// Inputs [32 kb, 32 kb + 32) of bf16 panel p ([K][16]) -> out ([16][16] input pairs, a B tile): inputs
// k and k + 1 of each row side by side (exact). A fixed 32 inputs: the tile loop's bf16 step
KT_AVX512BF16 inline void decode_block_bf16(const Weight& w, int64_t p, int64_t kb, uint32_t* out) {
  const uint16_t* wp = static_cast<const uint16_t*>(w.data) + (p * w.K + kb * 32) * NR;
  for (int64_t k = 0; k < 32; k += 2) {
    // every other line: a prefetch a line was slower (one MoE layer T=512 73.9 -> 77.4 ms)
    if ((k & 3) == 0) _mm_prefetch(reinterpret_cast<const char*>(wp + k * NR) + KT_DECODE_PREFETCH, _MM_HINT_T0);
    _mm512_storeu_si512(out + k / 2 * NR, halves_interleaved(wp + k * NR));
  }
}

// 16 int8 codes at p, sign-extended to int32 lanes straight from memory (VPMOVSXBD: one shuffle-port
// op where widening 32 codes to int16 and each half again took four)
KT_AVX512BF16 inline __m512i int8x16_at(const int8_t* p) {
#if defined(KT_EMULATED_CVTEPI8_EPI32)  // the emulation harness: SIMDe has no 512-bit VPMOVSXBD
  return _mm512_cvtepi16_epi32(_mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
  return _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#endif
}

// Inputs [k0, k1) (even; int4: multiples of 4; bf16: of 32) of panel p of w -> buf [(k1 - k0) / 2][16]
// input pairs (B tiles, back to back). Each step makes the 32 (row, input) values of rows 0-7
// and then 8-15 in B-tile order as floats and rounds them once (bf16: moves them, exact).
// int8 per row leaves its row scales to the caller (row_scales_left).
KT_AVX512BF16 inline void decode_inputs_bf16(const Weight& w, int64_t p, int64_t k0, int64_t k1, uint32_t* buf) {
  const int64_t K = w.K;
  const auto fetch = [](const void* at) { _mm_prefetch(static_cast<const char*>(at) + KT_DECODE_PREFETCH, _MM_HINT_T0); };
  if (w.fmt == FMT_BF16) {  // multiples of 32 inputs here
    for (int64_t kb = k0 / 32; kb < k1 / 32; ++kb) decode_block_bf16(w, p, kb, buf + (kb * 32 - k0) / 2 * NR);
    return;
  }
  if (w.fmt == FMT_INT8 && !int8_grouped(w)) {  // [K/2][16][2]: already B-tile order; |code| <= 127 is exact in bf16
    const int8_t* wp = static_cast<const int8_t*>(w.data) + p * K * NR;
    for (int64_t k = k0; k < k1; k += 2) {
      if ((k & 3) == 0) fetch(wp + k * NR);
      _mm512_storeu_si512(buf + (k - k0) / 2 * NR, bf16x32(_mm512_cvtepi32_ps(int8x16_at(wp + k * NR)),
                                                    _mm512_cvtepi32_ps(int8x16_at(wp + k * NR + 16))));
    }
    return;
  }
  // group scales (and zero points) repeated per input of a pair: rows 0-7 and rows 8-15
  const __m512i rows_lo = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
  const __m512i rows_hi = _mm512_add_epi32(rows_lo, _mm512_set1_epi32(8));
  const int64_t G = K / w.group;
  for (int64_t k = k0; k < k1;) {  // one weight group's part of [k0, k1) at a time
    const int64_t g = k / w.group, end = std::min(k1, (g + 1) * w.group);
    if (w.fmt == FMT_FP8) {  // [K][16], even groups
      const uint8_t* wp = static_cast<const uint8_t*>(w.data) + p * K * NR;
      const __m512 s = _mm512_mul_ps(_mm512_loadu_ps(w.scale + (p * G + g) * NR), _mm512_set1_ps(256.f));
      const __m512 s0 = _mm512_permutexvar_ps(rows_lo, s), s1 = _mm512_permutexvar_ps(rows_hi, s);
      for (; k < end; k += 2) {
        if ((k & 3) == 0) fetch(wp + k * NR);
        const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wp + k * NR));
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wp + (k + 1) * NR));
        _mm512_storeu_si512(buf + (k - k0) / 2 * NR, bf16x32(_mm512_mul_ps(fp8x16_of(_mm_unpacklo_epi8(a, b)), s0),
                                                      _mm512_mul_ps(fp8x16_of(_mm_unpackhi_epi8(a, b)), s1)));
      }
      continue;
    }
    const __m512 s = group_scales16(w, (p * G + g) * NR), zs = _mm512_mul_ps(group_zeros16(w, (p * G + g) * NR), s);
    const __m512 s0 = _mm512_permutexvar_ps(rows_lo, s), s1 = _mm512_permutexvar_ps(rows_hi, s);
    const __m512 z0 = _mm512_permutexvar_ps(rows_lo, zs), z1 = _mm512_permutexvar_ps(rows_hi, zs);
    if (w.fmt == FMT_INT8) {  // grouped: [K/2][16][2] in B-tile order; the group's scales (and zeros) folded in
      const int8_t* wp = static_cast<const int8_t*>(w.data) + p * K * NR;
      for (; k < end; k += 2) {
        if ((k & 3) == 0) fetch(wp + k * NR);
        _mm512_storeu_si512(buf + (k - k0) / 2 * NR, bf16x32(_mm512_fmsub_ps(_mm512_cvtepi32_ps(int8x16_at(wp + k * NR)), s0, z0),
                                                      _mm512_fmsub_ps(_mm512_cvtepi32_ps(int8x16_at(wp + k * NR + 16)), s1, z1)));
      }
      continue;
    }
    // FMT_INT4 [K/4][16] words; word 2l+e, nibble h+2s: row l+8h, input 4q+2s+e; nibble i shifted onto
    // bit 19 (int4_at_bit19)
    const uint8_t* wp = static_cast<const uint8_t*>(w.data) + p * (K / 2) * NR;
    const __m512 t0 = _mm512_mul_ps(s0, _mm512_set1_ps(16.f)), t1 = _mm512_mul_ps(s1, _mm512_set1_ps(16.f));
    const __m512 c0 = _mm512_add_ps(t0, z0), c1 = _mm512_add_ps(t1, z1);
    for (; k < end; k += 4) {
      fetch(wp + k * 8);
      const __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + k * 8)));
      _mm512_storeu_si512(buf + (k - k0) / 2 * NR, bf16x32(int4_at_bit19(_mm512_slli_epi32(v, 19), t0, c0),
                                                    int4_at_bit19(_mm512_slli_epi32(v, 15), t1, c1)));  // s = 0
      _mm512_storeu_si512(buf + ((k - k0) / 2 + 1) * NR, bf16x32(int4_at_bit19(_mm512_slli_epi32(v, 11), t0, c0),
                                                          int4_at_bit19(_mm512_slli_epi32(v, 7), t1, c1)));  // s = 1
    }
  }
}

// The per-output scales decode_inputs_bf16 leaves to apply to the products (int8 per row), or null
inline const float* row_scales_left(const Weight& w, int64_t p) {
  return w.fmt == FMT_INT8 && !int8_grouped(w) ? w.scale + p * NR : nullptr;
}

// dp_pairs prefetches this many bytes ahead into L2: into L1 (_MM_HINT_T0) the lines evict the
// blocks in pair order the row groups read (one MoE layer, Zen 4 EPYC, bf16: 8 KB ahead into L1
// vs into L2: T=512 1.15x the time, T=128 1.11x; 32 KB into L1: 1.33x at T=512; 8 / 16 / 32 / 64 KB
// into L2 within 3% of each other)
#ifndef KT_DP_PREFETCH
#define KT_DP_PREFETCH 32768
#endif
// dp_rows fetches the next K block of its panels into L1 while it runs, a line a pair (one MoE layer, Zen 5
// EPYC, bf16, T=512, skewed routing: 0.80x the time; dp_pairs' loads had waited on memory). GCC 12 spilled
// every sum to the stack on each pass when that was _mm_prefetch, or came before the pass's loads: hence
// the builtin.
#if defined(_MSC_VER) && !defined(__clang__)
#define KT_DP_FETCH(p) _mm_prefetch((p), _MM_HINT_T0)
#define KT_DP_FETCH_L2(p) _mm_prefetch((p), _MM_HINT_T1)
#else
#define KT_DP_FETCH(p) __builtin_prefetch((p), 0, 3)
#define KT_DP_FETCH_L2(p) __builtin_prefetch((p), 0, 2)
#endif
// Inputs [k0, k1) (even) of bf16 panel p ([K][16]) -> buf [(k1 - k0) / 2][16] input pairs: lane j of
// each 64-byte row holds row j's inputs k and k + 1, the operand order VDPBF16PS multiplies (exact moves;
// decode_block_bf16's order). With fetch_l2, it also prefetches KT_DP_PREFETCH bytes ahead into L2 (one
// row group: the rows' pass is too short to spread those fetches over, see dp_rows)
KT_AVX512BF16 inline void dp_pairs(const Weight& w, int64_t p, int64_t k0, int64_t k1, uint32_t* buf, bool fetch_l2) {
  const uint16_t* wp = static_cast<const uint16_t*>(w.data) + p * w.K * NR;
  for (int64_t k = k0; k < k1; k += 2) {
    if (fetch_l2) _mm_prefetch(reinterpret_cast<const char*>(wp + k * NR) + KT_DP_PREFETCH, _MM_HINT_T1);
    _mm512_store_si512(buf + (k - k0) / 2 * NR, halves_interleaved(wp + k * NR));
  }
}

// MR rows of bf16 activations (row i at xh + i * ldx) against kp input pairs of one or two panels in
// pair order (b0, b1): o0 / o1 (MR x 16) = their sums, plus what o0 / o1 hold unless first. Each
// activation pair feeds both panels. Step j fetches line j of pf0 / pf1 into L1 and, for j < nl, line j
// of pl0 / pl1 into L2: the row groups of a K block share its panels' next-but-some lines among their
// passes, so that no pass asks memory for a whole block at once (panels_bf16dp_avx512).
template <int MR, bool TWO>
KT_AVX512BF16 inline void dp_rows(const uint32_t* b0, const uint32_t* b1, int64_t kp, const uint16_t* xh, int64_t ldx,
                                  float* o0, float* o1, bool first, const char* pf0, const char* pf1,
                                  int64_t ldo = NR, const char* pl0 = nullptr, const char* pl1 = nullptr,
                                  int64_t nl = 0) {
  __m512 a0[MR], a1[MR];
  for (int i = 0; i < MR; ++i) {
    a0[i] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(o0 + i * ldo);
    if (TWO) a1[i] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(o1 + i * ldo);
  }
  for (int64_t j = 0; j < kp; ++j) {
    const __m512bh w0 = bit_as<__m512bh>(_mm512_load_si512(b0 + j * NR));
    const __m512bh w1 = bit_as<__m512bh>(_mm512_load_si512((TWO ? b1 : b0) + j * NR));
    if (j < nl) {
      KT_DP_FETCH_L2(pl0 + j * 64);
      if (TWO) KT_DP_FETCH_L2(pl1 + j * 64);
    }
    KT_DP_FETCH(pf0 + j * 64);
    if (TWO) KT_DP_FETCH(pf1 + j * 64);
    for (int i = 0; i < MR; ++i) {
      int32_t pair;
      std::memcpy(&pair, xh + i * ldx + 2 * j, 4);
      const __m512bh x = bit_as<__m512bh>(_mm512_set1_epi32(pair));
      a0[i] = _mm512_dpbf16_ps(a0[i], x, w0);
      if (TWO) a1[i] = _mm512_dpbf16_ps(a1[i], x, w1);
    }
  }
  for (int i = 0; i < MR; ++i) {
    _mm512_storeu_ps(o0 + i * ldo, a0[i]);
    if (TWO) _mm512_storeu_ps(o1 + i * ldo, a1[i]);
  }
}

template <bool TWO>
KT_AVX512BF16 inline void dp_rows_n(int m, const uint32_t* b0, const uint32_t* b1, int64_t kp, const uint16_t* xh,
                                    int64_t ldx, float* o0, float* o1, bool first, const char* pf0, const char* pf1,
                                    int64_t ldo = NR, const char* pl0 = nullptr, const char* pl1 = nullptr,
                                    int64_t nl = 0) {
  switch (m) {
    case 1: return dp_rows<1, TWO>(b0, b1, kp, xh, ldx, o0, o1, first, pf0, pf1, ldo, pl0, pl1, nl);
    case 2: return dp_rows<2, TWO>(b0, b1, kp, xh, ldx, o0, o1, first, pf0, pf1, ldo, pl0, pl1, nl);
    case 3: return dp_rows<3, TWO>(b0, b1, kp, xh, ldx, o0, o1, first, pf0, pf1, ldo, pl0, pl1, nl);
    case 4: return dp_rows<4, TWO>(b0, b1, kp, xh, ldx, o0, o1, first, pf0, pf1, ldo, pl0, pl1, nl);
    case 5: return dp_rows<5, TWO>(b0, b1, kp, xh, ldx, o0, o1, first, pf0, pf1, ldo, pl0, pl1, nl);
    case 6: return dp_rows<6, TWO>(b0, b1, kp, xh, ldx, o0, o1, first, pf0, pf1, ldo, pl0, pl1, nl);
    case 7: return dp_rows<7, TWO>(b0, b1, kp, xh, ldx, o0, o1, first, pf0, pf1, ldo, pl0, pl1, nl);
    default: return dp_rows<8, TWO>(b0, b1, kp, xh, ldx, o0, o1, first, pf0, pf1, ldo, pl0, pl1, nl);
  }
}

// The fewest rows of one call from which weights of format fmt take these kernels (round callers), 0: never.
// bf16: its panels put in pair order (one Qwen3-30B-A3B MoE layer on a Zen 4 EPYC, T=128, ~8 rows an expert:
// 8 rows 0.92x the time of 16; on a Zen 5 EPYC, skewed routing, 2 rows against 8: T=32 0.85x, T=128 0.85x,
// T=512 ~0.92x (4 rows); 1 row no better). int8 / int4 / fp8: decoded to bf16 pairs once a K block for all
// the rows, where the int16-activation kernels decode once for every 8 rows and fp8's float kernels once for
// every 4. Zen 5 EPYC, 2 threads, against those kernels: a 4096 x 2048 quantized dense projection of T rows
// (alternating, medians) int8 per row T=8 1.22x the time, 16 0.89x, 48 0.74x; int4 g32 8 1.15x, 16 0.92x, 24
// 0.85x; fp8 g128 4 1.18x, 6 0.66x; one MoE layer, skewed routing, int4 g32 from 8 rows T=512 0.86x, T=128
// 0.98x (from 16: 0.87x, 0.98x; from 2: T=32 1.34x); int8 per row T=512 0.75x; fp8 g128 T=512 0.43x
inline int64_t dp_min_rows(int fmt) {
  switch (fmt) {
    case FMT_BF16: return 2;
    case FMT_FP8: return 6;
    case FMT_INT8:
    case FMT_INT4: return 16;
    default: return 0;  // w8a8: its integer kernels
  }
}
constexpr int64_t kDpBlock = 256;   // inputs of a K block: two panels' pairs, 16 KB, stay in L1 for every row group

// Whether the pair kernels take n rows of w (bf16 pairs in hardware and round callers: the caller's checks)
inline bool bf16dp_takes(const Weight& w, int64_t n) {
  const int64_t least = dp_min_rows(w.fmt);
  return least > 0 && n >= least && w.K % 16 == 0 && (w.fmt != FMT_FP8 || w.group % 2 == 0);  // (fp8: even groups)
}

// rows [n][16] of out times the 16 per-output scales s
KT_AVX512 inline void scale_rows16(float* out, int64_t n, const float* s) {
  const __m512 v = _mm512_loadu_ps(s);
  for (int64_t i = 0; i < n; ++i) _mm512_storeu_ps(out + i * NR, _mm512_mul_ps(_mm512_loadu_ps(out + i * NR), v));
}

// Panel p0 of w0 and, when w1, panel p1 of w1 (the same K and format, bf16dp_takes) against n rows of bf16
// activations (row i at xh + i * ldx): out0 / out1 [n][16]. Each K block of the panels is put in pair order
// once (not once per row group; other formats decoded to bf16 there), then every group of up to 8 rows runs
// against it from L1. The sums run over the input pairs in order from zero, whatever the blocks and groups:
// results do not depend on n or on whether a second panel comes along.
KT_AVX512BF16 inline void panels_bf16dp_avx512(const Weight& w0, int64_t p0, const Weight* w1, int64_t p1,
                                               const uint16_t* xh, int64_t ldx, int64_t n, float* out0, float* out1) {
  // (not an alignas thread_local array: a dlopen'ed library's TLS need not honour 64-byte alignment)
  thread_local lvector<uint32_t> buf(kDpBlock * NR);
  uint32_t *b0 = buf.data(), *b1 = b0 + kDpBlock / 2 * NR;
  const int64_t groups = (n + 7) / 8, per = (n + groups - 1) / groups;  // even groups: 17 rows as 6 + 6 + 5
  const int64_t passes = (n + per - 1) / per;
  // bf16, two or more row groups: their passes fetch the lines KT_DP_PREFETCH bytes past the next block into
  // L2, a share each, instead of dp_pairs all at once (one bf16 MoE layer, Zen 5 EPYC, 2 threads,
  // bench/ab_native.py: T=512 0.88-0.90x the time, skewed routing 0.93x, T=32 / 128 skewed 0.99x,
  // bit-identical; a one-thread microbenchmark, 8 rows an expert, a single pass: 0.8x, so one row group
  // keeps dp_pairs' fetches)
  const bool spread = w0.fmt == FMT_BF16 && passes > 1;
  const int64_t share = spread ? (kDpBlock / 2 + passes - 1) / passes : 0;  // lines a pass, of a block's kp
  for (int64_t k0 = 0; k0 < w0.K; k0 += kDpBlock) {
    const int64_t k1 = std::min(w0.K, k0 + kDpBlock), kp = (k1 - k0) / 2;
    const char *pf0 = reinterpret_cast<const char*>(b0), *pf1 = reinterpret_cast<const char*>(b1);
    if (w0.fmt == FMT_BF16) {
      dp_pairs(w0, p0, k0, k1, b0, !spread);
      if (w1) dp_pairs(*w1, p1, k0, k1, b1, !spread);
      // the next K block of both panels (past the last: the next panels), a line a pair while the rows run
      pf0 = reinterpret_cast<const char*>(static_cast<const uint16_t*>(w0.data) + (p0 * w0.K + k1) * NR);
      pf1 = w1 ? reinterpret_cast<const char*>(static_cast<const uint16_t*>(w1->data) + (p1 * w1->K + k1) * NR) : pf0;
    } else {  // (their decoders prefetch the codes: the rows' fetches read the block itself, from L1)
      decode_inputs_bf16(w0, p0, k0, k1, b0);
      if (w1) decode_inputs_bf16(*w1, p1, k0, k1, b1);
    }
    for (int64_t i = 0, g = 0; i < n; i += per, ++g) {
      const int m = static_cast<int>(std::min(per, n - i));
      // this pass's share of the L2 lines (none past the block's kp)
      const int64_t nl = spread ? std::max<int64_t>(0, std::min(share, kp - g * share)) : 0;
      const char* pl0 = pf0 + KT_DP_PREFETCH + g * share * 64;
      if (w1)
        dp_rows_n<true>(m, b0, b1, kp, xh + i * ldx + k0, ldx, out0 + i * NR, out1 + i * NR, k0 == 0, pf0, pf1, NR,
                        pl0, pf1 + KT_DP_PREFETCH + g * share * 64, nl);
      else
        dp_rows_n<false>(m, b0, b0, kp, xh + i * ldx + k0, ldx, out0 + i * NR, nullptr, k0 == 0, pf0, pf0, NR, pl0,
                         pl0, nl);
    }
  }
  if (const float* s = row_scales_left(w0, p0)) scale_rows16(out0, n, s);  // per-row int8
  if (w1)
    if (const float* s = row_scales_left(*w1, p1)) scale_rows16(out1, n, s);
}

// n rows of floats (row i at X + i * ldx, K % 16 == 0) -> bf16 (to nearest even), row i at xh + i * ldh
// (default K)
KT_AVX512 inline void bf16_rows_avx512(const float* X, int64_t ldx, int64_t n, int64_t K, uint16_t* xh,
                                       int64_t ldh = 0) {
  if (ldh == 0) ldh = K;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t k = 0; k < K; k += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xh + i * ldh + k), bf16x16(X + i * ldx + k));
}

// panel p of w against n float rows of X, rounded to bf16 once per call
KT_AVX512BF16 inline void panel_gemm_bf16dp_avx512(const Weight& w, int64_t p, const float* X, int64_t ldx, int64_t n,
                                                   float* out) {
  thread_local std::vector<uint16_t> xh;
  if (static_cast<int64_t>(xh.size()) < n * w.K) xh.resize(n * w.K);
  bf16_rows_avx512(X, ldx, n, w.K, xh.data());
  panels_bf16dp_avx512(w, p, nullptr, 0, xh.data(), w.K, n, out, nullptr);
}
#endif  // KT_HAVE_AVX512BF16

}  // namespace kt
#endif  // KT_X86
