"""backends/cpu/hugepages.py: weights copied into memory advised for transparent huge pages keep their
values, shape and dtype; where huge pages do not apply the tensor comes back as it is."""
import sys

import pytest
import torch

from kt_backends.cpu import hugepages


def test_a_large_weight_keeps_its_values_and_starts_on_a_huge_page():
    t = torch.randn(4100, 2049).bfloat16()  # ~16.8 MB: over MIN_BYTES, not a whole number of 2 MB pages
    assert t.numel() * 2 >= hugepages.MIN_BYTES
    out = hugepages.huge_copy(t)
    assert out.dtype == t.dtype and out.shape == t.shape and out.is_contiguous() and torch.equal(out, t)
    if hugepages.available():
        assert out.data_ptr() % hugepages.HUGE_PAGE == 0 and out.data_ptr() != t.data_ptr()
    elif sys.platform.startswith("linux"):
        pytest.skip("transparent huge pages are off here (or KT_HUGEPAGES=0): the copy is the tensor itself")


def test_small_or_strided_tensors_come_back_contiguous_and_equal():
    small = torch.randn(64, 64).bfloat16()
    assert hugepages.huge_copy(small) is small
    strided = torch.randn(3000, 3000)[:, ::2]  # 18 MB of floats, not contiguous
    out = hugepages.huge_copy(strided)
    assert out.is_contiguous() and torch.equal(out, strided)


def test_kt_hugepages_0_turns_it_off(monkeypatch):
    monkeypatch.setenv("KT_HUGEPAGES", "0")
    hugepages._madvise.cache_clear()
    try:
        t = torch.randn(2100, 2048).bfloat16()
        assert not hugepages.available() and hugepages.huge_copy(t) is t
    finally:
        monkeypatch.delenv("KT_HUGEPAGES")
        hugepages._madvise.cache_clear()



def test_packed_experts_land_on_huge_pages_with_the_same_panels(monkeypatch):
    from kt_backends.cpu import native
    from kt_core.weights.quant import ExpertWeights

    if not native.available():
        pytest.skip("native CPU kernels not built")
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(8, 1024, 1024, generator=g).bfloat16() for _ in range(3)]  # 16 MB a projection
    packed = native.pack(ExpertWeights(torch.arange(8), *ws))
    monkeypatch.setenv("KT_HUGEPAGES", "0")
    hugepages._madvise.cache_clear()
    try:
        plain = native.pack(ExpertWeights(torch.arange(8), *ws))
    finally:
        monkeypatch.delenv("KT_HUGEPAGES")
        hugepages._madvise.cache_clear()
    for proj, ref in ((packed.gate, plain.gate), (packed.up, plain.up), (packed.down, plain.down)):
        assert torch.equal(proj.data, ref.data)
        if hugepages.available():
            assert proj.data.data_ptr() % hugepages.HUGE_PAGE == 0
    x, ids, wts = torch.randn(3, 1024, generator=g), torch.tensor([[0, 1], [2, 3], [7, 0]]), torch.full((3, 2), 0.5)
    assert torch.equal(native.moe_forward(packed, x, ids, wts), native.moe_forward(plain, x, ids, wts))
