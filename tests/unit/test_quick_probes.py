"""The plugins' torch-free probe modules (entry-point group kt_core.probes): what they answer,
that the registry then imports a plugin only on first use, and that each built-in quick probe
agrees with its plugin's own probe on this machine."""
from importlib.metadata import EntryPoint, entry_points

import pytest

from kt_core.backend.registry import GROUP, PROBES, Registry
from kt_core.backend.torch_build import TorchBuild, _from_file, torch_build
from kt_core.errors import DeviceUnavailable

M = "tests.unit.plugins_for_tests"


def plugin(name, value):
    return EntryPoint(name, value, GROUP)


def quick(name, attr):
    return EntryPoint(name, f"{M}:{attr}", PROBES)


def test_a_quick_answer_defers_importing_the_plugin():
    reg = Registry([plugin("q", f"{M}:Narrow")], [quick("q", "QuickHere")])
    st = reg.status("q")
    assert st.available and st.reason == "quick: two here" and st.probe.device_count == 2 and st.score == 3
    assert st._cls is None, "the plugin class must not be imported by probing"
    assert [d.name for d, _ in st.inventory()] == ["q0", "q1"]
    assert type(reg.get("q")).__name__ == "Narrow"  # first use imports it


def test_an_unavailable_quick_answer_never_imports():
    reg = Registry([plugin("a", "kt_no_such_module:Backend")], [quick("a", "QuickAbsent")])
    st = reg.status("a")
    assert not st.available and st.reason == "quick: not here" and st.score == 0
    with pytest.raises(DeviceUnavailable, match="quick: not here"):
        reg.get("a")


def test_a_broken_plugin_behind_an_available_quick_answer_fails_on_use_with_the_import_error():
    reg = Registry([plugin("b", "kt_no_such_module:Backend")], [quick("b", "QuickHere")])
    assert reg.status("b").available
    with pytest.raises(DeviceUnavailable, match="failed to import.*kt_no_such_module"):
        reg.get("b")
    assert not reg.status("b").available


@pytest.mark.parametrize("attr", ["QuickDefers", "QuickRaises", "NoSuchProbe"])
def test_no_quick_answer_falls_back_to_the_plugin_probe(attr):
    reg = Registry([plugin("n", f"{M}:Absent")], [quick("n", attr)])
    assert reg.status("n").reason == "no such hardware here" and reg.status("n")._cls is not None


def test_two_plugins_under_one_name_are_both_probed_for_the_score():
    reg = Registry([plugin("x", f"{M}:Narrow"), plugin("x", f"{M}:BetterNarrow")], [quick("x", "QuickHere")])
    st = reg.status("x")
    assert st.source.endswith("BetterNarrow") and st.score == 9 and st.reason == "cpu with int8 only"


def test_builtin_quick_probes_agree_with_their_plugins():
    probes = {ep.name: ep for ep in entry_points(group=PROBES)}
    assert set(probes) >= {"cpu", "cuda", "rocm", "xpu", "ascend"}, "reinstall: pip install -e ."
    slow = Registry([ep for ep in entry_points(group=GROUP) if ep.name in probes]).plugins()
    for name, ep in probes.items():
        answer = ep.load().probe()
        if answer is None:  # only the plugin can tell here (e.g. a CUDA build counting GPUs)
            continue
        full = slow[name]
        assert (answer.available, answer.reason, answer.device_count) == \
            (full.available, full.reason, full.probe.device_count), name
    cpu = probes["cpu"].load()
    from kt_backends.cpu import CpuBackend

    backend = CpuBackend()
    assert [d for d, _ in cpu.inventory()] == backend.devices()
    assert cpu.score() == CpuBackend.score()


def test_torch_build_read_from_the_file_matches_torch(tmp_path):
    import torch

    assert torch_build() == TorchBuild(str(torch.__version__), torch.version.cuda, torch.version.hip,
                                       getattr(torch.version, "xpu", None))
    spec_dir = __import__("importlib.util").util.find_spec("torch").submodule_search_locations[0]
    from pathlib import Path

    assert _from_file(Path(spec_dir) / "version.py") == torch_build()
    f = tmp_path / "version.py"
    f.write_text("from typing import Optional\n__version__ = '2.9.1+cu128'\ncuda: Optional[str] = '12.8'\n"
                 "hip = None\n")
    assert _from_file(f) == TorchBuild("2.9.1+cu128", "12.8", None, None)
    f.write_text("__version__ = compute()\n")
    assert _from_file(f) is None  # not a literal: torch itself must answer
    f.write_text("__version__ = '2.9.1'\ncuda = 12\n")
    assert _from_file(f) is None
    f.write_text("def broken(:\n")
    assert _from_file(f) is None
    assert _from_file(tmp_path / "missing.py") is None


def test_quick_probes_of_other_builds():
    from kt_backends.cuda.probe import build_mismatch

    cuda = TorchBuild("2.13.0+cu128", cuda="12.8")
    rocm = TorchBuild("2.13.0+rocm6.4", hip="6.4")
    cpu = TorchBuild("2.13.0+cpu")
    assert build_mismatch(cuda, hip=False) is None and build_mismatch(rocm, hip=True) is None
    assert "use device=rocm" in build_mismatch(rocm, hip=False)
    assert "not a ROCm build" in build_mismatch(cuda, hip=True)
    assert "CPU-only build" in build_mismatch(cpu, hip=False)


@pytest.mark.parametrize("build,answer", [
    (TorchBuild("2.13.0+cpu"), "built without XPU support"), (TorchBuild("2.13.0", cuda="12.8"), "built without XPU"),
    (TorchBuild("2.13.0+xpu", xpu="20250101"), None), (TorchBuild("2.13.0"), None)])  # unknown: the plugin asks torch
def test_xpu_quick_probe(monkeypatch, build, answer):
    from kt_backends.xpu import probe

    monkeypatch.setattr(probe, "torch_build", lambda: build)
    result = probe.probe()
    assert (result is None) if answer is None else (not result.available and answer in result.reason)
