"""Format limits shared by the quantizer, the config checks and the native packers (no torch
import: ``kt config`` / ``kt plan`` check values with it)."""

# int8 groups: a multiple of 4 inputs up to this many (a group's int32 sum of code x int16
# activation must not overflow; the native checks, abi_checks.inc and linear_packed.inc, say 256 too)
INT8_MAX_GROUP = 256


def int8_group_ok(group: int) -> bool:
    """Whether int8 takes ``group`` inputs per scale (0: one scale per row)."""
    return group == 0 or (group > 0 and group % 4 == 0 and group <= INT8_MAX_GROUP)


# DeepSeek-V4's clamped SwiGLU (gate <= 10, |up| <= 10): the MoE activation silu_clamp10 (the native
# kernels' moe_args.inc spells the same 10)
DEEPSEEK_V4_SWIGLU_LIMIT = 10.0
