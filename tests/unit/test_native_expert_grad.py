"""Training's backward pass through frozen packed experts (native/kernels_grad.hpp, expert_grad.inc,
train/native_experts.py): the transposed products against float64 products of the weights decoded
from each format's definition (tests/conformance/dequant_reference.py), in every format and kernel
variant, and the autograd function's gradients (hidden states and routing weights) against torch
autograd through the reference expert loop."""
import pytest
import torch

from kt_backends.cpu import native
from kt_core.weights.quant import ExpertWeights, quantize
from tests.conformance.dequant_reference import dequantize as reference_dequantize
from tests.unit.native_experts import int8_with_zeros

pytestmark = [pytest.mark.skipif(not native.available(), reason="native CPU kernels not built"),
              pytest.mark.usefixtures("restore_native_variant")]


def _weights(fmt, E, M, K, group, g):
    t = torch.randn(E, M, K, generator=g) * K ** -0.5
    if fmt == "bf16":
        return t.bfloat16()
    if fmt == "int8z":
        return int8_with_zeros(t, group)
    if fmt == "int4pr":  # one group a row (quant.group_size=0)
        return quantize(t, "int4", 0)
    if fmt == "int4z":  # a zero point a group (quant.symmetric=false; GGUF's Q4_1)
        return quantize(t, "int4", group, symmetric=False)
    return quantize(t, fmt, group) if group else quantize(t, fmt)


def _dense(w, e):
    """Expert e's weight in float64, decoded from the format's definition (the conformance oracle)."""
    return reference_dequantize(w)[e]


def _variants():
    return native.supported_variants()


# (format, group): per-row and grouped int8, int8 with zero points, int4 grouped, with zero points and per row,
# fp8 in groups, w8a8
KINDS = [("bf16", 0), ("int8", 0), ("int8", 8), ("int8z", 8), ("int4", 8), ("int4", 16), ("int4z", 16), ("int4pr", 0),
         ("fp8", 8), ("fp8", 4), ("fp8", 1), ("w8a8", 0)]


@pytest.mark.parametrize("fmt,group", KINDS)
# 72 / 40: input blocks shorter than 16; 272: 17 panels, chunks of 8 + 8 + 1 (kernels_grad.hpp's kGradChunk)
@pytest.mark.parametrize("H,I", [(64, 48), (72, 40), (272, 48)])
def test_rows_t_equals_float64_products_of_the_dequantized_weights(fmt, group, H, I):
    from kt_backends.cpu import native_grad

    if group and (H % group or I % group):
        pytest.skip(f"groups of {group} do not divide {H} and {I}")
    g = torch.Generator().manual_seed(H + I)
    E = 4
    ws = [_weights(fmt, E, I, H, group, g), _weights(fmt, E, I, H, group, g), _weights(fmt, E, H, I, group, g)]
    packed = native.pack(ExpertWeights(torch.tensor([4, 1, 2, 3]), *ws))
    assert packed is not None
    # an expert without rows; 6 row tiles (bf16: passes of 3 + 3, decoded formats one of 6), 7 (3 + 2 + 2,
    # 4 + 3); set 37 rows for the last one to give one of three tiles. The vector forms' 8-row tiles
    # (AVX2): 90 rows in 3 + 3 + 3 + 3, 100 in those and one more share of 1, 30 in 2 + 2, 37 in 3 + 2;
    # the last expert's 5 rows: less than one tile of any width
    n0, n2 = (90, 100) if I != 40 else (30, 37)
    counts = torch.tensor([n0, 0, n2, 5])
    for proj, w, M, K in (("gate", ws[0], I, H), ("up", ws[1], I, H), ("down", ws[2], H, I)):
        A = torch.randn(int(counts.sum()), M, generator=g)
        want = torch.cat([A[:n0].double() @ _dense(w, 0), A[n0:n0 + n2].double() @ _dense(w, 2),
                          A[n0 + n2:].double() @ _dense(w, 3)]).float()
        base = torch.randn(want.shape, generator=g)
        for variant in _variants():
            native.set_variant(variant)
            for round_bf16 in (False, True):
                got = native_grad.expert_rows_t(packed, proj, A, counts, round_bf16=round_bf16)
                added = native_grad.expert_rows_t(packed, proj, A, counts, out=base.clone(), accumulate=True,
                                                  round_bf16=round_bf16)
                # float32 sums; a bf16 model's AMX tiles and AVX512-BF16 pairs (variants whose bf16
                # kernels round activations) round A and the weights (not w8a8's) to bf16
                rounds = round_bf16 and fmt != "w8a8" and native.bf16_tile_tokens(variant, "bf16") > 0
                tol = 8e-3 if rounds else 2e-6
                scale = want.abs().max()
                assert (got - want).abs().max() <= tol * scale, (variant, proj, round_bf16)
                assert (added - base - want).abs().max() <= tol * scale, (variant, proj, round_bf16)
                # the rows read in place through an index (the backward's routes into the tokens' rows)
                src, index = A.flip(0).contiguous(), torch.arange(A.shape[0] - 1, -1, -1)
                indexed = native_grad.expert_rows_t(packed, proj, torch.cat([src, src[:1]]), counts,
                                                    round_bf16=round_bf16, a_rows=index)
                torch.testing.assert_close(indexed, got, rtol=0, atol=0)


def test_rows_t_refuses_what_does_not_fit():
    from kt_backends.cpu import native_grad
    from tests.unit.native_experts import experts

    packed = native.pack(experts("int8", group=0))
    A = torch.zeros(3, 32)
    with pytest.raises(ValueError, match="counts"):
        native_grad.expert_rows_t(packed, "gate", A, torch.tensor([1, 1, 0, 0]))
    with pytest.raises(ValueError, match=r"\[rows, 32\]"):
        native_grad.expert_rows_t(packed, "gate", torch.zeros(3, 64), torch.tensor([1, 1, 1, 0]))
    with pytest.raises(ValueError, match="gate, up or down"):
        native_grad.expert_rows_t(packed, "router", A, torch.tensor([1, 1, 1, 0]))
    with pytest.raises(ValueError, match="out must be"):
        native_grad.expert_rows_t(packed, "gate", A, torch.tensor([1, 1, 1, 0]), out=torch.zeros(3, 32))
    buf = torch.zeros(3 * 64)
    with pytest.raises(ValueError, match="overlaps A"):
        native_grad.expert_rows_t(packed, "gate", buf[:96].view(3, 32), torch.tensor([1, 1, 1, 0]), out=buf.view(3, 64))
    with pytest.raises(ValueError, match="pass out"):
        native_grad.expert_rows_t(packed, "gate", A, torch.tensor([1, 1, 1, 0]), accumulate=True)
    with pytest.raises(ValueError, match="counts"):  # the counts sum to the index's rows, not A's
        native_grad.expert_rows_t(packed, "gate", A, torch.tensor([1, 1, 1, 0]), a_rows=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="int64"):
        native_grad.expert_rows_t(packed, "gate", A, torch.tensor([1, 0, 0, 0]), a_rows=torch.tensor([0.0]))
    shared = torch.zeros(3 * 64)  # an index the products would overwrite after the library checked it
    with pytest.raises(ValueError, match="overlaps a_rows"):
        native_grad.expert_rows_t(packed, "gate", A, torch.tensor([1, 1, 0, 0]), out=shared[:128].view(2, 64),
                                  a_rows=shared[124:128].view(torch.int64))
    with pytest.raises(ValueError, match="out of range"):  # an index past A's rows: the library's ERR_INDEX
        native_grad.expert_rows_t(packed, "gate", A, torch.tensor([1, 1, 0, 0]), a_rows=torch.tensor([0, 3]))


@pytest.mark.parametrize("I", [100, 768])  # 100: rows that end in a partial 8-lane step
def test_silu_mul_backward_equals_float64_autograd(I):
    """The SwiGLU activation's gradients in one native pass (act_grad.inc) against float64 torch
    autograd of silu(g) * u with the routing weight applied, and the routing weight's gradient
    <z, a>, on every variant; large |g| where the sigmoid saturates."""
    from kt_backends.cpu import native_grad

    g = torch.Generator().manual_seed(9)
    R = 131
    gu, z, w = torch.randn(R, 2 * I, generator=g) * 4, torch.randn(R, I, generator=g), torch.rand(R, generator=g)
    gu[0, :8] = torch.tensor([-100.0, -30.0, -10.0, 0.0, 10.0, 30.0, 100.0, 1e-3])
    gg, uu = gu[:, :I].double().requires_grad_(), gu[:, I:].double().requires_grad_()
    a = torch.nn.functional.silu(gg) * uu
    want = (*torch.autograd.grad(a, (gg, uu), z.double() * w.double()[:, None]), (z.double() * a.detach()).sum(-1))
    for variant in _variants():
        native.set_variant(variant)
        got = native_grad.silu_mul_backward(gu, z, w)
        for name, x, y in zip(("dg", "du", "dw"), got, want):
            assert x.dtype == torch.float32 and x.shape == y.shape
            assert float((x.double() - y).abs().max()) <= 1e-6 * float(y.abs().max()), (variant, name)


def test_silu_mul_backward_checks_what_it_is_given():
    from kt_backends.cpu import native_grad

    gu, z, w = torch.zeros(4, 20), torch.zeros(4, 10), torch.zeros(4)
    for bad in ((torch.zeros(4, 21), z, w), (gu, torch.zeros(4, 9), w), (gu, z, torch.zeros(5)),
                (gu.double(), z, w), (gu, z.t().contiguous().t(), w), (gu, z, w.bfloat16())):
        with pytest.raises(ValueError, match="silu_mul_backward: gu"):
            native_grad.silu_mul_backward(*bad)
    same = torch.zeros(4, 10)
    with pytest.raises(ValueError, match="dg and du must be two"):
        native_grad.silu_mul_backward(gu, z, w, dg=same, du=same)
    with pytest.raises(ValueError, match="overlap neither"):  # in place over its own input
        native_grad.silu_mul_backward(gu, z, w, dg=z, du=torch.zeros(4, 10))
    with pytest.raises(ValueError, match="overlap neither"):
        native_grad.silu_mul_backward(gu, z, w, dg=torch.zeros(4, 10), du=gu.view(-1)[:40].view(4, 10))
    dg, du, dw = native_grad.silu_mul_backward(torch.zeros(0, 20), torch.zeros(0, 10), torch.zeros(0))
    assert dg.shape == du.shape == (0, 10) and dw.shape == (0,)
    # the library checks its argument block itself (sizes, pool, pointers)
    import ctypes

    from kt_backends.cpu.native_abi import _ActGradArgs

    lib = native_grad._lib()
    out = [torch.zeros(4, 10), torch.zeros(4, 10), torch.zeros(4)]
    ok = dict(rows=4, I=10, pool=0, gu=gu.data_ptr(), z=z.data_ptr(), w=w.data_ptr(), dg=out[0].data_ptr(),
              du=out[1].data_ptr(), dw=out[2].data_ptr())
    assert lib.kt_silu_mul_backward(ctypes.byref(_ActGradArgs(**ok))) == 0
    for override, code in [(dict(rows=-1), -5), (dict(I=0), -5), (dict(I=1 << 30), -5), (dict(rows=1 << 40), -5),
                           (dict(pool=-2), -2), (dict(pool=64), -2), (dict(gu=None), -6), (dict(dw=None), -6)]:
        assert lib.kt_silu_mul_backward(ctypes.byref(_ActGradArgs(**{**ok, **override}))) == code, override
    assert lib.kt_silu_mul_backward(None) == -6


def _grads(moe, x, ids, weights, dy):
    x = x.clone().requires_grad_()
    w = weights.clone().requires_grad_()
    out = moe(x, ids, w)
    out.backward(dy)
    return out.detach(), x.grad, w.grad


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "swiglu_oai", "silu_clamp10"])
@pytest.mark.parametrize("fmt,bias", [("int4", False), ("int8", True), ("bf16", False), ("fp8", False)])
def test_native_expert_gradients_equal_autograd_through_the_reference(activation, fmt, bias):
    """Gradients of the hidden states and of the routing weights, float32 activations (float32 sums;
    the int8 / int4 forward kernels take the activations as int16 rows, ~1e-5 relative), against
    torch autograd through torch_ops.moe on the same weights decoded to float32; routes to experts
    another device holds add nothing."""
    from kt_core.backend.torch_ops.moe import moe_experts as reference
    from kt_core.train import native_experts
    from tests.unit.native_experts import H, experts

    ex = experts(fmt, group=16, bias=bias, seed=3)
    decoded = ExpertWeights(ex.expert_ids, *(reference_dequantize(w).float() for w in (ex.gate, ex.up, ex.down)),
                            ex.gate_bias, ex.up_bias, ex.down_bias)
    packed = native_experts.pack(ex)
    assert packed is not None
    g = torch.Generator().manual_seed(5)
    T, K = 40, 3
    ids = torch.stack([torch.randperm(9, generator=g)[:K] for _ in range(T)])  # ids 1, 2, 4, 6, 8: not held
    x, weights = torch.randn(T, H, generator=g) * 3, torch.rand(T, K, generator=g)
    dy = torch.randn(T, H, generator=g)
    want = _grads(lambda *a: reference(*a, decoded, activation), x, ids, weights, dy)
    for variant in _variants():
        native.set_variant(variant)
        got = _grads(lambda *a: native_experts.moe_experts(*a, packed, activation), x, ids, weights, dy)
        for name, a, b in zip(("output", "hidden grad", "routing weight grad"), got, want):
            assert (a - b).abs().max() <= 2e-4 * b.abs().max().clamp_min(1), (variant, name)


def test_bf16_model_gradients_on_the_tiles_stay_close():
    """A bf16 model: the AMX tiles round the gradient rows to bf16 as the forward rounds activations."""
    from kt_core.backend.torch_ops.moe import moe_experts as reference
    from kt_core.train import native_experts
    from tests.unit.native_experts import H, experts

    ex = experts("bf16", E=4, seed=4)
    decoded = ExpertWeights(ex.expert_ids, ex.gate.float(), ex.up.float(), ex.down.float())
    packed = native_experts.pack(ex)  # takes ex over (as at load time): decoded first
    g = torch.Generator().manual_seed(6)
    T = 64
    ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(T)])
    x, weights, dy = torch.randn(T, H, generator=g), torch.rand(T, 2, generator=g), torch.randn(T, H, generator=g)
    want = _grads(lambda *a: reference(*a, decoded, "silu"), x, ids, weights, dy)
    got = _grads(lambda *a: native_experts.moe_experts(*a, packed, "silu"), x.bfloat16(), ids, weights, dy.bfloat16())
    for a, b in zip(got, want):
        assert (a.float() - b).abs().max() <= 2e-2 * b.abs().max()


def test_forward_saving_checks_the_rows_it_writes():
    from tests.unit.native_experts import call, experts

    packed = native.pack(experts("int8", group=0))
    x, ids, w = call()
    with pytest.raises(ValueError, match=r"save_gu must be .*\[6, 64\]"):
        native.moe_forward(packed, x, ids, w, save_gu=torch.empty(5, 64))


def test_pool_and_counts_are_checked_not_truncated():
    """A pool index goes through the same check as every other call (ctypes would truncate 2**32 to pool
    0), and row counts must be integers."""
    from kt_backends.cpu import native_grad

    g = torch.Generator().manual_seed(0)
    ws = [(torch.randn(3, *shape, generator=g) * 0.1).bfloat16() for shape in ((32, 64), (32, 64), (64, 32))]
    ex = native.pack(ExpertWeights(torch.arange(3), *ws))
    E, I, H = ex.expert_ids.numel(), ex.inter, ex.hidden
    counts = torch.zeros(E, dtype=torch.long)
    counts[0] = 2
    A = torch.randn(2, H)  # down is H x I: its transposed product takes H-wide rows
    for pool in (2**32, 64, -1, "3", 1.9):
        with pytest.raises(ValueError, match="pool"):
            native_grad.expert_rows_t(ex, "down", A, counts, pool=pool)
    with pytest.raises(ValueError, match="integer row counts"):
        native_grad.expert_rows_t(ex, "down", A, counts.float())
    gu, z, w = torch.randn(2, 2 * I), torch.randn(2, I), torch.rand(2)
    with pytest.raises(ValueError, match="pool"):
        native_grad.silu_mul_backward(gu, z, w, pool=2**32)
    assert native_grad.expert_rows_t(ex, "down", A, counts).shape == (2, I)
