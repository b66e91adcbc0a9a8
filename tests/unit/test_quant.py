import pytest
import torch

from kt_core.weights.quant import ExpertWeights, Quant, QuantizedWeight, dequantize, quantize


def test_int4_layout_is_the_documented_one():
    # codes 0..15 along the input dim, even index in the low nibble; symmetric zero point is 8
    qdata = torch.tensor([[0x10, 0xF8]], dtype=torch.uint8)  # codes 0,1 | 8,15
    w = QuantizedWeight(Quant.INT4, qdata, torch.tensor([[0.5]]), None, 4, 4)
    assert dequantize(w).tolist() == [[-4.0, -3.5, 0.0, 3.5]]
    asym = QuantizedWeight(Quant.INT4, qdata, torch.tensor([[0.5]]), torch.tensor([[1.0]]), 4, 4)
    assert dequantize(asym).tolist() == [[-0.5, 0.0, 3.5, 7.0]]


# asymmetric int4 fits its line by least squares, which may clip a group's extremes: within one step
@pytest.mark.parametrize("fmt,sym,bound", [("int8", True, 1 / 254), ("int4", False, 1 / 15)])
def test_roundtrip_error_is_within_half_a_step(fmt, sym, bound):
    w = torch.randn(3, 16, 64, generator=torch.Generator().manual_seed(0))
    q = quantize(w, fmt, group_size=32, symmetric=sym)
    err = (dequantize(q) - w).abs()
    if fmt == "int8":
        step = w.abs().amax(-1, keepdim=True)
    else:
        g = w.reshape(3, 16, 2, 32)
        rng = g.abs().amax(-1, keepdim=True) if sym else (g.amax(-1, keepdim=True) - g.amin(-1, keepdim=True))
        step, err = rng, err.reshape(3, 16, 2, 32)
    assert bool((err <= step * bound + 1e-6).all())
    assert q.shape == w.shape and q.select(1).shape == w[1].shape


@pytest.mark.parametrize("dist", ["normal", "student_t"])
def test_asymmetric_int4_fits_better_than_min_max(dist):
    """A least-squares line per group (float zero point) against the textbook min / max scale with
    an integer zero point: a fifth to a quarter less squared error."""
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(64, 256, generator=gen)
    if dist == "student_t":
        w = w / torch.rand(64, 256, generator=gen).clamp_min(0.05).sqrt()
    g = w.reshape(64, 8, 32)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    s = (hi - lo) / 15
    z = torch.round(-lo / s)
    textbook = ((torch.round(g / s) + z).clamp(0, 15) - z) * s
    q = quantize(w, "int4", group_size=32, symmetric=False)
    assert q.zeros is not None and not torch.equal(q.zeros, q.zeros.round())  # zero points need not be codes
    err = (dequantize(q).reshape(64, 8, 32) - g).square().sum()
    assert err < 0.85 * (textbook - g).square().sum()


@pytest.mark.parametrize("dist", ["normal", "student_t"])
def test_symmetric_int4_uses_all_16_levels_and_never_loses_to_amax_over_7(dist):
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(64, 256, generator=gen)
    if dist == "student_t":  # heavy tails, as trained weights have
        w = w / torch.rand(64, 256, generator=gen).clamp_min(0.05).sqrt()
    q = quantize(w, "int4", group_size=32)
    g = w.reshape(64, 8, 32)
    err = (dequantize(q).reshape(64, 8, 32) - g).square().sum(-1)
    naive_scale = g.abs().amax(-1, keepdim=True) / 7  # the textbook choice, 15 levels
    naive = (torch.round(g / naive_scale).clamp(-8, 7) * naive_scale - g).square().sum(-1)
    assert bool((err <= naive * (1 + 1e-5) + 1e-12).all()), "a group reconstructs worse than amax/7"
    assert float(err.sum() / naive.sum()) < 0.85  # and over the whole matrix clearly better
    codes = torch.stack((q.qdata & 0xF, q.qdata >> 4), -1)
    assert int(codes.min()) == 0 and int(codes.max()) == 15  # code 0 is -8: the 16th level
    assert bool((q.scales < 0).any()) and bool((q.scales > 0).any())  # a positive peak takes the -8 end


def test_quantize_in_chunks_matches_one_pass(monkeypatch):
    import kt_core.weights.quant as quant

    w = torch.randn(4, 24, 64, generator=torch.Generator().manual_seed(4)).bfloat16()
    for fmt, sym in (("int4", True), ("int4", False), ("int8", True), ("fp8", True)):
        whole = quantize(w, fmt, group_size=32, symmetric=sym)
        monkeypatch.setattr(quant, "CHUNK_ELEMENTS", 64 * 5)  # 5 rows a chunk: chunks cross experts
        chunked = quantize(w, fmt, group_size=32, symmetric=sym)
        monkeypatch.undo()
        assert torch.equal(whole.qdata, chunked.qdata) and torch.equal(whole.scales, chunked.scales), fmt
        assert whole.qdata.shape[:2] == (4, 24) and whole.scales.shape[:2] == (4, 24)


@pytest.mark.parametrize("sym", [True, False])
def test_int4_group_zero_is_one_group_a_row(sym):
    """quant.group_size=0: one scale (and zero point) per row, kt-kernel's AMXInt4 layout: a row's
    codes use the row's range, within one step of it as every int4 group."""
    w = torch.randn(3, 16, 96, generator=torch.Generator().manual_seed(4))
    q = quantize(w, "int4", group_size=0, symmetric=sym)
    assert q.group_size == 96 and q.scales.shape == (3, 16, 1) and (q.zeros is None) == sym
    rng = w.abs().amax(-1, keepdim=True) if sym else w.amax(-1, keepdim=True) - w.amin(-1, keepdim=True)
    assert bool(((dequantize(q) - w).abs() <= rng / 7.5 + 1e-6).all())
    per_row = (dequantize(q) - w).pow(2).mean()
    assert per_row > (dequantize(quantize(w, "int4", group_size=32, symmetric=sym)) - w).pow(2).mean()


def test_bad_group_size_is_a_clear_error():
    with pytest.raises(ValueError, match="group_size=48 must divide the input dim 64"):
        quantize(torch.randn(4, 64), "int4", group_size=48)


def test_expert_weights_checks_shapes():
    g = torch.zeros(2, 4, 8)
    with pytest.raises(ValueError, match="holds 2 experts but expert_ids lists 3"):
        ExpertWeights(torch.tensor([0, 1, 2]), g, g, torch.zeros(2, 8, 4))
    with pytest.raises(ValueError, match="duplicates"):
        ExpertWeights(torch.tensor([1, 1]), g, g, torch.zeros(2, 8, 4))


@pytest.mark.parametrize("group", [32, 0])
def test_fp8_round_trip_and_packing(group):
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(5))
    q = quantize(w, "fp8", group_size=group)
    assert q.qdata.dtype == torch.uint8 and q.scales.shape == (48, 64 // (group or 64))
    back = dequantize(q)
    rel = float((back - w).norm() / w.norm())
    assert 0 < rel < 0.04, rel  # e4m3 keeps 3 mantissa bits: ~2-3% rms error
    # every code decodes to the fp8 grid value, scaled
    assert torch.equal(q.qdata.view(torch.float8_e4m3fn).float().abs().amax(dim=-1) <= 448, torch.ones(48, dtype=torch.bool))


def test_w8a8_weights_are_int8_and_activations_fake_quantize():
    from kt_core.weights.quant import fake_quant_activations

    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(6))
    a, b = quantize(w, "w8a8"), quantize(w, "int8")
    assert torch.equal(a.qdata, b.qdata) and torch.equal(dequantize(a), dequantize(b))
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(7))
    fq = fake_quant_activations(x)
    step = x.abs().amax(dim=-1, keepdim=True) / 127
    assert torch.all((fq - x).abs() <= step / 2 + 1e-7)
    assert torch.allclose(fq / step, torch.round(fq / step), atol=1e-4)
