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
#include <new>
#include <stdexcept>
#include <system_error>
#include <vector>

#include "kernels.hpp"
#include "kernels_amx.hpp"  // and kernels_avx512.hpp
#include "kernels_gemv_avx512.hpp"  // the one-token bf16 GEMV on AVX-512 and AVX512-BF16
#include "attention_tiles.hpp"  // decode attention of large head groups (MLA) on AMX tiles
#include "kernels_grad.hpp"  // training's backward products through frozen experts
#include "threadpool.hpp"

#if defined(_WIN32)  // MSVC and MinGW: without dllexport setuptools' .def would export only PyInit
#define KT_API extern "C" __declspec(dllexport)
#else
#define KT_API extern "C" __attribute__((visibility("default")))
#endif

#include "isa.hpp"  // what the CPU and OS support; the kernel variants

namespace kt {


// One pool per logical CPU device: experts of cpu:0 and cpu:1 run on separate workers, so
// two shards of one layer can be computed at the same time (the hybrid executor on a CPU host).
constexpr int kMaxPools = 64;
struct State {
  uint32_t isa = detect_isa();
  // Read by every panel call, written by kt_set_variant (tests, benchmarks) perhaps while a call
  // runs on another thread: atomic, so each read sees one whole variant (a call that overlaps a
  // switch may run its stages on either variant; each is one this CPU supports).
  std::atomic<int> variant{best_variant(isa)};
  std::unique_ptr<ThreadPool> pools[kMaxPools];
  std::mutex mu;
  ThreadPool& threads(int dev = 0) {
    if (dev < 0 || dev >= kMaxPools) throw std::out_of_range("thread pool index");
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

// weights of format fmt may take the AVX512-BF16 pair kernels (bf16dp_takes says for which calls)
static bool bf16dp_on(int fmt) {
#if defined(KT_HAVE_AVX512BF16)
  return fmt != FMT_W8A8 && state().variant >= VARIANT_AVX512 && (state().isa & ISA_AVX512BF16) &&
         checked_ok(fmt, CHECK_AVX512BF16) && avx512_ok(fmt);
#else
  (void)fmt;
  return false;
#endif
}

// round: the caller's activations are bf16 values (a bf16 model), so kernels that round them to
// bf16 (AVX512-BF16 pairs, AMX tiles) lose nothing the model keeps (they round dequantized int4 / fp8 /
// grouped int8 weights to bf16 too, as a bf16 model's dequantized matmul would); float32 callers get float sums
static void panel_gemm(const Weight& w, int64_t p, const float* X, int64_t ldx, int64_t n, float* out, bool round) {
#if defined(KT_HAVE_AVX512BF16)
  if (round && bf16dp_takes(w, n) && bf16dp_on(w.fmt)) return panel_gemm_bf16dp_avx512(w, p, X, ldx, n, out);
#endif
#if defined(KT_X86)
  if (w.fmt == FMT_BF16 || w.fmt == FMT_FP8) {  // int8 / int4 go through panel_x16
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
  if (state().variant >= VARIANT_AMX && amx_q8_takes(w, n) && amx_ok(w.fmt) && avx512_ok(w.fmt))
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

#include "tile_dispatch.inc"  // the AMX tile kernels: who takes them, their activations

#if defined(KT_X86)
// Up to this many tokens the 256-bit int8 / int4 kernels beat the 512-bit ones on an AMX Xeon
// (a 311 MB int8 GEMV streamed from DRAM: T=1 17.1 vs 21.3 ms, T=4 21.4 vs 26.2; int4 T=2 9.8 vs
// 11.9, T=4 15.7 vs 14.4): decode goes to AVX2, prefill tiles to AVX-512.
static int64_t x16_avx512_from(int fmt) { return fmt == FMT_INT4 ? 3 : 5; }

static void panel_x16(const Weight& w, int64_t p, const X16& x, int64_t n, float* out) {
  if (state().variant >= VARIANT_AVX512 && n >= x16_avx512_from(w.fmt) && avx512_ok(w.fmt))
    return panel_gemm_x16_avx512(w, p, x, n, out);
#if defined(KT_HAVE_AVXVNNI)  // bit-identical to AVX2; on AVX-512 CPUs that have it too, for decode
  if (state().variant >= VARIANT_AVXVNNI && (state().isa & ISA_AVX_VNNI) && avxvnni_ok(w.fmt))
    return panel_gemm_x16_avxvnni(w, p, x, n, out);
#endif
  panel_gemm_x16_avx2(w, p, x, n, out);
}

#endif

#include "self_check.inc"  // each SIMD kernel checked against AVX2 on first use

#include "quantize_rows.inc"  // activations to int8 / int16 codes for the integer kernels

// ---------------------------------------------------------------- fused MoE
#include "moe_forward.inc"  // the fused MoE op over the panel kernels above

// out[T][M] = x[T][K] . W[M][K]^T (+ bias), W bf16 row-major; items = blocks of 32 rows.
static int linear_bf16(const float* x, int64_t T, int64_t K, const uint16_t* w, int64_t M, const float* bias,
                       float* out) {
  const int64_t RB = 32, blocks = (M + RB - 1) / RB;
  const bool avx2 = state().variant >= VARIANT_AVX2;
  const bool avx512 = state().variant >= VARIANT_AVX512;
#if defined(KT_HAVE_AVX512BF16)
  std::vector<uint16_t> xh;  // x in bf16, for the VDPBF16PS GEMV when it is bf16 values (a bf16 model's)
  const bool dp = T == 1 && bf16dp_on(FMT_BF16) && (xh.resize(K), bf16_exact_avx512(x, K, xh.data()));
  const uint16_t* xhp = xh.data();
#endif
  state().threads().run(blocks, [&](int64_t b) {
    const int64_t r0 = b * RB, r1 = std::min(M, r0 + RB);
    int64_t r = r0;
#if defined(KT_HAVE_AVX512BF16)
    if (dp)
      for (; r + kDenseRows <= r1; r += kDenseRows) dense_rows_bf16dp<kDenseRows>(w + r * K, K, xhp, x, out + r);
#endif
#if defined(KT_X86)
    if (avx512 && T == 1)  // decode: kDenseRows rows per pass, then 4
      for (; r + kDenseRows <= r1; r += kDenseRows) dense_rows_avx512<kDenseRows>(w + r * K, K, x, out + r);
    if (avx2 && T == 1)
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
namespace kt {
#include "abi_checks.inc"  // error codes, the exception guard, argument checks
#include "linear_packed.inc"  // quantized dense projections on the same panel kernels
#include "norm_rope.inc"  // rmsnorm, rope; the element helpers attention_decode.inc uses
#include "norm_grad.inc"  // and rmsnorm's input gradient (kt_rmsnorm_backward, fine-tuning)
#include "attn_grad.inc"  // causal attention's backward softmax (kt_attn_softmax_grad, fine-tuning)
#include "logsoftmax_grad.inc"  // the LM head's log-softmax and its gradient (kt_logsoftmax_grad, fine-tuning)
#include "attention_decode.inc"  // decode attention over the paged KV cache
#include "mla_decode.inc"  // DeepSeek MLA decode (absorbed) over the latent cache
#include "decode_layer.inc"  // a decode step's decoder layers in one call, over the ops above
#include "expert_grad.inc"  // training's backward products through frozen experts (kt_expert_rows_t)
#include "act_grad.inc"     // and the SwiGLU activation's gradients between them (kt_silu_mul_backward)
#include "quantize_load.inc"  // weights -> int4 codes, group scales, panels at load (kt_quantize_int4, kt_pack_int4)
}  // namespace kt

// native_abi.py ABI_VERSION (its comment says what each version added; 25: kt_attn_softmax_grad's float32 form)
KT_API int kt_abi_version() { return 25; }
KT_API uint32_t kt_isa() {
  try {
    return kt::state().isa;
  } catch (...) {
    return 0;
  }
}
KT_API const char* kt_variant() {
  try {
    return kt::kVariantNames[kt::state().variant.load()];
  } catch (...) {
    return "unknown";
  }
}
// 0: switched, -1: this CPU (or build) cannot run it, -2: no such variant
KT_API int kt_set_variant(const char* name) {
  return kt::guarded([&] {
    if (!name) return -2;
    for (int v = 0; v < kt::kVariants; ++v)
      if (std::strcmp(name, kt::kVariantNames[v]) == 0) {
        if (!kt::variant_supported(v, kt::state().isa)) return -1;  // never run what the CPU lacks
        kt::state().variant.store(v);
        return 0;
      }
    return -2;
  });
}
// 1: this CPU (and build) can run the variant, 0: it cannot, -2: no such variant
KT_API int kt_variant_supported(const char* name) {
  return kt::guarded([&] {
    if (!name) return -2;
    for (int v = 0; v < kt::kVariants; ++v)
      if (std::strcmp(name, kt::kVariantNames[v]) == 0) return kt::variant_supported(v, kt::state().isa) ? 1 : 0;
    return -2;
  });
}
// The fewest tokens of one expert (rows of one dense call) from which variant `name` runs format
// fmt on a tile kernel (AMX: bf16 tiles, or for int8 / int4 integer tiles whose two int8 codes per
// activation lose less; AVX512-BF16 pairs for the weight-only formats), whose activations are rounded:
// what the tests' tolerance table asks. 0: never; -2: no such variant or format.
KT_API int kt_bf16_tile_tokens(const char* name, int fmt) {
  return kt::guarded([&] {
    if (!name || fmt < kt::FMT_BF16 || fmt > kt::FMT_W8A8) return -2;
    int v = 0;
    while (v < kt::kVariants && std::strcmp(name, kt::kVariantNames[v]) != 0) ++v;
    if (v == kt::kVariants) return -2;
#if defined(KT_HAVE_AMX)
    // grouped int4's count: per-row int4 takes the tiles from fewer tokens, but there the integer
    // tiles (two int8 codes an activation), which round nothing to bf16
    if (v >= kt::VARIANT_AMX && fmt != kt::FMT_W8A8) return static_cast<int>(kt::amx_tile_min_tokens(fmt, false));
#endif
#if defined(KT_HAVE_AVX512BF16)
    if (v >= kt::VARIANT_AVX512 && fmt != kt::FMT_W8A8 && (kt::state().isa & kt::ISA_AVX512BF16))
      return static_cast<int>(kt::dp_min_rows(fmt));
#endif
    return 0;
  });
}
// Workers of pool `pool` (n >= 1, the caller included); waits for a call running on that pool.
KT_API int kt_set_pool_threads(int pool, int n) {
  return kt::guarded([&] {
    if (pool < 0 || pool >= kt::kMaxPools) return static_cast<int>(kt::ERR_POOL);
    if (n < 1 || n > kt::kMaxThreads) return static_cast<int>(kt::ERR_SIZE);
    kt::state().threads(pool).resize(n);
    return 0;
  });
}
KT_API int kt_set_threads(int n) { return kt_set_pool_threads(0, n); }
// threads of the pool, or an error code (< 0)
KT_API int kt_pool_threads(int pool) {
  return kt::guarded([&] {
    if (pool < 0 || pool >= kt::kMaxPools) return static_cast<int>(kt::ERR_POOL);
    return kt::state().threads(pool).size();
  });
}
KT_API int kt_threads() { return kt_pool_threads(0); }
KT_API int kt_moe_forward(const kt::MoeArgs* args) {
  return kt::checked_call(args, kt::check_moe_args, kt::moe_forward);
}
// Training's backward products through frozen experts (expert_grad.inc)
KT_API int kt_expert_rows_t(const kt::RowsTArgs* args) {
  return kt::checked_call(args, kt::check_rows_t_args, kt::expert_rows_t);
}
KT_API int64_t kt_expert_rows_t_args_size() { return static_cast<int64_t>(sizeof(kt::RowsTArgs)); }
KT_API int kt_silu_mul_backward(const kt::ActGradArgs* args) {
  return kt::checked_call(args, kt::check_act_grad_args, kt::silu_mul_backward);
}
KT_API int64_t kt_act_grad_args_size() { return static_cast<int64_t>(sizeof(kt::ActGradArgs)); }
// Load-time int4 quantization of weights (quantize_load.inc)
KT_API int kt_quantize_int4(const kt::QuantInt4Args* args) {
  return kt::checked_call(args, kt::check_quant_int4_args, kt::quantize_int4);
}
KT_API int64_t kt_quantize_int4_args_size() { return static_cast<int64_t>(sizeof(kt::QuantInt4Args)); }
KT_API int kt_quantize_int8(const kt::QuantInt8Args* args) {
  return kt::checked_call(args, kt::check_quant_int8_args, kt::quantize_int8);
}
KT_API int64_t kt_quantize_int8_args_size() { return static_cast<int64_t>(sizeof(kt::QuantInt8Args)); }
KT_API int kt_pack_int4(const kt::PackInt4Args* args) {
  return kt::checked_call(args, kt::check_pack_int4_args, kt::pack_int4);
}
KT_API int64_t kt_pack_int4_args_size() { return static_cast<int64_t>(sizeof(kt::PackInt4Args)); }
KT_API int kt_expert_rows(const kt::RowsTArgs* args) {
  return kt::checked_call(args, kt::check_rows_args, kt::expert_rows);
}
KT_API int kt_linear_bf16(const float* x, int64_t T, int64_t K, const uint16_t* w, int64_t M, const float* bias,
                          float* out) {
  return kt::guarded([&] {
    if (T < 0 || T > kt::kMaxDim || K <= 0 || K > kt::kMaxDim || M <= 0 || M > kt::kMaxDim)
      return static_cast<int>(kt::ERR_SIZE);
    if (T == 0) return 0;
    if (!x || !w || !out) return static_cast<int>(kt::ERR_NULL);
    return kt::linear_bf16(x, T, K, w, M, bias, out);
  });
}
KT_API int kt_linear_packed(const kt::LinearArgs* args) {
  return kt::checked_call(args, kt::check_linear_args, kt::linear_packed);
}
KT_API int64_t kt_linear_args_size() { return static_cast<int64_t>(sizeof(kt::LinearArgs)); }
// The decode step's per-layer ops (norm_rope.inc, attention_decode.inc): each checks every size,
// pointer and index it reads before any kernel runs.
KT_API int kt_attention_decode(const kt::AttnDecodeArgs* args) {
  // (attention_decode's trailing parameters have defaults, which a function pointer drops)
  return kt::checked_call(args, kt::check_attn_decode_args,
                          [](const kt::AttnDecodeArgs& a) { return kt::attention_decode(a); });
}
KT_API int kt_mla_decode(const kt::MlaDecodeArgs* args) {
  return kt::checked_call(args, kt::check_mla_decode_args, kt::mla_decode);
}
KT_API int kt_rmsnorm(const kt::RmsNormArgs* args) {
  return kt::checked_call(args, kt::check_rmsnorm_args, kt::rmsnorm);
}
KT_API int kt_rope(const kt::RopeArgs* args) { return kt::checked_call(args, kt::check_rope_args, kt::rope); }
KT_API int kt_rmsnorm_backward(const kt::RmsNormGradArgs* args) {
  return kt::checked_call(args, kt::check_rmsnorm_grad_args, kt::rmsnorm_grad);
}
KT_API int64_t kt_rmsnorm_backward_args_size() { return static_cast<int64_t>(sizeof(kt::RmsNormGradArgs)); }
KT_API int kt_attn_softmax_grad(const kt::AttnSoftmaxGradArgs* args) {
  return kt::checked_call(args, kt::check_attn_softmax_grad_args, kt::attn_softmax_grad);
}
KT_API int64_t kt_attn_softmax_grad_args_size() { return static_cast<int64_t>(sizeof(kt::AttnSoftmaxGradArgs)); }
KT_API int kt_attn_scores_grad(const kt::AttnScoresGradArgs* args) {
  return kt::checked_call(args, kt::check_attn_scores_grad_args, kt::attn_scores_grad);
}
KT_API int64_t kt_attn_scores_grad_args_size() { return static_cast<int64_t>(sizeof(kt::AttnScoresGradArgs)); }
KT_API int kt_logsoftmax_grad(const kt::LogSoftmaxGradArgs* args) {
  return kt::checked_call(args, kt::check_logsoftmax_grad_args, kt::logsoftmax_grad);
}
KT_API int64_t kt_logsoftmax_grad_args_size() { return static_cast<int64_t>(sizeof(kt::LogSoftmaxGradArgs)); }
KT_API int64_t kt_attention_decode_args_size() { return static_cast<int64_t>(sizeof(kt::AttnDecodeArgs)); }
KT_API int64_t kt_mla_decode_args_size() { return static_cast<int64_t>(sizeof(kt::MlaDecodeArgs)); }
KT_API int64_t kt_rmsnorm_args_size() { return static_cast<int64_t>(sizeof(kt::RmsNormArgs)); }
KT_API int64_t kt_rope_args_size() { return static_cast<int64_t>(sizeof(kt::RopeArgs)); }
KT_API int64_t kt_moe_args_size() { return static_cast<int64_t>(sizeof(kt::MoeArgs)); }
KT_API int kt_decode_layers(const kt::DecodeStepArgs* args) {
  return kt::guarded([&] { return args ? kt::decode_layers(*args) : static_cast<int>(kt::ERR_NULL); });
}
KT_API int64_t kt_decode_layer_args_size() { return static_cast<int64_t>(sizeof(kt::DecodeLayerArgs)); }
KT_API int64_t kt_decode_step_args_size() { return static_cast<int64_t>(sizeof(kt::DecodeStepArgs)); }

#include "membw.inc"  // kt_membw, the benchmarks' bandwidth probe

// A CPython module so setuptools builds and names it like any extension; the functions
// above are reached through ctypes on this same file.
static struct PyModuleDef kt_module = {PyModuleDef_HEAD_INIT, "_kt_cpu", "kt-core CPU kernels (C ABI via ctypes)",
                                       -1, nullptr, nullptr, nullptr, nullptr, nullptr};
PyMODINIT_FUNC PyInit__kt_cpu(void) { return PyModule_Create(&kt_module); }
