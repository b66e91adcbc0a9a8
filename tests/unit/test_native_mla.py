"""DeepSeek MLA on the native kernels (kt_backends.cpu.native_mla) against the torch reference
(kt_core.backend.torch_ops.attention.attention_mla) on every kernel variant this CPU runs: the
decode call, the bf16 prefill path (expanded keys and values on the tiles), the CPU backend's
routing, and what the wrapper and the library refuse."""
import ctypes

import pytest
import torch

from kt_backends.cpu import native, native_mla, native_ops
from kt_backends.cpu.backend import CpuBackend
from kt_backends.cpu.native_abi import _MlaDecodeArgs
from kt_core.backend.torch_ops import attention as torch_attention
from tests.unit.native_decode_cases import (BF16, F32, assert_close, assert_tile_close, paged, takes_tiles,  # noqa: F401
                                            variant)

pytestmark = pytest.mark.skipif(not native_ops.available(),
                                reason=f"native CPU kernels: {native_ops.why_unavailable()}")


def mla_case(H, dn, dr, lora, dv, lens, qdt, wdt, kvdt, bs=16, seed=0):
    """q_nope, q_pe, the latent cache, w_uk, w_uv, block table, seq_lens, query_start_loc, scale."""
    g = torch.Generator().manual_seed(seed)
    B = len(lens)
    latent, _, table, sl = paged(lens, 1, lora + dr, bs, kvdt, seed=seed + 1)
    q = torch.randn(B, H, dn + dr, generator=g).to(qdt)  # halves of one projection, as the layer has them
    w_uk = (torch.randn(H, dn, lora, generator=g) * dn ** -0.5).to(wdt)
    w_uv = (torch.randn(H, dv, lora, generator=g) * lora ** -0.5).to(wdt)
    return (q[..., :dn], q[..., dn:], latent, w_uk, w_uv, table, sl, torch.arange(B + 1, dtype=torch.int32),
            (dn + dr) ** -0.5)


SHAPES = [(4, 32, 16, 64, 32), (16, 128, 64, 512, 128), (3, 20, 0, 36, 12), (2, 16, 8, 40, 24)]
DTYPES = [(F32, F32, F32), (BF16, BF16, BF16), (F32, BF16, BF16), (BF16, F32, BF16)]


@pytest.mark.parametrize("shape", SHAPES, ids=["small", "deepseek", "no-rope-odd", "tails"])
@pytest.mark.parametrize("dtypes", DTYPES, ids=["f32", "bf16", "f32q", "f32w"])
def test_mla_decode_matches_reference(variant, shape, dtypes):
    """DeepSeek's head dims (16 heads) and small ones whose widths leave tails after the vector
    blocks (36: no vector path for the values at all); no rope part; sequences of 1, 5, 37, 300
    tokens in shuffled blocks; every mix of q / weight / cache dtypes."""
    args = mla_case(*shape, [1, 5, 37, 300], *dtypes)
    ref = torch_attention.attention_mla(*args)
    out = native_mla.mla_decode(*args[:7], args[8])
    H, _, dr, lora, _ = shape
    if takes_tiles(variant, dtypes[0], dtypes[2], H, lora + dr, lora):
        assert_tile_close(out, ref, f"{variant} {shape} {dtypes}")
    else:
        assert_close(out, ref, f"{variant} {shape} {dtypes}", rel32=1e-5)


@pytest.mark.parametrize("H", [20, 128])
def test_mla_decode_on_the_tiles(variant, H):
    """A bf16 model's MLA decode on AMX: the head group on the tiles (20 heads: a padded second tile
    of heads), long contexts split into runs on three threads, lengths that leave partial 16- and
    32-key tiles, against the float32 reference; the vector kernels' answer differs from the tiles'."""
    args = mla_case(H, 32, 32, 96, 48, [1, 17, 300, 1500], BF16, BF16, BF16, bs=16, seed=6)
    before = native.threads()
    native.set_threads(3)
    try:
        out = native_mla.mla_decode(*args[:7], args[8])
        best = native.variant()
        native.set_variant("avx2" if "avx2" in native.supported_variants() else "generic")
        vector = native_mla.mla_decode(*args[:7], args[8])
        native.set_variant(best)
    finally:
        native.set_threads(before)
    ref = torch_attention.attention_mla(*args)
    if takes_tiles(variant, BF16, BF16, H, 128, 96):
        assert_tile_close(out, ref, variant)
        assert not torch.equal(out, vector), "the tiles were not taken"
    else:
        assert_close(out, ref, variant, rel32=1e-5)


def test_mla_decode_long_contexts_on_the_pool(variant):
    """Contexts split into runs merged by log-sum-exp, on three threads, int64 indices."""
    args = list(mla_case(8, 32, 16, 64, 32, [1, 1500, 2100], F32, BF16, BF16, bs=32, seed=4))
    args[5], args[6] = args[5].long(), args[6].long()
    before = native.threads()
    native.set_threads(3)
    try:
        out = native_mla.mla_decode(*args[:7], args[8])
    finally:
        native.set_threads(before)
    assert_close(out, torch_attention.attention_mla(*args), variant, rel32=1e-5)


def test_cpu_backend_routes_decode_to_the_kernel_and_the_rest_to_torch():
    be = CpuBackend()
    args = mla_case(4, 32, 16, 64, 32, [9, 33], BF16, BF16, BF16, seed=7)
    assert torch.equal(be.attention_mla(*args), native_mla.mla_decode(*args[:7], args[8]))
    qn, qp, lat, uk, uv, table, sl, qsl, scale = args
    # a prefill (sequence 1 brings 3 tokens): not the decode kernel's; the prefill path on AMX, else torch
    q3n, q3p = torch.cat([qn, qn[1:], qn[1:]]), torch.cat([qp, qp[1:], qp[1:]])
    qsl3 = torch.tensor([0, 1, 4], dtype=torch.int32)
    pre = (q3n, q3p, lat, uk, uv, table, sl, qsl3, scale)
    assert native_mla.try_mla_decode(*pre) is None
    assert torch.equal(be.attention_mla(*pre), native_mla.try_mla_prefill(*pre))
    # as many tokens as sequences, but not one each (0 and 2): still a prefill
    assert native_mla.try_mla_decode(qn, qp, lat, uk, uv, table, sl, torch.tensor([0, 0, 2]), scale) is None
    # DeepSeek-V3.2's token selection, float16: the reference
    sel = torch.tensor([[0, 3, -1], [1, 2, 30]])
    assert native_mla.try_mla_decode(*args, selected=sel) is None
    assert torch.equal(be.attention_mla(*args, selected=sel), torch_attention.attention_mla(*args, selected=sel))
    half = [t.half() if t.is_floating_point() else t for t in args[:7]]
    assert native_mla.try_mla_decode(*half, qsl, scale) is None


def test_mla_decode_refuses_what_it_cannot_take():
    qn, qp, lat, uk, uv, table, sl, _, scale = mla_case(4, 32, 16, 64, 32, [9, 33], F32, F32, F32)
    with pytest.raises(ValueError, match="latent_cache must be"):
        native_mla.mla_decode(qn, qp, lat[..., :-1], uk, uv, table, sl, scale)
    with pytest.raises(ValueError, match="w_uk must be"):
        native_mla.mla_decode(qn, qp, lat, uk[:3], uv, table, sl, scale)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        native_mla.mla_decode(qn.half(), qp.half(), lat, uk, uv, table, sl, scale)
    with pytest.raises(ValueError, match="block_tables must be"):
        native_mla.mla_decode(qn, qp, lat, uk, uv, table[:1], sl, scale)
    bad = table.clone()
    bad[1, 1] = lat.shape[0]  # a block past the cache
    with pytest.raises(ValueError, match="out of range"):
        native_mla.mla_decode(qn, qp, lat, uk, uv, bad, sl, scale)
    with pytest.raises(ValueError, match="out of range"):
        native_mla.mla_decode(qn, qp, lat, uk, uv, table, sl + 10 ** 4, scale)


def test_library_checks_the_mla_arguments_itself():
    """Raw calls past the wrapper: sizes, dtypes and null pointers come back as error codes."""
    lib = native_ops._lib()
    qn, qp, lat, uk, uv, table, sl, _, _ = mla_case(2, 16, 8, 32, 16, [5], F32, F32, F32)
    out = torch.empty(1, 2, 16)
    held = (qn.contiguous(), qp.contiguous(), uk, uv, lat, table, sl, out)  # alive while the raw calls read them
    ptrs = [t.data_ptr() for t in held]
    good = [1, 2, 16, 8, 32, 16, lat.shape[0], lat.shape[1], table.shape[1], 0.25, 0, 0, 0, 0, *ptrs]
    assert lib.kt_mla_decode(ctypes.byref(_MlaDecodeArgs(*good))) == 0
    for i, value, code in [(4, 5000, -5), (1, 0, -5), (10, 7, -3), (13, 99, -2), (14, None, -6),
                           (8, 0, -5), (21, None, -6)]:
        bad = list(good)
        bad[i] = value
        assert lib.kt_mla_decode(ctypes.byref(_MlaDecodeArgs(*bad))) == code, (i, value)


# ---------------------------------------------------------------- prefill (expanded, on the tiles)
def expanded_reference(q_nope, q_pe, latent, w_uk, w_uv, table, lens, qsl, scale):
    """What the prefill path computes, in float32: keys and values expanded per head and rounded to
    bf16 (as transformers' bf16 DeepSeek computes them), then exact multi-head attention."""
    out = []
    for b in range(len(lens)):
        n, L = int(qsl[b + 1] - qsl[b]), int(lens[b])
        ctx = torch_attention.gather_context(latent, table[b], L)[:, 0].float()
        c, k_pe = ctx[:, :w_uk.shape[2]], ctx[:, w_uk.shape[2]:]
        k = torch.einsum("sl,hnl->hsn", c, w_uk.float()).bfloat16().float()
        k = torch.cat((k, k_pe[None].expand(k.shape[0], -1, -1)), dim=-1)
        v = torch.einsum("sl,hvl->hsv", c, w_uv.float()).bfloat16().float()
        q = torch.cat((q_nope, q_pe), dim=-1)[int(qsl[b]):int(qsl[b + 1])].float().transpose(0, 1)
        s = (q @ k.transpose(1, 2)) * scale
        s = s.masked_fill(torch.arange(L)[None, :] > torch.arange(L - n, L)[:, None], float("-inf"))
        out.append((torch.softmax(s, dim=-1) @ v).transpose(0, 1))
    return torch.cat(out)


def prefill_case(H=4, seed=9):
    """Two sequences: a chunk of 40 new tokens after 60 cached ones, and a fresh 70-token prompt."""
    qn, qp, lat, uk, uv, table, sl, _, scale = mla_case(H, 32, 16, 64, 48, [100, 70], BF16, BF16, BF16, seed=seed)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(110, H, 48, generator=g).bfloat16()
    return q[..., :32], q[..., 32:], lat, uk, uv, table, sl, torch.tensor([0, 40, 110], dtype=torch.int32), scale


def test_mla_prefill_matches_the_expanded_form(variant):
    args = prefill_case()
    out = native_mla.try_mla_prefill(*args, any_variant=True)
    ref = expanded_reference(*args)
    err = float((out.float() - ref).abs().max() / ref.abs().max())
    assert err < 1e-2, f"{variant}: {err:.3g}"  # the probabilities rounded to bf16 for P.V, the output to bf16
    contract = torch_attention.attention_mla(*args).float()  # the absorbed form, float32 throughout
    assert float((out.float() - contract).abs().max() / contract.abs().max()) < 2e-2


def test_mla_prefill_in_head_groups_and_routing(monkeypatch):
    args = prefill_case(H=6, seed=10)
    whole = native_mla.try_mla_prefill(*args, any_variant=True)
    monkeypatch.setattr(native_mla, "KV_BYTES", 1)  # one head at a time
    assert torch.allclose(native_mla.try_mla_prefill(*args, any_variant=True).float(), whole.float(),
                          rtol=1e-2, atol=1e-2)
    be = CpuBackend()
    assert torch.equal(be.attention_mla(*args), native_mla.try_mla_prefill(*args))
    mixed = [args[0].float(), *args[1:]]
    assert native_mla.try_mla_prefill(*mixed, any_variant=True) is None  # mixed dtypes: the reference
    monkeypatch.setenv("KT_NATIVE_MLA", "0")
    assert native_mla.try_mla_prefill(*args, any_variant=True) is None
    assert torch.equal(be.attention_mla(*args), torch_attention.attention_mla(*args))


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
def test_mla_prefill_on_sdpa_without_the_tiles(monkeypatch, dtype):
    """Float32 models, and bf16 ones where the tile path is off (CPUs without AMX): the expanded
    form on torch's SDPA. float32: the contract's value to float rounding (the same attention,
    other association); bf16: within the expanded form's rounding."""
    monkeypatch.setenv("KT_NATIVE_PREFILL_ATTENTION", "0")
    args = [t.to(dtype) if t.is_floating_point() else t for t in prefill_case(H=3, seed=11)[:7]]
    args += list(prefill_case(H=3, seed=11)[7:])
    out = native_mla.try_mla_prefill(*args)
    assert out is not None and out.dtype == dtype
    contract = torch_attention.attention_mla(*args).float()
    err = float((out.float() - contract).abs().max() / contract.abs().max())
    assert err < (1e-5 if dtype == F32 else 2e-2), err
    if dtype == BF16:
        ref = expanded_reference(*args)
        assert float((out.float() - ref).abs().max() / ref.abs().max()) < 1e-2
