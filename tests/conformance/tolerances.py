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

# The CPU plugin's native expert kernels against the torch path (tests/unit/test_native.py),
# relative max error as above. Which bound applies follows the code path that actually runs, which
# depends on the format, the kernel variant and how many tokens one expert gets in one call
# (``native_moe_path``); a test that forces a variant asks this table, never a literal.
NATIVE_MOE = {
    # float32 sums of bf16 / fp8 weights times float activations: only the summation order differs
    "float": (2e-5, "float32 accumulation; summation order only"),
    # SIMD int8 / int4 kernels multiply codes by int16 activation codes (a scale per row, step amax/32767);
    # summed over K the error reaches ~1e-4 of the output's max (1.01e-4 seen on one seed)
    "int16_activations": (2e-4, "activations carried as int16 codes, relative step 1/32767"),
    # w8a8 quantizes activations to int8 at run time; a value on a rounding boundary may take the
    # neighbouring code in the kernel's float32 and the reference's arithmetic
    "w8a8": (5e-3, "run-time int8 activations: one rounding flip of a code"),
    # AMX (TDPBF16PS) and AVX512-BF16 (VDPBF16PS) take tiles of 16+ tokens of one expert and round the
    # float activations to bf16 (2^-9 relative per element), as a bf16 model's own matmuls do
    "bf16_tiles": (1e-2, "activations rounded to bf16 on AMX / AVX512-BF16 tiles of 16+ tokens"),
}
# the smallest number of tokens of one expert that the AMX / AVX512-BF16 bf16 tile kernels take
NATIVE_BF16_TILE_TOKENS = 16


def native_moe_path(fmt: str, variant: str, max_tokens_per_expert: int) -> str:
    """The NATIVE_MOE key of the path the CPU kernels take for this call."""
    if fmt == "w8a8":
        return "w8a8"
    if fmt in ("int8", "int4") and variant != "generic":
        return "int16_activations"
    if fmt == "bf16" and variant in ("avx512", "amx") and max_tokens_per_expert >= NATIVE_BF16_TILE_TOKENS:
        return "bf16_tiles"
    return "float"


def native_moe_tolerance(fmt: str, variant: str, max_tokens_per_expert: int) -> float:
    return NATIVE_MOE[native_moe_path(fmt, variant, max_tokens_per_expert)][0]
