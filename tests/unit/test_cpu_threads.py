"""The CPU plugin's thread split: native pools for the weights, and torch's intra-op threads one
per decode step (its small ops beside the pool's spinning workers) but all of them in a prefill
step (attention over the prompt, oneDNN projections), switched at the start of every step."""
import pytest
import torch

from kt_backends.cpu import CpuBackend, native


@pytest.fixture
def restore():
    before = torch.get_num_threads(), CpuBackend._torch_threads
    yield
    torch.set_num_threads(before[0])
    CpuBackend._torch_threads = before[1]


def test_torch_threads_follow_the_step_kind(restore):
    be = CpuBackend()
    be.set_threads(2)
    decode = 1 if native.available() else 2
    assert torch.get_num_threads() == 2  # loading (quantizing, packing) takes every thread
    be.begin_step(decode=True)
    assert torch.get_num_threads() == decode
    be.begin_step(decode=False)
    assert torch.get_num_threads() == 2
    be.begin_step(decode=True)
    assert torch.get_num_threads() == decode
    CpuBackend.set_torch_threads(decode=2, prefill=1)
    be.begin_step(decode=True)
    assert torch.get_num_threads() == 2


def test_a_model_step_sets_them(restore, tmp_path):
    import kt_core
    from kt_core.models.synthetic import synthesize

    path = synthesize(tmp_path / "m", preset="tiny-qwen3-moe", layers=1, sample_tokens=8).path
    engine = kt_core.Engine.from_pretrained(path, overrides=["device.cpu.threads=2"])
    seen = []
    real = CpuBackend.begin_step
    CpuBackend.begin_step = lambda self, decode: (seen.append(decode), real(self, decode))[1]
    try:
        engine.generate([5, 6, 7, 8], max_new_tokens=3, ignore_eos=True)
    finally:
        CpuBackend.begin_step = real
    assert seen[0] is False and seen[1:] == [True, True]  # the prompt's step, then one per new token
