// A model of the AMX tile instructions kernels_amx.hpp uses, written from the Intel SDM's
// descriptions (LDTILECFG, TILELOADD, TILESTORED, TILEZERO, TILERELEASE, TDPBSSD, TDPBF16PS),
// so the AMX kernels' tile shapes, strides and data layouts run on a CPU without AMX. It checks
// what the hardware would fault on (a tile used unconfigured, shapes that do not chain) and
// aborts with a message. Include after <immintrin.h>: it replaces the intrinsics' names.
#pragma once
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace ktemu {

struct Tile {
  int rows = 0, colsb = 0;
  uint8_t d[16][64];
};
inline Tile tiles[8];
inline bool configured = false;

[[noreturn]] inline void fault(const char* what) {
  std::fprintf(stderr, "AMX model: %s\n", what);
  std::abort();
}

inline void loadconfig(const void* p) {
  uint8_t c[64];
  std::memcpy(c, p, 64);
  if (c[0] != 1) fault("palette must be 1");
  for (int t = 0; t < 8; ++t) {
    uint16_t colsb;
    std::memcpy(&colsb, c + 16 + 2 * t, 2);
    tiles[t].rows = c[48 + t];
    tiles[t].colsb = colsb;
    if (tiles[t].rows > 16 || tiles[t].colsb > 64) fault("tile larger than 16 rows x 64 bytes");
    std::memset(tiles[t].d, 0, sizeof tiles[t].d);
  }
  configured = true;
}

inline Tile& use(int t) {
  if (!configured) fault("tile instruction before LDTILECFG (or after TILERELEASE)");
  if (t < 0 || t > 7 || tiles[t].rows == 0) fault("tile not configured");
  return tiles[t];
}

inline void release() { configured = false; }

inline void loadd(int t, const void* base, long stride) {
  Tile& x = use(t);
  for (int r = 0; r < x.rows; ++r) std::memcpy(x.d[r], static_cast<const uint8_t*>(base) + r * stride, x.colsb);
}

inline void stored(int t, void* base, long stride) {
  Tile& x = use(t);
  for (int r = 0; r < x.rows; ++r) std::memcpy(static_cast<uint8_t*>(base) + r * stride, x.d[r], x.colsb);
}

inline void zero(int t) { std::memset(use(t).d, 0, sizeof tiles[t].d); }

// C[m][n] += sum over k < colsb(A)/4, i < 4 of A[m][4k+i] * B[k][4n+i], signed bytes, int32 sums
inline void dpbssd(int c, int a, int b) {
  Tile &C = use(c), &A = use(a), &B = use(b);
  const int M = A.rows, K = A.colsb / 4, N = C.colsb / 4;
  if (C.rows != M || B.rows != K || B.colsb != C.colsb) fault("TDPBSSD shapes do not chain");
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      int32_t acc;
      std::memcpy(&acc, C.d[m] + 4 * n, 4);
      for (int k = 0; k < K; ++k)
        for (int i = 0; i < 4; ++i)
          acc += static_cast<int8_t>(A.d[m][4 * k + i]) * static_cast<int8_t>(B.d[k][4 * n + i]);
      std::memcpy(C.d[m] + 4 * n, &acc, 4);
    }
}

inline float bf16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// C[m][n] += sum over k < colsb(A)/4 of A[m][2k] * B[k][2n] + A[m][2k+1] * B[k][2n+1] (bf16 -> fp32)
inline void dpbf16ps(int c, int a, int b) {
  Tile &C = use(c), &A = use(a), &B = use(b);
  const int M = A.rows, K = A.colsb / 4, N = C.colsb / 4;
  if (C.rows != M || B.rows != K || B.colsb != C.colsb) fault("TDPBF16PS shapes do not chain");
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      float acc;
      std::memcpy(&acc, C.d[m] + 4 * n, 4);
      for (int k = 0; k < K; ++k)
        acc += bf16(A.d[m] + 4 * k) * bf16(B.d[k] + 4 * n) + bf16(A.d[m] + 4 * k + 2) * bf16(B.d[k] + 4 * n + 2);
      std::memcpy(C.d[m] + 4 * n, &acc, 4);
    }
}

}  // namespace ktemu

#undef _tile_loadd
#undef _tile_stored
#undef _tile_zero
#undef _tile_dpbssd
#undef _tile_dpbf16ps
#define _tile_loadconfig(p) ktemu::loadconfig(p)
#define _tile_release() ktemu::release()
#define _tile_loadd(t, base, stride) ktemu::loadd(t, base, stride)
#define _tile_stored(t, base, stride) ktemu::stored(t, base, stride)
#define _tile_zero(t) ktemu::zero(t)
#define _tile_dpbssd(c, a, b) ktemu::dpbssd(c, a, b)
#define _tile_dpbf16ps(c, a, b) ktemu::dpbf16ps(c, a, b)
