"""kt_core.backend.torch_ops.wide_mm: bf16 products widened to float32 where torch's own bf16 GEMM is its
scalar loop (forced here on any CPU): values and gradients of float64 references, blocks of any size."""
import pytest
import torch
import torch.nn.functional as F

from kt_core.backend.torch_ops import attention, wide_mm


def _rel(a, b):
    return ((a.double() - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("block_rows", [7, 64, 10_000])  # uneven blocks, a short last one, a single block
def test_linear_values_and_every_gradient_match_float64(monkeypatch, block_rows):
    monkeypatch.setattr(wide_mm, "onednn_bf16", lambda: False)
    monkeypatch.setattr(wide_mm, "BLOCK_BYTES", block_rows * 48 * 4)
    g = torch.Generator().manual_seed(block_rows)
    x = torch.randn(3, 20, 48, generator=g).bfloat16().requires_grad_()
    w = torch.randn(100, 48, generator=g).bfloat16().requires_grad_()
    b = torch.randn(100, generator=g).bfloat16().requires_grad_()
    assert wide_mm.takes(x, w)
    y = wide_mm.linear(x, w, b)
    assert y.dtype == torch.bfloat16 and y.shape == (3, 20, 100)
    up = torch.randn(y.shape, generator=g)
    (y.float() * up).sum().backward()
    ref = [t.detach().double().requires_grad_() for t in (x, w, b)]
    want = F.linear(*ref)
    (want * up.double()).sum().backward()
    assert _rel(y, want.detach()) <= 2 ** -8  # one bf16 rounding (exact products, float32 sums)
    for got, r in zip((x.grad, w.grad, b.grad), ref):  # and the incoming gradient's own (y is bf16)
        assert got.dtype == torch.bfloat16 and got.shape == r.shape
        assert _rel(got, r.grad) <= 2 ** -7


def test_frozen_weight_keeps_no_input_and_takes_no_gradient(monkeypatch):
    monkeypatch.setattr(wide_mm, "onednn_bf16", lambda: False)
    x = torch.randn(32, 16).bfloat16().requires_grad_()
    w = torch.randn(24, 16).bfloat16()
    y = wide_mm.linear(x, w)
    assert y.grad_fn.saved_tensors[0] is None  # x is not kept for a weight gradient nobody wants
    y.float().sum().backward()
    assert w.grad is None and x.grad is not None


def test_what_it_takes(monkeypatch):
    monkeypatch.setattr(wide_mm, "onednn_bf16", lambda: False)
    w = torch.zeros(8, 16, dtype=torch.bfloat16)
    assert wide_mm.takes(torch.zeros(16, 16, dtype=torch.bfloat16), w)
    assert not wide_mm.takes(torch.zeros(15, 16, dtype=torch.bfloat16), w)  # a GEMV's rows: torch's product
    assert not wide_mm.takes(torch.zeros(16, 16), w.float())  # float32: torch's product as it is
    y = wide_mm.linear(torch.ones(4, 16, dtype=torch.bfloat16), w)  # below MIN_ROWS: F.linear, no custom node
    assert y.grad_fn is None
    monkeypatch.setattr(wide_mm, "onednn_bf16", lambda: True)  # torch's bf16 GEMM on oneDNN: left to it
    assert not wide_mm.takes(torch.zeros(16, 16, dtype=torch.bfloat16), w)


def test_a_few_rows_with_gradients_keep_torchs_forward_and_widen_the_backward(monkeypatch):
    """Below MIN_ROWS torch's bf16 x w^T stays (a GEMV), but its g @ w is the scalar loop's worst case at any
    row count: the backward widens w."""
    monkeypatch.setattr(wide_mm, "onednn_bf16", lambda: False)
    assert wide_mm.takes_nn(torch.zeros(1, 8, dtype=torch.bfloat16), torch.zeros(8, 16, dtype=torch.bfloat16))
    assert not wide_mm.takes_nn(torch.zeros(1, 8), torch.zeros(8, 16))
    calls = []
    monkeypatch.setattr(wide_mm, "mm_nn", lambda a, b, f=wide_mm.mm_nn: calls.append(a.shape) or f(a, b))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 48, generator=g).bfloat16().requires_grad_()
    w = torch.randn(100, 48, generator=g).bfloat16()
    y = wide_mm.linear(x, w)
    assert y.grad_fn is not None and torch.equal(y, F.linear(x.detach(), w))  # torch's own forward
    up = torch.randn(y.shape, generator=g)
    (y.float() * up).sum().backward()
    assert calls == [(6, 100)]
    assert _rel(x.grad, up.double() @ w.double()) <= 2 ** -7
    with torch.no_grad():
        assert wide_mm.linear(x, w).grad_fn is None


def test_onednn_bf16_is_what_torch_reports():
    assert wide_mm.onednn_bf16() == bool(torch.backends.mkldnn.is_available()
                                         and torch.ops.mkldnn._is_mkldnn_bf16_supported())


@pytest.mark.parametrize("masked", [False, True])
def test_bf16_attention_with_gradients_runs_widened_with_float64s_values(monkeypatch, masked):
    monkeypatch.setattr(wide_mm, "onednn_bf16", lambda: False)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(4, 10, 16, generator=g).bfloat16().requires_grad_()
    k = torch.randn(2, 10, 16, generator=g).bfloat16().requires_grad_()
    v = torch.randn(2, 10, 16, generator=g).bfloat16().requires_grad_()
    mask = torch.ones(10, 10, dtype=torch.bool).tril() if masked else None
    seen = []
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention",
                        lambda *a, f=F.scaled_dot_product_attention, **kw: seen.append(a[0].dtype) or f(*a, **kw))
    o = attention.attend(q, k, v, mask, 0.25)
    assert o.dtype == torch.bfloat16 and seen == [torch.float32]
    up = torch.randn(o.shape, generator=g)
    (o.float() * up).sum().backward()
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    rk, rv = (t.repeat_interleave(2, dim=0) for t in ref[1:])
    s = (ref[0] @ rk.transpose(-1, -2) * 0.25).masked_fill(~torch.ones(10, 10, dtype=torch.bool).tril(), float("-inf"))
    want = s.softmax(-1) @ rv
    (want * up.double()).sum().backward()
    assert _rel(o, want.detach()) <= 2 ** -7
    for got, r in zip((q.grad, k.grad, v.grad), ref):
        assert _rel(got, r.grad) <= 2 ** -7
    with torch.no_grad():  # no gradient: torch's bf16 kernel as before
        seen.clear()
        attention.attend(q, k, v, mask, 0.25)
        assert seen == [torch.bfloat16]


@pytest.mark.parametrize("rows,wide", [(63, False), (64, True)])
def test_the_cpu_backends_bf16_prefill_takes_float32_products_without_bf16_units(monkeypatch, rows, wide):
    """The CPU backend's bf16 linear from WIDE_ROWS rows where neither the CPU (AMX / AVX512-BF16) nor
    torch (oneDNN bf16) multiplies bf16: float32 products, as exact as the native kernel's."""
    from kt_backends.cpu import backend as cpu_backend, native

    if not native.available():
        pytest.skip("native CPU kernels not built: the backend's bf16 linear is torch's")
    monkeypatch.setattr(wide_mm, "onednn_bf16", lambda: False)
    monkeypatch.setattr(cpu_backend, "_bf16_matrix_units", lambda: False)
    taken = []
    monkeypatch.setattr(wide_mm, "mm_nt", lambda a, b, f=wide_mm.mm_nt: taken.append(a.shape) or f(a, b))
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 96, generator=g).bfloat16()
    w, b = torch.randn(40, 96, generator=g).bfloat16(), torch.randn(40, generator=g)
    with torch.inference_mode():
        y = cpu_backend.CpuBackend().linear(x, w, b)
    assert bool(taken) == wide and y.dtype == torch.bfloat16 and y.shape == (rows, 40)
    want = F.linear(x.double(), w.double(), b.bfloat16().double())
    assert _rel(y, want) <= 2 ** -8
