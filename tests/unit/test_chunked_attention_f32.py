"""The float32 chunked causal attention (backends/cpu/chunked_attention_f32.py) and the float32 form of
the native softmax pass it uses (native/attn_grad.inc, P / dS written over S / dP): against float64
formulas and float64 autograd through torch's SDPA, in every kernel variant; fine-tuning's attention
takes it where torch's bf16 products are its scalar loop (forced here on every CPU)."""
import math

import pytest
import torch
import torch.nn.functional as F

from kt_backends.cpu import chunked_attention as ca
from kt_backends.cpu import chunked_attention_f32 as cf
from kt_backends.cpu import native, native_ops
from kt_core.backend.torch_ops import wide_mm
from kt_core.train import native_attention as na
from tests.unit.lora_attention_cases import adapter_grads_with_and_without

pytestmark = [pytest.mark.skipif(not native_ops.available(), reason="native CPU kernels not built"),
              pytest.mark.usefixtures("restore_native_variant")]


def _expected(S, dP, O, dO, period, pos0, scale):
    rows, keys = S.shape
    seen = torch.arange(keys)[None, :] <= (pos0 + torch.arange(rows) % period)[:, None]
    P = torch.softmax((S.double() * scale).masked_fill(~seen, float("-inf")), -1)
    return P, P * (dP.double() - (O.double() * dO.double()).sum(-1, keepdim=True)) * scale


@pytest.mark.parametrize("rows,keys,period,pos0,dh", [(12, 37, 6, 31, 20), (64, 64, 64, 0, 128), (8, 9, 2, 0, 7)])
def test_the_float32_pass_in_place_matches_float64_in_every_variant(rows, keys, period, pos0, dh):
    g = torch.Generator().manual_seed(rows + keys + dh)
    S0, dP0 = torch.randn(rows, keys, generator=g) * 8, torch.randn(rows, keys, generator=g)
    O, dO = torch.randn(rows, dh, generator=g), torch.randn(rows, dh, generator=g)
    P_want, dS_want = _expected(S0, dP0, O, dO, period, pos0, 0.3)
    for variant in native.supported_variants():
        native.set_variant(variant)
        S, dP = S0.clone(), dP0.clone()
        ca.softmax_grad(S, dP, O, dO, period, pos0, 0.3, S, dP)  # P over S, dS over dP
        torch.testing.assert_close(S.double(), P_want, rtol=1e-5, atol=1e-7, msg=variant)
        torch.testing.assert_close(dS := dP.double(), dS_want, rtol=1e-4, atol=1e-6 * dS_want.abs().max().item(),
                                   msg=variant)
        assert (S[P_want == 0] == 0).all() and (dS[P_want == 0] == 0).all(), variant
        P = torch.full((rows, keys), 7.0)  # the forward's P alone, in its own buffer
        ca.softmax(S0, period, pos0, 0.3, P)
        torch.testing.assert_close(P.double(), P_want, rtol=1e-5, atol=1e-7, msg=variant)


def test_the_pass_takes_one_element_type_and_writes_over_nothing_it_reads():
    S, dP, O, dO = torch.zeros(4, 8), torch.zeros(4, 8), torch.zeros(4, 16), torch.zeros(4, 16)
    with pytest.raises(ValueError, match="all bf16 or all float32"):
        ca.softmax_grad(S, dP, O.bfloat16(), dO, 4, 0, 0.5, torch.zeros(4, 8), torch.zeros(4, 8))
    with pytest.raises(ValueError, match="P bf16 or float32"):
        ca.softmax(S, 4, 0, 0.5, torch.zeros(4, 8, dtype=torch.float16))
    for P, dS in [(dP, S), (S, S), (dP, dP), (O.view(-1)[:32].view(4, 8), dP)]:  # crossed, shared, over O
        with pytest.raises(ValueError, match="apart"):
            ca.softmax_grad(S, dP, O, dO, 4, 0, 0.5, P, dS)
    with pytest.raises(ValueError, match="apart"):  # a bf16 P over the first 64 bytes of float32 S
        ca.softmax(S, 4, 0, 0.5, S.view(-1).view(torch.bfloat16)[:32].view(4, 8))
    ca.softmax(S, 4, 0, 0.5, torch.zeros(4, 8, dtype=torch.bfloat16))  # the same apart
    ca.softmax_grad(S, dP, O, dO, 4, 0, 0.5, S, dP)  # in place: P is S, dS is dP
    ca.softmax(S, 4, 0, 0.5, S)


def test_an_expanded_gradient_and_no_tokens():
    """A float32 model's loss summed over the output hands the backward an expanded (stride 0) gradient;
    a sequence of no tokens is torch's to handle."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(h, 30, 16, generator=g).requires_grad_() for h in (4, 2, 2))
    with torch.enable_grad():
        if not na.takes(q, k, v, None, None):
            pytest.skip("the float32 chunks are not this CPU's path (oneDNN multiplies bf16 here)")
        na.attend(q, k, v, None, 0.25).sum().backward()
    qq, kk, vv = (t.detach().double().requires_grad_() for t in (q, k, v))
    F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=0.25, enable_gqa=True).sum().backward()
    for a, b in ((q, qq), (k, kk), (v, vv)):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-4, atol=1e-5)
    empty = [torch.zeros(h, 0, 16, requires_grad=True) for h in (4, 2, 2)]
    assert not na.takes(*empty, None, None)
    assert na.attend(*empty, None, 0.25).shape == (4, 0, 16)


def _sdpa64(q, k, v, do):
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    o = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, scale=1 / math.sqrt(q.shape[-1]),
                                       enable_gqa=q.shape[0] != k.shape[0])[0]
    o.backward(do.double())
    return [o.detach(), q.grad, k.grad, v.grad]


@pytest.mark.parametrize("Hq,Hkv,n,D,chunk", [(8, 2, 37, 32, 16), (4, 4, 50, 16, 64), (6, 1, 24, 64, 7)])
def test_forward_and_backward_match_float64_in_every_variant(Hq, Hkv, n, D, chunk, monkeypatch):
    monkeypatch.setattr(cf, "CHUNK", chunk)  # several query chunks, each stopping at its last key
    g = torch.Generator().manual_seed(Hq * n + D)
    q = (torch.randn(n, Hq, D, generator=g) * 2).transpose(0, 1)  # strided, as the model's
    k, v = torch.randn(Hkv, n, D, generator=g) * 2, torch.randn(Hkv, n, D, generator=g)
    do = torch.randn(Hq, n, D, generator=g)
    want = _sdpa64(q, k, v, do)
    for variant in native.supported_variants():
        native.set_variant(variant)
        o = cf.forward(q, k, v, 1 / math.sqrt(D))
        got = [o, *cf.backward(q, k, v, o, do, 1 / math.sqrt(D))]
        for name, a, b in zip(("o", "dq", "dk", "dv"), got, want):
            assert a.dtype == torch.float32 and a.shape == b.shape, name
            assert float((a.double() - b).norm() / b.norm()) < 1e-5, (variant, name)


def test_the_forward_after_a_cached_prefix():
    """Queries that are the last n of L positions see the whole prefix and their own causal part."""
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(4, 5, 16, generator=g), torch.randn(2, 12, 16, generator=g), torch.randn(2, 12, 16,
                                                                                                 generator=g)
    hidden = torch.arange(12)[None, :] > torch.arange(7, 12)[:, None]
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 0), v.repeat_interleave(2, 0),
                                          attn_mask=~hidden, scale=0.25)
    out = torch.zeros(4, 5, 16)
    assert cf.forward(q, k, v, 0.25, out=out) is out
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_lora_step_takes_the_float32_chunks_where_bf16_products_are_scalar(dtype, tiny_checkpoint, monkeypatch):
    """With torch's bf16 products on its scalar loop (AVX2-only CPUs; forced here), the trainer's causal
    attention runs the float32 chunks, and the adapters' gradients are torch's (float32 SDPA) ones."""
    monkeypatch.setattr(wide_mm, "onednn_bf16", lambda: False)
    monkeypatch.setattr(na, "_bf16_products", lambda native: False)  # no pair products: the float32 chunks
    if not cf.takes():
        pytest.skip("the native ops' generic variant: the float32 chunks are taken with vector variants only")
    calls = []
    forward = cf.forward
    monkeypatch.setattr(cf, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    ours, theirs = adapter_grads_with_and_without(tiny_checkpoint("llama"), dtype, monkeypatch)
    assert calls, "the trainer's attention did not run the float32 chunks"
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for a, b in zip(ours, theirs):
        assert float((a - b).norm() / b.norm()) < tol
