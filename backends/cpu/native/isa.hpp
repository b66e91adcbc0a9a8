// What the CPU and the OS support (CPUID, XCR0, Linux's AMX permission) and the kernel
// variants that follow from it.
#pragma once
#include <cstdint>

#include "kernels_amx.hpp"  // (and kernels.hpp): their KT_HAVE_* say which variants exist

#if defined(_MSC_VER)
#include <intrin.h>
#elif defined(KT_X86)
#include <cpuid.h>
#endif
#if defined(__linux__) && defined(KT_HAVE_AMX)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace kt {

enum Isa : uint32_t {
  ISA_AVX2 = 1u << 0, ISA_FMA = 1u << 1, ISA_AVX512F = 1u << 2, ISA_AVX512BW = 1u << 3,
  ISA_AVX512VNNI = 1u << 4, ISA_AVX512BF16 = 1u << 5, ISA_AMX_TILE = 1u << 6, ISA_AMX_INT8 = 1u << 7,
  ISA_AMX_BF16 = 1u << 8, ISA_AVX_VNNI = 1u << 9, ISA_F16C = 1u << 10,
};

#if defined(KT_X86)
static void cpuid(int leaf, int sub, unsigned r[4]) {
#if defined(_MSC_VER)
  int v[4];
  __cpuidex(v, leaf, sub);
  for (int i = 0; i < 4; ++i) r[i] = static_cast<unsigned>(v[i]);
#else
  __cpuid_count(leaf, sub, r[0], r[1], r[2], r[3]);
#endif
}
static uint64_t xgetbv0() {
#if defined(_MSC_VER)
  return _xgetbv(0);
#else
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
#endif
}
#endif

// AMX's tile data is large, so Linux (5.16+) hands it to a process only on request; until then
// the first tile instruction would fault. Windows grants it on first use.
static bool amx_permitted() {
#if defined(__linux__) && defined(KT_HAVE_AMX)
  const long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
  return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
#elif defined(KT_HAVE_AMX)
  return true;
#else
  return false;  // not compiled in (MSVC builds): never selected
#endif
}

// What the CPU supports *and* the OS saves the state of (XCR0), so no illegal instruction.
static uint32_t detect_isa() {
  uint32_t isa = 0;
#if defined(KT_X86)
  unsigned r[4];
  cpuid(0, 0, r);
  const unsigned max_leaf = r[0];
  cpuid(1, 0, r);
  const bool osxsave = (r[2] >> 27) & 1, fma = (r[2] >> 12) & 1, f16c = (r[2] >> 29) & 1;
  if (!osxsave || max_leaf < 7) return 0;
  const uint64_t xcr0 = xgetbv0();
  const bool avx_os = (xcr0 & 0x6) == 0x6, avx512_os = (xcr0 & 0xE6) == 0xE6, amx_os = (xcr0 & 0x60000) == 0x60000;
  cpuid(7, 0, r);
  const unsigned b = r[1], c = r[2], d = r[3];
  cpuid(7, 1, r);
  const unsigned a1 = r[0];
  if (avx_os && ((b >> 5) & 1)) isa |= ISA_AVX2;
  if (avx_os && fma) isa |= ISA_FMA;
  if (avx_os && f16c) isa |= ISA_F16C;
  if (avx_os && ((a1 >> 4) & 1)) isa |= ISA_AVX_VNNI;
  if (avx512_os) {
    if ((b >> 16) & 1) isa |= ISA_AVX512F;
    if ((b >> 30) & 1) isa |= ISA_AVX512BW;
    if ((c >> 11) & 1) isa |= ISA_AVX512VNNI;
    if ((a1 >> 5) & 1) isa |= ISA_AVX512BF16;
  }
  if (amx_os && ((d >> 24) & 1) && amx_permitted()) {
    isa |= ISA_AMX_TILE;
    if ((d >> 25) & 1) isa |= ISA_AMX_INT8;
    if ((d >> 22) & 1) isa |= ISA_AMX_BF16;
  }
#endif
  return isa;
}

// Variants, in order of preference from last to first. Each later one implies AVX2; avx_vnni
// (AVX2 plus the fused 256-bit integer dot products of Intel's 12th-gen+ cores and Zen 5) is
// used only when the CPU has it, so checks of the form variant >= X hold for AVX2 and AVX-512
// features; avx_vnni's int8 / int4 decode kernels (bit-identical to AVX2's) also serve the
// avx512 and amx variants on CPUs that have AVX-VNNI. amx runs prefill tiles of every format on
// AMX (kernels_amx.hpp) and everything else on the AVX-512 kernels.
enum Variant : int { VARIANT_GENERIC = 0, VARIANT_AVX2 = 1, VARIANT_AVXVNNI = 2, VARIANT_AVX512 = 3, VARIANT_AMX = 4 };
static const char* kVariantNames[] = {"generic", "avx2", "avx_vnni", "avx512", "amx"};
constexpr int kVariants = 5;

static bool variant_supported(int v, uint32_t isa) {
  const bool avx2 = (isa & ISA_AVX2) && (isa & ISA_FMA) && (isa & ISA_F16C);
  const bool avx512 = avx2 && (isa & ISA_AVX512F) && (isa & ISA_AVX512BW) && (isa & ISA_AVX512VNNI);
  const uint32_t amx = ISA_AMX_TILE | ISA_AMX_INT8 | ISA_AMX_BF16;
  switch (v) {
    case VARIANT_GENERIC: return true;
    case VARIANT_AVX2: return avx2;
#if defined(KT_HAVE_AVXVNNI)
    case VARIANT_AVXVNNI: return avx2 && (isa & ISA_AVX_VNNI);
#endif
    case VARIANT_AVX512: return avx512;
#if defined(KT_HAVE_AMX)
    case VARIANT_AMX: return avx512 && (isa & amx) == amx;
#endif
    default: return false;
  }
}

static int best_variant(uint32_t isa) {
  for (int v = kVariants - 1; v > 0; --v)
    if (variant_supported(v, isa)) return v;
  return VARIANT_GENERIC;
}

}  // namespace kt
