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
    # float32 state arithmetic; the chunked form's triangular solve reorders the sums (measured on the
    # torch ops: fp32 3e-7 over a 70-token prefill, bf16 2.7e-3, fp16 3.5e-4: the output's rounding)
    "gated_delta_rule":  {F32: 2e-6, BF16: 8e-3, F16: 1e-3},
    "causal_conv1d":     {F32: 1e-6, BF16: 8e-3, F16: 1e-3},
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
    # AMX (TDPBF16PS: bf16, fp8, int8 / int4 in groups of 32 from 17 tokens) and AVX512-BF16 (VDPBF16PS,
    # bf16) round the float activations to bf16 (2^-9 relative per element), as a bf16 model's own
    # matmuls do, and AMX the dequantized int4 / fp8 weights too, for experts with enough tokens;
    # AMX's integer tiles (TDPBSSD: the other int8 / int4 calls) carry activations as two int8 codes
    # (step amax/32512), well inside this bound
    "bf16_tiles": (1e-2, "activations (and int4 / fp8 weights) rounded to bf16 on AMX / AVX512-BF16 tiles"),
    # bf16 hidden states in and out (a bf16 model): whatever the kernel, the output is rounded to bf16
    "bf16_output": (4e-3, "output rounded to bf16 (2^-9 relative)"),
}


def native_moe_path(fmt: str, variant: str, max_tokens_per_expert: int, bf16_input: bool = False) -> str:
    """The NATIVE_MOE key of the path the CPU kernels take for this call. Only bf16 hidden states
    (``bf16_input``) may be rounded to bf16 inside; the token count from which a variant does is
    the library's own (native.bf16_tile_tokens)."""
    from kt_backends.cpu import native

    if fmt == "w8a8":
        return "w8a8"
    if bf16_input:
        least = native.bf16_tile_tokens(variant, fmt) if native.available() else 0
        return "bf16_tiles" if least and max_tokens_per_expert >= least else "bf16_output"
    if fmt in ("int8", "int4") and variant != "generic":
        return "int16_activations"
    return "float"


def native_moe_tolerance(fmt: str, variant: str, max_tokens_per_expert: int, bf16_input: bool = False) -> float:
    return NATIVE_MOE[native_moe_path(fmt, variant, max_tokens_per_expert, bf16_input)][0]
