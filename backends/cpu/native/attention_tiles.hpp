// The two products of decode attention for a large query-head group on AMX tiles: one work item of
// attention_decode.inc (a sequence, a kv head, a run of n keys) whose G >= 16 query heads share the
// kv head, as MLA's absorbed form has it (128 heads over one latent row of 576: DeepSeek-V3, Kimi-K2).
// The vector items do G x n dot products of D and G x n row updates of Dv there, compute-bound at long
// contexts (4096 keys: ~10 ms a layer on 2 cores); here both are bf16 GEMMs with float32 sums:
//   attn_scores_amx:  scores^T [n keys x G] = K [n x D] . Q^T [D x G]  (A: 16 key rows staged, B: Q^T)
//   attn_values_amx:  acc [G x Dv] = P [G x n] . V [n x Dv]            (A: P, B: value rows in pairs)
// The query and the probabilities are rounded to bf16 (the keys and values are bf16 already): the
// prefill tiles' rounding (native_attention.py), ~2e-3 of the output's range; attention_decode.inc
// takes this path for bf16 models only. Every tile is 16 rows x 64 bytes, so one configuration
// serves both: C in tmm0..3, A in tmm4, B in tmm5. Included after kernels_amx.hpp (by kt_cpu.cpp
// and by tests/native/simd_emulated.cpp, which runs it on the tile model).
#pragma once
#include "kernels_amx.hpp"

#include <cstring>

namespace kt {
// Fine-tuning's attention backward (attn_grad.inc): the scores of 16 query rows against keys packed
// once per call. kp: K [n][D] (rows ldk elements apart, bf16; D % 32 == 0) as B tiles
// [ceil(n / 16)][D / 32][16][16] dwords: (key block b, dims 32 s..) dword (r, c) = dims (32 s + 2r,
// 32 s + 2r + 1) of key 16 b + c; zero past n. A key block is then [D / 2][16] dim pairs, the layout
// the AVX512-BF16 pair kernels' panels take (dp_rows) too.
inline void attn_pack_keys(const uint16_t* K, int64_t ldk, int64_t n, int64_t D, lvector<uint32_t>& kp) {
  const int64_t ds = D / 32;
  kp.assign(static_cast<size_t>((n + 15) / 16 * ds * 256), 0u);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t p = 0; p < D / 2; ++p) {
      uint32_t pair;
      std::memcpy(&pair, K + j * ldk + 2 * p, 4);
      kp[static_cast<size_t>(((j / 16) * ds + p / 16) * 256 + (p % 16) * 16 + j % 16)] = pair;
    }
}

}  // namespace kt

#if defined(KT_HAVE_AMX)
#include <algorithm>
#include <cmath>
#include <vector>

namespace kt {

struct AttnTileScratch {  // grown, never shrunk
  lvector<uint16_t> qb;  // Q^T as B tiles: [D/2][Gp][2] (Gp: G rounded up to 16, zero heads past G)
  lvector<uint16_t> kb;  // 16 key rows staged for an A tile load: [16][D], zero rows past n
  lvector<uint16_t> vb;  // V as B tiles: [np/2][Dv][2] (np: n rounded up to 32, zero rows past n)
  lvector<uint16_t> pb;  // P as A tiles: [Gp][np], zero past G and n
};

KT_AMX inline void attn_tiles_configure() {
  TileConfig cfg;
  for (int t = 0; t < 6; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  KT_MEMORY_BARRIER();
  _tile_loadconfig(&cfg);
}

// C tile t (0..3) += A (tmm4) . B loaded from b (stride ldb bytes): tile numbers are immediates
KT_AMX inline void attn_tile_dp(int t, const void* b, int64_t ldb) {
  _tile_loadd(5, b, ldb);
  switch (t) {
    case 0: _tile_dpbf16ps(0, 4, 5); break;
    case 1: _tile_dpbf16ps(1, 4, 5); break;
    case 2: _tile_dpbf16ps(2, 4, 5); break;
    default: _tile_dpbf16ps(3, 4, 5); break;
  }
}

// the first nt (1..4) C tiles zeroed / stored to c [nt][16][16]
KT_AMX inline void attn_tiles_zero(int nt) {
  _tile_zero(0);
  if (nt > 1) _tile_zero(1);
  if (nt > 2) _tile_zero(2);
  if (nt > 3) _tile_zero(3);
}
KT_AMX inline void attn_tiles_store(int nt, float* c) {
  _tile_stored(0, c, 64);
  if (nt > 1) _tile_stored(1, c + 256, 64);
  if (nt > 2) _tile_stored(2, c + 512, 64);
  if (nt > 3) _tile_stored(3, c + 768, 64);
  KT_MEMORY_BARRIER();
}

// x [n] -> bf16 at dst, 32 at a time (round to nearest even); dst has room for n rounded up to 32,
// written with zeros past n
KT_AMX inline void attn_bf16_row(const float* x, int64_t n, uint16_t* dst) {
  for (int64_t i = 0; i < n; i += 32) {
    alignas(64) float t[32] = {};
    const float* src = x + i;
    if (n - i < 32) {
      std::memcpy(t, x + i, sizeof(float) * static_cast<size_t>(n - i));
      src = t;
    }
    _mm512_storeu_si512(dst + i, bf16x32(_mm512_loadu_ps(src), _mm512_loadu_ps(src + 16)));
  }
}

// s [G][n] = scale * (q [G][D] float . key i), the keys at element offsets rows [n] of K (bf16);
// D % 32 == 0
KT_AMX inline void attn_scores_amx(const float* q, int64_t G, int64_t D, const uint16_t* K, const int64_t* rows,
                                   int64_t n, float scale, float* s, AttnTileScratch& t) {
  const int64_t Gp = (G + 15) / 16 * 16;
  t.qb.assign(static_cast<size_t>(D * Gp), 0);
  uint32_t* qb = reinterpret_cast<uint32_t*>(t.qb.data());  // dword (r, g): dims (2r, 2r + 1) of head g
  alignas(64) uint32_t row[16];
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d0 = 0; d0 < D; d0 += 32) {
      attn_bf16_row(q + g * D + d0, 32, reinterpret_cast<uint16_t*>(row));
      uint32_t* col = qb + (d0 / 2) * Gp + g;
      for (int64_t r = 0; r < 16; ++r) col[r * Gp] = row[r];
    }
  t.kb.resize(static_cast<size_t>(16 * D));
  alignas(64) float c[4 * 256];
  attn_tiles_configure();
  for (int64_t k0 = 0; k0 < n; k0 += 16) {
    const int64_t kr = std::min<int64_t>(16, n - k0);
    for (int64_t i = 0; i < 16; ++i) {
      uint16_t* dst = t.kb.data() + i * D;
      if (i < kr) std::memcpy(dst, K + rows[k0 + i], static_cast<size_t>(D) * 2);
      else std::memset(dst, 0, static_cast<size_t>(D) * 2);
    }
    for (int64_t h0 = 0; h0 < Gp; h0 += 64) {  // up to 4 tiles of 16 heads
      const int nt = static_cast<int>(std::min<int64_t>(4, (Gp - h0) / 16));
      attn_tiles_zero(nt);
      for (int64_t d0 = 0; d0 < D; d0 += 32) {
        KT_MEMORY_BARRIER();
        _tile_loadd(4, t.kb.data() + d0, D * 2);
        for (int j = 0; j < nt; ++j) attn_tile_dp(j, t.qb.data() + ((d0 / 2) * Gp + h0 + 16 * j) * 2, Gp * 4);
      }
      attn_tiles_store(nt, c);
      for (int j = 0; j < nt; ++j) {  // tile [key][head] -> s [head][key], scaled
        const int64_t heads = std::min<int64_t>(16, G - h0 - 16 * j);
        for (int64_t h = 0; h < heads; ++h) {
          float* dst = s + (h0 + 16 * j + h) * n + k0;
          const float* src = c + j * 256 + h;
          for (int64_t i = 0; i < kr; ++i) dst[i] = src[i * 16] * scale;
        }
      }
    }
  }
  _tile_release();
  KT_MEMORY_BARRIER();
}

// acc [G][Dv] = sum_i p[g][i] * value row i (the first Dv elements at rows[i] of V, bf16), p [G][n];
// Dv % 16 == 0
KT_AMX inline void attn_values_amx(const float* p, int64_t G, int64_t Dv, const uint16_t* V, const int64_t* rows,
                                   int64_t n, float* acc, AttnTileScratch& t) {
  const int64_t Gp = (G + 15) / 16 * 16, np = (n + 31) / 32 * 32;
  t.pb.assign(static_cast<size_t>(Gp * np), 0);
  for (int64_t g = 0; g < G; ++g) attn_bf16_row(p + g * n, n, t.pb.data() + g * np);
  t.vb.resize(static_cast<size_t>(np * Dv));
  for (int64_t r = 0; r < np / 2; ++r) {  // value rows 2r, 2r + 1: dword (r, d) = (v[2r][d], v[2r+1][d])
    const uint16_t* v0 = 2 * r < n ? V + rows[2 * r] : nullptr;
    const uint16_t* v1 = 2 * r + 1 < n ? V + rows[2 * r + 1] : nullptr;
    uint16_t* dst = t.vb.data() + r * Dv * 2;
    for (int64_t d = 0; d < Dv; d += 16) {
      const __m512i lo = v0 ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v0 + d)))
                            : _mm512_setzero_si512();
      const __m512i hi = v1 ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v1 + d)))
                            : _mm512_setzero_si512();
      _mm512_storeu_si512(dst + d * 2, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
  }
  alignas(64) float c[4 * 256];
  attn_tiles_configure();
  for (int64_t h0 = 0; h0 < Gp; h0 += 16)  // 16 heads x 64 dims at a time
    for (int64_t d0 = 0; d0 < Dv; d0 += 64) {
      const int nt = static_cast<int>(std::min<int64_t>(4, (Dv - d0) / 16));
      attn_tiles_zero(nt);
      for (int64_t k0 = 0; k0 < np; k0 += 32) {
        KT_MEMORY_BARRIER();
        _tile_loadd(4, t.pb.data() + h0 * np + k0, np * 2);
        for (int j = 0; j < nt; ++j) attn_tile_dp(j, t.vb.data() + ((k0 / 2) * Dv + d0 + 16 * j) * 2, Dv * 4);
      }
      attn_tiles_store(nt, c);
      for (int j = 0; j < nt; ++j)
        for (int64_t h = 0; h < 16 && h0 + h < G; ++h)
          std::memcpy(acc + (h0 + h) * Dv + d0 + 16 * j, c + j * 256 + h * 16, 64);
    }
  _tile_release();
  KT_MEMORY_BARRIER();
}


// S [16][lds] (float32, columns [0, 16 nb)) = A [16][D] (bf16 rows lda elements apart) . the first
// nb key blocks of kp^T: exact float32 sums of the bf16 products. A tile load of A reads 16 rows.
KT_AMX inline void attn_rows_scores_amx(const uint16_t* A, int64_t lda, int64_t D, const uint32_t* kp, int64_t nb,
                                        float* S, int64_t lds) {
  const int64_t ds = D / 32;
  attn_tiles_configure();
  for (int64_t b0 = 0; b0 < nb; b0 += 4) {  // four C tiles: 64 keys an A load
    const int nt = static_cast<int>(std::min<int64_t>(4, nb - b0));
    attn_tiles_zero(nt);
    for (int64_t s = 0; s < ds; ++s) {
      KT_MEMORY_BARRIER();
      _tile_loadd(4, A + 32 * s, lda * 2);
      for (int j = 0; j < nt; ++j) attn_tile_dp(j, kp + ((b0 + j) * ds + s) * 256, 64);
    }
    float* c = S + b0 * 16;
    _tile_stored(0, c, lds * 4);
    if (nt > 1) _tile_stored(1, c + 16, lds * 4);
    if (nt > 2) _tile_stored(2, c + 32, lds * 4);
    if (nt > 3) _tile_stored(3, c + 48, lds * 4);
    KT_MEMORY_BARRIER();
  }
  _tile_release();
  KT_MEMORY_BARRIER();
}


// e^x as kernels.hpp's exp_avx2 (the same steps, so the same values), 16 lanes
KT_AMX inline __m512 attn_exp512(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(88.0f), _mm512_max_ps(_mm512_set1_ps(-87.0f), x));  // NaN stays NaN
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 720.f);
  for (float c : {1.f / 120.f, 1.f / 24.f, 1.f / 6.f, 0.5f, 1.f, 1.f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

// One row of the backward softmax (attn_grad.inc's contract): s, dp float32 scores of keys [0, vis),
// d = <dO, O>; writes P = softmax(scale s) and dS = P (dp - d) scale as bf16 to pr, dsr for columns
// [0, width), zeros past vis; e: float32 scratch of vis
KT_AMX inline void attn_softmax_grad_row16(const float* s, const float* dp, float d, int64_t vis, int64_t width,
                                           float scale, uint16_t* pr, uint16_t* dsr, float* e) {
  auto lanes = [](int64_t left) {
    return static_cast<__mmask16>(left >= 16 ? 0xFFFF : left <= 0 ? 0 : (1u << left) - 1u);
  };
  const __m512 vs = _mm512_set1_ps(scale);
  __m512 vm = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < vis; j += 16)
    vm = _mm512_max_ps(vm, _mm512_mul_ps(_mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), lanes(vis - j), s + j), vs));
  const __m512 vmax = _mm512_set1_ps(_mm512_reduce_max_ps(vm));
  __m512 vsum = _mm512_setzero_ps();
  for (int64_t j = 0; j < vis; j += 16) {
    const __mmask16 k = lanes(vis - j);
    const __m512 x = attn_exp512(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(k, s + j), vs, vmax));
    _mm512_mask_storeu_ps(e + j, k, x);
    vsum = _mm512_mask_add_ps(vsum, k, vsum, x);
  }
  alignas(64) float part[16];  // (SIMDe, the emulation harness's, has no _mm512_reduce_add_ps)
  _mm512_store_ps(part, vsum);
  float sum = 0.f;
  for (float x : part) sum += x;
  const __m512 vinv = _mm512_set1_ps(1.f / sum), vd = _mm512_set1_ps(d);
  for (int64_t j = 0; j < width; j += 32) {
    __m512 p[2], g[2];
    for (int h = 0; h < 2; ++h) {
      const __mmask16 k = lanes(vis - j - 16 * h);
      p[h] = _mm512_maskz_mul_ps(k, _mm512_maskz_loadu_ps(k, e + j + 16 * h), vinv);
      g[h] = _mm512_maskz_mul_ps(k, _mm512_mul_ps(p[h], _mm512_sub_ps(_mm512_maskz_loadu_ps(k, dp + j + 16 * h), vd)), vs);
    }
    const __m512i pb = bf16x32(p[0], p[1]), gb = bf16x32(g[0], g[1]);
    if (width - j >= 32) {
      _mm512_storeu_si512(pr + j, pb);
      _mm512_storeu_si512(dsr + j, gb);
    } else {
      alignas(64) uint16_t t[64];
      _mm512_store_si512(t, pb);
      _mm512_store_si512(t + 32, gb);
      std::memcpy(pr + j, t, static_cast<size_t>(width - j) * 2);
      std::memcpy(dsr + j, t + 32, static_cast<size_t>(width - j) * 2);
    }
  }
}

}  // namespace kt
#endif  // KT_HAVE_AMX
