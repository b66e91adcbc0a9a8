// The one-token bf16 GEMV on AVX-512 (decode's dense projections and the LM head: bf16 rows
// streamed row-major from DRAM), in two forms. The float form widens every 16 weights to float32
// (a load, a widening, a shift and an FMA per 32 bytes). The AVX512-BF16 form multiplies 32
// weights of a row per VDPBF16PS by the activations in bf16, from the row as it lies: a bf16
// model's activations are bf16 values already, and linear_bf16 (kt_cpu.cpp) takes it only when
// every input is exactly one, so the products are the same; only the order of the float32 sums
// differs. The row stream is what bounds both: on a Zen 4 EPYC, 8 rows at a time, the pair form
// takes 0.97x the float form's time (bench/ab_dense.py, 151936 x 2048 and 32768 x 4096, 12
// alternating blocks each). tests/native/simd_emulated.cpp compiles both under SIMDe.
#pragma once
#include "kernels_bf16dp.hpp"  // (and kernels_avx512.hpp)

namespace kt {

#if defined(KT_X86)
// rows of a one-token GEMV streamed side by side (bench/ab_dense.py, Zen 4 EPYC, 151936 x 2048: 8 rows
// 0.81-0.91x the time of 4, 16 rows 0.9x; 32768 x 4096: 0.92x)
constexpr int kDenseRows = 8;
#ifndef KT_DENSE_PREFETCH
#define KT_DENSE_PREFETCH 8192  // bytes ahead of each row (bench/ab_dense.py, Zen 4 EPYC, one token: 151936 x 2048
// 0.77-0.89x the time of 2048 bytes, 32768 x 4096 0.77x; 4096: 0.83x; 16384: 0.9x)
#endif
// One token against RW bf16 rows (the row-major dense GEMV of decode): 16 inputs per step, so
// one widening load per 32 weight bytes where the AVX2 form needs two; RW = kDenseRows rows in flight
template <int RW>
KT_AVX512 inline void dense_rows_avx512(const uint16_t* w, int64_t K, const float* x, float* o) {
  __m512 a[RW];
  for (int j = 0; j < RW; ++j) a[j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m512 xv = _mm512_loadu_ps(x + k);
    if ((k & 31) == 0)  // a cache line of each row per two steps
      for (int j = 0; j < RW; ++j) _mm_prefetch(reinterpret_cast<const char*>(w + j * K + k) + KT_DENSE_PREFETCH, _MM_HINT_T0);
    for (int j = 0; j < RW; ++j) {
      const __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(
          _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * K + k))), 16));
      a[j] = _mm512_fmadd_ps(xv, v, a[j]);
    }
  }
  for (int j = 0; j < RW; ++j) {
    float lanes[16], v = 0.f;  // (not _mm512_reduce_add_ps: SIMDe, which tests/native builds with, lacks it)
    _mm512_storeu_ps(lanes, a[j]);
    for (float l : lanes) v += l;
    for (int64_t kk = k; kk < K; ++kk) v += x[kk] * bf16_to_f32(w[j * K + kk]);
    o[j] = v;
  }
}
#endif

#if defined(KT_X86) && defined(KT_HAVE_AVX512BF16)
// x (K floats) in bf16 into xh, when every value is exactly one (else false: xh is partly written)
KT_AVX512 inline bool bf16_exact_avx512(const float* x, int64_t K, uint16_t* xh) {
  int64_t k = 0;
  __mmask16 off = 0;
  for (; k + 16 <= K; k += 16) {
    const __m512 v = _mm512_loadu_ps(x + k);
    const __m256i h = bf16x16_of(v);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(xh + k), h);
    off |= _mm512_cmp_ps_mask(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)), v, _CMP_NEQ_UQ);
  }
  if (off) return false;
  for (; k < K; ++k) {
    xh[k] = f32_to_bf16(x[k]);
    if (!(bf16_to_f32(xh[k]) == x[k])) return false;
  }
  return true;
}

// One token (x, and xh: x in bf16) against RW bf16 rows of K: o[j] = row j . x
template <int RW>
KT_AVX512BF16 inline void dense_rows_bf16dp(const uint16_t* w, int64_t K, const uint16_t* xh, const float* x, float* o) {
  __m512 a[RW];
  for (int j = 0; j < RW; ++j) a[j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {  // a cache line of each row a step
    const __m512bh xv = bit_as<__m512bh>(_mm512_loadu_si512(xh + k));
    for (int j = 0; j < RW; ++j) _mm_prefetch(reinterpret_cast<const char*>(w + j * K + k) + KT_DENSE_PREFETCH, _MM_HINT_T0);
    for (int j = 0; j < RW; ++j) a[j] = _mm512_dpbf16_ps(a[j], bit_as<__m512bh>(_mm512_loadu_si512(w + j * K + k)), xv);
  }
  for (int j = 0; j < RW; ++j) {
    float lanes[16], v = 0.f;  // (not _mm512_reduce_add_ps: SIMDe lacks it)
    _mm512_storeu_ps(lanes, a[j]);
    for (float l : lanes) v += l;
    for (int64_t kk = k; kk < K; ++kk) v += x[kk] * bf16_to_f32(w[j * K + kk]);
    o[j] = v;
  }
}
#endif

}  // namespace kt
