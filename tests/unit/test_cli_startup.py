"""What each quick verb imports: `kt --help`, every `kt <verb> --help`, `kt plan` and
`kt config --no-device-check` never import torch (seconds of start-up), nor do `kt devices` and
`kt config` where the plugins' torch-free probes answer; help imports no Hydra either. Checked in a fresh interpreter through sys.modules, not by timing."""
import json
import subprocess
import sys

HEAVY = ("torch", "transformers", "hydra", "safetensors", "tokenizers")
PROBE = """
import json, sys
from kt_core.cli import main
codes = [main(args) for args in json.loads(sys.argv[1])]
print("\\n" + json.dumps({"codes": codes, "imported": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


def imported_after(runs, tmp_path):
    import os

    env = dict(os.environ, KT_CONFIG_DIR=str(tmp_path))  # no per-machine file of the developer's
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(runs)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc


def test_help_imports_neither_torch_nor_hydra(tmp_path):
    from kt_core.cli import VERBS

    runs = [["--help"], ["help"], ["plan", "--help"]] + [[verb, "--help"] for verb in VERBS]
    result, _ = imported_after(runs, tmp_path)
    assert result["codes"] == [0] * len(runs)
    assert result["imported"] == []


def test_plan_and_config_without_device_check_do_not_import_torch(tmp_path):
    from kt_core.commands.plan import USAGE

    examples = [line.split()[2:] for line in USAGE.splitlines() if line.startswith("  kt plan ")]
    runs = [["plan"], *(["plan", *args] for args in examples),
            ["plan", "model=deepseek_v3", "topology=hybrid_1gpu", "device.cuda.memory_gb=24",
             "device.cpu.memory_gb=64"],  # does not fit: the search for overrides that fit re-plans
            ["plan", f"model.path={tmp_path / 'missing'}"],
            ["config", "--no-device-check"], ["config", "topology=hybrid_1gpu", "device.cuda.memory_gb=24",
                                              "quant=int4", "--no-device-check"]]
    result, proc = imported_after(runs, tmp_path)
    assert result["codes"] == [0, 0, 0, 0, 2, 2, 0, 0], proc.stderr
    assert "torch" not in result["imported"] and "transformers" not in result["imported"]
    assert "does not fit" in proc.stderr and "these overrides fit every device" in proc.stderr


def test_verbs_that_ask_the_device_plugins_import_torch_only_when_a_probe_needs_it(tmp_path):
    # each plugin's torch-free probe module answers unless only torch can tell (counting GPUs of a
    # CUDA, ROCm, XPU build, or an installed torch_npu of the right version)
    from importlib.metadata import entry_points

    from kt_core.backend.registry import PROBES

    quick = all(ep.load().probe() is not None for ep in entry_points(group=PROBES))
    result, proc = imported_after([["devices"], ["devices", "--json"], ["config"],
                                   ["plan", "topology=hybrid_multi_gpu", "device.cuda.memory_gb=24"]], tmp_path)
    assert result["codes"] == [0, 0, 0, 0], proc.stderr
    if quick:
        assert "torch" not in result["imported"], "kt devices / kt config imported torch"


def test_run_refuses_bad_values_before_torch_loads(tmp_path):
    """kt run / chat check every value first; a bad one fails without the seconds torch's import takes."""
    runs = [["run", "generate.top_p=2"], ["run", "generate.temperature=-1"], ["chat", "generate.top_k=-3"],
            ["run", f"model.path={tmp_path / 'missing'}"]]
    result, proc = imported_after(runs, tmp_path)
    assert result["codes"] == [2, 2, 2, 2], proc.stderr
    assert "torch" not in result["imported"], proc.stderr
    assert "top_p must be in (0, 1]" in proc.stderr and "top_k must be in" in proc.stderr
