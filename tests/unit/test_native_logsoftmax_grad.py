"""The LM head's log-probabilities and their gradient in one native pass a row (native/logsoftmax_grad.inc,
token_logprobs._native_block): values and gradients against float64 autograd, every kernel variant,
float32 and bf16 logits; the library's argument checks."""
import ctypes

import pytest
import torch

from kt_backends.cpu import native, native_ops
from kt_backends.cpu.native_abi import _LogSoftmaxGradArgs
from kt_core.train import token_logprobs as tl

pytestmark = [pytest.mark.skipif(not native_ops.available(), reason="native CPU kernels not built"),
              pytest.mark.usefixtures("restore_native_variant")]


class Head:
    def __init__(self, w):
        self.w, self.spec = w, type("S", (), {"vocab_size": w.shape[0]})()

    def head_products(self, h):
        return h @ self.w.T


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [53, 64, 7])  # past, at and under a vector's lanes
def test_token_logprobs_take_the_native_pass_and_equal_float64(dtype, vocab, monkeypatch):
    g = torch.Generator().manual_seed(vocab)
    w0 = (torch.randn(vocab, 16, generator=g) * 2).to(dtype)
    h0 = torch.randn(11, 16, generator=g).to(dtype)
    targets, up = torch.randint(0, vocab, (11,), generator=g), torch.randn(11, generator=g)
    monkeypatch.setattr(tl, "LOGITS_ELEMENTS", 4 * vocab)  # blocks of 4 rows, a short last one
    monkeypatch.setattr(tl, "MIN_ROWS", 1)
    calls = []
    block = tl._native_block
    monkeypatch.setattr(tl, "_native_block", lambda *a: calls.append(1) or block(*a))
    hr = h0.double().requires_grad_()  # the oracle: float64 autograd on the rounded logits' inputs
    want = (hr @ w0.double().T).log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    (want * up.double()).sum().backward()
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    for variant in native.supported_variants():
        native.set_variant(variant)
        h = h0.clone().requires_grad_()
        got = tl.token_logprobs(Head(w0), h, targets)
        (got * up).sum().backward()
        scale = want.detach().abs().max()
        assert got.dtype == torch.float32 and (got.double() - want.detach()).abs().max() <= tol * scale, variant
        gscale = hr.grad.abs().max()
        assert (h.grad.double() - hr.grad).abs().max() <= tol * gscale, variant
        with torch.no_grad():  # no gradient wanted: the same values
            torch.testing.assert_close(tl.token_logprobs(Head(w0), h0, targets), got.detach())
    assert calls and all(calls)


def test_logsoftmax_grad_checks_its_arguments():
    lib = native_ops._need()
    z, t, lp = torch.zeros(3, 10), torch.tensor([0, 9, 4]), torch.zeros(3)
    ok = dict(rows=3, cols=10, dtype=0, want_grad=1, pool=0, pad=0, z=z.data_ptr(), targets=t.data_ptr(),
              logp=lp.data_ptr())
    assert lib.kt_logsoftmax_grad(ctypes.byref(_LogSoftmaxGradArgs(**ok))) == 0
    torch.testing.assert_close(lp, torch.full((3,), -torch.log(torch.tensor(10.0)).item()))
    bad = torch.tensor([0, 10, 4])  # a target past the vocabulary
    for override, code in [({"cols": 0}, -5), ({"rows": -1}, -5), ({"dtype": 5}, -3), ({"pool": 64}, -2),
                           ({"z": None}, -6), ({"targets": None}, -6), ({"logp": None}, -6),
                           ({"targets": bad.data_ptr()}, -13)]:
        assert lib.kt_logsoftmax_grad(ctypes.byref(_LogSoftmaxGradArgs(**{**ok, **override}))) == code, override
    assert lib.kt_logsoftmax_grad(None) == -6
    assert ctypes.sizeof(_LogSoftmaxGradArgs) == lib.kt_logsoftmax_grad_args_size()


def test_a_nan_logit_gives_a_nan_log_probability_in_every_variant():
    """A diverged run shows NaN, as torch would, never a finite loss (a NaN is not clamped away)."""
    z0 = torch.randn(3, 40)
    z0[1, 17] = float("nan")
    z0[2, 5] = float("inf")
    t = torch.tensor([0, 3, 9])
    for variant in native.supported_variants():
        native.set_variant(variant)
        lp = torch.empty(3)
        assert tl._native_block(z0.clone(), t, lp, True)
        assert torch.isfinite(lp[0]) and torch.isnan(lp[1]) and not torch.isfinite(lp[2]), (variant, lp)
