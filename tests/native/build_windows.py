"""Cross-build the native CPU kernels as a real Windows DLL with MinGW-w64 and run the console
self-test (tests/native/selftest_main.cpp) against it under wine.

    python tests/native/build_windows.py OUTDIR [--src DIR] [--opt O2] [--cxx G++] [--no-run] [--seed N]
                                                [--prefix WINEPREFIX]

OUTDIR receives kt_cpu.dll, kt_selftest.exe and the logs; the wine prefix made there for the run
(~700 MB) is removed after it (--prefix DIR: use and keep that one, which saves its creation).

The DLL is linked the way setuptools links an extension with MinGW (build_ext + the mingw32
compiler): a .def file that exports only PyInit__kt_cpu, so every kt_* function the self-test
finds had to be exported by the source itself, as ctypes needs on Windows. kt_cpu.cpp includes <Python.h>, which a cross
toolchain does not have: a stand-in declaring the three names the file uses is put on the include
path (a Windows build gets the real one).

Prints what it does; exits 0 when the build and the self-test pass, 1 otherwise, and 0 with a
line "skipped: <reason>" when MinGW-w64 or wine is not installed (Debian: apt install mingw-w64
wine64). Pure Python, no shell.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NATIVE = ROOT / "backends" / "cpu" / "native"
SELFTEST = Path(__file__).resolve().parent / "selftest_main.cpp"

# What the DLL must export: every entry point the sources declare KT_API (backends/cpu/native.py
# reaches them through ctypes), at least these (the self-test's), and the module's PyInit.
REQUIRED_EXPORTS = ("kt_abi_version", "kt_bf16_tile_tokens", "kt_isa", "kt_variant", "kt_set_variant",
                    "kt_variant_supported", "kt_set_threads", "kt_threads", "kt_set_pool_threads", "kt_moe_forward", "kt_moe_args_size",
                    "PyInit__kt_cpu")


def declared_exports(src: Path) -> set[str]:
    names = set(REQUIRED_EXPORTS)
    for f in sorted(src.glob("*.cpp")) + sorted(src.glob("*.inc")):
        names.update(re.findall(r"^KT_API\b[^(;{]*?\b(kt_\w+)\s*\(", f.read_text(errors="replace"), re.M))
    return names
# setup.py's extra_link_args for MinGW (keep the two the same)
def _setup_list(name: str) -> tuple:
    """A list constant of setup.py (one source for the MinGW link arguments)."""
    import ast

    tree = ast.parse((Path(__file__).resolve().parents[2] / "setup.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    raise SystemExit(f"setup.py has no {name}")


MINGW_LINK_ARGS = _setup_list("MINGW_LINK_ARGS")
# MinGW runtime DLLs that must not be needed beside kt_cpu.dll (setup.py links them statically)
MINGW_RUNTIME = re.compile(r"^(libgcc_s_\S+|libstdc\+\+-6|libwinpthread-1|libgomp-1)\.dll$", re.I)

PYTHON_H_STANDIN = """\
// Stand-in for <Python.h> in a cross build (tests/native/build_windows.py): only what kt_cpu.cpp
// uses. PyInit__kt_cpu is exported as in a real build; it is never called here.
#pragma once
typedef struct _object PyObject;
typedef struct { int placeholder; } PyModuleDef_Base;
#define PyModuleDef_HEAD_INIT {0}
struct PyModuleDef {
  PyModuleDef_Base m_base;
  const char* m_name;
  const char* m_doc;
  long m_size;
  void* m_methods;
  void* m_slots;
  void* m_traverse;
  void* m_clear;
  void* m_free;
};
#define PyMODINIT_FUNC extern "C" __declspec(dllexport) PyObject*
static inline PyObject* PyModule_Create(struct PyModuleDef*) { return 0; }
"""


# Compiler messages whose cause is not in the message: what they mean for these sources
HINTS = (
    ("is not a valid base/index expression",
     "GCC's AMX tile macros (amxtileintrin.h: _tile_loadd, _tile_stored) cast the stride to long, which "
     "is 32 bits on Windows, so the assembler gets a 32-bit index register: kernels_amx.hpp must not "
     "define KT_HAVE_AMX for MinGW GCC (or must pass the stride as a 64-bit integer itself)"),
    ("in namespace 'std' does not name a type",
     "this MinGW GCC uses the win32 thread model, which before GCC 13 has no std::thread / std::mutex: "
     "use the POSIX-thread compiler (x86_64-w64-mingw32-g++-posix; MSYS2's compilers are POSIX-thread)"),
)


def say(msg: str) -> None:
    print(f"[build_windows] {msg}", flush=True)


def find_compiler() -> tuple[str | None, str]:
    """The MinGW-w64 C++ compiler, preferring the POSIX thread model: GCC before 13 with the win32
    thread model (Debian's and Ubuntu's default x86_64-w64-mingw32-g++) has no std::thread or
    std::mutex, which the thread pool needs. MSYS2's compilers use the POSIX model."""
    for name in ("x86_64-w64-mingw32-g++-posix", "x86_64-w64-mingw32-g++"):
        path = shutil.which(name)
        if path:
            return path, name
    return None, "no x86_64-w64-mingw32-g++ on PATH (Debian: apt install mingw-w64)"


def find_wine() -> str | None:
    for name in ("wine64", "wine"):
        path = shutil.which(name)
        if path:
            return path
    # Debian's wine64 package alone (without its recommended "wine") puts the loader off PATH
    for path in ("/usr/lib/wine/wine64", "/usr/lib/x86_64-linux-gnu/wine/wine64"):
        if os.access(path, os.X_OK):
            return path
    return None


def run(cmd: list[str], log: Path, timeout: float, **kw) -> tuple[int, str, float]:
    say("$ " + " ".join(str(c) for c in cmd))
    t0 = time.monotonic()
    try:
        p = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           errors="replace", timeout=timeout, **kw)
        rc, out = p.returncode, p.stdout
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout if isinstance(exc.stdout, str) else (exc.stdout or b"").decode(errors="replace")
        rc, out = 124, out + f"\n[build_windows] timed out after {timeout:.0f} s\n"
    dt = time.monotonic() - t0
    log.write_text(out)
    return rc, out, dt


def pe_tables(dll: Path, cxx: str) -> tuple[set[str], list[str]] | None:
    """(exported names, imported DLL names) of a PE file, from the toolchain's objdump."""
    objdump = shutil.which(cxx.rsplit("-g++", 1)[0] + "-objdump") or shutil.which("x86_64-w64-mingw32-objdump")
    if not objdump:
        return None
    text = subprocess.run([objdump, "-p", str(dll)], stdout=subprocess.PIPE, text=True, errors="replace").stdout
    imports = re.findall(r"DLL Name:\s*(\S+)", text)
    exports: set[str] = set()
    in_names = False
    for line in text.splitlines():
        if line.startswith("[Ordinal/Name Pointer] Table"):
            in_names = True
            continue
        if in_names:
            m = re.match(r"\s*\[\s*\d+\]\s+(\S+)", line)
            if not m:
                break
            exports.add(m.group(1))
    return exports, imports


def build(out: Path, src: Path, cxx: str, opt: str) -> bool:
    shim = out / "pyshim"
    shim.mkdir(parents=True, exist_ok=True)
    (shim / "Python.h").write_text(PYTHON_H_STANDIN)
    deffile = out / "kt_cpu.def"  # what setuptools' mingw32 compiler writes for an extension
    deffile.write_text("LIBRARY kt_cpu.dll\nEXPORTS\nPyInit__kt_cpu\n")
    dll, exe = out / "kt_cpu.dll", out / "kt_selftest.exe"
    for f in (dll, exe):
        f.unlink(missing_ok=True)
    # setup.py's GNU compile flags (at -O2 here) and MinGW link flags: the C++ runtime and
    # winpthread (the POSIX thread model's runtime, which std::thread needs) linked in, so the DLL
    # needs no MinGW DLL beside it. -s and the .def file are what setuptools adds itself.
    cmd = [cxx, f"-{opt}", "-std=c++17", "-fvisibility=hidden", "-shared", "-s", f"-I{shim}", "-o", dll,
           src / "kt_cpu.cpp", deffile, *MINGW_LINK_ARGS]
    rc, text, dt = run(cmd, out / "build_dll.log", timeout=900)
    say(f"kt_cpu.dll: {'built' if rc == 0 else 'FAILED'} in {dt:.1f} s")
    if rc != 0:
        errors = [ln for ln in text.splitlines() if re.search(r"\berror\b|Error:", ln)]
        for ln in (errors or text.splitlines())[:40]:
            print("    " + ln)
        for needle, hint in HINTS:
            if needle in text.replace("\u2018", "'").replace("\u2019", "'"):
                say("hint: " + hint)
        say(f"full compiler output: {out / 'build_dll.log'}")
        return False
    warnings = [ln for ln in text.splitlines() if "warning:" in ln]
    for ln in warnings[:20]:
        print("    " + ln)
    tables = pe_tables(dll, cxx)
    if tables is None:
        say("no MinGW objdump: exports and imports not checked")
    else:
        exports, imports = tables
        say(f"kt_cpu.dll imports: {', '.join(imports)}")
        missing = sorted(s for s in declared_exports(src) if s not in exports)
        runtime = [d for d in imports if MINGW_RUNTIME.match(d)]
        say(f"kt_cpu.dll exports {len(exports)} names; missing: {', '.join(missing) or 'none'}")
        if runtime:
            say(f"FAIL: kt_cpu.dll needs MinGW runtime DLLs beside it: {', '.join(runtime)}")
            return False
        if missing:
            say("FAIL: exports missing: with setuptools' .def (PyInit only), each kt_* function must be "
                "marked __declspec(dllexport) on Windows (KT_API in kt_cpu.cpp), not only with the "
                "visibility attribute, which PE targets ignore")
            return False
    cmd = [cxx, f"-{opt}", "-std=c++17", "-Wall", "-static", "-o", exe, SELFTEST]
    rc, text, dt = run(cmd, out / "build_selftest.log", timeout=600)
    say(f"kt_selftest.exe: {'built' if rc == 0 else 'FAILED'} in {dt:.1f} s")
    if rc != 0 or "warning:" in text:
        for ln in text.splitlines()[:40]:
            print("    " + ln)
    return rc == 0


def run_selftest(out: Path, wine: str, seed: int, timeout: float, prefix: Path | None) -> bool:
    own = prefix is None  # a prefix of our own (~700 MB), removed afterwards; --prefix keeps one for reuse
    prefix = out / "wineprefix" if own else prefix
    env = dict(os.environ)
    env.update({
        "WINEPREFIX": str(prefix),  # never the user's ~/.wine
        "WINEDEBUG": "-all",
        "WINEDLLOVERRIDES": "mscoree,mshtml=",  # no Mono / Gecko install prompts
        "DISPLAY": "",
    })
    env.pop("WINEARCH", None)
    first = not prefix.exists()
    if first:
        say(f"creating the wine prefix {prefix}")
    cmd = [wine, "kt_selftest.exe", "kt_cpu.dll", "--seed", str(seed)]
    rc, text, dt = run(cmd, out / "selftest.log", timeout=timeout, cwd=out, env=env)
    lines = [ln.rstrip("\r") for ln in text.splitlines()]
    cases = [ln for ln in lines if ln.startswith(("ok ", "FAIL"))]
    for ln in lines:
        if not ln.startswith("ok "):  # every failure and summary line; the ok lines are in the log
            print("    " + ln)
    n_ok = sum(ln.startswith("ok ") for ln in cases)
    say(f"self-test under wine: exit {rc} in {dt:.1f} s{' (including prefix creation)' if first else ''}; "
        f"{n_ok} ok, {len(cases) - n_ok} FAIL; every line in {out / 'selftest.log'}")
    wineserver = (shutil.which("wineserver64") or shutil.which("wineserver")
                  or next((p for p in ("/usr/lib/wine/wineserver64", "/usr/lib/wine/wineserver") if os.access(p, os.X_OK)), None))
    if wineserver:  # end this prefix's wineserver now instead of in a few seconds
        subprocess.run([wineserver, "-k"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=60, check=False)
    if own:
        shutil.rmtree(prefix, ignore_errors=True)
    return rc == 0 and n_ok > 0 and n_ok == len(cases) and "SELFTEST PASSED" in text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--src", type=Path, default=NATIVE, help="native source folder (default: %(default)s)")
    ap.add_argument("--opt", default="O2", help="optimization level (default: %(default)s)")
    ap.add_argument("--cxx", help="the MinGW-w64 C++ compiler (default: the POSIX-thread one on PATH)")
    ap.add_argument("--no-run", action="store_true", help="build only")
    ap.add_argument("--seed", type=int, default=0, help="the self-test's pseudo-random data")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds for the whole wine run")
    ap.add_argument("--prefix", type=Path, help="a wine prefix to use and keep (default: a fresh one in OUTDIR, "
                    "removed after the run)")
    args = ap.parse_args(argv)
    cxx, why = find_compiler()
    if args.cxx:
        cxx = shutil.which(args.cxx)
        if cxx is None:
            print(f"no compiler {args.cxx}")
            return 1
    if cxx is None:
        print(f"skipped: {why}")
        return 0
    wine = find_wine()
    if wine is None and not args.no_run:
        print("skipped: no wine64 or wine on PATH (Debian: apt install wine64)")
        return 0
    out = args.outdir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    say(f"compiler {cxx}; sources {args.src}; output {out}")
    t0 = time.monotonic()
    if not build(out, args.src.resolve(), cxx, args.opt):
        say(f"FAILED (build) after {time.monotonic() - t0:.1f} s")
        return 1
    if args.no_run:
        say(f"built in {time.monotonic() - t0:.1f} s (not run: --no-run)")
        return 0
    ok = run_selftest(out, wine, args.seed, args.timeout, args.prefix.resolve() if args.prefix else None)
    say(f"{'PASSED' if ok else 'FAILED'} in {time.monotonic() - t0:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
