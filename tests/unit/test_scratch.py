"""The per-thread work buffers (kt_core/runtime/scratch.py)."""
import torch

from kt_core.runtime.scratch import work


def test_a_buffer_first_made_under_inference_mode_is_writable_outside_it():
    """A prefill's attention (inference mode) and a fine-tuning step (grad mode) in one process share
    the chunked attention's buffers: the second must be able to write them."""
    with torch.inference_mode():
        a = work("test_scratch.inference", 3, 5)
        a.fill_(1.0)
    b = work("test_scratch.inference", 2, 4)
    assert b.data_ptr() == a.data_ptr() and not b.is_inference()
    b.fill_(2.0)  # raised "Inplace update to inference tensor outside InferenceMode" before
    torch.mm(torch.ones(2, 3), torch.ones(3, 4), out=b)
    assert (b == 3).all()


def test_a_buffer_grows_and_is_kept():
    a = work("test_scratch.grow", 2, 2)
    assert work("test_scratch.grow", 1, 3).data_ptr() == a.data_ptr()  # fits: the same memory
    big = work("test_scratch.grow", 8, 8)
    assert big.shape == (8, 8) and work("test_scratch.grow", 2, 2).data_ptr() == big.data_ptr()
    assert work("test_scratch.grow", 2, 2, torch.bfloat16).dtype == torch.bfloat16  # one buffer per dtype
