"""Quantized dense projections (quant.dense) on the native panel kernels, every variant the CPU
has, against a float64 reference built from the conformance oracle's own decoders."""
import pytest
import torch

from kt_backends.cpu import native, native_linear
from kt_core.weights.quant import quantize
from tests.conformance import dequant_reference as oracle
from tests.conformance.tolerances import native_moe_tolerance
from tests.unit.native_experts import int8_with_zeros

pytestmark = pytest.mark.skipif(native_linear._lib() is None, reason=f"native CPU kernels: {native.status()}")

CASES = [("int8", 0, True), ("int8", 32, False), ("int4", 32, True), ("int4", 64, False), ("int4", 0, True),
         ("fp8", 32, True), ("fp8", 0, True), ("w8a8", 0, True)]


@pytest.mark.parametrize("fmt,group,sym", CASES, ids=[f"{f}-g{g}-{'sym' if s else 'asym'}" for f, g, s in CASES])
@pytest.mark.parametrize("T", [1, 5, 37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_packed_linear_matches_the_reference(fmt, group, sym, T, dtype):
    g = torch.Generator().manual_seed(T)
    M, K = 70, 128  # 70: the last 16-row panel is partial
    w = torch.randn(M, K, generator=g)
    q = int8_with_zeros(w, group) if fmt == "int8" and not sym else quantize(w, fmt, group_size=group or K, symmetric=sym)
    packed = native_linear.pack_linear(q)
    assert (packed.proj.zero is not None) == (q.zeros is not None)
    assert packed is not None and packed.shape == (M, K)
    x, b = torch.randn(2, T, K, generator=g).to(dtype), torch.randn(M, generator=g)
    xx = oracle.w8a8_activations(x.double()) if fmt == "w8a8" else x.double()  # bf16 x: its own values
    ref = xx @ oracle.dequantize(q).T + b.double()
    for variant in native.supported_variants():
        native.set_variant(variant)
        try:
            out = native_linear.linear(x, packed, b)
        finally:
            native.set_variant(native.supported_variants()[-1])
        assert out.shape == (2, T, M) and out.dtype == dtype
        err = float((out.double() - ref).abs().max() / ref.abs().max())
        # one projection: the experts' path bound (int16 / int8 activation codes, bf16 tiles) applies
        assert err < native_moe_tolerance(fmt, variant, T, dtype == torch.bfloat16), (variant, err)


PAIR_CASES = [("int8", 0, True), ("int8", 32, False), ("int4", 32, True), ("int4", 64, False), ("int4", 0, True),
              ("fp8", 32, True)]


@pytest.mark.parametrize("fmt,group,sym", PAIR_CASES, ids=[f"{f}-g{g}-{'sym' if s else 'asym'}" for f, g, s in PAIR_CASES])
def test_avx512_bf16_pairs_take_the_weights_rounded_to_bf16(fmt, group, sym):
    """On an AVX512-BF16 CPU the avx512 variant runs a rounding call (a bf16 model's) of enough rows
    (native.bf16_tile_tokens) on the pair kernels whatever the weight format: the dequantized weights are
    rounded to bf16 once (per-row int8: its codes, exact; the row scales multiply the sums), then float32
    sums of bf16 products. So the result is float32-close to a float64 product of those rounded weights,
    and one row fewer (the int16-activation / float kernels, which keep the weights unrounded) is not."""
    least = native.bf16_tile_tokens("avx512", fmt)
    if "avx512" not in native.supported_variants() or least <= 0:
        pytest.skip("this CPU (or build) has no AVX512-BF16 pair kernels")
    g = torch.Generator().manual_seed(11)
    M, K = 70, 576  # two K blocks of 256 and one of 64; the last panel partial
    w = torch.randn(M, K, generator=g)
    q = int8_with_zeros(w, group) if fmt == "int8" and not sym else quantize(w, fmt, group_size=group or K, symmetric=sym)
    packed = native_linear.pack_linear(q)
    exact = oracle.dequantize(q)
    per_row = fmt == "int8" and not group
    rounded = exact if per_row else exact.to(torch.bfloat16).double()
    best = native.variant()
    native.set_variant("avx512")
    try:
        for T in (least, least + 9, least - 1):
            x = torch.randn(T, K, generator=g).to(torch.bfloat16).float()  # bf16 values, float32 calls
            out = native_linear.linear(x, packed, round_bf16=True).double()
            err = float((out - x.double() @ rounded.T).abs().max() / out.abs().max())
            if T >= least:
                assert err < 1e-4, (T, err)  # (grouped int8 with zero points: q s - z s, then rounded)
            elif not per_row:
                assert err > 5e-4, (T, err)  # the weights unrounded (~1.5e-3 here): not the pair kernels
    finally:
        native.set_variant(best)


def test_bad_inputs_are_refused_with_a_message():
    q = quantize(torch.randn(32, 64), "int8", group_size=64)
    packed = native_linear.pack_linear(q)
    with pytest.raises(ValueError, match="64"):
        native_linear.linear(torch.randn(3, 65), packed)
    with pytest.raises(ValueError, match="bias"):
        native_linear.linear(torch.randn(3, 64), packed, torch.randn(31))
    assert native_linear.pack_linear(torch.randn(4, 4)) is None  # a float weight keeps its own path


def test_a_packed_linear_changed_after_packing_is_refused_not_read():
    """The kernels read scales by the PackedLinear's group and sizes: one that no longer matches its
    tensors (a group changed, a format relabelled) is refused, as are operands on another device."""
    import dataclasses

    q = quantize(torch.randn(32, 64), "int4", group_size=32)
    packed = native_linear.pack_linear(q)
    x = torch.randn(3, 64)
    ok = native_linear.linear(x, packed)
    for change in ({"group": 8}, {"fmt": "int8"}, {"fmt": "fp8"}, {"in_features": 32}, {"pool": 64}):
        with pytest.raises(ValueError, match="packed linear|pool"):
            native_linear.linear(x[:, :32] if change.get("in_features") else x, dataclasses.replace(packed, **change))
    with pytest.raises(ValueError, match="on the CPU"):
        native_linear.linear(x, packed, torch.zeros(32, device="meta"))
    with pytest.raises(ValueError, match="CPU tensor"):
        native_linear.linear(x.to("meta"), packed)
    torch.testing.assert_close(native_linear.linear(x, packed), ok)  # the checks left the weight alone


def test_quant_dense_model_runs_packed_and_matches_the_torch_path(tmp_path, monkeypatch):
    """A model loaded with quant.dense=int8 holds packed dense weights and gives the logits of
    the same quantized model on the torch path (dense weights left unpacked)."""
    import kt_core
    from kt_backends.cpu import CpuBackend
    from kt_core.models.synthetic import synthesize
    from kt_core.weights.quant import QuantizedWeight

    shape = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, max_position_embeddings=256)
    path = tmp_path / "m"
    synthesize(path, preset="tiny-qwen3-moe", layers=2, shape=shape, sample_tokens=16, tokenizer="deepseek")
    ov = ["model.dtype=float32", "quant.dense=int8"]
    ids = list(range(5, 40))
    packed = kt_core.Engine.from_pretrained(path, overrides=ov)
    assert isinstance(packed.model.layers[0].attn.w["qkv"], native_linear.PackedLinear)  # q / k / v fused
    ours = packed.logits(ids)
    monkeypatch.setattr(CpuBackend, "prepare_dense", lambda self, w, index=0, owned=False: w)
    plain = kt_core.Engine.from_pretrained(path, overrides=ov)
    assert isinstance(plain.model.layers[0].attn.w["qkv"], QuantizedWeight)
    ref = plain.logits(ids)
    assert float((ours - ref).abs().max() / ref.abs().max()) < 1e-3


@pytest.mark.parametrize("fmt,group,sym", CASES, ids=[f"{f}-g{g}-{'sym' if s else 'asym'}" for f, g, s in CASES])
@pytest.mark.parametrize("M", [80, 70])
def test_codes_handed_over_are_packed_where_they_lie_with_the_same_bytes(fmt, group, sym, M, monkeypatch):
    """pack_linear(in_place=True) (a quantized weight the loader hands over) lays the panels out in the
    codes' own memory, a few panels at a time, with the bytes the copying packer writes; where the rows
    do not fill whole panels (70) it copies as before."""
    from kt_backends.cpu import native_pack

    monkeypatch.setattr(native_pack, "IN_PLACE_BYTES", 1)  # a panel at a time: every block boundary crossed
    g = torch.Generator().manual_seed(M)
    w = torch.randn(M, 128, generator=g)
    q = int8_with_zeros(w, group) if fmt == "int8" and not sym else quantize(w, fmt, group_size=group or 128,
                                                                             symmetric=sym)
    want = native_linear.pack_linear(q)
    codes = q.qdata.clone()
    q.qdata = codes
    got = native_linear.pack_linear(q, in_place=True)
    assert torch.equal(got.proj.data.view(torch.uint8), want.proj.data.view(torch.uint8))
    assert got.proj.data.shape == want.proj.data.shape and got.proj.data.dtype == want.proj.data.dtype
    assert (got.proj.data.data_ptr() == codes.data_ptr()) == (M % 16 == 0)  # in the codes' memory, or a copy
    x = torch.randn(3, 128, generator=g)
    assert torch.equal(native_linear.linear(x, got), native_linear.linear(x, want))
