// The transposed products of training's backward pass through frozen experts, on the packed
// panels the forward reads (kernels.hpp layouts):
//   C[r][k] (+)= sum_m A[r][m] * W[m][k]     for n rows r (A: n x M, C: n x K, W: M x K)
// A panel holds 16 rows of W input-major, so 16 inputs of it decoded to floats, block[kk][j] =
// W[16p + j][k0 + kk], are a block of W^T whose rows already reduce over j: every variant forms
// C^T = W^T A^T block by block.
//   generic: float64 sums over the decoded blocks (the reference);
//   avx2 / avx512: blocks decoded to float32; 8 / 16 rows of A^T per vector, one broadcast weight
//     per FMA, an accumulator per input of the block (AVX2: two halves of 8, for its 16 registers);
//   amx (bf16 models, whose forward rounds the activations to bf16 too): the blocks of a pair of
//     panels rounded to bf16 are an A tile (16 inputs x 32 rows of W), A's columns in bf16 pairs a
//     B tile (16 pairs of those rows x 16 rows of A), TDPBF16PS accumulating C^T tiles.
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
// 8 rows of A^T per vector; the block's 16 inputs in two halves of 8 accumulators (AVX2 has 16 registers)
KT_TARGET("avx2,fma,f16c") inline void rows_t_avx2(const Weight& w, const float* A, int64_t lda, int64_t n, float* C,
                                                   int64_t ldc, int64_t kb0, int64_t kb1, bool accumulate) {
  const int64_t P = (w.M + NR - 1) / NR, Mp = P * NR, tiles = (n + 7) / 8;
  thread_local std::vector<float> At, blk;
  transpose_rows(A, lda, n, w.M, Mp, 8, At);
  blk.resize(P * NR * NR);
  alignas(32) float out[NR * 8];
  for (int64_t kb = kb0; kb < kb1; ++kb) {
    const int64_t k0 = kb * NR;
    const int nk = static_cast<int>(std::min<int64_t>(NR, w.K - k0));
    for (int64_t p = 0; p < P; ++p) decode_block_generic(w, p, k0, nk, &blk[p * NR * NR]);
    for (int64_t t = 0; t < tiles; ++t) {
      const float* at = &At[t * Mp * 8];
      for (int h = 0; h < 2; ++h) {
        __m256 acc[8];
        for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
        for (int64_t m = 0; m < Mp; ++m) {
          const __m256 a = _mm256_loadu_ps(at + m * 8);
          const float* b = &blk[(m / NR) * NR * NR + h * 8 * NR + m % NR];
          for (int i = 0; i < 8; ++i) acc[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(b + i * NR), a, acc[i]);
        }
        for (int i = 0; i < 8; ++i) _mm256_storeu_ps(out + (h * 8 + i) * 8, acc[i]);
      }
      add_block_t(out, 8, t, n, nk, C, ldc, k0, accumulate);
    }
  }
}
#endif

#if defined(KT_X86)
// 16 bf16 -> 16 floats (exact)
KT_AVX512 inline __m512 bf16_row16(const uint16_t* x) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))), 16));
}

// The rows of a whole block (k0 + 16 <= K) of a bf16, int8, int4 or fp8 weight as decode_block_generic
// makes them, two at a time: put(kk, row kk, row kk + 1) for kk = 0, 2, ..., 14
template <typename Put>
KT_AVX512 inline void decode_pairs_avx512(const Weight& w, int64_t p, int64_t k0, Put&& put) {
  const int64_t K = w.K;
  if (w.fmt == FMT_BF16) {  // [K][16]
    const uint16_t* wp = static_cast<const uint16_t*>(w.data) + (p * K + k0) * NR;
    for (int kk = 0; kk < NR; kk += 2) put(kk, bf16_row16(wp + kk * NR), bf16_row16(wp + (kk + 1) * NR));
    return;
  }
  const int64_t G = K / w.group;
  if (w.fmt == FMT_INT8) {  // [K/2][16][2]: a row's two inputs side by side
    const int8_t* wp = static_cast<const int8_t*>(w.data) + (p * K + k0) * NR;
    const bool grouped = int8_grouped(w);
    for (int kk = 0; kk < NR; kk += 2) {
      const int64_t gi = (p * G + (k0 + kk) / w.group) * NR;
      const __m512 s = grouped ? group_scales16(w, gi) : _mm512_loadu_ps(w.scale + p * NR);
      const __m512 zs = grouped ? _mm512_mul_ps(group_zeros16(w, gi), s) : _mm512_setzero_ps();
      const __m512i v = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + kk * NR)));
      const __m512 even = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 16), 16));
      put(kk, _mm512_fmsub_ps(even, s, zs), _mm512_fmsub_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(v, 16)), s, zs));
    }
    return;
  }
  if (w.fmt == FMT_INT4) {  // [K/4][16] words; word 2l+e, nibble h+2s: row l+8h, input 4q+2s+e
    const uint8_t* wp = static_cast<const uint8_t*>(w.data) + p * (K / 2) * NR + k0 * 8;
    const __m512i mask = _mm512_set1_epi32(0xF);
    // row j < 8: lane 2j + e of the h = 0 nibbles; row 8 + l: lane 2l + e of the h = 1 nibbles
    const __m512i e0 = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i e1 = _mm512_add_epi32(e0, _mm512_set1_epi32(1));
    for (int kk = 0; kk < NR; kk += 4) {
      const int64_t gi = (p * G + (k0 + kk) / w.group) * NR;
      const __m512 s = group_scales16(w, gi), zs = _mm512_mul_ps(group_zeros16(w, gi), s);
      const __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + kk * 8)));
      const __m512i lo0 = _mm512_and_si512(v, mask), hi0 = _mm512_and_si512(_mm512_srli_epi32(v, 4), mask);  // s = 0
      const __m512i lo1 = _mm512_and_si512(_mm512_srli_epi32(v, 8), mask), hi1 = _mm512_srli_epi32(v, 12);    // s = 1
      put(kk, _mm512_fmsub_ps(_mm512_cvtepi32_ps(_mm512_permutex2var_epi32(lo0, e0, hi0)), s, zs),
          _mm512_fmsub_ps(_mm512_cvtepi32_ps(_mm512_permutex2var_epi32(lo0, e1, hi0)), s, zs));
      put(kk + 2, _mm512_fmsub_ps(_mm512_cvtepi32_ps(_mm512_permutex2var_epi32(lo1, e0, hi1)), s, zs),
          _mm512_fmsub_ps(_mm512_cvtepi32_ps(_mm512_permutex2var_epi32(lo1, e1, hi1)), s, zs));
    }
    return;
  }
  const uint8_t* wp = static_cast<const uint8_t*>(w.data) + (p * K + k0) * NR;  // FMT_FP8 [K][16]
  for (int kk = 0; kk < NR; kk += 2) {
    const float* s0 = w.scale + (p * G + (k0 + kk) / w.group) * NR;
    const float* s1 = w.scale + (p * G + (k0 + kk + 1) / w.group) * NR;
    put(kk, _mm512_mul_ps(fp8x16_512(wp + kk * NR), _mm512_mul_ps(_mm512_loadu_ps(s0), _mm512_set1_ps(256.f))),
        _mm512_mul_ps(fp8x16_512(wp + (kk + 1) * NR), _mm512_mul_ps(_mm512_loadu_ps(s1), _mm512_set1_ps(256.f))));
  }
}

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

// Whether decode_block_avx512 takes this weight's block at k0
inline bool block_avx512_takes(const Weight& w, int64_t k0) { return w.fmt != FMT_W8A8 && k0 + NR <= w.K; }

// 16 rows of A^T per vector, 16 accumulators (one per input of the block)
KT_AVX512 inline void rows_t_avx512(const Weight& w, const float* A, int64_t lda, int64_t n, float* C, int64_t ldc,
                                    int64_t kb0, int64_t kb1, bool accumulate) {
  const int64_t P = (w.M + NR - 1) / NR, Mp = P * NR, tiles = (n + 15) / 16;
  thread_local std::vector<float> At, blk;
  transpose_rows(A, lda, n, w.M, Mp, 16, At);
  blk.resize(P * NR * NR);
  alignas(64) float out[NR * NR];
  for (int64_t kb = kb0; kb < kb1; ++kb) {
    const int64_t k0 = kb * NR;
    const int nk = static_cast<int>(std::min<int64_t>(NR, w.K - k0));
    for (int64_t p = 0; p < P; ++p) {
      if (block_avx512_takes(w, k0))
        decode_block_avx512(w, p, k0, &blk[p * NR * NR]);
      else
        decode_block_generic(w, p, k0, nk, &blk[p * NR * NR]);
    }
    for (int64_t t = 0; t < tiles; ++t) {
      __m512 acc[NR];
      for (int i = 0; i < NR; ++i) acc[i] = _mm512_setzero_ps();
      const float* at = &At[t * Mp * 16];
      for (int64_t p = 0; p < P; ++p)
        for (int j = 0; j < NR; ++j) {
          const __m512 a = _mm512_loadu_ps(at + (p * NR + j) * 16);
          const float* b = &blk[p * NR * NR + j];
          for (int i = 0; i < NR; ++i) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(b[i * NR]), a, acc[i]);
        }
      for (int i = 0; i < NR; ++i) _mm512_storeu_ps(out + i * NR, acc[i]);
      add_block_t(out, 16, t, n, nk, C, ldc, k0, accumulate);
    }
  }
}
#endif

#if defined(KT_HAVE_AMX)
// tmm0-5: C^T of up to 6 row tiles (16 inputs x 16 rows, float32); tmm6: a block of W^T of two
// panels (16 inputs x 32 rows of W, bf16); tmm7: a row tile's A pairs (16 pairs of those W rows x
// 16 rows of A, bf16 pairs)
KT_AMX inline void amx_configure_grad(int tiles) {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = t < tiles || t >= 6 ? 16 : 0;
    cfg.colsb[t] = t < tiles || t >= 6 ? 64 : 0;
  }
  KT_MEMORY_BARRIER();
  _tile_loadconfig(&cfg);
}

#ifndef KT_GRAD_PAIRS
#define KT_GRAD_PAIRS 4
#endif
constexpr int64_t kGradPairs = KT_GRAD_PAIRS;  // pairs of panels the AMX product streams side by side
#ifndef KT_GRAD_AHEAD
#define KT_GRAD_AHEAD 4
#endif
constexpr int64_t kGradAhead = KT_GRAD_AHEAD;  // blocks ahead in each panel it prefetches

// C tile c (0-5) += tmm6 . tmm7; stored; loaded (the tile numbers are immediates)
#define KT_GRAD_SWITCH(c, X) \
  switch (c) {               \
    case 0: X(0); break;     \
    case 1: X(1); break;     \
    case 2: X(2); break;     \
    case 3: X(3); break;     \
    case 4: X(4); break;     \
    default: X(5); break;    \
  }
KT_AMX inline void grad_tile_dp(int c) {
#define KT_GRAD_DP(t) _tile_dpbf16ps(t, 6, 7)
  KT_GRAD_SWITCH(c, KT_GRAD_DP)
#undef KT_GRAD_DP
}
KT_AMX inline void grad_tile_store(int c, float* out) {
#define KT_GRAD_STORE(t) _tile_stored(t, out, 64)
  KT_GRAD_SWITCH(c, KT_GRAD_STORE)
#undef KT_GRAD_STORE
}
KT_AMX inline void grad_tile_load(int c, const float* in) {
#define KT_GRAD_LOAD(t) _tile_loadd(t, in, 64)
  KT_GRAD_SWITCH(c, KT_GRAD_LOAD)
#undef KT_GRAD_LOAD
}
#undef KT_GRAD_SWITCH

// inputs [k0, k0 + 16) of panels p and p + 1 as an A tile at wb ([16][32] bf16: row kk = the panels'
// 16 rows each): a bf16 weight's rows copied, the others decoded to floats and rounded once (VCVTNE2PS2BF16
// per tile row); a panel past the weight's (p + 1 == P) as zeros. fa, fb: [16][16] float scratch.
KT_AMX inline void pair_block_bf16(const Weight& w, int64_t p, int64_t k0, uint16_t* wb, float* fa, float* fb) {
  const bool second = (p + 1) * NR < w.M;
  if (w.fmt == FMT_BF16) {
    const uint16_t* wa = static_cast<const uint16_t*>(w.data) + (p * w.K + k0) * NR;
    const uint16_t* wn = wa + w.K * NR;
    for (int kk = 0; kk < NR; ++kk) {
      _mm256_store_si256(reinterpret_cast<__m256i*>(wb + kk * 2 * NR), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wa + kk * NR)));
      _mm256_store_si256(reinterpret_cast<__m256i*>(wb + kk * 2 * NR + NR),
                         second ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wn + kk * NR)) : _mm256_setzero_si256());
    }
    return;
  }
  decode_block_avx512(w, p, k0, fa);
  if (second) decode_block_avx512(w, p + 1, k0, fb);
  for (int kk = 0; kk < NR; ++kk)
    _mm512_store_si512(wb + kk * 2 * NR, bf16x32(_mm512_load_ps(fa + kk * NR),
                                                 second ? _mm512_load_ps(fb + kk * NR) : _mm512_setzero_ps()));
}

// rows_t with A rounded to bf16 and the blocks decoded to bf16; w.K % 16 == 0, not w8a8. A TDPBF16PS
// reduces over two panels (32 rows of W). Panels are read kGradPairs pairs at a time, each as a
// sequential stream (a block at a time across all panels, each block was a page and a DRAM stall
// away): the C^T tiles of all input blocks wait in an L2-resident buffer meanwhile.
KT_AMX inline void rows_t_amx(const Weight& w, const float* A, int64_t lda, int64_t n, float* C, int64_t ldc,
                              int64_t kb0, int64_t kb1, bool accumulate) {
  const int64_t P = (w.M + NR - 1) / NR, PP = (P + 1) / 2, T = (n + 15) / 16, NB = kb1 - kb0;
  const int64_t step = panel_bytes(w) / w.K;  // bytes per input of a panel
  // Gb[((pp T + t) 16 + q) 16 + c] = bf16 pair (A[16t + c][32pp + 2q], A[16t + c][32pp + 2q + 1])
  thread_local std::vector<uint32_t> Gb;
  thread_local std::vector<float> Ct;  // [NB][nt][16][16]: the C^T tiles of a group of row tiles
  Gb.assign(PP * T * 256, 0u);
  alignas(64) float row[NR];
  alignas(64) uint32_t pairs[NR / 2];
  for (int64_t r = 0; r < n; ++r)
    for (int64_t p = 0; p < P; ++p) {
      for (int j = 0; j < NR; ++j) row[j] = p * NR + j < w.M ? A[r * lda + p * NR + j] : 0.f;
      _mm256_store_si256(reinterpret_cast<__m256i*>(pairs), bf16x16_of(_mm512_load_ps(row)));
      for (int q = 0; q < NR / 2; ++q) Gb[(((p / 2) * T + r / 16) * 16 + (p % 2) * 8 + q) * 16 + r % 16] = pairs[q];
    }
  alignas(64) uint16_t wb[kGradPairs * 2 * NR * NR];
  alignas(64) float fa[NR * NR], fb[NR * NR];
  for (int64_t t0 = 0; t0 < T; t0 += 6) {
    const int nt = static_cast<int>(std::min<int64_t>(6, T - t0));
    Ct.assign(NB * nt * NR * NR, 0.f);
    amx_configure_grad(nt);
    for (int64_t pp0 = 0; pp0 < PP; pp0 += kGradPairs) {
      const int64_t npp = std::min<int64_t>(kGradPairs, PP - pp0);
      for (int64_t b = 0; b < NB; ++b) {
        float* ct = &Ct[b * nt * NR * NR];
        const int64_t k0 = (kb0 + b) * NR;
        for (int64_t i = 0; i < 2 * npp; ++i) {
          const int64_t p = 2 * pp0 + i;
          if (b + kGradAhead < NB && p < P) {  // a tile load would wait for its data
            const char* ahead = static_cast<const char*>(w.data) + p * panel_bytes(w) + (k0 + kGradAhead * NR) * step;
            for (int64_t l = 0; l < step * NR; l += 64) _mm_prefetch(ahead + l, _MM_HINT_T0);
          }
        }
        // every block of the group laid out before the first tile load: a tile load of a buffer
        // just stored waits for those stores to leave the core
        for (int64_t i = 0; i < npp; ++i) pair_block_bf16(w, 2 * (pp0 + i), k0, &wb[i * 2 * NR * NR], fa, fb);
        KT_MEMORY_BARRIER();
        for (int t = 0; t < nt; ++t) grad_tile_load(t, ct + t * NR * NR);
        for (int64_t i = 0; i < npp; ++i) {
          _tile_loadd(6, &wb[i * 2 * NR * NR], 64);
          const uint32_t* g = &Gb[(pp0 + i) * T * 256 + t0 * 256];
          for (int t = 0; t < nt; ++t) {
            _tile_loadd(7, g + t * 256, 64);
            grad_tile_dp(t);
          }
        }
        for (int t = 0; t < nt; ++t) grad_tile_store(t, ct + t * NR * NR);
      }
    }
    KT_MEMORY_BARRIER();
    for (int64_t b = 0; b < NB; ++b)
      for (int t = 0; t < nt; ++t)
        add_block_t(&Ct[(b * nt + t) * NR * NR], 16, t0 + t, n, NR, C, ldc, (kb0 + b) * NR, accumulate);
  }
  _tile_release();
  KT_MEMORY_BARRIER();
}
#endif

}  // namespace kt
