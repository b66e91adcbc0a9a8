"""The native kernels under AddressSanitizer and UndefinedBehaviorSanitizer.

backends/cpu/native/kt_cpu.cpp is compiled with -fsanitize=address,undefined into a temporary
folder; tests/unit/test_native*.py and the default part of test_fuzz_ktq.py (the
damaged .ktq files the loader accepts run through the kernels) then run in a subprocess that
loads that build (KT_NATIVE_LIB) with libasan preloaded into Python. Any out-of-bounds access,
use after free or undefined behaviour (misaligned access, signed overflow, bad shift, ...)
fails the run.
The run forces every kernel variant this CPU has, AMX included, as test_native.py does.

Linux with g++ (or clang++) and its libasan only; elsewhere it is skipped with the reason.
It takes minutes (an -O1 instrumented build, every variant), so it is in the slow set:
``pytest -m slow tests/unit/test_sanitizers.py``.
"""
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "backends" / "cpu" / "native" / "kt_cpu.cpp"
# every tests/unit/test_native*.py (the experts, the C ABI's boundary, packed dense weights), and
# the fuzzed .ktq files that load run through the kernels too: damage that passes the loader's
# checks must still never make them read out of bounds
TESTS = sorted(str(p.relative_to(ROOT).as_posix()) for p in (ROOT / "tests" / "unit").glob("test_native*.py"))
TESTS += ["tests/unit/test_fuzz_ktq.py"]
FLAGS = ["-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", "-fsanitize=address,undefined",
         "-fno-omit-frame-pointer", "-O1", "-g"]

# the dense kernel told K=64 for rows of 16 floats: it reads past the end of x
OVERREAD = """
import ctypes, torch
from kt_backends.cpu import native
lib = native._need()
x, w, out = torch.zeros(1, 16), torch.zeros(4, 64, dtype=torch.bfloat16), torch.zeros(1, 4)
lib.kt_linear_bf16(x.data_ptr(), 1, 64, w.data_ptr(), 4, None, out.data_ptr())
"""


def toolchain():
    """(compiler, its ASan runtime for LD_PRELOAD, extra flags) or (None, why not)."""
    if not sys.platform.startswith("linux"):
        return None, f"the sanitizer run preloads libasan into Python: Linux only (this is {sys.platform})"
    for name, runtime, extra in (("g++", "libasan.so", []),
                                 ("clang++", "libclang_rt.asan-x86_64.so", ["-shared-libasan"])):
        cxx = shutil.which(name)
        if cxx is None:
            continue
        found = subprocess.run([cxx, f"-print-file-name={runtime}"], capture_output=True, text=True).stdout.strip()
        if found and os.path.isabs(found) and os.path.exists(found):
            return (cxx, os.path.realpath(found), extra), ""
    return None, "no g++ or clang++ with an ASan runtime (libasan.so) here"


TOOLS, WHY = toolchain()


@pytest.mark.slow
@pytest.mark.skipif(TOOLS is None, reason=WHY or "no sanitizer toolchain")
def test_native_tests_pass_under_asan_and_ubsan(tmp_path):
    cxx, libasan, extra = TOOLS
    lib = tmp_path / "_kt_cpu_asan.so"
    build = subprocess.run([cxx, *FLAGS, *extra, f"-I{sysconfig.get_paths()['include']}", str(SOURCE), "-o",
                            str(lib)], capture_output=True, text=True, cwd=ROOT, timeout=900)
    if build.returncode and "sanitize" in build.stderr and "unrecognized" in build.stderr:
        pytest.skip(f"{cxx} cannot build with -fsanitize=address,undefined: {build.stderr.strip()[-300:]}")
    assert build.returncode == 0, f"the sanitizer build failed:\n{build.stderr[-4000:]}"
    env = dict(os.environ, LD_PRELOAD=libasan, KT_NATIVE_LIB=str(lib), PYTHONPATH=str(ROOT),
               ASAN_OPTIONS="detect_leaks=0",  # Python and torch keep memory to exit: not our leaks
               UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1")
    env.pop("KT_NO_NATIVE", None)
    probe = subprocess.run([sys.executable, "-c", "from kt_backends.cpu import native; "
                            "print(native.library_path()); print(native.status())"],
                           capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert probe.returncode == 0 and probe.stdout.splitlines()[:1] == [str(lib)], \
        f"the subprocess did not load the sanitizer build:\n{probe.stdout}\n{probe.stderr[-3000:]}"
    # the harness is live: a read past a buffer (which the Python checks would refuse) is reported
    oob = subprocess.run([sys.executable, "-c", OVERREAD], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=300)
    assert oob.returncode != 0 and "ERROR: AddressSanitizer: heap-buffer-overflow" in oob.stderr, \
        f"ASan did not catch a deliberate over-read:\n{oob.stdout}\n{oob.stderr[-3000:]}"
    run = subprocess.run([sys.executable, "-m", "pytest", *TESTS, "-q", "-p", "no:cacheprovider"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=3600)
    out = run.stdout + run.stderr
    for marker in ("ERROR: AddressSanitizer", "runtime error:", "ERROR: LeakSanitizer"):
        assert marker not in out, f"{marker} in the native tests:\n{out[-12000:]}"
    assert run.returncode == 0, f"the native tests failed under the sanitizers (rc {run.returncode}):\n{out[-12000:]}"
    assert re.search(r"\b[1-9]\d* passed", out), f"no native test ran:\n{out[-3000:]}"
