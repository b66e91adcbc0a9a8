"""kt-core's GGUF header parser against the ``gguf`` package: files written by its writer, with every
metadata value type and tensors of several block types, read identically to its own reader;
corrupt headers fail with a one-line error naming the file."""
import struct

import numpy as np
import pytest

from kt_core.errors import KtError
from kt_core.weights import gguf_header
from kt_core.weights.gguf_file import open_gguf

gguf = pytest.importorskip("gguf")


def _write(path, extra_alignment=None):
    w = gguf.GGUFWriter(path, "llama")
    if extra_alignment:
        w.add_custom_alignment(extra_alignment)
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 0.15625)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 1e-300)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ✓ 東京")
    w.add_array("t.strs", ["a", "", "ŝ" * 40, "x y"])
    w.add_array("t.ints", list(range(-5, 300)))
    w.add_array("t.floats", [0.5, -2.25, 1e30])
    w.add_array("t.bools", [True, False, True])
    rng = np.random.default_rng(0)
    w.add_tensor("a.weight", rng.standard_normal((6, 64)).astype(np.float32))
    w.add_tensor("b.weight", rng.standard_normal((3, 5)).astype(np.float16))
    q = gguf.quants.quantize(rng.standard_normal((4, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("c.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("alignment", [None, 64])
def test_reads_what_the_gguf_reader_reads(tmp_path, alignment):
    path = _write(tmp_path / "m.gguf", alignment)
    theirs = gguf.GGUFReader(path, "r")
    fields, tensors = gguf_header.parse(path)
    pseudo = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}  # the reader's own bookkeeping
    assert list(fields) == [k for k in theirs.fields if k not in pseudo]
    for key, field in fields.items():
        assert field.contents() == theirs.fields[key].contents(), key
        assert field.offset == theirs.fields[key].offset, key
    assert [(t.name, t.tensor_type, t.data_offset, t.n_bytes, t.shape.tolist()) for t in tensors] == \
        [(t.name, t.tensor_type, int(t.data_offset), int(t.n_bytes), t.shape.tolist()) for t in theirs.tensors]
    assert fields["t.u64"].value == 2**63 + 5 and fields["t.bools"].value == [True, False, True]


def _corrupt(tmp_path, name, mutate):
    data = bytearray(_write(tmp_path / "ok.gguf").read_bytes())
    mutate(data)
    bad = tmp_path / name
    bad.write_bytes(bytes(data))
    return bad


def _at_key(data, key):
    """Offset of the value type field of metadata ``key``."""
    enc = key.encode()
    return data.index(struct.pack("<Q", len(enc)) + enc) + 8 + len(enc)


def test_corrupt_headers_fail_naming_the_file(tmp_path):
    def unknown_type(d):
        d[_at_key(d, "t.u8"): _at_key(d, "t.u8") + 4] = struct.pack("<I", 77)

    def huge_array(d):
        at = _at_key(d, "t.ints") + 8  # past the value type and the item type: the count
        d[at: at + 8] = struct.pack("<Q", 2**40)

    def big_endian(d):
        d[4:8] = struct.pack(">I", 3)

    def bad_utf8(d):
        at = d.index("héllo".encode())
        d[at: at + 2] = b"\xff\xfe"

    for name, mutate, message in [("u.gguf", unknown_type, "unknown value type 77"),
                                  ("h.gguf", huge_array, "claims 1099511627776 items"),
                                  ("e.gguf", big_endian, "big-endian GGUF; kt-core reads little-endian"),
                                  ("s.gguf", bad_utf8, "is not UTF-8")]:
        with pytest.raises(KtError, match=rf"{name}.*{message}"):
            open_gguf(_corrupt(tmp_path, name, mutate))


def test_headers_too_large_to_be_real_fail_cleanly(tmp_path):
    def header(kvs=b"", n_kv=0, tensors=b"", n_tensors=0):
        return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + kvs + tensors + bytes(64)

    def key(name):
        return struct.pack("<Q", len(name)) + name.encode()

    nested = key("deep") + struct.pack("<I", 9) + (struct.pack("<IQ", 9, 1) * 6000) + struct.pack("<IQ", 4, 0)
    dims = key("t.weight") + struct.pack("<I", 2) + struct.pack("<QQ", 2**33, 2**31) + struct.pack("<IQ", 0, 0)
    twice = key("a") + struct.pack("<I", 4) + struct.pack("<I", 1)
    cases = {"deep.gguf": (header(nested, 1), "nesting depth"),
             "dims.gguf": (header(tensors=dims, n_tensors=1), "more than the file holds"),
             "twice.gguf": (header(twice + twice, 2), "listed twice")}
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(KtError, match=rf"{name}.*{message}"):
            open_gguf(tmp_path / name)
