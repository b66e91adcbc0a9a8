// AMX (Advanced Matrix Extensions) panel kernels for prefill: 16 tokens x one 16-row panel per
// tile product. Same weight layouts as kernels.hpp:
//   w8a8: the [K/4][16][4] panel is already AMX's B-tile layout (a row = 16 outputs x 4 inputs),
//         activations are int8 rows, so one TDPBSSD does 16 x 16 x 64 exact multiply-adds;
//   bf16: the [K][16] panel's input pairs are interleaved into a B tile (1 KB, in L1) and the
//         float activations rounded to bf16 (to nearest even) per 32 inputs; TDPBF16PS sums in
//         fp32. The MoE's inputs are bf16 hidden states already, so only the down projection's
//         input (the activation product) is rounded, as a bf16 model computes it anyway.
// Tiles of fewer than 16 tokens and other formats run on the AVX-512 kernels. Picked at run time
// on CPUs with AMX-TILE/INT8/BF16 once the OS has granted the tile state (kt_cpu.cpp), and each
// format checked against AVX2 on first use. GCC 11+ / Clang 12+ only (KT_HAVE_AMX; MSVC: not yet).
#pragma once
#include "kernels_avx512.hpp"

// AMX intrinsics and target names arrived in GCC 11 and Clang 12; older compilers (Ubuntu 20.04's
// GCC 9) build everything else. MinGW's GCC is left out: its tile macros pass the stride as a
// `long`, 32 bits on Windows, which the assembler refuses as an index register.
#if defined(KT_X86) && defined(__x86_64__) && \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11)) && \
    !(defined(_WIN32) && !defined(__clang__))
#define KT_HAVE_AMX 1
namespace kt {

#ifndef KT_AMX  // tests/native/simd_emulated.cpp sets it to compile these against its tile model
#define KT_AMX KT_TARGET("amx-tile,amx-int8,amx-bf16,avx512f,avx512bw,avx512vnni,avx2,fma,f16c")
#endif

// GCC's tile load / config intrinsics are asm statements that do not tell the compiler they
// read memory: this barrier makes the buffers written just before them really be there.
#define KT_MEMORY_BARRIER() __asm__ __volatile__("" ::: "memory")

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// tmm0: C (16 tokens x 16 outputs, 4-byte), tmm1: A (16 tokens x 64 bytes), tmm2: B (16 x 64)
KT_AMX inline void amx_configure() {
  TileConfig cfg;
  for (int t = 0; t < 3; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  KT_MEMORY_BARRIER();
  _tile_loadconfig(&cfg);
}

// The tile kernels below run between amx_configure() and _tile_release() (panel_gemm_*_amx):
// configured per call, since other code on the thread (oneDNN's AMX kernels in torch) may
// configure the tiles its own way in between.

// w8a8: out[i][j] for 16 tokens (rows of Xq, stride ldx) against panel p; K % 64 == 0
KT_AMX inline void tile16_q8_amx(const Weight& w, int64_t p, const int8_t* Xq, int64_t ldx, const float* xs,
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
  for (int i = 0; i < 16; ++i)
    _mm512_storeu_ps(out + i * NR, _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_load_si512(c + i * 16)), s),
                                                 _mm512_set1_ps(xs[i])));
}

// bf16: out[i][j] for 16 tokens (float rows of X, stride ldx) against panel p; K % 32 == 0
KT_AMX inline void tile16_bf16_amx(const Weight& w, int64_t p, const float* X, int64_t ldx, float* out) {
  alignas(64) uint16_t a[16 * 32], b[16 * 32];
  const uint16_t* wp = static_cast<const uint16_t*>(w.data) + p * w.K * NR;
  _tile_zero(0);
  for (int64_t k0 = 0; k0 < w.K; k0 += 32) {
    for (int i = 0; i < 16; ++i) {
      _mm256_store_si256(reinterpret_cast<__m256i*>(a + i * 32), bf16x16(X + i * ldx + k0));
      _mm256_store_si256(reinterpret_cast<__m256i*>(a + i * 32 + 16), bf16x16(X + i * ldx + k0 + 16));
    }
    for (int kp = 0; kp < 16; ++kp) {  // B row kp: output j's inputs (k0 + 2kp, k0 + 2kp + 1) side by side
      const __m256i r0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + (k0 + 2 * kp) * NR));
      const __m256i r1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + (k0 + 2 * kp + 1) * NR));
      const __m256i lo = _mm256_unpacklo_epi16(r0, r1), hi = _mm256_unpackhi_epi16(r0, r1);
      _mm256_store_si256(reinterpret_cast<__m256i*>(b + kp * 32), _mm256_permute2x128_si256(lo, hi, 0x20));
      _mm256_store_si256(reinterpret_cast<__m256i*>(b + kp * 32 + 16), _mm256_permute2x128_si256(lo, hi, 0x31));
    }
    KT_MEMORY_BARRIER();
    _tile_loadd(1, a, 64);
    _tile_loadd(2, b, 64);
    _tile_dpbf16ps(0, 1, 2);
  }
  _tile_stored(0, out, NR * sizeof(float));
  KT_MEMORY_BARRIER();
}

// n tokens: whole tiles of 16 on AMX, the rest on AVX-512
KT_AMX inline void panel_gemm_q8_amx(const Weight& w, int64_t p, const int8_t* Xq, int64_t ldx, const float* xs,
                                     int64_t n, float* out) {
  int64_t i = 0;
  amx_configure();
  for (; i + 16 <= n; i += 16) tile16_q8_amx(w, p, Xq + i * ldx, ldx, xs + i, out + i * NR);
  _tile_release();
  if (i < n) panel_gemm_q8_avx512(w, p, Xq + i * ldx, ldx, xs + i, n - i, out + i * NR);
}

KT_AMX inline void panel_gemm_bf16_amx(const Weight& w, int64_t p, const float* X, int64_t ldx, int64_t n,
                                       float* out) {
  int64_t i = 0;
  amx_configure();
  for (; i + 16 <= n; i += 16) tile16_bf16_amx(w, p, X + i * ldx, ldx, out + i * NR);
  _tile_release();
  if (i < n) panel_gemm_avx512(w, p, X + i * ldx, ldx, n - i, out + i * NR);
}

// Whether the AMX kernels take this call (the rest go to AVX-512)
inline bool amx_takes(const Weight& w, int64_t n) {
  if (n < 16) return false;
  if (w.fmt == FMT_W8A8) return w.K % 64 == 0;
  if (w.fmt == FMT_BF16) return w.K % 32 == 0;
  return false;
}

}  // namespace kt
#endif
