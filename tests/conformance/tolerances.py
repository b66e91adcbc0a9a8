"""Per-op, per-dtype tolerances of the conformance suite, in one place.

The metric is the max absolute error relative to the reference's max magnitude:
``max|out - ref| / max|ref|`` (ops whose output is a probability use the plain
max absolute error). The reference is float64 on the same (already rounded)
inputs, so these bound the op's own arithmetic error, not input rounding.
Native kernels may ask for a looser bound only by changing this file, with a reason.
"""
import torch

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16

TOLERANCE = {
    #                      fp32   bf16   fp16
    "linear":            {F32: 1e-5, BF16: 1.6e-2, F16: 2e-3},
    "moe_experts":       {F32: 1e-5, BF16: 3e-2, F16: 4e-3},
    # w8a8 quantizes activations at run time: a value on a rounding boundary may land on the
    # neighbouring int8 code in the kernel's float32 and the reference's float64 arithmetic
    "moe_experts_w8a8":  {F32: 5e-3, BF16: 3e-2, F16: 8e-3},
    "linear_w8a8":       {F32: 5e-3, BF16: 1.6e-2, F16: 8e-3},
    # the CPU plugin's int8 / int4 expert kernels multiply codes by int16 activations
    # (a scale per row, step amax/32767): ~3e-5 relative in fp32
    "moe_experts_intq":  {F32: 1e-4, BF16: 3e-2, F16: 4e-3},
    "attention_prefill": {F32: 1e-5, BF16: 1.6e-2, F16: 2e-3},
    "attention_decode":  {F32: 1e-5, BF16: 1.6e-2, F16: 2e-3},
    "attention_mla":     {F32: 1e-5, BF16: 1.6e-2, F16: 2e-3},
    "rmsnorm":           {F32: 1e-6, BF16: 8e-3, F16: 1e-3},
    "rope":              {F32: 1e-6, BF16: 8e-3, F16: 1e-3},
    "route":             {F32: 1e-6, BF16: 1e-6, F16: 1e-6},  # router math is float32 for every input dtype
    "sampling_probs":    {F32: 1e-6, BF16: 1e-6, F16: 1e-6},
}
# cache ops (write_kv, copy_blocks, swap_blocks) move bits: they must be exact.
EXACT_OPS = ("write_kv", "copy_blocks", "swap_blocks")
