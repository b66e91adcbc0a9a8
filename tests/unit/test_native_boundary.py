"""The native kernels' boundary: what Python checks before the C++ dereferences anything, the
library's own argument checks and error codes, C++ exceptions turned into Python errors, and
calls racing thread-pool resizes and variant switches.

Every check here guards a read the kernels would otherwise make out of bounds (or a crash):
the C ABI trusts raw pointers and sizes, so a wrong shape must be refused, never computed on."""
import ctypes
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from kt_backends.cpu import native
from kt_core.weights.quant import ExpertWeights, quantize

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native CPU kernels: {native.status()}")

ROOT = Path(__file__).resolve().parents[2]
H, I = 64, 32


def experts(fmt="int4", E=4, group=32, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)

    def w(*shape):
        t = (torch.randn(*shape, generator=g) * shape[-1] ** -0.5).to(torch.bfloat16)
        return t if fmt == "bf16" else quantize(t.float(), fmt, group_size=group)
    kw = {}
    if bias:
        kw = {k: torch.randn(E, n, generator=g) * 0.1 for k, n in (("gate_bias", I), ("up_bias", I), ("down_bias", H))}
    return ExpertWeights(torch.tensor([3, 0, 7, 5][:E]), w(E, I, H), w(E, I, H), w(E, H, I), **kw)


@pytest.fixture(scope="module")
def packed():
    return native.pack(experts())


def call(T=3, K=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    ids = torch.tensor([[3, 0], [7, 5], [0, 7]])[:T, :K].contiguous()
    return x, ids, torch.rand(T, K, generator=g)


def fresh(packed):
    """A copy of a PackedExperts whose checks have not run yet (they are cached per object)."""
    return native.PackedExperts(packed.expert_ids, packed.fmt, packed.group, packed.hidden, packed.inter,
                                packed.gate, packed.up, packed.down)


# ---------------------------------------------------------------- Python-side checks of a call
def test_a_valid_call_still_works(packed):
    x, ids, w = call()
    out = native.moe_forward(packed, x, ids, w)
    assert out.shape == (3, H) and torch.isfinite(out).all()


@pytest.mark.parametrize("width", [H - 16, H + 16])
def test_hidden_width_must_match_the_packed_experts(packed, width):
    x, ids, w = call()
    with pytest.raises(ValueError, match=f"packed for hidden size {H}"):
        native.moe_forward(packed, torch.randn(3, width), ids, w)


def test_route_tensors_must_agree(packed):
    x, ids, w = call()
    with pytest.raises(ValueError, match="topk_ids must be 2-D"):
        native.moe_forward(packed, x, ids.flatten(), w)
    with pytest.raises(ValueError, match="topk_weights has shape .* must agree"):
        native.moe_forward(packed, x, ids, w[:, :1])
    with pytest.raises(ValueError, match="routes 2 tokens, hidden holds 3"):
        native.moe_forward(packed, x, ids[:2], w[:2])
    with pytest.raises(ValueError, match="integer expert ids"):
        native.moe_forward(packed, x, ids.float(), w)
    with pytest.raises(ValueError, match="topk_weights must be one of"):
        native.moe_forward(packed, x, ids, (w * 100).long())
    with pytest.raises(ValueError, match="hidden must be one of"):
        native.moe_forward(packed, x.long(), ids, w)
    with pytest.raises(ValueError, match="must be a torch.Tensor"):
        native.moe_forward(packed, x.tolist(), ids, w)


def test_tensors_on_another_device_are_refused(packed):
    x, ids, w = call()
    with pytest.raises(ValueError, match="hidden is on meta.*cpu()"):
        native.moe_forward(packed, x.to("meta"), ids, w)


def test_non_contiguous_inputs_are_read_correctly(packed):
    x, ids, w = call()
    wide = torch.zeros(3, 2 * H)
    wide[:, ::2] = x
    assert torch.equal(native.moe_forward(packed, wide[:, ::2], ids.t().contiguous().t(), w),
                       native.moe_forward(packed, x, ids, w))


def test_activation_and_pool_are_checked(packed):
    x, ids, w = call()
    with pytest.raises(ValueError, match="unknown MoE activation 'relu'"):
        native.moe_forward(packed, x, ids, w, "relu")
    with pytest.raises(ValueError, match="unknown MoE activation"):
        native.moe_forward(packed, x, ids, w, ["silu"])
    for pool in (-1, 64, 1000, "0", 1.0, True):
        with pytest.raises(ValueError, match=r"pool .* 0\.\.63"):
            native.moe_forward(packed, x, ids, w, pool=pool)
        with pytest.raises(ValueError, match=r"pool .* 0\.\.63"):
            native.set_pool_threads(pool, 1)
        with pytest.raises(ValueError, match=r"pool .* 0\.\.63"):
            native.pool_threads(pool)
        with pytest.raises(ValueError, match=r"pool .* 0\.\.63"):
            native.submit(packed, x, ids, w, pool=pool)


def test_thread_counts_are_checked():
    for n in (0, -3, native.MAX_THREADS + 1, "2", 2.5):
        with pytest.raises(ValueError, match="threads"):
            native.set_threads(n)
        with pytest.raises(ValueError, match="threads"):
            native.set_pool_threads(1, n)
    with pytest.raises(ValueError, match="megabytes"):
        native.memory_bandwidth_gbps(megabytes=0)


def test_expert_ids_past_the_local_map_are_other_devices(packed):
    """Ids beyond the largest packed id (local_of's end) belong to experts held elsewhere: they
    add nothing and are never looked up; a negative id is an error."""
    x, ids, w = call()
    base = native.moe_forward(packed, x, ids, w)
    far = torch.tensor([[3, 0, 8], [7, 5, 2**40], [0, 7, 6]])  # 8, 6: past / inside the map, not held
    out = native.moe_forward(packed, x, far, torch.cat([w, torch.rand(3, 1)], dim=1))
    assert torch.equal(out, base)
    for dtype in (torch.int64, torch.int32):
        with pytest.raises(ValueError, match="negative expert id"):
            native.moe_forward(packed, x, torch.tensor([[3, -1]] * 3, dtype=dtype), w)


def test_no_routes_and_no_tokens(packed):
    x, ids, w = call()
    assert torch.equal(native.moe_forward(packed, x, ids[:, :0], w[:, :0]), torch.zeros(3, H))
    assert native.moe_forward(packed, x[:0], ids[:0], w[:0]).shape == (0, H)


# ---------------------------------------------------------------- packed experts checked once
def test_tampered_packed_experts_are_refused(packed):
    x, ids, w = call()
    bad = fresh(packed)
    bad.hidden = H * 2  # the panels hold H inputs: the kernel would read twice as far
    with pytest.raises(ValueError, match=r"gate\.data .* shape"):
        native.moe_forward(bad, torch.randn(3, 2 * H), ids, w)
    bad = fresh(packed)
    bad.gate = native.PackedProj(packed.gate.data[:2].clone(), packed.gate.scale, None, None)  # 2 of 4 experts
    with pytest.raises(ValueError, match=r"gate\.data .* shape"):
        native.moe_forward(bad, x, ids, w)
    bad = fresh(packed)
    bad.down = native.PackedProj(packed.down.data, packed.down.scale[:, :1].contiguous(), None, None)
    with pytest.raises(ValueError, match=r"down\.scale .* shape"):
        native.moe_forward(bad, x, ids, w)
    bad = fresh(packed)
    bad.up = native.PackedProj(packed.up.data.transpose(2, 3), packed.up.scale, None, None)
    with pytest.raises(ValueError, match=r"non-contiguous|up\.data"):
        native.moe_forward(bad, x, ids, w)
    bad = fresh(packed)
    bad.fmt = "int3"
    with pytest.raises(ValueError, match="unknown format 'int3'"):
        native.moe_forward(bad, x, ids, w)
    bad = fresh(packed)
    bad.group = 6
    with pytest.raises(ValueError, match="multiple of 4"):
        native.moe_forward(bad, x, ids, w)
    bad = fresh(packed)
    bad.expert_ids = torch.tensor([3, 0, 7, 3])
    with pytest.raises(ValueError, match="duplicates"):
        native.moe_forward(bad, x, ids, w)


def test_checks_run_once_and_pin_what_the_pointers_point_to(packed):
    """A PackedExperts is checked on first use; later edits of its fields cannot turn the cached
    raw pointers into dangling ones (the tensors stay referenced) or change the sizes used."""
    p = native.pack(experts(seed=3))
    x, ids, w = call()
    before = native.moe_forward(p, x, ids, w)
    p.gate = p.up = p.down = None
    p.hidden = 7
    import gc
    gc.collect()
    assert torch.equal(native.moe_forward(p, x, ids, w), before)


def test_pack_refuses_weights_that_disagree_with_their_sizes():
    ex = experts("int8")
    ex.down.in_features = 2 * I  # the codes hold I inputs per row; the kernel would read 2*I
    with pytest.raises(ValueError, match=r"down weights have shape \(4, 64, 64\), expected \(4, 64, 32\)"):
        native.pack(ex)
    ex = experts("int8")
    ex.gate.qdata = ex.gate.qdata[..., :-2]  # in_features still says H
    with pytest.raises(ValueError, match="int8 codes have shape .* in_features=64 needs"):
        native.pack(ex)
    ex = experts("int4")
    ex.gate.scales = ex.gate.scales[..., :1]
    with pytest.raises(ValueError, match="scales have shape"):
        native.pack(ex)


@pytest.mark.parametrize("fmt", ["bf16", "int8", "w8a8", "fp8", "int4"])
def test_every_format_passes_its_own_checks(fmt):
    p = native.pack(experts(fmt, bias=True))
    x, ids, w = call()
    assert torch.isfinite(native.moe_forward(p, x, ids, w, "swiglu_oai")).all()


# ---------------------------------------------------------------- the dense GEMV
def test_linear_checks_its_operands():
    g = torch.Generator().manual_seed(5)
    wt = torch.randn(24, 40, generator=g).bfloat16()
    x = torch.randn(3, 40, generator=g)
    ref = torch.nn.functional.linear(x, wt.float())
    assert torch.allclose(native.linear(x, wt), ref, atol=1e-4)
    with pytest.raises(ValueError, match=r"x has 39 features .* takes 40"):
        native.linear(torch.randn(3, 39), wt)
    with pytest.raises(ValueError, match="bias must be .* of 24 values"):
        native.linear(x, wt, torch.zeros(23))
    with pytest.raises(ValueError, match="contiguous 2-D bfloat16"):
        native.linear(x[:, :24], wt.t())
    with pytest.raises(ValueError, match="contiguous 2-D bfloat16"):
        native.linear(x, wt.float())
    with pytest.raises(ValueError, match="floating point CPU tensor"):
        native.linear(x.long(), wt)
    assert native.linear(x[:0], wt).shape == (0, 24)


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


# ---------------------------------------------------------------- races
def test_resizing_the_pool_while_calls_run_keeps_results_right():
    """set_threads from two threads while a third runs moe_forward in a loop: resizes wait for
    the job in flight (they used to stop workers under it and race on the worker list)."""
    p = native.pack(experts("bf16", seed=4))
    g = torch.Generator().manual_seed(6)
    x = torch.randn(24, H, generator=g)
    ids = torch.tensor([3, 0, 7, 5]).repeat(24, 1)[:, torch.randperm(4, generator=g)[:2]]
    w = torch.rand(24, 2, generator=g)
    before = native.threads()
    ref = native.moe_forward(p, x, ids, w)
    stop, errors, calls = threading.Event(), [], [0]

    def resize(sizes):
        try:
            while not stop.is_set():
                for n in sizes:
                    native.set_threads(n)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    resizers = [threading.Thread(target=resize, args=(s,)) for s in ((1, 3, 2), (4, 2))]
    for t in resizers:
        t.start()
    try:
        for _ in range(150):
            out = native.moe_forward(p, x, ids, w)
            calls[0] += 1
            assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)
    finally:
        stop.set()
        for t in resizers:
            t.join(60)
        native.set_threads(before)
    assert not errors, errors
    assert native.threads() == before


def test_switching_variants_while_calls_run_keeps_results_right():
    variants = native.supported_variants()
    if len(variants) < 2:
        pytest.skip("one kernel variant on this CPU")
    p = native.pack(experts("int4", seed=5))
    x, ids, w = call()
    ref = native.moe_forward(p, x, ids, w)
    best, stop = native.variant(), threading.Event()

    def flip():
        while not stop.is_set():
            for v in variants:
                native.set_variant(v)

    t = threading.Thread(target=flip)
    t.start()
    try:
        for _ in range(200):
            out = native.moe_forward(p, x, ids, w)
            assert (out - ref).abs().max() <= 1e-3 * ref.abs().max()
    finally:
        stop.set()
        t.join(60)
        native.set_variant(best)
