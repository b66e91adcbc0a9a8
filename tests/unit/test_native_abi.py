"""The native kernels' C ABI: each entry point's own argument checks and error codes, their Python
errors, and C++ exceptions (out of memory) turned into Python errors instead of crossing the ABI."""
import ctypes
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kt_backends.cpu import native
from tests.unit.native_experts import H, I, call, packed  # noqa: F401 (packed: the fixture)

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native CPU kernels: {native.status()}")

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- the C ABI checks its arguments
def lib():
    return native._need()


def raw_args(packed, **override):
    x, ids, w = call()
    out = torch.empty(3, H)
    local_of, gate, up, down = packed.call_parts()
    keep = [x, ids, w, out, local_of]
    fields = dict(T=3, H=H, I=I, top_k=2, n_local=4, n_global=local_of.numel(), fmt=native.FORMATS["int4"],
                  group=32, activation=0, x=x.data_ptr(), ids=ids.data_ptr(), weights=w.data_ptr(),
                  local_of=local_of.data_ptr(), gate=gate, up=up, down=down, out=out.data_ptr(), pool=0,
                  down_fmt=native.FORMATS["int4"], down_group=32)
    for k, v in override.items():
        if isinstance(v, torch.Tensor):
            keep.append(v)
            v = v.data_ptr()
        fields[k] = v
    args = native._MoeArgs(**fields)
    return args, keep


@pytest.mark.parametrize("override,code", [
    (dict(fmt=5), -3), (dict(fmt=-1), -3), (dict(pool=64), -2), (dict(pool=-1), -2),
    (dict(activation=len(native.ACTIVATIONS)), -4), (dict(activation=-1), -4),  # one past the last code; negative
    (dict(H=0), -5), (dict(I=-16), -5), (dict(T=-1), -5), (dict(top_k=-2), -5), (dict(n_global=-1), -5),
    (dict(H=1 << 30), -5), (dict(x=None), -6), (dict(ids=None), -6), (dict(local_of=None), -6),
    (dict(out=None), -6), (dict(group=0), -7), (dict(group=6), -7), (dict(group=48), -7),
    # fp16 scales: grouped int8's and int4's only, not fp8's or a per-row int8's
    (dict(scale_f16=1, fmt=native.FORMATS["fp8"]), -3),
    (dict(down_scale_f16=1, down_fmt=native.FORMATS["int8"], down_group=0), -3),
    (dict(local_of=torch.tensor([0, -1, -1, 9, -1, 3, -1, 2])), -8),
    (dict(H=128), -9),  # wider than the panels: the per-expert strides no longer cover an expert
    (dict(down_fmt=5), -3), (dict(down_group=6), -7), (dict(down_fmt=native.FORMATS["bf16"], down_group=0), -9),
])
def test_moe_forward_rejects_what_it_cannot_trust(packed, override, code):
    args, keep = raw_args(packed, **override)
    assert lib().kt_moe_forward(ctypes.byref(args)) == code
    with pytest.raises((ValueError, RuntimeError, MemoryError)):
        native._check_rc(code, "moe_forward")


def test_moe_forward_rejects_a_null_argument_block():
    assert lib().kt_moe_forward(None) == -6


def test_the_other_entry_points_check_their_arguments():
    L = lib()
    x, w, out = torch.zeros(2, 8), torch.zeros(4, 8, dtype=torch.bfloat16), torch.zeros(2, 4)
    assert L.kt_linear_bf16(x.data_ptr(), 2, 0, w.data_ptr(), 4, None, out.data_ptr()) == -5
    assert L.kt_linear_bf16(x.data_ptr(), 2, 8, w.data_ptr(), -4, None, out.data_ptr()) == -5
    assert L.kt_linear_bf16(None, 2, 8, w.data_ptr(), 4, None, out.data_ptr()) == -6
    assert L.kt_linear_bf16(x.data_ptr(), 2, 8, w.data_ptr(), 4, None, None) == -6
    assert L.kt_set_pool_threads(64, 1) == -2 and L.kt_set_pool_threads(-1, 1) == -2
    assert L.kt_set_pool_threads(1, 0) == -5 and L.kt_set_pool_threads(1, 1 << 20) == -5
    assert L.kt_set_threads(0) == -5
    assert L.kt_pool_threads(64) == -2 and L.kt_pool_threads(-5) == -2
    assert L.kt_membw(None, 10, 1) == -6.0 and L.kt_membw(x.data_ptr(), 0, 1) == -5.0
    assert L.kt_set_variant(None) == -2 and L.kt_variant_supported(None) == -2


def test_every_error_code_has_a_clear_python_error():
    for code, (exc, msg) in native._ERRORS.items():
        with pytest.raises(exc) as got:
            native._check_rc(code, "moe_forward")
        assert str(got.value).startswith("native moe_forward: ") and "\n" not in str(got.value)
    with pytest.raises(RuntimeError, match="unknown error code -99"):
        native._check_rc(-99, "moe_forward")
    native._check_rc(0, "moe_forward")


# ---------------------------------------------------------------- exceptions never cross the ABI
OOM_SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    from kt_backends.cpu import native
    from kt_core.weights.quant import ExpertWeights
    g = torch.Generator().manual_seed(0)
    E, H, I, T, K = 8, 64, 4096, 32768, 8
    w = lambda *s: (torch.randn(*s, generator=g) * 0.02).bfloat16()
    packed = native.pack(ExpertWeights(torch.arange(E), w(E, I, H), w(E, I, H), w(E, H, I)))
    x = torch.randn(T, H)
    ids = torch.arange(K).repeat(T, 1)
    wts = torch.full((T, K), 0.125)
    native.moe_forward(packed, x[:2], ids[:2], wts[:2])  # threads, scratch, tiles: set up first
    vm = int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmSize:"))) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.RLIM_INFINITY))
    try:  # T*K routes x I floats of activations: 4 GiB of scratch, past the 1 GiB left
        native.moe_forward(packed, x, ids, wts)
    except MemoryError as exc:
        print("MemoryError:", exc)
        sys.exit(0)
    print("no error")
    sys.exit(1)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc: Linux only")
@pytest.mark.skipif("asan" in os.environ.get("LD_PRELOAD", ""), reason="ASan reserves its shadow: no RLIMIT_AS")
def test_out_of_memory_in_the_kernel_is_a_memory_error_not_an_abort():
    """std::bad_alloc inside moe_forward used to unwind through the C ABI (std::terminate: the
    process died with SIGABRT); now every entry point catches it and Python raises MemoryError."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", OOM_SCRIPT], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)
    assert done.returncode == 0, f"rc {done.returncode}\n{done.stdout}\n{done.stderr[-3000:]}"
    assert "MemoryError: native moe_forward: the native kernels ran out of memory" in done.stdout

