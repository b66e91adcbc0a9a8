"""Shared pytest options and fixtures.

``--backend NAME`` (repeatable, or comma-separated) limits backend-parametrised
tests (the conformance suite) to those plugins; by default every registered
plugin is a parameter and the absent ones skip with their probe's reason.
"""
from __future__ import annotations

import os
import random
import sys

import pytest

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")


def pytest_addoption(parser):
    parser.addoption("--backend", action="append", default=[],
                     help="run backend-parametrised tests on these plugins only (e.g. --backend cuda)")
    parser.addoption("--strict-backend", action="store_true",
                     help="fail, instead of skip, when a backend named by --backend is unavailable "
                          "(vendor CI: a broken driver must not pass as all-skipped)")


def _requested(config) -> list[str]:
    out = []
    for item in config.getoption("--backend"):
        out += [x.strip() for x in item.split(",") if x.strip()]
    return out


def pytest_generate_tests(metafunc):
    if "backend_name" in metafunc.fixturenames:
        from kt_core.backend.registry import registry

        names = _requested(metafunc.config) or registry().names()
        unknown = [n for n in names if n not in registry().names()]
        if unknown:
            raise pytest.UsageError(f"--backend {', '.join(unknown)}: not registered; "
                                    f"registered: {', '.join(registry().names())}")
        metafunc.parametrize("backend_name", names)


@pytest.fixture
def backend(backend_name, request):
    from kt_core.backend.registry import registry

    st = registry().status(backend_name)
    if not st.available:
        if request.config.getoption("--strict-backend") and backend_name in _requested(request.config):
            pytest.fail(f"--strict-backend: {backend_name} is unavailable: {st.reason}")
        pytest.skip(f"{backend_name}: {st.reason}")
    return registry().get(backend_name)




@pytest.fixture(autouse=True)
def _seeded_generators():
    """Every test starts from the same random state, whichever tests ran before it: a test that
    draws without seeding (peft's lora_A init, torch.randn in a helper) then gets the same numbers
    alone, in a subset or in the whole suite. Torch and numpy are seeded only once something
    imported them, so torch-free tests stay torch-free."""
    random.seed(0)
    if "torch" in sys.modules:
        sys.modules["torch"].manual_seed(0)
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed(0)


@pytest.fixture
def restore_native_variant():
    """The native kernels' variant as it was before the test (tests that loop over
    native.supported_variants() set it)."""
    from kt_backends.cpu import native

    best = native.variant()
    yield
    native.set_variant(best)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """tiny_checkpoint(name) -> folder with a random checkpoint written by transformers (cached)."""
    made = {}

    def get(name):
        if name not in made:
            from tests.parity.tiny import build

            made[name] = build(name, tmp_path_factory.mktemp(name))
        return made[name]
    return get


# what tests/unit/test_simd_emulated.py runs under emulation (SIMDe / the AMX tile model)
EMULATED_VARIANTS = ("avx_vnni", "avx512", "amx")


def pytest_terminal_summary(terminalreporter):
    """Say which kernel variants this run tested on the CPU itself and which only under
    emulation, so a CI log shows what a green run is worth."""
    try:
        from kt_backends.cpu import native
    except Exception as exc:  # noqa: BLE001 - a summary line must never fail the run
        terminalreporter.write_line(f"native CPU kernels: not importable ({exc})")
        return
    if not native.available():
        terminalreporter.write_line(f"native CPU kernels: {native.status()}; no kernel variant was tested")
        return
    here = native.supported_variants()
    emulated = [v for v in EMULATED_VARIANTS if v not in here]
    terminalreporter.write_line(f"native CPU kernels: variants run on this CPU: {', '.join(here)}; "
                                f"only under emulation: {', '.join(emulated) or 'none'}")


def _hypothesis_profile() -> None:
    """Fuzz tests run a fixed set of examples (derandomized) so a CI run is reproducible; set
    KT_FUZZ_RANDOM=1 to explore new examples instead."""
    try:
        from hypothesis import settings
    except ImportError:
        return
    settings.register_profile("kt", derandomize=not os.environ.get("KT_FUZZ_RANDOM"), database=None)
    settings.load_profile("kt")


_hypothesis_profile()
