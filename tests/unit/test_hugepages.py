"""backends/cpu/hugepages.py: large weights get memory advised for transparent huge pages (aligned to
2 MB, of the asked shape and dtype); where huge pages do not apply it is plain memory."""
import sys

import pytest
import torch

from kt_backends.cpu import hugepages

PROMPT = [5, 17, 33, 2, 90, 41, 41, 7, 12, 64, 3, 88, 19, 27, 50, 61, 1, 9, 30, 77]


def _plain(monkeypatch, load):
    """``load()`` with huge pages off."""
    monkeypatch.setenv("KT_HUGEPAGES", "0")
    hugepages._madvise.cache_clear()
    try:
        return load()
    finally:
        monkeypatch.delenv("KT_HUGEPAGES")
        hugepages._madvise.cache_clear()


def test_a_large_weight_starts_on_a_huge_page_and_holds_what_is_written():
    shape = (4100, 2049)  # ~16.8 MB of bf16: over MIN_BYTES, not a whole number of 2 MB pages
    out = hugepages.huge_empty(shape, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and tuple(out.shape) == shape and out.is_contiguous()
    t = torch.randn(shape).bfloat16()
    out.copy_(t)
    assert torch.equal(out, t)
    if hugepages.available():
        assert out.data_ptr() % hugepages.HUGE_PAGE == 0
    elif sys.platform.startswith("linux"):
        pytest.skip("transparent huge pages are off here (or KT_HUGEPAGES=0): plain memory")


def test_small_tensors_get_plain_memory():
    small = hugepages.huge_empty((64, 64), torch.float32)
    assert tuple(small.shape) == (64, 64) and small.is_contiguous()
    assert small.untyped_storage().nbytes() == 64 * 64 * 4  # not a view into a 2 MB-padded buffer


def test_kt_hugepages_0_turns_it_off(monkeypatch):
    def load():
        assert not hugepages.available()
        return hugepages.huge_empty((2100, 2048), torch.bfloat16)
    assert _plain(monkeypatch, load).untyped_storage().nbytes() == 2100 * 2048 * 2


@pytest.mark.parametrize("fmt", ["bf16", "int4"])
def test_packed_experts_land_on_huge_pages_with_the_same_panels(fmt, monkeypatch):
    from kt_backends.cpu import native
    from kt_core.weights.quant import ExpertWeights, quantize

    if not native.available():
        pytest.skip("native CPU kernels not built")
    g = torch.Generator().manual_seed(0)
    E = 8 if fmt == "bf16" else 32  # 16 MB a projection's panels
    ws = [torch.randn(E, 1024, 1024, generator=g).bfloat16() for _ in range(3)]
    if fmt == "int4":
        ws = [quantize(w, "int4", 32) for w in ws]
    packed = native.pack(ExpertWeights(torch.arange(E), *ws))
    plain = _plain(monkeypatch, lambda: native.pack(ExpertWeights(torch.arange(E), *ws)))
    for proj, ref in ((packed.gate, plain.gate), (packed.up, plain.up), (packed.down, plain.down)):
        assert torch.equal(proj.data, ref.data)
        if hugepages.available():
            assert proj.data.data_ptr() % hugepages.HUGE_PAGE == 0
    x, ids, wts = torch.randn(3, 1024, generator=g), torch.tensor([[0, 1], [2, 3], [E - 1, 0]]), torch.full((3, 2), 0.5)
    assert torch.equal(native.moe_forward(packed, x, ids, wts), native.moe_forward(plain, x, ids, wts))


@pytest.mark.parametrize("name,dense,dtype,direct", [("qwen2", "none", "float32", True),
                                                     ("qwen2", "none", "bfloat16", True),
                                                     ("qwen2", "none", "float32", False),
                                                     ("qwen3_moe", "int8", "float32", True)])
def test_dense_weights_are_read_into_huge_pages_with_the_same_logits(name, dense, dtype, direct, tiny_checkpoint,
                                                                     monkeypatch):
    """The LM head and the attention projections (read straight into the CPU backend's dense_empty, or
    packed into huge_empty when quantized) sit on 2 MB boundaries; the model computes what it did. The
    float32 checkpoints read as bfloat16 take the converting copy; ``direct=False``: a checkpoint without
    read_into (as a GGUF file) takes the copy of ``get``."""
    import kt_core
    from kt_backends.cpu import native, native_linear
    from kt_core.weights.checkpoint import Checkpoint

    if dense != "none" and not native.available():
        pytest.skip("native CPU kernels not built: quantized dense weights stay unpacked")
    if not direct:
        monkeypatch.delattr(Checkpoint, "read_into")
    monkeypatch.setattr(hugepages, "MIN_BYTES", 0)  # tiny weights: every one qualifies
    ov = [f"model.dtype={dtype}", f"quant.dense={dense}", "quant.group_size=32"]
    eng = kt_core.Engine.from_pretrained(tiny_checkpoint(name), overrides=ov)
    plain = _plain(monkeypatch, lambda: kt_core.Engine.from_pretrained(tiny_checkpoint(name), overrides=ov))
    attn = next(layer.attn for layer in eng.model.layers if hasattr(layer.attn, "w") and "o" in layer.attn.w)
    weights = [eng.model.lm_head, attn.w["o"], attn.w.get("qkv", attn.w.get("q"))]
    if dense != "none":
        assert all(isinstance(w, native_linear.PackedLinear) for w in weights)
        weights = [w.proj.data for w in weights]
    assert all(isinstance(w, torch.Tensor) and w.is_contiguous() for w in weights)
    if hugepages.available():
        assert all(w.data_ptr() % hugepages.HUGE_PAGE == 0 for w in weights)
    want = plain.logits(PROMPT)
    assert torch.allclose(eng.logits(PROMPT), want, rtol=0, atol=1e-6 * float(want.abs().max()))
