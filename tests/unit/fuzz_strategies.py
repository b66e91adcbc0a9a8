"""The hypothesis settings and JSON / byte mutation strategies the loader fuzzers share (values,
byte edits, JSON encodings gone wrong, one node of a document replaced)."""
from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from tests.unit.loader_folder import DEEP, LONG_INT, _dumps


def fuzz(n: int):
    return settings(deadline=None, max_examples=n, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large, HealthCheck.filter_too_much])


# ---- mutation strategies ------------------------------------------------------------------------

SPECIAL_INTS = [0, 1, -1, 7, 8, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30,
                -(2**63), -(2**64)]
numbers = st.one_of(st.sampled_from(SPECIAL_INTS), st.integers(-10**6, 10**6), st.floats(allow_nan=True,
                                                                                         allow_infinity=True))
scalars = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=12))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)


@st.composite
def byte_edits(draw, data: bytes, hot: tuple[int, int] = (0, 0)) -> bytes:
    """1-4 flips, overwrites, insertions, deletions or a truncation, positions often in ``hot``."""
    b = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        if not b:
            break
        anywhere = st.integers(0, len(b) - 1)
        lo, hi = hot[0], min(hot[1], len(b))
        pos = draw(st.one_of(st.integers(lo, hi - 1), anywhere) if hi > lo else anywhere)
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        if op == "flip":
            b[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            b[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            b[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del b[pos:pos + draw(st.integers(1, 16))]
        else:
            del b[pos:]
    return bytes(b)


@st.composite
def encoded(draw, value, data_edits: bool = True) -> bytes:
    """``value`` as JSON bytes, sometimes truncated, byte-edited, not UTF-8, or pathological."""
    raw = _dumps(value)
    how = draw(st.sampled_from(["plain"] * 6 + ["truncate", "edit", "latin1", "deep", "long_int", "empty"]))
    if how == "truncate" and raw:
        return raw[:draw(st.integers(0, len(raw) - 1))]
    if how == "edit" and data_edits:
        return draw(byte_edits(raw))
    if how == "latin1":
        pos = draw(st.integers(0, len(raw)))
        return raw[:pos] + draw(st.sampled_from([b"\xff", b"\xfe\xff", b"\xc3", b"\xed\xa0\x80", b"\x80"])) + raw[pos:]
    if how == "deep":
        return DEEP
    if how == "long_int":
        return raw.replace(b":", b":" + LONG_INT + b"0", 1) if b":" in raw else LONG_INT
    if how == "empty":
        return b""
    return raw


def _set_path(draw, value, depth: int = 0):
    """``value`` with one randomly chosen node replaced by a random JSON value or removed."""
    if depth > 0 and (not isinstance(value, (dict, list)) or not value or draw(st.integers(0, 3)) == 0):
        return draw(json_values)
    if isinstance(value, dict) and value:
        key = draw(st.sampled_from(sorted(value)))
        out = dict(value)
        if draw(st.integers(0, 5)) == 0:
            del out[key]
        else:
            out[key] = _set_path(draw, value[key], depth + 1)
        return out
    if isinstance(value, list) and value:
        i = draw(st.integers(0, len(value) - 1))
        return value[:i] + [_set_path(draw, value[i], depth + 1)] + value[i + 1:]
    return draw(json_values)


def _generic_op(draw, cfg: dict, op: str) -> object:
    """The mutations both JSON config fuzzers share: drop a key ("delete"), set a random nested
    path ("random_path"), or replace the whole document with a scalar or a list ("top")."""
    if op == "delete":
        cfg.pop(draw(st.sampled_from(sorted(cfg) or ["x"])), None)
        return cfg
    if op == "random_path":
        return _set_path(draw, cfg)
    return draw(st.one_of(scalars, st.lists(json_values, max_size=3)))
