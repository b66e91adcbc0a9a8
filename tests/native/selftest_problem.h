// The self-test's problems: deterministic numbers, weights packed here in the panel layouts of
// backends/cpu/native/kernels.hpp, the float64 reference and one kt_moe_forward call. A part of
// selftest_main.cpp (included once, after selftest_lib.h).
#pragma once

namespace {

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
  bool zeros;        // int4, grouped int8: zero points (value = (code - zero) * scale)
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
  if ((c.fmt == FMT_INT4 || (c.fmt == FMT_INT8 && g < K)) && c.zeros) p.zero.assign(E * p.param_stride, 0.f);
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
        float s = 0.f, z = 0.f;
        for (int64_t k = 0; k < K; ++k) {
          if (k % g == 0) {  // a scale (and zero point) per group (int8 per row: one group of K)
            s = amp / 64.f * (0.5f + 0.5f * (rng.uniform() + 1.f));
            sc[(pp * G + k / g) * NR + j] = s;
            if (zp) zp[(pp * G + k / g) * NR + j] = z = static_cast<float>(rng.below(64)) * 0.75f - 24.f;
          }
          const int q = static_cast<int>(rng.below(255)) - 127;  // codes in [-127, 127]
          const int64_t at = c.fmt == FMT_INT8 ? ((pp * (K / 2) + k / 2) * NR + j) * 2 + (k & 1)
                                               : ((pp * (K / 4) + k / 4) * NR + j) * 4 + (k & 3);
          d[at] = static_cast<uint8_t>(static_cast<int8_t>(q));
          w[k] = (static_cast<double>(q) - z) * s;
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

}  // namespace
