"""kt_core.weights.gguf_blocks (decoders) and gguf_repack (exact repacks) against the gguf package's
numpy decoders (the independent oracle).

Blocks are random bytes with their float16 scale fields overwritten by random finite halves
(subnormals and large values included), so every code and scale bit pattern is exercised."""
from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T  # noqa: E402

from kt_core.weights import gguf_blocks  # noqa: E402
from kt_core.weights.gguf_blocks import dequantize  # noqa: E402
from kt_core.weights.gguf_repack import kept_as, repack  # noqa: E402
from kt_core.weights.quant import Quant, dequantize as dequantize_weight  # noqa: E402

# byte offsets of the float16 fields in each block (from ggml-common.h's block structs)
HALF_FIELDS = {
    T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,),
    T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,),
    T.IQ4_NL: (0,), T.IQ4_XS: (0,), T.MXFP4: (),  # MXFP4's E8M0 byte: every value is finite
}
ALL = [T.F32, T.F16, T.BF16, *HALF_FIELDS]


def finite_halves(rng: np.random.Generator, n: int) -> np.ndarray:
    """Random float16 bit patterns with the all-ones exponent (inf / nan) knocked down."""
    bits = rng.integers(0, 1 << 16, n, dtype=np.uint16)
    bad = (bits & 0x7C00) == 0x7C00
    bits[bad] &= np.uint16(~0x4000 & 0xFFFF)
    return bits.view(np.float16)


def random_bytes(qtype: T, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """GGML bytes for a torch-order ``shape``: uint8 [..., row_bytes] (the gguf oracle's layout)."""
    rng = np.random.default_rng(seed + int(qtype))
    block, size = GGML_QUANT_SIZES[qtype]
    n_blocks = int(np.prod(shape)) // block
    if qtype == T.F32:
        data = (rng.standard_normal(n_blocks) * 10.0 ** rng.uniform(-30, 30, n_blocks)).astype(np.float32)
        blocks = data.view(np.uint8).reshape(n_blocks, size)
    elif qtype == T.F16:
        blocks = finite_halves(rng, n_blocks).view(np.uint8).reshape(n_blocks, size)
    elif qtype == T.BF16:
        bits = rng.integers(0, 1 << 16, n_blocks, dtype=np.uint16)
        bits[(bits & 0x7F80) == 0x7F80] &= np.uint16(0xBFFF)
        blocks = bits.view(np.uint8).reshape(n_blocks, size)
    else:
        blocks = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
        for off in HALF_FIELDS[qtype]:
            blocks[:, off:off + 2] = finite_halves(rng, n_blocks).view(np.uint8).reshape(n_blocks, 2)
        if qtype == T.MXFP4:  # E8M0 exponents whose 12 x 2^(e-128) stays finite in float32
            blocks[:, 0] = rng.integers(0, 250, n_blocks, dtype=np.uint8)
    return np.ascontiguousarray(blocks.reshape(*shape[:-1], shape[-1] // block * size))


def oracle(data: np.ndarray, qtype: T) -> np.ndarray:
    return np.asarray(gguf.quants.dequantize(data, qtype), dtype=np.float32)


def shape_for(qtype: T, rows: int = 5, blocks_per_row: int = 3) -> tuple[int, int]:
    return rows, GGML_QUANT_SIZES[qtype][0] * blocks_per_row


@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_dequantize_matches_gguf(qtype):
    shape = shape_for(qtype, rows=7, blocks_per_row=4 if GGML_QUANT_SIZES[qtype][0] == 256 else 16)
    data = random_bytes(qtype, shape)
    got = dequantize(torch.from_numpy(data), int(qtype), shape)
    want = oracle(data, qtype)
    assert np.isfinite(want).all() and (want != 0).mean() > 0.5  # the comparison is not vacuous
    assert got.dtype == torch.float32 and tuple(got.shape) == shape
    np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.BF16], ids=lambda t: t.name)
def test_dequantize_gguf_quantized_floats(qtype):
    """Data as a quantizer writes it (the gguf package's own quantizer, where it has one)."""
    x = np.random.default_rng(1).standard_normal((6, 256)).astype(np.float32)
    data = gguf.quants.quantize(x, qtype)
    got = dequantize(torch.from_numpy(data), qtype, x.shape)
    np.testing.assert_array_equal(got.numpy(), oracle(data, qtype))


@pytest.mark.parametrize("qtype", [T.Q5_K, T.IQ4_XS, T.Q4_1, T.F16], ids=lambda t: t.name)
def test_dequantize_leading_dims_and_chunks(qtype, monkeypatch):
    block = GGML_QUANT_SIZES[qtype][0]
    shape = (3, 4, 2 * block)
    data = random_bytes(qtype, shape, seed=5)
    want = oracle(data, qtype).reshape(shape)
    whole = dequantize(torch.from_numpy(data.reshape(-1)), qtype, shape)
    monkeypatch.setattr(gguf_blocks, "CHUNK_ELEMENTS", 3 * block)  # chunks that straddle rows
    chunked = dequantize(torch.from_numpy(data), qtype, shape)
    np.testing.assert_array_equal(whole.numpy(), want)
    np.testing.assert_array_equal(chunked.numpy(), want)


def test_dequantize_misaligned_bytes():
    """Bytes that start at an odd offset of a larger buffer (an mmap'd file) still read."""
    shape = (4, 8)
    data = random_bytes(T.F32, shape)
    buf = torch.zeros(data.size + 1, dtype=torch.uint8)
    buf[1:] = torch.from_numpy(data.reshape(-1))
    np.testing.assert_array_equal(dequantize(buf[1:], T.F32, shape).numpy(), oracle(data, T.F32))


def test_dequantize_empty():
    assert dequantize(torch.empty(0, dtype=torch.uint8), T.Q4_K, (0, 256)).shape == (0, 256)


def assert_repack_close(w, data, qtype, shape):
    want = oracle(data, qtype).reshape(shape)
    got = dequantize_weight(w).numpy()
    g_want = want.reshape(-1, 32)
    mag = np.abs(g_want).max(axis=1, keepdims=True)
    err = np.abs(got.reshape(-1, 32) - g_want)
    assert (err <= 1e-6 * mag).all(), float((err / np.maximum(mag, 1e-38)).max())


def check_container(w, shape, asymmetric):
    lead, n_in = shape[:-1], shape[-1]
    assert w.format is Quant.INT4 and w.group_size == 32 and w.in_features == n_in
    assert tuple(w.qdata.shape) == (*lead, n_in // 2) and w.qdata.dtype == torch.uint8
    assert tuple(w.scales.shape) == (*lead, n_in // 32) and w.scales.dtype == torch.float32
    if asymmetric:
        assert tuple(w.zeros.shape) == tuple(w.scales.shape) and w.zeros.dtype == torch.float32
    else:
        assert w.zeros is None
    assert tuple(w.shape) == tuple(shape)


@pytest.mark.parametrize("shape", [(6, 96), (2, 3, 64)])
def test_repack_q4_0_exact(shape):
    data = random_bytes(T.Q4_0, shape, seed=2)
    w = repack(torch.from_numpy(data), T.Q4_0, shape)
    check_container(w, shape, asymmetric=False)
    np.testing.assert_array_equal(dequantize_weight(w).numpy(), oracle(data, T.Q4_0).reshape(shape))
    blk = data.reshape(-1, 18)  # the scale is each block's d itself
    np.testing.assert_array_equal(w.scales.reshape(-1).numpy(), blk[:, :2].copy().view(np.float16)[:, 0])


def test_repack_q4_0_nibble_order():
    """Element e of a block: lo(qs[e]) for e < 16, hi(qs[e-16]) above; int4 keeps e in byte e//2."""
    data = random_bytes(T.Q4_0, (1, 32), seed=3)
    qs = data[0, 2:18]
    ggml = np.concatenate([qs & 0xF, qs >> 4])
    packed = repack(torch.from_numpy(data), T.Q4_0, (1, 32)).qdata[0].numpy()
    ours = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(32)
    np.testing.assert_array_equal(ours, ggml)


@pytest.mark.parametrize("qtype", [T.Q4_1, T.Q4_K], ids=lambda t: t.name)
@pytest.mark.parametrize("shape", [(5, 512), (3, 2, 256)])
def test_repack_asymmetric(qtype, shape):
    data = random_bytes(qtype, shape, seed=4)
    w = repack(torch.from_numpy(data), qtype, shape)
    check_container(w, shape, asymmetric=True)
    assert_repack_close(w, data, qtype, shape)


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q4_K], ids=lambda t: t.name)
def test_repack_experts_select(qtype, monkeypatch):
    """[E, out, in] experts, repacked in chunks smaller than a row; one expert selects cleanly."""
    shape = (3, 4, 512)
    data = random_bytes(qtype, shape, seed=6)
    monkeypatch.setattr(gguf_blocks, "CHUNK_ELEMENTS", 256)
    w = repack(torch.from_numpy(data), qtype, shape)
    check_container(w, shape, asymmetric=qtype != T.Q4_0)
    assert_repack_close(w, data, qtype, shape)
    one = w.select(1)
    np.testing.assert_array_equal(dequantize_weight(one).numpy(), dequantize_weight(w)[1].numpy())


def test_repack_q4_1_zero_scale_exact():
    shape = (4, 64)
    data = random_bytes(T.Q4_1, shape, seed=7)
    blk = data.reshape(-1, 20)
    blk[0, 0:2] = np.array([0.0], np.float16).view(np.uint8)
    blk[1, 0:2] = np.array([-0.0], np.float16).view(np.uint8)
    blk[2, 0:4] = np.array([0.0, -3.5], np.float16).view(np.uint8)
    blk[3, 0:4] = np.array([0.0, 0.0], np.float16).view(np.uint8)
    w = repack(torch.from_numpy(data), T.Q4_1, shape)
    got = dequantize_weight(w).numpy().reshape(-1, 32)
    want = oracle(data, T.Q4_1).reshape(-1, 32)
    np.testing.assert_array_equal(got[:4], want[:4])
    assert (w.scales.reshape(-1)[:4] == 1).all() and (w.qdata.reshape(-1, 16)[:4] == 0).all()
    assert_repack_close(w, data, T.Q4_1, shape)


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q5_K], ids=lambda t: t.name)
def test_repack_k_zero_scale_exact(qtype):
    """A Q4_K / Q5_K sub-block whose scale is 0 is its min alone: kept exactly (scale 1, codes 0). Both
    start f16 d, f16 dmin, scales[12]."""
    shape = (2, 256)
    data = random_bytes(qtype, shape, seed=8)
    blk = data.reshape(-1, GGML_QUANT_SIZES[qtype][1])
    blk[0, 0:2] = np.array([0.0], np.float16).view(np.uint8)  # d == 0: every sub-block of block 0
    blk[1, 4] &= 0xC0  # block 1: sub-block 0's 6-bit scale is 0
    blk[1, 8] |= 0x01  # ... and its min is not
    blk[1, 2:4] = np.array([0.75], np.float16).view(np.uint8)
    w = repack(torch.from_numpy(data), qtype, shape)
    got = dequantize_weight(w).numpy().reshape(-1, 32)
    want = oracle(data, qtype).reshape(-1, 32)
    np.testing.assert_array_equal(got[:9], want[:9])
    assert (want[8] != 0).all() and (w.scales.reshape(-1)[:9] == 1).all()
    assert_repack_close(w, data, qtype, shape)


INT8_TYPES = [(T.Q8_0, 32), (T.Q5_0, 32), (T.IQ4_NL, 32), (T.IQ4_XS, 32), (T.MXFP4, 32), (T.Q6_K, 16),
              (T.Q3_K, 16)]


@pytest.mark.parametrize("qtype,group", INT8_TYPES, ids=lambda v: getattr(v, "name", str(v)))
@pytest.mark.parametrize("shape", [(3, 512), (2, 3, 256)])
def test_repack_int8_exact(qtype, group, shape, monkeypatch):
    """Types of int8-range codes times a scale per 16 or 32: grouped int8, bit exact, chunked."""
    data = random_bytes(qtype, shape, seed=9)
    monkeypatch.setattr(gguf_blocks, "CHUNK_ELEMENTS", 256)
    w = repack(torch.from_numpy(data), qtype, shape)
    lead, n_in = shape[:-1], shape[-1]
    assert w.format is Quant.INT8 and w.group_size == group and w.in_features == n_in and w.zeros is None
    assert tuple(w.qdata.shape) == tuple(shape) and w.qdata.dtype == torch.int8
    assert tuple(w.scales.shape) == (*lead, n_in // group)
    np.testing.assert_array_equal(dequantize_weight(w).numpy(), oracle(data, qtype).reshape(shape))


INT8_ZERO_TYPES = [(T.Q5_1, 32, 31), (T.Q5_K, 32, 31), (T.Q2_K, 16, 3)]


@pytest.mark.parametrize("qtype,group,top", INT8_ZERO_TYPES, ids=lambda v: getattr(v, "name", str(v)))
@pytest.mark.parametrize("shape", [(3, 512), (2, 3, 256)])
def test_repack_int8_with_zero_points(qtype, group, top, shape, monkeypatch):
    """Types with a min per group (x = d*q - m): grouped int8 codes 0..top with a scale and a zero point
    (m / d) per group, exact up to the float32 rounding of the zero point; chunked."""
    data = random_bytes(qtype, shape, seed=10)
    monkeypatch.setattr(gguf_blocks, "CHUNK_ELEMENTS", 256)
    w = repack(torch.from_numpy(data), qtype, shape)
    lead, n_in = shape[:-1], shape[-1]
    assert w.format is Quant.INT8 and w.group_size == group and w.in_features == n_in
    assert tuple(w.qdata.shape) == tuple(shape) and w.qdata.dtype == torch.int8
    assert int(w.qdata.min()) >= 0 and int(w.qdata.max()) == top
    assert tuple(w.scales.shape) == tuple(w.zeros.shape) == (*lead, n_in // group)
    assert kept_as(qtype) == (Quant.INT8, group, True)
    assert_repack_close(w, data, qtype, shape)


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16, T.IQ2_XXS], ids=lambda t: t.name)
def test_repack_other_types_none(qtype):
    assert repack(torch.zeros(7, dtype=torch.uint8), qtype, (1, 256)) is None


def test_error_byte_count():
    with pytest.raises(ValueError, match=r"^Q4_K tensor of shape \(4, 256\) needs 576 bytes, got 575$"):
        dequantize(torch.zeros(575, dtype=torch.uint8), T.Q4_K, (4, 256))
    with pytest.raises(ValueError, match=r"Q4_0 tensor of shape \(2, 3, 32\) needs 108 bytes, got 110"):
        repack(torch.zeros(110, dtype=torch.uint8), T.Q4_0, (2, 3, 32))


def test_error_block_multiple():
    with pytest.raises(ValueError, match=r"Q6_K tensor of shape \(2, 128\).*last dim 128 is not a multiple "
                                         r"of the Q6_K block size 256"):
        dequantize(torch.zeros(105, dtype=torch.uint8), T.Q6_K, (2, 128))
    with pytest.raises(ValueError, match=r"Q4_1 .*last dim 48 .*block size 32"):
        repack(torch.zeros(60, dtype=torch.uint8), T.Q4_1, (2, 48))


def test_error_unsupported_type():
    with pytest.raises(ValueError, match=r"GGML type IQ2_XXS is not supported; supported: F32, F16, .*Q4_K"
                                         r".*IQ4_NL, IQ4_XS"):
        dequantize(torch.zeros(66, dtype=torch.uint8), T.IQ2_XXS, (1, 256))
    with pytest.raises(ValueError, match=r"unknown GGML type id 9999; supported: F32"):
        dequantize(torch.zeros(4, dtype=torch.uint8), 9999, (1,))


def test_error_bytes_dtype_and_shape():
    with pytest.raises(ValueError, match=r"uint8 tensor, got torch.float32"):
        dequantize(torch.zeros(1, dtype=torch.float32), T.F32, (1,))
    with pytest.raises(ValueError, match=r"one or more non-negative dims"):
        dequantize(torch.zeros(4, dtype=torch.uint8), T.F32, ())


def test_supported_names():
    assert {t.name for t in gguf_blocks.SUPPORTED} == {
        "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
        "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS", "MXFP4"}
