"""One kernel variant forced, two or more whole revisions of kt-core, alternating processes: the
no-regression check for the CPUs a session does not sit on.

An AMX Xeon runs the `avx512` and `avx2` kernel variants too (native.set_variant), which is what
an AVX-512-only CPU (Zen 4) and an AVX2-only one pick; this script runs each revision's own
bench/moe_layer.py (its Python packing, its native kernels built from that revision's sources with
the same compiler flags) with the variant forced, in alternating processes, and prints one JSON
line per revision, format and token count: the median ms over the rounds and the ratio to the first
revision. What differs from the real CPUs is the memory system and the core, not the code.

    python bench/variant_ab.py --rev ca65283 --rev worktree --variant avx2 --rounds 3 -- \
        --tokens 1,128,512 --formats bf16,int8,int4,fp8 --repeats 5

Revisions other than "worktree" are exported with `git archive` into a temporary folder. Needs a
POSIX C++ compiler (as bench/ab_native.py).
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit  # noqa: E402
from ab_native import compile_lib  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# The child: the tree's packages under their installed names (kt_backends is the folder backends/,
# kt_conf is conf/), so this checkout's editable install does not answer for them; then the variant,
# then the tree's own bench/moe_layer.py.
CHILD = r"""
import importlib.util, runpy, sys
from pathlib import Path
tree, variant, argv = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
sys.path[:0] = [str(tree), str(tree / "bench")]
for name, folder in (("kt_backends", "backends"), ("kt_conf", "conf")):
    spec = importlib.util.spec_from_file_location(name, tree / folder / "__init__.py",
                                                  submodule_search_locations=[str(tree / folder)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
from kt_backends.cpu import native
assert Path(native.__file__).resolve().is_relative_to(tree.resolve()), native.__file__
native.set_variant(variant)
sys.argv = [str(tree / "bench" / "moe_layer.py"), *argv]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def export(rev: str, into: Path) -> Path:
    """The tree of rev (git archive), or this checkout for "worktree"."""
    if rev == "worktree":
        return ROOT
    dst = into / rev.replace("/", "_").replace("~", "-").replace("^", "-")
    blob = subprocess.run(["git", "archive", "--format=tar", rev], cwd=ROOT, capture_output=True)
    if blob.returncode:
        sys.exit(f"--rev {rev}: {blob.stderr.decode().strip()}")
    with tarfile.open(fileobj=io.BytesIO(blob.stdout)) as tar:
        # our own repository's archive; the "data" filter where this Python has it (3.11.4+, 3.12)
        tar.extractall(dst, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    return dst


def build(tree: Path, into: Path, name: str) -> Path:
    """tree's native sources compiled (bench/ab_native.py's flags) into a copy of tree's packages
    when tree is this checkout (its installed library may be built differently), else in place."""
    src = into / f"{name}-native"
    shutil.copytree(tree / "backends" / "cpu" / "native", src)
    lib = compile_lib(src)
    if tree == ROOT:  # a copy of the packages the child imports, with the fresh library
        copy = into / name
        for part in ("kt_core", "backends", "conf", "bench"):
            shutil.copytree(tree / part, copy / part, ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
        tree = copy
    shutil.copy(lib, tree / "backends" / "cpu" / f"_kt_cpu{sysconfig.get_config_var('EXT_SUFFIX')}")
    return tree


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", action="append", required=True, help="git revision or 'worktree' (2 or more)")
    ap.add_argument("--variant", required=True, help="kernel variant to force: avx2, avx_vnni, avx512, amx, generic")
    ap.add_argument("--rounds", type=int, default=3, help="alternating processes per revision")
    ap.add_argument("moe_layer_args", nargs=argparse.REMAINDER, help="after --: bench/moe_layer.py's arguments")
    a = ap.parse_args()
    if len(a.rev) < 2:
        sys.exit("give at least two --rev (e.g. --rev HEAD~5 --rev worktree)")
    passed = [x for x in a.moe_layer_args if x != "--"]
    if "--vs-ktkernel" in passed:
        sys.exit("--vs-ktkernel does not belong here: this compares kt-core revisions")
    if "--no-torch" not in passed:
        passed.append("--no-torch")
    with tempfile.TemporaryDirectory() as tmp:
        trees = [build(export(rev, Path(tmp)), Path(tmp), f"b{i}") for i, rev in enumerate(a.rev)]
        runs: dict[tuple[int, str, int], list[float]] = {}
        for r in range(a.rounds):
            for i in [(r + j) % len(trees) for j in range(len(trees))]:  # each round starts one later
                done = subprocess.run([sys.executable, "-c", CHILD, str(trees[i]), a.variant, *passed],
                                      capture_output=True, text=True)
                if done.returncode:
                    sys.exit(f"--rev {a.rev[i]} failed:\n{done.stderr[-3000:]}")
                for line in done.stdout.splitlines():
                    row = json.loads(line)
                    if row.get("impl") == "membw":
                        if row.get("variant") != a.variant:
                            sys.exit(f"--rev {a.rev[i]} ran variant {row.get('variant')}, not {a.variant}")
                        emit({"impl": "membw", "rev": a.rev[i], "round": r, "gbps": row["gbps"]})
                    elif row.get("impl") == "kt-core":
                        runs.setdefault((i, row["format"], row["tokens"]), []).append(row["ms"])
    for (i, fmt, T), ms in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        base = statistics.median(runs[(0, fmt, T)]) if (0, fmt, T) in runs else None
        med = statistics.median(ms)
        emit({"impl": "variant-ab", "variant": a.variant, "rev": a.rev[i], "format": fmt, "tokens": T,
              "ms": med, "runs_ms": [round(x, 3) for x in ms],
              "ratio_vs_first": med / base if base else None})


if __name__ == "__main__":
    main()
