"""Every SIMD kernel the native library picks on this CPU passes its first-use check against the AVX2
twin: a kernel that fails it is dropped for the AVX2 one with a message on stderr, so the results stay
right and the other tests cannot see it; here the message itself is the failure. And on a layer's
shapes (the check runs one panel of its own), the picked variant agrees with AVX2. Each format runs
through the fused MoE op with enough tokens an expert for the tile kernels (AMX CPUs), the pair kernels
(AVX512-BF16) and the vector ones, in a fresh process (the checks run once per process)."""
import subprocess
import sys

import pytest

from kt_backends.cpu import native

pytestmark = [pytest.mark.skipif(not native.available(), reason=f"native CPU kernels: {native.status()}"),
              pytest.mark.skipif(native.available() and "avx2" not in native.supported_variants(),
                                 reason="no AVX2 on this CPU: no SIMD kernels to compare with their AVX2 twins")]

SCRIPT = r"""
import sys, torch
from kt_backends.cpu import native
from kt_core.weights.quant import ExpertWeights, quantize
E, H, I = 4, 1024, 128  # H: more K steps than a chunk of the per-row int4 tiles
g = torch.Generator().manual_seed(0)
base = [(torch.randn(E, m, k, generator=g) * k ** -0.5).to(torch.bfloat16) for m, k in ((I, H), (I, H), (H, I))]
cases = [("bf16", {}), ("int8", {}), ("int8", {"int8_group": 32}), ("int4", {"group_size": 32}),
         ("int4", {"group_size": 0}), ("int4", {"group_size": 32, "symmetric": False}), ("fp8", {"group_size": 128}),
         ("w8a8", {})]
for fmt, kw in cases:
    ws = base if fmt == "bf16" else [quantize(w.float(), fmt, **kw) for w in base]
    packed = native.pack(ExpertWeights(torch.arange(E), *ws))
    for T in (1, 64):
        x = torch.randn(T, H, generator=g).to(torch.bfloat16)
        ids = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(T)])
        wts = torch.full((T, 2), 0.5)
        out = native.moe_forward(packed, x, ids, wts).float()
        best = native.variant()
        native.set_variant("avx2")  # the twin every first-use check compares with
        ref = native.moe_forward(packed, x, ids, wts).float()
        native.set_variant(best)
        err = float((out - ref).abs().max() / ref.abs().max())
        assert torch.isfinite(out).all() and err < 1e-2, (fmt, kw, T, best, err)
print("variant", native.variant())
"""


def test_no_kernel_fails_its_first_use_check_on_this_cpu():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "disagrees" not in done.stderr, done.stderr[-2000:]
    assert "variant" in done.stdout
