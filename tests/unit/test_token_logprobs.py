"""kt_core.train.token_logprobs: the chunked log-probabilities and their gradient equal autograd's
through the whole [tokens, vocab] logits."""
import torch

from kt_core.train import token_logprobs as tl


class Head:
    """What token_logprobs asks of a model: its head and its vocabulary size."""

    def __init__(self, w):
        self.w, self.spec = w, type("S", (), {"vocab_size": w.shape[0]})()

    def head_products(self, h):
        return h @ self.w.T


def test_chunks_give_autograds_values_and_gradients(monkeypatch):
    g = torch.Generator().manual_seed(0)
    w, h0 = torch.randn(50, 16, generator=g, dtype=torch.float64), torch.randn(9, 16, generator=g, dtype=torch.float64)
    targets, up = torch.randint(0, 50, (9,), generator=g), torch.randn(9, generator=g, dtype=torch.float64)
    monkeypatch.setattr(tl, "LOGITS_ELEMENTS", 250)  # blocks of 5 rows, a short last one ...
    monkeypatch.setattr(tl, "CHUNK_ELEMENTS", 120)  # ... of 2-row chunks, a short last one in each
    monkeypatch.setattr(tl, "MIN_ROWS", 1)
    model = Head(w)
    h = h0.clone().requires_grad_()
    got = tl.token_logprobs(model, h, targets)
    (got * up).sum().backward()
    ref_h = h0.clone().requires_grad_()
    want = (ref_h @ w.T).log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    (want * up).sum().backward()
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-6, atol=1e-6)  # float32 output
    torch.testing.assert_close(h.grad, ref_h.grad, rtol=1e-6, atol=1e-6)
    with torch.no_grad():  # no gradient wanted: none is made
        torch.testing.assert_close(tl.token_logprobs(model, h0, targets), got.detach())
    none = tl.token_logprobs(model, h[:0], targets[:0])  # an answer of no tokens: a zero loss, still in the graph
    assert none.shape == (0,)
    none.sum().backward()


class LinearHead(Head):
    """A model whose head is the backend's plain linear over a frozen weight, as CausalLM's is."""

    def __init__(self, w):
        from kt_core.backend.torch_backend import TorchBackend

        super().__init__(w)
        self.lm_head, self.be = w, TorchBackend()

    def head_products(self, h):
        return self.be.linear(h, self.lm_head)


def test_a_plain_head_takes_the_transposed_gradient_product_with_autograds_values(monkeypatch):
    g = torch.Generator().manual_seed(1)
    w, h0 = torch.randn(70, 16, generator=g, dtype=torch.float64), torch.randn(11, 16, generator=g, dtype=torch.float64)
    targets, up = torch.randint(0, 70, (11,), generator=g), torch.randn(11, generator=g, dtype=torch.float64)
    monkeypatch.setattr(tl, "LOGITS_ELEMENTS", 280)  # blocks of 4 rows, a short last one
    monkeypatch.setattr(tl, "MIN_ROWS", 1)
    model = LinearHead(w)
    assert tl._plain_head(model, h0) is w
    assert tl._plain_head(model, h0.float()) is None  # another dtype than the head's: autograd's path
    h = h0.clone().requires_grad_()
    (tl.token_logprobs(model, h, targets) * up).sum().backward()
    ref_h = h0.clone().requires_grad_()
    ((ref_h @ w.T).log_softmax(-1).gather(1, targets[:, None]).squeeze(1) * up).sum().backward()
    torch.testing.assert_close(h.grad, ref_h.grad, rtol=1e-6, atol=1e-6)


def test_a_bf16_head_without_onednn_bf16_takes_float32_blocks_with_autograds_values(monkeypatch):
    """Where torch's bf16 products are its scalar loop (AVX2-only CPUs: forced here on any CPU), the
    head's products and its gradient run widened to float32 a block of vocabulary rows at a time."""
    from kt_core.backend.torch_ops import wide_mm

    g = torch.Generator().manual_seed(2)
    w = torch.randn(300, 32, generator=g).bfloat16()
    h0 = torch.randn(40, 32, generator=g).bfloat16()
    targets, up = torch.randint(0, 300, (40,), generator=g), torch.randn(40, generator=g)
    monkeypatch.setattr(wide_mm, "onednn_bf16", lambda: False)
    monkeypatch.setattr(wide_mm, "BLOCK_BYTES", 64 * 32 * 4)  # blocks of 64 vocabulary rows, a short last one
    monkeypatch.setattr(tl, "MIN_ROWS", 1)
    calls = []
    monkeypatch.setattr(wide_mm, "mm_nn", lambda a, b, f=wide_mm.mm_nn: calls.append(a.shape) or f(a, b))
    model = LinearHead(w)
    h = h0.clone().requires_grad_()
    got = tl.token_logprobs(model, h, targets)
    (got * up).sum().backward()
    assert calls, "the head's gradient product did not take the widened blocks"
    ref_h = h0.double().requires_grad_()
    want = (ref_h @ w.double().T).log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    (want * up.double()).sum().backward()
    # float32 logits and their gradient (the products' exact float32 sums, never rounded to bf16 between
    # them: with bf16 logits the log-probabilities were 2^-8 of the largest logit off), a bf16 h.grad
    logits = (h0.double() @ w.double().T).abs().max().item()
    assert (got.double() - want.detach()).abs().max() <= 1e-5 * logits
    assert (h.grad.double() - ref_h.grad).abs().max() <= 2 ** -8 * ref_h.grad.abs().max()
