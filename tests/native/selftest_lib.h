// The self-test's view of the native library: copies of its C ABI structs and codes, and loading
// it at run time (LoadLibrary / GetProcAddress on Windows, dlopen / dlsym elsewhere). A part of
// selftest_main.cpp (included once, after the standard and platform headers).
#pragma once

namespace {

// ---------------------------------------------------------------- the library's C ABI
// Copies of moe_args.inc's argument structs; kt_moe_args_size() must agree with sizeof.
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
  int scale_f16, down_scale_f16;
  float* save_gu;
};

// Copies of quantize_load.inc's argument structs (load-time quantization, int4 packing)
struct QuantInt4Args {
  int64_t rows, K, group;
  int src_dtype, symmetric, fp16, n_starts, refits, pool;
  const float* start_lo;
  const float* start_width;
  const void* src;
  uint8_t* codes;
  float* scale;
  float* zero;
};
struct QuantInt8Args {
  int64_t rows, K, group;
  int src_dtype, fp16, pool;
  const void* src;
  int8_t* codes;
  float* scale;
};
struct PackInt4Args {
  int64_t E, M, K;
  int pool;
  const uint8_t* codes;
  uint8_t* out;
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
  int (*quantize_int4)(const QuantInt4Args*);
  int64_t (*quantize_int4_args_size)();
  int (*quantize_int8)(const QuantInt8Args*);
  int64_t (*quantize_int8_args_size)();
  int (*pack_int4)(const PackInt4Args*);
  int64_t (*pack_int4_args_size)();
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
            bind(h, "kt_bf16_tile_tokens", lib.bf16_tile_tokens) & bind(h, "kt_quantize_int4", lib.quantize_int4) &
            bind(h, "kt_quantize_int4_args_size", lib.quantize_int4_args_size) &
            bind(h, "kt_quantize_int8", lib.quantize_int8) &
            bind(h, "kt_quantize_int8_args_size", lib.quantize_int8_args_size) & bind(h, "kt_pack_int4", lib.pack_int4) &
            bind(h, "kt_pack_int4_args_size", lib.pack_int4_args_size);
  if (ok && lib.moe_args_size() != static_cast<int64_t>(sizeof(MoeArgs))) {
    std::printf("FAIL load: kt_moe_args_size() is %lld, this program's MoeArgs is %lld bytes\n",
                static_cast<long long>(lib.moe_args_size()), static_cast<long long>(sizeof(MoeArgs)));
    ok = false;
  }
  if (ok && (lib.quantize_int4_args_size() != static_cast<int64_t>(sizeof(QuantInt4Args)) ||
             lib.quantize_int8_args_size() != static_cast<int64_t>(sizeof(QuantInt8Args)) ||
             lib.pack_int4_args_size() != static_cast<int64_t>(sizeof(PackInt4Args)))) {
    std::printf("FAIL load: the quantization argument structs' sizes differ from this program's copies\n");
    ok = false;
  }
  return ok;
}

}  // namespace
