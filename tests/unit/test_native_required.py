"""CI on a machine with a C++ compiler sets KT_REQUIRE_NATIVE=1 (.ci/run): there the native
kernels must have built and loaded, or every native test would skip and CI pass having tested
no kernel."""
import os

import pytest

from kt_backends.cpu import native


@pytest.mark.skipif(os.environ.get("KT_REQUIRE_NATIVE", "") in ("", "0"),
                    reason="KT_REQUIRE_NATIVE is not set (only .ci/run on a machine with a C++ compiler sets it)")
def test_native_kernels_built_and_loaded_when_required():
    assert native.available(), f"KT_REQUIRE_NATIVE=1 but {native.status()}"
    assert native.variant() == native.supported_variants()[-1]
