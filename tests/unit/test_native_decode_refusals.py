"""What the decode ops' Python wrappers (kt_backends.cpu.native_ops) and their C ABI refuse, the
fallback to the torch reference when the library is missing, and the ABI's argument structs."""
import ctypes
import math

import pytest
import torch

from kt_backends.cpu import native_ops
from kt_backends.cpu.backend import CpuBackend
from kt_backends.cpu.native_abi import _AttnDecodeArgs, _RmsNormArgs, _RopeArgs
from kt_core.backend.torch_ops import attention as torch_attention
from kt_core.backend.torch_ops import norm_rope as torch_norm_rope
from tests.unit.native_decode_cases import BF16, F32, assert_close, paged, query

pytestmark = pytest.mark.skipif(not native_ops.available(),
                                reason=f"native CPU kernels: {native_ops.why_unavailable()}")


# ---------------------------------------------------------------- what the wrappers refuse
def test_wrappers_refuse_what_the_kernels_do_not_take():
    k, v, table, lens = paged([9, 33], 2, 64, 16, BF16, seed=30)
    q = query(2, 4, 64, BF16, seed=31)
    ad = native_ops.attention_decode
    with pytest.raises(ValueError, match="q is on meta"):
        ad(q.to("meta"), k, v, table, lens, 0.125)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        ad(q.half(), k, v, table, lens, 0.125)
    with pytest.raises(ValueError, match="both be float32 or both bfloat16"):
        ad(q, k.half(), v.half(), table, lens, 0.125)
    with pytest.raises(ValueError, match="both be"):
        ad(q, k, v[:, :, :1], table, lens, 0.125)
    with pytest.raises(ValueError, match="contiguous"):
        ad(q, k.transpose(1, 2).contiguous().transpose(1, 2), v, table, lens, 0.125)
    with pytest.raises(ValueError, match="not a multiple of the caches' 2 kv heads"):
        ad(query(2, 3, 64, BF16), k, v, table, lens, 0.125)
    with pytest.raises(ValueError, match="head_dim 32, the caches 64"):
        ad(query(2, 4, 32, BF16), k, v, table, lens, 0.125)
    with pytest.raises(ValueError, match="block_tables must be integer"):
        ad(q, k, v, table.float(), lens, 0.125)
    with pytest.raises(ValueError, match="seq_lens must be integer"):
        ad(q, k, v, table, lens[:1], 0.125)
    with pytest.raises(ValueError, match="sinks must be"):
        ad(q, k, v, table, lens, 0.125, sinks=torch.zeros(3))
    for bad in (0, -4, 2.5, "8", True):
        with pytest.raises(ValueError, match="sliding_window must be None or a positive integer"):
            ad(q, k, v, table, lens, 0.125, sliding_window=bad)
        with pytest.raises(ValueError, match="chunk must be None or a positive integer"):
            ad(q, k, v, table, lens, 0.125, chunk=bad)
        assert native_ops.try_attention_decode(q, k, v, table, lens, 0.125, chunk=bad) is None
    with pytest.raises(ValueError, match=r"pool .* 0\.\.63"):
        ad(q, k, v, table, lens, 0.125, pool=64)
    # what only the library can see: the values in the index tensors
    for t, sl, what in [(table.masked_fill(table == table[1, 2], k.shape[0]), lens, "block id = num_blocks"),
                        (table.masked_fill(table == table[0, 0], -1), lens, "block id -1"),
                        (table, torch.tensor([9, 0], dtype=torch.int32), "seq_len 0"),
                        (table, torch.tensor([9, table.shape[1] * 16 + 1], dtype=torch.int32), "seq_len > table"),
                        (table.long() + 2 ** 32, lens, "int64 block ids past int32"),
                        (table, lens.long() - 2 ** 32, "int64 seq_len wrapping to valid")]:
        with pytest.raises(ValueError, match="native attention_decode: a value read from an index tensor is out of range"):
            ad(q, k, v, t, sl, 0.125)
        with pytest.raises(ValueError, match="out of range"):
            native_ops.try_attention_decode(q, k, v, t, sl, 0.125)

    x, w = torch.randn(3, 64), torch.randn(64)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        native_ops.rmsnorm(x.half(), w, 1e-6)
    with pytest.raises(ValueError, match=r"weight \[D\]"):
        native_ops.rmsnorm(x, w[:32], 1e-6)
    with pytest.raises(ValueError, match="is on meta"):
        native_ops.rmsnorm(x.to("meta"), w, 1e-6)
    assert native_ops.try_rmsnorm(x.double(), w, 1e-6) is None

    table64 = torch_norm_rope.rope_cos_sin(64, 50)
    qq, kk = torch.randn(3, 4, 64), torch.randn(3, 2, 64)
    pos = torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match="rot_dim 66 must be even and in 2..head_dim"):
        native_ops.rope(qq, kk, pos, torch_norm_rope.rope_cos_sin(66, 50))
    with pytest.raises(ValueError, match="positions must be integer"):
        native_ops.rope(qq, kk, pos.float(), table64)
    with pytest.raises(ValueError, match="same tokens and head_dim"):
        native_ops.rope(qq, kk[:2], pos, table64)
    with pytest.raises(ValueError, match="cos_sin must be a float32 table"):
        native_ops.rope(qq, kk, pos, table64.double())
    for bad in (torch.tensor([1, 50, 3]), torch.tensor([0, -1, 3])):
        with pytest.raises(ValueError, match="native rope: a value read from an index tensor is out of range"):
            native_ops.rope(qq, kk, bad, table64)


def test_huge_windows_and_a_missing_library(monkeypatch):
    k, v, table, lens = paged([9, 33], 2, 64, 16, F32, seed=32)
    q = query(2, 4, 64, F32, seed=33)
    ref = native_ops.attention_decode(q, k, v, table, lens, 0.125)
    # a window or chunk past any context is none
    assert torch.equal(native_ops.attention_decode(q, k, v, table, lens, 0.125, sliding_window=2 ** 70, chunk=2 ** 64), ref)
    monkeypatch.setattr(native_ops, "_ops", None)
    monkeypatch.setattr(native_ops, "_ops_why", "native CPU kernels unavailable: disabled by the test")
    assert native_ops.try_attention_decode(q, k, v, table, lens, 0.125) is None
    assert native_ops.try_rope(q[None, 0], q[None, 0], torch.tensor([0]), torch.ones(4, 64)) is None
    with pytest.raises(RuntimeError, match="disabled by the test"):
        native_ops.rmsnorm(torch.ones(2, 8), torch.ones(8), 1e-6)
    be = CpuBackend()  # the torch reference answers
    assert_close(be.attention_decode(q, k, v, table, lens, 0.125),
                 torch_attention.attention_decode(q, k, v, table, lens, 0.125), "fallback")


# ---------------------------------------------------------------- the C ABI checks its arguments
def lib():
    return native_ops._need()


def raw_attention(**override):
    """A valid kt_attention_decode argument block (and the tensors it points to), fields overridden."""
    k, v, table, lens = paged([9, 33], 2, 64, 16, BF16, seed=40)
    q, out = query(2, 4, 64, BF16, seed=41), torch.empty(2, 4, 64, dtype=BF16)
    keep = [k, v, table, lens, q, out]
    fields = dict(B=2, Hq=4, Hkv=2, D=64, num_blocks=k.shape[0], block_size=16, max_blocks=table.shape[1], window=0,
                  chunk=0, scale=0.125, q_dtype=1, kv_dtype=1, pool=0, q=q.data_ptr(), k_cache=k.data_ptr(),
                  v_cache=v.data_ptr(), block_tables=table.data_ptr(), seq_lens=lens.data_ptr(), sinks=None,
                  out=out.data_ptr())
    for name, value in override.items():
        if isinstance(value, torch.Tensor):
            keep.append(value)
            value = value.data_ptr()
        fields[name] = value
    return _AttnDecodeArgs(**fields), keep, table


@pytest.mark.parametrize("override,code", [
    (dict(q_dtype=2), -3), (dict(kv_dtype=-1), -3), (dict(pool=64), -2), (dict(pool=-1), -2),
    (dict(B=-1), -5), (dict(Hq=0), -5), (dict(Hkv=3), -5), (dict(Hkv=8), -5), (dict(D=0), -5), (dict(D=4097), -5),
    (dict(num_blocks=0), -5), (dict(block_size=-16), -5), (dict(max_blocks=0), -5), (dict(window=-1), -5),
    (dict(chunk=-2), -5), (dict(max_blocks=1 << 20, block_size=1 << 10), -5), (dict(num_blocks=1 << 25), -5),
    (dict(q=None), -6), (dict(k_cache=None), -6), (dict(v_cache=None), -6), (dict(block_tables=None), -6),
    (dict(seq_lens=None), -6), (dict(out=None), -6),
    (dict(seq_lens=torch.tensor([9, 0], dtype=torch.int32)), -13),
    (dict(seq_lens=torch.tensor([-5, 9], dtype=torch.int32)), -13),
    (dict(seq_lens=torch.tensor([9, 4 * 16 + 1], dtype=torch.int32)), -13),  # max_blocks = 4 blocks of 16
    (dict(num_blocks=2), -13),  # the table names blocks past the first two
])
def test_attention_decode_abi_rejects_what_it_cannot_trust(override, code):
    args, keep, table = raw_attention(**override)
    assert table.shape[1] == 4
    assert lib().kt_attention_decode(ctypes.byref(args)) == code


def test_attention_decode_abi_checks_every_block_id_it_reads():
    for bad in (-1, 2 ** 31 - 1):
        args, keep, table = raw_attention()
        table[1, 2] = bad  # sequence 1 (33 tokens) reads blocks 0, 1, 2
        assert lib().kt_attention_decode(ctypes.byref(args)) == -13
        table[1, 2] = 0
        assert lib().kt_attention_decode(ctypes.byref(args)) == 0
    args, keep, table = raw_attention(B=0, q=None, out=None, seq_lens=None)
    assert lib().kt_attention_decode(ctypes.byref(args)) == 0  # nothing to do, nothing read
    assert lib().kt_attention_decode(None) == -6


def test_rmsnorm_and_rope_abi_reject_what_they_cannot_trust():
    x, w, out = torch.randn(3, 64), torch.randn(64), torch.empty(3, 64)
    ok = dict(rows=3, D=64, eps=1e-6, x_dtype=0, w_dtype=0, pool=0, x=x.data_ptr(), w=w.data_ptr(), out=out.data_ptr())
    assert lib().kt_rmsnorm(ctypes.byref(_RmsNormArgs(**ok))) == 0
    for override, code in [(dict(D=0), -5), (dict(rows=-1), -5), (dict(D=1 << 25), -5), (dict(rows=1 << 40), -5),
                           (dict(x_dtype=2), -3), (dict(w_dtype=7), -3), (dict(pool=99), -2), (dict(x=None), -6),
                           (dict(w=None), -6), (dict(out=None), -6)]:
        assert lib().kt_rmsnorm(ctypes.byref(_RmsNormArgs(**{**ok, **override}))) == code, override
    assert lib().kt_rmsnorm(None) == -6

    q, k, qo, ko = torch.randn(2, 4, 64), torch.randn(2, 2, 64), torch.empty(2, 4, 64), torch.empty(2, 2, 64)
    pos, table = torch.tensor([0, 9]), torch_norm_rope.rope_cos_sin(64, 10)
    ok = dict(T=2, Hq=4, Hk=2, D=64, rot=64, table_rows=10, q_stride_t=256, q_stride_h=64, k_stride_t=128,
              k_stride_h=64, q_dtype=0, k_dtype=0, interleaved=0, pool=0, q=q.data_ptr(), k=k.data_ptr(),
              positions=pos.data_ptr(), cos_sin=table.data_ptr(), q_out=qo.data_ptr(), k_out=ko.data_ptr())
    assert lib().kt_rope(ctypes.byref(_RopeArgs(**ok))) == 0
    bad_pos, neg_pos = torch.tensor([0, 10]), torch.tensor([-1, 0])
    for override, code in [(dict(rot=65), -5), (dict(rot=0), -5), (dict(rot=66), -5), (dict(D=4097, rot=64), -5),
                           (dict(T=-1), -5), (dict(table_rows=0), -5), (dict(q_stride_t=-1), -5),
                           (dict(k_stride_h=1 << 40), -5), (dict(q_dtype=3), -3), (dict(pool=-2), -2),
                           (dict(positions=None), -6), (dict(cos_sin=None), -6), (dict(q_out=None), -6),
                           (dict(positions=bad_pos.data_ptr()), -13), (dict(positions=neg_pos.data_ptr()), -13),
                           (dict(table_rows=9), -13)]:
        assert lib().kt_rope(ctypes.byref(_RopeArgs(**{**ok, **override}))) == code, override
    assert lib().kt_rope(None) == -6


def test_the_packed_argument_blocks_are_the_abi_structs():
    """native_ops packs its argument blocks with struct (faster than building the ctypes
    Structures); the bytes must be the Structures' own, and the library's sizes agree."""
    for name, (packer, struct_type) in native_ops._PACKERS.items():
        assert getattr(lib(), name + "_args_size")() == ctypes.sizeof(struct_type) == packer.size, name
        values = [math.pi if t is ctypes.c_float else 3 * i + 1 for i, (_, t) in enumerate(struct_type._fields_)]
        assert packer.pack(*values) == bytes(struct_type(*values)), name


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16])
def test_narrow_index_dtypes_give_the_int64_result(dtype):
    """Block tables and lengths in any integer dtype the wrappers accept: a narrow one cannot hold the
    int32 clamp bounds, so it is widened first (it used to raise from inside the clamp)."""
    from kt_backends.cpu import native_mla

    q, kc = torch.randn(1, 4, 16), torch.randn(4, 4, 2, 16)
    bt, sl = torch.tensor([[1, 2]]), torch.tensor([6])
    want = native_ops.attention_decode(q, kc, kc, bt, sl, 0.25)
    torch.testing.assert_close(native_ops.try_attention_decode(q, kc, kc, bt.to(dtype), sl.to(dtype), 0.25), want)
    H, dn, dr, lora, dv = 2, 8, 4, 16, 8
    mla = (torch.randn(1, H, dn), torch.randn(1, H, dr), torch.randn(4, 4, 1, lora + dr), torch.randn(H, dn, lora),
           torch.randn(H, dv, lora))
    torch.testing.assert_close(native_mla.mla_decode(*mla, bt.to(dtype), sl.to(dtype), 0.3),
                               native_mla.mla_decode(*mla, bt, sl, 0.3))
