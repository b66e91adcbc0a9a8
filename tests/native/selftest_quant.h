// The self-test's load-time quantization cases (quantize_load.inc): under each variant, int4
// (symmetric and asymmetric) and int8 of deterministic weights give the generic variant's bits, and
// kt_pack_int4's panels are the layout's definition (kernels.hpp) computed here. A part of
// selftest_main.cpp (included once, inside its anonymous namespace after report()).
#pragma once

// one variant's results: codes and scales of the three quantizations, the packed panels
static std::vector<float> quant_outputs(const Lib& lib, bool& ok) {
  const int64_t rows = 37, K = 96, group = 32, G = K / group;  // 111 groups: a partial block of 8
  std::vector<float> w(static_cast<size_t>(rows * K));
  uint64_t st = 0x9E3779B97F4A7C15ull;
  for (float& v : w) {  // heavy-tailed values, a few exact zeros
    st = st * 6364136223846793005ull + 1442695040888963407ull;
    const double u = static_cast<double>(st >> 11) / 9007199254740992.0;
    v = (u < 0.05) ? 0.f : static_cast<float>((u - 0.5) / (0.02 + std::fabs(u - 0.5)));
  }
  const float lo[3] = {0.f, 0.025f, 0.05f}, width[3] = {1.f, 0.95f, 0.9f};
  std::vector<float> out;
  for (int sym = 0; sym < 2; ++sym) {
    std::vector<uint8_t> codes(static_cast<size_t>(rows * K / 2));
    std::vector<float> scale(static_cast<size_t>(rows * G)), zero(scale.size());
    const QuantInt4Args a{rows, K, group, 0, sym, 1, 3, 3, 0, lo, width, w.data(), codes.data(), scale.data(),
                          sym ? nullptr : zero.data()};
    ok &= lib.quantize_int4(&a) == 0;
    for (uint8_t c : codes) out.push_back(c);
    out.insert(out.end(), scale.begin(), scale.end());
    if (!sym) out.insert(out.end(), zero.begin(), zero.end());
    // the panels of these codes, against the layout's definition: byte 4l + 2e + s of quad q holds
    // code(row l, input 4q + 2s + e) | code(row l + 8, same input) << 4 (rows past M zero)
    const int64_t P = (rows + NR - 1) / NR;
    std::vector<uint8_t> panels(static_cast<size_t>(P * (K / 4) * 32));
    const PackInt4Args pk{1, rows, K, 0, codes.data(), panels.data()};
    ok &= lib.pack_int4(&pk) == 0;
    auto code = [&](int64_t m, int64_t k) {
      return m < rows ? (codes[static_cast<size_t>(m * K / 2 + k / 2)] >> (4 * (k % 2))) & 15 : 0;
    };
    for (int64_t p = 0; p < P; ++p)
      for (int64_t q = 0; q < K / 4; ++q)
        for (int l = 0; l < 8; ++l)
          for (int e = 0; e < 2; ++e)
            for (int s = 0; s < 2; ++s) {
              const int64_t k = 4 * q + 2 * s + e;
              const int want = code(p * NR + l, k) | (code(p * NR + l + 8, k) << 4);
              ok &= panels[static_cast<size_t>((p * (K / 4) + q) * 32 + 4 * l + 2 * e + s)] == want;
            }
  }
  std::vector<int8_t> codes8(static_cast<size_t>(rows * K));
  std::vector<float> scale8(static_cast<size_t>(rows * G));
  const QuantInt8Args b{rows, K, group, 0, 1, 0, w.data(), codes8.data(), scale8.data()};
  ok &= lib.quantize_int8(&b) == 0;
  for (int8_t c : codes8) out.push_back(c);
  out.insert(out.end(), scale8.begin(), scale8.end());
  return out;
}

// this variant's quantization against the generic variant's, bit for bit
static void check_quantization(const Lib& lib, const std::string& variant) {
  bool ok = lib.set_variant("generic") == 0;
  const std::vector<float> want = quant_outputs(lib, ok);
  ok &= lib.set_variant(variant.c_str()) == 0;
  const std::vector<float> got = quant_outputs(lib, ok);
  ok &= got.size() == want.size() && std::memcmp(got.data(), want.data(), got.size() * sizeof(float)) == 0;
  report(ok, variant, "quantize", 0, "int4 sym / asym, int8 g32 and int4 panels: the generic variant's bits");
}
