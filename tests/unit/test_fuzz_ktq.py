"""Fuzzing the .ktq loader: mutated and truncated files from kt quantize's writer must give a
one-line KtError naming the file (or, when the damage is harmless, experts the native kernels
run on), never another exception, a crash or a hang.

300 examples run by default (each of the three strategies: 100), 3,000 more under -m slow."""
import json
import struct
import time

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis.control import currently_in_test_context
from hypothesis import strategies as st

from kt_backends.cpu import native
from kt_core.errors import KtError
from tests.unit.test_prequant import join_ktq, open_ktq, split_ktq, tiny_ktq, tiny_spec

CHECKS = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large]
FAST = settings(max_examples=100, deadline=None, suppress_health_check=CHECKS, derandomize=True)
SLOW = settings(max_examples=1000, deadline=None, suppress_health_check=CHECKS)
KINDS = [("int4", False, False), ("int8", True, True), ("fp8", True, False)]  # fmt, symmetric, biases


class Originals(dict):
    def __repr__(self) -> str:  # hypothesis shows the test's arguments: not 100 kB of bytes
        return f"<{len(self)} valid .ktq files>"


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """The valid files' bytes and the arguments that open them."""
    made = Originals()
    for kind in KINDS:
        path = tmp_path_factory.mktemp("ktq") / "valid.ktq"
        args = tiny_ktq(path, *kind)
        made[kind] = (path.read_bytes(), args)
    return made


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz") / "fuzzed.ktq"


def check(target, raw: bytes, kind, args, with_spec: bool) -> None:
    """The contract: a KtError of one line naming the file, or experts the kernels can run."""
    target.write_bytes(raw)
    spec = tiny_spec(bias=kind[2]) if with_spec else None
    t0 = time.monotonic()
    try:
        f = open_ktq(target, args, spec)
    except KtError as exc:
        msg = str(exc)
        assert str(target) in msg and "\n" not in msg, msg
        assert "unexpectedly" not in msg, f"a damage the checks do not name: {msg}"
        note("refused: " + msg.split(str(target), 1)[1].split(":")[0].split("(")[0].strip()[:40])
        return
    finally:
        assert time.monotonic() - t0 < 10, "opening a damaged file took too long"
    # accepted: every layer's experts come out with sizes that agree, and run
    for key, rec in f.header["layers"].items():
        ids = list(rec["expert_ids"])
        try:
            ex = f.experts(int(key), ids, torch.device("cpu"))
        except KtError as exc:
            assert str(target) in str(exc) and "\n" not in str(exc)
            continue
        if native.available() and ids:
            packed = native.pack(ex)
            assert packed is not None
            T = 3
            routes = torch.tensor(ids * T)[:T * min(2, len(ids))].reshape(T, -1)
            out = native.moe_forward(packed, torch.randn(T, packed.hidden), routes, torch.rand(routes.shape))
            assert out.shape == (T, packed.hidden)
    note("accepted: experts loaded and run")
    f.close()


def note(what: str) -> None:
    """Outcome counts for --hypothesis-show-statistics (what share of the damage is caught where)."""
    if currently_in_test_context():
        event(what)


# ---------------------------------------------------------------- strategies
kinds = st.sampled_from(KINDS)


def flip_bytes(data, raw: bytes, header_only: bool) -> bytes:
    """XOR a few bytes of the header (magic, length, JSON) or of the whole file. Only positions
    and masks are drawn, so a failure report stays short."""
    head_len = int.from_bytes(raw[4:8], "little") if len(raw) >= 8 else len(raw)
    end = max(1, min(len(raw), 8 + head_len) if header_only else len(raw))
    flips = data.draw(st.lists(st.tuples(st.integers(0, 2**31), st.integers(1, 255)), min_size=1, max_size=6))
    out = bytearray(raw)
    for pos, xor in flips:
        if out:
            out[pos % end] ^= xor
    return bytes(out)


WRONG = st.one_of(
    st.none(), st.booleans(), st.floats(allow_nan=True), st.text(max_size=8),
    st.integers(-2**70, 2**70), st.sampled_from([-1, -64, 0, 1, 63, 65, 2**31, 2**32 - 1, 2**63, 10**30]),
    st.lists(st.integers(-5, 100), max_size=4), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.sampled_from(["uint8", "int8", "float32", "bfloat16", "int64", "float64", "int4-g32-asym", "0"]),
)


def paths(node, prefix=()):
    """Every place in the header JSON a value could be replaced."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from paths(v, prefix + (i,))


def edit_fields(data, raw: bytes) -> bytes:
    """Replace (or drop) one to three fields anywhere in the header JSON with values of a wrong
    type, huge, negative or plausible-but-wrong."""
    try:
        header, payload = split_ktq(raw)
    except (ValueError, struct.error, RecursionError):  # an earlier mutation broke it: nothing to edit
        return raw
    for _ in range(data.draw(st.integers(1, 3))):
        places = sorted(paths(header), key=repr)
        where = places[data.draw(st.integers(0, 2**31)) % len(places)]
        value = data.draw(WRONG)
        if not where:
            header = value
            break
        node = header
        for k in where[:-1]:
            node = node[k]
        if data.draw(st.booleans()) and isinstance(node, dict) and isinstance(where[-1], str):
            node.pop(where[-1], None)  # a missing field
        else:
            node[where[-1]] = value
    try:
        return join_ktq(header, payload)
    except (ValueError, TypeError):  # NaN keys and the like: json.dumps itself refuses
        return join_ktq({"format": "x"}, payload)


def mutate(data, raw: bytes, kind: str) -> bytes:
    if kind == "flip_header":
        return flip_bytes(data, raw, header_only=True)
    if kind == "flip_any":
        return flip_bytes(data, raw, header_only=False)
    if kind == "truncate":
        return raw[:data.draw(st.integers(0, 2**31)) % max(1, len(raw))]
    return edit_fields(data, raw)


def fuzz(originals, target, data, how):
    kind = data.draw(kinds)
    raw, args = originals[kind]
    check(target, mutate(data, raw, data.draw(how)), kind, args, data.draw(st.booleans()))


# ---------------------------------------------------------------- default run: 300 examples
@FAST
@given(data=st.data())
def test_flipped_bytes_and_truncations(originals, target, data):
    fuzz(originals, target, data, st.sampled_from(["flip_header", "flip_any", "truncate"]))


@FAST
@given(data=st.data())
def test_header_fields_of_wrong_type_or_size(originals, target, data):
    fuzz(originals, target, data, st.just("fields"))


def everything_at_once(originals, target, data):
    """One file of a drawn kind with one to three mutations of drawn kinds stacked."""
    kind = data.draw(kinds)
    raw, args = originals[kind]
    for how in data.draw(st.lists(st.sampled_from(["flip_header", "fields", "truncate"]), min_size=1, max_size=3)):
        raw = mutate(data, raw, how)
    check(target, raw, kind, args, data.draw(st.booleans()))


@FAST
@given(data=st.data())
def test_everything_at_once(originals, target, data):
    everything_at_once(originals, target, data)


# ---------------------------------------------------------------- -m slow: 3,000 more
@pytest.mark.slow
@SLOW
@given(data=st.data())
def test_flipped_bytes_and_truncations_more(originals, target, data):
    fuzz(originals, target, data, st.sampled_from(["flip_header", "flip_any", "truncate"]))


@pytest.mark.slow
@SLOW
@given(data=st.data())
def test_header_fields_of_wrong_type_or_size_more(originals, target, data):
    fuzz(originals, target, data, st.just("fields"))


@pytest.mark.slow
@SLOW
@given(data=st.data())
def test_everything_at_once_more(originals, target, data):
    everything_at_once(originals, target, data)


def test_the_valid_files_load(originals, target):
    for kind, (raw, args) in originals.items():
        check(target, raw, kind, args, True)
        header, _ = split_ktq(raw)
        assert json.dumps(header)  # the originals are well-formed
