"""The native CPU kernels' C ABI as Python sees it: format and activation codes, limits, the
library's error codes and their messages, the argument structs, and integer checking.
One place for what native.py, native_pack.py and native_linear.py share."""
from __future__ import annotations

import ctypes
import operator

NR = 16
FORMATS = {"bf16": 0, "int8": 1, "int4": 2, "fp8": 3, "w8a8": 4}
ACTIVATIONS = {"silu": 0, "gelu_tanh": 1, "swiglu_oai": 2, "silu_clamp10": 3}
# 9: int8 takes groups (scale [P][K/g][16]); 10: down's own format (MoeArgs.down_fmt); 11: activation 3,
# silu_clamp10 (DeepSeek-V4's clamped SwiGLU); 12: the decode step's ops kt_attention_decode, kt_rmsnorm,
# kt_rope (argument structs below, native_ops.py) and error code -13 (an index read from a tensor is out of range);
# 13: kt_decode_layers, a decode step's decoder layers in one call (native_layer.py), and fp16 group scales of
# int8 (MoeArgs.scale_f16 / down_scale_f16, LinearArgs.scale_f16); 14: the same flags take int4 (scales and
# zero points in fp16); 15: kt_mla_decode, DeepSeek MLA decode over the latent cache (native_mla.py); 16: grouped
# int8 takes zero points (value = (code - zero) * scale: GGUF Q5_1 / Q5_K / Q2_K kept exactly); 17: MoeArgs.save_gu
# and kt_expert_rows_t, training's backward products through frozen experts (native_grad.py); 18: kt_expert_rows,
# their forward products one by one (LoRA-adapted experts); 19: kt_silu_mul_backward, the SwiGLU activation's
# gradients between them; 20: kt_quantize_int4, kt_quantize_int8 and kt_pack_int4,
# load-time quantization and int4 packing (native_quant.py); 21: kt_rmsnorm_backward, rmsnorm's input gradient
# (fine-tuning: kt_core/train/native_norm_rope.py); 22: kt_attn_softmax_grad and kt_attn_scores_grad, causal attention's backward softmax
# (the second with its two products on the AMX tiles)
# (fine-tuning and prefill: backends/cpu/chunked_attention.py), and kt_logsoftmax_grad, the LM head's log-probabilities and
# their gradient (kt_core/train/token_logprobs.py); RowsTArgs.a_rows / a_count (the routes' rows read in place);
# 23: kt_attn_softmax_grad writes P alone when dP, O, dO and dS are null (fine-tuning's attention forward);
# 24: so does kt_attn_scores_grad when dO, O, v and dS are null, and it runs on AVX512-BF16 without AMX;
# 25: AttnSoftmaxGradArgs.dtype: kt_attn_softmax_grad's O, dO, P and dS float32 (P / dS may be S / dP themselves)
ABI_VERSION = 25
MAX_POOLS = 64  # logical CPU devices cpu:0..cpu:63, one thread pool each
MAX_THREADS = 4096  # per pool
MAX_DIM = 1 << 24  # hidden size, expert width, tokens per call, expert ids: what the library accepts
MAX_TOPK = 4096
MAX_HEAD_DIM = 4096  # head_dim of attention_decode / rope
DTYPE_CODES = {"float32": 0, "bfloat16": 1}  # element types of attention_decode / rmsnorm / rope tensors

# the library's error codes (kt_cpu.cpp, enum Error): exception type, what is wrong and what to do
_ERRORS = {
    -1: (ValueError, "topk_ids holds a negative expert id; routes carry global expert ids >= 0 (ids past "
                     "the packed experts are other devices' and are skipped)"),
    -2: (ValueError, f"thread pool index out of range; pools are 0..{MAX_POOLS - 1} (cpu:0..cpu:{MAX_POOLS - 1})"),
    -3: (ValueError, "unknown weight format or element type code (or zero points on a format without them); "
                     "pack the experts with native.pack(), pass float32 / bfloat16 tensors"),
    -4: (ValueError, f"unknown activation code; use one of {', '.join(ACTIVATIONS)}"),
    -5: (ValueError, f"a size is out of range (negative, zero, or above {MAX_DIM}); check the shapes passed"),
    -6: (ValueError, "a buffer the call needs was not passed (null pointer)"),
    -7: (ValueError, "the group size does not fit the format and the hidden / expert widths; pack the experts "
                     "with native.pack()"),
    -8: (ValueError, "the expert map points past the packed experts; pack the experts with native.pack()"),
    -9: (ValueError, "a projection's per-expert stride is smaller than one expert's panels; pack the experts "
                     "with native.pack()"),
    -10: (RuntimeError, "the worker threads could not be started; ask for fewer (native.set_threads)"),
    -11: (MemoryError, "the native kernels ran out of memory; pass fewer tokens per call or free memory"),
    -12: (RuntimeError, "internal error in the native kernels (a C++ exception); please report it with "
                        "`kt doctor` output"),
    -13: (ValueError, "a value read from an index tensor is out of range (attention: a block table entry "
                      "outside the cache's blocks, a sequence length outside 1..max_blocks*block_size, or a "
                      "position past the rope table: check block_tables / seq_lens / positions; expert products: "
                      "per-expert row counts that are negative or do not add up to the rows)"),
}


def _check_rc(rc: int, what: str) -> None:
    """Raise the Python exception for a library error code (0: success)."""
    if rc == 0:
        return
    exc, msg = _ERRORS.get(int(rc), (RuntimeError, f"unknown error code {rc}; the library and native.py "
                                                   "disagree: reinstall kt-core"))
    raise exc(f"native {what}: {msg}")


class _Proj(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("zero", ctypes.c_void_p),
                ("bias", ctypes.c_void_p), ("data_stride", ctypes.c_int64), ("param_stride", ctypes.c_int64)]


class _MoeArgs(ctypes.Structure):
    _fields_ = [("T", ctypes.c_int64), ("H", ctypes.c_int64), ("I", ctypes.c_int64), ("top_k", ctypes.c_int64),
                ("n_local", ctypes.c_int64), ("n_global", ctypes.c_int64), ("fmt", ctypes.c_int),
                ("group", ctypes.c_int), ("activation", ctypes.c_int), ("x", ctypes.c_void_p),
                ("ids", ctypes.c_void_p), ("weights", ctypes.c_void_p), ("local_of", ctypes.c_void_p),
                ("gate", _Proj), ("up", _Proj), ("down", _Proj), ("out", ctypes.c_void_p), ("pool", ctypes.c_int),
                ("round_bf16", ctypes.c_int), ("down_fmt", ctypes.c_int), ("down_group", ctypes.c_int),
                ("scale_f16", ctypes.c_int), ("down_scale_f16", ctypes.c_int), ("save_gu", ctypes.c_void_p)]


class _RowsTArgs(ctypes.Structure):  # expert_grad.inc RowsTArgs
    _fields_ = [("M", ctypes.c_int64), ("K", ctypes.c_int64), ("n_local", ctypes.c_int64), ("rows", ctypes.c_int64),
                ("lda", ctypes.c_int64), ("ldc", ctypes.c_int64), ("fmt", ctypes.c_int), ("group", ctypes.c_int),
                ("scale_f16", ctypes.c_int), ("accumulate", ctypes.c_int), ("round_bf16", ctypes.c_int),
                ("pool", ctypes.c_int), ("offsets", ctypes.c_void_p), ("proj", _Proj), ("A", ctypes.c_void_p),
                ("C", ctypes.c_void_p), ("a_rows", ctypes.c_void_p), ("a_count", ctypes.c_int64)]


class _ActGradArgs(ctypes.Structure):  # act_grad.inc ActGradArgs
    _fields_ = [("rows", ctypes.c_int64), ("I", ctypes.c_int64), ("pool", ctypes.c_int), ("gu", ctypes.c_void_p),
                ("z", ctypes.c_void_p), ("w", ctypes.c_void_p), ("dg", ctypes.c_void_p), ("du", ctypes.c_void_p),
                ("dw", ctypes.c_void_p)]


class _QuantInt4Args(ctypes.Structure):  # quantize_load.inc QuantInt4Args
    _fields_ = [("rows", ctypes.c_int64), ("K", ctypes.c_int64), ("group", ctypes.c_int64), ("src_dtype", ctypes.c_int),
                ("symmetric", ctypes.c_int), ("fp16", ctypes.c_int), ("n_starts", ctypes.c_int),
                ("refits", ctypes.c_int), ("pool", ctypes.c_int), ("start_lo", ctypes.c_void_p),
                ("start_width", ctypes.c_void_p), ("src", ctypes.c_void_p), ("codes", ctypes.c_void_p),
                ("scale", ctypes.c_void_p), ("zero", ctypes.c_void_p)]


class _QuantInt8Args(ctypes.Structure):  # quantize_load.inc QuantInt8Args
    _fields_ = [("rows", ctypes.c_int64), ("K", ctypes.c_int64), ("group", ctypes.c_int64), ("src_dtype", ctypes.c_int),
                ("fp16", ctypes.c_int), ("pool", ctypes.c_int), ("src", ctypes.c_void_p), ("codes", ctypes.c_void_p),
                ("scale", ctypes.c_void_p)]


class _PackInt4Args(ctypes.Structure):  # quantize_load.inc PackInt4Args
    _fields_ = [("E", ctypes.c_int64), ("M", ctypes.c_int64), ("K", ctypes.c_int64), ("pool", ctypes.c_int),
                ("codes", ctypes.c_void_p), ("out", ctypes.c_void_p)]


class _AttnDecodeArgs(ctypes.Structure):  # attention_decode.inc AttnDecodeArgs
    _fields_ = [("B", ctypes.c_int64), ("Hq", ctypes.c_int64), ("Hkv", ctypes.c_int64), ("D", ctypes.c_int64),
                ("num_blocks", ctypes.c_int64), ("block_size", ctypes.c_int64), ("max_blocks", ctypes.c_int64),
                ("window", ctypes.c_int64), ("chunk", ctypes.c_int64), ("scale", ctypes.c_float),
                ("q_dtype", ctypes.c_int), ("kv_dtype", ctypes.c_int), ("pool", ctypes.c_int),
                ("q", ctypes.c_void_p), ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p),
                ("block_tables", ctypes.c_void_p), ("seq_lens", ctypes.c_void_p), ("sinks", ctypes.c_void_p),
                ("out", ctypes.c_void_p)]


class _MlaDecodeArgs(ctypes.Structure):  # mla_decode.inc MlaDecodeArgs
    _fields_ = [("B", ctypes.c_int64), ("H", ctypes.c_int64), ("dn", ctypes.c_int64), ("dr", ctypes.c_int64),
                ("lora", ctypes.c_int64), ("dv", ctypes.c_int64), ("num_blocks", ctypes.c_int64),
                ("block_size", ctypes.c_int64), ("max_blocks", ctypes.c_int64), ("scale", ctypes.c_float),
                ("q_dtype", ctypes.c_int), ("w_dtype", ctypes.c_int), ("kv_dtype", ctypes.c_int), ("pool", ctypes.c_int),
                ("q_nope", ctypes.c_void_p), ("q_pe", ctypes.c_void_p), ("w_uk", ctypes.c_void_p),
                ("w_uv", ctypes.c_void_p), ("latent", ctypes.c_void_p), ("block_tables", ctypes.c_void_p),
                ("seq_lens", ctypes.c_void_p), ("out", ctypes.c_void_p)]


class _RmsNormArgs(ctypes.Structure):  # norm_rope.inc RmsNormArgs
    _fields_ = [("rows", ctypes.c_int64), ("D", ctypes.c_int64), ("eps", ctypes.c_float), ("x_dtype", ctypes.c_int),
                ("w_dtype", ctypes.c_int), ("pool", ctypes.c_int), ("x", ctypes.c_void_p), ("w", ctypes.c_void_p),
                ("out", ctypes.c_void_p)]


class _RmsNormGradArgs(ctypes.Structure):  # norm_grad.inc RmsNormGradArgs
    _fields_ = _RmsNormArgs._fields_[:-1] + [("g", ctypes.c_void_p), ("dx", ctypes.c_void_p)]


class _AttnSoftmaxGradArgs(ctypes.Structure):  # attn_grad.inc AttnSoftmaxGradArgs
    _fields_ = [("rows", ctypes.c_int64), ("keys", ctypes.c_int64), ("ld", ctypes.c_int64),
                ("period", ctypes.c_int64), ("pos0", ctypes.c_int64), ("dh", ctypes.c_int64),
                ("scale", ctypes.c_float), ("pool", ctypes.c_int), ("dtype", ctypes.c_int), ("pad", ctypes.c_int),
                ("S", ctypes.c_void_p), ("dP", ctypes.c_void_p),
                ("O", ctypes.c_void_p), ("dO", ctypes.c_void_p), ("P", ctypes.c_void_p), ("dS", ctypes.c_void_p)]


class _AttnScoresGradArgs(ctypes.Structure):  # attn_grad.inc AttnScoresGradArgs
    _fields_ = [(name, ctypes.c_int64) for name in ("H", "G", "D", "c0", "c1", "q_hs", "q_ps", "do_hs", "do_ps",
                                                    "o_hs", "o_ps", "kv_hs", "kv_ps")] + \
        [("scale", ctypes.c_float), ("pool", ctypes.c_int)] + \
        [(name, ctypes.c_void_p) for name in ("q", "dO", "O", "k", "v", "P", "dS")]


class _LogSoftmaxGradArgs(ctypes.Structure):  # logsoftmax_grad.inc LogSoftmaxGradArgs
    _fields_ = [("rows", ctypes.c_int64), ("cols", ctypes.c_int64), ("dtype", ctypes.c_int),
                ("want_grad", ctypes.c_int), ("pool", ctypes.c_int), ("pad", ctypes.c_int), ("z", ctypes.c_void_p),
                ("targets", ctypes.c_void_p), ("logp", ctypes.c_void_p)]


class _RopeArgs(ctypes.Structure):  # norm_rope.inc RopeArgs
    _fields_ = [("T", ctypes.c_int64), ("Hq", ctypes.c_int64), ("Hk", ctypes.c_int64), ("D", ctypes.c_int64),
                ("rot", ctypes.c_int64), ("table_rows", ctypes.c_int64), ("q_stride_t", ctypes.c_int64),
                ("q_stride_h", ctypes.c_int64), ("k_stride_t", ctypes.c_int64), ("k_stride_h", ctypes.c_int64),
                ("q_dtype", ctypes.c_int), ("k_dtype", ctypes.c_int), ("interleaved", ctypes.c_int),
                ("pool", ctypes.c_int), ("q", ctypes.c_void_p), ("k", ctypes.c_void_p), ("positions", ctypes.c_void_p),
                ("cos_sin", ctypes.c_void_p), ("q_out", ctypes.c_void_p), ("k_out", ctypes.c_void_p)]


def _index(value, what: str, lo: int, hi: int) -> int:
    """value as an int in lo..hi, or ValueError saying what it must be."""
    try:
        if isinstance(value, bool):
            raise TypeError
        v = operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be an integer in {lo}..{hi}, got {value!r}") from None
    if not lo <= v <= hi:
        raise ValueError(f"{what} must be in {lo}..{hi}, got {v}")
    return v


def overlaps(a, b) -> bool:
    """Whether two contiguous tensors share any byte (an empty one shares none): what a native pass that
    reads one while it writes the other must be told apart from."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()
