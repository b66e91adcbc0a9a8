"""Fine-tuning's rmsnorm and rope on the native kernels with autograd (kt_core/train/native_norm_rope.py,
native/norm_grad.inc): values and gradients against torch autograd through the reference
(backend/torch_ops/norm_rope.py), in every kernel variant; the cases the kernels do not take fall back."""
import pytest
import torch

from kt_backends.cpu import native, native_ops
from kt_core.backend.torch_ops import norm_rope as ref
from kt_core.train import native_norm_rope as nnr

pytestmark = [pytest.mark.skipif(not native_ops.available(), reason="native CPU kernels not built"),
              pytest.mark.usefixtures("restore_native_variant")]


@pytest.mark.parametrize("shape", [(5, 48), (3, 4, 40), (2, 7)])  # D past, at and under a vector's 8 lanes
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_gradient_equals_autograd_through_the_reference(shape, dtype):
    g = torch.Generator().manual_seed(len(shape) * 10 + shape[-1])
    x0 = (torch.randn(shape, generator=g) * 3).to(dtype)
    w = (torch.randn(shape[-1], generator=g) + 1).to(dtype)
    up = torch.randn(shape, generator=g).to(dtype)
    xr = x0.double().requires_grad_()  # the oracle: float64 autograd through the reference
    (ref.rmsnorm(xr, w.double(), 1e-5) * up.double()).sum().backward()
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    for variant in native.supported_variants():
        native.set_variant(variant)
        x = x0.clone().requires_grad_()
        out = nnr.rmsnorm(x, w, 1e-5)
        out.backward(up)
        want = ref.rmsnorm(x0, w, 1e-5)
        assert out.dtype == dtype and (out.float() - want.float()).abs().max() <= tol * want.float().abs().max()
        scale = xr.grad.abs().max()
        assert x.grad.dtype == dtype and (x.grad.double() - xr.grad).abs().max() <= tol * scale, variant


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rot", [16, 8])  # whole and partial rotary
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_forward_and_gradient_are_autograds_arithmetic(interleaved, rot, dtype):
    g = torch.Generator().manual_seed(rot + interleaved)
    T, Hq, Hk, D = 6, 4, 2, 16
    table = ref.rope_cos_sin(rot, 32, 10000.0)
    positions = torch.tensor([3, 0, 17, 5, 31, 9])
    q0, k0 = torch.randn(T, Hq, D, generator=g).to(dtype), torch.randn(T, Hk, D, generator=g).to(dtype)
    uq, uk = torch.randn(T, Hq, D, generator=g).to(dtype), torch.randn(T, Hk, D, generator=g).to(dtype)
    qr, kr = q0.clone().requires_grad_(), k0.clone().requires_grad_()
    a, b = ref.rope(qr, kr, positions, table, interleaved)
    torch.autograd.backward((a, b), (uq, uk))
    for variant in native.supported_variants():
        native.set_variant(variant)
        q, k = q0.clone().requires_grad_(), k0.clone().requires_grad_()
        c, d = nnr.rope(q, k, positions, table, interleaved)
        torch.autograd.backward((c, d), (uq, uk))
        # the same products and sums, each rounded as the reference rounds them
        torch.testing.assert_close(c, a, rtol=0, atol=0)
        torch.testing.assert_close(d, b, rtol=0, atol=0)
        torch.testing.assert_close(q.grad, qr.grad, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(k.grad, kr.grad, rtol=1e-6, atol=1e-6)


def test_what_the_kernels_do_not_take_falls_back():
    x, w = torch.randn(3, 8), torch.ones(8)
    assert nnr.rmsnorm(x, w.clone().requires_grad_(), 1e-6) is None  # a weight that wants its gradient
    assert nnr.rmsnorm(x.half(), w, 1e-6) is None
    assert nnr.rope(torch.randn(2, 1, 8), torch.randn(2, 1, 8), torch.tensor([0, 1]),
                    ref.rope_cos_sin(10, 4)) is None  # rot_dim past head_dim
    with pytest.raises(ValueError, match="one shape"):
        nnr.rmsnorm_backward(x, w, torch.randn(3, 7), 1e-6)


def test_the_backward_abi_rejects_what_it_cannot_trust():
    """kt_rmsnorm_backward checks what kt_rmsnorm does, and the gradient's pointer."""
    import ctypes

    from kt_backends.cpu import native_lib
    from kt_backends.cpu.native_abi import _RmsNormGradArgs

    lib = native_lib._load()  # (argtypes left as native_ops sets them: byref and packed bytes both pass)
    x, w, g, dx = torch.randn(3, 64), torch.randn(64), torch.randn(3, 64), torch.empty(3, 64)
    ok = dict(rows=3, D=64, eps=1e-6, x_dtype=0, w_dtype=0, pool=0, x=x.data_ptr(), w=w.data_ptr(), g=g.data_ptr(),
              dx=dx.data_ptr())
    assert lib.kt_rmsnorm_backward(ctypes.byref(_RmsNormGradArgs(**ok))) == 0
    torch.testing.assert_close(dx, nnr.rmsnorm_backward(x, w, g, 1e-6))
    for override, code in [(dict(D=0), -5), (dict(rows=-1), -5), (dict(D=1 << 25), -5), (dict(rows=1 << 40), -5),
                           (dict(x_dtype=2), -3), (dict(w_dtype=7), -3), (dict(pool=99), -2), (dict(x=None), -6),
                           (dict(w=None), -6), (dict(g=None), -6), (dict(dx=None), -6)]:
        assert lib.kt_rmsnorm_backward(ctypes.byref(_RmsNormGradArgs(**{**ok, **override}))) == code, override
    assert lib.kt_rmsnorm_backward(None) == -6
    assert ctypes.sizeof(_RmsNormGradArgs) == lib.kt_rmsnorm_backward_args_size()
