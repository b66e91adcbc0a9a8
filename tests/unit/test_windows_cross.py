"""The native CPU kernels as a Windows DLL: cross-built with MinGW-w64 and run under wine by
tests/native/build_windows.py, whose console self-test (tests/native/selftest_main.cpp) loads the
DLL through its real exports and runs every kernel variant the CPU has on every weight format
against the generic variant. That exercises what only a Windows build has: the PE exports that
ctypes needs, the thread pool on Windows threads, the CPU detection of a non-Linux build.

The same self-test also runs natively here against the extension setup.py built, so the harness
is checked on every machine with a C++ compiler, wine or not."""
from __future__ import annotations

import importlib.util
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "native" / "build_windows.py"
SELFTEST = ROOT / "tests" / "native" / "selftest_main.cpp"


def _build_windows():
    spec = importlib.util.spec_from_file_location("kt_build_windows", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tail(text: str, n: int = 60) -> str:
    return "\n".join(text.splitlines()[-n:])


@pytest.mark.slow  # two MinGW compiles and a wine start: ~25 s on two cores
def test_windows_dll_selftest_under_wine(tmp_path):
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("wine runs the x86-64 DLL on x86-64 hosts only")
    bw = _build_windows()
    cxx, why = bw.find_compiler()
    if cxx is None:
        pytest.skip(why)
    if bw.find_wine() is None:
        pytest.skip("no wine64 or wine on PATH (Debian: apt install wine64)")
    run = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "win")], capture_output=True, text=True,
                         timeout=1800)
    out = run.stdout + run.stderr
    assert "skipped:" not in out, out
    assert run.returncode == 0, _tail(out)
    assert "SELFTEST PASSED" in out and "[build_windows] PASSED" in out, _tail(out)
    log = (tmp_path / "win" / "selftest.log").read_text(errors="replace")
    ran = [line for line in log.splitlines() if line.startswith("variants run:")]
    assert ran and "generic" in ran[0], _tail(log)
    # every format at every token count ran on every variant that ran
    for variant in ran[0].split(":", 1)[1].split(";")[0].split(","):
        variant = variant.strip()
        for fmt in ("bf16", "int8", "int4", "w8a8", "fp8"):
            for T in (1, 7, 37):
                assert f"ok {variant} {fmt} T={T} " in log, f"no 'ok {variant} {fmt} T={T}' line"


def test_build_windows_skips_without_mingw(tmp_path):
    """The script's contract where the tools are missing: a 'skipped:' line and exit status 0."""
    run = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "win")], capture_output=True, text=True,
                         env={"PATH": str(tmp_path / "empty")}, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.startswith("skipped: no x86_64-w64-mingw32-g++"), run.stdout


def test_selftest_natively_against_the_built_extension(tmp_path):
    """selftest_main.cpp through dlopen on the extension setup.py built (the same C ABI)."""
    from kt_backends.cpu import native

    if not native.available():
        pytest.skip(f"native CPU kernels: {native.status()}")
    if sys.platform != "linux":
        pytest.skip("the native run of the self-test is wired for Linux (fork, /proc/self/exe)")
    cxx = next((shutil.which(n) for n in ("c++", "g++", "clang++") if shutil.which(n)), None)
    if cxx is None:
        pytest.skip("no C++ compiler (c++, g++ or clang++) on PATH")
    lib = importlib.util.find_spec("kt_backends.cpu._kt_cpu").origin
    exe = tmp_path / "kt_selftest"
    build = subprocess.run([cxx, "-O1", "-std=c++17", "-pthread", str(SELFTEST), "-o", str(exe), "-ldl"],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(exe), lib, "--timeout", "600"], capture_output=True, text=True, timeout=900)
    if run.returncode != 0 and "undefined symbol: Py" in run.stdout:
        pytest.skip("this extension was linked to resolve Python's symbols at load time; dlopen needs a Python")
    failed = [line for line in run.stdout.splitlines() if line.startswith("FAIL")]
    assert run.returncode == 0 and not failed, "\n".join(failed[:20]) or _tail(run.stdout + run.stderr)
    assert "SELFTEST PASSED" in run.stdout
    for variant in native.supported_variants():
        assert f"ok {variant} int4 T=37 " in run.stdout, variant
