"""Fetch llama.cpp's own HF -> GGUF converter for the GGUF parity tests (an independent writer of
the files kt-core reads). It ships in the llama-cpp-python sdist on PyPI; only the converter script
and its gguf-py are unpacked, nothing is built and nothing of it enters the project.

    python tests/fetch_converter.py DIR     # then: KT_LLAMACPP_SRC=DIR pytest -m slow

Exits 0 with a note when PyPI cannot be reached (the tests that need it then skip, saying so).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST = "llama-cpp-python==0.3.36"  # vendors llama.cpp commit 0c1e570, as ../shared/tools/llamacpp builds
KEEP = ("vendor/llama.cpp/convert_hf_to_gguf.py", "vendor/llama.cpp/conversion/", "vendor/llama.cpp/gguf-py/")


def main(out: Path) -> int:
    if (out / "convert_hf_to_gguf.py").is_file():
        print(f"converter already in {out}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", SDIST, "-d", tmp]
        if subprocess.run(cmd).returncode != 0:
            print(f"note: could not download {SDIST}; the llama.cpp converter tests will skip", file=sys.stderr)
            return 0
        archive = next(Path(tmp).glob("*.tar.gz"))
        final, out = out, Path(tmp) / "converter"  # unpacked aside, then moved: never half a converter
        out.mkdir()
        with tarfile.open(archive) as tar:
            for m in tar.getmembers():
                rel = m.name.split("/", 1)[1] if "/" in m.name else ""
                if not any(rel == k or (k.endswith("/") and rel.startswith(k)) for k in KEEP):
                    continue
                if not (m.isfile() or m.isdir()) or ".." in Path(rel).parts:
                    continue
                dest = out / rel[len("vendor/llama.cpp/"):]
                if m.isdir():
                    dest.mkdir(parents=True, exist_ok=True)
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(tar.extractfile(m).read())
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(final, ignore_errors=True)
        shutil.move(str(out), str(final))
    print(f"llama.cpp converter in {final}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/fetch_converter.py DIR")
    sys.exit(main(Path(sys.argv[1])))
