// AMX (Advanced Matrix Extensions) kernels for prefill. Same weight layouts as kernels.hpp:
//   w8a8: the [K/4][16][4] panel is already AMX's B-tile layout (a row = 16 outputs x 4 inputs),
//         activations are int8 rows, so one TDPBSSD does up to 16 x 16 x 64 exact multiply-adds
//         (tiles of 16 tokens and a shorter last one);
//   int8, int4 (groups of a multiple of 32): TDPBSSD on the integer codes and int8 activations
//         with a scale per 32 inputs (kernels_amx_int.hpp);
//   bf16, fp8 (and int4 / int8 of other groups): each panel is decoded once into bf16 B tiles and
//         the activations, rounded to bf16 once per call (tile_row), run TDPBF16PS in tiles of up
//         to 16 tokens (panel_tiles_amx, below). The MoE's inputs are bf16 hidden states already,
//         so only the down projection's input (the activation product) is rounded, as a bf16 model does.
// Picked at run time on CPUs with AMX-TILE/INT8/BF16 once the OS has granted the tile state
// (kt_cpu.cpp), and each format checked against AVX2 on first use. GCC 11+ / Clang 12+ only
// (KT_HAVE_AMX; MSVC: not yet).
#pragma once
#include "kernels_bf16dp.hpp"  // the pair decoders the bf16 tiles read (and kernels_avx512.hpp)

#include <cstdlib>
#include <type_traits>
#include <vector>

namespace kt {

// Activations for the tile kernels, "tiled bf16": rows in groups of 16 (a token tile), each group
// K/32 A tiles of 16 rows x 32 inputs (1 KB) back to back, so a tile load reads 1 KB in a row
// (rows a whole hidden state apart, 4 KB, would all fall in one L1 set). Element (i, k) of a
// block of n rows is at tiled_index(i, k, K); the block takes tiled_size(n, K) elements. K % 32 == 0.
inline int64_t tiled_index(int64_t i, int64_t k, int64_t K) {
  return (i / 16) * 16 * K + (k / 32) * 512 + (i % 16) * 32 + k % 32;
}
inline int64_t tiled_size(int64_t n, int64_t K) { return (n + 15) / 16 * 16 * K; }

// The integer tile kernels (kernels_amx_int.hpp) take this weight: int8 / int4 in groups of a
// multiple of 32 inputs (per-row int8: group == K); the others take bf16 tiles.
inline bool int_tiles(const Weight& w) {
  return (w.fmt == FMT_INT8 || w.fmt == FMT_INT4) && w.K % 32 == 0 && w.group > 0 && w.group % 32 == 0;
}
// Inputs per TDPBSSD step of an int_tiles weight (a weight group is whole steps)
inline int64_t q8_step(const Weight& w) { return w.group % 64 == 0 ? 64 : 32; }
// Whether a call of n rows takes the integer tiles (else bf16 tiles). From two token tiles on, the
// bf16 kernel runs them in pairs against each B tile while it sits in L1, where the integer kernel
// runs them one at a time, each over both activation halves, reading the decoded panel back from L2:
// - groups of 32 also turn the integer sums into floats every step (one Qwen3-30B-A3B MoE layer,
//   2-core AMX Xeon, bench/ab_native.py: int8 g32 T=128 40.1 vs 41.1 ms, T=512 74.3 vs 64.5; int4 g32
//   30.8 vs 33.5 and 77.4 vs 55.0);
// - per-row int8 codes are exact in bf16 (the row scales multiply the products), so bf16 tiles
//   round only the activations, as for a bf16 model: T=512 57.4 -> 50.4 ms from 17 tokens an expert
//   (from 33: 55.0);
// - int4 of groups of 64+ stays on integer tiles: decoding its codes to bf16 costs more than the
//   pairing saves (per row, T=512: 40.9 -> 46.0 ms), and grouped int8 (its scales folded into bf16
//   weights would round them) too.
inline bool q8_takes(const Weight& w, int64_t n) {
  if (!int_tiles(w)) return false;
  if (n <= 16) return true;
  const bool int8_per_row = w.fmt == FMT_INT8 && w.group == w.K;
  return q8_step(w) == 64 && !int8_per_row;
}

// Elements (uint16) apart that the 16-token tiles of activations for w lie, in either layout.
// Tiled bf16: 16 K elements. Tiled q8 (q8_takes): bytes [0, 16 K) hi codes and [16 K, 32 K) lo
// codes, each [K/S][16 rows][S] (S = q8_step), then 16 float scales, then [K/group][16] float sums.
inline int64_t tile_elems(const Weight& w) {
  return int_tiles(w) ? 16 * w.K + 32 + 32 * (w.K / w.group) : 16 * w.K;
}
// Elements of n rows of tiled activations for w
inline int64_t tiled_elems(const Weight& w, int64_t n) { return (n + 15) / 16 * tile_elems(w); }

// One panel of one weight; w null: none
struct PanelRef {
  const Weight* w = nullptr;
  int64_t p = 0;
};

}  // namespace kt

// AMX intrinsics and target names arrived in GCC 11 and Clang 12; older compilers (Ubuntu 20.04's
// GCC 9) build everything else. MinGW's GCC is left out: its tile macros pass the stride as a
// `long`, 32 bits on Windows, which the assembler refuses as an index register.
#if defined(KT_X86) && defined(__x86_64__) && \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11)) && \
    !(defined(_WIN32) && !defined(__clang__))
#define KT_HAVE_AMX 1
namespace kt {

#ifndef KT_AMX  // tests/native/simd_emulated.cpp sets it to compile these against its tile model
#define KT_AMX KT_TARGET("amx-tile,amx-int8,amx-bf16,avx512bf16,avx512f,avx512bw,avx512vnni,avx2,fma,f16c")
#endif

// GCC's tile load / config intrinsics are asm statements that do not tell the compiler they
// read memory: this barrier makes the buffers written just before them really be there.
#define KT_MEMORY_BARRIER() __asm__ __volatile__("" ::: "memory")

// Bytes ahead in a panel stream that the int8 integer-tile decoder prefetches (KT_DECODE_PREFETCH, 512:
// one MoE layer, 2-core AMX Xeon, T=128 +2%)
#ifndef KT_AMX_PREFETCH_INT8
#define KT_AMX_PREFETCH_INT8 2048
#endif

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// tmm0: C (m tokens x 16 outputs, 4-byte), tmm1: A (m tokens x 64 bytes), tmm2: B (16 x 64)
KT_AMX inline void amx_configure_q8(int m) {
  TileConfig cfg;
  const int rows[3] = {m, m, 16};
  for (int t = 0; t < 3; ++t) {
    cfg.rows[t] = static_cast<uint8_t>(rows[t]);
    cfg.colsb[t] = 64;
  }
  KT_MEMORY_BARRIER();
  _tile_loadconfig(&cfg);
}

// The tile kernels below configure the tiles per call and release them at its end, since other
// code on the thread (oneDNN's AMX kernels in torch) may configure them its own way in between.

// w8a8: out[i][j] for m <= 16 tokens (rows of Xq, stride ldx) against panel p; K % 64 == 0
KT_AMX inline void tile_q8_amx(const Weight& w, int64_t p, const int8_t* Xq, int64_t ldx, const float* xs, int m,
                               float* out) {
  alignas(64) int32_t c[16 * 16];
  const int8_t* wp = static_cast<const int8_t*>(w.data) + p * w.K * NR;
  _tile_zero(0);
  for (int64_t k0 = 0; k0 < w.K; k0 += 64) {
    _tile_loadd(1, Xq + k0, ldx);
    _tile_loadd(2, wp + k0 * NR, 64);
    _tile_dpbssd(0, 1, 2);
  }
  _tile_stored(0, c, 64);
  KT_MEMORY_BARRIER();
  const __m512 s = _mm512_loadu_ps(w.scale + p * NR);
  for (int i = 0; i < m; ++i)
    _mm512_storeu_ps(out + i * NR, _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_load_si512(c + i * 16)), s),
                                                 _mm512_set1_ps(xs[i])));
}

// n tokens in tiles of 16 and a shorter last one (exact integer sums either way)
KT_AMX inline void panel_gemm_q8_amx(const Weight& w, int64_t p, const int8_t* Xq, int64_t ldx, const float* xs,
                                     int64_t n, float* out) {
  int cur = -1;
  for (int64_t i = 0; i < n; i += 16) {
    const int m = static_cast<int>(std::min<int64_t>(16, n - i));
    if (m != cur) amx_configure_q8(cur = m);
    tile_q8_amx(w, p, Xq + i * ldx, ldx, xs + i, m, out + i * NR);
  }
  _tile_release();
}

// Whether the w8a8 tile kernel takes this call (the rest go to AVX-512): from this many tokens.
// One is enough: on a 2-core AMX Xeon one MoE layer at T=1 ran 0.93 ms on tiles, 1.03 on
// AVX-512 VNNI (T=16: 11.2 vs 14.1; bench/ab_native.py)
#ifndef KT_Q8_TILE_FROM
#define KT_Q8_TILE_FROM 1
#endif
inline bool amx_q8_takes(const Weight& w, int64_t n) {
  return w.fmt == FMT_W8A8 && n >= KT_Q8_TILE_FROM && w.K % 64 == 0;
}

// ---------------------------------------------------------------- every float / weight-only format
// A panel of any format is decoded once into bf16 B tiles (each 32 inputs x 16 outputs, 1 KB,
// row kp = the 16 outputs' input pairs (2kp, 2kp+1) side by side), then every tile of up to 16
// tokens of bf16 activations runs TDPBF16PS against them, two token tiles per B tile load.
// Dequantized weights are rounded to bf16 (to nearest even) once: int4, fp8 and grouped int8 fold
// their group scales in; per-row int8 codes are exact in bf16 and the row scales multiply the outputs. Tiles of fewer
// than 16 tokens are configured with fewer rows (MoE routing gives an expert ~8 tokens at T=128).

// B tile kb of panel p into buf (inside a tile loop: bf16 straight to its fixed-size block, where
// the general decoder cost ~5%)
KT_AMX inline void decode_tile_bf16(const Weight& w, int64_t p, int64_t kb, uint32_t* buf) {
  if (w.fmt == FMT_BF16) decode_block_bf16(w, p, kb, buf + kb * 16 * NR);
  else decode_inputs_bf16(w, p, kb * 32, kb * 32 + 32, buf + kb * 16 * NR);
}

// The fewest tokens of one expert (rows of one dense call) from which the tile kernels beat the
// vector ones, per format: bench/ab_native.py on a 2-core AMX Xeon (Qwen3-30B-A3B MoE layer,
// T=32..128; KT_AMX_MIN_TOKENS=n overrides them all, for such measurements). per_row: one weight
// group a row (int4 as kt-kernel's AMXInt4 keeps it), whose integer tiles drain no group sums. The
// tests' tolerance table asks for a format's grouped count through kt_bf16_tile_tokens.
inline int64_t amx_tile_min_tokens(int fmt, bool per_row) {
  static const int64_t env = [] {
    const char* v = std::getenv("KT_AMX_MIN_TOKENS");
    return v ? std::atoll(v) : 0;
  }();
  if (env > 0) return env;
  switch (fmt) {
    case FMT_BF16: return 2;  // decoding bf16 or fp8 costs little next to their vector kernels
    case FMT_FP8: return 2;
    case FMT_INT8: return 2;  // integer tiles (T=128: 30.0 -> 28.5 ms, T=16: 18.0 -> 16.8; 4 before them)
    // the int16 kernels read int4 codes as they are; grouped codes cost the tiles a drain per group
    // (T=128: per row 30.5 -> 26.2 ms at 2 tokens instead of 6; g32 34.8 -> 34.1 at 4, T=64 29.6 -> 28.9)
    case FMT_INT4: return per_row ? 2 : 4;
    default: return 0;  // w8a8: amx_q8_takes
  }
}

inline bool amx_tiles_take(const Weight& w, int64_t n) {
  const int64_t least = amx_tile_min_tokens(w.fmt, w.group == w.K);
  return least > 0 && n >= least && w.K % 32 == 0 && (w.fmt != FMT_FP8 || w.group % 2 == 0);
}

// Two panels (a, b) times two token tiles (0, 1): tmm0 / tmm1 C of a for tiles 0 / 1, tmm2 /
// tmm3 C of b, tmm4 / tmm5 A of tiles 0 / 1 (m0, m1 rows), tmm6 / tmm7 B of a / b
KT_AMX inline void amx_configure_quad(int m0, int m1, bool two) {
  TileConfig cfg;
  const int rows[8] = {m0, m1, two ? m0 : 0, two ? m1 : 0, m0, m1, 16, two ? 16 : 0};
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = static_cast<uint8_t>(rows[t]);
    cfg.colsb[t] = rows[t] ? 64 : 0;
  }
  KT_MEMORY_BARRIER();
  _tile_loadconfig(&cfg);
}

}  // namespace kt
#include "kernels_amx_int.hpp"  // int8 / int4 weights: TDPBSSD on int8 activations
namespace kt {

// x (K floats) -> row r (< 16) of the token tile at `tile` (tile_elems(w) elements) in what w's
// tile kernel reads: tiled q8 (q8: q8_takes for the call's rows), else tiled bf16 (round to nearest even)
KT_AMX inline void tile_row(const Weight& w, bool q8, const float* x, uint16_t* tile, int r) {
  if (q8) return q8_tile_row(w, x, reinterpret_cast<uint8_t*>(tile), r);
  for (int64_t k = 0; k < w.K; k += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(tile + tiled_index(r, k, w.K)), bf16x16(x + k));
}

// n float rows of X (w.K inputs, ldx apart) -> the tiled activations w's tile kernel reads for a
// call of `total` rows (these n may be one token tile of them)
KT_AMX inline void weight_tiles(const Weight& w, int64_t total, const float* X, int64_t n, int64_t ldx, uint16_t* Xt) {
  const bool q8 = q8_takes(w, total);
  for (int64_t i = 0; i < n; ++i) tile_row(w, q8, X + i * ldx, Xt + (i / 16) * tile_elems(w), static_cast<int>(i % 16));
}

// out_a[i][j] = row i of the tiled bf16 block Xt . row 16 a.p + j of a.w, for n rows; the same for
// b into out_b when b.w is set (same K: gate and up, or two panels of one projection), sharing
// every A tile load. The panels are decoded a B tile at a time inside the first token tiles' steps
// (their decoders prefetch KT_DECODE_PREFETCH bytes ahead), so the DRAM stream runs through the tile
// work. (Fetching the caller's next panels into L2 during the steps as well, PanelFetch until
// 2026-12-03, took the line fill buffers the tile loads and that stream need: one MoE layer without
// it, bench/ab_native.py on the 2-core AMX Xeon, bf16 T=512 80.3 -> 74.5 ms, T=128 62.3 -> 56.3;
// int8 T=128 39.7 -> 34.6; int4 per row T=128 25.1 -> 22.1, T=512 42.3 -> 39.7.)
KT_AMX inline void panel_tiles_amx(PanelRef a, PanelRef b, const uint16_t* Xt, int64_t n, float* out_a,
                                   float* out_b) {
  if (q8_takes(*a.w, n)) return panel_tiles_q8_amx(a, b, Xt, n, out_a, out_b);
  const int64_t K = a.w->K, half = K / 2 * NR, E = tile_elems(*a.w);
  thread_local lvector<uint32_t> buf;
  if (static_cast<int64_t>(buf.size()) < 2 * half) buf.resize(2 * half);
  // Decoding each B tile inside the first token tiles' steps instead of the whole panel before
  // them keeps DRAM busy through the call (bf16 T=512 79.7 -> 70.9 ms)
  const float* scale_a = row_scales_left(*a.w, a.p);
  const float* scale_b = b.w ? row_scales_left(*b.w, b.p) : nullptr;
  int cur0 = -1, cur1 = -1;
  for (int64_t i = 0; i < n; i += 32) {
    const int m0 = static_cast<int>(std::min<int64_t>(16, n - i));
    const int m1 = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(16, n - i - 16)));
    if (m0 != cur0 || m1 != cur1) amx_configure_quad(cur0 = m0, cur1 = m1, b.w != nullptr);
    const uint16_t* x0 = Xt + i / 16 * E;  // token tiles i / 16 and i / 16 + 1
    _tile_zero(0);
    if (b.w) _tile_zero(2);
    if (m1) _tile_zero(1);
    if (m1 && b.w) _tile_zero(3);
    for (int64_t kb = 0; kb < K / 32; ++kb) {
      if (i == 0) {
        decode_tile_bf16(*a.w, a.p, kb, buf.data());
        if (b.w) decode_tile_bf16(*b.w, b.p, kb, buf.data() + half);
        KT_MEMORY_BARRIER();
      }
      _tile_loadd(6, buf.data() + kb * 16 * NR, 64);
      _tile_loadd(4, x0 + kb * 512, 64);
      _tile_dpbf16ps(0, 4, 6);
      if (b.w) {
        _tile_loadd(7, buf.data() + half + kb * 16 * NR, 64);
        _tile_dpbf16ps(2, 4, 7);
      }
      if (m1) {
        _tile_loadd(5, x0 + E + kb * 512, 64);
        _tile_dpbf16ps(1, 5, 6);
        if (b.w) _tile_dpbf16ps(3, 5, 7);
      }
    }
    _tile_stored(0, out_a + i * NR, NR * sizeof(float));
    if (m1) _tile_stored(1, out_a + (i + 16) * NR, NR * sizeof(float));
    if (b.w) _tile_stored(2, out_b + i * NR, NR * sizeof(float));
    if (b.w && m1) _tile_stored(3, out_b + (i + 16) * NR, NR * sizeof(float));
  }
  _tile_release();
  KT_MEMORY_BARRIER();
  if (scale_a) scale_rows16(out_a, n, scale_a);  // per-row int8 (row_scales_left)
  if (scale_b) scale_rows16(out_b, n, scale_b);
}

}  // namespace kt
#endif
