// AMX integer tiles for the weight-only int8 and int4 formats (TDPBSSD), included by kernels_amx.hpp.
//
// The weights stay integer codes: a panel is re-laid once per call into AMX's int8 B tiles
// ([K/4][16][4]: int8 codes as stored, int4 as unsigned codes 0..15), with no float decode. Each
// token's activations are two int8 codes per input with one scale per token (q8_tile_row):
//   x ~= xs * (hi + lo / 128),  hi = round(x / xs), lo = round((x / xs - hi) * 128),  xs = max|x| / 127
// so an input's error is at most xs / 256 (like int16 codes, amax / 32512), and both halves run
// TDPBSSD against the same B tile, exact in int32. Sums are turned into floats per weight group:
//   int8 per row:  out = (C_hi + C_lo / 128) * xs * s_row                      (once, at the end)
//   int8 grouped:  acc += (C_hi + C_lo / 128) * s_g;              out = acc * xs
//   int4, and int8 grouped with zero points:
//                  acc += (C_hi + C_lo / 128) * s_g - z_g * s_g * xsum_g;  out = acc * xs
// with value = (code - z) * s (int4: z_g = 8 when symmetric) and xsum_g the group's sum of hi + lo / 128:
// the quantized activations' sum, so their rounding meets the centred weights (code - z).
#pragma once

namespace kt {

// The sum of 16 int32 lanes (SIMDe, which the emulation tests build this with, lacks the reduce intrinsics)
KT_AMX inline int32_t hsum_epi32(__m512i v) {
  __m256i s = _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
  __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1)));
}

// Where one row of q8 activations keeps its parts: the hi / lo codes of input k at hi / lo +
// (k / S) * cs + k % S, its scale at *xs, group g's code sum at xsum[g * gs]. Row r of a token
// tile (tile_elems' layout: cs = 16 S, gs = 16) or one token's row image (cs = S, gs = 1).
struct Q8Row {
  uint8_t *hi, *lo;
  int64_t cs;
  float *xs, *xsum;
  int64_t gs;
};
inline Q8Row q8_tile_row_at(const Weight& w, uint8_t* tile, int r) {
  const int64_t K = w.K, S = q8_step(w);
  float* xs = reinterpret_cast<float*>(tile + 32 * K);
  return {tile + r * S, tile + 16 * K + r * S, 16 * S, xs + r, xs + 16 + r, 16};
}
inline Q8Row q8_token_at(const Weight& w, uint8_t* img) {
  float* xs = reinterpret_cast<float*>(img + 2 * w.K);
  return {img, img + w.K, q8_step(w), xs, xs + 1, 1};
}

// x (K floats) as q8 codes into row o. For int4 weights each quad of inputs is stored in the order
// 0, 2, 1, 3: the order of the packed panels' nibbles (decode_quads_q8), which then need no shuffle.
KT_AMX inline void q8_codes(const Weight& w, const float* x, const Q8Row& o) {
  const int64_t K = w.K, S = q8_step(w);
  const bool swap = w.fmt == FMT_INT4;
  const __m512i order = _mm512_setr_epi32(0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 14, 13, 15);
  __m512 m = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
  const float amax = _mm512_reduce_max_ps(m);
  const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f), m128 = _mm512_set1_ps(128.f);
  *o.xs = amax / 127.f;
  __m512i hs = _mm512_setzero_si512(), ls = _mm512_setzero_si512();  // this group's code sums
  for (int64_t k = 0; k < K; k += 16) {
    const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(x + k), inv);
    const __m512i h = _mm512_cvtps_epi32(v);                                         // |h| <= 127
    const __m512i l = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_sub_ps(v, _mm512_cvtepi32_ps(h)), m128));  // |l| <= 64
    const int64_t at = (k / S) * o.cs + k % S;
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o.hi + at),
                     _mm512_cvtsepi32_epi8(swap ? _mm512_permutexvar_epi32(order, h) : h));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o.lo + at),
                     _mm512_cvtsepi32_epi8(swap ? _mm512_permutexvar_epi32(order, l) : l));
    hs = _mm512_add_epi32(hs, h);
    ls = _mm512_add_epi32(ls, l);
    if ((k + 16) % w.group == 0) {
      o.xsum[(k / w.group) * o.gs] = static_cast<float>(hsum_epi32(hs)) + static_cast<float>(hsum_epi32(ls)) / 128.f;
      hs = ls = _mm512_setzero_si512();
    }
  }
}

// Row r (< 16) of x (K floats) into the q8 token tile at `tile` (layout: tile_elems in kernels_amx.hpp)
KT_AMX inline void q8_tile_row(const Weight& w, const float* x, uint8_t* tile, int r) {
  q8_codes(w, x, q8_tile_row_at(w, tile, r));
}

// Quads [q0, q1) (inputs 4 q0 .. 4 q1) of panel p of an int8 / int4 weight -> the same quads of
// buf [K/4][16][4] int8 codes, TDPBSSD's B-tile layout
KT_AMX inline void decode_quads_q8(const Weight& w, int64_t p, int64_t q0, int64_t q1, uint8_t* buf) {
  const int64_t K = w.K;
  if (w.fmt == FMT_INT8) {  // [K/2][16][2]: pair rows 2q and 2q + 1 side by side per output
    const uint8_t* wp = static_cast<const uint8_t*>(w.data) + p * K * NR;
    for (int64_t q = q0; q < q1; ++q) {
      _mm_prefetch(reinterpret_cast<const char*>(wp + q * 64) + KT_AMX_PREFETCH_INT8, _MM_HINT_T0);
      const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + q * 64)));
      const __m512i hi = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + q * 64 + 32)));
      _mm512_storeu_si512(buf + q * 64, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
    return;
  }
  // int4 [K/4][16] words; word 2l+e, nibble h+2s: row l+8h, input 4q+2s+e. Dword l of a quad holds
  // words 2l and 2l+1; its low nibbles (h = 0) are inputs 0, 2, 1, 3 of row l, the high ones of row
  // l+8: as they stand, since q8_codes stores an int4 weight's activations in that order (a byte
  // shuffle of each half here cost per-row int4 ~5% at T=128, ~3% at T=512; two quads a step in 512
  // bits, halves joined by VSHUFI64X2, was slower at T=128)
  const uint8_t* wp = static_cast<const uint8_t*>(w.data) + p * (K / 2) * NR;
  const __m256i mask = _mm256_set1_epi8(0x0F);
  for (int64_t q = q0; q < q1; ++q) {
    if ((q & 1) == 0) _mm_prefetch(reinterpret_cast<const char*>(wp + q * 32) + KT_DECODE_PREFETCH, _MM_HINT_T0);
    const __m256i d = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + q * 32));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(buf + q * 64), _mm256_and_si256(d, mask));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(buf + q * 64 + 32), _mm256_and_si256(_mm256_srli_epi16(d, 4), mask));
  }
}

// Row r's hi / lo sums (16 each) as one float vector in code units
KT_AMX inline __m512 q8_sums(const int32_t* hi, const int32_t* lo, int r) {
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(lo + r * 16)), _mm512_set1_ps(1.f / 128.f),
                         _mm512_cvtepi32_ps(_mm512_load_si512(hi + r * 16)));
}

// Group g's sums (hi, lo: m rows of 16) into the accumulators acc (m rows of 16), grouped weights
KT_AMX inline void drain_q8(const Weight& w, int64_t p, int64_t g, const int32_t* hi, const int32_t* lo,
                            const float* xsum, int m, float* acc) {
  const int64_t G = w.K / w.group;
  const __m512 s = group_scales16(w, (p * G + g) * NR);
  if (w.fmt == FMT_INT8 && !has_zeros(w)) {
    for (int r = 0; r < m; ++r)
      _mm512_storeu_ps(acc + r * NR, _mm512_fmadd_ps(q8_sums(hi, lo, r), s, _mm512_loadu_ps(acc + r * NR)));
    return;
  }
  const __m512 zs = _mm512_mul_ps(group_zeros16(w, (p * G + g) * NR), s);
  for (int r = 0; r < m; ++r) {
    const __m512 v = _mm512_fmadd_ps(q8_sums(hi, lo, r), s, _mm512_loadu_ps(acc + r * NR));
    _mm512_storeu_ps(acc + r * NR, _mm512_fnmadd_ps(zs, _mm512_set1_ps(xsum[g * 16 + r]), v));
  }
}

// One token tile (m rows) against panels a and b: tmm0 / tmm1 C hi / lo of a, tmm2 / tmm3 of b,
// tmm4 / tmm5 A hi / lo (m rows x S bytes), tmm6 / tmm7 B of a / b (S / 4 rows x 64 bytes)
KT_AMX inline void amx_configure_q8_pair(int m, int S, bool two) {
  TileConfig cfg;
  const int rows[8] = {m, m, two ? m : 0, two ? m : 0, m, m, S / 4, two ? S / 4 : 0};
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = static_cast<uint8_t>(rows[t]);
    cfg.colsb[t] = static_cast<uint16_t>(rows[t] ? (t == 4 || t == 5 ? S : 64) : 0);
  }
  KT_MEMORY_BARRIER();
  _tile_loadconfig(&cfg);
}

// C tiles 0, 1 (and 2, 3) -> c (tile numbers are immediates: no loop over them)
KT_AMX inline void store_q8_sums(int32_t (*c)[16 * 16], bool two) {
  _tile_stored(0, c[0], 64);
  _tile_stored(1, c[1], 64);
  if (two) {
    _tile_stored(2, c[2], 64);
    _tile_stored(3, c[3], 64);
  }
  KT_MEMORY_BARRIER();
}

// This thread's decoded B tiles of two panels of `bytes` codes each (both q8 tile paths share it)
inline uint8_t* q8_panel_buf(int64_t bytes) {
  thread_local lvector<uint8_t> buf;
  if (static_cast<int64_t>(buf.size()) < 2 * bytes) buf.resize(2 * bytes);
  return buf.data();
}

// K step kb of one token tile (q8 codes at x) against panels a and (when b.w is set) b, whose B tiles
// are decoded into ba / bb first when `decode`: C tiles 0 / 1 (hi / lo) of a, 2 / 3 of b
KT_AMX inline void q8_tile_step(PanelRef a, PanelRef b, const uint8_t* x, int64_t kb, bool decode, uint8_t* ba,
                                uint8_t* bb) {
  const int64_t K = a.w->K, S = q8_step(*a.w);
  const bool two = b.w != nullptr;
  if (decode) {
    decode_quads_q8(*a.w, a.p, kb * S / 4, (kb + 1) * S / 4, ba);
    if (two) decode_quads_q8(*b.w, b.p, kb * S / 4, (kb + 1) * S / 4, bb);
    KT_MEMORY_BARRIER();
  }
  // each A tile's two uses are adjacent, so its next load waits on as little as possible
  _tile_loadd(6, ba + kb * S * 16, 64);
  _tile_loadd(4, x + kb * 16 * S, S);
  if (two) {
    _tile_loadd(7, bb + kb * S * 16, 64);
    _tile_dpbssd(0, 4, 6);
    _tile_dpbssd(2, 4, 7);
    _tile_loadd(5, x + 16 * K + kb * 16 * S, S);
    _tile_dpbssd(1, 5, 6);
    _tile_dpbssd(3, 5, 7);
  } else {
    _tile_dpbssd(0, 4, 6);
    _tile_loadd(5, x + 16 * K + kb * 16 * S, S);
    _tile_dpbssd(1, 5, 6);
  }
}

// K steps a chunk of panel_tiles_q8_chunked: the chunk's B tiles of both panels (16 KB) stay in L1
// while every token tile passes
#ifndef KT_Q8_CHUNK_STEPS
#define KT_Q8_CHUNK_STEPS 8
#endif
static_assert(KT_Q8_CHUNK_STEPS > 0, "KT_Q8_CHUNK_STEPS: K steps a chunk, at least 1");

// C tiles 0..3 <-> c (row pitch 64 bytes); tile numbers are immediates
KT_AMX inline void load_q8_sums(int32_t* c, bool two) {
  _tile_loadd(0, c, 64);
  _tile_loadd(1, c + 256, 64);
  if (two) {
    _tile_loadd(2, c + 512, 64);
    _tile_loadd(3, c + 768, 64);
  }
}

// panel_tiles_q8_amx for a weight of one group a row (int4 per row) and more than one token tile:
// K in chunks, every token tile through a chunk before the next, its sums parked in memory between
// chunks; otherwise the same steps and the same float drain, so the same bits. The panels' B tiles
// are then read from L1 by every token tile, where the whole-K order read them back from L2.
KT_AMX inline void panel_tiles_q8_chunked(PanelRef a, PanelRef b, const uint16_t* Xt, int64_t n, float* out_a,
                                          float* out_b) {
  const Weight& wa = *a.w;
  const int64_t K = wa.K, S = q8_step(wa), bytes = K * NR, E = tile_elems(wa), steps = K / S;
  const int64_t tiles = (n + 15) / 16;
  const bool two = b.w != nullptr;
  thread_local lvector<int32_t> sums;  // [tiles][4][16 x 16]: C hi / lo of a, of b
  if (static_cast<int64_t>(sums.size()) < tiles * 4 * 256) sums.resize(tiles * 4 * 256);
  uint8_t* const ba = q8_panel_buf(bytes);
  uint8_t* const bb = ba + bytes;
  int32_t* const cs = sums.data();
  amx_configure_q8_pair(16, static_cast<int>(S), two);
  for (int64_t k0 = 0; k0 < steps; k0 += KT_Q8_CHUNK_STEPS) {
    const int64_t k1 = std::min<int64_t>(steps, k0 + KT_Q8_CHUNK_STEPS);
    for (int64_t t = 0; t < tiles; ++t) {
      const uint8_t* x = reinterpret_cast<const uint8_t*>(Xt + t * E);
      int32_t* c = cs + t * 4 * 256;
      if (k0 == 0) {
        _tile_zero(0);
        _tile_zero(1);
        if (two) {
          _tile_zero(2);
          _tile_zero(3);
        }
      } else {
        load_q8_sums(c, two);
      }
      for (int64_t kb = k0; kb < k1; ++kb) {
        q8_tile_step(a, b, x, kb, t == 0, ba, bb);
      }
      store_q8_sums(reinterpret_cast<int32_t(*)[16 * 16]>(c), two);
    }
  }
  _tile_release();
  KT_MEMORY_BARRIER();
  for (int64_t t = 0; t < tiles; ++t) {  // the one group's drain, as panel_tiles_q8_amx's
    const int m = static_cast<int>(std::min<int64_t>(16, n - t * 16));
    const float* xs = reinterpret_cast<const float*>(reinterpret_cast<const uint8_t*>(Xt + t * E) + 32 * K);
    const int32_t* c = cs + t * 4 * 256;
    for (int j = 0; j < (two ? 2 : 1); ++j) {
      float* o = (j ? out_b : out_a) + t * 16 * NR;
      std::memset(o, 0, sizeof(float) * m * NR);
      drain_q8(j ? *b.w : wa, j ? b.p : a.p, 0, c + 2 * j * 256, c + (2 * j + 1) * 256, xs + 16, m, o);
      for (int r = 0; r < m; ++r) _mm512_storeu_ps(o + r * NR, _mm512_mul_ps(_mm512_loadu_ps(o + r * NR), _mm512_set1_ps(xs[r])));
    }
  }
}

// panel_tiles_amx for q8_takes calls (same contract; Xt holds q8 token tiles, whole ones: tiled_elems(w, n))
KT_AMX inline void panel_tiles_q8_amx(PanelRef a, PanelRef b, const uint16_t* Xt, int64_t n, float* out_a,
                                      float* out_b) {
  const Weight& wa = *a.w;
  const int64_t K = wa.K, S = q8_step(wa), bytes = K * NR, E = tile_elems(wa);
  const bool per_row = wa.fmt == FMT_INT8 && wa.group == K, two = b.w != nullptr;
  if (!per_row && wa.group == K && n > 16) return panel_tiles_q8_chunked(a, b, Xt, n, out_a, out_b);
  uint8_t* const ba = q8_panel_buf(bytes);  // (a thread_local's address costs a call to look up: once here)
  uint8_t* const bb = ba + bytes;
  // The panels are decoded a K block at a time inside the first token tile's steps (as panel_tiles_amx's)
  const int64_t per_group = wa.group / S;  // blocks of S inputs a weight group spans
  alignas(64) int32_t c[4][16 * 16];
  int cur = -1;
  for (int64_t i = 0; i < n; i += 16) {
    const int m = static_cast<int>(std::min<int64_t>(16, n - i));
    // Of several token tiles, each runs 16 rows: a partial one's rows past n lie in Xt's whole
    // tiles (their sums go unused), and a tile configuration per partial tile cost more than its
    // smaller TDPBSSDs saved (one MoE layer int8 T=512 55.0 -> 52.2 ms; in K chunks, per-row int4
    // T=512 1.05x). A call of one tile (n <= 16: most experts at T=128) is configured with its n rows
    // once, so the products and the A loads cover only them (bench/ab_native.py, AMX Xeon: T=128
    // int8 0.94x, per-row int4 0.95-0.98x, int4 g32 0.98x; T=16 per-row int4 0.95x)
    if (cur < 0) amx_configure_q8_pair(cur = n <= 16 ? m : 16, static_cast<int>(S), two);
    const uint8_t* x = reinterpret_cast<const uint8_t*>(Xt + (i / 16) * E);
    const float* xs = reinterpret_cast<const float*>(x + 32 * K);
    float *oa = out_a + i * NR, *ob = two ? out_b + i * NR : nullptr;
    if (!per_row) {
      std::memset(oa, 0, sizeof(float) * m * NR);
      if (two) std::memset(ob, 0, sizeof(float) * m * NR);
    }
    _tile_zero(0);
    _tile_zero(1);
    if (two) {
      _tile_zero(2);
      _tile_zero(3);
    }
    for (int64_t kb = 0; kb < K / S; ++kb) {
      q8_tile_step(a, b, x, kb, i == 0, ba, bb);
      if (per_row || (kb + 1) % per_group) continue;
      store_q8_sums(c, two);  // the end of a weight group: its sums into the float accumulators
      _tile_zero(0);
      _tile_zero(1);
      if (two) {
        _tile_zero(2);
        _tile_zero(3);
      }
      const int64_t g = kb / per_group;
      drain_q8(wa, a.p, g, c[0], c[1], xs + 16, m, oa);
      if (two) drain_q8(*b.w, b.p, g, c[2], c[3], xs + 16, m, ob);
    }
    if (per_row) {  // one scale per row: the whole sums, once
      store_q8_sums(c, two);
      for (int j = 0; j < (two ? 2 : 1); ++j) {
        const __m512 sv = _mm512_loadu_ps((j ? b.w : a.w)->scale + (j ? b.p : a.p) * NR);
        float* o = j ? ob : oa;
        for (int r = 0; r < m; ++r)
          _mm512_storeu_ps(o + r * NR, _mm512_mul_ps(q8_sums(c[2 * j], c[2 * j + 1], r), _mm512_mul_ps(sv, _mm512_set1_ps(xs[r]))));
      }
    } else {
      for (int r = 0; r < m; ++r) {
        _mm512_storeu_ps(oa + r * NR, _mm512_mul_ps(_mm512_loadu_ps(oa + r * NR), _mm512_set1_ps(xs[r])));
        if (two) _mm512_storeu_ps(ob + r * NR, _mm512_mul_ps(_mm512_loadu_ps(ob + r * NR), _mm512_set1_ps(xs[r])));
      }
    }
  }
  _tile_release();
  KT_MEMORY_BARRIER();
}

// One token's activations laid out once for every route that takes it (token_row), then copied
// into a route's row of a token tile (tile_row_of): q8: hi codes [K], lo codes [K], the scale and
// the group sums (as q8_tile_row makes them); bf16: the K values rounded. Elements (uint16) a token
// takes: token_elems, whole 64-byte lines.
inline int64_t token_elems(const Weight& w, bool q8) { return q8 ? (w.K + 2 + 2 * (w.K / w.group) + 31) / 32 * 32 : w.K; }

KT_AMX inline void token_row(const Weight& w, bool q8, const float* x, uint16_t* img) {
  const int64_t K = w.K;
  if (!q8) {
    for (int64_t k = 0; k < K; k += 16) _mm256_storeu_si256(reinterpret_cast<__m256i*>(img + k), bf16x16(x + k));
    return;
  }
  q8_codes(w, x, q8_token_at(w, reinterpret_cast<uint8_t*>(img)));
}

KT_AMX inline void tile_row_of(const Weight& w, bool q8, const uint16_t* img, uint16_t* tile, int r) {
  const int64_t K = w.K;
  if (!q8) {
    for (int64_t k = 0; k < K; k += 32) std::memcpy(tile + tiled_index(r, k, K), img + k, 64);
    return;
  }
  const int64_t S = q8_step(w), G = K / w.group;
  const Q8Row from = q8_token_at(w, reinterpret_cast<uint8_t*>(const_cast<uint16_t*>(img)));
  const Q8Row to = q8_tile_row_at(w, reinterpret_cast<uint8_t*>(tile), r);
  // copies of a size the compiler sees (inline moves), not a library call per block: the calls
  // were ~1.3 ms of a 512-token layer's 4096 routes
  const auto copy = [&](auto size) {
    for (int64_t kb = 0; kb < K / S; ++kb) {
      std::memcpy(to.hi + kb * to.cs, from.hi + kb * from.cs, size);
      std::memcpy(to.lo + kb * to.cs, from.lo + kb * from.cs, size);
    }
  };
  if (S == 64)
    copy(std::integral_constant<size_t, 64>());
  else
    copy(std::integral_constant<size_t, 32>());
  *to.xs = *from.xs;
  for (int64_t g = 0; g < G; ++g) to.xsum[g * to.gs] = from.xsum[g * from.gs];
}

}  // namespace kt
