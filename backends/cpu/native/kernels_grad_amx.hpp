// The AMX form of kernels_grad.hpp's transposed products (bf16 models): the blocks of a pair of
// panels, decoded to floats and rounded to bf16 once per tile row, are an A tile (16 inputs x 32
// rows of W); A's columns in bf16 pairs a B tile (16 pairs of those rows x 16 rows of A); TDPBF16PS
// accumulates C^T tiles in an L2-resident buffer while each panel streams. Included by
// kernels_grad.hpp (which tests/native/simd_emulated.cpp compiles against its tile model).
#pragma once
#include "kernels_grad.hpp"

namespace kt {

#if defined(KT_HAVE_AMX)
// tmm0-5: C^T of up to 6 row tiles (16 inputs x 16 rows, float32); tmm6: a block of W^T of two
// panels (16 inputs x 32 rows of W, bf16); tmm7: a row tile's A pairs (16 pairs of those W rows x
// 16 rows of A, bf16 pairs). one_panel (bf16 weights): tmm6 is one panel's block as it lies in
// memory (16 inputs x 16 rows of W, rows 32 bytes apart) and tmm7 its 8 pairs.
KT_AMX inline void amx_configure_grad(int tiles, bool one_panel = false) {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = t < tiles || t == 6 ? 16 : t == 7 ? (one_panel ? 8 : 16) : 0;
    cfg.colsb[t] = t < tiles || t == 7 ? 64 : t == 6 ? (one_panel ? 32 : 64) : 0;
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
// bf16 weights (A tiles loaded where they lie): fewer streams, fetched further ahead (the gate
// projection's product at T=512, three alternating runs: 4 pairs / 4 blocks 18.0-19.0 ms, 2 / 8
// 17.5-19.2, 2 / 16 20.6-24.1, 1 / 8 19.9-20.2, 4 / 8 20.0-21.8; before, copied: 20.0-20.4; int4
// was slower at 2 / 8)
#ifndef KT_GRAD_PAIRS_BF16
#define KT_GRAD_PAIRS_BF16 2
#endif
#ifndef KT_GRAD_AHEAD_BF16
#define KT_GRAD_AHEAD_BF16 8
#endif

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

// pair_block_bf16 of an int4 weight whose groups hold whole blocks (group % 16 == 0): both panels
// decoded together straight into the tile rows, no float scratch. A quad's 32 bytes broadcast to both
// halves: lane j is dword j % 8 (words 2l, 2l + 1), so input 4q + 2s + e of row l + 8h is its nibble at
// bit 16e + 8s + 4h; a rotate puts it at bit 19 (int4_at_bit19: VPTERNLOGD and one FMA), with no
// permutes (the rows come out in order). The backward's
// int4 transposed products spent ~60% of their time decoding (gate T=512: 22.5 ms, 8.7 without).
KT_AMX inline void pair_block_bf16_int4(const Weight& w, int64_t p, int64_t k0, uint16_t* wb) {
  const bool second = (p + 1) * NR < w.M;
  const int64_t G = w.K / w.group;
  __m512 s16[2], c[2];
  const uint8_t* wp[2];
  for (int i = 0; i < 2; ++i) {
    const int64_t pi = second ? p + i : p;
    const int64_t gi = (pi * G + k0 / w.group) * NR;
    const __m512 s = group_scales16(w, gi);
    s16[i] = _mm512_mul_ps(s, _mm512_set1_ps(16.f));
    c[i] = _mm512_mul_ps(_mm512_add_ps(group_zeros16(w, gi), _mm512_set1_ps(16.f)), s);
    wp[i] = static_cast<const uint8_t*>(w.data) + pi * (w.K / 2) * NR + k0 * 8;
  }
  __m512i rot[4];  // input 2s + e of a quad: rotate left by 19 - (16e + 8s + 4h), h = lane / 8
  for (int se = 0; se < 4; ++se) {
    const int off = 16 * (se & 1) + 8 * (se >> 1);
    rot[se] = _mm512_set_epi32(15 - off, 15 - off, 15 - off, 15 - off, 15 - off, 15 - off, 15 - off, 15 - off,
                               19 - off, 19 - off, 19 - off, 19 - off, 19 - off, 19 - off, 19 - off, 19 - off);
    rot[se] = _mm512_and_si512(rot[se], _mm512_set1_epi32(31));
  }
  for (int qq = 0; qq < 4; ++qq) {
    const __m512i x0 = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp[0] + qq * 32)));
    const __m512i x1 = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp[1] + qq * 32)));
    for (int se = 0; se < 4; ++se) {
      const __m512 a = int4_at_bit19(_mm512_rolv_epi32(x0, rot[se]), s16[0], c[0]);
      const __m512 b = second ? int4_at_bit19(_mm512_rolv_epi32(x1, rot[se]), s16[1], c[1]) : _mm512_setzero_ps();
      _mm512_store_si512(wb + (4 * qq + se) * 2 * NR, bf16x32(a, b));
    }
  }
}

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
  if (w.fmt == FMT_INT4 && w.group % NR == 0) return pair_block_bf16_int4(w, p, k0, wb);
  decode_block_avx512(w, p, k0, fa);
  if (second) decode_block_avx512(w, p + 1, k0, fb);
  for (int kk = 0; kk < NR; ++kk)
    _mm512_store_si512(wb + kk * 2 * NR, bf16x32(_mm512_load_ps(fa + kk * NR),
                                                 second ? _mm512_load_ps(fb + kk * NR) : _mm512_setzero_ps()));
}

// (transpose16x16, add_tile_t: kernels_grad.hpp, shared with the AVX512-BF16 form)

// rows_t with A rounded to bf16 and the blocks decoded to bf16; w.K % 16 == 0, not w8a8. A TDPBF16PS
// reduces over two panels (32 rows of W). Panels are read kGradPairs pairs at a time, each as a
// sequential stream (a block at a time across all panels, each block was a page and a DRAM stall
// away): the C^T tiles of all input blocks wait in an L2-resident buffer meanwhile.
KT_AMX inline void rows_t_amx(const Weight& w, const float* A, int64_t lda, int64_t n, float* C, int64_t ldc,
                              int64_t kb0, int64_t kb1, bool accumulate) {
  const int64_t P = (w.M + NR - 1) / NR, PP = (P + 1) / 2, T = (n + 15) / 16, NB = kb1 - kb0;
  const int64_t step = panel_bytes(w) / w.K;  // bytes per input of a panel
  // Gb[((pp T + t) 16 + q) 16 + c] = bf16 pair (A[16t + c][32pp + 2q], A[16t + c][32pp + 2q + 1])
  thread_local lvector<uint32_t> Gb;
  thread_local lvector<float> Ct;  // [NB][nt][16][16]: the C^T tiles of a group of row tiles
  // a block of 16 rows x one panel's 16 values a step: the rows' bf16 pairs [16][8] dwords, then
  // transposed into the 8 B-tile rows [8][16] by masked permutes (lane 2k + e of row q takes pair q of
  // row 2k + e: 8 registers of two rows each); zeros past n and M
  Gb.resize(static_cast<size_t>(PP * T * 256));
  alignas(64) uint32_t pairs[16 * NR / 2];
  const __m512i odd8 = _mm512_set_epi32(8, 0, 8, 0, 8, 0, 8, 0, 8, 0, 8, 0, 8, 0, 8, 0);  // lane & 1 ? 8 : 0
  for (int64_t t = 0; t < T; ++t)
    for (int64_t p = 0; p < 2 * PP; ++p) {
      const int64_t cols = std::min<int64_t>(NR, std::max<int64_t>(0, w.M - p * NR));
      const __mmask16 valid = static_cast<__mmask16>(cols >= NR ? 0xFFFF : (1u << cols) - 1u);
      for (int64_t i = 0; i < 16; ++i) {
        const int64_t r = 16 * t + i;
        const __m512 x = r < n && cols ? _mm512_maskz_loadu_ps(valid, A + r * lda + p * NR) : _mm512_setzero_ps();
        _mm256_store_si256(reinterpret_cast<__m256i*>(pairs + i * NR / 2), bf16x16_of(x));
      }
      uint32_t* dst = &Gb[static_cast<size_t>((((p / 2) * T + t) * 16 + (p % 2) * 8) * 16)];
      __m512i two[8];
      for (int k = 0; k < 8; ++k) two[k] = _mm512_load_si512(pairs + 16 * k);
      for (int q = 0; q < NR / 2; ++q) {
        const __m512i idx = _mm512_add_epi32(odd8, _mm512_set1_epi32(q));
        __m512i out = _mm512_setzero_si512();
        for (int k = 0; k < 8; ++k) out = _mm512_mask_permutexvar_epi32(out, static_cast<__mmask16>(3u << (2 * k)), idx, two[k]);
        _mm512_store_si512(dst + q * 16, out);
      }
    }
  alignas(64) uint16_t wb[kGradPairs * 2 * NR * NR];
  alignas(64) float fa[NR * NR], fb[NR * NR];
  // bf16 weights: each panel's block is an A tile where it lies, half the K of a pair's but nothing
  // to copy (the copy cost the gate projection's product at T=512 ~27%: 19.5 -> 14.2 ms without it)
  const bool one_panel = w.fmt == FMT_BF16;
  const int64_t group = one_panel ? KT_GRAD_PAIRS_BF16 : kGradPairs, ahead = one_panel ? KT_GRAD_AHEAD_BF16 : kGradAhead;
  for (int64_t t0 = 0; t0 < T; t0 += 6) {
    const int nt = static_cast<int>(std::min<int64_t>(6, T - t0));
    Ct.assign(NB * nt * NR * NR, 0.f);
    amx_configure_grad(nt, one_panel);
    for (int64_t pp0 = 0; pp0 < PP; pp0 += group) {
      const int64_t npp = std::min<int64_t>(group, PP - pp0);
      for (int64_t b = 0; b < NB; ++b) {
        float* ct = &Ct[b * nt * NR * NR];
        const int64_t k0 = (kb0 + b) * NR;
        for (int64_t i = 0; i < 2 * npp; ++i) {
          const int64_t p = 2 * pp0 + i;
          if (b + ahead < NB && p < P) {  // a tile load would wait for its data
            const char* at = static_cast<const char*>(w.data) + p * panel_bytes(w) + (k0 + ahead * NR) * step;
            for (int64_t l = 0; l < step * NR; l += 64) _mm_prefetch(at + l, _MM_HINT_T0);
          }
        }
        // every block of the group laid out before the first tile load: a tile load of a buffer
        // just stored waits for those stores to leave the core
        if (one_panel) {
          for (int t = 0; t < nt; ++t) grad_tile_load(t, ct + t * NR * NR);
          for (int64_t p = 2 * pp0; p < std::min(P, 2 * (pp0 + npp)); ++p) {
            _tile_loadd(6, static_cast<const uint16_t*>(w.data) + (p * w.K + k0) * NR, 2 * NR);
            const uint32_t* g = &Gb[(p / 2) * T * 256 + t0 * 256 + (p % 2) * 8 * NR];
            for (int t = 0; t < nt; ++t) {
              _tile_loadd(7, g + t * 256, 64);
              grad_tile_dp(t);
            }
          }
          for (int t = 0; t < nt; ++t) grad_tile_store(t, ct + t * NR * NR);
          continue;
        }
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
    for (int t = 0; t < nt; ++t)  // a row tile at a time: 16 rows of C written along, not nt x 16 at once
      for (int64_t b = 0; b < NB; ++b) add_tile_t(&Ct[(b * nt + t) * NR * NR], t0 + t, n, C, ldc, (kb0 + b) * NR, accumulate);
  }
  _tile_release();
  KT_MEMORY_BARRIER();
}
#endif

}  // namespace kt
