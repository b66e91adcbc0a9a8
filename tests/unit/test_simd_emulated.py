"""The SIMD kernels this CPU cannot run, run anyway: the AVX-512 (F/BW/VNNI/BF16) and AVX-VNNI
kernels compiled against SIMDe's portable AVX-512 (PyPI ``simde-py``), the AMX kernels against a model of the tile
instructions (tests/native/amx_model.h), both compared with the AVX2 kernels on every format,
token-tile tail and panel offset (tests/native/simd_emulated.cpp). This checks their
arithmetic and data layouts on any x86 machine with AVX2; what emulation cannot check (the
real instructions, the OS granting their state) the first-use self-check in kt_cpu.cpp covers
on the hardware itself."""
from __future__ import annotations

import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from kt_backends.cpu import native

ROOT = Path(__file__).resolve().parents[2]
NATIVE_SRC = ROOT / "backends" / "cpu" / "native"
HARNESS = ROOT / "tests" / "native" / "simd_emulated.cpp"


def _compiler() -> str | None:
    for name in ("c++", "g++", "clang++"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _simde_include() -> str | None:
    try:
        import simde_py
    except ImportError:
        return None
    return simde_py.get_include()


def simde_map() -> str:
    """#defines that send every _mm512_* intrinsic (and the 512-bit types) the AVX-512
    kernels use to SIMDe's implementation of it."""
    src = "".join(path.read_text() for path in sorted(NATIVE_SRC.glob("*.hpp")) + sorted(NATIVE_SRC.glob("*.inc")))
    names = sorted(set(re.findall(r"\b_mm512_\w+", src)))
    lines = ["#pragma once"] + [f"#define __{t} simde__{t}" for t in ("m512", "m512i", "m512d", "m512bh")]
    lines += [f"#define {n} simde{n}" for n in names]
    # AVX-VNNI's VEX forms compute what AVX512-VL's 256-bit forms do; SIMDe has the latter
    vnni = sorted(set(re.findall(r"\b_mm256_dp\w+_avx_epi32\b", (NATIVE_SRC / "kernels.hpp").read_text())))
    lines += [f"#define {n} simde{n.replace('_avx_epi32', '_epi32')}" for n in vnni]
    return "\n".join(lines) + "\n"


def test_avx512_amx_and_avx_vnni_kernels_match_avx2_under_emulation(tmp_path):
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the emulation harness is built for x86-64 (it runs the AVX2 kernels natively)")
    if not native.available() or native.variant() == "generic":
        pytest.skip(f"needs a CPU with AVX2+FMA+F16C and the native kernels ({native.status()})")
    cxx, include = _compiler(), _simde_include()
    if cxx is None:
        pytest.skip("no C++ compiler (c++, g++ or clang++) on PATH")
    if include is None:
        pytest.skip("SIMDe headers missing: pip install simde-py (in kt-core's [dev] extra)")
    (tmp_path / "kt_simde_map.h").write_text(simde_map())
    exe = tmp_path / "simd_emulated"
    build = subprocess.run([cxx, "-O1", "-std=c++17", "-mavx2", "-mfma", "-mf16c", f"-I{include}", f"-I{tmp_path}",
                            f"-I{NATIVE_SRC}", str(HARNESS), "-o", str(exe)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    failed = [line for line in run.stdout.splitlines() if line.startswith("FAIL")]
    assert run.returncode == 0 and not failed, "\n".join(failed[:20]) or run.stderr[-2000:]
    assert re.search(r"^0 failures$", run.stdout, re.M), run.stdout[-2000:]
    assert run.stdout.count("ok  ") >= 150  # every case ran
    assert run.stdout.count("ok   rows_t avx512") == 70  # (bf16, fp8, w8a8, 2 int8 and 2 int4 kinds) x 2 K x 5 n
    if "amx not compiled" not in run.stdout:  # compilers before GCC 11 / Clang 12 build no AMX kernels
        # (at least) bf16, 3 int8 kinds (per row, groups, groups with zero points), 4 int4 kinds, 2 fp8 groups x 8 token
        # counts x 3 panels, alone and paired with the next panel (both outputs); w8a8 x 8 counts x 3 (where
        # amx_q8_takes them)
        assert run.stdout.count("ok   amx") >= 2 * 9 * 8 * 3 + 6 * 3
        assert "ok   amx fmt=1 group=32 zeros=1" in run.stdout and "ok   fmt=1 group=32 zeros=1" in run.stdout
        # groups of 16: a weight group boundary inside each 32-input B tile (decode_inputs_bf16)
        assert all(f"ok   amx fmt={f} group=16 zeros={z}" in run.stdout for f, z in ((1, 1), (2, 0), (2, 1), (3, 0)))
        # int4 with one group a row (K = 512: quant.group_size=0), on the integer tiles and the vector kernels
        assert all(f"ok   {v}fmt=2 group=512 zeros={z}" in run.stdout for v in ("amx ", "") for z in (0, 1))
        # and per-row int4 / int8 rows of 544 inputs (K % 64 == 32: 32-input integer steps, bf16 tiles from 17 tokens)
        assert all(f"ok   amx fmt={f} group=544 zeros={z}" in run.stdout for f, z in ((2, 0), (2, 1), (1, 0)))
        assert "FAIL amx" not in run.stdout
        assert run.stdout.count("ok   amx attention") == 16 + 4  # 2 head groups x 4 key counts x 2 products
        # and fine-tuning's: 2 key counts x (the scores, a row's softmax gradient)
        assert run.stdout.count("ok   amx attention training") == 4
        assert run.stdout.count("ok   amx rows_t") == 24  # bf16, fp8, 2 int8 and 2 int4 kinds x 4 row counts
        assert run.stdout.count("ok   avx_vnni") == 210  # (3 int8 kinds, w8a8, 6 int4 kinds) x 7 token counts x 3 panels
        # 7 token counts of 2+ (dp_min_rows of bf16) x 3 panels x 2 K (512; 544: a K block of 32 after two of 256), alone
        # and paired, and training's transposed products: (bf16, fp8, 2 int8 and 2 int4 kinds) x 4 row counts
        # int8 / int4 / fp8 decoded to bf16 pairs: 21 weight kinds (the amx cases') x the 6 token counts past
        # dp_min_rows (fp8 6, int8 / int4 16) x 3 panels x (alone, paired twice)
        assert run.stdout.count("ok   avx512bf16 decoded") == 21 * 6 * 3 * 3
        assert run.stdout.count("ok   avx512bf16") == 42 + 84 + 36 + 3 + 21 * 6 * 3 * 3  # and the one-token GEMV at 3 K
        assert run.stdout.count("ok   gemv avx512") == 3
        assert run.stdout.count("ok   avx512bf16 rows_t") == 36  # 6 kinds x 6 row counts
        assert run.stdout.count("ok   avx512bf16 pair") == 84
