// A console self-test of the native CPU kernels as a shared library: it loads the library at run
// time (LoadLibrary / GetProcAddress on Windows, dlopen / dlsym elsewhere), so it exercises the
// library's real exports, its CPU feature detection and its thread pools, never a copy compiled
// into this program. tests/native/build_windows.py cross-builds kt_cpu.dll and this program with
// MinGW and runs it under wine.
//
// For every kernel variant the CPU (and the build) supports it runs kt_moe_forward on
// deterministic pseudo-random weights, packed here in the panel layouts of
// backends/cpu/native/kernels.hpp (the same layouts backends/cpu/native.py packs), for every
// format, two shapes and T = 1, 7, 37 tokens, and compares:
//   - the generic variant with a float64 reference computed here from the unpacked weights (this
//     checks the packing, the routing and the generic kernels);
//   - every other variant with the generic one, within the bound of the path it takes
//     (tests/conformance/tolerances.py, NATIVE_MOE); except int8 / int4, whose SIMD kernels take
//     the activations as int16 codes: with a float64 model of those codes (5e-5, a tighter check
//     of their arithmetic) and with generic within twice the documented 1e-4, which that rounding
//     alone reaches on this data (1.01e-4 in one case);
//   - a repeated call with the first (same variant, same result: bit for bit), the call on thread
//     pool 1 (2 workers) with the one on pool 0 (3), and, at T = 37, both at once from two threads
//     (the hybrid executor's pattern) with the same calls made one at a time (bit for bit).
// One line per case, "ok <variant> <fmt> T=<n> ..." or "FAIL <variant> <fmt> T=<n> ...", and exit
// status 1 on any failure.
//
// Each variant runs in a child process (this program, run again with --variant), so an illegal
// instruction or a hang in one variant is reported as that variant's failure and the others still
// run.
//
// usage: kt_selftest [path/to/kt_cpu.dll] [--variant NAME] [--timeout SECONDS] [--seed N]
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#if defined(_WIN32)
#include <windows.h>
#else
#include <dlfcn.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
#endif

namespace {

// ---------------------------------------------------------------- the library's C ABI
// Copies of moe_forward.inc's argument structs; kt_moe_args_size() must agree with sizeof.
struct Proj {
  const void* data;
  const float* scale;
  const float* zero;
  const float* bias;
  int64_t data_stride;
  int64_t param_stride;
};

struct MoeArgs {
  int64_t T, H, I, top_k, n_local, n_global;
  int fmt, group, activation;
  const float* x;
  const int64_t* ids;
  const float* weights;
  const int64_t* local_of;
  Proj gate, up, down;
  float* out;
  int pool;
  int round_bf16;
  int down_fmt, down_group;
};

enum Fmt : int { FMT_BF16 = 0, FMT_INT8 = 1, FMT_INT4 = 2, FMT_FP8 = 3, FMT_W8A8 = 4 };
enum Act : int { ACT_SILU = 0, ACT_GELU_TANH = 1, ACT_SWIGLU_OAI = 2, ACT_SILU_CLAMP10 = 3 };
constexpr int NR = 16;
const char* const kVariants[] = {"generic", "avx2", "avx_vnni", "avx512", "amx"};

struct Lib {
  int (*abi_version)();
  uint32_t (*isa)();
  const char* (*variant)();
  int (*set_variant)(const char*);
  int (*variant_supported)(const char*);
  void (*set_threads)(int);
  int (*threads)();
  int (*set_pool_threads)(int, int);
  int (*moe_forward)(const MoeArgs*);
  int64_t (*moe_args_size)();
  int (*bf16_tile_tokens)(const char*, int);
};

#if defined(_WIN32)
using Handle = HMODULE;
static Handle open_lib(const char* path) { return LoadLibraryA(path); }
static void* symbol(Handle h, const char* name) { return reinterpret_cast<void*>(GetProcAddress(h, name)); }
static std::string load_error() { return "error " + std::to_string(GetLastError()); }
#else
using Handle = void*;
static Handle open_lib(const char* path) { return dlopen(path, RTLD_LAZY | RTLD_LOCAL); }
static void* symbol(Handle h, const char* name) { return dlsym(h, name); }
static std::string load_error() {
  const char* e = dlerror();
  return e ? e : "unknown error";
}
#endif

template <typename F>
static bool bind(Handle h, const char* name, F& f) {
  void* p = symbol(h, name);
  if (!p) {
    std::printf("FAIL load: the library does not export %s\n", name);
    return false;
  }
  std::memcpy(&f, &p, sizeof p);
  return true;
}

static bool load(const char* path, Lib& lib) {
  Handle h = open_lib(path);
  if (!h) {
    std::printf("FAIL load: cannot load %s (%s)\n", path, load_error().c_str());
    return false;
  }
  bool ok = bind(h, "kt_abi_version", lib.abi_version) & bind(h, "kt_isa", lib.isa) &
            bind(h, "kt_variant", lib.variant) & bind(h, "kt_set_variant", lib.set_variant) &
            bind(h, "kt_variant_supported", lib.variant_supported) & bind(h, "kt_set_threads", lib.set_threads) &
            bind(h, "kt_threads", lib.threads) & bind(h, "kt_set_pool_threads", lib.set_pool_threads) &
            bind(h, "kt_moe_forward", lib.moe_forward) & bind(h, "kt_moe_args_size", lib.moe_args_size) &
            bind(h, "kt_bf16_tile_tokens", lib.bf16_tile_tokens);
  if (ok && lib.moe_args_size() != static_cast<int64_t>(sizeof(MoeArgs))) {
    std::printf("FAIL load: kt_moe_args_size() is %lld, this program's MoeArgs is %lld bytes\n",
                static_cast<long long>(lib.moe_args_size()), static_cast<long long>(sizeof(MoeArgs)));
    ok = false;
  }
  return ok;
}

// ---------------------------------------------------------------- numbers
struct Rng {  // deterministic on every platform and compiler (no std:: distributions)
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 1) {}
  uint32_t next() {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    return static_cast<uint32_t>(s >> 33);
  }
  float uniform() { return static_cast<float>(next() >> 8) * (1.f / 8388608.f) * 2.f - 1.f; }  // [-1, 1)
  uint32_t below(uint32_t n) { return next() % n; }
};

static uint16_t bf16_bits(float f) {  // round to nearest even (finite inputs)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

static float bf16_value(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

static double fp8_value(uint8_t b) {  // float8 e4m3fn, finite codes
  const int e = (b >> 3) & 15, m = b & 7;
  const double mag = e == 0 ? m / 512.0 : std::ldexp(1.0 + m / 8.0, e - 7);
  return (b & 0x80) ? -mag : mag;
}

// ---------------------------------------------------------------- weights
// One projection of all local experts, M rows x K inputs each: the values the kernels should
// compute with (W, float64, row-major, per expert) and the packed form the library reads.
struct PackedProj {
  std::vector<double> W;             // [E][M][K]
  std::vector<uint8_t> data;         // [E][data_stride] bytes
  std::vector<float> scale, zero, bias;
  int64_t data_stride = 0, param_stride = 0;
  Proj abi() const {
    return Proj{data.data(), scale.empty() ? nullptr : scale.data(), zero.empty() ? nullptr : zero.data(),
                bias.empty() ? nullptr : bias.data(), data_stride, param_stride};
  }
};

struct Config {
  const char* name;  // format name as printed (the kernels' format, plus a variant of it)
  int fmt;
  int group;         // 0: per row (bf16, int8, w8a8, fp8 per row); int8 may have groups too
  bool zeros;        // int4: asymmetric (zero points)
};

static PackedProj pack_proj(const Config& c, int64_t E, int64_t M, int64_t K, bool with_bias, Rng& rng) {
  PackedProj p;
  const int64_t P = (M + NR - 1) / NR, g = c.group > 0 ? c.group : K, G = K / g;
  p.W.assign(E * M * K, 0.0);
  const float amp = 1.f / std::sqrt(static_cast<float>(K));
  switch (c.fmt) {
    case FMT_BF16: p.data_stride = P * K * NR * 2; break;
    case FMT_INT4: p.data_stride = P * K * NR / 2; break;
    default: p.data_stride = P * K * NR; break;  // int8, w8a8, fp8: a byte per weight
  }
  p.data.assign(E * p.data_stride, 0);  // padding rows stay zero
  if (c.fmt == FMT_W8A8) p.param_stride = P * NR;
  if (c.fmt == FMT_INT8 || c.fmt == FMT_INT4 || c.fmt == FMT_FP8) p.param_stride = P * G * NR;
  if (p.param_stride) p.scale.assign(E * p.param_stride, 0.f);
  if (c.fmt == FMT_INT4 && c.zeros) p.zero.assign(E * p.param_stride, 0.f);
  for (int64_t e = 0; e < E; ++e) {
    uint8_t* d = p.data.data() + e * p.data_stride;
    float* sc = p.scale.empty() ? nullptr : p.scale.data() + e * p.param_stride;
    float* zp = p.zero.empty() ? nullptr : p.zero.data() + e * p.param_stride;
    for (int64_t r = 0; r < M; ++r) {
      const int64_t pp = r / NR, j = r % NR;
      double* w = &p.W[(e * M + r) * K];
      if (c.fmt == FMT_BF16) {
        for (int64_t k = 0; k < K; ++k) {
          const uint16_t b = bf16_bits(rng.uniform() * amp);
          std::memcpy(d + ((pp * K + k) * NR + j) * 2, &b, 2);
          w[k] = bf16_value(b);
        }
      } else if (c.fmt == FMT_INT8 || c.fmt == FMT_W8A8) {
        float s = 0.f;
        for (int64_t k = 0; k < K; ++k) {
          if (k % g == 0) {  // a scale per group (int8 per row: one group of K)
            s = amp / 64.f * (0.5f + 0.5f * (rng.uniform() + 1.f));
            sc[(pp * G + k / g) * NR + j] = s;
          }
          const int q = static_cast<int>(rng.below(255)) - 127;  // codes in [-127, 127]
          const int64_t at = c.fmt == FMT_INT8 ? ((pp * (K / 2) + k / 2) * NR + j) * 2 + (k & 1)
                                               : ((pp * (K / 4) + k / 4) * NR + j) * 4 + (k & 3);
          d[at] = static_cast<uint8_t>(static_cast<int8_t>(q));
          w[k] = static_cast<double>(q) * s;
        }
      } else if (c.fmt == FMT_FP8) {
        for (int64_t gi = 0; gi < G; ++gi) {
          const float s = amp / 8.f * (0.5f + 0.5f * (rng.uniform() + 1.f));
          sc[(pp * G + gi) * NR + j] = s;
          for (int64_t k = gi * g; k < (gi + 1) * g; ++k) {
            uint8_t b = static_cast<uint8_t>(rng.next());
            b = static_cast<uint8_t>((b & 0x87) | (((b >> 3) & 7) + 4) << 3);  // exponent 4..11: |v| in [2^-3, 2^5)
            d[(pp * K + k) * NR + j] = b;
            w[k] = fp8_value(b) * s;
          }
        }
      } else {  // int4: word (pp, k/4, 2l+e) holds row l + 8h, input 4q + 2s + e in nibble h + 2s
        const int l = static_cast<int>(j % 8), h = static_cast<int>(j / 8);
        for (int64_t gi = 0; gi < G; ++gi) {
          const float s = amp / 4.f * (0.5f + 0.5f * (rng.uniform() + 1.f));
          const float z = zp ? static_cast<float>(rng.below(16)) : 8.f;
          sc[(pp * G + gi) * NR + j] = s;
          if (zp) zp[(pp * G + gi) * NR + j] = z;
          for (int64_t k = gi * g; k < (gi + 1) * g; ++k) {
            const int q = static_cast<int>(rng.below(16));
            const int s2 = static_cast<int>(k >> 1) & 1, ee = static_cast<int>(k & 1);
            uint8_t* word = d + ((pp * (K / 4) + k / 4) * NR + 2 * l + ee) * 2;  // little-endian uint16
            const int nib = h + 2 * s2;
            word[nib / 2] = static_cast<uint8_t>(word[nib / 2] | (q << (4 * (nib % 2))));
            w[k] = (static_cast<double>(q) - z) * s;
          }
        }
      }
    }
  }
  if (with_bias) {
    p.bias.resize(E * M);
    for (auto& b : p.bias) b = 0.1f * rng.uniform();
  }
  return p;
}

// ---------------------------------------------------------------- the float64 reference
static double act(double g, double u, int kind) {
  if (kind == ACT_SILU) return g / (1.0 + std::exp(-g)) * u;
  if (kind == ACT_GELU_TANH) return 0.5 * g * (1.0 + std::tanh(0.7978845608028654 * (g + 0.044715 * g * g * g))) * u;
  if (kind == ACT_SILU_CLAMP10) return act(std::min(g, 10.0), std::max(std::min(u, 10.0), -10.0), ACT_SILU);
  g = std::min(g, 7.0);
  u = std::max(std::min(u, 7.0), -7.0);
  return (u + 1.0) * g / (1.0 + std::exp(-1.702 * g));
}

// Run-time activation quantization as the kernels do it (quantize_rows in kt_cpu.cpp: float32
// amax / qmax per row, round half to even): int8 codes for w8a8 on every variant, int16 codes for
// int8 / int4 on the SIMD variants. The reference then multiplies the same codes, so it differs
// from the kernels only by float32 summation (and a code on a float32-vs-float64 tie).
static void fake_quant(std::vector<double>& v, float qmax) {
  float amax = 0.f;
  for (double x : v) amax = std::max(amax, std::fabs(static_cast<float>(x)));
  const float s = std::max(amax, 1e-30f) / qmax;
  for (double& x : v)
    x = std::min(qmax, std::max(-qmax, std::nearbyint(static_cast<float>(x) / s))) * static_cast<double>(s);
}

enum Acts { ACTS_FLOAT, ACTS_INT8, ACTS_INT16 };  // what the modelled path feeds the weights

struct Problem {
  int64_t T, H, I, top_k, E, n_global;
  int act;
  std::vector<float> x, wts;
  std::vector<int64_t> ids, local_of;
  PackedProj gate, up, down;
  Config cfg;
};

static std::vector<double> reference(const Problem& p, Acts acts) {
  std::vector<double> out(p.T * p.H, 0.0);
  const float qmax = acts == ACTS_INT8 ? 127.f : 32767.f;
  const bool q = acts != ACTS_FLOAT;
  for (int64_t t = 0; t < p.T; ++t)
    for (int64_t k = 0; k < p.top_k; ++k) {
      const int64_t gid = p.ids[t * p.top_k + k];
      if (gid >= p.n_global || p.local_of[gid] < 0) continue;
      const int64_t e = p.local_of[gid];
      std::vector<double> x(p.x.begin() + t * p.H, p.x.begin() + (t + 1) * p.H), a(p.I);
      if (q) fake_quant(x, qmax);
      for (int64_t i = 0; i < p.I; ++i) {
        double g = 0, u = 0;
        for (int64_t h = 0; h < p.H; ++h) {
          g += p.gate.W[(e * p.I + i) * p.H + h] * x[h];
          u += p.up.W[(e * p.I + i) * p.H + h] * x[h];
        }
        if (!p.gate.bias.empty()) g += p.gate.bias[e * p.I + i];
        if (!p.up.bias.empty()) u += p.up.bias[e * p.I + i];
        a[i] = act(static_cast<float>(g), static_cast<float>(u), p.act);
      }
      if (q) fake_quant(a, qmax);
      for (int64_t h = 0; h < p.H; ++h) {
        double y = 0;
        for (int64_t i = 0; i < p.I; ++i) y += p.down.W[(e * p.H + h) * p.I + i] * a[i];
        if (!p.down.bias.empty()) y += p.down.bias[e * p.H + h];
        out[t * p.H + h] += static_cast<double>(p.wts[t * p.top_k + k]) * y;
      }
    }
  return out;
}

// Four local experts (global ids 1, 3, 4, 6 of 8) and routes that also go to an expert another
// device holds (global 2: local_of -1) and to one past the local map (global 9): top 4 of these
// 6 per token, so at T = 37 every local expert gets ~25 tokens (the 16-token AMX / AVX512-BF16
// tiles and a tail), at T = 7 a handful, at T = 1 one.
static Problem make_problem(const Config& cfg, int64_t T, int64_t H, int64_t I, int activation, bool bias,
                            uint64_t seed) {
  Problem p;
  Rng rng(seed);
  p.T = T;
  p.H = H;
  p.I = I;
  p.top_k = 4;
  p.E = 4;
  p.n_global = 8;
  p.act = activation;
  p.cfg = cfg;
  p.local_of = {-1, 0, -1, 1, 2, -1, 3, -1};
  p.gate = pack_proj(cfg, p.E, I, H, bias, rng);
  p.up = pack_proj(cfg, p.E, I, H, bias, rng);
  p.down = pack_proj(cfg, p.E, H, I, bias, rng);
  p.x.resize(T * H);
  for (auto& v : p.x) v = bf16_value(bf16_bits(rng.uniform()));  // bf16-exact, as a bf16 model's hidden states
  const int64_t pool[6] = {1, 3, 4, 6, 2, 9};
  for (int64_t t = 0; t < T; ++t) {
    int64_t order[6];
    std::copy(pool, pool + 6, order);
    for (int i = 5; i > 0; --i) std::swap(order[i], order[rng.below(static_cast<uint32_t>(i + 1))]);
    for (int64_t k = 0; k < p.top_k; ++k) {
      p.ids.push_back(order[k]);
      p.wts.push_back(0.25f + 0.5f * (rng.uniform() + 1.f) * 0.5f);
    }
  }
  return p;
}

static int64_t max_tokens_per_expert(const Problem& p) {
  int64_t n[4] = {0, 0, 0, 0};
  for (int64_t gid : p.ids)
    if (gid < p.n_global && p.local_of[gid] >= 0) ++n[p.local_of[gid]];
  return *std::max_element(n, n + 4);
}

static int call(const Lib& lib, const Problem& p, int pool, std::vector<float>& out) {
  out.assign(p.T * p.H, std::nanf(""));
  MoeArgs a{};
  a.T = p.T;
  a.H = p.H;
  a.I = p.I;
  a.top_k = p.top_k;
  a.n_local = p.E;
  a.n_global = p.n_global;
  a.fmt = p.cfg.fmt;
  a.group = p.cfg.group;
  a.activation = p.act;
  a.x = p.x.data();
  a.ids = p.ids.data();
  a.weights = p.wts.data();
  a.local_of = p.local_of.data();
  a.gate = p.gate.abi();
  a.up = p.up.abi();
  a.down = p.down.abi();
  a.out = out.data();
  a.pool = pool;
  a.round_bf16 = 1;  // x holds bf16 values: the tile kernels may take it
  a.down_fmt = p.cfg.fmt;  // one format for all three (tests/unit/test_native.py mixes them)
  a.down_group = p.cfg.group;
  return lib.moe_forward(&a);
}

// max |a - b| / max |b|, as tests/conformance/tolerances.py measures
template <typename A, typename B>
static double rel_err(const std::vector<A>& a, const std::vector<B>& b) {
  double err = 0, mag = 1e-30;
  for (size_t i = 0; i < b.size(); ++i) {
    const double d = std::fabs(static_cast<double>(a[i]) - static_cast<double>(b[i]));
    err = std::isnan(d) ? INFINITY : std::max(err, d);
    mag = std::max(mag, std::fabs(static_cast<double>(b[i])));
  }
  return err / mag;
}

// Whether some expert of this call takes a kernel that rounds to bf16 (AMX tiles, AVX512-BF16
// pairs): from the library's own token count (kt_bf16_tile_tokens)
static bool bf16_tiles(const Lib& lib, int fmt, const std::string& variant, int64_t tokens_per_expert) {
  const int least = lib.bf16_tile_tokens(variant.c_str(), fmt);
  return fmt != FMT_W8A8 && least > 0 && tokens_per_expert >= least;
}

// tests/conformance/tolerances.py NATIVE_MOE, by the path the call takes (bf16 hidden states)
static double tolerance(const Lib& lib, int fmt, const std::string& variant, int64_t tokens_per_expert) {
  if (fmt == FMT_W8A8) return 5e-3;  // run-time int8 activations: one rounding flip of a code
  if (bf16_tiles(lib, fmt, variant, tokens_per_expert)) return 1e-2;  // activations rounded to bf16
  if ((fmt == FMT_INT8 || fmt == FMT_INT4) && variant != "generic") return 1e-4;  // int16 activation codes
  return 2e-5;    // float32 accumulation; summation order only
}

static int failures = 0;
static uint64_t seed_base = 0;  // --seed: other pseudo-random data, same cases

static void report(bool ok, const std::string& variant, const char* fmt, int64_t T, const std::string& what) {
  std::printf("%s %s %s T=%lld %s\n", ok ? "ok" : "FAIL", variant.c_str(), fmt, static_cast<long long>(T),
              what.c_str());
  std::fflush(stdout);
  if (!ok) ++failures;
}

static std::string fmt_err(const char* label, double err, double tol) {
  char buf[96];
  std::snprintf(buf, sizeof buf, "%s=%.2e (bound %.0e)", label, err, tol);
  return buf;
}

// One variant, every format, shape and token count; returns the number of failures.
static int run_variant(const Lib& lib, const std::string& variant) {
  const Config configs[] = {
      {"bf16", FMT_BF16, 0, false}, {"int8", FMT_INT8, 0, false}, {"int8", FMT_INT8, 32, false},
      {"int4", FMT_INT4, 32, true},
      {"int4", FMT_INT4, 32, false}, {"w8a8", FMT_W8A8, 0, false}, {"fp8", FMT_FP8, 32, false},
      {"fp8", FMT_FP8, 0, false},
  };
  struct Shape {
    int64_t H, I;
    int act;
    bool bias;
    int small_group;  // int4 / fp8 group for this shape (must divide H and I)
  };
  // 128 x 64: every tile path (K % 64 for AMX w8a8); 96 x 40: padded panels, odd tails, biases and
  // the activation without the SIMD SiLU
  const Shape shapes[] = {{128, 64, ACT_SILU, false, 32}, {96, 40, ACT_SWIGLU_OAI, true, 8}};
  lib.set_threads(3);  // more workers than this machine may have cores: the pool's waits matter
  lib.set_pool_threads(1, 2);
  for (const Config& base : configs)
    for (const Shape& sh : shapes)
      for (int64_t T : {1, 7, 37}) {
        Config cfg = base;
        if (cfg.group > 0) cfg.group = sh.small_group;
        const uint64_t seed = seed_base * 7919u + static_cast<uint64_t>(cfg.fmt * 1000 + cfg.group * 10 + cfg.zeros + T * 100000 + sh.H);
        const Problem p = make_problem(cfg, T, sh.H, sh.I, sh.act, sh.bias, seed);
        const int64_t tpe = max_tokens_per_expert(p);
        char desc[128];
        std::snprintf(desc, sizeof desc, "H=%lld I=%lld group=%d%s%s tokens/expert=%lld",
                      static_cast<long long>(sh.H), static_cast<long long>(sh.I), cfg.group,
                      cfg.fmt == FMT_INT4 ? (cfg.zeros ? " zeros" : " symmetric") : "", sh.bias ? " bias" : "",
                      static_cast<long long>(tpe));
        std::vector<float> ref_out, out, again, pool1;
        if (lib.set_variant("generic") != 0) {
          report(false, variant, cfg.name, T, std::string("kt_set_variant(generic) refused; ") + desc);
          continue;
        }
        int rc = call(lib, p, 0, ref_out);
        if (rc != 0) {
          report(false, variant, cfg.name, T, "generic kt_moe_forward returned " + std::to_string(rc) + "; " + desc);
          continue;
        }
        std::string what;
        bool ok = true;
        const bool int16_path = (cfg.fmt == FMT_INT8 || cfg.fmt == FMT_INT4) && variant != "generic" &&
                                !bf16_tiles(lib, cfg.fmt, variant, tpe);
        if (variant == "generic") {  // generic against the float64 reference of the unpacked weights
          const double tol = tolerance(lib, cfg.fmt, "generic", tpe);
          const double err = rel_err(ref_out, reference(p, cfg.fmt == FMT_W8A8 ? ACTS_INT8 : ACTS_FLOAT));
          ok = err <= tol;
          what = fmt_err("vs_float64", err, tol);
          out = ref_out;
        } else {
          if (lib.set_variant(variant.c_str()) != 0) {
            report(false, variant, cfg.name, T, "kt_set_variant refused a supported variant; " + std::string(desc));
            continue;
          }
          rc = call(lib, p, 0, out);
          if (rc != 0) {
            report(false, variant, cfg.name, T, "kt_moe_forward returned " + std::to_string(rc) + "; " + desc);
            continue;
          }
          const double err = rel_err(out, ref_out);
          if (int16_path) {
            // The int16 activation codes differ from generic's float activations by up to ~1e-4 of
            // the output by design (NATIVE_MOE's bound; this data reaches 1.01e-4 once). So the
            // kernels' arithmetic is checked against a float64 model of those same codes, which
            // differs only by float32 rounding, the SIMD SiLU's, moving an activation across an
            // int16 rounding boundary now and then (one code step, 1/32767 of the row's amax; seen
            // up to 1.7e-5 over 21 seeds), and the total difference from generic against twice the
            // documented bound.
            const double model = rel_err(out, reference(p, ACTS_INT16));
            ok = model <= 5e-5 && err <= 2e-4;
            what = fmt_err("vs_int16_model", model, 5e-5) + " " + fmt_err("vs_generic", err, 2e-4);
          } else {
            const double tol = std::max(tolerance(lib, cfg.fmt, variant, tpe), tolerance(lib, cfg.fmt, "generic", tpe));
            ok = err <= tol;
            what = fmt_err("vs_generic", err, tol);
          }
        }
        if (std::strcmp(lib.variant(), variant.c_str()) != 0) {
          ok = false;
          what += std::string("; kt_variant() says ") + lib.variant();
        }
        // same variant, same result; then pool 0 and pool 1 at once from two threads
        rc = call(lib, p, 0, again);
        if (rc != 0 || std::memcmp(again.data(), out.data(), out.size() * sizeof(float)) != 0) {
          ok = false;
          what += "; a repeated call differs (rc " + std::to_string(rc) + ")";
        }
        rc = call(lib, p, 1, pool1);
        const double tol_pools = std::max(tolerance(lib, cfg.fmt, variant, tpe), tolerance(lib, cfg.fmt, "generic", tpe));
        if (rc != 0 || rel_err(pool1, out) > tol_pools) {
          ok = false;
          what += "; pool 1 differs from pool 0 (rc " + std::to_string(rc) + ")";
        }
        if (T == 37) {
          std::vector<float> c0, c1;
          std::atomic<int> rc0{0};
          std::thread other([&] { rc0 = call(lib, p, 0, c0); });
          const int rc1 = call(lib, p, 1, c1);
          other.join();
          if (rc0 != 0 || rc1 != 0 || std::memcmp(c0.data(), out.data(), out.size() * sizeof(float)) != 0 ||
              std::memcmp(c1.data(), pool1.data(), pool1.size() * sizeof(float)) != 0) {
            ok = false;
            what += "; concurrent calls on pools 0 and 1 differ from the same calls made one at a time";
          } else {
            what += "; concurrent pools ok";
          }
        }
        report(ok, variant, cfg.name, T, what + "; " + desc);
      }
  return failures;
}

// ---------------------------------------------------------------- one child process per variant
// Returns the child's exit status, or a negative number (and a message) when it crashed or hung.
static int run_child(const char* self, const char* lib_path, const char* variant, int timeout_s, std::string& why) {
  const std::string seed = std::to_string(seed_base);
#if defined(_WIN32)
  std::string cmd = std::string("\"") + self + "\" \"" + lib_path + "\" --variant " + variant + " --seed " + seed;
  STARTUPINFOA si;
  PROCESS_INFORMATION pi;
  std::memset(&si, 0, sizeof si);
  si.cb = sizeof si;
  std::memset(&pi, 0, sizeof pi);
  std::vector<char> line(cmd.begin(), cmd.end());
  line.push_back('\0');
  std::fflush(stdout);
  if (!CreateProcessA(nullptr, line.data(), nullptr, nullptr, TRUE, 0, nullptr, nullptr, &si, &pi)) {
    why = "CreateProcess failed, error " + std::to_string(GetLastError());
    return -1;
  }
  if (WaitForSingleObject(pi.hProcess, static_cast<DWORD>(timeout_s) * 1000u) == WAIT_TIMEOUT) {
    TerminateProcess(pi.hProcess, 124);
    WaitForSingleObject(pi.hProcess, INFINITE);
    why = "timed out after " + std::to_string(timeout_s) + " s (a hang?)";
    CloseHandle(pi.hThread);
    CloseHandle(pi.hProcess);
    return -1;
  }
  DWORD code = 0;
  GetExitCodeProcess(pi.hProcess, &code);
  CloseHandle(pi.hThread);
  CloseHandle(pi.hProcess);
  if (code >= 0xC0000000u) {  // an NTSTATUS: the process died of an exception
    char buf[96];
    std::snprintf(buf, sizeof buf, "crashed with exception 0x%08lX%s", static_cast<unsigned long>(code),
                  code == 0xC000001Du ? " (illegal instruction)" : code == 0xC0000005u ? " (access violation)" : "");
    why = buf;
    return -1;
  }
  return static_cast<int>(code);
#else
  std::fflush(stdout);
  const pid_t pid = fork();
  if (pid < 0) {
    why = "fork failed";
    return -1;
  }
  if (pid == 0) {
    execl(self, self, lib_path, "--variant", variant, "--seed", seed.c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  int status = 0;
  for (int waited_ms = 0;; waited_ms += 50) {
    const pid_t r = waitpid(pid, &status, WNOHANG);
    if (r == pid) break;
    if (waited_ms >= timeout_s * 1000) {
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      why = "timed out after " + std::to_string(timeout_s) + " s (a hang?)";
      return -1;
    }
    usleep(50000);
  }
  if (WIFSIGNALED(status)) {
    why = "killed by signal " + std::to_string(WTERMSIG(status));
    return -1;
  }
  return WEXITSTATUS(status);
#endif
}

// This program's own file, to run again as a child (argv[0] may be a bare name).
static std::string self_path(const char* argv0) {
#if defined(_WIN32)
  char buf[MAX_PATH * 4];
  const DWORD n = GetModuleFileNameA(nullptr, buf, sizeof buf);
  return n > 0 && n < sizeof buf ? std::string(buf, n) : std::string(argv0);
#else
  char buf[4096];
  const ssize_t n = readlink("/proc/self/exe", buf, sizeof buf);
  return n > 0 && n < static_cast<ssize_t>(sizeof buf) ? std::string(buf, static_cast<size_t>(n)) : std::string(argv0);
#endif
}

}  // namespace

int main(int argc, char** argv) {
#if defined(_WIN32)
  SetErrorMode(SEM_FAILCRITICALERRORS | SEM_NOGPFAULTERRORBOX);  // a crash exits, no dialog box
  const char* default_lib = "kt_cpu.dll";
#else
  const char* default_lib = "./kt_cpu.so";
#endif
  const char* lib_path = default_lib;
  const char* only = nullptr;
  int timeout_s = 300;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--variant") == 0 && i + 1 < argc) only = argv[++i];
    else if (std::strcmp(argv[i], "--timeout") == 0 && i + 1 < argc) timeout_s = std::atoi(argv[++i]);
    else if (std::strcmp(argv[i], "--seed") == 0 && i + 1 < argc) seed_base = std::strtoull(argv[++i], nullptr, 10);
    else lib_path = argv[i];
  }
  Lib lib{};
  if (!load(lib_path, lib)) return 1;
  if (only) return run_variant(lib, only) ? 1 : 0;

  std::printf("library %s: abi %d, isa bits 0x%x, default variant %s, %d threads\n", lib_path, lib.abi_version(),
              static_cast<unsigned>(lib.isa()), lib.variant(), lib.threads());
  std::string ran, skipped;
  int failed_variants = 0;
  for (const char* v : kVariants) {
    const int s = lib.variant_supported(v);
    if (s != 1) {
      skipped += std::string(skipped.empty() ? "" : ", ") + v;
      if (s != 0) {
        std::printf("FAIL %s: kt_variant_supported returned %d\n", v, s);
        ++failed_variants;
      }
      continue;
    }
    std::string why;
    const int rc = run_child(self_path(argv[0]).c_str(), lib_path, v, timeout_s, why);
    if (rc < 0) std::printf("FAIL %s: the variant's run %s\n", v, why.c_str());
    if (rc != 0) ++failed_variants;
    ran += std::string(ran.empty() ? "" : ", ") + v + (rc == 0 ? "" : " (FAILED)");
  }
  std::printf("variants run: %s; not supported here: %s\n", ran.c_str(), skipped.empty() ? "none" : skipped.c_str());
  std::printf("%s\n", failed_variants ? "SELFTEST FAILED" : "SELFTEST PASSED");
  return failed_variants ? 1 : 0;
}
