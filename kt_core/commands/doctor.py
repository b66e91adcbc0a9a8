"""kt doctor: what this install can do, what is broken, and what to do about it."""
from __future__ import annotations

import importlib.metadata as md
import importlib.util
import os
import platform
import shutil
import sys
import sysconfig
from pathlib import Path

HELP = "check the install: torch build, CPU ISA, compiler, plugins, config; says what to do"
USAGE = """kt doctor

Prints one line per check (ok / note / PROBLEM) and a list of what to do.
Exit status 1 when a PROBLEM line is printed."""


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


def _compiler() -> tuple[str, str]:
    """(status, text) for the C++ compiler native CPU kernels would build with."""
    names = ("cl",) if sys.platform == "win32" else ("c++", "g++", "clang++")
    found = next((shutil.which(n) for n in names if shutil.which(n)), None)
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if found and headers.is_file():
        return "ok", f"{found}; Python headers at {headers.parent}"
    fix = ("install Visual Studio Build Tools (C++ workload) and run from a Developer prompt"
           if sys.platform == "win32" else "install a C++ compiler and Python headers (Debian: apt install g++ python3-dev)")
    missing = "no C++ compiler on PATH" if not found else f"no Python.h under {headers.parent}"
    return "note", f"{missing}; to build native kernels: {fix}"


# the native kernel variant that a CPU flag-level variant (kt_core.backend.cpuinfo) allows
_NATIVE_FOR_FLAGS = {"amx": "amx", "avx512_bf16": "avx512", "avx512_vnni": "avx512", "avx512": "avx2",
                     "avx2": "avx2", "generic": "generic"}
_NATIVE_ORDER = ["generic", "avx2", "avx_vnni", "avx512", "amx"]


def variant_gap(flags_variant: str, native_variant: str | None) -> str | None:
    """What to do when the native kernels run a lower variant than the CPU's flags allow
    (the OS did not enable the wider state), or None."""
    want = _NATIVE_FOR_FLAGS.get(flags_variant)
    if native_variant not in _NATIVE_ORDER or want is None:
        return None
    if _NATIVE_ORDER.index(native_variant) >= _NATIVE_ORDER.index(want):
        return None
    if want == "amx":
        why = ("the OS did not grant AMX's tile state (Linux grants it from kernel 5.16 on request; "
               "MSVC builds do not compile the AMX kernels)")
    else:
        why = "the OS does not save the AVX-512 registers (XCR0), as in some VMs"
    return f"the CPU has {want.upper()} but the native kernels run {native_variant}: {why}; prefill is slower"


def checks() -> tuple[list[tuple[str, str, str]], list[str]]:
    import torch

    from kt_core.backend.cpuinfo import cpu_info
    from kt_core.backend.registry import registry
    from kt_core.config.compose import config_dir, user_config_dir

    rows: list[tuple[str, str, str]] = []
    todo: list[str] = []
    rows.append(("python", "ok", f"{sys.version.split()[0]} on {platform.platform()}"))
    build = [f"CUDA {torch.version.cuda}" if torch.version.cuda else None,
             f"HIP {torch.version.hip}" if getattr(torch.version, "hip", None) else None,
             "XPU" if hasattr(torch, "xpu") and torch.xpu._is_compiled() else None]
    build = [b for b in build if b] or ["CPU only"]
    rows.append(("torch", "ok", f"{torch.__version__} ({', '.join(build)}); "
                                f"CPU capability {torch.backends.cpu.get_cpu_capability()}"))
    info = cpu_info()
    rows.append(("cpu", "ok", f"{info.model or info.arch}: {info.physical_cores} physical / "
                              f"{info.logical_cores} logical cores; ISA {info.isa_summary()} "
                              f"-> variant {info.variant} (from {info.source})"))
    if info.variant == "generic":
        todo.append("this CPU lacks AVX2/FMA: CPU experts run on torch's generic path and will be slow")
    status, text = _compiler()
    rows.append(("compiler", status, text))
    from kt_backends.cpu import native

    live = native.status()
    rows.append(("cpu kernels", "ok" if native.available() else "note", f"expert GEMM path: {live}"))
    gap = variant_gap(info.variant, native.variant())
    if gap:
        todo.append(gap)
    if not native.available() and "KT_NO_NATIVE" not in live:
        todo.append(f"native CPU kernels are off ({live.split(': ', 1)[-1].rstrip(')')}); "
                    "CPU experts run on the slower torch path")
    accel = []
    for name, st in registry().plugins().items():
        if st.error and st.cls is None:
            rows.append((f"plugin {name}", "PROBLEM", st.error))
            todo.append(f"plugin '{name}' does not import: reinstall the package that provides "
                        f"{st.source.split(':')[0]}, or uninstall it")
        else:
            rows.append((f"plugin {name}", "ok" if st.available else "note", st.reason))
            if st.available and name != "cpu":
                accel.append(name)
    if not accel:
        todo.append("no accelerator is usable: topology=cpu_only works here; for a GPU install the "
                    "vendor's torch build (CUDA, ROCm or XPU wheel index, or torch-npu) and rerun kt doctor")
    npu = importlib.util.find_spec("torch_npu") is not None
    autoload = os.environ.get("TORCH_DEVICE_BACKEND_AUTOLOAD", "1")
    if npu:
        from kt_backends.ascend import AscendBackend

        why = AscendBackend.mismatch()
        if why:
            rows.append(("torch_npu", "PROBLEM", why))
            todo.append(f"{why}; until then keep TORCH_DEVICE_BACKEND_AUTOLOAD=0 (now {autoload}) "
                        "when importing torch outside kt")
    rows.append(("hydra", "ok", f"hydra-core {_version('hydra-core')}, omegaconf {_version('omegaconf')}; "
                                f"configs in {config_dir()}"))
    local = [p for p in (config_dir() / "machine" / "local.yaml", user_config_dir() / "machine" / "local.yaml")
             if p.is_file()]
    rows.append(("machine config", "ok" if local else "note",
                 f"using {', '.join(map(str, local))}" if local else
                 f"none (optional: {user_config_dir() / 'machine' / 'local.yaml'})"))
    return rows, todo


def run(overrides, flags) -> int:
    from kt_core.errors import KtError

    if overrides:
        raise KtError(f"kt doctor takes no overrides (got {' '.join(overrides)})")
    rows, todo = checks()
    width = max(len(r[0]) for r in rows)
    for name, status, text in rows:
        print(f"{name.ljust(width)}  {status:<7}  {text}")
    print("\nwhat to do:" if todo else "\nwhat to do: nothing; kt-core is ready")
    for item in todo:
        print(f"  - {item}")
    return 1 if any(r[1] == "PROBLEM" for r in rows) else 0
