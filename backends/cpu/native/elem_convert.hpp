// Scalar element conversions the kernels share (bit-exact): float8 e4m3, bf16 and fp16 -> float.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace kt {

// fp16 bits -> float (every value exactly: normals, subnormals, infinities, NaN)
inline float fp16_to_f32(uint16_t h) {
  const int e = (h >> 10) & 31, m = h & 1023;
  const float mag = e == 0 ? std::ldexp(static_cast<float>(m), -24)
                    : e == 31 ? (m ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity())
                              : std::ldexp(static_cast<float>(m + 1024), e - 25);
  return (h & 0x8000) ? -mag : mag;
}
// float8 e4m3fn -> float (finite codes; quantizers never emit the NaN code)
inline float fp8_to_f32(uint8_t b) {
  const int e = (b >> 3) & 15, m = b & 7;
  const float mag = e == 0 ? static_cast<float>(m) * (1.f / 512.f)
                           : std::ldexp(1.f + static_cast<float>(m) * 0.125f, e - 7);
  return (b & 0x80) ? -mag : mag;
}

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float bf16_to_f32(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// float -> bf16 bits, round to nearest even; NaN -> the quiet NaN torch gives (c10::BFloat16)
inline uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

}  // namespace kt
