from importlib.metadata import EntryPoint

import pytest

from kt_core.backend.registry import GROUP, Registry, registry
from kt_core.errors import DeviceUnavailable, KtError

M = "tests.unit.plugins_for_tests"


def ep(name, value):
    return EntryPoint(name, value, GROUP)


def test_builtins_register_through_entry_points():
    names = registry().names()
    for b in ("cpu", "cuda", "rocm", "xpu", "ascend"):
        assert b in names
        assert registry().status(b).source.startswith(f"kt_backends.{b}:")
    assert registry().status("cpu").available


def test_broken_plugins_are_reported_not_raised():
    reg = Registry([ep("good", f"{M}:Narrow"), ep("missing", "kt_no_such_module:Backend"),
                    ep("notbackend", f"{M}:NOT_A_BACKEND"), ep("raises", f"{M}:ProbeRaises"),
                    ep("absent", f"{M}:Absent")])
    p = reg.plugins()
    assert p["good"].available
    assert not p["missing"].available and "failed to import" in p["missing"].reason
    assert "kt_no_such_module" in p["missing"].reason
    assert "not a kt_core Backend" in p["notbackend"].reason
    assert "driver exploded" in p["raises"].reason
    assert p["absent"].reason == "no such hardware here"
    assert reg.available() == ["good"]
    with pytest.raises(DeviceUnavailable, match="no such hardware here"):
        reg.get("absent")
    with pytest.raises(KtError, match="registered backends: absent, good"):
        reg.get("nope")


def test_same_name_highest_score_wins_and_others_are_shadowed():
    reg = Registry([ep("x", f"{M}:Narrow"), ep("x", f"{M}:BetterNarrow"), ep("x", f"{M}:Absent")])
    st = reg.status("x")
    assert st.source.endswith("BetterNarrow") and st.score == 9
    assert sorted(st.shadowed) == sorted([f"{M}:Narrow", f"{M}:Absent"])


def test_several_backends_active_at_once_and_instances_cached():
    reg = Registry([ep("cpu", "kt_backends.cpu:Backend"), ep("narrow", f"{M}:Narrow")])
    a, b = reg.get("cpu"), reg.get("narrow")
    assert a is reg.get("cpu") and a is not b
    assert a.supports("moe_experts", __import__("torch").bfloat16, "int4")
    assert not b.supports("moe_experts", __import__("torch").bfloat16, "int4")


def test_no_plugins_message_says_install():
    with pytest.raises(KtError, match="pip install -e"):
        Registry([]).get("cpu")
