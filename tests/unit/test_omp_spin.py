"""kt_core/runtime/omp.py: `kt` shortens OpenMP's idle spin before torch loads, and leaves a user's own
setting, or a process where torch already loaded, alone. Checked in fresh interpreters."""
import json
import os
import subprocess
import sys

PROBE = """
import json, os, sys
if sys.argv[1] == "torch-first":
    import torch
from kt_core.runtime.omp import shorten_idle_spin
print(json.dumps([shorten_idle_spin(), os.environ.get("GOMP_SPINCOUNT")]))
"""
CLI = """
import json, os
from kt_core.cli import main
main(["--help"])
print("\\n" + json.dumps(os.environ.get("GOMP_SPINCOUNT")))
"""


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    env.update(extra)
    return env


def _run(code, *args, **extra):
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                          env=_env(**extra))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_set_before_torch_loads():
    from kt_core.runtime.omp import SPINCOUNT

    assert _run(PROBE, "fresh") == [True, SPINCOUNT]


def test_users_setting_and_a_loaded_torch_are_left_alone():
    assert _run(PROBE, "fresh", GOMP_SPINCOUNT="5") == [False, "5"]
    assert _run(PROBE, "fresh", OMP_WAIT_POLICY="PASSIVE") == [False, None]
    assert _run(PROBE, "torch-first") == [False, None]


def test_the_kt_command_sets_it():
    from kt_core.runtime.omp import SPINCOUNT

    assert _run(CLI) == SPINCOUNT
