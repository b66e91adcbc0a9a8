"""The native kernels' copy of kt_core/config/limits.py (backends/cpu/native/kt_limits.h) is that
module's output, so C++ and Python keep one source for the int8 group limit and the SwiGLU clamp."""
from pathlib import Path

from kt_core.config import limits

ROOT = Path(__file__).resolve().parents[2]


def test_header_is_generated_from_limits_py():
    header = (ROOT / limits.HEADER).read_text(encoding="utf-8")
    assert header == limits.native_header(), (
        f"{limits.HEADER} differs from kt_core/config/limits.py: run `python -m kt_core.config.limits`")


def test_header_carries_each_constant():
    text = limits.native_header()
    assert f"kInt8MaxGroup = {limits.INT8_MAX_GROUP};" in text
    assert f"kDeepseekV4SwigluLimit = {limits.DEEPSEEK_V4_SWIGLU_LIMIT!r}f;" in text


def test_no_native_source_spells_the_constants_again():
    native = ROOT / "backends" / "cpu" / "native"
    for src in sorted(native.glob("*")):
        if src.name == "kt_limits.h" or src.suffix not in (".cpp", ".hpp", ".inc", ".h"):
            continue
        text = src.read_text(encoding="utf-8")
        assert "constexpr float kDeepseekV4SwigluLimit" not in text, src.name
        assert "group > 256" not in text, src.name
