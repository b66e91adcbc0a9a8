// The AVX-512, AMX and AVX-VNNI kernels (backends/cpu/native/kernels_avx512.hpp,
// kernels_amx.hpp, kernels_int_avx2.inc) run on a CPU without them: the _mm512_* and AVX-VNNI
// intrinsics are mapped onto SIMDe's portable implementations and the tile instructions onto
// amx_model.h (the pytest
// wrapper, tests/unit/test_simd_emulated.py, writes that mapping into the generated header
// "kt_simde_map.h" and compiles this file with AVX2 enabled). Every format, several token
// counts (the 4-row and 16-token tiles and their tails) and panels are compared with the AVX2 kernels,
// which the rest of the suite checks against torch. Prints one line per case and exits 1 on
// a mismatch.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <initializer_list>
#include <random>
#include <vector>

#include <simde/x86/avx512.h>  // includes the real <immintrin.h> first
#include <simde/x86/f16c.h>

#include "kt_simde_map.h"  // then the renaming, before any kernel is compiled
#define KT_AVXVNNI __attribute__((target("avx2,fma,f16c")))
#include "kernels.hpp"
#include "amx_model.h"
#define KT_AVX512 KT_TARGET("avx2,fma,f16c")
#define KT_AVX512BF16 KT_TARGET("avx2,fma,f16c")
#define KT_AMX KT_TARGET("avx2,fma,f16c")
#define KT_EMULATED_CVTNE2PS 1  // SIMDe has no VCVTNE2PS2BF16: kernels_amx.hpp rounds in integer steps
#define KT_EMULATED_CVTEPI8_EPI32 1  // nor a 512-bit VPMOVSXBD: two widening steps
#include "kernels_amx.hpp"  // and kernels_avx512.hpp
#include "attention_tiles.hpp"
#include "kernels_grad.hpp"
#include "kernels_gemv_avx512.hpp"

using namespace kt;

static int failures = 0;

// Random panel bytes that are valid codes of fmt: no fp8 NaN, bf16 of magnitude [2^-7, 2^2), int8 in +-127
static std::vector<uint8_t> random_codes(int fmt, size_t bytes, std::mt19937& rng) {
  std::vector<uint8_t> data(bytes);
  for (auto& b : data) b = static_cast<uint8_t>(rng());
  if (fmt == FMT_FP8)
    for (auto& b : data) if ((b & 0x7F) == 0x7F) b &= 0xFE;
  if (fmt == FMT_BF16)
    for (size_t i = 1; i < data.size(); i += 2) data[i] = static_cast<uint8_t>(0x3C + (data[i] & 0x83));
  if (fmt == FMT_INT8 || fmt == FMT_W8A8)
    for (auto& b : data) if (b == 0x80) b = 0x81;
  return data;
}

static void compare(const char* what, int n, const std::vector<float>& got, const std::vector<float>& want) {
  float err = 0.f, mag = 1e-30f;
  for (size_t i = 0; i < want.size(); ++i) {
    err = std::max(err, std::fabs(got[i] - want[i]));
    mag = std::max(mag, std::fabs(want[i]));
  }
  const bool ok = err <= 1e-5f * mag && std::isfinite(err);
  std::printf("%s %s n=%d relative error %.3g\n", ok ? "ok  " : "FAIL", what, n, err / mag);
  if (!ok) ++failures;
}

int main() {
  std::mt19937 rng(7);
  const int64_t K = 512, P = 3;
  for (int fmt : {FMT_BF16, FMT_FP8, FMT_INT8, FMT_W8A8, FMT_INT4})
    for (int group : {32, 128, 512})  // 512: int4 with one group a row (K)
      for (bool zeros : {false, true}) {
        if ((fmt != FMT_INT4 && fmt != FMT_FP8 && fmt != FMT_INT8) && group != 32) continue;  // no groups
        if (group == 512 && fmt != FMT_INT4) continue;
        if (zeros && fmt != FMT_INT4 && !(fmt == FMT_INT8 && group == 32)) continue;  // int8: grouped only
        const std::vector<uint8_t> data = random_codes(fmt, P * K * NR * 2, rng);
        // int8: groups of 32, and one scale per row (the group 128 pass)
        const int g = (fmt == FMT_INT4 || fmt == FMT_FP8 || (fmt == FMT_INT8 && group == 32)) ? group : static_cast<int>(K);
        std::vector<float> scale(P * (K / g) * NR), zero(P * (K / g) * NR);
        for (auto& v : scale) v = 0.001f + static_cast<float>(rng() % 1000) * 1e-5f;
        for (auto& v : zero) v = static_cast<float>(rng() % 16);
        Weight w{fmt, P * NR, K, g, data.data(), scale.data(), zeros ? zero.data() : nullptr};
        for (int n : {1, 2, 3, 4, 5, 8, 9}) {
          std::vector<float> X(n * K), xs(n), a(n * NR), b(n * NR);
          std::vector<int8_t> Xq(n * K);
          std::vector<int16_t> q(n * K);
          std::vector<int32_t> gsum(n * (K / g), 0);
          for (auto& v : X) v = static_cast<float>(static_cast<int>(rng() % 2001) - 1000) * 1e-3f;
          for (auto& v : xs) v = 0.01f + static_cast<float>(rng() % 100) * 1e-4f;
          for (auto& v : Xq) v = static_cast<int8_t>(static_cast<int>(rng() % 255) - 127);
          for (int64_t i = 0; i < n * K; ++i) {
            q[i] = static_cast<int16_t>(static_cast<int>(rng() % 65535) - 32767);
            gsum[(i / K) * (K / g) + (i % K) / g] += q[i];
          }
          X16 x{q.data(), xs.data(), gsum.data(), K, K / g};
          char what[96];
          std::snprintf(what, sizeof what, "fmt=%d group=%d zeros=%d", fmt, g, zeros ? 1 : 0);
          for (int64_t p = 0; p < P; ++p) {
            if (fmt == FMT_BF16 || fmt == FMT_FP8) {
              panel_gemm_avx512(w, p, X.data(), K, n, a.data());
              panel_gemm_avx2(w, p, X.data(), K, n, b.data());
            } else if (fmt == FMT_W8A8) {
              panel_gemm_q8_avx512(w, p, Xq.data(), K, xs.data(), n, a.data());
              panel_gemm_q8_avx2(w, p, Xq.data(), K, xs.data(), n, b.data());
            } else {
              panel_gemm_x16_avx512(w, p, x, n, a.data());
              panel_gemm_x16_avx2(w, p, x, n, b.data());
            }
            compare(what, n, a, b);
#if defined(KT_HAVE_AVXVNNI)
            if (fmt == FMT_W8A8 || fmt == FMT_INT8 || fmt == FMT_INT4) {  // the fused dot products
              std::vector<float> c(n * NR);
              if (fmt == FMT_W8A8) panel_gemm_q8_avxvnni(w, p, Xq.data(), K, xs.data(), n, c.data());
              else panel_gemm_x16_avxvnni(w, p, x, n, c.data());
              char vw[112];
              std::snprintf(vw, sizeof vw, "avx_vnni %s", what);
              compare(vw, n, c, b);
            }
#endif
          }
        }
      }
  // Training's transposed products (kernels_grad.hpp): AVX-512 against the generic float64 sums, every
  // format on 3 panels (48 rows) of 512 inputs and a 40-input weight (a short last block), row tiles and tails
  for (int fmt : {FMT_BF16, FMT_FP8, FMT_INT8, FMT_W8A8, FMT_INT4})
    for (int64_t Kt : {int64_t(512), int64_t(40)})
      for (bool zeros : {false, true}) {
        if (zeros && fmt != FMT_INT4 && fmt != FMT_INT8) continue;
        const int g = fmt == FMT_INT8 && !zeros ? static_cast<int>(Kt) : fmt == FMT_W8A8 || fmt == FMT_BF16 ? 0 : 8;
        const std::vector<uint8_t> data = random_codes(fmt, P * Kt * NR * 2, rng);
        std::vector<float> scale(P * Kt * NR), zero(P * Kt * NR);
        for (auto& v : scale) v = 0.001f + static_cast<float>(rng() % 1000) * 1e-5f;
        for (auto& v : zero) v = static_cast<float>(rng() % 16);
        Weight w{fmt, P * NR, Kt, g > 0 ? g : static_cast<int>(Kt), data.data(), scale.data(), zeros ? zero.data() : nullptr};
        for (int64_t n : {1, 17, 40, 64, 200}) {  // 64: 4 row tiles as 2 + 2; 200: two shares of tiles
          std::vector<float> A(n * P * NR), a(n * Kt, 1.f), b(n * Kt, 1.f);
          for (auto& v : A) v = static_cast<float>(static_cast<int>(rng() % 2001) - 1000) * 1e-3f;
          rows_t_avx512(w, A.data(), P * NR, n, a.data(), Kt, 0, (Kt + 15) / 16, true);
          rows_t_generic(w, A.data(), P * NR, n, b.data(), Kt, 0, (Kt + 15) / 16, true);
          char what[96];
          std::snprintf(what, sizeof what, "rows_t avx512 fmt=%d K=%lld zeros=%d", fmt, static_cast<long long>(Kt), zeros ? 1 : 0);
          compare(what, static_cast<int>(n), a, b);
        }
      }
#if defined(KT_HAVE_AVX512BF16)
  // The one-token bf16 GEMV (8 rows) on VDPBF16PS and in its AVX-512 float form against the AVX2 one,
  // with bf16-exact inputs (what the pair form takes) and without (refused); K with and without a tail
  for (int64_t Kd : {int64_t(512), int64_t(100), int64_t(8)}) {
    std::vector<uint16_t> wd(8 * Kd), xh(Kd);
    for (auto& v : wd) v = static_cast<uint16_t>(f32_bits(static_cast<float>(static_cast<int>(rng() % 2001) - 1000) * 1e-3f) >> 16);
    std::vector<float> xd(Kd), a(8), b(8);
    for (auto& v : xd) v = bf16_to_f32(static_cast<uint16_t>(f32_bits(static_cast<float>(static_cast<int>(rng() % 2001) - 1000) * 1e-3f) >> 16));
    const bool exact = bf16_exact_avx512(xd.data(), Kd, xh.data());
    dense_rows_bf16dp<8>(wd.data(), Kd, xh.data(), xd.data(), a.data());
    dense_quad_avx2(wd.data(), Kd, xd.data(), b.data());
    dense_quad_avx2(wd.data() + 4 * Kd, Kd, xd.data(), b.data() + 4);
    char what[96];
    std::snprintf(what, sizeof what, "avx512bf16 gemv K=%lld", static_cast<long long>(Kd));
    compare(what, 1, a, b);
    dense_rows_avx512<8>(wd.data(), Kd, xd.data(), a.data());  // and the float form
    std::snprintf(what, sizeof what, "gemv avx512 K=%lld", static_cast<long long>(Kd));
    compare(what, 1, a, b);
    xd[Kd - 1] += 1e-4f;  // one input that bf16 cannot hold
    if (!exact || bf16_exact_avx512(xd.data(), Kd, xh.data())) {
      std::printf("FAIL avx512bf16 gemv K=%lld: bf16_exact_avx512 misjudged the inputs\n", static_cast<long long>(Kd));
      ++failures;
    }
  }
#endif
  // Training's transposed products in bf16 (a bf16 model's backward: rows_t_bf16dp_avx512, rows_t_amx)
  // against the generic float64 sums, with bf16-exact rows of A and power-of-two scales (every weight
  // exact in bf16): 3 panels, n rows each, input blocks kb0.. of C
  const auto bf16_rows_t_case = [&](const char* name, auto&& kernel, std::initializer_list<int64_t> ns, int64_t kb0) {
    for (int fmt : {FMT_BF16, FMT_FP8, FMT_INT8, FMT_INT4})
      for (bool zeros : {false, true}) {
        if (zeros && fmt != FMT_INT4 && fmt != FMT_INT8) continue;
        const int g = fmt == FMT_INT8 && !zeros ? static_cast<int>(K) : fmt == FMT_BF16 ? static_cast<int>(K) : 32;
        const std::vector<uint8_t> data = random_codes(fmt, P * K * NR * 2, rng);
        std::vector<float> scale(P * K * NR), zero(P * K * NR);
        for (auto& v : scale) v = std::ldexp(1.f, -7 - static_cast<int>(rng() % 4));
        for (auto& v : zero) v = static_cast<float>(rng() % 16);
        Weight w{fmt, P * NR, K, g, data.data(), scale.data(), zeros ? zero.data() : nullptr};
        for (int64_t n : ns) {
          std::vector<float> A(n * P * NR), a(n * K, 0.5f), b(n * K, 0.5f);
          for (auto& v : A) v = bf16_to_f32(static_cast<uint16_t>(f32_bits(static_cast<float>(static_cast<int>(rng() % 2001) - 1000) * 1e-3f) >> 16));
          kernel(w, A.data(), P * NR, n, a.data(), K, kb0, K / 16, true);
          rows_t_generic(w, A.data(), P * NR, n, b.data(), K, kb0, K / 16, true);
          char what[96];
          std::snprintf(what, sizeof what, "%s fmt=%d zeros=%d", name, fmt, zeros ? 1 : 0);
          compare(what, static_cast<int>(n), a, b);
        }
      }
  };
#if defined(KT_HAVE_AVX512BF16)
  // the AVX512-BF16 form (without AMX): one row tile, a tail, 3 tiles in a pass, 3 + 2 (decoded formats: 5
  // tiles in a pass, 6, 4 + 3)
  bf16_rows_t_case("avx512bf16 rows_t", [](auto&&... x) { rows_t_bf16dp_avx512(x...); }, {1, 17, 40, 70, 90, 100}, 1);
#endif
  // AMX: w8a8 over whole 16-token tiles plus tails; int8 / int4 on integer tiles (TDPBSSD, int8
  // activation codes that hold these activations exactly); every other format on bf16 tiles of up
  // to 16 tokens (panel_tiles_amx) against the generic kernel, with bf16-exact activations and
  // power-of-two scales, so the dequantized weights are bf16-exact too (see kernels_amx.hpp)
#if !defined(KT_HAVE_AMX)
  std::printf("amx not compiled: this compiler predates GCC 11 / Clang 12\n");
#else
  // one weight of format fmt, K inputs, groups of g (zero points or not) against the generic kernel
  const auto amx_case = [&](int fmt, int64_t K, int g, bool zeros) {
    const std::vector<uint8_t> data = random_codes(fmt, P * K * NR * 2, rng);
    std::vector<float> scale(P * (K / g) * NR), zero(P * (K / g) * NR);
    for (auto& v : scale) v = std::ldexp(1.f, -7 - static_cast<int>(rng() % 4));
    for (auto& v : zero) v = static_cast<float>(rng() % 16);
    Weight w{fmt, P * NR, K, g, data.data(), scale.data(), zeros ? zero.data() : nullptr};
    for (int n : {1, 3, 16, 17, 19, 32, 35, 50}) {
      std::vector<float> X(n * K), xs(n), a(n * NR), b(n * NR);
      std::vector<int8_t> Xq(n * K);
      for (auto& v : X) v = bf16_to_f32(static_cast<uint16_t>(f32_bits(static_cast<float>(static_cast<int>(rng() % 2001) - 1000) * 1e-3f) >> 16));
      if (int_tiles(w))  // int8 activation codes with a scale per token: rows they hold exactly
        for (int i = 0; i < n; ++i) {
          const float s = std::ldexp(1.f, -3 - static_cast<int>(rng() % 4));
          for (int64_t k = 0; k < K; ++k)
            X[i * K + k] = s * static_cast<float>(k == i % K ? 127 : static_cast<int>(rng() % 255) - 127);
        }
      for (auto& v : xs) v = 0.01f + static_cast<float>(rng() % 100) * 1e-4f;
      for (auto& v : Xq) v = static_cast<int8_t>(static_cast<int>(rng() % 255) - 127);
      std::vector<uint16_t> Xt(tiled_elems(w, n));
      weight_tiles(w, n, X.data(), n, K, Xt.data());
      char what[96];
      std::snprintf(what, sizeof what, "amx fmt=%d group=%d zeros=%d", fmt, g, zeros ? 1 : 0);
      for (int64_t p = 0; p < P; ++p) {
        if (fmt == FMT_W8A8) {
          if (!amx_q8_takes(w, n)) continue;
          panel_gemm_q8_amx(w, p, Xq.data(), K, xs.data(), n, a.data());
          panel_gemm_q8_avx2(w, p, Xq.data(), K, xs.data(), n, b.data());
        } else {
          std::vector<float> c(n * NR), d(n * NR);  // and two panels at once (gate and up)
          panel_tiles_amx({&w, p}, {&w, (p + 1) % P}, Xt.data(), n, a.data(), c.data());
          panel_gemm_generic(w, p, X.data(), K, n, b.data());
          panel_gemm_generic(w, (p + 1) % P, X.data(), K, n, d.data());
          compare(what, n, c, d);
        }
        compare(what, n, a, b);
#if defined(KT_HAVE_AVX512BF16)
        if (bf16dp_takes(w, n)) {  // every weight-only format (dequantized weights bf16-exact here)
          panel_gemm_bf16dp_avx512(w, p, X.data(), K, n, a.data());
          const bool decoded = fmt != FMT_BF16;  // int8 / int4 / fp8 decoded to bf16 pairs a K block at a time
          compare(decoded ? "avx512bf16 decoded" : "avx512bf16", n, a, b);
          std::vector<uint16_t> xh(n * K);  // and two panels at once (gate and up; down's q and q + 1)
          std::vector<float> c(n * NR), d(n * NR), e(n * NR);
          bf16_rows_avx512(X.data(), K, n, K, xh.data());
          panels_bf16dp_avx512(w, p, &w, (p + 1) % P, xh.data(), K, n, c.data(), d.data());
          panel_gemm_generic(w, (p + 1) % P, X.data(), K, n, e.data());
          compare(decoded ? "avx512bf16 decoded pair" : "avx512bf16 pair", n, c, b);
          compare(decoded ? "avx512bf16 decoded pair" : "avx512bf16 pair", n, d, e);
        }
#endif
      }
    }
  };
  for (int fmt : {FMT_BF16, FMT_INT8, FMT_INT4, FMT_FP8, FMT_W8A8})
    for (int group : {16, 32, 128, 512})  // 16: a weight group boundary inside each 32-input B tile; 512: K
      for (bool zeros : {false, true}) {
        if ((fmt != FMT_INT4 && fmt != FMT_FP8 && fmt != FMT_INT8) && group != 32) continue;
        if (group == 512 && fmt != FMT_INT4) continue;  // int4 with one group a row
        if (zeros && fmt != FMT_INT4 && !(fmt == FMT_INT8 && group <= 32)) continue;  // int8: grouped only
        // int8: groups of 16 and 32, and one scale per row (the group 128 pass)
        amx_case(fmt, K, (fmt == FMT_INT4 || fmt == FMT_FP8 || (fmt == FMT_INT8 && group <= 32)) ? group : static_cast<int>(K),
                 zeros);
      }
  // rows that are not whole 64-input steps (K % 64 == 32): per-row int4 and int8 on 32-input integer
  // steps up to 16 tokens, bf16 tiles above
  for (bool zeros : {false, true}) amx_case(FMT_INT4, 544, 544, zeros);
  // per-row int4 over more K steps than a chunk of panel_tiles_q8_chunked (sums parked between chunks)
  for (bool zeros : {false, true}) amx_case(FMT_INT4, 1024, 1024, zeros);
  amx_case(FMT_INT8, 544, 544, false);
  amx_case(FMT_BF16, 544, 544, false);  // and for the AVX512-BF16 pairs: two K blocks of 256, then 32
  // Training's transposed products on the tiles: 3 panels (an odd one out of the two-panel tiles), 1..7
  // row tiles (two groups of up to six C tiles)
  bf16_rows_t_case("amx rows_t", [](auto&&... x) { rows_t_amx(x...); }, {1, 16, 33, 100}, 2);
  // Decode attention's two products on the tiles (attention_tiles.hpp): head groups of 16 and 20 (a
  // padded head tile), runs of keys that leave partial 16- and 32-key tiles, rows scattered as a paged
  // cache's, against double sums of the same bf16 operands (the query and the probabilities rounded)
  for (int64_t G : {16, 20})
    for (int64_t n : {1, 16, 37, 64}) {
      const int64_t D = 64, Dv = 48, ld = 80, slots = 2 * n + 3;
      std::vector<uint16_t> cache(slots * ld);
      for (auto& v : cache) v = static_cast<uint16_t>(f32_bits(static_cast<float>(static_cast<int>(rng() % 2001) - 1000) * 1e-3f) >> 16);
      std::vector<int64_t> rows(n);
      for (int64_t i = 0; i < n; ++i) rows[i] = ((i * 7 + 3) % slots) * ld;  // distinct slots, any order
      std::vector<float> q(G * D), pr(G * n), s(G * n), want(G * n), acc(G * Dv), want_acc(G * Dv);
      for (auto& v : q) v = static_cast<float>(static_cast<int>(rng() % 2001) - 1000) * 1e-3f;
      for (auto& v : pr) v = static_cast<float>(rng() % 1000) * 1e-3f;
      AttnTileScratch ts;
      attn_scores_amx(q.data(), G, D, cache.data(), rows.data(), n, 0.125f, s.data(), ts);
      attn_values_amx(pr.data(), G, Dv, cache.data(), rows.data(), n, acc.data(), ts);
      auto rb = [](float x) { return bf16_to_f32(static_cast<uint16_t>((f32_bits(x) + 0x7FFFu + ((f32_bits(x) >> 16) & 1u)) >> 16)); };
      for (int64_t g = 0; g < G; ++g) {
        for (int64_t i = 0; i < n; ++i) {
          double dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += double(rb(q[g * D + d])) * bf16_to_f32(cache[rows[i] + d]);
          want[g * n + i] = static_cast<float>(dot * 0.125);
        }
        for (int64_t d = 0; d < Dv; ++d) {
          double sum = 0;
          for (int64_t i = 0; i < n; ++i) sum += double(rb(pr[g * n + i])) * bf16_to_f32(cache[rows[i] + d]);
          want_acc[g * Dv + d] = static_cast<float>(sum);
        }
      }
      char what[96];
      std::snprintf(what, sizeof what, "amx attention scores G=%lld", static_cast<long long>(G));
      compare(what, static_cast<int>(n), s, want);
      std::snprintf(what, sizeof what, "amx attention values G=%lld", static_cast<long long>(G));
      compare(what, static_cast<int>(n), acc, want_acc);
    }
  // Fine-tuning's attention backward (attention_tiles.hpp): keys packed as B tiles, 16 query rows'
  // scores against them (rows strided, keys past a 16-key tile), and one row's softmax gradient,
  // against double sums and the scalar formulas
  for (int64_t n : {16, 37}) {
    const int64_t D = 64, lda = 96, ldk = 80;
    std::vector<uint16_t> A(16 * lda), Kr(n * ldk);
    for (auto& v : A) v = static_cast<uint16_t>(f32_bits(static_cast<float>(static_cast<int>(rng() % 2001) - 1000) * 1e-3f) >> 16);
    for (auto& v : Kr) v = static_cast<uint16_t>(f32_bits(static_cast<float>(static_cast<int>(rng() % 2001) - 1000) * 1e-3f) >> 16);
    lvector<uint32_t> kp;
    attn_pack_keys(Kr.data(), ldk, n, D, kp);
    const int64_t nb = (n + 15) / 16, lds = nb * 16 + 8;
    std::vector<float> S(16 * lds, -1.f), got, want;
    attn_rows_scores_amx(A.data(), lda, D, kp.data(), nb, S.data(), lds);
    for (int64_t r = 0; r < 16; ++r)
      for (int64_t j = 0; j < n; ++j) {
        double dot = 0;
        for (int64_t d = 0; d < D; ++d) dot += double(bf16_to_f32(A[r * lda + d])) * bf16_to_f32(Kr[j * ldk + d]);
        want.push_back(static_cast<float>(dot));
        got.push_back(S[r * lds + j]);
      }
    compare("amx attention training scores", static_cast<int>(n), got, want);
    // row 3 sees keys [0, n - 5): P and dS against the scalar formulas (bf16 rounding apart)
    const int64_t vis = n - 5, width = n + 3;
    std::vector<float> dp(n), e(n);
    for (auto& v : dp) v = static_cast<float>(static_cast<int>(rng() % 2001) - 1000) * 1e-3f;
    std::vector<uint16_t> P(width, 0x7777), dS(width, 0x7777);
    const float* s3 = &S[3 * lds];
    attn_softmax_grad_row16(s3, dp.data(), 0.25f, vis, width, 0.5f, P.data(), dS.data(), e.data());
    double m = -1e30, sum = 0;
    for (int64_t j = 0; j < vis; ++j) m = std::max(m, 0.5 * s3[j]);
    for (int64_t j = 0; j < vis; ++j) sum += std::exp(0.5 * s3[j] - m);
    std::vector<float> gp, wp, gd, wd;
    for (int64_t j = 0; j < width; ++j) {
      const double pj = j < vis ? std::exp(0.5 * s3[j] - m) / sum : 0.0;
      wp.push_back(static_cast<float>(pj));
      wd.push_back(static_cast<float>(pj * (dp[j] - 0.25) * 0.5));
      gp.push_back(bf16_to_f32(P[j]));
      gd.push_back(bf16_to_f32(dS[j]));
    }
    float err = 0.f, mag = 1e-30f;
    for (size_t j = 0; j < wp.size(); ++j) {
      err = std::max({err, std::fabs(gp[j] - wp[j]) / 256.f, std::fabs(gd[j] - wd[j]) / 256.f});
      mag = std::max({mag, std::fabs(wp[j]), std::fabs(wd[j])});
    }
    // bf16 rounds to within half an ulp: 2^-8 of a value at the low end of its binade (0.2705 -> 0.2715 is
    // 0.0035 of it; the bound was 0.00256 and failed on such a draw), scaled down by 256 above, plus float slack
    const bool ok = err <= (1.f / 256.f + 1e-5f) / 256.f * mag;
    std::printf("%s amx attention training softmax row n=%lld (error %.3g of the largest)\n", ok ? "ok  " : "FAIL",
                static_cast<long long>(n), err * 256.f / mag);
    if (!ok) ++failures;
  }
#endif
  std::printf("%d failures\n", failures);
  return failures ? 1 : 0;
}
