"""Fine-tuning's causal attention backward (kt_core/train/native_attention.py, its native pieces in
backends/cpu/chunked_attention.py, native/attn_grad.inc):
the native element-wise pass against float64 formulas in every kernel variant, and the gradients of
the whole path against float64 autograd through torch's SDPA, no further from it than torch's own
bf16 backward; what the path does not take goes to torch's."""
import ctypes
import math

import pytest
import torch
import torch.nn.functional as F

from kt_backends.cpu import chunked_attention as ca
from kt_backends.cpu import chunked_attention_f32
from kt_backends.cpu import native, native_ops
from kt_backends.cpu.native_abi import _AttnSoftmaxGradArgs
from kt_core.train import native_attention as na
from tests.unit.lora_attention_cases import adapter_grads_with_and_without

pytestmark = [pytest.mark.skipif(not native_ops.available(), reason="native CPU kernels not built"),
              pytest.mark.usefixtures("restore_native_variant")]


def _expected(S, dP, O, dO, period, pos0, scale):
    """float64 P and dS of the kernel's contract."""
    rows, keys = S.shape
    pos = pos0 + torch.arange(rows) % period
    seen = torch.arange(keys)[None, :] <= pos[:, None]
    z = (S.double() * scale).masked_fill(~seen, float("-inf"))
    P = torch.softmax(z, -1)
    D = (O.double() * dO.double()).sum(-1, keepdim=True)
    return P, P * (dP.double() - D) * scale


@pytest.mark.parametrize("rows,keys,period,pos0,dh", [(12, 37, 6, 31, 20), (64, 64, 64, 0, 128), (8, 9, 2, 0, 7),
                                                      (6, 40, 3, 100, 16)])
def test_softmax_grad_matches_float64_in_every_variant(rows, keys, period, pos0, dh):
    g = torch.Generator().manual_seed(rows + keys)
    S, dP = torch.randn(rows, keys, generator=g) * 8, torch.randn(rows, keys, generator=g)
    O, dO = torch.randn(rows, dh, generator=g).bfloat16(), torch.randn(rows, dh, generator=g).bfloat16()
    scale = 0.3
    P0, dS0 = _expected(S, dP, O, dO, period, pos0, scale)
    for variant in native.supported_variants():
        native.set_variant(variant)
        P = torch.full((rows, keys), 7.0, dtype=torch.bfloat16)  # every element must be written
        dS = torch.full_like(P, 7.0)
        ca.softmax_grad(S, dP, O, dO, period, pos0, scale, P, dS)
        torch.testing.assert_close(P.double(), P0, rtol=8e-3, atol=1e-6, msg=variant)
        torch.testing.assert_close(dS.double(), dS0, rtol=8e-3, atol=1e-4 * dS0.abs().max().item(), msg=variant)
        hidden = (P0 == 0)
        assert (P.double()[hidden] == 0).all() and (dS.double()[hidden] == 0).all(), variant


@pytest.mark.parametrize("rows,keys,period,pos0", [(12, 37, 6, 31), (64, 64, 64, 0), (8, 9, 2, 0), (6, 40, 3, 100)])
def test_the_forward_softmax_matches_float64_in_every_variant(rows, keys, period, pos0):
    g = torch.Generator().manual_seed(rows * keys)
    S = torch.randn(rows, keys, generator=g) * 8
    P0, _ = _expected(S, S, torch.zeros(rows, 1), torch.zeros(rows, 1), period, pos0, 0.3)
    for variant in native.supported_variants():
        native.set_variant(variant)
        P = torch.full((rows, keys), 7.0, dtype=torch.bfloat16)  # every element must be written
        ca.softmax(S, period, pos0, 0.3, P)
        torch.testing.assert_close(P.double(), P0, rtol=8e-3, atol=1e-6, msg=variant)
        assert (P.double()[P0 == 0] == 0).all(), variant


def test_a_nan_score_is_not_clamped_away_in_any_variant():
    S, dP = torch.randn(4, 24), torch.randn(4, 24)
    S[1, 3] = float("nan")
    O, dO = torch.randn(4, 16).bfloat16(), torch.randn(4, 16).bfloat16()
    for variant in native.supported_variants():
        native.set_variant(variant)
        P, dS = torch.zeros(4, 24, dtype=torch.bfloat16), torch.zeros(4, 24, dtype=torch.bfloat16)
        ca.softmax_grad(S, dP, O, dO, 4, 20, 0.5, P, dS)
        assert torch.isnan(P[1, :20].float()).any() and torch.isfinite(P[[0, 2, 3]].float()).all(), variant


def test_softmax_grad_checks_its_arguments():
    lib = native_ops._need()
    S, dP = torch.zeros(4, 8), torch.zeros(4, 8)
    O, dO = torch.zeros(4, 16, dtype=torch.bfloat16), torch.zeros(4, 16, dtype=torch.bfloat16)
    P, dS = torch.zeros(4, 8, dtype=torch.bfloat16), torch.zeros(4, 8, dtype=torch.bfloat16)
    ok = dict(rows=4, keys=8, ld=8, period=4, pos0=0, dh=16, scale=0.5, pool=0, dtype=1, S=S.data_ptr(),
              dP=dP.data_ptr(), O=O.data_ptr(), dO=dO.data_ptr(), P=P.data_ptr(), dS=dS.data_ptr())
    assert lib.kt_attn_softmax_grad(ctypes.byref(_AttnSoftmaxGradArgs(**ok))) == 0
    for override, code in [({"ld": 7}, -5), ({"keys": 0}, -5), ({"period": 0}, -5), ({"pos0": -1}, -5),
                           ({"dh": 0}, -5), ({"scale": float("nan")}, -5), ({"scale": 0.0}, -5), ({"rows": -1}, -5),
                           ({"pool": 64}, -2), ({"dtype": 2}, -3), ({"S": None}, -6), ({"dO": None}, -6),
                           ({"dS": None}, -6)]:
        assert lib.kt_attn_softmax_grad(ctypes.byref(_AttnSoftmaxGradArgs(**{**ok, **override}))) == code, override
    assert lib.kt_attn_softmax_grad(None) == -6
    forward = {**ok, "dP": None, "O": None, "dO": None, "dS": None}  # P alone: all four null, or none
    assert lib.kt_attn_softmax_grad(ctypes.byref(_AttnSoftmaxGradArgs(**forward))) == 0
    assert lib.kt_attn_softmax_grad(ctypes.byref(_AttnSoftmaxGradArgs(**{**forward, "O": O.data_ptr()}))) == -6
    assert lib.kt_attn_softmax_grad(ctypes.byref(_AttnSoftmaxGradArgs(**{**forward, "P": None}))) == -6
    assert ctypes.sizeof(_AttnSoftmaxGradArgs) == lib.kt_attn_softmax_grad_args_size()
    with pytest.raises(ValueError, match="multiple of period"):
        ca.softmax_grad(S, dP, O, dO, 3, 0, 0.5, P, dS)


def _grads(fn, q, k, v, do):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o = fn(q, k, v)
    o.backward(do)
    return [o.detach(), q.grad, k.grad, v.grad]


@pytest.mark.parametrize("Hq,Hkv,n,D,chunk", [(8, 2, 37, 32, 256), (4, 4, 50, 16, 16), (6, 1, 24, 64, 7)])
def test_gradients_are_as_close_to_float64_as_torchs(Hq, Hkv, n, D, chunk, monkeypatch):
    if not ca._precision_switch():
        pytest.skip("this torch has no torch.backends.mkldnn.matmul.fp32_precision")
    monkeypatch.setattr(ca, "CHUNK", chunk)  # several query chunks, each stopping at its last key
    g = torch.Generator().manual_seed(Hq * n + D)
    q = (torch.randn(n, Hq, D, generator=g) * 2).bfloat16().transpose(0, 1)  # strided, as attention_prefill's
    k, v = (torch.randn(Hkv, n, D, generator=g) * 2).bfloat16(), torch.randn(Hkv, n, D, generator=g).bfloat16()
    do = torch.randn(Hq, n, D, generator=g).bfloat16()
    scale = 1 / math.sqrt(D)
    assert na.takes(q.requires_grad_(), k, v, None, None, any_cpu=True)

    def sdpa(a, b, c):
        return F.scaled_dot_product_attention(a[None], b[None], c[None], is_causal=True, scale=scale,
                                              enable_gqa=Hq != Hkv)[0]

    ref = _grads(sdpa, q.double(), k.double(), v.double(), do.double())
    theirs = _grads(sdpa, q, k, v, do)
    for variant in native.supported_variants():
        native.set_variant(variant)
        ours = _grads(lambda a, b, c: na.attend(a, b, c, None, scale, any_cpu=True), q, k, v, do)
        for name, o, t, r in zip(("out", "dq", "dk", "dv"), ours, theirs, ref):
            assert o.dtype == torch.bfloat16 and o.shape == r.shape
            err, torch_err = (o.double() - r).norm() / r.norm(), (t.double() - r).norm() / r.norm()
            assert err <= 1.5 * torch_err + 2e-3, (variant, name, float(err), float(torch_err))


def test_what_the_path_does_not_take_goes_to_torch():
    q = torch.randn(4, 6, 8, dtype=torch.bfloat16, requires_grad=True)
    k = v = torch.randn(2, 6, 8, dtype=torch.bfloat16)
    mask = torch.ones(6, 6, dtype=torch.bool).tril()
    assert not na.takes(q, k, v, mask, None, any_cpu=True)  # a mask (sliding window, chunked attention)
    assert not na.takes(q, k, v, None, torch.zeros(4), any_cpu=True)  # attention sinks
    # float32 models: the float32 chunks where torch's bf16 products are scalar (test_chunked_attention_f32.py)
    assert na.takes(q.float(), k.float(), v.float(), None, None, any_cpu=True) == chunked_attention_f32.takes()
    assert not na.takes(q[:, :3], k, v, None, None, any_cpu=True)  # queries after a cached context
    with torch.no_grad():
        assert not na.takes(q, k, v, None, None, any_cpu=True)
    out = na.attend(q, k, v, mask, 0.5, any_cpu=True)  # torch's path, the same result
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 0), v.repeat_interleave(2, 0), attn_mask=mask,
                                          scale=0.5)
    torch.testing.assert_close(out, want)


def test_a_bf16_lora_step_on_the_cpu_takes_this_backward(tiny_checkpoint, monkeypatch):
    """AutogradBackend routes a bf16 model's causal attention here (forced on every CPU), and the
    adapters' gradients agree with torch's backward to bf16's precision."""
    if not ca._precision_switch():
        pytest.skip("this torch has no torch.backends.mkldnn.matmul.fp32_precision")
    calls = []
    path = na._path
    monkeypatch.setattr(na, "_path", lambda *a, **k: calls.append(1) or path(*a[:5], any_cpu=True))
    ours, theirs = adapter_grads_with_and_without(tiny_checkpoint("llama"), torch.bfloat16, monkeypatch)
    assert calls, "the backend did not route its attention through native_attention.attend"
    for a, b in zip(ours, theirs):
        assert float((a - b).norm() / b.norm()) < 5e-2


def test_the_tiles_make_the_same_probabilities_and_score_gradients():
    """kt_attn_scores_grad (the products on the AMX tiles or the AVX512-BF16 pair kernels, q / do / o read
    where they lie) against the float64 formulas, for a chunk of query positions past the first and rows
    short of a tile, in every variant that takes it."""
    takers = [v for v in native.supported_variants() if v == "amx" or native.bf16_tile_tokens(v, "bf16") > 0]
    if not takers:
        pytest.skip("needs AMX tiles or AVX512-BF16")
    for variant in native.supported_variants():
        native.set_variant(variant)
        _scores_grad_case(variant in takers)


def _scores_grad_case(takes: bool):
    g = torch.Generator().manual_seed(5)
    H, G, n, D, c0, c1 = 2, 3, 45, 64, 13, 41
    q = torch.randn(n, H * G, D, generator=g).bfloat16().transpose(0, 1)  # strided
    do, o = torch.randn(H * G, n, D, generator=g).bfloat16(), torch.randn(n, H * G, D, generator=g).bfloat16()
    o = o.transpose(0, 1)
    k, v = torch.randn(n, H, D, generator=g).bfloat16().transpose(0, 1), torch.randn(H, n, D, generator=g).bfloat16()
    v = v.transpose(1, 2).contiguous().transpose(1, 2)  # not k's strides: refused, then the same as k's
    P, dS = (torch.full((H, G, c1 - c0, c1), 7.0, dtype=torch.bfloat16) for _ in range(2))
    assert not ca.scores_grad(q, do, o, k, v, c0, c1, 0.3, P, dS)
    v = v.transpose(0, 1).contiguous().transpose(0, 1)
    assert k.stride() == v.stride() and ca.scores_grad(q, do, o, k, v, c0, c1, 0.3, P, dS) == takes
    if not takes:
        return
    fwd = torch.full_like(P, 7.0)  # the forward's form: P alone (on the pair kernels, AMX CPUs too)
    assert ca.scores_softmax(q, k, c0, c1, 0.3, fwd)
    for h in range(H):
        heads = slice(h * G, (h + 1) * G)
        S = (q[heads, c0:c1].double() @ k[h, :c1].double().T).reshape(-1, c1)
        dP = (do[heads, c0:c1].double() @ v[h, :c1].double().T).reshape(-1, c1)
        P0, dS0 = _expected(S, dP, o[heads, c0:c1].reshape(-1, D), do[heads, c0:c1].reshape(-1, D), c1 - c0, c0, 0.3)
        torch.testing.assert_close(P[h].reshape(-1, c1).double(), P0, rtol=8e-3, atol=1e-6)
        torch.testing.assert_close(dS[h].reshape(-1, c1).double(), dS0, rtol=8e-3, atol=1e-4 * dS0.abs().max().item())
        torch.testing.assert_close(fwd[h].reshape(-1, c1).double(), P0, rtol=8e-3, atol=1e-6)


def test_scores_grad_checks_its_arguments():
    from kt_backends.cpu.native_abi import _AttnScoresGradArgs

    lib = native_ops._need()
    assert ctypes.sizeof(_AttnScoresGradArgs) == lib.kt_attn_scores_grad_args_size()
    x = torch.zeros(4 * 64, dtype=torch.bfloat16)
    ok = dict(H=1, G=1, D=32, c0=0, c1=2, q_hs=0, q_ps=32, do_hs=0, do_ps=32, o_hs=0, o_ps=32, kv_hs=0, kv_ps=32,
              scale=0.5, pool=0, **{name: x.data_ptr() for name in ("q", "dO", "O", "k", "v", "P", "dS")})
    assert lib.kt_attn_scores_grad(ctypes.byref(_AttnScoresGradArgs(**ok))) in (0, -3)  # -3: no AMX tiles here
    for override, code in [({"D": 16}, -5), ({"D": 48}, -5), ({"c1": 0}, -5), ({"c0": 2}, -5), ({"H": 0}, -5),
                           ({"scale": float("inf")}, -5), ({"q_ps": -1}, -9), ({"kv_ps": 1 << 40}, -9),
                           ({"pool": -1}, -2), ({"k": None}, -6), ({"dS": None}, -6)]:
        assert lib.kt_attn_scores_grad(ctypes.byref(_AttnScoresGradArgs(**{**ok, **override}))) == code, override
    assert lib.kt_attn_scores_grad(None) == -6
    forward = {**ok, "dO": None, "O": None, "v": None, "dS": None}  # P alone: the four null, or none
    assert lib.kt_attn_scores_grad(ctypes.byref(_AttnScoresGradArgs(**forward))) in (0, -3)  # -3: no pair kernels
    for half in ({"v": x.data_ptr()}, {"dS": x.data_ptr()}, {"P": None}, {"q": None}):
        assert lib.kt_attn_scores_grad(ctypes.byref(_AttnScoresGradArgs(**{**forward, **half}))) == -6, half
