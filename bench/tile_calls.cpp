// Times one call of the AMX tile kernel (panel_tiles_amx in backends/cpu/native/kernels_amx.hpp: two
// panels, gate and up style, against n tiled rows) in isolation, as bench/tile_calls.py builds and
// runs it: the kernel's own code from the headers, no copy. The weight is either small enough to
// stay in cache (about 1.5 MB: every call finds its panels in L2) or a stream of 256 MB from memory,
// so the cost of a call splits into its products and its panels' stream. One JSON line per case.
//
// usage: tile_calls FORMAT K ROWS MB   (FORMAT: bf16, int8, int4_pr, int4_g32; MB: weight size)
// Linux x86-64 with AMX only (the tile state is requested with arch_prctl).
#include "kernels_amx.hpp"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <sys/syscall.h>
#include <unistd.h>

using namespace kt;

int main(int argc, char** argv) {
#if !defined(KT_HAVE_AMX)
  std::printf("{\"error\": \"this compiler builds no AMX kernels (GCC 11+ / Clang 12+)\"}\n");
  return 2;
#else
  if (argc != 5) {
    std::fprintf(stderr, "usage: %s FORMAT K ROWS MB\n", argv[0]);
    return 2;
  }
  if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) != 0) {
    std::printf("{\"error\": \"the OS did not grant the AMX tile state\"}\n");
    return 2;
  }
  const std::string fmt_name = argv[1];
  const int64_t K = std::atoll(argv[2]), n = std::atoll(argv[3]), mb = std::atoll(argv[4]);
  const int fmt = fmt_name == "bf16" ? FMT_BF16 : fmt_name == "int8" ? FMT_INT8 : FMT_INT4;
  if ((fmt == FMT_INT4 && fmt_name != "int4_pr" && fmt_name != "int4_g32") || K % 64 || n < 1 || n > 64 || mb < 1) {
    std::fprintf(stderr, "FORMAT: bf16, int8, int4_pr or int4_g32; K a multiple of 64; ROWS 1..64; MB >= 1\n");
    return 2;
  }
  const int64_t group = fmt_name == "int4_g32" ? 32 : K;
  const int64_t bytes = fmt == FMT_BF16 ? K * NR * 2 : fmt == FMT_INT4 ? K * NR / 2 : K * NR;  // a panel's
  const int64_t P = std::max<int64_t>(4, (mb << 20) / bytes / 2 * 2);
  std::mt19937 rng(1);
  std::vector<uint8_t> data(P * bytes);
  if (fmt == FMT_BF16) {  // finite values: random bits would hold NaNs
    std::normal_distribution<float> g(0.f, 0.02f);
    for (int64_t i = 0; i < P * bytes / 2; ++i) {
      const float v = g(rng);
      uint32_t u;
      std::memcpy(&u, &v, 4);
      const uint16_t h = static_cast<uint16_t>(u >> 16);
      std::memcpy(&data[2 * i], &h, 2);
    }
  } else {
    for (auto& v : data) v = static_cast<uint8_t>(rng() % 255);  // int8: codes -127..127 (no -128)
    if (fmt == FMT_INT8)
      for (auto& v : data) v = static_cast<uint8_t>(static_cast<int>(v) - 127);
  }
  std::vector<float> scale(P * (K / group) * NR, 0.01f), zero(scale.size(), 8.f);
  const Weight w{fmt, P * NR, K, group, data.data(), scale.data(), fmt == FMT_INT4 ? zero.data() : nullptr};
  std::vector<float> X(n * K);
  for (auto& v : X) v = static_cast<float>(static_cast<int>(rng() % 2001) - 1000) * 1e-3f;
  std::vector<uint16_t> Xt(tiled_elems(w, n));
  weight_tiles(w, n, X.data(), n, K, Xt.data());
  std::vector<float> a(n * NR), b(n * NR);
  // panel p with panel p + P/2 (gate and up lie in separate arrays), all pairs, then again
  const int64_t pairs = P / 2, calls = std::max<int64_t>(pairs, 2000);
  std::vector<double> us;
  for (int rep = 0; rep < 7; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t c = 0; c < calls; ++c)
      panel_tiles_amx({&w, c % pairs}, {&w, c % pairs + pairs}, Xt.data(), n, a.data(), b.data());
    us.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / calls * 1e6);
  }
  std::sort(us.begin(), us.end());
  const double med = us[us.size() / 2];
  std::printf("{\"impl\": \"tile_call\", \"format\": \"%s\", \"K\": %lld, \"rows\": %lld, \"weight_mb\": %lld, "
              "\"path\": \"%s\", \"us_per_call\": %.3f, \"ns_per_32_inputs\": %.2f, \"weight_gbps\": %.2f}\n",
              fmt_name.c_str(), static_cast<long long>(K), static_cast<long long>(n), static_cast<long long>(mb),
              q8_takes(w, n) ? "int8 tiles" : "bf16 tiles", med, med * 1e3 / static_cast<double>(K / 32),
              2.0 * static_cast<double>(bytes) / (med * 1e3));
  return 0;
#endif
}
