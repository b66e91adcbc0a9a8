// The AVX512-BF16 form of kernels_grad.hpp's transposed products (bf16 models on CPUs with
// VDPBF16PS and no AMX tiles: Zen 4, Cooper Lake). C^T = W^T A^T as the float form computes it, a
// vector of 16 rows of A at a time, but each instruction reduces over a pair of W's rows:
//   lanes c of a vector: the bf16 pair (A[r][m], A[r][m + 1]) of row r = 16 t + c;
//   the broadcast operand: the pair (W[m][k], W[m + 1][k]) of input k, which a bf16 panel ([K][16],
//     16 rows of W side by side per input) holds as one 32-bit word as it lies (no decode at all);
//     other formats decode a block to floats and round it to bf16 once for every row of A.
// A and the weights are rounded to bf16 as the AMX form rounds them (round_bf16 callers only).
// Included by kernels_grad.hpp; tests/native/simd_emulated.cpp compiles it under SIMDe.
#pragma once
#include "kernels_grad.hpp"

namespace kt {

#if defined(KT_X86) && defined(KT_HAVE_AVX512BF16)
// 8 x 8 32-bit words r[0..8) transposed in place (the AVX2 unpack / permute network)
KT_AVX512BF16 inline void transpose8x8_epi32(__m256i* r) {
  __m256i t[8], u[8];
  for (int i = 0; i < 8; i += 4) {
    t[i] = _mm256_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_epi32(r[i], r[i + 1]);
    t[i + 2] = _mm256_unpacklo_epi32(r[i + 2], r[i + 3]);
    t[i + 3] = _mm256_unpackhi_epi32(r[i + 2], r[i + 3]);
    u[i] = _mm256_unpacklo_epi64(t[i], t[i + 2]);
    u[i + 1] = _mm256_unpackhi_epi64(t[i], t[i + 2]);
    u[i + 2] = _mm256_unpacklo_epi64(t[i + 1], t[i + 3]);
    u[i + 3] = _mm256_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int q = 0; q < 4; ++q) {
    r[q] = _mm256_permute2x128_si256(u[q], u[q + 4], 0x20);
    r[q + 4] = _mm256_permute2x128_si256(u[q], u[q + 4], 0x31);
  }
}

// A^T in bf16 pairs: Ap[(t MP2 + q) 16 + c] = (A[16t + c][2q], A[16t + c][2q + 1]) rounded to nearest
// even, 0 past n or M; MP2 = 8 P. A tile's 16 rows of a panel's 16 columns go through registers: each row
// rounded to 8 pairs, the two 8 x 8 halves transposed, each pair index's 16 rows stored as one vector
// (the scalar scatter it replaced was ~11% of a skewed gate_t call on a Zen 5 EPYC)
KT_AVX512BF16 inline void at_pairs_bf16(const float* A, int64_t lda, int64_t n, int64_t M, int64_t P,
                                        lvector<uint32_t>& Ap) {
  const int64_t MP2 = P * NR / 2, tiles = (n + NR - 1) / NR;
  Ap.resize(tiles * MP2 * NR);  // every element written below
  for (int64_t t = 0; t < tiles; ++t)
    for (int64_t p = 0; p < P; ++p) {
      const int64_t left = M - p * NR;
      const __mmask16 cols = left >= NR ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
      __m256i r[NR];
      for (int c = 0; c < NR; ++c)
        r[c] = t * NR + c < n ? bf16x16_of(_mm512_maskz_loadu_ps(cols, A + (t * NR + c) * lda + p * NR))
                              : _mm256_setzero_si256();
      transpose8x8_epi32(r);
      transpose8x8_epi32(r + 8);
      uint32_t* dst = &Ap[(t * MP2 + p * NR / 2) * NR];
      for (int q = 0; q < NR / 2; ++q)
        _mm512_store_si512(dst + q * NR, _mm512_inserti64x4(_mm512_castsi256_si512(r[q]), r[q + 8], 1));
    }
}

#define KT_DECODE_PAIRS_TARGET KT_AVX512BF16
#define KT_DECODE_PAIRS_NAME decode_pairs_bf16
#include "decode_pairs.inc"  // decode_pairs_bf16: decode_pairs_avx512 for this target (PutBf16 inlined)

// decode_pairs_bf16's sink that rounds each row of the block to bf16: out [16][16], rows kk and kk + 1 one
// VCVTNE2PS2BF16
struct PutBf16 {
  uint16_t* out;
  KT_AVX512BF16 void operator()(int kk, __m512 a, __m512 b) const {
    _mm512_storeu_si512(out + kk * NR, bf16x32(a, b));
  }
};

// C^T of inputs [kq, kq + NI) of one bf16 block per panel (panel p's at wb + p * pstride, [16][16]) for
// RT tiles of 16 rows of A (ap: tile 0's pairs of panel 0, tiles MP2 pairs apart), added into
// out[r][kq + i][16] (written when first). RT x NI sums in registers: one tile takes all 16 inputs at
// once, as 8 its sums' chains waited on the products' latency (each pair a product per sum)
template <int RT, int NI = 8>
KT_AVX512BF16 inline void rows_t_dp_tile(const uint32_t* ap, int64_t MP2, const uint16_t* wb, int64_t pstride,
                                         int64_t P, int kq, float* out, bool first, const char* pf) {
  __m512 acc[RT][NI];
  for (int r = 0; r < RT; ++r)
    for (int i = 0; i < NI; ++i) acc[r][i] = first ? _mm512_setzero_ps() : _mm512_load_ps(out + (r * NR + kq + i) * NR);
  for (int64_t p = 0; p < P; ++p) {
    const uint16_t* wp = wb + p * pstride + kq * NR;
    for (int q = 0; q < NR / 2; ++q) {
      __m512bh a[RT];
      for (int r = 0; r < RT; ++r) a[r] = bit_as<__m512bh>(_mm512_load_si512(ap + (r * MP2 + p * NR / 2 + q) * NR));
      if (pf) KT_DP_FETCH(pf + p * pstride * 2 + q * 64);  // a line of a later block of the panel
      for (int i = 0; i < NI; ++i) {
        int32_t pair;
        std::memcpy(&pair, wp + i * NR + 2 * q, 4);
        const __m512bh b = bit_as<__m512bh>(_mm512_set1_epi32(pair));
        for (int r = 0; r < RT; ++r) acc[r][i] = _mm512_dpbf16_ps(acc[r][i], a[r], b);
      }
    }
  }
  for (int r = 0; r < RT; ++r)
    for (int i = 0; i < NI; ++i) _mm512_store_ps(out + (r * NR + kq + i) * NR, acc[r][i]);
}

#ifndef KT_GRAD_DP_AHEAD
#define KT_GRAD_DP_AHEAD 2  // blocks ahead a bf16 weight's panels are prefetched into L2
#endif

// rows_t (kt_expert_rows_t's contract) with A and the weights rounded to bf16; w.K % 16 == 0, not w8a8.
// Per group of up to 3 row tiles, a chunk of panels at a time meets every input block; the C^T tiles
// of all blocks wait in an L2-resident buffer meanwhile (as rows_t_amx's do).
KT_AVX512BF16 inline void rows_t_bf16dp_avx512(const Weight& w, const float* A, int64_t lda, int64_t n, float* C,
                                               int64_t ldc, int64_t kb0, int64_t kb1, bool accumulate) {
  const int64_t P = (w.M + NR - 1) / NR, MP2 = P * NR / 2, tiles = (n + NR - 1) / NR, NB = kb1 - kb0;
  thread_local lvector<uint32_t> Ap;
  thread_local lvector<uint16_t> blk;
  thread_local lvector<float> Ct;  // [NB][row tile][input][row]
  at_pairs_bf16(A, lda, n, w.M, P, Ap);
  if (w.fmt != FMT_BF16) blk.resize(kGradChunk * NR * NR);
  const char* data = static_cast<const char*>(w.data);
  // up to 3 row tiles a pass (each broadcast feeds 3 of them), as even as the passes allow: 4 tiles as
  // 2 + 2, not 3 + 1 (a pass of one tile is a broadcast a product; Zen 5, skewed routing, T=512: 0.98-0.99x).
  // Decoded formats take up to 6 (4 inputs at a time, 24 sums): each pass decodes every block again, so
  // fewer passes decode less (Zen 5, skewed routing, T=512: int4 gate_t / down_t 0.955x / 0.947x, int8
  // 0.95x, fp8 0.95x; uniform 1.00-1.01x; bit-identical)
  const int64_t most = w.fmt == FMT_BF16 ? 3 : 6;
  for (int64_t t = 0, rt = 0; t < tiles; t += rt) {
    const int64_t left = tiles - t, passes = (left + most - 1) / most;
    rt = (left + passes - 1) / passes;
    Ct.resize(NB * rt * NR * NR);
    for (int64_t c0 = 0; c0 < P; c0 += kGradChunk) {
      const int64_t pc = std::min(kGradChunk, P - c0);
      const uint32_t* ap = &Ap[(t * MP2 + c0 * NR / 2) * NR];
      for (int64_t kb = kb0; kb < kb1; ++kb) {
        const int64_t k0 = kb * NR;
        const uint16_t* wb = reinterpret_cast<const uint16_t*>(data + c0 * panel_bytes(w)) + k0 * NR;  // bf16: as they lie
        int64_t pstride = w.K * NR;
        // bf16: each panel's block KT_GRAD_DP_AHEAD on, fetched a line a pair of inputs while the first 8 inputs run
        const char* pf = w.fmt == FMT_BF16 && kb + KT_GRAD_DP_AHEAD < kb1
                             ? reinterpret_cast<const char*>(wb + KT_GRAD_DP_AHEAD * NR * NR) : nullptr;
        if (w.fmt != FMT_BF16) {
          for (int64_t p = 0; p < pc; ++p) decode_pairs_bf16(w, c0 + p, k0, PutBf16{&blk[p * NR * NR]});
          wb = blk.data();
          pstride = NR * NR;
        }
        float* ct = &Ct[(kb - kb0) * rt * NR * NR];
        if (rt == 1) {
          rows_t_dp_tile<1, NR>(ap, MP2, wb, pstride, pc, 0, ct, c0 == 0, pf);
          continue;
        }
        if (rt > 3) {
          for (int kq = 0; kq < NR; kq += 4) {
            if (rt == 6) rows_t_dp_tile<6, 4>(ap, MP2, wb, pstride, pc, kq, ct, c0 == 0, nullptr);
            else if (rt == 5) rows_t_dp_tile<5, 4>(ap, MP2, wb, pstride, pc, kq, ct, c0 == 0, nullptr);
            else rows_t_dp_tile<4, 4>(ap, MP2, wb, pstride, pc, kq, ct, c0 == 0, nullptr);
          }
          continue;
        }
        for (int kq = 0; kq < NR; kq += 8) {
          const char* f = kq ? nullptr : pf;
          if (rt == 3) rows_t_dp_tile<3>(ap, MP2, wb, pstride, pc, kq, ct, c0 == 0, f);
          else rows_t_dp_tile<2>(ap, MP2, wb, pstride, pc, kq, ct, c0 == 0, f);
        }
      }
    }
    for (int r = 0; r < rt; ++r)  // a row tile at a time: its rows of C written along
      for (int64_t kb = kb0; kb < kb1; ++kb)
        add_tile_t(&Ct[((kb - kb0) * rt + r) * NR * NR], t + r, n, C, ldc, kb * NR, accumulate);
  }
}
#endif

}  // namespace kt
