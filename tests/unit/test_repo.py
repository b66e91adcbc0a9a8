"""The repository's own promises: README commands, .ci/run, the CI workflow, hygiene."""
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
TEST_COMMAND = 'python -m pip install torch==2.13.0 -e ".[dev]" && python -m pytest'


def test_readme_has_the_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert TEST_COMMAND in readme
    assert re.search(r"python -m pip install torch==2\.13\.0 -e \. && kt \w+", readme)
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert TEST_COMMAND in ci
    assert '"$rc" -eq 5' in ci, ".ci/run must fail when pytest ran nothing"


def test_workflow_is_valid_and_covers_the_vendor_matrix():
    wf = yaml.safe_load((ROOT / ".github" / "workflows" / "ci.yml").read_text(encoding="utf-8"))
    jobs = wf["jobs"]
    assert set(jobs["cpu"]["strategy"]["matrix"]["os"]) == {"ubuntu-latest", "windows-latest"}
    accel = jobs["accelerators"]["strategy"]["matrix"]
    assert set(accel["backend"]) == {"cuda", "rocm", "xpu", "ascend"} and set(accel["os"]) == {"linux", "windows"}
    runs = [s.get("run", "") for job in jobs.values() for s in job["steps"]]
    assert TEST_COMMAND in runs
    assert any("--backend ${{ matrix.backend }} --strict-backend" in r for r in runs)


def test_setup_keeps_torch_a_range_and_declares_builtin_plugins():
    setup = (ROOT / "setup.py").read_text(encoding="utf-8")
    assert re.search(r'"torch>=[\d.]+,<\d+"', setup) and "torch==" not in setup
    for b in ("cpu", "cuda", "rocm", "xpu", "ascend"):
        assert b in setup
    assert '"kt_core.backends"' in setup


def test_library_is_windows_safe():
    """No POSIX-only modules on import paths, no fork-only multiprocessing, no prints."""
    posix_only = re.compile(r"^\s*(import|from)\s+(fcntl|termios|pwd|grp|resource|posix)\b", re.M)
    for path in list((ROOT / "kt_core").rglob("*.py")) + list((ROOT / "backends").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        assert not posix_only.search(text), path
        assert "os.fork" not in text and "set_start_method(\"fork\"" not in text, path
        if "commands" not in path.parts and path.name != "cli.py":
            assert not re.search(r"^\s*print\(", text, re.M), f"library code prints: {path}"


def test_compiler_flags_follow_the_compiler_not_the_platform():
    """MinGW on Windows is a GNU compiler: MSVC's /O2 flags would break its build."""
    setup = (ROOT / "setup.py").read_text(encoding="utf-8")
    assert "compiler_type" in setup and "sys.platform ==" not in setup
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "KT_REQUIRE_NATIVE=1" in ci and "-m slow" in ci
