// The transposed products of training's backward pass through frozen experts, on the packed
// panels the forward reads (kernels.hpp layouts):
//   C[r][k] (+)= sum_m A[r][m] * W[m][k]     for n rows r (A: n x M, C: n x K, W: M x K)
// A panel holds 16 rows of W input-major, so 16 inputs of it decoded to floats, block[kk][j] =
// W[16p + j][k0 + kk], are a block of W^T whose rows already reduce over j: every variant forms
// C^T = W^T A^T block by block.
//   generic: float64 sums over the decoded blocks (the reference);
//   avx2 / avx512: blocks decoded to float32 (vectors of 8 / 16 rows of W); 8 / 16 rows of A^T per
//     vector, a broadcast weight per FMA, register blocks of up to 3 row vectors x 4 / 8 inputs;
//   amx (bf16 models, whose forward rounds the activations to bf16 too): the blocks of a pair of
//     panels rounded to bf16 are an A tile (16 inputs x 32 rows of W), A's columns in bf16 pairs a
//     B tile (16 pairs of those rows x 16 rows of A), TDPBF16PS accumulating C^T tiles;
//   avx512bf16 (bf16 models without AMX): the float form's shape, VDPBF16PS reducing over pairs of
//     W's rows (A^T in bf16 pairs, a bf16 panel's adjacent rows broadcast as one word).
// Picked by expert_grad.inc; tests/native/simd_emulated.cpp compiles the SIMD ones without the ISA.
#pragma once
#include "kernels_amx.hpp"  // and kernels_avx512.hpp, kernels.hpp

#include <vector>

namespace kt {

// W[16p + j][k] of any format, dequantized (the reference every decoder matches)
inline float weight_value(const Weight& w, int64_t p, int64_t k, int j) {
  if (w.fmt == FMT_W8A8)
    return static_cast<float>(static_cast<const int8_t*>(w.data)[((p * (w.K / 4) + k / 4) * NR + j) * 4 + k % 4]) *
           w.scale[p * NR + j];
  float s = 1.f, z = 0.f;
  const float q = weight_at(w, p, k, j, &s, &z);
  return w.fmt == FMT_BF16 ? q : (q - z) * s;
}

// inputs k0 .. k0 + nk of panel p: out[kk][j] = W[16p + j][k0 + kk]; rows nk .. 15 zero
inline void decode_block_generic(const Weight& w, int64_t p, int64_t k0, int nk, float* out) {
  for (int kk = 0; kk < NR; ++kk)
    for (int j = 0; j < NR; ++j) out[kk * NR + j] = kk < nk ? weight_value(w, p, k0 + kk, j) : 0.f;
}

// The generic product for inputs [16 kb0, 16 kb1) of C's n rows (any format, any sizes)
inline void rows_t_generic(const Weight& w, const float* A, int64_t lda, int64_t n, float* C, int64_t ldc,
                           int64_t kb0, int64_t kb1, bool accumulate) {
  const int64_t P = (w.M + NR - 1) / NR;
  std::vector<float> blk(P * NR * NR);
  std::vector<double> acc(NR);
  for (int64_t kb = kb0; kb < kb1; ++kb) {
    const int64_t k0 = kb * NR;
    const int nk = static_cast<int>(std::min<int64_t>(NR, w.K - k0));
    for (int64_t p = 0; p < P; ++p) decode_block_generic(w, p, k0, nk, &blk[p * NR * NR]);
    for (int64_t r = 0; r < n; ++r) {
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t m = 0; m < w.M; ++m) {
        const double a = A[r * lda + m];
        const float* b = &blk[(m / NR) * NR * NR + m % NR];
        for (int kk = 0; kk < nk; ++kk) acc[kk] += a * b[kk * NR];
      }
      for (int kk = 0; kk < nk; ++kk)
        C[r * ldc + k0 + kk] = static_cast<float>(accumulate ? C[r * ldc + k0 + kk] + acc[kk] : acc[kk]);
    }
  }
}

// panels of W whose rows of A^T stay near while every input block passes (the vector forms: a pass's
// 3 row tiles x 128 rows of W, 12-24 KB, in L1; a share's 12 tiles, 48-96 KB, in L2); the whole of A^T
// (64-128 KB a tile at M = 2048) streamed from L2 once per block made the products wait on it (one
// Qwen3-30B-A3B layer's products, T=512, Zen 4 EPYC)
#ifndef KT_GRAD_CHUNK
#define KT_GRAD_CHUNK 8
#endif
constexpr int64_t kGradChunk = KT_GRAD_CHUNK;
// row tiles of the vector forms that share each decoded block: up to 12 (6 and 12 read the same at 32
// rows an expert, one Qwen3-30B-A3B layer, T=512, Zen 3 EPYC), fewer where their C^T tiles would pass
// kRtShareBytes (AVX2 at 2048 inputs: 64 KB a tile; AVX-512 at DeepSeek-V3's 7168: 448 KB), never < 3
#ifndef KT_RT_SHARE
#define KT_RT_SHARE 12
#endif
constexpr int64_t kRtShareBytes = int64_t(2) << 20;

// A^T in vectors of V rows: At[(t * Mp + m) * V + c] = A[t V + c][m] (0 past n or M), Mp = 16 P
inline void transpose_rows(const float* A, int64_t lda, int64_t n, int64_t M, int64_t Mp, int V, std::vector<float>& At) {
  const int64_t tiles = (n + V - 1) / V;
  At.assign(tiles * Mp * V, 0.f);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t m = 0; m < M; ++m) At[((r / V) * Mp + m) * V + r % V] = A[r * lda + m];
}

// C[t V + c][k0 + kk] (+)= acc[kk][c] for the rows and inputs that exist
inline void add_block_t(const float* acc, int V, int64_t t, int64_t n, int nk, float* C, int64_t ldc, int64_t k0,
                        bool accumulate) {
  for (int c = 0; c < V && t * V + c < n; ++c) {
    float* row = C + (t * V + c) * ldc + k0;
    for (int kk = 0; kk < nk; ++kk) row[kk] = accumulate ? row[kk] + acc[kk * V + c] : acc[kk * V + c];
  }
}

#if defined(KT_X86)
// decode_block_generic of a whole block (k0 + 16 <= K) of a bf16, int8, int4 or fp8 weight; each row
// of 16 as two vectors of 8 (rows 0-7, 8-15)
KT_TARGET("avx2,fma,f16c") inline void decode_block_avx2(const Weight& w, int64_t p, int64_t k0, float* out) {
  const int64_t K = w.K;
  if (w.fmt == FMT_BF16) {  // [K][16]
    const uint16_t* wp = static_cast<const uint16_t*>(w.data) + (p * K + k0) * NR;
    for (int kk = 0; kk < NR; ++kk) {
      _mm256_storeu_ps(out + kk * NR, load_bf16x8(wp + kk * NR));
      _mm256_storeu_ps(out + kk * NR + 8, load_bf16x8(wp + kk * NR + 8));
    }
    return;
  }
  const int64_t G = K / w.group;
  if (w.fmt == FMT_INT8) {  // [K/2][16][2]: a row's two inputs side by side
    const int8_t* wp = static_cast<const int8_t*>(w.data) + (p * K + k0) * NR;
    const bool grouped = int8_grouped(w);
    for (int kk = 0; kk < NR; kk += 2) {
      const int64_t gi = (p * G + (k0 + kk) / w.group) * NR;
      for (int h = 0; h < 2; ++h) {  // rows 8h .. 8h + 7
        const __m256 s = grouped ? group_scales8(w, gi + 8 * h) : _mm256_loadu_ps(w.scale + p * NR + 8 * h);
        const __m256 zs = grouped ? _mm256_mul_ps(group_zeros8(w, gi + 8 * h), s) : _mm256_setzero_ps();
        const __m256i v = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wp + kk * NR + 16 * h)));
        const __m256 even = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 16), 16));
        _mm256_storeu_ps(out + kk * NR + 8 * h, _mm256_fmsub_ps(even, s, zs));
        _mm256_storeu_ps(out + (kk + 1) * NR + 8 * h, _mm256_fmsub_ps(_mm256_cvtepi32_ps(_mm256_srai_epi32(v, 16)), s, zs));
      }
    }
    return;
  }
  if (w.fmt == FMT_INT4) {  // [K/4][16] words; word 2l+e, nibble h+2s: row l+8h, input 4q+2s+e
    const uint8_t* wp = static_cast<const uint8_t*>(w.data) + p * (K / 2) * NR + k0 * 8;
    const __m256i mask = _mm256_set1_epi32(0xF);
    const __m256i evens = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);  // a vector's words 2l (e = 0), then 2l + 1
    for (int kk = 0; kk < NR; kk += 4) {
      const int64_t gi = (p * G + (k0 + kk) / w.group) * NR;
      const __m256 s0 = group_scales8(w, gi), s1 = group_scales8(w, gi + 8);
      const __m256 z0 = _mm256_mul_ps(group_zeros8(w, gi), s0), z1 = _mm256_mul_ps(group_zeros8(w, gi + 8), s1);
      // words 0-7 (l = 0..3) and 8-15 (l = 4..7), each split into its e = 0 and e = 1 halves
      const __m256i a = _mm256_permutevar8x32_epi32(
          _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wp + kk * 8))), evens);
      const __m256i b = _mm256_permutevar8x32_epi32(
          _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wp + kk * 8 + 16))), evens);
      const __m256i word[2] = {_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31)};  // e = 0, 1
      for (int sh = 0; sh < 2; ++sh)
        for (int e = 0; e < 2; ++e) {
          const __m256i c = _mm256_srlv_epi32(word[e], _mm256_set1_epi32(8 * sh));
          float* row = out + (kk + 2 * sh + e) * NR;
          _mm256_storeu_ps(row, _mm256_fmsub_ps(_mm256_cvtepi32_ps(_mm256_and_si256(c, mask)), s0, z0));  // h = 0
          _mm256_storeu_ps(row + 8, _mm256_fmsub_ps(
              _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(c, 4), mask)), s1, z1));           // h = 1
        }
    }
    return;
  }
  const uint8_t* wp = static_cast<const uint8_t*>(w.data) + (p * K + k0) * NR;  // FMT_FP8 [K][16]
  for (int kk = 0; kk < NR; ++kk) {  // 2^-8 of the value, times the scale times 2^8
    __m256 lo, hi;
    fp8x16_avx2(wp + kk * NR, lo, hi);
    const float* sc = w.scale + (p * G + (k0 + kk) / w.group) * NR;
    const __m256 k256 = _mm256_set1_ps(256.f);
    _mm256_storeu_ps(out + kk * NR, _mm256_mul_ps(lo, _mm256_mul_ps(_mm256_loadu_ps(sc), k256)));
    _mm256_storeu_ps(out + kk * NR + 8, _mm256_mul_ps(hi, _mm256_mul_ps(_mm256_loadu_ps(sc + 8), k256)));
  }
}

// The lines of panel p's block of inputs k0 .. k0 + 15 (any format's codes; bf16: 8 lines, int4: 2)
// fetched into L1: the vector forms decode a panel's blocks in order, a chunk's compute apart, and
// the decoder otherwise waited on DRAM at each block's first loads
inline void fetch_block(const Weight& w, int64_t p, int64_t k0) {
  const int bits = w.fmt == FMT_BF16 ? 16 : w.fmt == FMT_INT4 ? 4 : 8;
  const char* at = static_cast<const char*>(w.data) + (p * w.K + k0) * NR * bits / 8;
  for (int l = 0; l < NR * NR * bits / 8; l += 64) _mm_prefetch(at + l, _MM_HINT_T0);
}

#define KT_RT_TARGET KT_TARGET("avx2,fma,f16c")
#define KT_RT(name) name##_avx2
#define KT_RT_V 8
#define KT_RT_IN 4
#define KT_RT_IN2 6  // 12 sums + A^T's 2 + a broadcast; passes of 6, 6, 4
#define KT_RT_IN1 8  // 8 sums + A^T + a broadcast of 16 registers
#define KT_RT_VEC __m256
#define KT_RT_ZERO() _mm256_setzero_ps()
#define KT_RT_LOAD(p) _mm256_loadu_ps(p)
#define KT_RT_BCAST(p) _mm256_broadcast_ss(p)
#define KT_RT_FMADD(a, b, c) _mm256_fmadd_ps(a, b, c)
#define KT_RT_STORE(p, v) _mm256_storeu_ps(p, v)
#define KT_RT_DECODE(w, p, k0, out) decode_block_avx2(w, p, k0, out)
#include "rows_t_vec.inc"  // rows_t_avx2
#include "rows_t_vec_undef.inc"
#endif

#if defined(KT_X86)
// r[i][j] -> r[j][i] for a 16 x 16 block of floats in registers (unpacks within 128-bit lanes, then lanes)
KT_AVX512 inline void transpose16x16(__m512 r[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    u[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    u[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(u[i], u[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(u[i], u[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_f32x4(u[i + 8], u[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(u[i + 8], u[i + 12], 0xDD);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
    r[i + 4] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0xDD);
  }
}

// add_block_t of a whole C^T tile (16 inputs x 16 rows, 64-byte aligned): transposed in registers, a
// row's 16 inputs one store
KT_AVX512 inline void add_tile_t(const float* acc, int64_t t, int64_t n, float* C, int64_t ldc, int64_t k0,
                              bool accumulate) {
  __m512 r[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_load_ps(acc + 16 * i);
  transpose16x16(r);
  const int64_t rows = std::min<int64_t>(16, n - 16 * t);
  for (int64_t c = 0; c < rows; ++c) {
    float* row = C + (16 * t + c) * ldc + k0;
    _mm512_storeu_ps(row, accumulate ? _mm512_add_ps(_mm512_loadu_ps(row), r[c]) : r[c]);
  }
}

// 16 bf16 -> 16 floats (exact)
KT_AVX512 inline __m512 bf16_row16(const uint16_t* x) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))), 16));
}

#define KT_DECODE_PAIRS_TARGET KT_AVX512
#define KT_DECODE_PAIRS_NAME decode_pairs_avx512
#include "decode_pairs.inc"  // decode_pairs_avx512

// decode_pairs_avx512's sinks (functors: a lambda would not take the function's target ISA)
struct PutFloats {  // rows as float32 [16][16]
  float* out;
  KT_AVX512 void operator()(int kk, __m512 a, __m512 b) const {
    _mm512_storeu_ps(out + kk * NR, a);
    _mm512_storeu_ps(out + (kk + 1) * NR, b);
  }
};

// decode_block_generic of a whole block, in float32
KT_AVX512 inline void decode_block_avx512(const Weight& w, int64_t p, int64_t k0, float* out) {
  decode_pairs_avx512(w, p, k0, PutFloats{out});
}

#define KT_RT_TARGET KT_AVX512
#define KT_RT(name) name##_avx512
#define KT_RT_V 16
#define KT_RT_IN 8
#define KT_RT_IN2 12  // passes of 12, 4
#define KT_RT_IN1 16
#define KT_RT_VEC __m512
#define KT_RT_ZERO() _mm512_setzero_ps()
#define KT_RT_LOAD(p) _mm512_loadu_ps(p)
#define KT_RT_BCAST(p) _mm512_set1_ps(*(p))
#define KT_RT_FMADD(a, b, c) _mm512_fmadd_ps(a, b, c)
#define KT_RT_STORE(p, v) _mm512_storeu_ps(p, v)
#define KT_RT_DECODE(w, p, k0, out) decode_block_avx512(w, p, k0, out)
#include "rows_t_vec.inc"  // rows_t_avx512
#include "rows_t_vec_undef.inc"
#endif

}  // namespace kt
#include "kernels_grad_amx.hpp"  // the AMX form
#include "kernels_grad_dp.hpp"   // the AVX512-BF16 form
