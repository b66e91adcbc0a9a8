// kt-core's CPU expert kernels: a C ABI over raw pointers (no libtorch, so one build
// serves every torch version), runtime ISA dispatch, a persistent thread pool.
// Python loads this module and calls it through ctypes (which releases the GIL, so
// the caller's other threads keep running while a kernel runs).
#include <Python.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "kernels.hpp"
#include "kernels_amx.hpp"  // and kernels_avx512.hpp
#include "threadpool.hpp"

#if defined(_MSC_VER)
#include <intrin.h>
#define KT_API extern "C" __declspec(dllexport)
#else
#define KT_API extern "C" __attribute__((visibility("default")))
#if defined(KT_X86)
#include <cpuid.h>
#endif
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
// features, and avx_vnni's own kernels run only when it is the variant. amx runs prefill tiles
// of bf16 / w8a8 on AMX and everything else on the AVX-512 kernels.
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

// One pool per logical CPU device: experts of cpu:0 and cpu:1 run on separate workers, so
// two shards of one layer can be computed at the same time (the hybrid executor on a CPU host).
constexpr int kMaxPools = 64;
struct State {
  uint32_t isa = detect_isa();
  int variant = best_variant(isa);
  std::unique_ptr<ThreadPool> pools[kMaxPools];
  std::mutex mu;
  ThreadPool& threads(int dev = 0) {
    std::lock_guard<std::mutex> lk(mu);
    if (!pools[dev]) pools[dev].reset(new ThreadPool(static_cast<int>(std::max(1u, std::thread::hardware_concurrency()))));
    return *pools[dev];
  }
};
static State& state() {
  // Never destroyed: at process exit the OS ends the workers. Destroying pools from a static
  // destructor while another (daemon) thread is still inside a kernel would join or destroy
  // threads under it and abort the process ("terminate called without an active exception").
  static State* s = new State;
  return *s;
}

enum Checked : int { CHECK_AVX512 = 0, CHECK_AMX = 1, CHECK_AVXVNNI = 2, CHECK_AVX512BF16 = 3 };
static bool checked_ok(int fmt, int kind);  // the kind's kernels of fmt passed their first-use check
static bool avx512_ok(int fmt) { return checked_ok(fmt, CHECK_AVX512); }
static bool amx_ok(int fmt) { return checked_ok(fmt, CHECK_AMX); }
static bool avxvnni_ok(int fmt) { return checked_ok(fmt, CHECK_AVXVNNI); }
static void quantize_rows16(const float* X, int64_t rows, int64_t ld, int64_t K, int64_t group, int16_t* q,
                            float* scale, int32_t* gsum);

static void panel_gemm(const Weight& w, int64_t p, const float* X, int64_t ldx, int64_t n, float* out) {
#if defined(KT_X86)
  if (w.fmt == FMT_BF16 || w.fmt == FMT_FP8) {  // int8 / int4 go through panel_x16
#if defined(KT_HAVE_AMX)
    if (state().variant >= VARIANT_AMX && amx_takes(w, n) && amx_ok(w.fmt) && avx512_ok(w.fmt))
      return panel_gemm_bf16_amx(w, p, X, ldx, n, out);
#endif
#if defined(KT_HAVE_AVX512BF16)
    if (state().variant >= VARIANT_AVX512 && (state().isa & ISA_AVX512BF16) && bf16dp_takes(w, n) &&
        checked_ok(w.fmt, CHECK_AVX512BF16) && avx512_ok(w.fmt))
      return panel_gemm_bf16dp_avx512(w, p, X, ldx, n, out);
#endif
    if (state().variant >= VARIANT_AVX512 && avx512_ok(w.fmt)) return panel_gemm_avx512(w, p, X, ldx, n, out);
    if (state().variant >= VARIANT_AVX2) return panel_gemm_avx2(w, p, X, ldx, n, out);
  }
#endif
  panel_gemm_generic(w, p, X, ldx, n, out);
}

static void panel_gemm_q8(const Weight& w, int64_t p, const int8_t* Xq, int64_t ldx, const float* xs, int64_t n,
                          float* out) {
#if defined(KT_X86)
#if defined(KT_HAVE_AMX)
  if (state().variant >= VARIANT_AMX && amx_takes(w, n) && amx_ok(w.fmt) && avx512_ok(w.fmt))
    return panel_gemm_q8_amx(w, p, Xq, ldx, xs, n, out);
#endif
  if (state().variant >= VARIANT_AVX512 && avx512_ok(w.fmt)) return panel_gemm_q8_avx512(w, p, Xq, ldx, xs, n, out);
#if defined(KT_HAVE_AVXVNNI)
  if (state().variant == VARIANT_AVXVNNI && avxvnni_ok(w.fmt)) return panel_gemm_q8_avxvnni(w, p, Xq, ldx, xs, n, out);
#endif
  if (state().variant >= VARIANT_AVX2) return panel_gemm_q8_avx2(w, p, Xq, ldx, xs, n, out);
#endif
  panel_gemm_q8_generic(w, p, Xq, ldx, xs, n, out);
}

#if defined(KT_X86)
static void panel_x16(const Weight& w, int64_t p, const X16& x, int64_t n, float* out) {
  if (state().variant >= VARIANT_AVX512 && avx512_ok(w.fmt)) return panel_gemm_x16_avx512(w, p, x, n, out);
#if defined(KT_HAVE_AVXVNNI)
  if (state().variant == VARIANT_AVXVNNI && avxvnni_ok(w.fmt)) return panel_gemm_x16_avxvnni(w, p, x, n, out);
#endif
  panel_gemm_x16_avx2(w, p, x, n, out);
}

// First use of an AVX-512 (amx: AMX) kernel: run it and its AVX2 twin (which the test suite
// covers on every x86 CI machine) on the same random panel; if they disagree, say so once and
// keep using the variant below for that format, so a bug can cost speed but never a wrong answer.
static bool self_check(int fmt, int kind) {
  const bool amx = kind == CHECK_AMX, vnni = kind == CHECK_AVXVNNI, dp = kind == CHECK_AVX512BF16;
  if (vnni && (fmt == FMT_BF16 || fmt == FMT_FP8)) return true;  // float formats: no avx_vnni kernels
  if (dp && fmt != FMT_BF16) return true;                       // bf16 pairs: bf16 weights only
  const int64_t K = 512, n = amx || dp ? 19 : 5, group = 32;  // amx, dp: one 16-token tile and a tail
  uint32_t seed = 12345u + static_cast<uint32_t>(fmt);
  auto rnd = [&] { seed = seed * 1664525u + 1013904223u; return seed >> 8; };
  std::vector<uint8_t> data(K * NR * 2);
  for (auto& b : data) b = static_cast<uint8_t>(rnd());
  if (fmt == FMT_FP8)
    for (auto& b : data) if ((b & 0x7F) == 0x7F) b &= 0xFE;  // no NaN codes
  if (fmt == FMT_BF16)
    for (size_t i = 1; i < data.size(); i += 2) data[i] = static_cast<uint8_t>(0x3C + (data[i] & 0x83));  // +-[2^-7, 2^2)
  if (fmt == FMT_INT8 || fmt == FMT_W8A8)
    for (auto& b : data) if (b == 0x80) b = 0x81;  // codes stay within +-127
  std::vector<float> scale(K / group * NR), zero(K / group * NR), X(n * K), a(n * NR), b(n * NR), xs(n);
  for (auto& v : scale) v = 0.001f + static_cast<float>(rnd() % 1000) * 1e-5f;
  for (auto& v : zero) v = static_cast<float>(rnd() % 16);
  for (auto& v : X) {  // bf16-exact values, as the MoE's hidden states are (AMX multiplies bf16)
    v = static_cast<float>(static_cast<int>(rnd() % 2001) - 1000) * 1e-3f;
    v = bf16_to_f32(static_cast<uint16_t>(f32_bits(v) >> 16));
  }
  for (auto& v : xs) v = 0.01f + static_cast<float>(rnd() % 100) * 1e-4f;
  Weight w;
  w.fmt = fmt;
  w.M = NR;
  w.K = K;
  w.group = fmt == FMT_INT4 || fmt == FMT_FP8 ? static_cast<int>(group) : static_cast<int>(K);
  w.data = data.data();
  w.scale = scale.data();
  w.zero = fmt == FMT_INT4 ? zero.data() : nullptr;
  if (fmt == FMT_BF16 || fmt == FMT_FP8) {
#if defined(KT_HAVE_AMX)
    if (amx) panel_gemm_bf16_amx(w, 0, X.data(), K, n, a.data());
    else
#endif
#if defined(KT_HAVE_AVX512BF16)
    if (dp) panel_gemm_bf16dp_avx512(w, 0, X.data(), K, n, a.data());
    else
#endif
      panel_gemm_avx512(w, 0, X.data(), K, n, a.data());
    panel_gemm_avx2(w, 0, X.data(), K, n, b.data());
  } else if (fmt == FMT_W8A8) {
    std::vector<int8_t> Xq(n * K);
    for (auto& v : Xq) v = static_cast<int8_t>(static_cast<int>(rnd() % 255) - 127);
#if defined(KT_HAVE_AMX)
    if (amx) panel_gemm_q8_amx(w, 0, Xq.data(), K, xs.data(), n, a.data());
    else
#endif
#if defined(KT_HAVE_AVXVNNI)
    if (vnni) panel_gemm_q8_avxvnni(w, 0, Xq.data(), K, xs.data(), n, a.data());
    else
#endif
      panel_gemm_q8_avx512(w, 0, Xq.data(), K, xs.data(), n, a.data());
    panel_gemm_q8_avx2(w, 0, Xq.data(), K, xs.data(), n, b.data());
  } else {
    std::vector<int16_t> q(n * K);
    std::vector<int32_t> gsum(n * (K / group));
    quantize_rows16(X.data(), n, K, K, fmt == FMT_INT4 ? group : 0, q.data(), xs.data(),
                    fmt == FMT_INT4 ? gsum.data() : nullptr);
    X16 x{q.data(), xs.data(), fmt == FMT_INT4 ? gsum.data() : nullptr, K, K / group};
#if defined(KT_HAVE_AVXVNNI)
    if (vnni) panel_gemm_x16_avxvnni(w, 0, x, n, a.data());
    else
#endif
      panel_gemm_x16_avx512(w, 0, x, n, a.data());
    panel_gemm_x16_avx2(w, 0, x, n, b.data());
  }
  float err = 0.f, mag = 1e-30f;
  for (int64_t i = 0; i < n * NR; ++i) {
    err = std::max(err, std::fabs(a[i] - b[i]));
    mag = std::max(mag, std::fabs(b[i]));
  }
  const bool ok = err <= 1e-4f * mag && std::isfinite(err);
  if (!ok)
    std::fprintf(stderr, "kt-core: the %s kernel for format %d disagrees with AVX2 (relative error %g); "
                 "not using it. Please report this with `kt doctor` output.\n",
                 amx ? "AMX" : vnni ? "AVX-VNNI" : dp ? "AVX512-BF16" : "AVX-512", fmt,
                 err / mag);
  return ok;
}
#endif

static bool checked_ok(int fmt, int kind) {
#if defined(KT_X86)
  static std::mutex mu;
  static std::atomic<int> verdict[4][8] = {};  // 0 unknown, 1 ok, -1 fall back
  if (fmt < 0 || fmt >= 8 || kind < 0 || kind > 3) return false;
  std::atomic<int>& v = verdict[kind][fmt];
  int known = v.load(std::memory_order_acquire);  // every panel call asks: no lock once known
  if (known == 0) {
    std::lock_guard<std::mutex> lk(mu);
    known = v.load(std::memory_order_acquire);
    if (known == 0) v.store(known = self_check(fmt, kind) ? 1 : -1, std::memory_order_release);
  }
  return known == 1;
#else
  (void)fmt;
  (void)kind;
  return false;
#endif
}

// Rows of X -> integer codes in [-qmax, qmax] and one scale per row (amax / qmax, round half to
// even); columns K..ld are zero. int8 (qmax 127) is w8a8's dynamic activation quantization, the
// same arithmetic as fake_quant_activations in Python; int16 (qmax 32767) feeds the int8 / int4
// kernels.
template <typename Q>
static void quantize_rows(const float* X, int64_t rows, int64_t ld, int64_t K, float qmax, Q* q, float* scale) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = X + r * ld;
#if defined(KT_X86)
    if (state().variant >= VARIANT_AVX2) {
      scale[r] = quantize_row_avx2<Q>(x, ld, K, qmax, q + r * ld);
      continue;
    }
#endif
    float amax = 0.f;
    for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(x[k]));
    const float s = std::max(amax, 1e-30f) / qmax;
    scale[r] = s;
    for (int64_t k = 0; k < ld; ++k)
      q[r * ld + k] = static_cast<Q>(k < K ? std::min(qmax, std::max(-qmax, std::nearbyint(x[k] / s))) : 0.f);
  }
}

// int16 rows plus, for int4 (group > 0), the sum of the codes of every group (the zero-point term)
static void quantize_rows16(const float* X, int64_t rows, int64_t ld, int64_t K, int64_t group, int16_t* q,
                            float* scale, int32_t* gsum) {
  quantize_rows<int16_t>(X, rows, ld, K, 32767.f, q, scale);
  if (!gsum) return;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < K / group; ++g) {
      int32_t sum = 0;
      for (int64_t k = g * group; k < (g + 1) * group; ++k) sum += q[r * ld + k];
      gsum[r * (K / group) + g] = sum;
    }
}

// ---------------------------------------------------------------- fused MoE
enum Activation : int { ACT_SILU = 0, ACT_GELU_TANH = 1, ACT_SWIGLU_OAI = 2 };

struct Proj {  // one projection (gate, up or down) of all local experts
  const void* data;
  const float* scale;
  const float* zero;
  const float* bias;      // [E][M] or null
  int64_t data_stride;    // bytes per expert
  int64_t param_stride;   // floats per expert in scale / zero
};

struct MoeArgs {
  int64_t T, H, I, top_k, n_local, n_global;
  int fmt, group, activation;
  const float* x;           // [T][H]
  const int64_t* ids;       // [T][top_k] global expert ids
  const float* weights;     // [T][top_k]
  const int64_t* local_of;  // [n_global] global id -> local index or -1 (ids >= n_global: not local)
  Proj gate, up, down;
  float* out;               // [T][H], overwritten
  int pool;                 // logical CPU device whose workers run it
};

static Weight weight_of(const MoeArgs& a, const Proj& p, int64_t e, int64_t M, int64_t K) {
  Weight w;
  w.fmt = a.fmt;
  w.M = M;
  w.K = K;
  w.group = a.group > 0 ? static_cast<int>(a.group) : static_cast<int>(K);  // 0: per row
  w.data = static_cast<const uint8_t*>(p.data) + e * p.data_stride;
  w.scale = p.scale ? p.scale + e * p.param_stride : nullptr;
  w.zero = p.zero ? p.zero + e * p.param_stride : nullptr;
  return w;
}

static inline float act(float g, float u, int kind) {
  if (kind == ACT_SILU) return g / (1.f + std::exp(-g)) * u;
  if (kind == ACT_GELU_TANH) {
    const float c = 0.7978845608028654f;
    return 0.5f * g * (1.f + std::tanh(c * (g + 0.044715f * g * g * g))) * u;
  }
  g = std::min(g, 7.f);
  u = std::max(std::min(u, 7.f), -7.f);
  return (u + 1.f) * g / (1.f + std::exp(-1.702f * g));
}

struct MoeScratch {  // one moe_forward call's buffers
  std::vector<float> X, A, xs, as, ts;
  std::vector<int8_t> Xq, Aq, tq8;
  std::vector<int16_t> X16q, A16q, tq16;
  std::vector<int32_t> xg, ag, tg;
};

static int moe_forward(const MoeArgs& a) {
  if (a.pool < 0 || a.pool >= kMaxPools) return -2;
  const int64_t T = a.T, H = a.H, I = a.I;
  const int64_t Pi = (I + NR - 1) / NR, Ph = (H + NR - 1) / NR, Ipad = Pi * NR;
  std::memset(a.out, 0, sizeof(float) * T * H);
  // routes per local expert
  std::vector<std::vector<int64_t>> tok(a.n_local);
  std::vector<std::vector<float>> wt(a.n_local);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t k = 0; k < a.top_k; ++k) {
      int64_t g = a.ids[t * a.top_k + k];
      if (g < 0) return -1;
      if (g >= a.n_global) continue;  // beyond the local map: an expert another device holds
      int64_t e = a.local_of[g];
      if (e < 0) continue;
      tok[e].push_back(t);
      wt[e].push_back(a.weights[t * a.top_k + k]);
    }
  std::vector<int64_t> active, xoff;  // active experts and their row offset in the gathered X / A
  int64_t rows = 0;
  for (int64_t e = 0; e < a.n_local; ++e)
    if (!tok[e].empty()) {
      active.push_back(e);
      xoff.push_back(rows);
      rows += static_cast<int64_t>(tok[e].size());
    }
  if (active.empty()) return 0;
  // Buffers kept by the calling thread between calls: a prefill chunk needs tens of MB, and
  // fresh pages cost a fault each (in a VM that was ~7% of a 512-token call).
  thread_local MoeScratch sc;
  std::vector<float>&X = sc.X, &A = sc.A, &xs = sc.xs, &as = sc.as, &ts = sc.ts;
  std::vector<int8_t>&Xq = sc.Xq, &Aq = sc.Aq;
  std::vector<int16_t>&X16q = sc.X16q, &A16q = sc.A16q;
  std::vector<int32_t>&xg = sc.xg, &ag = sc.ag;
  A.assign(rows * Ipad, 0.f);
  ThreadPool& pool = state().threads(a.pool);
  const bool q8 = a.fmt == FMT_W8A8;
#if defined(KT_X86)
  const bool x16 = (a.fmt == FMT_INT8 || a.fmt == FMT_INT4) && state().variant >= VARIANT_AVX2;
#else
  const bool x16 = false;
#endif
  const int64_t grp = a.fmt == FMT_INT4 ? a.group : 0, G1 = grp ? H / grp : 0, G2 = grp ? I / grp : 0;
  // The rows each active expert takes, gathered contiguous; integer formats quantize each token
  // once (not once per route) and gather its codes.
  auto gather = [&](auto* dst, const auto* src, int64_t width) {
    for (size_t ai = 0; ai < active.size(); ++ai)
      for (size_t r = 0; r < tok[active[ai]].size(); ++r)
        std::memcpy(dst + (xoff[ai] + r) * width, src + tok[active[ai]][r] * width, sizeof(*dst) * width);
  };
  ts.resize(T);
  if (q8) {  // activations to int8 per token
    std::vector<int8_t>& tq = sc.tq8;
    tq.resize(T * H);
    pool.run(T, [&](int64_t t) { quantize_rows<int8_t>(a.x + t * H, 1, H, H, 127.f, &tq[t * H], &ts[t]); });
    Xq.resize(rows * H);
    xs.resize(rows);
    gather(Xq.data(), tq.data(), H);
    gather(xs.data(), ts.data(), 1);
  } else if (x16) {  // activations to int16 per token
    std::vector<int16_t>& tq = sc.tq16;
    std::vector<int32_t>& tg = sc.tg;
    tq.resize(T * H);
    tg.resize(T * G1 + 1);
    pool.run(T, [&](int64_t t) {
      quantize_rows16(a.x + t * H, 1, H, H, grp, &tq[t * H], &ts[t], grp ? &tg[t * G1] : nullptr);
    });
    X16q.resize(rows * H);
    xs.resize(rows);
    xg.resize(rows * G1 + 1);
    gather(X16q.data(), tq.data(), H);
    gather(xs.data(), ts.data(), 1);
    if (grp) gather(xg.data(), tg.data(), G1);
  } else {
    X.resize(rows * H);
    gather(X.data(), a.x, H);
  }
  // Items cover runs of consecutive panels of one expert, so each reads one long contiguous
  // stream (short streams leave the hardware prefetchers cold: int4 panels are only 1-6 KB);
  // about 8 items per worker keep the load balanced.
  const int64_t per_worker = 8 * static_cast<int64_t>(pool.size());
  const int64_t n_active = static_cast<int64_t>(active.size());
  const int64_t pb1 = std::max<int64_t>(1, std::min<int64_t>(Pi, n_active * Pi / per_worker));
  const int64_t blocks1 = (Pi + pb1 - 1) / pb1;
  const bool silu_fast = a.activation == ACT_SILU && !a.gate.bias && !a.up.bias && state().variant >= VARIANT_AVX2;
  // stage 1: gate and up panels -> activation, item = (active expert, run of panels of I)
  pool.run(n_active * blocks1, [&](int64_t item) {
    const int64_t ai = item / blocks1, e = active[ai], n = static_cast<int64_t>(tok[e].size());
    thread_local std::vector<float> g, u;  // per-thread scratch: no allocation per item
    if (static_cast<int64_t>(g.size()) < n * NR) {
      g.resize(n * NR);
      u.resize(n * NR);
    }
    for (int64_t p = (item % blocks1) * pb1; p < std::min(Pi, (item % blocks1 + 1) * pb1); ++p) {
    if (q8) {
      panel_gemm_q8(weight_of(a, a.gate, e, I, H), p, &Xq[xoff[ai] * H], H, &xs[xoff[ai]], n, g.data());
      panel_gemm_q8(weight_of(a, a.up, e, I, H), p, &Xq[xoff[ai] * H], H, &xs[xoff[ai]], n, u.data());
#if defined(KT_X86)
    } else if (x16) {
      X16 xv{&X16q[xoff[ai] * H], &xs[xoff[ai]], grp ? &xg[xoff[ai] * G1] : nullptr, H, G1};
      panel_x16(weight_of(a, a.gate, e, I, H), p, xv, n, g.data());
      panel_x16(weight_of(a, a.up, e, I, H), p, xv, n, u.data());
#endif
    } else {
      panel_gemm(weight_of(a, a.gate, e, I, H), p, &X[xoff[ai] * H], H, n, g.data());
      panel_gemm(weight_of(a, a.up, e, I, H), p, &X[xoff[ai] * H], H, n, u.data());
    }
#if defined(KT_X86)
    if (silu_fast && p * NR + NR <= I) {
      for (int64_t r = 0; r < n; ++r) silu_mul16_avx2(&g[r * NR], &u[r * NR], &A[(xoff[ai] + r) * Ipad + p * NR]);
      continue;
    }
#endif
    for (int64_t r = 0; r < n; ++r)
      for (int j = 0; j < NR && p * NR + j < I; ++j) {
        float gv = g[r * NR + j], uv = u[r * NR + j];
        if (a.gate.bias) gv += a.gate.bias[e * I + p * NR + j];
        if (a.up.bias) uv += a.up.bias[e * I + p * NR + j];
        A[(xoff[ai] + r) * Ipad + p * NR + j] = act(gv, uv, a.activation);
      }
    }
  });
  if (q8) {
    Aq.resize(rows * Ipad);
    as.resize(rows);
    pool.run(rows, [&](int64_t r) { quantize_rows<int8_t>(&A[r * Ipad], 1, Ipad, I, 127.f, &Aq[r * Ipad], &as[r]); });
  } else if (x16) {
    A16q.resize(rows * Ipad);
    as.resize(rows);
    ag.resize(rows * G2 + 1);
    pool.run(rows, [&](int64_t r) {
      quantize_rows16(&A[r * Ipad], 1, Ipad, I, grp, &A16q[r * Ipad], &as[r], grp ? &ag[r * G2] : nullptr);
    });
  }
  // stage 2: down panels, item = run of panels of H (owns those output columns: no races)
  const int64_t pb2 = std::max<int64_t>(1, Ph / per_worker), blocks2 = (Ph + pb2 - 1) / pb2;
  pool.run(blocks2, [&](int64_t b) {
    thread_local std::vector<float> y;
    for (size_t ai = 0; ai < active.size(); ++ai)
    for (int64_t q = b * pb2; q < std::min(Ph, (b + 1) * pb2); ++q) {
      const int64_t e = active[ai], n = static_cast<int64_t>(tok[e].size());
      if (static_cast<int64_t>(y.size()) < n * NR) y.resize(n * NR);
      if (q8)
        panel_gemm_q8(weight_of(a, a.down, e, H, I), q, &Aq[xoff[ai] * Ipad], Ipad, &as[xoff[ai]], n, y.data());
#if defined(KT_X86)
      else if (x16)
        panel_x16(weight_of(a, a.down, e, H, I), q,
                            X16{&A16q[xoff[ai] * Ipad], &as[xoff[ai]], grp ? &ag[xoff[ai] * G2] : nullptr, Ipad, G2},
                            n, y.data());
#endif
      else
        panel_gemm(weight_of(a, a.down, e, H, I), q, &A[xoff[ai] * Ipad], Ipad, n, y.data());
      for (int64_t r = 0; r < n; ++r) {
        float* o = a.out + tok[e][r] * H;
        const float w = wt[e][r];
        for (int j = 0; j < NR && q * NR + j < H; ++j) {
          float v = y[r * NR + j];
          if (a.down.bias) v += a.down.bias[e * H + q * NR + j];
          o[q * NR + j] += w * v;
        }
      }
    }
  });
  return 0;
}

// out[T][M] = x[T][K] . W[M][K]^T (+ bias), W bf16 row-major; items = blocks of 32 rows.
static int linear_bf16(const float* x, int64_t T, int64_t K, const uint16_t* w, int64_t M, const float* bias,
                       float* out) {
  const int64_t RB = 32, blocks = (M + RB - 1) / RB;
  const bool avx2 = state().variant >= VARIANT_AVX2;
  state().threads().run(blocks, [&](int64_t b) {
    const int64_t r0 = b * RB, r1 = std::min(M, r0 + RB);
    int64_t r = r0;
#if defined(KT_X86)
    if (avx2 && T == 1)  // decode: 4 rows per pass
      for (; r + 4 <= r1; r += 4) dense_quad_avx2(w + r * K, K, x, out + r);
#endif
    for (; r < r1; r += 2) {
      const uint16_t* w0 = w + r * K;
      const uint16_t* w1 = (r + 1 < r1) ? w0 + K : w0;  // odd tail: compute row r twice, keep one
      float tail;
      float* o1 = (r + 1 < r1) ? out + r + 1 : &tail;
      const int64_t ldo1 = (r + 1 < r1) ? M : 0;
#if defined(KT_X86)
      if (avx2) {
        if (ldo1) dense_pair_avx2(w0, w1, x, T, K, out + r, o1, M);
        else for (int64_t t = 0; t < T; ++t) dense_pair_avx2(w0, w1, x + t * K, 1, K, out + t * M + r, &tail, 0);
      } else
#endif
      {
        (void)avx2;
        if (ldo1) dense_pair_generic(w0, w1, x, T, K, out + r, o1, M);
        else for (int64_t t = 0; t < T; ++t) dense_pair_generic(w0, w1, x + t * K, 1, K, out + t * M + r, &tail, 0);
      }
    }
    if (bias)
      for (int64_t t = 0; t < T; ++t)
        for (int64_t r = r0; r < r1; ++r) out[t * M + r] += bias[r];
  });
  return 0;
}

}  // namespace kt

// ---------------------------------------------------------------- C ABI (ctypes)
KT_API int kt_abi_version() { return 6; }
KT_API uint32_t kt_isa() { return kt::state().isa; }
KT_API const char* kt_variant() { return kt::kVariantNames[kt::state().variant]; }
KT_API int kt_set_variant(const char* name) {
  for (int v = 0; v < kt::kVariants; ++v)
    if (std::strcmp(name, kt::kVariantNames[v]) == 0) {
      if (!kt::variant_supported(v, kt::state().isa)) return -1;  // never run what the CPU lacks
      kt::state().variant = v;
      return 0;
    }
  return -2;
}
// 1: this CPU (and build) can run the variant, 0: it cannot, -2: no such variant
KT_API int kt_variant_supported(const char* name) {
  for (int v = 0; v < kt::kVariants; ++v)
    if (std::strcmp(name, kt::kVariantNames[v]) == 0) return kt::variant_supported(v, kt::state().isa) ? 1 : 0;
  return -2;
}
KT_API void kt_set_threads(int n) { kt::state().threads().resize(n); }
KT_API int kt_threads() { return kt::state().threads().size(); }
KT_API int kt_set_pool_threads(int pool, int n) {
  if (pool < 0 || pool >= kt::kMaxPools) return -1;
  kt::state().threads(pool).resize(n);
  return 0;
}
KT_API int kt_pool_threads(int pool) {
  if (pool < 0 || pool >= kt::kMaxPools) return -1;
  return kt::state().threads(pool).size();
}
KT_API int kt_moe_forward(const kt::MoeArgs* args) { return kt::moe_forward(*args); }
KT_API int kt_linear_bf16(const float* x, int64_t T, int64_t K, const uint16_t* w, int64_t M, const float* bias,
                          float* out) {
  return kt::linear_bf16(x, T, K, w, M, bias, out);
}
KT_API int64_t kt_moe_args_size() { return static_cast<int64_t>(sizeof(kt::MoeArgs)); }

// Multi-threaded streaming read over a buffer of n floats, `iters` times; returns GB/s.
KT_API double kt_membw(const float* buf, int64_t n, int iters) {
  kt::ThreadPool& pool = kt::state().threads();
  const int64_t parts = pool.size();
  std::vector<float> sink(parts, 0.f);
  auto run_once = [&] {
    pool.run(parts, [&](int64_t i) {
      const int64_t lo = n * i / parts, hi = n * (i + 1) / parts;
#if defined(KT_X86)
      sink[i] += kt::state().variant >= kt::VARIANT_AVX2 ? kt::stream_sum_avx2(buf + lo, hi - lo)
                                                          : kt::stream_sum_generic(buf + lo, hi - lo);
#else
      sink[i] += kt::stream_sum_generic(buf + lo, hi - lo);
#endif
    });
  };
  run_once();  // warm-up: page in, spin up workers
  auto t0 = std::chrono::steady_clock::now();
  for (int it = 0; it < iters; ++it) run_once();
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  volatile float keep = 0;
  for (float v : sink) keep = keep + v;
  return static_cast<double>(n) * sizeof(float) * iters / s / 1e9;
}

// A CPython module so setuptools builds and names it like any extension; the functions
// above are reached through ctypes on this same file.
static struct PyModuleDef kt_module = {PyModuleDef_HEAD_INIT, "_kt_cpu", "kt-core CPU kernels (C ABI via ctypes)",
                                       -1, nullptr, nullptr, nullptr, nullptr, nullptr};
PyMODINIT_FUNC PyInit__kt_cpu(void) { return PyModule_Create(&kt_module); }
